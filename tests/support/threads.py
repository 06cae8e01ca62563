"""Threads a piece of code starts, told apart by identity: `threading.active_count()` also moves when a thread that
another test left behind ends meanwhile, which a count before and after would take for the code under test."""

from __future__ import annotations

import threading

__all__ = ["threads_since"]


def threads_since(before: set[threading.Thread]) -> list[threading.Thread]:
    """The live threads that are not in `before` (a `set(threading.enumerate())` taken earlier)."""
    return [t for t in threading.enumerate() if t not in before]
