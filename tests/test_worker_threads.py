"""The preload's kept reading and hashing threads (sidecar/preload/worker_threads.py): real threads, a real fork()."""

from __future__ import annotations

import os
import threading
import warnings

from sidecar.preload import worker_threads


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
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
