"""What a notification stage of the fork pipeline is: the context it gets and the outcome it returns.

The pipeline swaps `checkpoints/0000` itself; telling trainers and vLLM servers are stages that plug in here. A stage
learns whose run it is from the directory the fork opened and holds (`owner_uid`, `run_id`), never from the path again,
and writes what it must in the run (vLLM's snapshots) through the fork's own RunIO (`files`): as the run's owner,
through the run's descriptor, like the swap.
A stage never raises for an expected failure (an agent that does not answer, a server that says 400): it returns a
`StageOutcome` whose `error` is one sentence a person can act on and whose `reason` is the code for machines
(sidecar/protocol/reasons.py), set where the failure is known. An unexpected exception is turned into a failed
outcome by the pipeline, so a bug in one stage cannot leave a fork unrecorded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from sidecar.protocol.reasons import Reason
from sidecar.protocol.run_layout import CHECKPOINTS, SERVED_STEP

__all__ = ["ForkContext", "RunFiles", "RunHolder", "Stage", "StageOutcome", "StageStatus"]

StageStatus = Literal["ok", "skipped", "failed"]


class RunFiles(Protocol):
    """What a stage may write in a run (sidecar.run_io.RunIO implements it: as the owner, through the run's fd)."""

    def snapshot(self, fork_id: str) -> tuple[str, str]:
        """Snapshot `checkpoints/0000` as `checkpoints/.fork-<fork_id>`: (its name, how it was made)."""
        ...

    def collect_snapshots(self, keep: Collection[str] | None, *, partials: bool = True) -> tuple[list[str], list[str]]:
        """Remove snapshots not named in `keep` (None: none of them) and, with `partials`, interrupted ones:
        (removed, left)."""
        ...


# Opens a run (by its model dir) the way a fork would and lends its RunFiles for a while; None if it cannot be opened.
RunHolder = Callable[[Path], AbstractContextManager[RunFiles | None]]


@dataclass(frozen=True)
class ForkContext:
    """One fork as the stages see it, after `checkpoints/0000` holds the new adapter."""

    fork_id: str
    model_dir: Path
    source: Path
    digest: str  # adapter digest (sidecar.protocol.digest) of the new checkpoints/0000
    deadline: float  # time.monotonic() by which the stage must have returned
    # The run directory as the fork opened and holds it (sidecar.rundir.OpenRun). None for a stage driven on its own
    # (tests, benchmarks): the run then counts as root's, and `files` is opened by this process for the call.
    owner_uid: int | None = None
    run_id: tuple[int, int] | None = None  # (st_dev, st_ino)
    files: RunFiles | None = None

    @property
    def real_model_dir(self) -> Path:
        """The run's path with the operator's root resolved; the rest has no symlink (the fork opened it so)."""
        project, _, model = self.model_dir.parts[-3:]
        return Path(os.path.realpath(self.model_dir.parents[2])) / project / "models" / model

    @property
    def checkpoints_dir(self) -> Path:
        return self.model_dir / CHECKPOINTS

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoints_dir / SERVED_STEP

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True)
class StageOutcome:
    status: StageStatus
    seconds: float = 0.0
    error: str | None = None
    # Stage-specific, JSON-serialisable facts for `.fork.done` (agents told, servers and adapter names reloaded).
    detail: Mapping[str, Any] = field(default_factory=dict)
    reason: Reason | None = None  # why it failed (or was skipped), as a stable code; None when it is ok

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "seconds": round(self.seconds, 4)}
        if self.error:
            out["error"] = self.error
        if self.reason is not None:
            out["reason"] = str(self.reason)
        out.update(self.detail)
        return out


class Stage(Protocol):
    """A notification stage. Built by the daemon from the config (rebuilt on SIGHUP)."""

    name: str  # "trainers" or "vllm": the key in the outcome file

    def run(self, ctx: ForkContext) -> StageOutcome:
        """Tell everyone of this run about the fork and verify they took it; must return by ctx.deadline."""
        ...

    def on_start(self, run_dirs: Sequence[Path], hold: RunHolder) -> None:
        """Called once when the daemon starts (e.g. to collect leftovers, through `hold`); may do nothing."""
        ...
