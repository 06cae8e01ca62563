"""The names under `checkpoints/` that a fork uses, and opening and checking them without following a symlink."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
from pathlib import Path

from sidecar.adapter import printable
from sidecar.fork_ids import FORK_ID, checked_fork_id
from sidecar.fsops import lstat_at
from sidecar.protocol.run_layout import SERVED_STEP

__all__ = [
    "LEFTOVER_NAME",
    "LIVE_NAME",
    "RETIRED_PREFIX",
    "STAGING_PREFIX",
    "SwapError",
    "check_live_is_dir",
    "open_checkpoints_dir",
    "our_entries",
    "remove_entry",
    "retired_name",
    "staging_name",
]

log = logging.getLogger("sidecar.swap")

LIVE_NAME = SERVED_STEP  # the name a fork replaces
STAGING_PREFIX = ".fork-stage-"
RETIRED_PREFIX = ".fork-retired-"

LEFTOVER_NAME = re.compile(rf"({re.escape(STAGING_PREFIX)}|{re.escape(RETIRED_PREFIX)})({FORK_ID.pattern})")


class SwapError(Exception):
    """A swap step failed; the message is one sentence naming the path and what to do."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = Path(path)
        super().__init__(message)


def staging_name(fork_id: str) -> str:
    return STAGING_PREFIX + checked_fork_id(fork_id)


def retired_name(fork_id: str) -> str:
    return RETIRED_PREFIX + checked_fork_id(fork_id)


def remove_entry(dir_fd: int, name: str) -> bool:
    """Removes `name` (a tree, a file or a symlink) from `dir_fd`; False if it was not there."""
    info = lstat_at(dir_fd, name)
    if info is None:
        return False
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # the fd-based variant: it never follows a symlink
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True


def open_checkpoints_dir(checkpoints_dir: Path, run_fd: int | None = None) -> int:
    """`checkpoints_dir`, or with `run_fd` the `checkpoints` entry of the run directory open as `run_fd` (the
    path then only names it in messages: nothing is resolved by name again)."""
    shown = printable(checkpoints_dir)
    where, dir_fd = (checkpoints_dir, None) if run_fd is None else (Path(checkpoints_dir.name), run_fd)
    try:
        return os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise SwapError(checkpoints_dir, f"{shown}: no such directory; is this an ART run directory?") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(where, dir_fd):
            raise SwapError(
                checkpoints_dir,
                f"{shown}: is a symlink; the checkpoints directory must be real so 0000 is swapped where ART "
                f"looks — replace the link with the directory.",
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise SwapError(checkpoints_dir, f"{shown}: is not a directory; is this an ART run directory?") from None
        raise SwapError(checkpoints_dir, f"{shown}: cannot open ({exc.strerror}); check its permissions.") from None


def _is_symlink(path: Path, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def check_live_is_dir(checkpoints_dir: Path, info: os.stat_result | None) -> None:
    if info is None or stat.S_ISDIR(info.st_mode):
        return
    shown = printable(checkpoints_dir / LIVE_NAME)
    if stat.S_ISLNK(info.st_mode):
        raise SwapError(
            checkpoints_dir / LIVE_NAME,
            f"{shown}: is a symlink; ART deletes checkpoints with shutil.rmtree, which refuses symlinks — "
            f"replace it with a real directory.",
        )
    raise SwapError(checkpoints_dir / LIVE_NAME, f"{shown}: is not a directory; move it away and fork again.")


def our_entries(cfd: int, checkpoints_dir: Path, names: tuple[str, ...]) -> dict[str, os.stat_result | None]:
    """lstat of each name; anything but a real directory under our names is refused."""
    present = {name: lstat_at(cfd, name) for name in names}
    check_live_is_dir(checkpoints_dir, present.get(LIVE_NAME))
    for name, info in present.items():
        if info is not None and not stat.S_ISDIR(info.st_mode):
            shown = printable(checkpoints_dir / name)
            raise SwapError(checkpoints_dir / name, f"{shown}: is not a directory; remove it and fork again.")
    return present
