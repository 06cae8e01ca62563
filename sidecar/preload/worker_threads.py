"""The threads a trainer keeps for reading and hashing forked checkpoints, started on the first fork and kept.

Starting them for every fork cost more than the work in a trainer's process: on the 16-core H200 host, reading
96 MiB by 16 threads started for it took 10.5 ms, by 16 kept threads 3.3 ms (each new thread maps its stack, which
waits for the page faults of the threads already reading into fresh memory, and they for it). Two pools, so that a
hashing thread waiting for bytes never holds a thread the read needs. Idle, they wait on a queue and cost no CPU.

A child made by fork() (a DataLoader worker) inherits the pools but not their threads: it starts pools of its own.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["HASH", "READ", "pool"]

READ = "read"
HASH = "hash"
_POOLS: dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def pool(role: str, size: int) -> ThreadPoolExecutor:
    """The kept pool for `role` (READ or HASH); `size` is its most threads, fixed by the first call."""
    with _LOCK:
        found = _POOLS.get(role)
        if found is None:
            found = _POOLS[role] = ThreadPoolExecutor(size, thread_name_prefix=f"fork-sidecar-{role}")
        return found


def _forget_in_child() -> None:
    global _LOCK
    _POOLS.clear()
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
