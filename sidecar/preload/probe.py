"""Running a short probe script in another Python environment (a trainer's), to read what is installed there."""

from __future__ import annotations

import os
import subprocess

from sidecar.preload import DISABLE_ENV

__all__ = ["PROBE_TIMEOUT_S", "run_python_probe"]

PROBE_TIMEOUT_S = 60


def run_python_probe(executable: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`executable -c code args...`, bounded by PROBE_TIMEOUT_S (subprocess.TimeoutExpired past it). The preload is
    off in it (the probe itself must not arm it), and it runs from `/`: `-c` puts the working directory on sys.path,
    and ours must not decide what the probe finds."""
    return subprocess.run(
        [executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        env={**os.environ, DISABLE_ENV: "0"},
        cwd="/",
        check=False,
    )
