"""Crash injection for the crash tests, kept on the test side: a daemon started with `crash_env(state)` SIGKILLs itself
right after its journal made `state` durable, a point no real part can be made to deliver a signal at.

The daemon's PYTHONPATH starts with `crash_shim/`, whose `sitecustomize` calls `install()` at interpreter start (as
the clock tests shift the wall clock, tests/reliability/test_clock.py); production code knows nothing of it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["CRASH_AFTER", "SHIM_DIR", "crash_env", "install"]

CRASH_AFTER = "FORK_SIDECAR_TEST_CRASH_AFTER"
SHIM_DIR = Path(__file__).resolve().parent / "crash_shim"
REPO = Path(__file__).resolve().parents[2]


def crash_env(state: str, *, shims: Iterable[Path] = ()) -> dict[str, str]:
    """The environment of a daemon that dies right after journaling `state` (other `sitecustomize` dirs: `shims`,
    whose own sitecustomize must call install(), as only the first one on the path runs)."""
    first = [str(p) for p in shims] or [str(SHIM_DIR)]
    path = os.pathsep.join(p for p in (*first, str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, CRASH_AFTER: state}


def install() -> None:
    """Wrap the journal's one durable write (Journal._write) with a SIGKILL after `$FORK_SIDECAR_TEST_CRASH_AFTER`."""
    state = os.environ.get(CRASH_AFTER)
    if not state:
        return
    from sidecar import journal

    durable_write = journal.Journal._write

    def write_then_crash(self: journal.Journal, record: Any) -> None:
        durable_write(self, record)
        if record.state.value == state:
            os.kill(os.getpid(), signal.SIGKILL)

    journal.Journal._write = write_then_crash  # type: ignore[method-assign]
