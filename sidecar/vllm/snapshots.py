"""Immutable per-fork snapshots of `checkpoints/0000` for vLLM to load from: `checkpoints/.fork-<fork_id>/`.

vLLM keys its prefix cache by (adapter name, adapter path), so an in-place reload from the path it already loaded keeps
serving KV blocks computed with the old weights (seen on vLLM 0.32 and 0.33). Each fork therefore points vLLM at a
directory it has never seen, whose files never change afterwards. They are hardlinks to the swapped files where the
filesystem allows (no bytes copied), else copies. The name is never all digits, so ART does not take it for a step.

A snapshot may be removed only when no server lists it as an adapter root: an adapter evicted from vLLM's LRU cache is
re-read from its path without any API call. Only names `.fork-<fork id>` (and our own `.partial` leftovers) are ever
removed here; the swap's `.fork-stage-*` / `.fork-retired-*` never match the fork-id pattern.

A load the server got but did not answer in time may still be applied later, so its snapshot is also kept while
such a load may be in flight (`LoadsInFlight`). How long that is comes from vLLM's source: its
`OpenAIServingModels.load_lora_adapter` (vllm/entrypoints/openai/models/serving.py) holds an asyncio.Lock per adapter
name (`lora_resolver_lock[lora_name]`, a defaultdict of asyncio.Lock, FIFO for waiters) around the engine's
`add_lora` and the update of `lora_requests`, which `/v1/models` lists; the handler is not cancelled when its client
hangs up. Loads of one name on one server are therefore applied one at a time in arrival order, never out of order:
once a later load of that name on that server has answered, every earlier one has finished. That answer (or seeing
the snapshot listed) ends the protection. A daemon restart forgets it, which is harmless once the server has answered
anything since (the only window is a load still running across the restart).

Nothing here is fsynced, on purpose: a snapshot only matters to the servers that loaded it, and a crash of this machine
ends them too (they restart from `checkpoints/0000`, which the swap made durable, as are the files hardlinked here).
Directory fsyncs were half of the stage's time on a busy disk (about 8 ms of 30 ms).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Collection
from pathlib import Path

from sidecar.fsops import lstat_at, rename_noreplace_at
from sidecar.protocol.run_layout import SERVED_STEP
from sidecar.rundir import DIR_FLAGS

__all__ = [
    "FORK_ID_PATTERN",
    "LOADS_IN_FLIGHT",
    "LoadsInFlight",
    "collect_snapshots",
    "create_snapshot",
    "is_snapshot_name",
    "list_snapshots",
    "snapshot_dir",
    "snapshot_name",
]

FORK_ID_PATTERN = r"\d{8}T\d{6}Z-[0-9a-f]{6}"
_SNAPSHOT = re.compile(rf"\.fork-{FORK_ID_PATTERN}")
_PARTIAL = re.compile(rf"\.fork-{FORK_ID_PATTERN}\.partial(?:-[0-9a-f]{{6}})?")
# Filesystems or mounts where a hardlink cannot be made; anything else is a real error.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


def is_snapshot_name(name: str) -> bool:
    return _SNAPSHOT.fullmatch(name) is not None


def snapshot_name(fork_id: str) -> str:
    if not re.fullmatch(FORK_ID_PATTERN, fork_id):
        raise ValueError(f"fork id {fork_id!r} is not of the form 20261126T083000Z-a1b2c3")
    return f".fork-{fork_id}"


def snapshot_dir(checkpoints: Path, fork_id: str) -> Path:
    return checkpoints / snapshot_name(fork_id)


def create_snapshot(checkpoints_fd: int, fork_id: str) -> tuple[str, str]:
    """Snapshot `0000` of the `checkpoints/` open as `checkpoints_fd` as `.fork-<fork_id>` beside it; returns (its
    name, "hardlink" | "copy" | "existing"). Built under a `.partial` name and renamed, so an existing snapshot is
    always complete. Only names below that descriptor are used, none followed if it is a symlink: called through the
    fork's RunIO, as the run's owner, it can touch nothing but that run."""
    final = snapshot_name(fork_id)
    existing = lstat_at(checkpoints_fd, final)
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        return final, "existing"  # a resumed fork: its snapshot was finished before the crash
    # A name of this builder's own: with several nodes on one shared run (etcd fan-out), each node's vLLM stage
    # snapshots the same fork, and a shared `.partial` name let one node delete the copy another was filling.
    partial = f"{final}.partial-{secrets.token_hex(3)}"
    os.mkdir(partial, 0o700, dir_fd=checkpoints_fd)
    copied = _fill(checkpoints_fd, checkpoints_fd, partial)
    try:
        rename_noreplace_at(checkpoints_fd, partial, final)
    except FileExistsError:  # another node finished the same snapshot (of the same 0000) first: use that one
        _remove_tree(checkpoints_fd, partial)
        return final, "existing"
    return final, "copy" if copied else "hardlink"


def _fill(src_parent: int, dst_parent: int, name: str, src_name: str = SERVED_STEP) -> bool:
    """Fills the directory `name` of `dst_parent` with what `src_name` of `src_parent` holds; True if a file had to
    be copied (no hardlink possible). Modes last: a read-only 0000 is snapshotted as such."""
    src = os.open(src_name, DIR_FLAGS, dir_fd=src_parent)
    try:
        dst = os.open(name, DIR_FLAGS, dir_fd=dst_parent)
        try:
            copied = False
            for entry in sorted(os.listdir(src)):
                info = os.stat(entry, dir_fd=src, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    os.mkdir(entry, 0o700, dir_fd=dst)
                    copied = _fill(src, dst, entry, entry) or copied
                elif stat.S_ISLNK(info.st_mode):
                    os.symlink(os.readlink(entry, dir_fd=src), entry, dir_fd=dst)
                elif not _link_or_copy(src, dst, entry, info):
                    copied = True
            _same_owner_and_mode(os.fstat(src), dst)
            return copied
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _link_or_copy(src_dir: int, dst_dir: int, name: str, info: os.stat_result) -> bool:
    """Hardlink `name` from src_dir into dst_dir (True), or copy it where links are not possible (False)."""
    try:
        os.link(name, name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        return True
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_dir)
        try:
            while chunk := os.read(src, 1 << 20):
                os.write(dst, chunk)
            _same_owner_and_mode(info, dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return False


def _same_owner_and_mode(info: os.stat_result, dst_fd: int) -> None:
    # vLLM may run as another user than the fork: the snapshot must be as readable to it as 0000 is.
    with contextlib.suppress(PermissionError):
        os.fchown(dst_fd, info.st_uid, info.st_gid)
    os.fchmod(dst_fd, stat.S_IMODE(info.st_mode))


def list_snapshots(checkpoints: Path) -> list[Path]:
    """The snapshots in `checkpoints` by path: for looking only (doctor, whether a run has any)."""
    try:
        with os.scandir(checkpoints) as it:
            return sorted(Path(e.path) for e in it if is_snapshot_name(e.name) and e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def collect_snapshots(
    checkpoints_fd: int, keep: Collection[str] | None, *, partials: bool = True
) -> tuple[list[str], list[str]]:
    """Remove, with `partials`, `.partial` leftovers of interrupted snapshots and, unless `keep` is None (some
    server's adapter roots are unknown), every snapshot whose name is not in `keep`, in the `checkpoints/` open as
    `checkpoints_fd`; returns (the names removed, the snapshots left). Fork ids are unique, so a name tells a snapshot
    apart. A `.partial` may be a snapshot being built right now (by another fork of this daemon's, or another
    node's), so only a daemon starting on a single node removes them."""
    removed, left = [], []
    for name in sorted(os.listdir(checkpoints_fd)):
        info = lstat_at(checkpoints_fd, name)
        if info is None or not stat.S_ISDIR(info.st_mode):
            continue
        unreferenced = keep is not None and is_snapshot_name(name) and name not in keep
        if (partials and _PARTIAL.fullmatch(name)) or unreferenced:
            _remove_tree(checkpoints_fd, name)
            removed.append(name)
        elif is_snapshot_name(name):
            left.append(name)
    return removed, left


def _remove_tree(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(name, dir_fd=dir_fd)  # the fd-based variant: it never follows a symlink


class LoadsInFlight:
    """Snapshots that a server may still load: a load of them reached it and was not answered. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loads: dict[tuple[str, str], set[Path]] = {}  # (server url, adapter name) -> snapshot paths

    def sent_unanswered(self, url: str, name: str, snapshot: Path) -> None:
        with self._lock:
            self._loads.setdefault((url, name), set()).add(Path(os.path.realpath(snapshot)))

    def answered(self, url: str, name: str) -> None:
        """A load of `name` on `url` got an answer: every earlier one there has finished (see the module doc)."""
        with self._lock:
            self._loads.pop((url, name), None)

    def paths(self) -> set[Path]:
        with self._lock:
            return {p for paths in self._loads.values() for p in paths}

    def servers_of(self, snapshot: Path) -> list[str]:
        real = Path(os.path.realpath(snapshot))
        with self._lock:
            return sorted({url for (url, _), paths in self._loads.items() if real in paths})


# One per daemon process: the vLLM stage is rebuilt on SIGHUP, the loads it sent are not forgotten with it.
LOADS_IN_FLIGHT = LoadsInFlight()
