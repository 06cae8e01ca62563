"""Noticing `.fork` markers in ART run directories: one inotify fd, one thread, rescans, and a polling fallback.

The watcher keeps a small tree of the directories that matter, `{root}/{project}/models/{model}`, and tells the daemon
`on_marker(model_dir)` whenever a model dir holds a `.fork`, and `on_claim(model_dir)` whenever it holds a
`.fork.inprogress` (so the daemon can adopt a claim whose claimer died without walking every run). It never does fork
work itself. Reports may repeat (a rescan reports every marker still present; the daemon claims by rename), but a
marker (or a claim) must never be missed, so on top of inotify events the tree is rescanned at start, every
`rescan_interval`, after an inotify queue overflow, and on `rescan()`. Directories that cannot be watched (roots on
network filesystems in `auto` mode, every root in `poll` mode, dirs whose watch failed, e.g. on the
`max_user_watches` limit) are scanned every `poll_interval` instead. Both ways share one loop and one scan; "backend"
only decides whether a root gets watches or is polled.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from sidecar.marker import INPROGRESS, MARKER
from sidecar.watch.inotify import (
    IN_ATTRIB,
    IN_DELETE,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_Q_OVERFLOW,
    WATCH_MODES,
    WatchMode,
    log_watch_failure,
    open_inotify,
    read_sysctl,
)
from sidecar.watch.mounts import needs_polling
from sidecar.watch.settle import SettlingMarkers
from sidecar.watch.tree import (
    CLAIM_BYTES,
    MARKER_BYTES,
    MASKS,
    Dir,
    Level,
    TreeViews,
    join,
    list_subdirs,
    marker_event_ready,
    normalise_roots,
    tracked_name,
)

__all__ = ["MarkerWatcher"]

logger = logging.getLogger("sidecar.watch")


class MarkerWatcher:
    """Calls `on_marker(model_dir)` for every `{root}/{project}/models/{model}/.fork` that exists or appears.

    `on_marker` runs on the watcher thread (and in `start()` for markers already there) and must be cheap: enqueue.
    It may be called more than once for one marker. `on_claim(model_dir)` is called the same way (same thread, same
    scans, repeats allowed) for every `.fork.inprogress` that exists or appears, whoever made it. `on_overflow` runs
    on the watcher thread when inotify lost events, after the full rescan that recovers them.
    """

    def __init__(
        self,
        roots: Sequence[Path],
        on_marker: Callable[[Path], None],
        *,
        mode: WatchMode = "auto",
        poll_interval: float = 2.0,
        rescan_interval: float = 60.0,
        on_overflow: Callable[[], None] | None = None,
        on_claim: Callable[[Path], None] | None = None,
    ) -> None:
        if mode not in WATCH_MODES:
            raise ValueError(f"watch mode {mode!r} is not one of auto, inotify, poll")
        if not poll_interval > 0 or not rescan_interval > 0:
            raise ValueError("poll_interval and rescan_interval must be positive numbers of seconds")
        self._on_marker = on_marker
        self._on_overflow = on_overflow
        self._on_claim = on_claim
        self._mode = mode
        self._poll_interval = poll_interval
        self._rescan_interval = rescan_interval
        self._inotify = open_inotify(mode, poll_interval)
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fd_lock = threading.Lock()  # guards closing the fds against a concurrent wake-up
        self._closed = False
        self._lock = threading.Lock()  # guards the tree: the watcher thread changes it, run_dirs() reads it
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Requests from other threads (or a signal handler) are plain attribute writes plus a wake-up, so they never
        # wait on a lock: roots as (sequence number, roots), applied when the number changes.
        self._request_ids = itertools.count(1)
        self._roots_request: tuple[int, tuple[str, ...]] = (0, normalise_roots(roots))
        self._roots_applied = -1
        self._rescan_requested = False
        self._overflowed = False
        self._roots: dict[str, Dir] = {}
        self._by_wd: dict[int, Dir] = {}
        self._polled: set[Dir] = set()  # polled roots, and dirs whose watch could not be added
        self._missing: set[Dir] = set()  # roots that do not exist (yet)
        self._settling = SettlingMarkers()  # young markers found by scans, reported once settled
        self._logged: set[str] = set()
        self._claims_found: list[str] = []  # model dirs holding a claim, seen since the last report (under _lock)
        # Bumped whenever a directory joins or leaves the tree: run_count() and run_dirs() answer from a list built
        # once per version (the daemon asks every tick and every minute; building 10,000 Paths took 68 ms).
        self._tree_version = 0
        self._views = TreeViews()
        # Owners of model dirs come from the tree, not from a stat of every run every minute (10,000 stats cost as much
        # CPU as a rescan): a dir's owner is read when it joins the tree, again on its IN_ATTRIB (chown), in every full
        # rescan for dirs without a watch (polled), and in the rescan after an overflow (events lost) for all.
        self._owner_changes = 0
        self._restat_owners: Literal["new", "unwatched", "all"] = "new"

    # Public API ---------------------------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """What `mode` came to: "inotify" or "poll" (with "inotify", roots on network filesystems are still polled)."""
        return "poll" if self._inotify is None else "inotify"

    def start(self) -> None:
        """Scan every root and set up watches, then start the watcher thread.

        Markers already there are reported before this returns, except a regular file written in the last
        MARKER_SETTLE_S, which the thread reports once it has stopped changing.
        """
        if self._thread is not None or self._closed:
            raise RuntimeError("a MarkerWatcher can be started once")
        found: list[str] = []
        with self._lock:
            self._apply_roots()
            self._full_scan(found)
            runs, watches = len(self._known_runs()), len(self._by_wd)
        self._report(found)
        self._thread = threading.Thread(target=self._run, name="sidecar-watch", daemon=True)
        self._thread.start()
        logger.info(
            "watching %d run dirs under %d roots (%s, %d inotify watches)",
            runs,
            len(self._roots),
            self.backend,
            watches,
        )

    def stop(self) -> None:
        """Stop the thread and close the fds; safe to call twice, or without start()."""
        self._stopping.set()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if thread is None:
            self._close()
        # Called from on_marker on the watcher thread: the loop closes the fds itself when it returns.

    def rescan(self) -> None:
        """Ask for a full rescan as soon as possible; safe from any thread and from a signal handler."""
        self._rescan_requested = True
        self._wake()

    def set_roots(self, roots: Sequence[Path]) -> None:
        """Replace the roots (config reload). Kept roots keep their state; new ones are scanned, then all are."""
        self._roots_request = (next(self._request_ids), normalise_roots(roots))
        self._wake()

    def alive(self) -> bool:
        """Whether the watcher thread is running (False before start() and after stop())."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def run_count(self) -> int:
        """How many model dirs are known (for status lines and metrics)."""
        with self._lock:
            return len(self._known_runs())

    def run_dirs(self) -> list[Path]:
        """The model dirs currently known, sorted."""
        with self._lock:
            return list(self._known_runs())

    def owners(self) -> frozenset[int]:
        """The uids owning the known model dirs (built once per change of the tree or of an owner)."""
        with self._lock:
            return self._views.owners(self._roots.values(), (self._tree_version, self._owner_changes))

    def __enter__(self) -> MarkerWatcher:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # The loop --------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        if self._inotify is not None:
            poller.register(self._inotify.fd, select.POLLIN)
        now = time.monotonic()
        schedule = _Schedule(next_full=now + self._rescan_interval, next_poll=now + self._poll_interval)
        try:
            while not self._stopping.is_set():
                try:
                    self._iteration(poller, schedule)
                except Exception:
                    # A dead watcher would miss every marker from now on: log, rescan, carry on (after a pause, so a
                    # persistent fault does not spin).
                    logger.exception("marker watcher iteration failed; rescanning")
                    self._rescan_requested = True
                    self._stopping.wait(1.0)
        finally:
            self._close()

    def _iteration(self, poller: select.poll, schedule: _Schedule) -> None:
        now = time.monotonic()
        deadline = schedule.next_full
        if self._polled or self._missing:
            deadline = min(deadline, schedule.next_poll)
        recheck_at = self._settling.next_recheck()
        if recheck_at is not None:
            deadline = min(deadline, recheck_at)
        ready = poller.poll(math.ceil(max(deadline - now, 0.0) * 1000))
        if self._stopping.is_set():
            return
        found: list[str] = []
        overflowed = False
        with self._lock:
            for fd, _ in ready:
                if fd == self._wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake_fd)
                elif self._inotify is not None:
                    self._handle_events(self._inotify.read(), found)
            now = time.monotonic()
            roots_changed = self._roots_request[0] != self._roots_applied
            if self._overflowed or self._rescan_requested or roots_changed or now >= schedule.next_full:
                overflowed, self._overflowed, self._rescan_requested = self._overflowed, False, False
                self._apply_roots()
                self._restat_owners = "all" if overflowed else "unwatched"
                try:
                    self._full_scan(found)
                finally:
                    self._restat_owners = "new"
                schedule.next_full, schedule.next_poll = now + self._rescan_interval, now + self._poll_interval
            elif now >= schedule.next_poll:
                self._poll_scan(found)
                schedule.next_poll = now + self._poll_interval
            self._settling.recheck(now, found)
        if overflowed:
            self._notify_overflow()
        self._report(found)

    def _report(self, found: list[str]) -> None:
        with self._lock:
            claims, self._claims_found = self._claims_found, []
        _call_each(self._on_marker, found, "on_marker")
        if self._on_claim is not None:
            _call_each(self._on_claim, claims, "on_claim")

    def _notify_overflow(self) -> None:
        if self._on_overflow is None:
            return
        try:
            self._on_overflow()
        except Exception:
            logger.exception("on_overflow failed")

    # Events ----------------------------------------------------------------------------------------------------

    def _handle_events(self, events: list[tuple[int, int, bytes]], found: list[str]) -> None:
        for wd, mask, name in events:
            if mask & IN_Q_OVERFLOW:
                if not self._overflowed:
                    logger.warning(
                        "inotify queue overflowed (fs.inotify.max_queued_events=%s): events were lost; rescanning",
                        read_sysctl("max_queued_events"),
                    )
                self._overflowed = True
                continue
            node = self._by_wd.get(wd)
            if node is None:
                continue  # a watch we already dropped
            if mask & IN_IGNORED:
                # The kernel removed the watch: directory deleted, or its filesystem unmounted.
                del self._by_wd[wd]
                node.wd = None
                self._revisit(node, found)
            elif node.level is Level.MODEL:
                self._model_event(node, mask, name, found)
            elif mask & IN_MOVE_SELF:
                # Only roots ask for this (other dirs hear of a move from their parent): the watch now follows the
                # directory elsewhere, so drop everything and look at the configured path again.
                self._forget_contents(node)
                self._scan_root(node, found)
            elif mask & IN_ISDIR:
                self._child_changed(node, os.fsdecode(name), mask, found)

    def _model_event(self, node: Dir, mask: int, name: bytes, found: list[str]) -> None:
        if mask & IN_ATTRIB:
            if not name:  # the model dir itself (chown, chmod); its files' attributes do not matter here
                self._read_owner(node)
        elif name == MARKER_BYTES and marker_event_ready(mask, node.path):
            found.append(node.path)
            self._settling.forget(node.path)
        elif name == CLAIM_BYTES and self._on_claim is not None:
            self._claims_found.append(node.path)

    def _child_changed(self, parent: Dir, name: str, mask: int, found: list[str]) -> None:
        if not tracked_name(parent.level, name):
            return
        if mask & (IN_MOVED_FROM | IN_DELETE):
            child = parent.children.pop(name, None)
            if child is not None:
                self._drop(child)
            return
        # Created or moved in: watch it, then list it, since its contents (even a marker) may predate the watch.
        child = parent.children.get(name)
        if child is None:
            child = self._add_child(parent, name)
        self._revisit(child, found)

    # Scanning --------------------------------------------------------------------------------------------------

    def _apply_roots(self) -> None:
        seq, wanted = self._roots_request
        if seq == self._roots_applied:
            return
        self._roots_applied = seq
        for path in [p for p in self._roots if p not in wanted]:
            root = self._roots.pop(path)
            self._drop(root)
            self._missing.discard(root)
            logger.info("stopped watching root %s", path)
        for path in wanted:
            if path not in self._roots:
                self._roots[path] = Dir(path, Level.ROOT, None)
                self._tree_version += 1
                logger.info("watching root %s", path)

    def _full_scan(self, found: list[str]) -> None:
        for root in self._roots.values():
            self._scan_root(root, found)

    def _poll_scan(self, found: list[str]) -> None:
        for root in list(self._missing):
            self._scan_root(root, found)
        for node in list(self._polled):
            if node in self._polled:  # not dropped by an earlier scan in this loop
                self._revisit(node, found, watch=False)

    def _scan_root(self, root: Dir, found: list[str]) -> None:
        try:
            st: os.stat_result | None = os.stat(root.path)
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            if root not in self._missing:
                self._forget_contents(root)
                self._polled.discard(root)
                self._missing.add(root)
                logger.warning(
                    "watch root %s does not exist or is not a directory; checking every %gs and watching it once it "
                    "appears",
                    root.path,
                    self._poll_interval,
                )
            return
        if root in self._missing:
            self._missing.discard(root)
            logger.info("watch root %s appeared; watching it", root.path)
        if root.ino != st.st_ino:
            root.polled = self._should_poll(root.path)
        if root.polled:
            self._polled.add(root)
        else:
            self._polled.discard(root)
        self._scan(root, st.st_ino, found, watch=not root.polled)

    def _should_poll(self, root: str) -> bool:
        if self._inotify is None:
            return True
        if self._mode != "auto":
            return False
        fs_type = needs_polling(root)
        if fs_type is not None:
            logger.info(
                "watch root %s is on %s, which inotify cannot follow: polling it every %gs",
                root,
                fs_type,
                self._poll_interval,
            )
        return fs_type is not None

    def _revisit(self, node: Dir, found: list[str], *, watch: bool = True) -> None:
        """Look at `node`'s path again: rescan it if it is still a directory, else drop it."""
        if node.parent is None:
            self._scan_root(node, found)
            return
        try:
            st = os.lstat(node.path)
        except OSError:
            self._detach(node)
            return
        if not stat.S_ISDIR(st.st_mode) or not self._scan(node, st.st_ino, found, watch=watch):
            self._detach(node)

    def _scan(self, node: Dir, ino: int, found: list[str], *, watch: bool) -> bool:
        """Bring `node`'s subtree in line with the disk; False when the directory is gone."""
        if node.ino != ino:
            if node.ino is not None:
                self._forget_contents(node)  # a different directory now has this name
            node.ino = ino
            node.uid = None
        if watch and node.wd is None:
            self._watch(node)  # before listing: whatever appears after the listing then raises an event
        if node.level is Level.MODEL:
            restat = self._restat_owners
            if node.uid is None or restat == "all" or (restat == "unwatched" and node.wd is None):
                self._read_owner(node)
            return self._check_marker(node, found)
        listing = list_subdirs(node, self._log_once)
        if listing is None:
            return False
        for name in [n for n in node.children if n not in listing]:
            self._drop(node.children.pop(name))
        for name, child_ino in listing.items():
            child = node.children.get(name)
            if child is None:
                child = self._add_child(node, name)
            if not self._scan(child, child_ino, found, watch=watch):
                self._drop(node.children.pop(name))
        return True

    def _check_marker(self, node: Dir, found: list[str]) -> bool:
        # faccessat without following a link: no stat buffer and no exception for the usual "no claim" (half the cost
        # of lexists, which every rescan pays for every run).
        if self._on_claim is not None and os.access(join(node.path, INPROGRESS), os.F_OK, follow_symlinks=False):
            self._claims_found.append(node.path)
        marker = join(node.path, MARKER)
        # In a watched dir (inotify_add_watch needed read access) the usual answer, "no marker", comes from faccessat
        # without an exception; polled dirs keep lstat's reasons (EACCES under NFS root_squash is logged below).
        if node.wd is not None and not os.access(marker, os.F_OK, follow_symlinks=False):
            return True
        # lstat: a symlinked marker is reported too, and the daemon rejects it with a reason.
        try:
            st = os.lstat(marker)
        except FileNotFoundError:
            return True
        except NotADirectoryError:
            return False
        except OSError as exc:
            self._log_once(logging.WARNING, f"marker:{node.path}", "cannot check %s for a marker (%s)", node.path, exc)
            return True
        if SettlingMarkers.is_young(st):
            self._settling.add(node.path, st)
        else:
            found.append(node.path)
        return True

    def _read_owner(self, node: Dir) -> None:
        try:
            uid: int | None = os.lstat(node.path).st_uid
        except OSError:
            uid = None  # gone or unreadable: the scan that follows decides; a later one looks again
        if uid != node.uid:
            node.uid = uid
            self._owner_changes += 1

    # Watches ---------------------------------------------------------------------------------------------------

    def _watch(self, node: Dir) -> None:
        assert self._inotify is not None
        try:
            wd = self._inotify.add_watch(node.path, MASKS[node.level])
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # gone: the listing that follows drops it
                self._watch_failed(node, exc)
            return
        owner = self._by_wd.get(wd)
        if owner is not None and owner is not node:
            # One watch per inode: the same directory reached by a second path (a bind mount) reports under this one;
            # the other path is polled instead.
            owner.wd = None
            self._polled.add(owner)
        self._by_wd[wd] = node
        node.wd = wd
        self._polled.discard(node)

    def _watch_failed(self, node: Dir, exc: OSError) -> None:
        self._polled.add(node)
        log_watch_failure(node.path, exc, self._poll_interval, self._log_once)

    def _unwatch(self, node: Dir) -> None:
        if node.wd is None:
            return
        if self._by_wd.get(node.wd) is node:
            del self._by_wd[node.wd]
            assert self._inotify is not None
            self._inotify.rm_watch(node.wd)
        node.wd = None

    def _forget_contents(self, node: Dir) -> None:
        """Drop `node`'s children and its watch, keeping the node itself (and whether it is polled)."""
        for child in node.children.values():
            self._drop(child)
        node.children.clear()
        self._unwatch(node)
        node.ino = None

    def _add_child(self, parent: Dir, name: str) -> Dir:
        child = parent.children[name] = Dir(join(parent.path, name), Level(parent.level + 1), parent)
        self._tree_version += 1
        return child

    def _drop(self, node: Dir) -> None:
        """Forget a node that left the tree, and everything below it."""
        self._tree_version += 1
        self._forget_contents(node)
        self._polled.discard(node)
        if node.level is Level.MODEL:
            self._settling.forget(node.path)

    def _detach(self, node: Dir) -> None:
        parent = node.parent
        assert parent is not None
        name = node.path.rpartition("/")[2]
        if parent.children.get(name) is node:
            del parent.children[name]
        self._drop(node)

    # Small things ----------------------------------------------------------------------------------------------

    def _wake(self) -> None:
        # Non-blocking: a signal handler may call this while its own thread is closing the fds.
        if not self._fd_lock.acquire(blocking=False):
            return
        try:
            if not self._closed:
                os.eventfd_write(self._wake_fd, 1)
        finally:
            self._fd_lock.release()

    def _close(self) -> None:
        with self._fd_lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._wake_fd)
            if self._inotify is not None:
                self._inotify.close()

    def _known_runs(self) -> list[Path]:
        """The model dirs, sorted, as of this version of the tree (the caller holds _lock)."""
        return self._views.runs(self._roots.values(), self._tree_version)

    def _log_once(self, level: int, key: str, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.log(level, msg, *args)


@dataclass(slots=True)
class _Schedule:
    next_full: float
    next_poll: float


def _call_each(callback: Callable[[Path], None], paths: list[str], label: str) -> None:
    for path in dict.fromkeys(paths):
        try:
            callback(Path(path))
        except Exception:
            logger.exception("%s failed for %s", label, path)
