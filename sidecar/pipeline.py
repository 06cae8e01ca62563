"""One fork, start to finish, as journaled steps: claim -> stage -> swap -> trainers -> vllm -> verify -> outcome.

Each step does its work and then records the state it reached (journal.advance), so after a SIGKILL the daemon
re-runs the step after the journaled state; every step is idempotent for that reason. Failures are values here:
whatever goes wrong becomes one sentence in `.fork.failed`, and a failure never undoes a swap that happened
(checkpoints/0000 is complete either way; the outcome says which adapter it holds).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from sidecar import swap
from sidecar.adapter import AdapterError, adapter_digest
from sidecar.config import Config
from sidecar.journal import ForkRecord, Journal
from sidecar.layout import SERVED_STEP, RunDir
from sidecar.marker import (
    DONE,
    FAILED,
    INPROGRESS,
    MARKER,
    MarkerError,
    claim_marker,
    parse_marker,
    read_json_object,
    read_marker_file,
    remove_quietly,
    write_json_atomic,
    write_outcome,
)
from sidecar.resolve import ResolveError, resolve_source
from sidecar.stages import ForkContext, Stage, StageOutcome
from sidecar.states import ForkState

__all__ = ["ForkPipeline", "new_fork_id"]

log = logging.getLogger("sidecar.pipeline")


class ClaimRegistry:
    """The `.fork.inprogress` files this daemon holds and their content, for heartbeat renewal."""

    def __init__(self) -> None:
        self._claims: dict[Path, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def hold(self, path: Path, info: dict[str, Any]) -> None:
        with self._lock:
            self._claims[path] = info

    def release(self, path: Path) -> None:
        with self._lock:
            self._claims.pop(path, None)

    def items(self) -> list[tuple[Path, dict[str, Any]]]:
        with self._lock:
            return list(self._claims.items())


class ForkFailed(Exception):
    """Ends a fork as failed with this sentence."""


def new_fork_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


class ForkPipeline:
    def __init__(
        self, config: Config, journal: Journal, stages: Sequence[Stage], claims: ClaimRegistry | None = None
    ) -> None:
        self.config = config
        self.journal = journal
        self.stages = list(stages)
        self.host = socket.gethostname()
        self.on_finish: Callable[[ForkRecord], None] | None = None
        # Shared by the pipelines a daemon builds over SIGHUPs, so forks started before a reload keep their lease.
        self.claims = claims if claims is not None else ClaimRegistry()

    # --- entry points ---------------------------------------------------------------------------------------
    def process_run(self, run: RunDir, *, settle: bool = False) -> bool:
        """Claim and carry out the fork queued for `run`, if any; returns whether one ran.

        One at a time: a marker written while this fork runs is taken when the watcher reports its close, never
        by looking again right away, which could take a file its writer is still filling. `settle`: the caller
        was not just told of a close, so wait until the marker has been left alone for MARKER_SETTLE_S first.
        """
        if settle:
            _wait_until_settled(run.path / MARKER)
        return self._take_next(run)

    def resume(self, record: ForkRecord) -> None:
        """Finish a fork a previous daemon journaled but did not end, unless another daemon took its claim over."""
        logger = self._logger(record)
        if record.state.terminal:
            # Killed between journaling the end and filing it: the outcome file was written before that state.
            logger.info("fork had ended %s; filing it in the history", record.state)
            self._close(record)
            return
        model_dir = Path(record.model_dir)
        info = _claim_info(model_dir / INPROGRESS)
        if info is None or info.get("fork_id") != record.fork_id:
            self._drop_lost_claim(record, info)
            return
        self._write_claim(model_dir, record, str(info.get("marker", "")).encode())
        logger.info("resuming fork from state %s", record.state)
        self._run_steps(record)

    def _drop_lost_claim(self, record: ForkRecord, info: dict[str, Any] | None) -> None:
        """The claim of a journaled fork is gone or another's: finish the record without acting on the run.

        Either the fork had filed its outcome (killed between removing the claim and journaling the end), or our
        lease ran out while we were down and a daemon on another host adopted the marker, which owns the run now:
        an outcome or a notification from us would overwrite or contradict its own.
        """
        logger = self._logger(record)
        outcome = read_json_object(Path(record.model_dir) / DONE) or read_json_object(Path(record.model_dir) / FAILED)
        if record.state is ForkState.VERIFIED and outcome and outcome.get("fork_id") == record.fork_id:
            logger.info("fork had filed its outcome; filing it in the history")
        else:
            # The run's history is the adopter's: ours ends here, in the log only.
            logger.warning("fork lost its claim (now %s); dropping it", (info or {}).get("claimed_by", "gone"))
            if record.state in (ForkState.CLAIMED, ForkState.STAGED):
                with contextlib.suppress(swap.SwapError, ValueError, OSError):
                    swap.settle_leftover(self._checkpoints(record), record.fork_id)
            self.journal.forget(record)
            return
        self.journal.finish(record)

    def refresh_heartbeats(self) -> None:
        """Renew the lease of every claim this pipeline holds (called periodically by the daemon's main loop)."""
        for claimed, info in self.claims.items():
            info["heartbeat_at"] = time.time()
            try:
                write_json_atomic(claimed, info)
            except OSError as e:
                log.warning("cannot renew the claim %s: %s", claimed, e)

    # --- claiming -----------------------------------------------------------------------------------------------
    def _take_next(self, run: RunDir) -> bool:
        # A `.fork` of any kind (directory, FIFO, symlink) is claimed, so that reading it can fail it with an outcome.
        if not claim_marker(run.path):
            return self._adopt_orphan(run)
        self._start(run, ORIGIN_CLAIM)
        return True

    def _adopt_orphan(self, run: RunDir) -> bool:
        """Take over a `.fork.inprogress` whose claimer is gone (timeouts.orphan_claim, the claim record)."""
        claimed = run.path / INPROGRESS
        try:
            st = os.lstat(claimed)
        except OSError:
            return False
        info = _claim_info(claimed) if stat.S_ISREG(st.st_mode) else None
        if info is not None:
            if info.get("fork_id") and self.journaled(str(info["fork_id"])):
                return False  # ours, being resumed from the journal
            if not self._claimer_gone(info):
                return False
        elif time.time() - st.st_ctime < self.config.timeouts.orphan_claim:
            # Its claimer may be another host's daemon between its claim (which set the ctime) and its record.
            return False
        log.warning("adopting %s: its claimer is gone", claimed)
        if info is not None and isinstance(info.get("fork_id"), str):
            # The dead claimer's copies, if any: leave one complete 0000 before our own fork stages anything.
            with contextlib.suppress(swap.SwapError, ValueError, OSError):
                swap.settle_leftover(run.checkpoints, info["fork_id"])
        self._start(run, ORIGIN_ORPHAN, claim=info)
        return True

    def journaled(self, fork_id: str) -> bool:
        return (self.journal.forks_dir / f"{fork_id}.json").exists()

    def _claimer_gone(self, info: dict[str, Any]) -> bool:
        claimer = info.get("claimed_by") or {}
        if claimer.get("host") == self.host:
            pid = claimer.get("pid")
            return not (isinstance(pid, int) and pid != os.getpid() and psutil.pid_exists(pid))
        # Another host: only its heartbeat tells. Wall clock, since hosts share no other; keep the lease well above
        # the clock skew between nodes.
        beat = info.get("heartbeat_at")
        return not isinstance(beat, int | float) or time.time() - beat > self.config.timeouts.claim_lease

    def _start(self, run: RunDir, origin: str, claim: dict[str, Any] | None = None) -> None:
        model_dir = run.path
        fork_id = new_fork_id()
        started = time.time()
        record = ForkRecord(fork_id, str(model_dir), ForkState.CLAIMED, request={}, started_at=started)
        logger = self._logger(record)
        try:
            if claim is not None and "marker" in claim:
                raw = str(claim["marker"]).encode()
            else:
                raw = read_marker_file(model_dir / INPROGRESS)
            request = parse_marker(raw, model_dir / MARKER)
            record.request = request.to_json()
            self._write_claim(model_dir, record, raw)
            source = resolve_source(request, run, self.config.allowed_source_roots)
            record.source = str(source)
        except (MarkerError, ResolveError) as e:
            logger.error("fork rejected: %s", e)
            self._finish_failed(record, str(e))
            return
        logger.info("fork claimed (%s): %s -> %s/%s", origin, request.describe(), run.checkpoints, SERVED_STEP)
        self.journal.create(record)
        self._run_steps(record)

    def _write_claim(self, model_dir: Path, record: ForkRecord, raw: bytes) -> None:
        # Host, pid and a heartbeat let another daemon on a shared filesystem tell a live claim from a dead one.
        info = {
            "fork_id": record.fork_id,
            "claimed_by": {"host": self.host, "pid": os.getpid(), "state_dir": str(self.config.state_dir)},
            "heartbeat_at": time.time(),
            "request": record.request,
            "marker": raw.decode("utf-8", errors="replace"),
        }
        write_json_atomic(model_dir / INPROGRESS, info)
        self.claims.hold(model_dir / INPROGRESS, info)

    # --- the steps ----------------------------------------------------------------------------------------------
    def _run_steps(self, record: ForkRecord) -> None:
        steps: dict[ForkState, Callable[[ForkRecord], None]] = {
            ForkState.CLAIMED: self._stage,
            ForkState.STAGED: self._swap,
            ForkState.SWAPPED: lambda r: self._notify(r, "trainers", ForkState.TRAINERS),
            ForkState.TRAINERS: lambda r: self._notify(r, "vllm", ForkState.VLLM),
            ForkState.VLLM: self._verify,
            ForkState.VERIFIED: self._finish_done,
        }
        while not record.state.terminal:
            try:
                steps[record.state](record)
            except ForkFailed as e:
                self._logger(record).error("fork failed: %s", e)
                self._finish_failed(record, str(e))
            except Exception as e:  # a bug must still end the fork with an outcome, never strand the claim
                self._logger(record).exception("internal error in state %s", record.state)
                self._finish_failed(record, f"internal error in state {record.state} ({e!r}); see journalctl.")

    def _stage(self, record: ForkRecord) -> None:
        assert record.source is not None
        started = time.monotonic()
        try:
            staged = swap.stage_checkpoint(
                Path(record.source), self._checkpoints(record), record.fork_id, copy_mode=self.config.swap.copy_mode
            )
        except (swap.SwapError, AdapterError) as e:
            raise ForkFailed(str(e)) from None
        record.stages["swap"] = {
            "status": "ok",
            "method": staged.method,
            "files": list(staged.files),
            "bytes": staged.bytes,
            "stage_seconds": round(time.monotonic() - started, 4),
            # Lets install tell the staged copy from the old 0000 by inode after a crash, without hashing both.
            "stage_inode": staged.inode,
            "adapter_fingerprint": _fingerprint(staged.path / ADAPTER_FILE),
        }
        self.journal.advance(record, ForkState.STAGED, digest=staged.digest)
        self._logger(record, "swap").info(
            "staged %d bytes by %s, digest %s", staged.bytes, staged.method, staged.digest
        )

    def _swap(self, record: ForkRecord) -> None:
        assert record.digest is not None
        started = time.monotonic()
        try:
            swap.install_staged(
                self._checkpoints(record),
                record.fork_id,
                record.digest,
                stage_inode=record.stages.get("swap", {}).get("stage_inode"),
            )
        except (swap.SwapError, AdapterError) as e:
            raise ForkFailed(str(e)) from None
        outcome = record.stages.setdefault("swap", {"status": "ok"})
        outcome["install_seconds"] = round(time.monotonic() - started, 4)
        outcome["seconds"] = round(outcome.get("stage_seconds", 0.0) + outcome["install_seconds"], 4)
        self.journal.advance(record, ForkState.SWAPPED)
        self._logger(record, "swap").info("checkpoints/%s now holds %s", SERVED_STEP, record.digest)

    def _notify(self, record: ForkRecord, name: str, reached: ForkState) -> None:
        outcome = self._run_stage(record, name)
        record.stages[name] = outcome.to_json()
        self.journal.advance(record, reached)

    def _run_stage(self, record: ForkRecord, name: str) -> StageOutcome:
        stage = next((s for s in self.stages if s.name == name), None)
        if stage is None:
            return StageOutcome("skipped", error="none found")
        assert record.digest is not None and record.source is not None
        timeout = float(getattr(self.config.timeouts, name))
        ctx = ForkContext(
            record.fork_id, Path(record.model_dir), Path(record.source), record.digest, time.monotonic() + timeout
        )
        logger = self._logger(record, name)
        started = time.monotonic()
        try:
            outcome = stage.run(ctx)
        except Exception as e:  # a stage bug is a failed stage, not a stranded fork
            logger.exception("%s stage raised", name)
            outcome = StageOutcome("failed", error=f"internal error in the {name} stage ({e!r}); see journalctl.")
        if not outcome.seconds:
            outcome = StageOutcome(outcome.status, time.monotonic() - started, outcome.error, outcome.detail)
        level = logging.ERROR if outcome.status == "failed" else logging.INFO
        why = outcome.error or outcome.detail.get("reason")
        logger.log(level, "%s stage %s%s", name, outcome.status, f": {why}" if why else "")
        return outcome

    def _verify(self, record: ForkRecord) -> None:
        started = time.monotonic()
        checkpoints = self._checkpoints(record)
        served = checkpoints / SERVED_STEP
        if _fingerprint(served / ADAPTER_FILE) == record.stages.get("swap", {}).get("adapter_fingerprint"):
            # Same inode, size and mtime as the file the digest was computed from while staging: nothing has
            # written to it since, so re-hashing (a full read of the adapter) would only repeat that digest.
            on_disk = record.digest
        else:
            try:
                on_disk = adapter_digest(served)
            except (AdapterError, OSError) as e:
                on_disk = f"unreadable ({e})"
        problems = []
        if on_disk != record.digest:
            problems.append(
                f"{checkpoints / SERVED_STEP} holds {on_disk}, not the forked {record.digest}; "
                "another writer replaced it — fork again."
            )
        problems += [
            str(s["error"]) for n in ("trainers", "vllm") if (s := record.stages.get(n, {})).get("status") == "failed"
        ]
        record.stages["verify"] = {
            "status": "failed" if problems else "ok",
            "seconds": round(time.monotonic() - started, 4),
            "disk_digest": on_disk,
        }
        # The retired copy outlived every reload of this fork (vLLM may read from paths until its reload returns).
        swap.discard_retired(checkpoints, record.fork_id)
        self.journal.advance(record, ForkState.VERIFIED, error=problems[0] if problems else None)

    # --- endings ------------------------------------------------------------------------------------------------
    def _finish_done(self, record: ForkRecord) -> None:
        if record.error:
            self._finish_failed(record, record.error)
            return
        self._write_outcome(record, "done")
        self.journal.advance(record, ForkState.DONE, finished_at=record.finished_at)
        self._logger(record).info("fork done in %.2fs", (record.finished_at or 0) - record.started_at)
        self._close(record)

    def _finish_failed(self, record: ForkRecord, error: str) -> None:
        record.error = error
        if record.state in (ForkState.CLAIMED, ForkState.STAGED):
            self._discard_copies(record)
            record.stages.setdefault("swap", {}).update(self._served_now(record))
        self._write_outcome(record, "failed")
        if self.journaled(record.fork_id):
            self.journal.advance(record, ForkState.FAILED, finished_at=record.finished_at)
        else:
            record.state = ForkState.FAILED
        self._close(record)

    def _discard_copies(self, record: ForkRecord) -> None:
        checkpoints = self._checkpoints(record)
        if record.state is ForkState.STAGED:
            try:
                # Install may have got part of the way; this leaves one complete 0000 and nothing else.
                swap.settle_leftover(checkpoints, record.fork_id)
                return
            except (swap.SwapError, OSError):
                pass  # e.g. 0000 is a symlink: settling refuses to touch it, so just drop our copy below
        with contextlib.suppress(swap.SwapError, OSError):
            swap.abort_staged(checkpoints, record.fork_id)

    def _served_now(self, record: ForkRecord) -> dict[str, Any]:
        """After a failure around the swap, say plainly which adapter checkpoints/0000 holds."""
        try:
            held = adapter_digest(self._checkpoints(record) / SERVED_STEP)
        except (AdapterError, OSError):
            return {"status": "failed"}
        return {"status": "failed", "served_digest": held, "served_is_new": held == record.digest}

    def _write_outcome(self, record: ForkRecord, status: str) -> None:
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
        if model_dir.is_dir():
            write_outcome(model_dir, outcome)
        claimed = model_dir / INPROGRESS
        self.claims.release(claimed)
        try:
            remove_quietly(claimed)
        except OSError:  # a non-empty directory named .fork: move it aside rather than delete a user's files
            with contextlib.suppress(OSError):
                os.rename(claimed, model_dir / f".fork.rejected-{record.fork_id}")

    def _close(self, record: ForkRecord) -> None:
        self.journal.finish(record)
        if self.on_finish is not None:
            self.on_finish(record)

    # --- helpers ------------------------------------------------------------------------------------------------
    def _checkpoints(self, record: ForkRecord) -> Path:
        return Path(record.model_dir) / "checkpoints"

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


ADAPTER_FILE = "adapter_model.safetensors"
# How long a marker must have been left alone before a worker that was not told of its close() takes it.
MARKER_SETTLE_S = 0.25


def _wait_until_settled(marker: Path) -> None:
    for _ in range(40):  # bounded: a marker rewritten forever is taken after about 10 s anyway
        try:
            st = os.lstat(marker)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
        age = time.time() - st.st_mtime
        if age >= MARKER_SETTLE_S or age < -1.0:  # a clock step backwards must not stall the run
            return
        time.sleep(MARKER_SETTLE_S - age)


def _fingerprint(path: Path) -> list[int] | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _claim_info(path: Path) -> dict[str, Any] | None:
    data = read_json_object(path)
    return data if data is not None and "claimed_by" in data else None
