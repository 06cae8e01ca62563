"""The preload's kept reading and hashing threads (sidecar/preload/worker_threads.py) and the work shared on them
(sidecar/protocol/pool_work.py): real threads, real executors, a real fork()."""

from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from sidecar.preload import worker_threads
from sidecar.protocol.pool_work import run_beside


def test_the_pool_is_kept_and_its_threads_serve_later_calls() -> None:
    pool = worker_threads.pool("test-kept", 2)
    assert worker_threads.pool("test-kept", 8) is pool  # the first call fixes it
    first = {pool.submit(threading.get_ident).result() for _ in range(8)}
    later = {pool.submit(threading.get_ident).result() for _ in range(8)}
    assert len(first | later) <= 2
    assert all(t.name.startswith("fork-sidecar-test-kept") for t in threading.enumerate() if t.ident in first)


def test_a_forked_child_starts_pools_of_its_own() -> None:
    # A child inherits the pool object but none of its threads: a task handed to it there would never run.
    pool = worker_threads.pool("test-fork", 1)
    assert pool.submit(lambda: 1).result() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running: what a DataLoader does
        pid = os.fork()
    if pid == 0:  # the child: exit 0 only if a fresh pool ran the task
        code = 1
        try:
            child = worker_threads.pool("test-fork", 1)
            code = 0 if child is not pool and child.submit(lambda: 7).result(timeout=10) == 7 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's pool never ran its task")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_a_caller_that_raises_stops_the_helpers_and_returns_only_after_them() -> None:
    ended: list[float] = []
    stopped = threading.Event()

    def helper() -> None:
        stopped.wait(10)
        time.sleep(0.2)  # still writing after it was told to stop
        ended.append(time.monotonic())

    def caller() -> None:
        raise ValueError("the caller's check failed")

    with ThreadPoolExecutor(2) as pool, pytest.raises(ValueError, match="check failed"):
        run_beside(pool, helper, 2, caller, stopped.set)
    assert len(ended) == 2 and stopped.is_set()  # both ended before run_beside let the error out


def test_a_failed_hand_out_still_waits_for_the_helpers_already_running() -> None:
    # A mock: an executor whose second submit fails ("can't start new thread"), which a real pool does only when
    # the process runs out of threads.
    class Refusing(ThreadPoolExecutor):
        submitted = 0

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
            self.submitted += 1
            if self.submitted > 1:
                raise RuntimeError("can't start new thread")
            return super().submit(fn, *args, **kwargs)

    ended: list[int] = []
    stop = threading.Event()

    def helper() -> None:
        stop.wait(10)
        time.sleep(0.2)
        ended.append(1)

    with Refusing(2) as pool, pytest.raises(RuntimeError, match="new thread"):
        run_beside(pool, helper, 3, lambda: None, stop.set)
    assert ended == [1]


def test_helpers_that_never_started_are_not_waited_for() -> None:
    # The pool's one thread is busy with another load's work; the caller takes every piece itself.
    busy = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(busy.wait, 10)
        started = time.monotonic()
        run_beside(pool, lambda: None, 3, lambda: None, lambda: None)
        assert time.monotonic() - started < 5 and not blocker.done()
        busy.set()
