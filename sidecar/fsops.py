"""Small durable-filesystem primitives shared by the marker, journal and swap code."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

__all__ = ["RENAME_EXCHANGE", "RENAME_NOREPLACE", "fsync_dir", "rename_noreplace", "renameat2"]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2_X86_64 = 316

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def renameat2(
    src: Path | str, dst: Path | str, flags: int, *, src_dir_fd: int = _AT_FDCWD, dst_dir_fd: int = _AT_FDCWD
) -> None:
    """renameat2(2); raises OSError (EINVAL where the filesystem does not support `flags`)."""
    a, b = os.fsencode(src), os.fsencode(dst)
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        rc = fn(src_dir_fd, a, dst_dir_fd, b, ctypes.c_uint(flags))
    else:  # glibc < 2.28 has no wrapper; the syscall exists since Linux 3.15
        rc = _libc.syscall(_SYS_RENAMEAT2_X86_64, src_dir_fd, a, dst_dir_fd, b, ctypes.c_uint(flags))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename that fails with FileExistsError instead of replacing `dst`; falls back to link+unlink without it."""
    try:
        renameat2(src, dst, RENAME_NOREPLACE)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(src)) from None
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
        os.rename(src, dst)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
