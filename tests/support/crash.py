"""Crash injection for the crash tests, kept on the test side: a daemon started with `crash_env(state)` SIGKILLs itself
right after its journal made `state` durable, a point no real part can be made to deliver a signal at. With
`hold_env(state, gate)` it pauses there instead (the fork's thread only), until the test creates `gate`: a test acts
between two steps of a fork, however fast or slow the host runs the fork.

The daemon's PYTHONPATH starts with `crash_shim/`, whose `sitecustomize` calls `install()` at interpreter start (as
the clock tests shift the wall clock, tests/reliability/test_clock.py); production code knows nothing of it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["CRASH_AFTER", "HOLD_AFTER", "SHIM_DIR", "crash_env", "held_at", "hold_env", "install"]

CRASH_AFTER = "FORK_SIDECAR_TEST_CRASH_AFTER"
HOLD_AFTER = "FORK_SIDECAR_TEST_HOLD_AFTER"
HOLD_GATE = "FORK_SIDECAR_TEST_HOLD_GATE"
HOLD_LIMIT_S = 120.0  # a forgotten gate must not hang the daemon forever
SHIM_DIR = Path(__file__).resolve().parent / "crash_shim"
REPO = Path(__file__).resolve().parents[2]


def crash_env(state: str, *, shims: Iterable[Path] = ()) -> dict[str, str]:
    """The environment of a daemon that dies right after journaling `state` (other `sitecustomize` dirs: `shims`,
    whose own sitecustomize must call install(), as only the first one on the path runs)."""
    return {"PYTHONPATH": _shim_path(shims), CRASH_AFTER: state}


def hold_env(state: str, gate: Path) -> dict[str, str]:
    """The environment of a daemon whose forks pause right after journaling `state` until `gate` exists
    (`held_at(gate)` tells that a fork is held there)."""
    return {"PYTHONPATH": _shim_path(()), HOLD_AFTER: state, HOLD_GATE: str(gate)}


def held_at(gate: Path) -> Path:
    """The file a held fork creates once it is paused at the gate."""
    return gate.with_name(gate.name + ".held")


def _shim_path(shims: Iterable[Path]) -> str:
    first = [str(p) for p in shims] or [str(SHIM_DIR)]
    return os.pathsep.join(p for p in (*first, str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def install() -> None:
    """Wrap the journal's one durable write (Journal._write) with a SIGKILL after `$FORK_SIDECAR_TEST_CRASH_AFTER`,
    or a pause after `$FORK_SIDECAR_TEST_HOLD_AFTER` until the file `$FORK_SIDECAR_TEST_HOLD_GATE` exists."""
    crash, hold = os.environ.get(CRASH_AFTER), os.environ.get(HOLD_AFTER)
    if not crash and not hold:
        return
    from sidecar import journal

    durable_write = journal.Journal._write

    def write_then_act(self: journal.Journal, record: Any) -> None:
        durable_write(self, record)
        if record.state.value == crash:
            os.kill(os.getpid(), signal.SIGKILL)
        if record.state.value == hold:
            _wait_at_gate(Path(os.environ[HOLD_GATE]))

    journal.Journal._write = write_then_act  # type: ignore[method-assign]


def _wait_at_gate(gate: Path) -> None:
    held_at(gate).touch()
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
