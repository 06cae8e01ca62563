"""The daemon's side of where agents live: it creates `runtime_dir` and, in it, one 0700 directory per run owner.

`{runtime_dir}/{uid}/` belongs to `uid` and only that user's trainers can put sockets in it, so no user can squat the
name of another user's future `agent-<pid>.sock` or pose as their trainer (sidecar/protocol/client.py checks the rest).
The daemon makes a user's directory as soon as it sees a run that user owns; creating it needs root (chown), so a
daemon running as an ordinary user makes only its own. Whatever stands at a user's name and is not that user's
private directory (another user's directory, a file, a symlink: left from a world-writable runtime dir) is removed
first. `runtime_dir` itself is created 0755 like `state_dir` is created, and never loosened; unlike an unusable
`state_dir` an uncreatable one does not stop the daemon (a user running it by hand with the default /run path still
gets disk and vLLM forks), it is logged, and `fork-sidecar doctor` reports it.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from sidecar.protocol.paths import agent_dir

__all__ = ["RUNTIME_DIR_MODE", "AgentDirs", "RuntimeDirError", "ensure_runtime_dir", "ensure_user_dir"]

log = logging.getLogger("sidecar.agent_dirs")
_logged: set[str] = set()  # problems already logged: the same one recurs at every look, once is enough

RUNTIME_DIR_MODE = 0o755
USER_DIR_MODE = 0o700


class RuntimeDirError(Exception):
    """runtime_dir cannot be created or is not a directory (a sentence naming it and the fix)."""


def ensure_runtime_dir(path: Path) -> None:
    """Create `path` (0755) if it is missing; warn when other users may write into it."""
    try:
        if not path.exists():
            path.mkdir(parents=True, exist_ok=True, mode=RUNTIME_DIR_MODE)
            path.chmod(RUNTIME_DIR_MODE)  # whatever the umask: other users' trainers must reach their directories
        st = path.stat()
    except OSError as e:
        raise RuntimeDirError(
            f"{path}: cannot create the runtime dir ({e.strerror or e}); set runtime_dir to a directory the daemon "
            "can create or write."
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeDirError(f"{path} is not a directory; remove it or set runtime_dir to another path.")
    if st.st_mode & 0o002:
        # Harmless for agents (each user's directory is checked), but anyone can create entries named for a uid
        # before the daemon sees that user's first run; the daemon then replaces them.
        log.warning(
            "%s is writable by every user (mode %o); agents no longer need that: make it 0755 "
            "(RuntimeDirectoryMode=0755 in the unit)",
            path,
            stat.S_IMODE(st.st_mode),
        )


def ensure_user_dir(runtime_dir: Path, uid: int) -> Path | None:
    """`{runtime_dir}/{uid}`, a directory owned by `uid` with mode 0700, made if needed; None if it cannot be."""
    path = agent_dir(runtime_dir, uid)
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        _log_once(logging.WARNING, "cannot look at %s (%s)", path, e.strerror)
        return None
    if st is not None and _belongs_to(st, uid):
        return path
    if os.geteuid() not in (0, uid):
        return None  # only root can hand a directory to another user: that user's agents will wait
    if st is not None:
        log.warning(
            "%s was not uid %d's private directory (owner uid %d, mode %o); replacing it",
            path,
            uid,
            st.st_uid,
            stat.S_IMODE(st.st_mode),
        )
        if not _remove(path, st):
            return None
    return _create(path, uid)


def _belongs_to(st: os.stat_result, uid: int) -> bool:
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o022


def _remove(path: Path, st: os.stat_result) -> bool:
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # fd-based on Linux: never follows a symlink planted inside
        else:
            os.unlink(path)
    except OSError as e:
        _log_once(logging.ERROR, "cannot remove %s (%s); that user's agents wait until it is gone", path, e.strerror)
        return False
    return True


def _create(path: Path, uid: int) -> Path | None:
    try:
        os.mkdir(path, USER_DIR_MODE)
    except FileExistsError:
        # Only possible when the runtime dir is writable by others and someone raced us: next round replaces it.
        log.warning("%s appeared while it was being created; will look again", path)
        return None
    except OSError as e:
        _log_once(logging.ERROR, "cannot create %s (%s); that user's agents wait until it exists", path, e.strerror)
        return None
    # Through an fd of the directory just made: a name can be swapped in a world-writable parent, an fd cannot.
    # There another user may also rename it away (or put a symlink there) before the open: looked at again next round.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        _log_once(logging.WARNING, "%s was replaced while it was being created (%s); will look again", path, e.strerror)
        return None
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            log.error("%s is not the directory the daemon just created; will look again", path)
            return None
        if uid != os.geteuid():
            os.fchown(fd, uid, _primary_gid(uid))
        os.fchmod(fd, USER_DIR_MODE)
    finally:
        os.close(fd)
    log.info("created %s for uid %d's trainer agents", path, uid)
    return path


def _log_once(level: int, message: str, *args: object) -> None:
    key = message % args
    if key not in _logged:
        _logged.add(key)
        log.log(level, message, *args)


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return -1  # a uid without a passwd entry (containers): keep the group; the mode gives it nothing


class AgentDirs:
    """The runtime dir and the directories of the users who own watched runs, kept in place by the daemon."""

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = Path(runtime_dir)

    def prepare(self) -> bool:
        """At start: create the runtime dir; False (logged) when that is impossible."""
        try:
            ensure_runtime_dir(self.runtime_dir)
        except RuntimeDirError as e:
            log.error("%s Until then no trainer agent can be reached.", e)
            return False
        return True

    def keep(self, owners: Iterable[int]) -> None:
        """Make sure each of these run owners (the watcher knows them: MarkerWatcher.owners) has a directory."""
        for uid in sorted(owners):
            ensure_user_dir(self.runtime_dir, uid)
