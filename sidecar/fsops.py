"""Durable-filesystem primitives shared by the swap, marker, journal and snapshot code.

Python has no wrapper for renameat2(2), whose RENAME_EXCHANGE swaps two directory entries atomically and whose
RENAME_NOREPLACE refuses to overwrite; both go through ctypes here (glibc's wrapper, else the raw syscall).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from pathlib import Path

__all__ = [
    "exchange_dirs",
    "libc",
    "lstat_at",
    "rename_noreplace",
    "rename_noreplace_at",
    "renameat2",
]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347}


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """`name` in `dir_fd` as it is (a symlink is not followed), or None when nothing is there."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def renameat2(dir_fd: int, old: str, new: str, flags: int, *, new_dir_fd: int | None = None) -> None:
    """renameat2(2) from `old` in `dir_fd` to `new` in `new_dir_fd` (default: the same directory)."""
    lib = libc()
    old_b, new_b = os.fsencode(old), os.fsencode(new)
    dst_fd = dir_fd if new_dir_fd is None else new_dir_fd
    function = getattr(lib, "renameat2", None)  # glibc >= 2.28
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        result = function(dir_fd, old_b, dst_fd, new_b, flags)
    else:
        number = _RENAMEAT2_SYSCALL.get(platform.machine())
        if number is None:
            raise OSError(errno.ENOSYS, "renameat2 is not available", old)
        result = lib.syscall(
            ctypes.c_long(number),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(old_b),
            ctypes.c_int(dst_fd),
            ctypes.c_char_p(new_b),
            ctypes.c_uint(flags),
        )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), old, None, new)


def exchange_dirs(dir_fd: int, a: str, b: str) -> None:
    """Atomically swaps the entries `a` and `b` of the directory open as `dir_fd` (RENAME_EXCHANGE).

    Raises OSError; errno EINVAL or ENOSYS means the filesystem or kernel cannot exchange.
    """
    renameat2(dir_fd, a, b, RENAME_EXCHANGE)


def rename_noreplace_at(dir_fd: int, old: str, new: str) -> None:
    """Renames `old` to `new` within `dir_fd`, failing with FileExistsError if `new` exists.

    Where RENAME_NOREPLACE is unsupported (FUSE, NFS answer EINVAL), checks and renames; the check can race only
    with another writer of the same hidden name, and the callers serialize those per run.
    """
    try:
        renameat2(dir_fd, old, new, RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new) from None
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), old) from None
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    try:
        os.lstat(new, dir_fd=dir_fd)
    except FileNotFoundError:
        os.rename(old, new, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    else:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new)


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename_noreplace_at for two paths in one directory."""
    if src.parent != dst.parent:
        raise ValueError(f"{src} and {dst} are not in one directory")
    fd = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        rename_noreplace_at(fd, src.name, dst.name)
    finally:
        os.close(fd)
