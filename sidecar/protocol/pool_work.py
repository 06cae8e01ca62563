"""One piece of work shared by a caller and helper threads kept in an executor, never outlived by a helper.

The preload's read and its digest hand pieces out from a shared iterator to the helpers and to the calling thread
itself. A helper still running after its caller returned or raised would go on writing (into a buffer, or through
raw addresses into a model's parameters) after the caller said it was over, so this returns, or raises, only once
every helper it started has ended. Standard library only: the daemon and the trainer side both import it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future, wait

__all__ = ["run_beside"]


def run_beside(
    executor: Executor, helper: Callable[[], None], helpers: int, caller: Callable[[], None], stop: Callable[[], None]
) -> None:
    """Run `helper` on up to `helpers` threads of `executor` while `caller` runs on this thread.

    `caller` must leave no work for a helper that never started (it takes pieces from the same iterator until it is
    empty, or stops): once it returns, helpers not yet started are cancelled. If submitting or `caller` raises,
    `stop()` tells the running helpers to end at their next piece; either way every started helper is waited for.
    The helpers report their own errors (to the caller's list); an exception escaping one is raised here."""
    futures: list[Future[None]] = []
    try:
        for _ in range(helpers):
            futures.append(executor.submit(helper))
        caller()
    except BaseException:
        stop()
        raise
    finally:
        for future in futures:
            future.cancel()  # only those not started: what they would have taken, the caller took
        _wait_all(futures)
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]


def _wait_all(futures: list[Future[None]]) -> None:
    """Wait for every future, also through an interrupt (re-raised once they are all done)."""
    interrupted: BaseException | None = None
    while not all(future.done() for future in futures):
        try:
            wait(futures)
        except BaseException as e:  # KeyboardInterrupt: the helpers still hold the buffers; wait, then raise it
            interrupted = e
    if interrupted is not None:
        raise interrupted
