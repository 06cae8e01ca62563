"""Claims on the shared filesystem alone: the embedded default, one node or several sharing a root without a server.

Taking a marker is one atomic step on the run directory (`take_marker_at`); the claim record beside it names the
claimer (host, pid) and carries a heartbeat the claimer renews, so another daemon can tell a dead claimer from a live
one: by its pid on the same host, by the heartbeat's age (wall clock, the only clock hosts share) on another.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Any

import psutil

from sidecar.claims.base import Claims
from sidecar.fsops import RENAME_NOREPLACE, rename_noreplace_at, renameat2
from sidecar.marker import INPROGRESS, MARKER, MARKER_SETTLE_S, read_marker_file

__all__ = ["FilesystemClaims", "read_claimed_marker", "take_marker_at"]


class FilesystemClaims(Claims):
    backend = "filesystem"

    def claimer_gone(self, info: dict[str, Any], path: Path | None = None) -> bool:
        claimer = info.get("claimed_by") or {}
        if claimer.get("host") == self.host:
            pid = claimer.get("pid")
            if pid == os.getpid():  # ours if we hold it; else a previous process that had our pid (containers)
                return not self.holds(str(info.get("fork_id")))
            return not (isinstance(pid, int) and psutil.pid_exists(pid))
        # Another host: only its heartbeat tells. Wall clock, since hosts share no other; keep the lease well above
        # the clock skew between nodes.
        beat = info.get("heartbeat_at")
        return not isinstance(beat, int | float) or time.time() - beat > self.config.timeouts.claim_lease


def take_marker_at(dir_fd: int) -> bool:
    """Atomically take `.fork` as `.fork.inprogress` in the run open as `dir_fd`; False when there is no marker or
    one is already in progress.

    One rename(RENAME_NOREPLACE) where the filesystem has it: the name `.fork` leaves as the claim appears, so a
    writer re-touching `.fork` once the claim is visible creates the next request and never truncates the claimed
    one. link()+unlink() where it has not (NFS answers EINVAL): link fails with EEXIST atomically on every
    filesystem, NFS included, so exactly one of several daemons wins; between the two calls a writer opening
    `.fork` reaches the claimed file, and read_claimed_marker waits for such a writer.
    """
    try:
        renameat2(dir_fd, MARKER, INPROGRESS, RENAME_NOREPLACE)
        return True
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOENT):
            return False
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    try:
        os.link(MARKER, INPROGRESS, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except (FileExistsError, FileNotFoundError):
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # No hard links there (or a directory named .fork): a checked rename, which can race only with another
        # daemon on such a filesystem.
        try:
            rename_noreplace_at(dir_fd, MARKER, INPROGRESS)
        except (FileExistsError, FileNotFoundError):
            return False
        return True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(MARKER, dir_fd=dir_fd)
    return True


def read_claimed_marker(shown: Path, dir_fd: int) -> bytes:
    """The claimed marker's bytes (`shown` names it in messages), once no writer can be between O_TRUNC and write.

    `echo step: 3 > .fork` truncates before it writes, and a writer may have opened the file before the claim took
    it; an empty marker means "the newest checkpoint", a different request. So an empty claim is read again once
    no writer has it open: the kernel tells exactly (a read lease is refused while any process has the file open
    for writing). Where leases are not available (NFS, a daemon without CAP_LEASE that does not own the file), an
    empty claim younger than MARKER_SETTLE_S is read again once it has been left alone that long instead. A marker
    with content was written in one write().
    """
    raw = read_marker_file(shown.with_name(INPROGRESS), dir_fd=dir_fd)
    for _ in range(400):  # bounded (about 10 s): a file held open and empty forever is taken as it is
        if raw.strip():
            return raw
        settled = _no_writer(dir_fd)
        if settled is None:
            return _settled_by_age(shown, dir_fd, raw)
        if settled:
            return read_marker_file(shown.with_name(INPROGRESS), dir_fd=dir_fd)
        time.sleep(0.025)
        raw = read_marker_file(shown.with_name(INPROGRESS), dir_fd=dir_fd)
    return raw


def _no_writer(dir_fd: int) -> bool | None:
    """Whether no process has the claim open for writing; None when the filesystem or our rights cannot tell."""
    try:
        fd = os.open(INPROGRESS, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return False if e.errno in (errno.EAGAIN, errno.EBUSY) else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True
    finally:
        os.close(fd)


def _settled_by_age(shown: Path, dir_fd: int, raw: bytes) -> bytes:
    for _ in range(40):  # bounded like the watcher's settling: a file truncated forever is taken as it is
        if raw.strip():
            return raw
        try:
            st = os.stat(INPROGRESS, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return raw
        age = (time.time_ns() - st.st_mtime_ns) / 1e9
        if age >= MARKER_SETTLE_S or age < -1.0:  # a clock step backwards must not stall the run
            return raw
        time.sleep(MARKER_SETTLE_S - age)
        raw = read_marker_file(shown.with_name(INPROGRESS), dir_fd=dir_fd)
    return raw
