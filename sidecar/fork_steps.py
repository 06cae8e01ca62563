"""Running a claimed fork's steps to its outcome: stage -> swap -> trainers -> vllm -> verify -> outcome file.

Each step does its work and then records the state it reached (journal.advance), so after a SIGKILL the daemon
re-runs the step after the journaled state; every step is idempotent for that reason. Failures are values here:
whatever goes wrong becomes one sentence in `.fork.failed`, and a failure never undoes a swap that happened
(checkpoints/0000 is complete either way; the outcome says which adapter it holds).

Why this is its own module: sidecar/pipeline.py decides whether this daemon may act on a run at all (holding the
run, taking, adopting, resuming or dropping its claim); once it may, everything from here on only needs the held
run and the claim to check and report through. The seam keeps the two from reaching into each other's state: the
pipeline owns one ForkSteps and hands it a record and the run it holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.claims.base import ClaimInDoubt, ClaimLost, Claims
from sidecar.config import Config
from sidecar.fanout import OTHER_REASON, node_problems, nodes_of_fork
from sidecar.journal import ForkRecord, Journal, JournalUnwritable
from sidecar.marker import FAILED, INPROGRESS
from sidecar.protocol.digest import is_digest
from sidecar.protocol.reasons import Reason
from sidecar.protocol.run_layout import CHECKPOINTS, SERVED_STEP
from sidecar.rank_jobs import spread_problems
from sidecar.run_io import RunIO, RunIOError
from sidecar.rundir import OpenRun
from sidecar.stages import ForkContext, Stage, StageOutcome
from sidecar.states import ForkState

__all__ = ["ForkSteps", "HeldRun", "fork_logger"]

log = logging.getLogger("sidecar.pipeline")  # the daemon's one fork logger: journald filters and tests use the name

_UNCHANGED = "unchanged"  # what disk_digest echoes back when 0000 is still the file staged
# The reasons of a notification stage that is not configured (fanout.OTHER_REASON: of one that raised, a bug).
_NONE_FOUND = {"trainers": Reason.TRAINER_NONE_FOUND, "vllm": Reason.VLLM_NONE_FOUND}
# The states recorded for an adopter (etcd backend: Claims.progress): the finished swap, which an adopter must not
# redo blind. Every other record only spares an adopter work, at one etcd write on every fork's path: without a
# record it settles the dead claimer's copies and forks the claimed marker again (ForkPipeline._adopt_orphan),
# exactly as after a claimer killed just before that write; past the swap it runs the stages again from SWAPPED
# whatever was recorded (ForkPipeline._resume_adopted) and verifies itself. So STAGED, TRAINERS, VLLM and VERIFIED
# are not sent.
ADOPTERS_RESUME_FROM = frozenset({ForkState.SWAPPED})


@dataclasses.dataclass
class HeldRun:
    """A run as one fork holds it: the directory opened once, and the RunIO doing the fork's work in it."""

    opened: OpenRun
    io: RunIO


class ForkFailed(Exception):
    """Ends a fork as failed with this sentence."""


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


class ForkSteps:
    """The steps of the forks one pipeline claims, with what they need: config, journal, stages, claims."""

    def __init__(self, config: Config, journal: Journal, stages: Sequence[Stage], claims: Claims) -> None:
        self.config = config
        self.journal = journal
        self.stages = list(stages)
        self.claims = claims
        self.host = socket.gethostname()
        self.on_finish: Callable[[ForkRecord], None] | None = None

    def roots(self) -> list[str]:
        return [str(r) for r in self.config.allowed_source_roots]

    @contextlib.contextmanager
    def unless_lost(self, record: ForkRecord) -> Iterator[None]:
        """Stops the fork quietly when its claim turns out to be another daemon's: that daemon files the outcome."""
        try:
            yield
        except ClaimInDoubt as e:
            fork_logger(record).warning("fork left as journaled for the next start: %s", e)
        except ClaimLost as e:
            fork_logger(record).error("fork stopped without an outcome: %s", e)
            with contextlib.suppress(OSError):
                self.journal.forget(record)

    # --- the steps ----------------------------------------------------------------------------------------------
    def run(self, record: ForkRecord, held: HeldRun) -> None:
        """Carries the fork on from its state to its outcome (or stops quietly if its claim is lost)."""
        with self.unless_lost(record):
            self._steps(record, held)

    def _steps(self, record: ForkRecord, held: HeldRun) -> None:
        claim = held.opened.run.path / INPROGRESS
        steps: dict[ForkState, Callable[[ForkRecord, HeldRun], None]] = {
            ForkState.CLAIMED: self._stage,
            ForkState.STAGED: self._swap,
            ForkState.SWAPPED: lambda r, h: self._notify(r, h, "trainers", ForkState.TRAINERS),
            ForkState.TRAINERS: lambda r, h: self._notify(r, h, "vllm", ForkState.VLLM),
            ForkState.VLLM: self._verify,
            ForkState.VERIFIED: self._finish_done,
        }
        while not record.state.terminal:
            try:
                self.claims.check(claim)
                _check_in_place(record, held.opened)
                self._redigest_old(record, held)
                steps[record.state](record, held)
            except (ForkFailed, RunIOError) as e:
                fork_logger(record).error("fork failed: %s", e)
                self.fail(record, str(e), held)
            except ClaimLost:
                raise
            except Exception as e:  # a bug must still end the fork with an outcome, never strand the claim
                if record.state.terminal:
                    # The outcome is written and the end recorded: bookkeeping after that must never rewrite it.
                    fork_logger(record).exception("after the fork ended %s", record.state)
                    return
                fork_logger(record).exception("internal error in state %s", record.state)
                self.fail(record, f"internal error in state {record.state} ({e!r}); see journalctl.", held)

    def _redigest_old(self, record: ForkRecord, held: HeldRun) -> None:
        """A fork journaled by a fork-sidecar with an older digest framing (`sha256:`, `sha256-tree:`): once its copy
        is 0000, and only while 0000 is still the file it staged (same inode, size and mtime), digest it again, so that
        no later step compares an old digest with a new one (an agent's, say). Otherwise verify fails the fork, as it
        does for any 0000 replaced after the swap."""
        if record.digest is None or is_digest(record.digest) or record.state in (ForkState.CLAIMED, ForkState.STAGED):
            return
        staged = record.sections.get("swap", {}).get("adapter_fingerprint")
        if staged is None or held.io.disk_digest(staged, _UNCHANGED) != _UNCHANGED:
            return
        served = held.io.served_digest()
        if served is None:
            return
        fork_logger(record).info("journaled digest %s is of the old framing; 0000 holds %s", record.digest, served)
        record.digest = served
        try:
            self.journal.save(record)
        except JournalUnwritable as e:  # as in _advance: the record goes on in memory, a restart re-digests again
            fork_logger(record).warning("re-digested record not journaled, carrying on: %s", e)

    def _stage(self, record: ForkRecord, held: HeldRun) -> None:
        assert record.source is not None
        started = time.monotonic()
        sources = self.config.sources
        limits = {"max_files": sources.max_files, "max_bytes": sources.max_bytes, "max_depth": sources.max_depth}
        staged = held.io.stage(record.fork_id, record.source, self.config.swap.copy_mode, limits, self.roots())
        record.sections["swap"] = {
            "status": "ok",
            "method": staged["method"],
            "files": staged["files"],  # the first 100 names; file_count has them all
            "file_count": staged["file_count"],
            "bytes": staged["bytes"],
            "stage_seconds": round(time.monotonic() - started, 4),
            # Lets install tell the staged copy from the old 0000 by inode after a crash, without hashing both.
            "stage_inode": staged["inode"],
            "adapter_fingerprint": staged["adapter_fingerprint"],
        }
        self._advance(record, ForkState.STAGED, digest=staged["digest"])
        fork_logger(record, "swap").info(
            "staged %d bytes by %s, digest %s", staged["bytes"], staged["method"], staged["digest"]
        )

    def _swap(self, record: ForkRecord, held: HeldRun) -> None:
        assert record.digest is not None
        started = time.monotonic()
        held.io.install(record.fork_id, record.digest, record.sections.get("swap", {}).get("stage_inode"))
        outcome = record.sections.setdefault("swap", {"status": "ok"})
        outcome["install_seconds"] = round(time.monotonic() - started, 4)
        outcome["seconds"] = round(outcome.get("stage_seconds", 0.0) + outcome["install_seconds"], 4)
        # Recording the swap for an adopter also publishes the fork to the other nodes (etcd backend): only once the
        # path is known to still name the run claimed, as the trainers step checks before it tells anyone.
        self._advance(record, ForkState.SWAPPED, before_recording=lambda: _check_in_place(record, held.opened))
        fork_logger(record, "swap").info("checkpoints/%s now holds %s", SERVED_STEP, record.digest)

    def _notify(self, record: ForkRecord, held: HeldRun, name: str, reached: ForkState) -> None:
        outcome = self._run_stage(record, held, name)
        record.sections[name] = outcome.to_json()
        self._advance(record, reached)

    def _run_stage(self, record: ForkRecord, held: HeldRun, name: str) -> StageOutcome:
        assert record.digest is not None and record.source is not None
        if name == "trainers":  # after the swap: every other node serving the run is told too (etcd backend)
            self.claims.publish(held.opened.run.path / INPROGRESS, record, self._stage_budget())
        opened = held.opened
        ctx = ForkContext(
            record.fork_id,
            Path(record.model_dir),
            Path(record.source),
            record.digest,
            time.monotonic() + float(getattr(self.config.timeouts, name)),
            # Whose run this is: the directory opened and claimed, never the path looked at again (_check_in_place
            # has just made sure the path still names it).
            owner_uid=opened.uid,
            run_id=(opened.dev, opened.ino),
            files=held.io,
        )
        return self.run_stage(name, ctx, fork_logger(record, name))

    def _stage_budget(self) -> float:
        """How long the notification stages may take together: the bound on waiting for other nodes' reports."""
        return float(self.config.timeouts.trainers) + float(self.config.timeouts.vllm)

    def run_stage(self, name: str, ctx: ForkContext, logger: logging.LoggerAdapter[logging.Logger]) -> StageOutcome:
        """One notification stage of this node for `ctx`: its outcome, whatever the stage does (a bug included)."""
        stage = next((s for s in self.stages if s.name == name), None)
        if stage is None:
            return StageOutcome("skipped", error="none found", reason=_NONE_FOUND.get(name))
        started = time.monotonic()
        try:
            outcome = stage.run(ctx)
        except Exception as e:  # a stage bug is a failed stage, not a stranded fork
            logger.exception("%s stage raised", name)
            outcome = StageOutcome(
                "failed",
                error=f"internal error in the {name} stage ({e!r}); see journalctl.",
                reason=OTHER_REASON.get(name),
            )
        if not outcome.seconds:
            outcome = dataclasses.replace(outcome, seconds=time.monotonic() - started)
        level = logging.ERROR if outcome.status == "failed" else logging.INFO
        why = outcome.error or outcome.reason
        logger.log(level, "%s stage %s%s", name, outcome.status, f": {why}" if why else "")
        return outcome

    def _verify(self, record: ForkRecord, held: HeldRun) -> None:
        started = time.monotonic()
        checkpoints = Path(record.model_dir) / CHECKPOINTS
        on_disk = held.io.disk_digest(record.sections.get("swap", {}).get("adapter_fingerprint"), record.digest)
        problems = []
        if on_disk != record.digest:
            problems.append(
                f"{checkpoints / SERVED_STEP} holds {on_disk}, not the forked {record.digest}; "
                "another writer replaced it — fork again."
            )
        gathered = self.claims.gather(Path(record.model_dir) / INPROGRESS, record, self._stage_budget())
        if gathered is not None:
            record.sections["nodes"], record.sections["fanout"] = nodes_of_fork(record, gathered, self.config)
            # First: a job's ranks on a node nobody told explain why the ranks that were told failed to load.
            problems += spread_problems(record.sections["nodes"], record.model_dir)
        problems += [
            str(s["error"]) for n in ("trainers", "vllm") if (s := record.sections.get(n, {})).get("status") == "failed"
        ]
        if gathered is not None:
            problems += node_problems(gathered, self.config)
        record.sections["verify"] = {
            "status": "failed" if problems else "ok",
            "seconds": round(time.monotonic() - started, 4),
            "disk_digest": on_disk,
        }
        # The retired copy outlived every reload of this fork (vLLM may read from paths until its reload returns).
        held.io.discard_retired(record.fork_id)
        self._advance(record, ForkState.VERIFIED, error=problems[0] if problems else None)

    # --- endings ------------------------------------------------------------------------------------------------
    def _finish_done(self, record: ForkRecord, held: HeldRun) -> None:
        if record.error:
            self.fail(record, record.error, held)
            return
        self.write_outcome(record, "done", held)
        self._advance(record, ForkState.DONE, finished_at=record.finished_at)
        fork_logger(record).info("fork done in %.2fs", (record.finished_at or 0) - record.started_at)
        self.close(record)

    def fail(self, record: ForkRecord, error: str, held: HeldRun) -> None:
        """Fails the fork with `error`: its copies gone unless swapped, its outcome filed, its end journaled."""
        record.error = error
        if record.state in (ForkState.CLAIMED, ForkState.STAGED):
            with contextlib.suppress(RunIOError, OSError):
                held.io.discard_copies(record.fork_id, staged=record.state is ForkState.STAGED)
            record.sections.setdefault("swap", {}).update(self._served_now(record, held))
        try:
            self.write_outcome(record, "failed", held)
        except (RunIOError, OSError) as e:
            # The journal still ends the fork as failed, and its claim left behind is never adopted
            # (ForkPipeline._adoptable).
            fork_logger(record).error("the outcome could not be written to %s: %s", Path(record.model_dir) / FAILED, e)
        if self.journal.has_record(record.fork_id):
            self._advance(record, ForkState.FAILED, finished_at=record.finished_at)
        else:
            record.state = ForkState.FAILED
        self.close(record)

    def _served_now(self, record: ForkRecord, held: HeldRun) -> dict[str, Any]:
        """After a failure around the swap, say plainly which adapter checkpoints/0000 holds."""
        try:
            served = held.io.served_digest()
        except (RunIOError, OSError):
            served = None
        if served is None:
            return {"status": "failed"}
        return {"status": "failed", "served_digest": served, "served_is_new": served == record.digest}

    def write_outcome(self, record: ForkRecord, status: str, held: HeldRun) -> None:
        record.finished_at = time.time()
        model_dir = Path(record.model_dir)
        outcome: dict[str, Any] = {
            "status": status,
            "fork_id": record.fork_id,
            "request": record.request,
            "source": record.source,
            "digest": record.digest,
            "swap": record.sections.get("swap", {"status": "skipped"}),
            "trainers": record.sections.get("trainers", {"status": "skipped"}),
            "vllm": record.sections.get("vllm", {"status": "skipped"}),
            "verify": record.sections.get("verify", {"status": "skipped"}),
            "error": record.error,
            "host": self.host,
            "started_at": _iso(record.started_at),
            "finished_at": _iso(record.finished_at),
        }
        if rid := record.request.get("request_id"):
            outcome["request_id"] = rid
        if "nodes" in record.sections:  # several nodes (etcd): each serving node's stages, this one's included
            outcome["nodes"] = record.sections["nodes"]
        self.claims.confirm(model_dir / INPROGRESS)
        # Through the directory claimed, wherever it is now: a run moved during the fork gets its outcome there.
        held.io.finish(record.fork_id, outcome)
        # Only once the outcome is filed: released before, another node would see the claimer gone and fork the
        # marker again, and a finish that raised would find its claim gone when fail() files "failed".
        self.claims.release(model_dir / INPROGRESS)

    def _advance(
        self, record: ForkRecord, state: ForkState, before_recording: Callable[[], None] | None = None, **changes: Any
    ) -> None:
        """journal.advance, except that a state dir refusing the write does not change the fork's course; then the
        record for an adopter (after `before_recording`, if given).

        The record goes on in memory: every step is idempotent, so a crash now resumes from the older record
        and re-runs steps, exactly as after a SIGKILL between a step and its journal write; the history line is
        kept until the state dir takes it (Journal.finish).
        """
        try:
            self.journal.advance(record, state, **changes)
        except JournalUnwritable as e:
            fork_logger(record).warning("state %s not journaled, carrying on: %s", state, e)
        if before_recording is not None:
            before_recording()
        if state in ADOPTERS_RESUME_FROM:  # what another daemon resumes from if this one dies (etcd backend)
            self.claims.progress(Path(record.model_dir) / INPROGRESS, record.to_json())

    def close(self, record: ForkRecord) -> None:
        if not self.journal.finish(record):
            fork_logger(record).error(
                "history line kept back until the state dir %s is writable", self.journal.state_dir
            )
        if self.on_finish is not None:
            self.on_finish(record)


def fork_logger(record: ForkRecord, stage: str | None = None) -> logging.LoggerAdapter[logging.Logger]:
    run = "/".join(Path(record.model_dir).parts[-3::2])  # project/model
    extra = {"fork_run": record.model_dir, "fork_id": record.fork_id, "fork_stage": stage or "", "run": run}
    return _ForkLogger(log, extra)


class _ForkLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes the run and fork id for people; the same values travel as journald fields (FORK_RUN, ...)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[{extra.get('run')} {extra.get('fork_id')}] {msg}", kwargs


# The steps that act on the run or tell others about it: each first checks the path still names the run claimed.
_ACTING = {
    ForkState.STAGED: "nothing was swapped",
    ForkState.SWAPPED: "checkpoints/0000 of the directory claimed holds the fork; no trainer or server was told",
    ForkState.TRAINERS: "checkpoints/0000 of the directory claimed holds the fork; no vLLM server was told",
}


def _check_in_place(record: ForkRecord, opened: OpenRun) -> None:
    if record.state in _ACTING and not opened.still_in_place():
        raise ForkFailed(
            f"{record.model_dir} was moved or replaced during the fork ({_ACTING[record.state]}); "
            "fork again where the run is now."
        )
