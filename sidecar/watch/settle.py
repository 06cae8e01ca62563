"""Young markers: a regular-file `.fork` that a scan finds still being written is reported once it stops changing."""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

from sidecar.marker import MARKER, MARKER_SETTLE_S
from sidecar.watch.tree import join

__all__ = ["SettlingMarkers"]


@dataclass(frozen=True, slots=True)
class _Pending:
    recheck_at: float  # time.monotonic()
    signature: tuple[int, int, int]  # inode, size, mtime_ns of the marker when last seen


class SettlingMarkers:
    """The young markers found by scans, by model dir, until they have settled (the watcher thread's alone)."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}

    @staticmethod
    def is_young(st: os.stat_result) -> bool:
        return stat.S_ISREG(st.st_mode) and abs(time.time_ns() - st.st_mtime_ns) < MARKER_SETTLE_S * 1e9

    def add(self, model_dir: str, st: os.stat_result) -> None:
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        current = self._pending.get(model_dir)
        if current is None or current.signature != signature:
            self._pending[model_dir] = _Pending(time.monotonic() + MARKER_SETTLE_S, signature)

    def forget(self, model_dir: str) -> None:
        self._pending.pop(model_dir, None)

    def next_recheck(self) -> float | None:
        return min((p.recheck_at for p in self._pending.values()), default=None)

    def recheck(self, now: float, found: list[str]) -> None:
        """Report young markers that have not changed since a scan saw them; wait longer for those that did."""
        for model_dir, pending in [(d, p) for d, p in self._pending.items() if p.recheck_at <= now]:
            try:
                st = os.lstat(join(model_dir, MARKER))
            except OSError:
                del self._pending[model_dir]  # claimed or removed meanwhile
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_ino, st.st_size, st.st_mtime_ns) != pending.signature:
                self.add(model_dir, st)
            else:
                del self._pending[model_dir]
                found.append(model_dir)
