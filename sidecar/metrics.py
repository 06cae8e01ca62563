"""Prometheus metrics: counted from finished forks, exposed over HTTP and/or as a node_exporter textfile.

Everything lives in a private `CollectorRegistry`, so nothing of the process-global registry (Python GC, process
collectors) is exposed and tests can build as many `Metrics` as they like. The HTTP endpoint is a plain
`http.server.HTTPServer` on one thread, answering one scrape at a time: the idle daemon stays at main + watcher +
this thread, and a scrape is a few kilobytes rendered from memory. The textfile is written to a hidden temporary
name in the same directory, fsynced and renamed over the target, so node_exporter (which reads `*.prom` only)
never sees a partial file.

Names (all prefixed `fork_sidecar_`):
  forks_total{status}                   finished forks, status = done | failed
  stage_seconds{stage}                  histogram of time per stage: swap, trainers, vllm, verify, total
  watched_runs                          run directories the watcher tracks
  pending_forks                         runs with a fork claimed or queued
  last_success_timestamp_seconds        wall clock of the newest fork that ended done
  agents_seen                           trainer agents told about the newest finished fork
  vllm_servers_seen                     vLLM servers asked to reload for the newest finished fork
  reload_errors_total{reason}           per failed agent or server, by the reason it carries (protocol/reasons.py)
  snapshots_kept                        vLLM fork snapshots kept although no answering server lists them (a server
                                        did not answer, or a load of them may still be running), over all runs
  state_dir_writable                    1, or 0 while the state dir refuses writes (no fork is claimed then)
  forks_waiting_for_state_dir           runs whose marker waits for the state dir
  coordination_up{backend}              1 while claims can be taken (etcd answers); 0 while markers wait for it
  markers_waiting_for_coordination      runs whose marker waits for etcd
  cluster_members                       daemons registered in etcd (under their leases), this one included
  lease_keepalive_failures_total        etcd lease keepalives that got no answer
  nodes_reported                        histogram: nodes whose stage results a fanned-out fork had (claimer included)
  nodes_missing_total{node}             forks a node served but did not report on (lease expired, timed out)
  fanout_seconds                        histogram: from publishing a fork to the last node's report
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping
from http.server import HTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler, generate_latest

from sidecar.config import ConfigError, MetricsConfig
from sidecar.journal import ForkRecord
from sidecar.protocol.atomic_write import write_atomic
from sidecar.protocol.reasons import TRAINER_REASONS, VLLM_REASONS, Reason

__all__ = ["REASONS", "STAGES", "Metrics", "MetricsError", "parse_listen", "reload_error_reasons"]

log = logging.getLogger("sidecar.metrics")

STAGES = ("swap", "trainers", "vllm", "verify", "total")
# Seconds: a swap of a small adapter is milliseconds, a reflink-less copy of a large one or a slow vLLM reload minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_SCRAPE_TIMEOUT_S = 10.0

# Every reason an agent or a server can fail with (sidecar/protocol/reasons.py), in a stable order.
REASONS = (*VLLM_REASONS, *TRAINER_REASONS)


class MetricsError(ConfigError):
    """The metrics endpoint cannot be opened, as one sentence naming metrics.listen and the fix.

    A ConfigError, so `fork-sidecar run` exits 2 with it like any other configuration problem."""


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port); raises ValueError for anything else."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9464, got {listen!r}")
    return host.strip("[]"), int(port)


def reload_error_reasons(stages: Mapping[str, Any]) -> list[str]:
    """One reason per agent or server that failed in a record's `trainers` and `vllm` stages (pure).

    Read from the `reason` each stage set where the failure was known; a failure without a known one (a record
    written by an older daemon) counts as that side's `_other`."""
    return [
        *_failed(stages.get("vllm"), "servers", VLLM_REASONS, Reason.VLLM_OTHER),
        *_failed(stages.get("trainers"), "agents", TRAINER_REASONS, Reason.TRAINER_OTHER),
    ]


def _failed(stage: Any, peers: str, known: tuple[Reason, ...], other: Reason) -> list[str]:
    if not isinstance(stage, Mapping) or stage.get("status") != "failed":
        return []
    failed = [p for p in stage.get(peers) or [] if isinstance(p, Mapping) and p.get("error")]
    if not failed and stage.get("error"):
        failed = [stage]  # a stage-level failure: no snapshot, or none found where one is required
    return [str(p["reason"]) if p.get("reason") in known else str(other) for p in failed]


class _QuietHTTPServer(HTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scraper that hangs up mid-answer is not worth a traceback on the daemon's stderr.
        log.debug("metrics scrape from %s failed", client_address, exc_info=True)


class Metrics:
    """The daemon's metrics. Thread-safe: forks finish on worker threads, gauges are set from the main loop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.forks = Counter("fork_sidecar_forks", "Finished forks by outcome.", ["status"], registry=r)
        self.stage_seconds = Histogram(
            "fork_sidecar_stage_seconds",
            "Time a fork spent in each stage (total: claim to outcome).",
            ["stage"],
            buckets=BUCKETS,
            registry=r,
        )
        self.watched_runs = Gauge("fork_sidecar_watched_runs", "Run directories being watched.", registry=r)
        self.pending_forks = Gauge("fork_sidecar_pending_forks", "Runs with a fork claimed or queued.", registry=r)
        self.last_success = Gauge(
            "fork_sidecar_last_success_timestamp_seconds",
            "Unix time at which the newest successful fork finished (0: none since start).",
            registry=r,
        )
        self.agents_seen = Gauge(
            "fork_sidecar_agents_seen", "Trainer agents told about the newest finished fork.", registry=r
        )
        self.vllm_servers_seen = Gauge(
            "fork_sidecar_vllm_servers_seen", "vLLM servers asked to reload for the newest finished fork.", registry=r
        )
        self.reload_errors = Counter(
            "fork_sidecar_reload_errors",
            "Trainer agents or vLLM servers that failed a fork, by reason.",
            ["reason"],
            registry=r,
        )
        self.snapshots_kept = Gauge(
            "fork_sidecar_snapshots_kept",
            "vLLM fork snapshots kept although no answering server lists them, after each run's newest fork.",
            registry=r,
        )
        self._kept_by_run: dict[str, int] = {}
        self.state_dir_writable = Gauge(
            "fork_sidecar_state_dir_writable",
            "1 while the state dir takes writes; 0 while it is full or read-only and no fork is claimed.",
            registry=r,
        )
        self.state_dir_writable.set(1)
        self.waiting_for_state_dir = Gauge(
            "fork_sidecar_forks_waiting_for_state_dir", "Runs whose marker waits for the state dir.", registry=r
        )
        self.coordination_up = Gauge(
            "fork_sidecar_coordination_up",
            "1 while claims can be taken; 0 while the coordination backend (etcd) cannot be reached.",
            ["backend"],
            registry=r,
        )
        self.waiting_for_coordination = Gauge(
            "fork_sidecar_markers_waiting_for_coordination", "Runs whose marker waits for etcd.", registry=r
        )
        self.cluster_members = Gauge(
            "fork_sidecar_cluster_members", "Daemons registered in etcd under a live lease.", registry=r
        )
        self.keepalive_failures = Counter(
            "fork_sidecar_lease_keepalive_failures", "etcd lease keepalives that got no answer.", registry=r
        )
        self._keepalive_failures_seen = 0
        self.nodes_reported = Histogram(
            "fork_sidecar_nodes_reported",
            "Nodes that reported their stage results, per fork fanned out.",
            buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=r,
        )
        self.nodes_missing = Counter(
            "fork_sidecar_nodes_missing", "Forks a serving node did not report on, by node.", ["node"], registry=r
        )
        self.fanout_seconds = Histogram(
            "fork_sidecar_fanout_seconds",
            "From publishing a fork to the last node's report.",
            buckets=BUCKETS,
            registry=r,
        )
        # Every label value exists from the start, so rate() and absent() behave before the first fork.
        for status in ("done", "failed"):
            self.forks.labels(status)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for reason in REASONS:
            self.reload_errors.labels(reason)
        self._server: HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._textfile_error: str | None = None

    # --- feeding ---------------------------------------------------------------------------------------------------
    def observe_fork(self, record: ForkRecord) -> None:
        """Count one finished fork (the pipeline's on_finish)."""
        done = record.state.value == "done"
        self.forks.labels("done" if done else "failed").inc()
        for stage in STAGES[:-1]:
            seconds = (record.sections.get(stage) or {}).get("seconds")
            if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                self.stage_seconds.labels(stage).observe(max(0.0, float(seconds)))
        if record.finished_at is not None:
            self.stage_seconds.labels("total").observe(max(0.0, record.finished_at - record.started_at))
            if done:
                self.last_success.set(record.finished_at)
        trainers = record.sections.get("trainers") or {}
        vllm = record.sections.get("vllm") or {}
        self.agents_seen.set(len(trainers.get("agents") or []))
        self.vllm_servers_seen.set(len(vllm.get("servers") or []))
        fanout = record.sections.get("fanout")
        if isinstance(fanout, dict):
            self.nodes_reported.observe(int(fanout.get("reported") or 0))
            if isinstance(fanout.get("seconds"), int | float):
                self.fanout_seconds.observe(max(0.0, float(fanout["seconds"])))
            for node in fanout.get("missing") or []:
                self.nodes_missing.labels(str(node)).inc()
        for reason in reload_error_reasons(record.sections):
            self.reload_errors.labels(reason).inc()
        self._kept_by_run[record.model_dir] = len(vllm.get("kept") or [])
        self.snapshots_kept.set(sum(self._kept_by_run.values()))

    def set_runs(self, *, watched: int, pending: int) -> None:
        self.watched_runs.set(watched)
        self.pending_forks.set(pending)

    def set_state_dir(self, *, writable: bool, waiting: int) -> None:
        self.state_dir_writable.set(1 if writable else 0)
        self.waiting_for_state_dir.set(waiting)

    def set_coordination(self, described: Mapping[str, Any]) -> None:
        """From Claims.describe(): up, waiting markers, members, keepalive failures (a running count)."""
        self.coordination_up.labels(str(described.get("backend", "filesystem"))).set(1 if described.get("up") else 0)
        self.waiting_for_coordination.set(int(described.get("waiting", 0)))
        self.cluster_members.set(int(described.get("members", 1)))
        failures = int(described.get("lease_keepalive_failures", 0))
        if failures > self._keepalive_failures_seen:
            self.keepalive_failures.inc(failures - self._keepalive_failures_seen)
            self._keepalive_failures_seen = failures

    def render(self) -> bytes:
        """The text exposition format, as a scrape gets it."""
        return generate_latest(self.registry)

    # --- publishing ------------------------------------------------------------------------------------------------
    def start(self, config: MetricsConfig) -> None:
        """Open the HTTP endpoint if `metrics.listen` is set; raises MetricsError. The textfile needs no start."""
        if config.listen:
            host, port = self.serve(config.listen)
            log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve /metrics on `HOST:PORT` (port 0 picks one) on one thread; returns the bound (host, port)."""
        if self._server is not None:
            raise MetricsError("the metrics endpoint is already being served")
        try:
            host, port = parse_listen(listen)
        except ValueError as e:
            raise MetricsError(f"metrics.listen: {e}; fix that key.") from None
        server_cls = type("_Server", (_QuietHTTPServer,), {"address_family": _family(host)})
        # A client that connects and says nothing must not hold the one thread: socketserver applies `timeout`.
        handler = type("_Handler", (MetricsHandler.factory(self.registry),), {"timeout": _SCRAPE_TIMEOUT_S})
        try:
            server = server_cls((host, port), handler)
        except OSError as e:
            raise MetricsError(
                f"metrics.listen {listen}: cannot listen ({e.strerror or e}); pick a free port or an address of this "
                "host, or remove metrics.listen."
            ) from None
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.5,), name="metrics", daemon=True)
        self._thread.start()
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def write_textfile(self, path: Path) -> None:
        """Write the exposition to `path` atomically (node_exporter never reads half a file); raises OSError."""
        write_atomic(Path(path), self.render(), mode=0o644)

    def publish(self, config: MetricsConfig) -> None:
        """Write `metrics.textfile` if set; a failure is logged (once per distinct reason), never raised."""
        if config.textfile is None:
            return
        try:
            self.write_textfile(config.textfile)
        except OSError as e:
            reason = f"{config.textfile}: {e.strerror or e}"
            if reason != self._textfile_error:
                log.warning("cannot write metrics.textfile %s; check that its directory exists and is writable", reason)
            self._textfile_error = reason
        else:
            self._textfile_error = None

    def close(self) -> None:
        """Stop the HTTP endpoint and join its thread (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5.0)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
