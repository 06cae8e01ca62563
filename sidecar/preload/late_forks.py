"""Forks an agent answered `load_in_progress` for (the ranks of a distributed job were still putting the fork into
their models when the agent had to answer): the agent keeps each one until every target it told has its result,
then puts the combined result into `recent`, where the daemon, asking `status`, reads it (sidecar/trainers.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sidecar.protocol.messages import LOAD_IN_PROGRESS, reply_code

__all__ = ["LateFork"]


@dataclass
class LateFork:
    """A fork told to `targets` (of `run`): their replies once in, and the results that came after a reply."""

    run: str
    targets: list[Any]
    replies: list[dict[str, Any]] | None = None
    results: dict[int, dict[str, Any]] = field(default_factory=dict)  # late results, by target index

    def merged(self) -> list[dict[str, Any]] | None:
        """Every target's final reply (a late result in place of `load_in_progress`), or None while one is due."""
        if self.replies is None:
            return None
        merged = [self.results.get(i, r) for i, r in enumerate(self.replies)]
        return None if any(reply_code(r) == LOAD_IN_PROGRESS for r in merged) else merged
