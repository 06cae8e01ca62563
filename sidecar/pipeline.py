"""One fork, start to finish, as journaled steps: claim -> stage -> swap -> trainers -> vllm -> verify -> outcome.

Each step does its work and then records the state it reached (journal.advance), so after a SIGKILL the daemon
re-runs the step after the journaled state; every step is idempotent for that reason. Failures are values here:
whatever goes wrong becomes one sentence in `.fork.failed`, and a failure never undoes a swap that happened
(checkpoints/0000 is complete either way; the outcome says which adapter it holds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar import swap
from sidecar.claims.base import ClaimLost, Claims, claim_info, wait_until_settled
from sidecar.claims.filesystem import FilesystemClaims
from sidecar.config import Config
from sidecar.fanout import node_problems, nodes_of_fork
from sidecar.fork_ids import new_fork_id
from sidecar.journal import ForkRecord, Journal, JournalUnwritable
from sidecar.layout import RunDir
from sidecar.marker import FAILED, INPROGRESS, MARKER
from sidecar.owner_worker import OwnerRunIO
from sidecar.protocol.digest import is_digest
from sidecar.protocol.reasons import Reason
from sidecar.protocol.run_layout import CHECKPOINTS, SERVED_STEP
from sidecar.run_io import LocalRunIO, RunIO, RunIOError, owner_of, run_dir_of_record
from sidecar.rundir import OpenRun, RunDirError, lexists_at, open_run
from sidecar.stages import ForkContext, Stage, StageOutcome
from sidecar.states import ForkState

__all__ = ["ForkPipeline"]

log = logging.getLogger("sidecar.pipeline")
_UNCHANGED = "unchanged"  # what disk_digest echoes back when 0000 is still the file staged
# The reasons of a notification stage that is not configured, and of one that raised (a bug).
_NONE_FOUND = {"trainers": Reason.TRAINER_NONE_FOUND, "vllm": Reason.VLLM_NONE_FOUND}
_OTHER = {"trainers": Reason.TRAINER_OTHER, "vllm": Reason.VLLM_OTHER}


@dataclasses.dataclass
class HeldRun:
    """A run as one fork holds it: the directory opened once, and the RunIO doing the fork's work in it."""

    opened: OpenRun
    io: RunIO


class ForkFailed(Exception):
    """Ends a fork as failed with this sentence."""


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


class ForkPipeline:
    def __init__(self, config: Config, journal: Journal, stages: Sequence[Stage], claims: Claims | None = None) -> None:
        self.config = config
        self.journal = journal
        self.stages = list(stages)
        self.host = socket.gethostname()
        self.on_finish: Callable[[ForkRecord], None] | None = None
        # Shared by the pipelines a daemon builds over SIGHUPs, so forks started before a reload keep their lease.
        self.claims = claims if claims is not None else FilesystemClaims(config)
        self.claims.reconfigure(config)

    # --- entry points ---------------------------------------------------------------------------------------
    def process_run(self, run: RunDir, *, settle: bool = False) -> bool:
        """Claim and carry out the fork queued for `run`, if any; returns whether one ran.

        One at a time: a marker written while this fork runs is taken when the watcher reports its close, never
        by looking again right away, which could take a file its writer is still filling. `settle`: the caller
        was not just told of a close, so wait until the marker has been left alone for MARKER_SETTLE_S first.
        """
        if not self.journal.usable():
            # A claim now could be neither journaled nor filed: leave the marker for when the state dir takes writes
            # (the daemon offers this run again then). Logged once by the journal, not once per marker.
            self.journal.wait_for_writes(run.path)
            return False
        if not self.claims.usable():
            # Nobody may claim while the coordination backend cannot be asked: the marker stays where it is and
            # the daemon offers this run again once it answers (logged once by the backend).
            self.claims.wait_for_coordination(run.path)
            return False
        if settle:
            wait_until_settled(run.path / MARKER)
        with self._hold(run, need_marker=True) as held:
            return held is not None and self._take_next(run, held)

    @contextlib.contextmanager
    def _hold(self, run: RunDir, *, need_marker: bool) -> Iterator[HeldRun | None]:
        """Opens the run once and starts its RunIO; None when there is nothing to do or the run cannot be opened."""
        try:
            opened = open_run(run)
        except RunDirError as e:
            log.debug("%s", e)
            yield None
            return
        try:
            # Only a claim: an owner's worker is started only for one we would adopt. This look is the daemon's,
            # at its own record; the claim is read again, as the owner, before anything acts on it.
            if (
                need_marker
                and not lexists_at(opened.fd, MARKER)
                and not self._adoptable(run.path, LocalRunIO(run, opened.fd, frozenset()).claim_state())
            ):
                yield None
                return
            try:
                io = self.io_for(opened)
            except (RunIOError, OSError) as e:
                log.error("%s: not forked: %s", run.path, e)
                yield None
                return
            try:
                yield HeldRun(opened, io)
            finally:
                self.claims.release(run.path / INPROGRESS, io)  # whatever this hold's fork claimed ends here
                io.close()
        finally:
            opened.close()

    def io_for(self, opened: OpenRun) -> RunIO:
        """Who does the fork's work: this process when it is not root or the run is root's, else the owner."""
        me = os.geteuid()
        if me != 0 or opened.uid == me:
            return LocalRunIO(opened.run, opened.fd, frozenset({opened.uid, 0, me}))
        return OwnerRunIO(opened.run, opened.fd, owner_of(opened.uid, opened.gid), float(self.config.timeouts.swap))

    def resume(self, record: ForkRecord) -> None:
        """Finish a fork a previous daemon journaled but did not end, unless another daemon took its claim over."""
        logger = self._logger(record)
        if record.state.terminal:
            # Killed between journaling the end and filing it: the outcome file was written before that state.
            logger.info("fork had ended %s; filing it in the history", record.state)
            self._file_once(record)
            return
        with self._hold(run_dir_of_record(Path(record.model_dir)), need_marker=False) as held:
            if held is None or not _same_run(record, held.opened):
                logger.error("the run directory is gone, moved or replaced since the fork was claimed")
                self._drop_lost_claim(record, None, None)
                return
            info = claim_info(held.io.claim_state())
            if info is None or info.get("fork_id") != record.fork_id:
                self._drop_lost_claim(record, info, held)
                return
            self._write_claim(held, record, str(info.get("marker", "")))
            logger.info("resuming fork from state %s", record.state)
            self._run_steps(record, held)

    def collect_leftovers(self, run: RunDir, known: Callable[[str], bool]) -> None:
        """Removes staging/retired copies of forks for which `known` is false (done as the run's owner)."""
        try:
            opened = open_run(run)
        except RunDirError:
            return
        try:
            # A listing of our own names only: no owner worker is started for the runs that have none.
            found = swap.leftovers(run.checkpoints, run_fd=opened.fd)
        finally:
            opened.close()
        if not found:
            return
        with self._hold(run, need_marker=False) as held:
            if held is None:
                return
            claimed = (claim_info(held.io.claim_state()) or {}).get("fork_id")
            for fork_id in sorted({fork_id for _, fork_id in found}):
                if fork_id == claimed or known(fork_id):
                    continue
                try:
                    done = held.io.settle_leftover(fork_id)
                except RunIOError as e:
                    log.error("leftovers of fork %s: %s", fork_id, e)
                else:
                    log.info("leftovers of fork %s in %s: %s", fork_id, run.checkpoints, done)

    @contextlib.contextmanager
    def hold_files(self, model_dir: Path) -> Iterator[RunIO | None]:
        """The run's files as a fork would handle them (as its owner, through its fd), for a stage's start-up chores.

        No claim is touched: a fork of this run may be under way on another worker."""
        try:
            opened = open_run(run_dir_of_record(model_dir))
        except RunDirError:
            yield None
            return
        try:
            try:
                io = self.io_for(opened)
            except (RunIOError, OSError) as e:
                log.error("%s: %s", model_dir, e)
                yield None
                return
            try:
                yield io
            finally:
                io.close()
        finally:
            opened.close()

    def _drop_lost_claim(self, record: ForkRecord, info: dict[str, Any] | None, held: HeldRun | None) -> None:
        """The claim of a journaled fork is gone or another's: finish the record without acting on the run.

        Either the fork had filed its outcome (killed between removing the claim and journaling the end), or our
        lease ran out while we were down and a daemon on another host adopted the marker, which owns the run now:
        an outcome or a notification from us would overwrite or contradict its own.
        """
        logger = self._logger(record)
        outcome = held.io.read_outcome() if held is not None else None
        if outcome and outcome.get("fork_id") == record.fork_id:
            # Our own outcome: the fork ended, and its record on disk may be older than that (killed before the
            # end was journaled, or the state dir refused the writes that followed). The outcome is the truth.
            logger.info("fork had filed its outcome (%s); filing it in the history", outcome.get("status"))
            _take_outcome(record, outcome)
        else:
            # The run's history is the adopter's: ours ends here, in the log only.
            logger.warning("fork lost its claim (now %s); dropping it", (info or {}).get("claimed_by", "gone"))
            if record.state in (ForkState.CLAIMED, ForkState.STAGED) and held is not None:
                with contextlib.suppress(RunIOError, ValueError, OSError):
                    held.io.settle_leftover(record.fork_id)
            self.journal.forget(record)
            return
        self._file_once(record)

    def _file_once(self, record: ForkRecord) -> None:
        """History line for a fork a previous daemon ended, unless it wrote that line before it died."""
        if self.journal.filed(record.fork_id):
            with contextlib.suppress(OSError):
                self.journal.forget(record)
            return
        self._close(record)

    # --- claiming -----------------------------------------------------------------------------------------------
    def _take_next(self, run: RunDir, held: HeldRun) -> bool:
        # A `.fork` of any kind (directory, FIFO, symlink) is claimed, so that reading it can fail it with an outcome.
        try:
            claimed = self.claims.take(run.path / INPROGRESS, held.io)
        except (RunIOError, OSError) as e:
            log.error("%s: cannot claim the marker: %s", run.path, e)
            return False
        if not claimed:
            return self._adopt_orphan(run, held)
        self._start(run, held, ORIGIN_CLAIM)
        return True

    def _adopt_orphan(self, run: RunDir, held: HeldRun) -> bool:
        """Take over a `.fork.inprogress` whose claimer is gone (timeouts.orphan_claim, the claim record)."""
        claimed = run.path / INPROGRESS
        state = held.io.claim_state()
        if not self._adoptable(run.path, state):
            return False
        info = claim_info(state)
        if not self.claims.adopt(claimed, info):
            return False
        if not _same_claim(state, held.io.claim_state()):
            # Its fork ended (or another daemon's took its place) between our look and our adoption.
            self.claims.give_back(claimed)
            return False
        fork_id = (info or {}).get("fork_id")
        recorded = self.claims.recorded(claimed, fork_id) if isinstance(fork_id, str) else None
        if recorded is not None and info is not None:
            self._resume_adopted(held, ForkRecord.from_json(recorded), info)
            return True
        log.warning("adopting %s: its claimer is gone", claimed)
        if isinstance(fork_id, str):
            # The dead claimer's copies, if any: leave one complete 0000 before our own fork stages anything.
            with contextlib.suppress(RunIOError, ValueError, OSError):
                held.io.settle_leftover(fork_id)
        self._start(run, held, ORIGIN_ORPHAN, claim=info)
        return True

    def _resume_adopted(self, held: HeldRun, record: ForkRecord, info: dict[str, Any]) -> None:
        """Carry on a dead claimer's fork from the state it recorded with the claim (same fork id, same copies)."""
        logger = self._logger(record)
        logger.warning(
            "adopting the fork of %s (claimer gone) from state %s",
            (info.get("claimed_by") or {}).get("host", "another daemon"),
            record.state,
        )
        # The run as this daemon opened it: a shared filesystem's device number differs between hosts.
        record.stages["run"] = {"dev": held.opened.dev, "ino": held.opened.ino, "uid": held.opened.uid}
        try:
            self.journal.create(record)
        except JournalUnwritable as e:  # as in _advance: the fork goes on in memory
            logger.warning("adopted fork not journaled, carrying on: %s", e)
        with self._unless_lost(record):
            self._write_claim(held, record, str(info.get("marker", "")))
            if record.state.terminal:  # the claimer died between journaling its end and filing it
                self._write_outcome(record, record.state.value, held)
                self._close(record)
                return
            self._run_steps(record, held)

    def _adoptable(self, path: Path, state: dict[str, Any] | None) -> bool:
        """Whether the `.fork.inprogress` described by `state` (RunIO.claim_state) has lost its claimer."""
        fork_id = (claim_info(state) or {}).get("fork_id")
        # One of ours that ended without removing its claim (its outcome could not be written) is not forked again.
        ours = bool(fork_id) and (self.journaled(str(fork_id)) or self.journal.filed(str(fork_id)))
        return self.claims.adoptable(path / INPROGRESS, state, journaled=ours)

    @contextlib.contextmanager
    def _unless_lost(self, record: ForkRecord) -> Iterator[None]:
        """Stops the fork quietly when its claim turns out to be another daemon's: that daemon files the outcome."""
        try:
            yield
        except ClaimLost as e:
            self._logger(record).error("fork stopped without an outcome: %s", e)
            with contextlib.suppress(OSError):
                self.journal.forget(record)

    def journaled(self, fork_id: str) -> bool:
        return self.journal.has_record(fork_id)

    def _start(self, run: RunDir, held: HeldRun, origin: str, claim: dict[str, Any] | None = None) -> None:
        model_dir = run.path
        fork_id = new_fork_id()
        started = time.time()
        record = ForkRecord(fork_id, str(model_dir), ForkState.CLAIMED, request={}, started_at=started)
        # Which directory this fork claimed: a restart finds it again by path and must find the same one.
        record.stages["run"] = {"dev": held.opened.dev, "ino": held.opened.ino, "uid": held.opened.uid}
        logger = self._logger(record)
        try:
            embedded = str(claim["marker"]) if claim is not None and "marker" in claim else None
            record.request, raw = held.io.read_request(embedded)
            self._write_claim(held, record, raw)
            record.source = held.io.resolve(record.request, self._roots())
        except RunIOError as e:
            logger.error("fork rejected: %s", e)
            with self._unless_lost(record):
                self._finish_failed(record, str(e), held)
            return
        logger.info("fork claimed (%s): %s -> %s/%s", origin, record.request, run.checkpoints, SERVED_STEP)
        try:
            self.journal.create(record)
        except JournalUnwritable as e:
            logger.error("fork put back, to be taken once the state dir is writable: %s", e)
            self._unclaim(held, raw)
            self.journal.wait_for_writes(model_dir)
            return
        self._run_steps(record, held)

    def _unclaim(self, held: HeldRun, raw: str) -> None:
        """Undo a claim nothing has acted on: the marker is back as its writer wrote it, the claim gone."""
        self.claims.release(held.opened.run.path / INPROGRESS)
        try:
            held.io.unclaim(raw)
        except (RunIOError, OSError) as e:
            log.error("%s: cannot put the marker back (%s)", held.opened.run.path, e)

    def _roots(self) -> list[str]:
        return [str(r) for r in self.config.allowed_source_roots]

    def _write_claim(self, held: HeldRun, record: ForkRecord, raw: str) -> None:
        self.claims.record(held.opened.run.path / INPROGRESS, held.io, record.fork_id, record.request, raw)

    # --- the steps ----------------------------------------------------------------------------------------------
    def _run_steps(self, record: ForkRecord, held: HeldRun) -> None:
        with self._unless_lost(record):
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
                self._logger(record).error("fork failed: %s", e)
                self._finish_failed(record, str(e), held)
            except ClaimLost:
                raise
            except Exception as e:  # a bug must still end the fork with an outcome, never strand the claim
                if record.state.terminal:
                    # The outcome is written and the end recorded: bookkeeping after that must never rewrite it.
                    self._logger(record).exception("after the fork ended %s", record.state)
                    return
                self._logger(record).exception("internal error in state %s", record.state)
                self._finish_failed(record, f"internal error in state {record.state} ({e!r}); see journalctl.", held)

    def _redigest_old(self, record: ForkRecord, held: HeldRun) -> None:
        """A fork journaled by a fork-sidecar with the old digest framing (`sha256:`, one stream): once its copy is
        0000, and only while 0000 is still the file it staged (same inode, size and mtime), digest it again, so that
        no later step compares an old digest with a new one (an agent's, say). Otherwise verify fails the fork, as it
        does for any 0000 replaced after the swap."""
        if record.digest is None or is_digest(record.digest) or record.state in (ForkState.CLAIMED, ForkState.STAGED):
            return
        staged = record.stages.get("swap", {}).get("adapter_fingerprint")
        if staged is None or held.io.disk_digest(staged, _UNCHANGED) != _UNCHANGED:
            return
        served = held.io.served_digest()
        if served is None:
            return
        self._logger(record).info("journaled digest %s is of the old framing; 0000 holds %s", record.digest, served)
        record.digest = served
        try:
            self.journal.save(record)
        except JournalUnwritable as e:  # as in _advance: the record goes on in memory, a restart re-digests again
            self._logger(record).warning("re-digested record not journaled, carrying on: %s", e)

    def _stage(self, record: ForkRecord, held: HeldRun) -> None:
        assert record.source is not None
        started = time.monotonic()
        sources = self.config.sources
        limits = {"max_files": sources.max_files, "max_bytes": sources.max_bytes, "max_depth": sources.max_depth}
        staged = held.io.stage(record.fork_id, record.source, self.config.swap.copy_mode, limits, self._roots())
        record.stages["swap"] = {
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
        self._logger(record, "swap").info(
            "staged %d bytes by %s, digest %s", staged["bytes"], staged["method"], staged["digest"]
        )

    def _swap(self, record: ForkRecord, held: HeldRun) -> None:
        assert record.digest is not None
        started = time.monotonic()
        held.io.install(record.fork_id, record.digest, record.stages.get("swap", {}).get("stage_inode"))
        outcome = record.stages.setdefault("swap", {"status": "ok"})
        outcome["install_seconds"] = round(time.monotonic() - started, 4)
        outcome["seconds"] = round(outcome.get("stage_seconds", 0.0) + outcome["install_seconds"], 4)
        self._advance(record, ForkState.SWAPPED)
        self._logger(record, "swap").info("checkpoints/%s now holds %s", SERVED_STEP, record.digest)

    def _notify(self, record: ForkRecord, held: HeldRun, name: str, reached: ForkState) -> None:
        outcome = self._run_stage(record, held, name)
        record.stages[name] = outcome.to_json()
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
        return self.run_stage(name, ctx, self._logger(record, name))

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
                "failed", error=f"internal error in the {name} stage ({e!r}); see journalctl.", reason=_OTHER.get(name)
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
        on_disk = held.io.disk_digest(record.stages.get("swap", {}).get("adapter_fingerprint"), record.digest)
        problems = []
        if on_disk != record.digest:
            problems.append(
                f"{checkpoints / SERVED_STEP} holds {on_disk}, not the forked {record.digest}; "
                "another writer replaced it — fork again."
            )
        problems += [
            str(s["error"]) for n in ("trainers", "vllm") if (s := record.stages.get(n, {})).get("status") == "failed"
        ]
        gathered = self.claims.gather(Path(record.model_dir) / INPROGRESS, record, self._stage_budget())
        if gathered is not None:
            record.stages["nodes"], record.stages["fanout"] = nodes_of_fork(record, gathered, self.config)
            problems += node_problems(gathered, self.config)
        record.stages["verify"] = {
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
            self._finish_failed(record, record.error, held)
            return
        self._write_outcome(record, "done", held)
        self._advance(record, ForkState.DONE, finished_at=record.finished_at)
        self._logger(record).info("fork done in %.2fs", (record.finished_at or 0) - record.started_at)
        self._close(record)

    def _finish_failed(self, record: ForkRecord, error: str, held: HeldRun) -> None:
        record.error = error
        if record.state in (ForkState.CLAIMED, ForkState.STAGED):
            with contextlib.suppress(RunIOError, OSError):
                held.io.discard_copies(record.fork_id, staged=record.state is ForkState.STAGED)
            record.stages.setdefault("swap", {}).update(self._served_now(record, held))
        try:
            self._write_outcome(record, "failed", held)
        except (RunIOError, OSError) as e:
            # The journal still ends the fork as failed, and its claim left behind is never adopted (_adoptable).
            self._logger(record).error("the outcome could not be written to %s: %s", Path(record.model_dir) / FAILED, e)
        if self.journaled(record.fork_id):
            self._advance(record, ForkState.FAILED, finished_at=record.finished_at)
        else:
            record.state = ForkState.FAILED
        self._close(record)

    def _served_now(self, record: ForkRecord, held: HeldRun) -> dict[str, Any]:
        """After a failure around the swap, say plainly which adapter checkpoints/0000 holds."""
        try:
            served = held.io.served_digest()
        except (RunIOError, OSError):
            served = None
        if served is None:
            return {"status": "failed"}
        return {"status": "failed", "served_digest": served, "served_is_new": served == record.digest}

    def _write_outcome(self, record: ForkRecord, status: str, held: HeldRun) -> None:
        record.finished_at = time.time()
        model_dir = Path(record.model_dir)
        outcome: dict[str, Any] = {
            "status": status,
            "fork_id": record.fork_id,
            "request": record.request,
            "source": record.source,
            "digest": record.digest,
            "swap": record.stages.get("swap", {"status": "skipped"}),
            "trainers": record.stages.get("trainers", {"status": "skipped"}),
            "vllm": record.stages.get("vllm", {"status": "skipped"}),
            "verify": record.stages.get("verify", {"status": "skipped"}),
            "error": record.error,
            "host": self.host,
            "started_at": _iso(record.started_at),
            "finished_at": _iso(record.finished_at),
        }
        if rid := record.request.get("request_id"):
            outcome["request_id"] = rid
        if "nodes" in record.stages:  # several nodes (etcd): each serving node's stages, this one's included
            outcome["nodes"] = record.stages["nodes"]
        self.claims.confirm(model_dir / INPROGRESS)
        self.claims.release(model_dir / INPROGRESS)
        # Through the directory claimed, wherever it is now: a run moved during the fork gets its outcome there.
        held.io.finish(record.fork_id, outcome)

    def _advance(self, record: ForkRecord, state: ForkState, **changes: Any) -> None:
        """journal.advance, except that a state dir refusing the write does not change the fork's course.

        The record goes on in memory: every step is idempotent, so a crash now resumes from the older record
        and re-runs steps, exactly as after a SIGKILL between a step and its journal write; the history line is
        kept until the state dir takes it (Journal.finish).
        """
        try:
            self.journal.advance(record, state, **changes)
        except JournalUnwritable as e:
            self._logger(record).warning("state %s not journaled, carrying on: %s", state, e)
        if not record.state.terminal:  # what another daemon resumes from if this one dies (etcd backend)
            self.claims.progress(Path(record.model_dir) / INPROGRESS, record.to_json())

    def _close(self, record: ForkRecord) -> None:
        if not self.journal.finish(record):
            self._logger(record).error(
                "history line kept back until the state dir %s is writable", self.journal.state_dir
            )
        if self.on_finish is not None:
            self.on_finish(record)

    # --- helpers ------------------------------------------------------------------------------------------------
    def _logger(self, record: ForkRecord, stage: str | None = None) -> logging.LoggerAdapter[logging.Logger]:
        run = "/".join(Path(record.model_dir).parts[-3::2])  # project/model
        extra = {"fork_run": record.model_dir, "fork_id": record.fork_id, "fork_stage": stage or "", "run": run}
        return _ForkLogger(log, extra)


ORIGIN_CLAIM = "marker"
ORIGIN_ORPHAN = "adopted orphan claim"


class _ForkLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes the run and fork id for people; the same values travel as journald fields (FORK_RUN, ...)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[{extra.get('run')} {extra.get('fork_id')}] {msg}", kwargs


def _same_claim(before: dict[str, Any] | None, now: dict[str, Any] | None) -> bool:
    if before is None or now is None:
        return False
    fork_id = (claim_info(before) or {}).get("fork_id")
    if fork_id is not None:
        return bool((claim_info(now) or {}).get("fork_id") == fork_id)
    return claim_info(now) is None and bool(now.get("ctime") == before.get("ctime"))


def _same_run(record: ForkRecord, opened: OpenRun) -> bool:
    expected = record.stages.get("run")
    return not isinstance(expected, dict) or (expected.get("dev"), expected.get("ino")) == (opened.dev, opened.ino)


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


def _take_outcome(record: ForkRecord, outcome: dict[str, Any]) -> None:
    """Bring a stale journal record up to the outcome its fork filed, for the history line."""
    record.state = ForkState.DONE if outcome.get("status") == "done" else ForkState.FAILED
    record.error = outcome.get("error")
    record.digest = outcome.get("digest", record.digest)
    for stage in ("swap", "trainers", "vllm", "verify"):
        if isinstance(outcome.get(stage), dict):
            record.stages[stage] = outcome[stage]
    with contextlib.suppress(TypeError, ValueError):
        record.finished_at = datetime.fromisoformat(str(outcome.get("finished_at"))).timestamp()
