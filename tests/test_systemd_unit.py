"""The unit file: `systemd-analyze verify` prints nothing, and the notify/hardening settings are there."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "fork-sidecar.service"


def installed_copy(tmp_path: Path) -> Path:
    # verify checks that ExecStart exists: point it at this checkout's console script, as an install would.
    script = Path(sys.executable).parent / "fork-sidecar"
    text = UNIT.read_text().replace("/opt/fork-sidecar/bin/fork-sidecar", str(script))
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(installed_copy(tmp_path))], capture_output=True, text=True)
    # verify exits 0 even for unknown keys, so its output is what counts.
    assert proc.stdout + proc.stderr == ""
    assert proc.returncode == 0


def test_unit_declares_the_contract() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    service = parser["Service"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"]
    assert "kill -HUP $MAINPID" in service["ExecReload"]
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["RuntimeDirectory"] == "fork-sidecar"
    assert " run --config " in service["ExecStart"]
