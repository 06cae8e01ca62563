"""The watched layout `{root}/{project}/models/{model}` as a tree of directories, and what each level listens for."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from sidecar.marker import INPROGRESS, MARKER
from sidecar.watch.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DONT_FOLLOW,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
)

logger = logging.getLogger("sidecar.watch")

# (level, key, message, *args): logs a message once per key
LogOnce = Callable[..., None]

MARKER_BYTES = os.fsencode(MARKER)
CLAIM_BYTES = os.fsencode(INPROGRESS)
_MODELS = "models"


class Level(IntEnum):
    ROOT = 0
    PROJECT = 1
    MODELS = 2
    MODEL = 3


# Directory levels only need to hear about subdirectories appearing or leaving. A model dir only needs `.fork`:
# close-after-write, rename into place, and create (see marker_event_ready); the same events show a claim appearing
# (`link(.fork, .fork.inprogress)` is a create, a rewritten claim record a rename into place). No IN_MODIFY anywhere,
# and nothing below a model dir is watched, so ART writing thousands of files into checkpoints/ and trajectories/
# costs nothing. IN_ATTRIB on a model dir tells its chown (the owner gets an agent directory, sidecar/agent_dirs.py):
# with it no periodic stat of every run is needed; attribute changes of the files in it are ignored.
_DIR_EVENTS = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_ONLYDIR
MASKS = {
    # The root may be a symlink the admin configured, so it is followed; it has no watched parent, so it needs
    # IN_MOVE_SELF to learn that it was moved away (deletion arrives as IN_IGNORED on every watch).
    Level.ROOT: _DIR_EVENTS | IN_MOVE_SELF,
    Level.PROJECT: _DIR_EVENTS | IN_DONT_FOLLOW,
    Level.MODELS: _DIR_EVENTS | IN_DONT_FOLLOW,
    Level.MODEL: IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_ATTRIB | IN_ONLYDIR | IN_DONT_FOLLOW,
}


@dataclass(eq=False, slots=True)
class Dir:
    """A directory of the watched layout. `ino` tells a directory from a new one reusing its name."""

    path: str
    level: Level
    parent: Dir | None
    children: dict[str, Dir] = field(default_factory=dict)
    ino: int | None = None
    wd: int | None = None
    polled: bool = False  # roots only: scanned every poll_interval instead of watched
    uid: int | None = None  # model dirs only: the owner, once looked at


def marker_event_ready(mask: int, model_dir: str) -> bool:
    if mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
        return True
    if not mask & IN_CREATE:
        return False
    # A regular file that was just created is reported on its IN_CLOSE_WRITE, not now: `echo step: 3 > .fork` creates
    # an empty file first, and an empty marker means a different request ("fork from the newest step"). Anything that
    # is never closed after writing is reported on creation, so the daemon can claim it or fail it with a reason: a
    # directory, FIFO, socket or symlink named .fork, and a hard link to an existing file (a fresh file has one link).
    # A regular file created and closed without writing (open O_CREAT|O_RDONLY) yields neither event; rescans find it.
    try:
        st = os.lstat(join(model_dir, MARKER))
    except OSError:
        return False
    return not stat.S_ISREG(st.st_mode) or st.st_nlink > 1


def tracked_name(level: Level, name: str) -> bool:
    """Whether a subdirectory `name` of a directory at `level` is part of the layout."""
    if level is Level.PROJECT:
        return name == _MODELS
    return not name.startswith(".")


def iter_models(root: Dir) -> list[Dir]:
    return [m for project in root.children.values() for ms in project.children.values() for m in ms.children.values()]


def join(directory: str, name: str) -> str:
    # Paths are str throughout the tree: a scan of 10,000 runs would otherwise build 30,000 Path objects.
    return directory + name if directory.endswith("/") else directory + "/" + name


def normalise_roots(roots: Sequence[Path]) -> tuple[str, ...]:
    # absolute() only, neither resolve() nor abspath(): reported model dirs must sit under the root exactly as
    # configured (the daemon maps them back with Path.relative_to), symlinks and `..` included.
    paths = list(dict.fromkeys(str(Path(r).absolute()) for r in roots))
    kept = []
    for path in paths:
        outer = next((p for p in paths if p != path and path.startswith(p.rstrip("/") + "/")), None)
        if outer is None:
            kept.append(path)
        else:
            logger.warning("watch root %s is inside watch root %s; ignoring it", path, outer)
    return tuple(kept)


def list_subdirs(node: Dir, log_once: LogOnce) -> dict[str, int] | None:
    """The tracked subdirectories of `node` with their inode numbers; None when `node` is gone."""
    try:
        entries = os.scandir(node.path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        log_once(logging.WARNING, f"list:{node.path}", "cannot list %s (%s); skipping it", node.path, exc)
        return {name: child.ino for name, child in node.children.items() if child.ino is not None}
    listing: dict[str, int] = {}
    with entries:
        for entry in entries:
            if not tracked_name(node.level, entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    listing[entry.name] = entry.inode()
                elif entry.is_symlink():
                    # A symlinked project or model dir may lead out of the root; the layout is real dirs only.
                    log_once(logging.DEBUG, f"link:{entry.path}", "skipping symlinked dir %s", entry.path)
            except OSError:
                continue
    return listing


class TreeViews:
    """Answers built from the tree once per version of it, not per question: the daemon asks every tick and every
    minute, and building 10,000 Paths took 68 ms."""

    def __init__(self) -> None:
        self._runs: tuple[int, list[Path]] = (-1, [])
        self._owners: tuple[tuple[int, int], frozenset[int]] = ((-1, -1), frozenset())

    def runs(self, roots: Iterable[Dir], version: int) -> list[Path]:
        """The model dirs, sorted."""
        built, runs = self._runs
        if built != version:
            runs = [Path(p) for p in sorted(m.path for root in roots for m in iter_models(root))]
            self._runs = (version, runs)
        return runs

    def owners(self, roots: Iterable[Dir], version: tuple[int, int]) -> frozenset[int]:
        """The uids owning the model dirs; `version` also counts owner changes."""
        built, owners = self._owners
        if built != version:
            owners = frozenset(m.uid for root in roots for m in iter_models(root) if m.uid is not None)
            self._owners = (version, owners)
        return owners
