"""The daemon: wiring, per-run serialization, signals, systemd notification and shutdown.

Threads: the main loop (signals, watchdog pings, status), the watcher's one thread, and fork workers from a fixed
pool (`forks.workers`, sidecar.scheduler), started on demand and gone when idle; an idle daemon is two threads
whatever the number of runs. Forks of different runs run in parallel, fairly between run owners (at most
`forks.per_owner` workers each); forks of one run never overlap, because a run has at most one worker and a marker
arriving while it works is queued behind it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from sidecar import __version__
from sidecar.agent_dirs import AgentDirs
from sidecar.claims import claims_for
from sidecar.config import Config, ConfigError, load_config
from sidecar.early_signals import sighup_held
from sidecar.fanout import tell_this_node
from sidecar.journal import ForkRecord, Journal
from sidecar.layout import RunDir, iter_run_dirs, run_dir_of
from sidecar.logs import setup_logging
from sidecar.marker import INPROGRESS
from sidecar.metrics import Metrics, MetricsError
from sidecar.pipeline import ForkPipeline
from sidecar.run_io import RunIO
from sidecar.rundir import RunDirError, open_run
from sidecar.scheduler import FairQueue
from sidecar.sdnotify import Notifier
from sidecar.stages import Stage
from sidecar.watch import MarkerWatcher

__all__ = ["Daemon", "build_stages"]

log = logging.getLogger("sidecar.daemon")

STATUS_EVERY_S = 10.0
# Agent directories are made as soon as the set of run owners changes; all of them are looked at again this often
# (one lstat per owner, not per run: a directory cleaned away is made again).
AGENT_DIRS_EVERY_S = 60.0
# A claim held by another live daemon is looked at again this often (by its claimer's heartbeat file, or one etcd read).
# The main loop wakes after every fork pass, so without this a daemon re-read a foreign claim in a loop for as long
# as that fork ran: about 110 etcd reads a second per daemon, most of the calls etcd served during a 3-node fork.
ORPHAN_OFFER_EVERY_S = 1.0


def build_stages(config: Config) -> list[Stage]:
    from sidecar.trainers import TrainerStage
    from sidecar.vllm.stage import VllmStage

    return [TrainerStage(config), VllmStage(config)]


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.journal = Journal(config.state_dir)
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.reload_requested = False
        self.pipeline = ForkPipeline(config, self.journal, build_stages(config), claims_for(config))
        # Forks other nodes publish are told to this node's agents and servers by the pipeline of the moment.
        self.pipeline.claims.on_published = lambda published: tell_this_node(self.pipeline, published)
        self.watcher: MarkerWatcher | None = None
        self._lock = threading.Lock()
        self._queue = FairQueue(config.forks.workers, config.forks.per_owner, self._work)
        self._resumes: dict[Path, list[ForkRecord]] = {}
        # Runs with a `.fork.inprogress` (the watcher reports each one it sees, by event and in every scan; start-up
        # housekeeping adds those already there): re-offered every ORPHAN_OFFER_EVERY_S until adopted or gone (each
        # with the monotonic time it was last offered). No periodic walk over every run: at 10,000 runs that walk cost
        # 1.5-1.9 % of a core, idle.
        self._orphans: dict[Path, float] = {}
        self._started_at = time.time()
        self._counts = {"done": 0, "failed": 0}
        self._last_status = 0.0
        self._last_heartbeat = time.monotonic()
        self._coordination_seen: tuple[object, ...] = ()
        self.agent_dirs = AgentDirs(config.runtime_dir)
        self._agent_dirs_seen: tuple[frozenset[int] | None, float] = (None, 0.0)  # owners and time of the last look

    # --- life cycle -----------------------------------------------------------------------------------------
    def run(self) -> int:
        self.agent_dirs.prepare()
        self.metrics.start(self.config.metrics)  # MetricsError is a ConfigError: exit 2 before taking the lock
        self.journal.lock()
        self._install_signals()
        unfinished = list(self.journal.unfinished())
        for record in unfinished:
            self._resumes.setdefault(Path(record.model_dir), []).append(record)
        self.pipeline.on_finish = self._count
        self.watcher = self._make_watcher(self.config)
        for model_dir in list(self._resumes):
            self._submit(model_dir)
        self.watcher.start()  # the first scan submits every marker already present
        self._keep_agent_dirs()  # before READY: trainers started after it find their directory
        summary = self._summary()
        log.info("fork-sidecar %s ready: %s", __version__, summary)
        self.notifier.ready(summary)
        # Start-up chores that need a walk over every run happen after READY, on a thread that then exits.
        threading.Thread(target=self._housekeeping, args=(unfinished,), name="housekeeping", daemon=True).start()
        self._write_status()
        try:
            self._main_loop()
        finally:
            self.notifier.stopping()
            log.info("stopping: waiting for %d active fork(s) to reach a journaled state", len(self._queue.active()))
            self.watcher.stop()
            self.pipeline.claims.stopping()  # a fork waiting on etcd must not hold the stop up for 10 s
            self._queue.stop(timeout=10.0)
            self._write_status(stopped=True)
            self.pipeline.claims.close()
            self.metrics.close()
            self.journal.unlock()
        return 0

    def _main_loop(self) -> None:
        interval = self.notifier.watchdog_interval()
        tick = min(interval, 1.0) if interval else 1.0
        while not self.stop_event.is_set():
            self.wake.wait(tick)
            self.wake.clear()
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            if self.watcher is not None and not self.watcher.alive():
                # No pings without a working watcher: systemd's watchdog then restarts us, which rescans.
                log.error("the watcher thread died; withholding watchdog pings so systemd restarts the daemon")
                continue
            if interval:
                self.notifier.watchdog()
            self._offer_orphans()
            self._retry_state_dir()
            self._retry_coordination()
            if time.monotonic() - self._last_heartbeat > self.config.timeouts.claim_lease / 4:
                self._last_heartbeat = time.monotonic()
                self.pipeline.claims.renew()
            if time.monotonic() - self._last_status > STATUS_EVERY_S:
                self._write_status()
            self._keep_agent_dirs()

    def _keep_agent_dirs(self) -> None:
        """Each run owner's agent directory (sidecar/agent_dirs.py): at once for a new owner, all again every minute."""
        assert self.watcher is not None
        owners, at = self.watcher.owners(), time.monotonic()
        every = at - self._agent_dirs_seen[1] >= AGENT_DIRS_EVERY_S
        if owners != self._agent_dirs_seen[0] or every:
            self._agent_dirs_seen = (owners, at if every else self._agent_dirs_seen[1])
            self.agent_dirs.keep(owners)

    def _install_signals(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            self.stop_event.set()
            self.wake.set()

        def hup(signum: int, frame: FrameType | None) -> None:
            self.reload_requested = True
            self.wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)
        if sighup_held():  # sent while the daemon was still starting (sidecar/early_signals.py)
            hup(signal.SIGHUP, None)

    def _reload(self) -> None:
        """SIGHUP: re-read the config; queued and running forks carry on with the pipeline they started with."""
        self.notifier.reloading()
        path = self.config.source_file
        try:
            new = load_config(path)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: %s", e)
            self.notifier.ready(f"reload failed: {e}")
            return
        if new.state_dir != self.config.state_dir:
            log.warning("state_dir changed in %s; that takes effect only after a restart", path)
            new = _with_state_dir(new, self.config.state_dir)
        if (new.node, new.coordination) != (self.config.node, self.config.coordination):
            # A daemon changing its name or its etcd under running claims would strand them.
            log.warning("node / coordination changed in %s; that takes effect only after a restart", path)
            new = dataclasses.replace(new, node=self.config.node, coordination=self.config.coordination)
        setup_logging(new.log.level, new.log.format)
        old = self.config
        if new.metrics.listen != old.metrics.listen:
            self.metrics.close()
            try:
                self.metrics.start(new.metrics)
            except MetricsError as e:
                log.error("metrics endpoint not reopened: %s", e)
        if new.runtime_dir != old.runtime_dir:
            self.agent_dirs = AgentDirs(new.runtime_dir)
            self._agent_dirs_seen = (None, 0.0)
            self.agent_dirs.prepare()
        self.config = new
        self._queue.configure(new.forks.workers, new.forks.per_owner)
        self.pipeline = self._new_pipeline(new)
        assert self.watcher is not None
        if (new.watch.mode, new.watch.poll_interval, new.watch.rescan_interval) != (
            old.watch.mode,
            old.watch.poll_interval,
            old.watch.rescan_interval,
        ):
            self.watcher.stop()
            self.watcher = self._make_watcher(new)
            self.watcher.start()
        else:
            self.watcher.set_roots(list(new.watch.roots))
        summary = self._summary()
        log.info("configuration reloaded from %s: %s", path, summary)
        self.notifier.ready(summary)
        self._write_status()

    def _new_pipeline(self, config: Config) -> ForkPipeline:
        pipeline = ForkPipeline(config, self.journal, build_stages(config), self.pipeline.claims)
        pipeline.on_finish = self._count
        return pipeline

    def _make_watcher(self, config: Config) -> MarkerWatcher:
        return MarkerWatcher(
            list(config.watch.roots),
            self._marker_written,
            mode=config.watch.mode,
            poll_interval=config.watch.poll_interval,
            rescan_interval=config.watch.rescan_interval,
            on_claim=self._note_claim,
        )

    # --- scheduling -----------------------------------------------------------------------------------------
    def _submit(self, model_dir: Path, *, written: bool = False) -> None:
        """Queue the run under its owner, or have its worker look again after (FairQueue.submit)."""
        self._queue.submit(model_dir, _owner_for_fairness(model_dir), written=written)

    def _marker_written(self, model_dir: Path) -> None:
        """The watcher's report: reports come once a marker's writer is done with it (sidecar/watch/)."""
        self._submit(model_dir, written=True)

    def _work(self, model_dir: Path, settle: bool) -> None:
        pipeline = self.pipeline
        try:
            for record in self._resumes.pop(model_dir, []):
                pipeline.resume(record)
            run = run_dir_of(model_dir, tuple(self.config.watch.roots))
            if run is not None:
                # Taken again after a pass: nobody has just seen the marker closed, so let a writer finish.
                pipeline.process_run(run, settle=settle)
        except Exception:  # keep the daemon alive; the journal lets a restart finish the fork
            log.exception("unexpected error while processing %s", model_dir)
        self.wake.set()

    def _note_claim(self, model_dir: Path) -> None:
        """A `.fork.inprogress` the watcher saw: ours, or a claim whose claimer may die (another daemon's, or one
        left by a crash), which `_offer_orphans` then offers until it is adopted or gone."""
        with self._lock:
            self._orphans.setdefault(model_dir, 0.0)  # seen again by an event: its next offer stays where it was

    def _offer_orphans(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [path for path, offered in self._orphans.items() if now - offered >= ORPHAN_OFFER_EVERY_S]
        for model_dir in due:
            if not os.path.lexists(model_dir / INPROGRESS):
                with self._lock:
                    self._orphans.pop(model_dir, None)
            elif not self._queue.has(model_dir):
                with self._lock:
                    self._orphans[model_dir] = now
                self._submit(model_dir)

    def _retry_state_dir(self) -> None:
        """While the state dir refuses writes: file the history lines kept back and offer the runs left waiting
        once a probe write passes (at most one probe a second, whatever the number of markers)."""
        journal = self.journal
        if not (journal.problem or journal.waiting_runs or journal.unfiled_count()):
            return
        if not journal.usable():
            return
        journal.file_unfiled()
        for model_dir in journal.take_waiting():
            self._submit(model_dir)
        self._write_status()

    def _retry_coordination(self) -> None:
        """Offer again the runs whose marker waited while the coordination backend could not be asked."""
        waiting = self.pipeline.claims.take_waiting()
        for model_dir in waiting:
            self._submit(model_dir)
        claims = self.pipeline.claims.describe()
        seen = (claims["up"], claims.get("problem"), claims.get("members"), claims.get("waiting"))
        if waiting or seen != self._coordination_seen:
            self._coordination_seen = seen
            self._write_status()

    def _count(self, record: ForkRecord) -> None:
        key = "done" if record.state.value == "done" else "failed"
        with self._lock:
            self._counts[key] += 1
        self.metrics.observe_fork(record)
        self.metrics.publish(self.config.metrics)
        self.wake.set()

    # --- start-up housekeeping ------------------------------------------------------------------------------
    def _housekeeping(self, unfinished: list[ForkRecord]) -> None:
        try:
            runs = [run for root in self.config.watch.roots for run in iter_run_dirs(root)]
            resumed = {Path(r.model_dir) for r in unfinished}
            self._collect_leftovers(runs)
            orphans = {r.path for r in runs if r.path not in resumed and os.path.lexists(r.path / INPROGRESS)}
            with self._lock:
                for model_dir in orphans:
                    self._orphans.setdefault(model_dir, 0.0)
            for stage in self.pipeline.stages:
                stage.on_start([r.path for r in runs], self._hold_idle_run)
        except Exception:  # chores must never take the daemon down
            log.exception("start-up housekeeping failed; forks are unaffected")
        self.wake.set()

    @contextlib.contextmanager
    def _hold_idle_run(self, model_dir: Path) -> Iterator[RunIO | None]:
        """A run's files for a start-up chore, only while no worker forks that run: a fork under way (the first
        scan's markers start before housekeeping ends) has a `.partial` snapshot or one no server lists yet, which
        the chore would take for a leftover. None for a busy run: its snapshots are kept until the next start."""
        owner = _owner_for_fairness(model_dir)
        if not self._queue.reserve(model_dir, owner):
            yield None
            return
        try:
            with self.pipeline.hold_files(model_dir) as files:
                yield files
        finally:
            self._queue.release(model_dir)

    def _collect_leftovers(self, runs: Sequence[RunDir]) -> None:
        """Remove staging/retired copies of forks that no journal and no claim knows (a crash before the journal),
        and temp files of atomic writes whose writer died (`..fork.done.tmp-<pid>-<hex>` and the like)."""
        for run in runs:
            _remove_dead_temp_files(run)
            # Checked now, not at start: a fork claimed since then is journaled before it stages anything.
            self.pipeline.collect_leftovers(run, self.pipeline.journaled)

    # --- status ---------------------------------------------------------------------------------------------
    def _summary(self) -> str:
        assert self.watcher is not None
        active = len(self._queue.active())
        with self._lock:
            done, failed = self._counts["done"], self._counts["failed"]
        return (
            f"watching {self.watcher.run_count()} runs ({self.watcher.backend}), "
            f"{active} forking, {done} done, {failed} failed"
        )

    def _write_status(self, *, stopped: bool = False) -> None:
        self._last_status = time.monotonic()
        assert self.watcher is not None
        active = [str(p) for p in self._queue.active()]
        queued = [str(p) for p in self._queue.queued()]
        status: dict[str, Any] = {
            "pid": os.getpid(),
            "version": __version__,
            "running": not stopped,
            "started_at": self._started_at,
            "config": str(self.config.source_file) if self.config.source_file else None,
            "roots": [str(r) for r in self.config.watch.roots],
            "backend": self.watcher.backend,
            "watched_runs": self.watcher.run_count(),
            "active_runs": active,
            "queued_runs": queued,
            "counts": dict(self._counts),
            # Why no fork is being claimed, while the state dir is full or read-only (then this file is stale, and
            # systemctl status, the log and fork_sidecar_state_dir_writable say it).
            "state_dir_problem": self.journal.problem,
            "waiting_for_state_dir": sorted(str(p) for p in self.journal.waiting_runs),
            # With etcd: whether it answers, and why not (then no marker is claimed; they wait where they are).
            "coordination": self.pipeline.claims.describe(),
        }
        self.metrics.set_runs(watched=status["watched_runs"], pending=len(active) + len(queued))
        self.metrics.set_state_dir(writable=self.journal.problem is None, waiting=len(self.journal.waiting_runs))
        self.metrics.set_coordination(status["coordination"])
        self.metrics.publish(self.config.metrics)
        try:
            self.journal.write_status(status)
        except OSError as e:
            log.warning("cannot write %s/status.json: %s", self.config.state_dir, e)
        if not stopped:
            problem = f"; {self.journal.problem}" if self.journal.problem else ""
            if coordination_problem := status["coordination"].get("problem"):
                problem += f"; etcd: {coordination_problem}"
            self.notifier.status(self._summary() + problem)


_TEMP_FILE = re.compile(r"^\.\.fork(?:\.[a-z]+)?\.tmp-(\d+)-[0-9a-f]{6}$")


def _owner_for_fairness(model_dir: Path) -> int:
    """Whose turn a run takes in the worker queue; the fork itself acts as the owner of the directory it opens."""
    try:
        return os.lstat(model_dir).st_uid
    except OSError:
        return -1


def _remove_dead_temp_files(run: RunDir) -> None:
    """Our own temp names only, through the run opened without following symlinks (see sidecar.rundir)."""
    try:
        opened = open_run(run)
    except RunDirError:
        return
    try:
        for name in os.listdir(opened.fd):
            match = _TEMP_FILE.match(name)
            if match and not psutil.pid_exists(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=opened.fd)
    except OSError:
        pass
    finally:
        opened.close()


def _with_state_dir(config: Config, state_dir: Path) -> Config:
    return dataclasses.replace(config, state_dir=state_dir)
