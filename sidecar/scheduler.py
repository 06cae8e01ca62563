"""Which run a fork worker takes next: a fixed pool, one worker per run at a time, fair between run owners.

Runs with work wait in one queue per owner (the uid owning the model directory); owners are served in turn, and an
owner holding `per_owner` workers gets no more until one comes back. So however many of alice's forks hang (her
agent never answers, her FUSE mount stalls), bob's fork finds a free worker while per_owner < workers, and 10,000
markers cost 10,000 queue entries, not 10,000 threads. Workers start on demand, up to `workers`, and exit as soon as
nothing they may take is left: an idle daemon keeps no fork threads at all.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["FairQueue"]


class FairQueue:
    def __init__(self, workers: int, per_owner: int, work: Callable[[Path, bool], None]) -> None:
        self.workers = workers
        self.per_owner = per_owner
        # (run, settle): settle is true for a run taken again after a pass that nobody reported a written marker
        # for meanwhile (see process_run)
        self._work = work
        self._lock = threading.Lock()
        self._queues: dict[int, collections.deque[Path]] = {}
        self._turns: collections.deque[int] = collections.deque()  # owners with queued runs, in serving order
        self._queued: dict[Path, tuple[int, bool]] = {}  # run -> (owner, settle)
        self._active: dict[Path, int] = {}  # run -> owner
        self._per_owner_active: collections.Counter[int] = collections.Counter()
        self._again: dict[Path, bool] = {}  # run -> whether a written marker was reported while it ran
        self._threads: set[threading.Thread] = set()
        self._busy = 0
        self._stopping = False

    # --- the daemon's side ------------------------------------------------------------------------------------
    def submit(self, run: Path, owner: int, *, written: bool = False) -> None:
        """A marker (or a claim to look at) in `run`: queue it, or have its running worker look again after.
        `written`: the watcher saw the marker's writer finish (closed, moved in, or left alone since a scan), so the
        look after the running pass takes it at once instead of waiting for it to settle (MARKER_SETTLE_S: a
        marker written right after a fork's outcome waited that long, behind the fork's last etcd call)."""
        with self._lock:
            if run in self._active:
                self._again[run] = self._again.get(run, False) or written
            elif run in self._queued:
                queued_owner, settle = self._queued[run]
                self._queued[run] = (queued_owner, settle and not written)  # re-queued after a pass, then reported
            else:
                self._enqueue(run, owner, settle=False)
            self._spawn_if_needed()

    def configure(self, workers: int, per_owner: int) -> None:
        with self._lock:
            self.workers, self.per_owner = workers, per_owner
            self._spawn_if_needed()

    def has(self, run: Path) -> bool:
        with self._lock:
            return run in self._active or run in self._queued

    def active(self) -> list[Path]:
        with self._lock:
            return sorted(self._active)

    def queued(self) -> list[Path]:
        with self._lock:
            return sorted(set(self._queued) | set(self._again))

    def reserve(self, run: Path, owner: int) -> bool:
        """Hold `run` as a worker would, for a chore on its files outside any fork (start-up snapshot collection):
        False while a worker has it or it waits for one. A marker seen meanwhile is taken after `release`."""
        with self._lock:
            if self._stopping or run in self._active or run in self._queued:
                return False
            self._active[run] = owner
            self._per_owner_active[owner] += 1
            return True

    def release(self, run: Path) -> None:
        with self._lock:
            self._finish(run)
            self._spawn_if_needed()

    def stop(self, timeout: float) -> None:
        """No new work is taken; waits up to `timeout` for the workers' current forks."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout / max(1, len(threads)))

    # --- internals ----------------------------------------------------------------------------------------------
    def _enqueue(self, run: Path, owner: int, *, settle: bool) -> None:
        queue = self._queues.setdefault(owner, collections.deque())
        if not queue and owner not in self._turns:
            self._turns.append(owner)
        queue.append(run)
        self._queued[run] = (owner, settle)

    def _takeable(self) -> int:
        return sum(
            min(len(q), max(0, self.per_owner - self._per_owner_active[o])) for o, q in self._queues.items() if q
        )

    def _spawn_if_needed(self) -> None:
        idle = len(self._threads) - self._busy
        if not self._stopping and len(self._threads) < self.workers and self._takeable() > idle:
            thread = threading.Thread(target=self._worker, name=f"fork-worker-{len(self._threads)}", daemon=True)
            self._threads.add(thread)
            thread.start()

    def _take(self) -> tuple[Path, bool] | None:
        """The next run of the first owner in turn with a free slot; the owner goes to the back of the line."""
        for _ in range(len(self._turns)):
            owner = self._turns[0]
            self._turns.rotate(-1)
            queue = self._queues.get(owner)
            if not queue:
                self._turns.remove(owner)
                self._queues.pop(owner, None)
                continue
            if self._per_owner_active[owner] >= self.per_owner:
                continue
            run = queue.popleft()
            if not queue:
                self._turns.remove(owner)
                del self._queues[owner]
            _, settle = self._queued.pop(run)
            self._active[run] = owner
            self._per_owner_active[owner] += 1
            return run, settle
        return None

    def _finish(self, run: Path) -> None:
        owner = self._active.pop(run)
        self._per_owner_active[owner] -= 1
        if self._per_owner_active[owner] <= 0:
            del self._per_owner_active[owner]
        if run in self._again:
            written = self._again.pop(run)
            # Behind the runs already waiting: a run re-touched in a loop cannot starve the others.
            self._enqueue(run, owner, settle=not written)

    def _worker(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                item = None if self._stopping else self._take()
                if item is None:
                    self._threads.discard(me)
                    return
                self._busy += 1
                self._spawn_if_needed()
            run, settle = item
            try:
                self._work(run, settle)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._finish(run)
                    self._spawn_if_needed()
