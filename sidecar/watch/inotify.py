"""The inotify layer: one inotify fd through ctypes, watches added and removed by path, events read without blocking.

Why ctypes and not watchdog: watchdog's `Observer` runs a thread per scheduled watch (watchdog 7.1.0: 2,000 run dirs ->
2,003 threads; bench/watch_bench.py measures it) and does not pass queue overflows to handlers. Its lower layer,
`watchdog.observers.inotify_c.InotifyFD` (watchdog 7; watchdog 6, which pyproject allows, has no such class), does put
many watches on one fd, but it is itself a Thread whose read loop polls only its fd and a private kill pipe, so waking
it for a rescan or a timer means reaching into private attributes; it opens the fd with `inotify_init` (no
close-on-exec, so children spawned without close_fds inherit it); its `IN_NONBLOCK`/`IN_CLOEXEC` constants are not the
kernel's (0x4000/0x2000000 for 0x800/0x80000 on x86-64); and an `add_watch` refused with EACCES is stored as a watch
with wd -1. The three syscalls and the event struct take a few dozen lines here, with the wake-up eventfd in the same
poll set.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections.abc import Callable
from typing import Literal, get_args

__all__ = ["WATCH_MODES", "Inotify", "WatchMode", "log_watch_failure", "open_inotify", "read_sysctl"]

logger = logging.getLogger("sidecar.watch")

# watch.mode: inotify where it can follow changes (auto), inotify everywhere, or polling everywhere.
WatchMode = Literal["auto", "inotify", "poll"]
WATCH_MODES: tuple[WatchMode, ...] = get_args(WatchMode)

# inotify ABI (<sys/inotify.h>); stable since Linux 2.6.
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_READ_SIZE = 64 * 1024


class Inotify:
    """One inotify instance: watches added and removed by path, raw events read without blocking."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            init1, self._add, self._rm = libc.inotify_init1, libc.inotify_add_watch, libc.inotify_rm_watch
        except AttributeError:
            raise OSError(errno.ENOSYS, "this C library has no inotify") from None
        init1.argtypes = (ctypes.c_int,)
        self._add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._rm.argtypes = (ctypes.c_int, ctypes.c_int)
        fd = int(init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1 failed: {os.strerror(err)}")
        self.fd = fd

    def add_watch(self, path: str, mask: int) -> int:
        wd = int(self._add(self.fd, os.fsencode(path), mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return wd

    def rm_watch(self, wd: int) -> None:
        # EINVAL when the kernel already dropped it (directory deleted); nothing to do then.
        self._rm(self.fd, wd)

    def read(self) -> list[tuple[int, int, bytes]]:
        """Events queued now as (wd, mask, name); empty when none. One read: poll says when there is more."""
        try:
            buf = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return []
        events, offset, end = [], 0, len(buf)
        while offset < end:
            wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(buf, offset)
            offset += _EVENT_HEADER.size
            events.append((wd, mask, buf[offset : offset + length].rstrip(b"\0")))
            offset += length
        return events

    def close(self) -> None:
        os.close(self.fd)


def open_inotify(mode: WatchMode, poll_interval: float) -> Inotify | None:
    """The inotify instance `mode` asks for: None for poll, and for auto where inotify cannot be had (logged)."""
    if mode == "poll":
        return None
    try:
        return Inotify()
    except OSError as exc:
        if mode == "inotify":
            msg = f"inotify cannot be used ({exc.strerror}); set watch.mode to auto or poll"
            raise OSError(exc.errno, msg) from exc
        logger.warning("inotify cannot be used (%s); polling every %gs instead", exc.strerror, poll_interval)
        return None


def log_watch_failure(path: str, exc: OSError, poll_interval: float, log_once: Callable[..., None]) -> None:
    """Say (once per cause) why a directory gets no watch and is scanned every `poll_interval` instead."""
    if exc.errno == errno.ENOSPC:
        log_once(
            logging.WARNING,
            "enospc",
            "inotify watch limit reached at %s (fs.inotify.max_user_watches=%s): directories without a watch are "
            "scanned every %gs instead; raise the limit for instant detection",
            path,
            read_sysctl("max_user_watches"),
            poll_interval,
        )
    else:
        log_once(
            logging.WARNING,
            f"watch:{path}",
            "cannot watch %s (%s): scanning it every %gs instead",
            path,
            exc.strerror,
            poll_interval,
        )


def read_sysctl(name: str) -> str:
    try:
        with open(f"/proc/sys/fs/inotify/{name}", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "?"
