"""What a notification stage of the fork pipeline is: the context it gets and the outcome it returns.

The pipeline swaps `checkpoints/0000` itself; telling trainers and vLLM servers are stages that plug in here.
A stage never raises for an expected failure (an agent that does not answer, a server that says 400): it returns a
`StageOutcome` whose `error` is one sentence a person can act on. An unexpected exception is turned into a failed
outcome by the pipeline, so a bug in one stage cannot leave a fork unrecorded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = ["ForkContext", "Stage", "StageOutcome", "StageStatus"]

StageStatus = Literal["ok", "skipped", "failed"]


@dataclass(frozen=True)
class ForkContext:
    """One fork as the stages see it, after `checkpoints/0000` holds the new adapter."""

    fork_id: str
    model_dir: Path
    source: Path
    digest: str  # adapter digest (sidecar.digest) of the new checkpoints/0000
    deadline: float  # time.monotonic() by which the stage must have returned

    @property
    def checkpoints_dir(self) -> Path:
        return self.model_dir / "checkpoints"

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoints_dir / "0000"

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True)
class StageOutcome:
    status: StageStatus
    seconds: float = 0.0
    error: str | None = None
    # Stage-specific, JSON-serialisable facts for `.fork.done` (agents told, servers and adapter names reloaded).
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "seconds": round(self.seconds, 4)}
        if self.error:
            out["error"] = self.error
        out.update(self.detail)
        return out


class Stage(Protocol):
    """A notification stage. Built by the daemon from the config (rebuilt on SIGHUP)."""

    name: str  # "trainers" or "vllm": the key in the outcome file

    def run(self, ctx: ForkContext) -> StageOutcome:
        """Tell everyone of this run about the fork and verify they took it; must return by ctx.deadline."""
        ...

    def on_start(self, run_dirs: Sequence[Path]) -> None:
        """Called once when the daemon starts (e.g. to collect leftovers); may do nothing."""
        ...
