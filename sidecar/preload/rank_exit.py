"""The ranks' agreement at the end of the job: its last reduce in flight is waited for and dropped before the job's
default process group goes away, at `torch.distributed.destroy_process_group()` and at interpreter exit.

The agreement (sidecar/preload/rank_agreement.py) starts an `async_op=True` all_reduce at every optimizer-step
boundary and reads it at the next, so after the last step one is still in flight. Waiting for it here, before the
group is torn down, means no reduce of ours is still running in gloo's worker (or NCCL's) when the group's
destructor joins it. (What made a 2-rank gloo job hang at exit was a different thing, a worker thread waiting for
the GIL to release a tensor of ours: sidecar/preload/rank_reduce.py keeps its buffers for that.)

The wait is bounded (`DRAIN_S`, polling `is_completed()`): a peer that has already exited never completes it, and
an exit must not turn into a hang of ours. It reads nothing and decides nothing, so no rank takes a step the others
do not: after it the agreement is off (forks waiting for it are answered) and issues no further collective.

The `destroy_process_group` of `torch.distributed` (and of `distributed_c10d`) is wrapped once, when a first
agreement starts its reduces; torch 2.11 to 2.13 offer no hook of their own before a group is destroyed. A script
that bound the function before that (`from torch.distributed import destroy_process_group` at its top) calls the
original: its reduce is then drained only by the `atexit` hook, which runs before the interpreter's shutdown but
after that explicit destroy. torch is never imported here (it is in `sys.modules` by the time a reduce starts).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import sys
import threading
import time
import weakref
from typing import Any, Protocol

__all__ = ["DRAIN_S", "drain_all", "watch_exit"]

DRAIN_S = 5.0
_POLL_S = 0.005


class _Drains(Protocol):
    def drain(self, seconds: float) -> None: ...


_lock = threading.Lock()
_agreements: weakref.WeakSet[Any] = weakref.WeakSet()
_installed = False


def watch_exit(agreement: _Drains) -> None:
    """Drain `agreement` before the default group is destroyed or the interpreter exits (idempotent)."""
    global _installed
    with _lock:
        _agreements.add(agreement)
        if _installed:
            return
        _installed = True
    atexit.register(drain_all)
    _wrap_destroy()


def drain_all() -> None:
    """Wait (at most DRAIN_S in all) for every agreement's reduce in flight and drop it. Never raises."""
    with _lock:
        agreements = list(_agreements)
    until = time.monotonic() + DRAIN_S
    for agreement in agreements:
        with contextlib.suppress(Exception):
            agreement.drain(max(0.0, until - time.monotonic()))


def wait_done(work: Any, seconds: float) -> bool:
    """Whether the async `work` completed within `seconds` (polled: `wait()` on a reduce a gone peer never answers
    would block for the group's whole timeout)."""
    until = time.monotonic() + seconds
    while True:
        with contextlib.suppress(Exception):
            if work.is_completed():
                return True
        if time.monotonic() >= until:
            return False
        time.sleep(_POLL_S)


def _wrap_destroy() -> None:
    dist: Any = sys.modules.get("torch.distributed")
    c10d: Any = sys.modules.get("torch.distributed.distributed_c10d")
    if dist is None or c10d is None:
        return
    original = c10d.destroy_process_group
    if getattr(original, "__fork_sidecar_drains__", False):
        return

    @functools.wraps(original)
    def destroy_process_group(group: Any = None, *args: Any, **kwargs: Any) -> Any:
        world = getattr(getattr(c10d, "GroupMember", None), "WORLD", None)
        if group is None or (world is not None and group is world):  # the agreement's group (the default one)
            drain_all()
        return original(group, *args, **kwargs)

    destroy_process_group.__fork_sidecar_drains__ = True  # type: ignore[attr-defined]
    c10d.destroy_process_group = destroy_process_group
    if getattr(dist, "destroy_process_group", None) is original:
        dist.destroy_process_group = destroy_process_group
