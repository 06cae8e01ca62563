"""Immutable per-fork snapshots of `checkpoints/0000` for vLLM to load from: `checkpoints/.fork-<fork_id>/`.

vLLM keys its prefix cache by (adapter name, adapter path), so an in-place reload from the path it already loaded
keeps serving KV blocks computed with the old weights (DESIGN.md). Each fork therefore points vLLM at a directory it
has never seen, whose files never change afterwards. They are hardlinks to the swapped files where the filesystem
allows (no bytes copied), else copies. The name is never all digits, so ART does not take it for a step.

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
import shutil
import stat
import threading
from collections.abc import Collection
from pathlib import Path

from sidecar.fsops import rename_noreplace

__all__ = [
    "FORK_ID_PATTERN",
    "LOADS_IN_FLIGHT",
    "LoadsInFlight",
    "collect_snapshots",
    "create_snapshot",
    "is_snapshot_name",
    "list_snapshots",
    "snapshot_dir",
]

FORK_ID_PATTERN = r"\d{8}T\d{6}Z-[0-9a-f]{6}"
_SNAPSHOT = re.compile(rf"\.fork-{FORK_ID_PATTERN}")
_PARTIAL = re.compile(rf"\.fork-{FORK_ID_PATTERN}\.partial")
# Filesystems or mounts where a hardlink cannot be made; anything else is a real error.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


def is_snapshot_name(name: str) -> bool:
    return _SNAPSHOT.fullmatch(name) is not None


def snapshot_dir(checkpoints: Path, fork_id: str) -> Path:
    if not re.fullmatch(FORK_ID_PATTERN, fork_id):
        raise ValueError(f"fork id {fork_id!r} is not of the form 20261126T083000Z-a1b2c3")
    return checkpoints / f".fork-{fork_id}"


def create_snapshot(served: Path, fork_id: str) -> tuple[Path, str]:
    """Snapshot `served` (checkpoints/0000) as `.fork-<fork_id>` beside it; returns (path, "hardlink" | "copy" |
    "existing"). Built under a `.partial` name and renamed, so an existing snapshot is always complete."""
    final = snapshot_dir(served.parent, fork_id)
    if final.is_dir():
        return final, "existing"  # a resumed fork: its snapshot was finished before the crash
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    method = "hardlink"
    for dirpath, dirnames, filenames in os.walk(served):
        rel = Path(dirpath).relative_to(served)
        for d in dirnames:
            (partial / rel / d).mkdir()
        for f in filenames:
            if not _link_or_copy(Path(dirpath) / f, partial / rel / f):
                method = "copy"
    for dirpath, _, _ in os.walk(partial, topdown=False):  # modes last: a read-only 0000 is copied as such
        _same_owner_and_mode(served / Path(dirpath).relative_to(partial), Path(dirpath))
    rename_noreplace(partial, final)
    return final, method


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hardlink src to dst (True), or copy it where links are not possible (False)."""
    try:
        os.link(src, dst)
        return True
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
    shutil.copy2(src, dst)
    _same_owner_and_mode(src, dst)
    return False


def _same_owner_and_mode(src: Path, dst: Path) -> None:
    # vLLM may run as another user than the daemon: the snapshot must be as readable to it as 0000 is.
    info = src.stat()
    with contextlib.suppress(PermissionError):
        os.chown(dst, info.st_uid, info.st_gid)
    dst.chmod(stat.S_IMODE(info.st_mode))


def list_snapshots(checkpoints: Path) -> list[Path]:
    try:
        with os.scandir(checkpoints) as it:
            return sorted(Path(e.path) for e in it if is_snapshot_name(e.name) and e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def collect_snapshots(checkpoints: Path, referenced: Collection[Path] | None) -> list[str]:
    """Remove `.partial` leftovers of interrupted snapshots and, unless `referenced` is None (some server's adapter
    roots are unknown), every snapshot whose real path is not in `referenced`; returns the names removed."""
    removed = []
    try:
        with os.scandir(checkpoints) as it:
            names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    keep = None if referenced is None else {os.path.realpath(p) for p in referenced}
    for name in sorted(names):
        path = checkpoints / name
        unreferenced = keep is not None and is_snapshot_name(name) and os.path.realpath(path) not in keep
        if unreferenced or _PARTIAL.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path)
            removed.append(name)
    return removed


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
