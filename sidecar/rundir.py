"""A run directory opened once, from its watch root, without following any symlink a tenant could plant.

Every later step of a fork works through the descriptor opened here (`openat` with O_NOFOLLOW), never through the
path again: a tenant who swaps her model directory for a symlink into another user's run after the claim moves
nothing of ours there. `still_in_place` says whether the path still names the directory we hold, so a fork whose
run was renamed or swapped stops before it changes anything and files its outcome in the directory it claimed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass

from sidecar.layout import RunDir
from sidecar.protocol.run_layout import CHECKPOINTS

__all__ = [
    "DIR_FLAGS",
    "OpenRun",
    "RunDirError",
    "lexists_at",
    "open_dir_beneath",
    "open_run",
    "remove_at",
]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RunDirError(Exception):
    """The run directory cannot be opened as a real directory under its root; one sentence."""


@dataclass
class OpenRun:
    """A model directory held open; `fd` is what every step of the fork works through."""

    run: RunDir
    fd: int
    dev: int
    ino: int
    uid: int
    gid: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def still_in_place(self) -> bool:
        """Whether `{root}/{project}/models/{model}` still names the directory held as `fd`."""
        try:
            other = open_run(self.run)
        except RunDirError:
            return False
        try:
            return (other.dev, other.ino) == (self.dev, self.ino)
        finally:
            other.close()

    def checkpoints_fd(self) -> int:
        """`checkpoints/` of the run, opened without following a symlink (the caller closes it)."""
        return os.open(CHECKPOINTS, DIR_FLAGS, dir_fd=self.fd)


def open_dir_beneath(root_fd: int, parts: tuple[str, ...]) -> int:
    """Opens `parts` below `root_fd` one component at a time, each with O_NOFOLLOW: no symlink is ever followed."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if part in ("", ".", "..") or "/" in part:
                raise OSError(errno.EINVAL, "not a plain name", part)
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_run(run: RunDir) -> OpenRun:
    """Opens the model dir of `run`: the configured root as named (the operator's path), the rest by O_NOFOLLOW."""
    try:
        root_fd = os.open(run.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RunDirError(f"{run.root} cannot be opened ({exc.strerror}); check watch.roots.") from None
    try:
        fd = open_dir_beneath(root_fd, (run.project, "models", run.model))
    except OSError as exc:
        why = "is a symlink or not a directory" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
        raise RunDirError(f"{run.path} cannot be opened as a run directory ({why}).") from None
    finally:
        os.close(root_fd)
    st = os.fstat(fd)
    return OpenRun(run, fd, st.st_dev, st.st_ino, st.st_uid, st.st_gid)


def lexists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def remove_at(dir_fd: int, name: str) -> None:
    """Removes the file, symlink or empty directory `name`; nothing if it is gone."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(info.st_mode):
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
