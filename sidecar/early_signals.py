"""SIGHUP before the daemon's own handlers exist: held, not fatal.

systemd's ExecReload sends SIGHUP whenever it likes, also in the first moments of `fork-sidecar run`, while the
interpreter is still importing the daemon (a few hundred milliseconds on a busy node). SIGHUP's default action ends
the process, so until the daemon installs its handlers one that only remembers the signal is installed here, from
the package's `__init__` (the first code of ours any entry point runs). The daemon then acts on a held SIGHUP as on
any other: it re-reads its configuration. Stdlib only, and nothing else happens at import.
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["hold_sighup", "sighup_held"]

_held: list[int] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


def hold_sighup() -> None:
    """Remember SIGHUPs until the daemon installs its own handler (main thread only, as signal.signal requires)."""
    signal.signal(signal.SIGHUP, _remember)


def sighup_held() -> bool:
    """Whether a SIGHUP arrived while held; the daemon asks once, after installing its handlers."""
    return bool(_held)
