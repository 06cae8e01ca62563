"""journald-native logging over a real datagram socket; text elsewhere."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.logs import JournaldHandler, under_journald


def parse_native(data: bytes) -> dict[str, str]:
    """Decode journald's native protocol (both the KEY=value and the binary length-prefixed forms)."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key = line
            size = int.from_bytes(data[nl + 1 : nl + 9], "little")
            value = data[nl + 9 : nl + 9 + size]
            i = nl + 9 + size + 1
        fields[key.decode()] = value.decode()
    return fields


def test_records_carry_priority_and_fork_fields(tmp_path: Path) -> None:
    path = tmp_path / "journal.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    handler = JournaldHandler(path)
    logger = logging.getLogger("test.journald")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        extra = {"fork_run": "/art/p/models/m", "fork_id": "F1", "fork_stage": "swap"}
        logger.error("swap failed\nsecond line", extra=extra)
        fields = parse_native(server.recv(65536))
        logger.info("plain")
        plain = parse_native(server.recv(65536))
    finally:
        logger.removeHandler(handler)
        handler.close()
        server.close()
    assert fields["MESSAGE"] == "swap failed\nsecond line"
    assert fields["PRIORITY"] == "3"
    assert fields["FORK_RUN"] == "/art/p/models/m"
    assert fields["FORK_ID"] == "F1"
    assert fields["FORK_STAGE"] == "swap"
    assert fields["SYSLOG_IDENTIFIER"] == "fork-sidecar"
    assert plain["PRIORITY"] == "6"
    assert "FORK_ID" not in plain


def test_falls_back_to_stderr_when_journald_is_gone(tmp_path: Path) -> None:
    code = (
        "import logging; from sidecar.logs import JournaldHandler;"
        f"h = JournaldHandler({str(tmp_path / 'missing.sock')!r}); logging.getLogger().addHandler(h);"
        "logging.getLogger().warning('still visible')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "still visible" in proc.stderr


def test_journal_stream_must_name_our_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "f", "w") as ours, open(tmp_path / "g", "w") as other:
        st = os.fstat(ours.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert under_journald(ours)
        assert not under_journald(other)  # inherited from a parent that was under systemd: not ours
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not under_journald(ours)
