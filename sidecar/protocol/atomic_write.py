"""Writing a file so that readers see the old content or the new, whole, and making renames durable: the daemon's
outcomes and journal, and the `.fork` marker that both `fork-sidecar fork` and a trainer's ART fork write."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["fsync_dir", "fsync_dir_fd", "write_atomic", "write_atomic_at", "write_json_atomic"]


def fsync_dir_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (vfat over FUSE, a few network ones) cannot fsync a directory; the renames are then as
        # durable as that filesystem makes them, and there is nothing better to do.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS):
            raise


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync_dir_fd(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write `data` beside `path`, fsync, rename over it, fsync the directory: readers see old or new, whole.

    The temporary name starts with a dot and never equals a name anyone watches (`.fork` appears only by the
    rename), and its mode is set explicitly, so an outcome is never world-writable whatever the umask.
    """
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomic_at(dir_fd, path.name, data, mode=mode)
    finally:
        os.close(dir_fd)


def write_atomic_at(dir_fd: int, name: str, data: bytes, *, mode: int = 0o644) -> None:
    """write_atomic of `name` inside the directory open as `dir_fd` (no path is resolved again)."""
    tmp = f".{name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    fsync_dir_fd(dir_fd)


def write_json_atomic(path: Path, data: dict[str, Any], *, mode: int = 0o644) -> None:
    """Replace `path` with `data` as JSON, atomically and durably (see write_atomic)."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode(), mode=mode)
