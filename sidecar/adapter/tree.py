"""The walk of a checkpoint tree: every entry below an open checkpoint directory, refusing what a plain copy could not
reproduce (symlinks, special files) and trees past the configured bounds."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sidecar.adapter.errors import AdapterError, human_size
from sidecar.protocol.safetensors_header import printable

__all__ = ["MAX_TREE_DEPTH", "CheckpointEntry", "TreeLimits", "walk_checkpoint"]

MAX_TREE_DEPTH = 8


@dataclass(frozen=True)
class TreeLimits:
    """How big a checkpoint tree may be (config `sources.max_*`); sizes are apparent sizes, so a sparse file
    counts as the bytes a copy of it writes."""

    max_files: int = 10_000
    max_bytes: int = 256 << 30
    max_depth: int = MAX_TREE_DEPTH


@dataclass(frozen=True)
class CheckpointEntry:
    relpath: str  # "/"-separated, relative to the checkpoint dir
    is_dir: bool
    stat: os.stat_result


def walk_checkpoint(
    dir_fd: int, display: str | os.PathLike[str], limits: TreeLimits | None = None
) -> list[CheckpointEntry]:
    """Every entry below the checkpoint directory open as `dir_fd`, parents before children, sorted.

    Refuses symlinks and special files (a checkpoint must be plain files to be copied as it is) and
    trees over `limits` (default TreeLimits()): the walk stops at the first entry past a bound, so a huge
    tree costs no more than the bound to refuse.
    """
    entries: list[CheckpointEntry] = []
    _walk_into(dir_fd, Path(display), "", 0, entries, _TreeBudget(limits or TreeLimits()))
    return entries


class _TreeBudget:
    def __init__(self, limits: TreeLimits) -> None:
        self.limits = limits
        self.entries = 0
        self.bytes = 0

    def take(self, root: Path, info: os.stat_result, is_dir: bool) -> None:
        self.entries += 1
        if not is_dir:
            self.bytes += info.st_size
        shown = printable(root)
        if self.entries > self.limits.max_files:
            raise AdapterError(
                root,
                f"{shown}: holds more than {self.limits.max_files} files and directories (sources.max_files); "
                f"a LoRA checkpoint is a handful of files — point the fork at one.",
            )
        if self.bytes > self.limits.max_bytes:
            raise AdapterError(
                root,
                f"{shown}: holds more than {human_size(self.limits.max_bytes)} (sources.max_bytes, sparse files "
                f"counted at their full size); point the fork at a LoRA checkpoint or raise the limit.",
            )


def _list_dir(dir_fd: int) -> list[str]:
    # List through a fresh open file description: btrfs (since 6.6) lists only the entries that existed
    # when a directory was opened, so listing a long-held fd would miss files created since.
    fresh = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return sorted(os.listdir(fresh))
    finally:
        os.close(fresh)


def _walk_into(
    dir_fd: int, root: Path, prefix: str, depth: int, out: list[CheckpointEntry], budget: _TreeBudget
) -> None:
    for name in _list_dir(dir_fd):
        relpath = prefix + name
        shown = printable(root / relpath)
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise AdapterError(root, f"{shown}: vanished while the checkpoint was read; retry the fork.") from None
        if stat.S_ISREG(info.st_mode):
            budget.take(root, info, False)
            out.append(CheckpointEntry(relpath, False, info))
        elif stat.S_ISDIR(info.st_mode):
            if depth + 1 > budget.limits.max_depth:
                raise AdapterError(root, f"{shown}: nests directories too deeply; a checkpoint is a flat directory.")
            budget.take(root, info, True)
            out.append(CheckpointEntry(relpath, True, info))
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                _walk_into(sub, root, relpath + "/", depth + 1, out, budget)
            finally:
                os.close(sub)
        elif stat.S_ISLNK(info.st_mode):
            raise AdapterError(
                root, f"{shown}: is a symlink; a checkpoint must hold real files — copy the target in its place."
            )
        else:
            raise AdapterError(root, f"{shown}: is not a regular file or directory; remove it from the checkpoint.")
