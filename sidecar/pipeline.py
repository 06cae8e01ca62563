"""One fork as this daemon comes to it: hold the run, take (or adopt, or resume) its claim, then hand it over.

Whether this daemon may act on a run at all is decided here: a `.fork` claimed, a `.fork.inprogress` whose claimer
is gone adopted (from the state it recorded, with the etcd backend), a journaled fork resumed after a restart, or a
claim found to be another daemon's dropped without touching the run. What the fork then does, step by journaled
step up to its outcome file, is sidecar/fork_steps.py's (ForkSteps, which this pipeline owns).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sidecar import swap
from sidecar.claims.base import ClaimLost, Claims, claim_info, wait_until_settled
from sidecar.claims.filesystem import FilesystemClaims
from sidecar.config import Config
from sidecar.fanout import STAGE_NAMES
from sidecar.fork_ids import new_fork_id
from sidecar.fork_steps import ForkSteps, HeldRun, fork_logger
from sidecar.journal import ForkRecord, Journal, JournalUnwritable
from sidecar.layout import RunDir
from sidecar.marker import INPROGRESS, MARKER
from sidecar.owner_worker import OwnerRunIO
from sidecar.protocol.run_layout import SERVED_STEP
from sidecar.run_io import LocalRunIO, RunIO, RunIOError, owner_of, run_dir_of_record
from sidecar.rundir import OpenRun, RunDirError, lexists_at, open_run
from sidecar.stages import Stage
from sidecar.states import ForkState

__all__ = ["ForkPipeline"]

log = logging.getLogger("sidecar.pipeline")


class ForkPipeline:
    def __init__(self, config: Config, journal: Journal, stages: Sequence[Stage], claims: Claims | None = None) -> None:
        self.config = config
        self.journal = journal
        # Shared by the pipelines a daemon builds over SIGHUPs, so forks started before a reload keep their lease.
        self.claims = claims if claims is not None else FilesystemClaims(config)
        self.claims.reconfigure(config)
        self.steps = ForkSteps(config, journal, stages, self.claims)
        self.stages = self.steps.stages

    @property
    def on_finish(self) -> Callable[[ForkRecord], None] | None:
        """Called with every fork's record once its history line is filed (or kept back)."""
        return self.steps.on_finish

    @on_finish.setter
    def on_finish(self, hook: Callable[[ForkRecord], None] | None) -> None:
        self.steps.on_finish = hook

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
        logger = fork_logger(record)
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
            if not self.claims.reclaim(held.opened.run.path / INPROGRESS):  # adopted by another node meanwhile
                self._drop_lost_claim(record, info, held)
                return
            with self.steps.unless_lost(record):
                self._write_claim(held, record, str(info.get("marker", "")))
                logger.info("resuming fork from state %s", record.state)
                self.steps.run(record, held)

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
        logger = fork_logger(record)
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
        self.steps.close(record)

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
        logger = fork_logger(record)
        logger.warning(
            "adopting the fork of %s (claimer gone) from state %s",
            (info.get("claimed_by") or {}).get("host", "another daemon"),
            record.state,
        )
        # The run as this daemon opened it: a shared filesystem's device number differs between hosts.
        record.sections["run"] = {"dev": held.opened.dev, "ino": held.opened.ino, "uid": held.opened.uid}
        if record.state in (ForkState.TRAINERS, ForkState.VLLM, ForkState.VERIFIED):
            # Its trainers / vllm sections are what the dead claimer's node did: this node runs its own stages (both
            # idempotent) and verifies itself; the claimer's node counts by the report it left, or as missing
            # (Claims.gather). Daemons record only up to SWAPPED (fork_steps.ADOPTERS_RESUME_FROM); the later states
            # come from older versions.
            record.state = ForkState.SWAPPED
            for name in STAGE_NAMES:
                record.sections.pop(name, None)
        try:
            self.journal.create(record)
        except JournalUnwritable as e:  # as in _advance: the fork goes on in memory
            logger.warning("adopted fork not journaled, carrying on: %s", e)
        with self.steps.unless_lost(record):
            self._write_claim(held, record, str(info.get("marker", "")))
            if record.state.terminal:  # the claimer died between journaling its end and filing it
                self.steps.write_outcome(record, record.state.value, held)
                self.steps.close(record)
                return
            self.steps.run(record, held)

    def _adoptable(self, path: Path, state: dict[str, Any] | None) -> bool:
        """Whether the `.fork.inprogress` described by `state` (RunIO.claim_state) has lost its claimer."""
        fork_id = (claim_info(state) or {}).get("fork_id")
        # One of ours that ended without removing its claim (its outcome could not be written) is not forked again.
        ours = bool(fork_id) and (self.journaled(str(fork_id)) or self.journal.filed(str(fork_id)))
        return self.claims.adoptable(path / INPROGRESS, state, journaled=ours)

    def journaled(self, fork_id: str) -> bool:
        return self.journal.has_record(fork_id)

    def _start(self, run: RunDir, held: HeldRun, origin: str, claim: dict[str, Any] | None = None) -> None:
        model_dir = run.path
        fork_id = new_fork_id()
        started = time.time()
        record = ForkRecord(fork_id, str(model_dir), ForkState.CLAIMED, request={}, started_at=started)
        # Which directory this fork claimed: a restart finds it again by path and must find the same one.
        record.sections["run"] = {"dev": held.opened.dev, "ino": held.opened.ino, "uid": held.opened.uid}
        logger = fork_logger(record)
        try:
            embedded = str(claim["marker"]) if claim is not None and "marker" in claim else None
            record.request, raw = held.io.read_request(embedded)
            self._write_claim(held, record, raw)
            record.source = held.io.resolve(record.request, self.steps.roots())
        except RunIOError as e:
            logger.error("fork rejected: %s", e)
            with self.steps.unless_lost(record):
                self.steps.fail(record, str(e), held)
            return
        except ClaimLost as e:  # our lease expired between the take and the claim record: the claim is not ours
            logger.error("fork stopped before it began: %s", e)
            return
        logger.info("fork claimed (%s): %s -> %s/%s", origin, record.request, run.checkpoints, SERVED_STEP)
        try:
            self.journal.create(record)
        except JournalUnwritable as e:
            logger.error("fork put back, to be taken once the state dir is writable: %s", e)
            self._unclaim(held, raw)
            self.journal.wait_for_writes(model_dir)
            return
        self.steps.run(record, held)

    def _unclaim(self, held: HeldRun, raw: str) -> None:
        """Undo a claim nothing has acted on: the marker is back as its writer wrote it, the claim gone."""
        try:
            held.io.unclaim(raw)
        except (RunIOError, OSError) as e:
            log.error("%s: cannot put the marker back (%s)", held.opened.run.path, e)
        # After the marker is back: released first, another node would adopt the .fork.inprogress still there.
        self.claims.release(held.opened.run.path / INPROGRESS)

    def _write_claim(self, held: HeldRun, record: ForkRecord, raw: str) -> None:
        self.claims.record(held.opened.run.path / INPROGRESS, held.io, record.fork_id, record.request, raw)


ORIGIN_CLAIM = "marker"
ORIGIN_ORPHAN = "adopted orphan claim"


def _same_claim(before: dict[str, Any] | None, now: dict[str, Any] | None) -> bool:
    if before is None or now is None:
        return False
    fork_id = (claim_info(before) or {}).get("fork_id")
    if fork_id is not None:
        return bool((claim_info(now) or {}).get("fork_id") == fork_id)
    return claim_info(now) is None and bool(now.get("ctime") == before.get("ctime"))


def _same_run(record: ForkRecord, opened: OpenRun) -> bool:
    expected = record.sections.get("run")
    return not isinstance(expected, dict) or (expected.get("dev"), expected.get("ino")) == (opened.dev, opened.ino)


def _take_outcome(record: ForkRecord, outcome: dict[str, Any]) -> None:
    """Bring a stale journal record up to the outcome its fork filed, for the history line."""
    record.state = ForkState.DONE if outcome.get("status") == "done" else ForkState.FAILED
    record.error = outcome.get("error")
    record.digest = outcome.get("digest", record.digest)
    for stage in ("swap", "trainers", "vllm", "verify"):
        if isinstance(outcome.get(stage), dict):
            record.sections[stage] = outcome[stage]
    with contextlib.suppress(TypeError, ValueError):
        record.finished_at = datetime.fromisoformat(str(outcome.get("finished_at"))).timestamp()
