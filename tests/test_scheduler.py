"""The fork worker pool: bounded threads, one worker per run, fair between owners (sidecar/scheduler.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sidecar.scheduler import FairQueue
from tests.support.daemon import wait_for
from tests.support.threads import threads_since


class Blocking:
    """Work that holds its worker until released, recording what ran."""

    def __init__(self) -> None:
        self.started: list[Path] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def __call__(self, run: Path, settle: bool) -> None:
        with self.lock:
            self.started.append(run)
            self.running += 1
            self.most = max(self.most, self.running)
        if run.name.startswith("stuck"):
            self.release.wait(30)
        with self.lock:
            self.running -= 1


def test_one_owners_stuck_runs_never_hold_every_worker() -> None:
    work = Blocking()
    queue = FairQueue(workers=4, per_owner=2, work=work)
    for i in range(10):
        queue.submit(Path(f"stuck{i}"), owner=1000)
    wait_for(lambda: len(work.started) == 2, 30, "two of alice's runs started")
    queue.submit(Path("bob"), owner=1001)
    wait_for(lambda: Path("bob") in work.started, 30, "bob's run taken while alice's hang")
    time.sleep(0.1)
    assert len([r for r in work.started if r.name.startswith("stuck")]) == 2  # alice gets no more than her share
    work.release.set()
    wait_for(lambda: len(work.started) == 11 and not queue.active(), 30, "everything done")
    assert work.most <= 4


def test_threads_are_bounded_and_gone_when_idle() -> None:
    work = Blocking()
    before = set(threading.enumerate())
    queue = FairQueue(workers=3, per_owner=3, work=work)
    for i in range(500):
        queue.submit(Path(f"stuck{i}"), owner=i % 7)
    wait_for(lambda: work.running == 3, 30, "the pool busy")
    assert len(threads_since(before)) == 3
    work.release.set()
    wait_for(lambda: len(work.started) == 500, 60, "every run")
    wait_for(lambda: threads_since(before) == [], 30, "the workers gone")


def test_a_run_resubmitted_while_it_works_runs_again_once_after_and_never_twice_at_once() -> None:
    seen: list[tuple[Path, bool]] = []
    gate = threading.Event()
    overlap = []
    running: set[Path] = set()

    def work(run: Path, settle: bool) -> None:
        if run in running:
            overlap.append(run)
        running.add(run)
        seen.append((run, settle))
        gate.wait(30)  # a hang guard only: the test sets it once its re-submits are in
        running.discard(run)

    queue = FairQueue(workers=4, per_owner=4, work=work)
    queue.submit(Path("r"), owner=0)
    wait_for(lambda: seen, 30, "the first pass")
    for _ in range(5):
        queue.submit(Path("r"), owner=0)
    gate.set()
    wait_for(lambda: len(seen) == 2 and not queue.has(Path("r")), 30, "one more pass")
    assert seen == [(Path("r"), False), (Path("r"), True)] and not overlap


def test_the_look_after_a_pass_waits_for_the_marker_to_settle_unless_a_written_one_was_reported() -> None:
    # A marker the watcher reported written while the run's fork ran (closed, moved in) is taken at once after the
    # pass; any other look (a claim to look at, a retry) still lets a marker settle first.
    seen: list[tuple[Path, bool]] = []
    gate = threading.Event()

    def work(run: Path, settle: bool) -> None:
        seen.append((run, settle))
        if len(seen) % 2:
            gate.wait(30)
            gate.clear()

    queue = FairQueue(workers=2, per_owner=2, work=work)
    for expected_settle, submits in ((True, [False, False]), (False, [False, True, False])):
        seen.clear()
        queue.submit(Path("r"), owner=0)
        wait_for(lambda: seen, 30, "the first pass")
        for written in submits:
            queue.submit(Path("r"), owner=0, written=written)
        gate.set()
        wait_for(lambda: len(seen) == 2 and not queue.has(Path("r")), 30, "one more pass")
        assert seen == [(Path("r"), False), (Path("r"), expected_settle)], submits


def test_a_written_marker_reported_while_its_run_waits_in_the_queue_is_taken_without_settling() -> None:
    # Re-queued (to settle) after a pass, then reported written before a worker took it again: no settle wait.
    seen: list[tuple[Path, bool]] = []
    gates = {Path("r"): threading.Event(), Path("x"): threading.Event()}

    def work(run: Path, settle: bool) -> None:
        seen.append((run, settle))
        if len(seen) <= 2:
            gates[run].wait(30)

    queue = FairQueue(workers=1, per_owner=1, work=work)
    queue.submit(Path("r"), owner=0)
    wait_for(lambda: seen == [(Path("r"), False)], 30, "r's first pass")
    queue.submit(Path("r"), owner=0)  # a claim to look at: r goes again after this pass, settling first
    queue.submit(Path("x"), owner=0)
    gates[Path("r")].set()
    wait_for(lambda: len(seen) == 2, 30, "x's pass, r queued behind it")
    queue.submit(Path("r"), owner=0, written=True)
    gates[Path("x")].set()
    wait_for(lambda: len(seen) == 3 and not queue.has(Path("r")), 30, "r's second pass")
    assert seen == [(Path("r"), False), (Path("x"), False), (Path("r"), False)]


def test_a_reserved_run_is_never_given_to_a_worker_and_its_marker_is_taken_after_release() -> None:
    work = Blocking()
    queue = FairQueue(workers=2, per_owner=2, work=work)
    run = Path("chore")
    assert queue.reserve(run, owner=1000)
    assert not queue.reserve(run, owner=1000)  # one holder at a time
    queue.submit(run, owner=1000)  # a marker seen during the chore
    time.sleep(0.2)
    assert work.started == []
    queue.release(run)
    wait_for(lambda: work.started == [run], 30, "the run's marker taken after the chore")


def test_a_run_a_worker_holds_or_awaits_cannot_be_reserved() -> None:
    work = Blocking()
    queue = FairQueue(workers=1, per_owner=1, work=work)
    queue.submit(Path("stuck-a"), owner=1000)
    wait_for(lambda: work.started == [Path("stuck-a")], 30, "the first run started")
    queue.submit(Path("stuck-b"), owner=1000)  # waits: the only worker is busy
    assert not queue.reserve(Path("stuck-a"), owner=1000)
    assert not queue.reserve(Path("stuck-b"), owner=1000)
    assert queue.reserve(Path("idle"), owner=1001)
    queue.release(Path("idle"))
    work.release.set()
    queue.stop(timeout=5)
