"""Metrics: counted from real fork records, scraped over real HTTP, written as an atomic textfile, from the daemon."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import MetricsConfig, load_config
from sidecar.daemon import build_stages
from sidecar.journal import ForkRecord, Journal
from sidecar.layout import run_dir_of
from sidecar.metrics import REASONS, Metrics, MetricsError, parse_listen, reload_error_reasons
from sidecar.pipeline import ForkPipeline
from sidecar.states import ForkState
from tests.support.adapters import write_adapter
from tests.support.daemon import DaemonProcess, wait_for, wait_outcome, write_config
from tests.support.fake_vllm import FakeVllm
from tests.support.threads import threads_since


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from the text exposition format, parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def record(state: ForkState, sections: dict[str, Any], started: float = 1000.0, took: float = 2.5) -> ForkRecord:
    return ForkRecord(
        "20260101T000000Z-abcdef",
        "/art/p/models/m",
        state,
        {"kind": "latest"},
        started,
        source="/art/p/models/m/checkpoints/0007",
        digest="sha256:00",
        sections=sections,
        finished_at=started + took,
    )


DONE_STAGES: dict[str, object] = {
    "swap": {"status": "ok", "seconds": 0.02},
    "trainers": {"status": "ok", "seconds": 0.3, "agents": [{"pid": 1, "result": "loaded"}, {"pid": 2}]},
    "vllm": {"status": "ok", "seconds": 1.2, "servers": [{"url": "http://127.0.0.1:8000", "error": None}]},
    "verify": {"status": "ok", "seconds": 0.001},
}


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.close()


# --- counting ---------------------------------------------------------------------------------------------------------
def test_fresh_metrics_expose_every_series_at_zero(metrics: Metrics) -> None:
    text = metrics.render().decode()
    assert value(text, "fork_sidecar_forks_total", status="done") == 0
    assert value(text, "fork_sidecar_forks_total", status="failed") == 0
    for stage in ("swap", "trainers", "vllm", "verify", "total"):
        assert value(text, "fork_sidecar_stage_seconds_count", stage=stage) == 0
    for reason in REASONS:
        assert value(text, "fork_sidecar_reload_errors_total", reason=reason) == 0
    for gauge in (
        "watched_runs",
        "pending_forks",
        "last_success_timestamp_seconds",
        "agents_seen",
        "vllm_servers_seen",
    ):
        assert value(text, f"fork_sidecar_{gauge}") == 0


def test_a_done_fork_counts_stages_success_time_and_peers(metrics: Metrics) -> None:
    metrics.observe_fork(record(ForkState.DONE, DONE_STAGES))
    metrics.set_runs(watched=12, pending=3)
    text = metrics.render().decode()
    assert value(text, "fork_sidecar_forks_total", status="done") == 1
    assert value(text, "fork_sidecar_stage_seconds_sum", stage="vllm") == pytest.approx(1.2)
    assert value(text, "fork_sidecar_stage_seconds_bucket", stage="swap", le="0.025") == 1
    assert value(text, "fork_sidecar_stage_seconds_bucket", stage="swap", le="0.01") == 0
    assert value(text, "fork_sidecar_stage_seconds_sum", stage="total") == pytest.approx(2.5)
    assert value(text, "fork_sidecar_last_success_timestamp_seconds") == pytest.approx(1002.5)
    assert value(text, "fork_sidecar_agents_seen") == 2
    assert value(text, "fork_sidecar_vllm_servers_seen") == 1
    assert value(text, "fork_sidecar_watched_runs") == 12
    assert value(text, "fork_sidecar_pending_forks") == 3
    assert sum(v for (n, _), v in samples(text).items() if n == "fork_sidecar_reload_errors_total") == 0


def test_a_failed_fork_counts_one_reason_per_failed_server_and_agent(metrics: Metrics) -> None:
    stages = {
        "swap": {"status": "ok", "seconds": 0.02},
        "trainers": {
            "status": "failed",
            "seconds": 0.5,
            "error": "trainer pid 7 holds sha256:aa but x is sha256:bb; it did not load the forked adapter",
            "agents": [
                {
                    "pid": 7,
                    "error": "trainer pid 7 holds sha256:aa but x is sha256:bb; it did not load the forked adapter",
                    "reason": "trainer_digest_mismatch",
                },
                {"pid": 8, "result": "loaded"},
            ],
        },
        "vllm": {
            "status": "failed",
            "seconds": 0.4,
            "servers": [
                {"url": "http://a", "error": "no runtime LoRA loading", "reason": "vllm_route_missing"},
                {"url": "http://b", "error": "requires an API key", "reason": "vllm_unauthorized"},
                {"url": "http://c", "error": None},
            ],
        },
    }
    metrics.observe_fork(record(ForkState.FAILED, stages))
    text = metrics.render().decode()
    assert value(text, "fork_sidecar_forks_total", status="failed") == 1
    assert value(text, "fork_sidecar_forks_total", status="done") == 0
    assert value(text, "fork_sidecar_last_success_timestamp_seconds") == 0
    for reason in ("vllm_route_missing", "vllm_unauthorized", "trainer_digest_mismatch"):
        assert value(text, "fork_sidecar_reload_errors_total", reason=reason) == 1, reason
    assert value(text, "fork_sidecar_vllm_servers_seen") == 3
    # verify never ran (no seconds): nothing observed for it
    assert value(text, "fork_sidecar_stage_seconds_count", stage="verify") == 0


@pytest.mark.parametrize(
    ("stages", "reasons"),
    [
        ({"vllm": {"status": "failed", "error": "e", "reason": "vllm_snapshot"}}, ["vllm_snapshot"]),
        (
            {"vllm": {"status": "failed", "servers": [{"error": "e", "reason": "vllm_unreachable"}, {"error": None}]}},
            ["vllm_unreachable"],
        ),
        (
            {"trainers": {"status": "failed", "agents": [{"error": "e", "reason": "trainer_timeout"}]}},
            ["trainer_timeout"],
        ),
        # A failure without a reason (written by an older daemon), or one this daemon does not know: that side's other.
        ({"vllm": {"status": "failed", "servers": [{"error": "HTTP 500"}]}}, ["vllm_other"]),
        ({"trainers": {"status": "failed", "error": "e", "reason": "vllm_snapshot"}}, ["trainer_other"]),
        ({"trainers": {"status": "skipped", "error": "none found", "reason": "trainer_none_found"}}, []),
        ({"swap": {"status": "failed"}}, []),
    ],
)
def test_reload_error_reasons_are_read_from_the_outcome(stages: dict[str, object], reasons: list[str]) -> None:
    assert reload_error_reasons(stages) == reasons
    assert set(reasons) <= set(REASONS)


def test_records_from_the_real_pipeline(tmp_path: Path, metrics: Metrics) -> None:
    """Two real forks through ForkPipeline with the real stages: one done, one failed on a vLLM without runtime LoRA."""
    art = tmp_path / "art"
    ok_run, bad_run = art / "p" / "models" / "ok", art / "p" / "models" / "bad"
    for run in (ok_run, bad_run):
        write_adapter(run / "checkpoints" / "0000", seed=0)
        write_adapter(run / "checkpoints" / "0004", seed=4)
    fake = FakeVllm({"bad@0": str(bad_run / "checkpoints" / "0000")}, runtime_lora=False).start()
    try:
        path = tmp_path / "config.yaml"
        data = {
            "watch": {"roots": [str(art)]},
            "state_dir": str(tmp_path / "state"),
            "runtime_dir": str(tmp_path / "run"),
            "vllm": {"discover": False, "servers": [{"url": fake.url, "runs": ["p/bad"]}]},
        }
        path.write_text(yaml.safe_dump(data))
        config = load_config(path)
        journal = Journal(config.state_dir)
        journal.lock()
        pipeline = ForkPipeline(config, journal, build_stages(config))
        pipeline.on_finish = metrics.observe_fork
        for run in (ok_run, bad_run):
            (run / ".fork").write_text("")
            run_dir = run_dir_of(run, config.watch.roots)
            assert run_dir is not None
            assert pipeline.process_run(run_dir) == 1
        journal.unlock()
    finally:
        fake.close()
    text = metrics.render().decode()
    assert value(text, "fork_sidecar_forks_total", status="done") == 1
    assert value(text, "fork_sidecar_forks_total", status="failed") == 1
    assert value(text, "fork_sidecar_reload_errors_total", reason="vllm_route_missing") == 1
    assert value(text, "fork_sidecar_stage_seconds_count", stage="swap") == 2
    assert value(text, "fork_sidecar_stage_seconds_count", stage="total") == 2
    assert value(text, "fork_sidecar_last_success_timestamp_seconds") > 0


# --- HTTP -------------------------------------------------------------------------------------------------------------
def test_scrape_over_http_on_a_free_loopback_port(metrics: Metrics) -> None:
    metrics.observe_fork(record(ForkState.DONE, DONE_STAGES))
    host, port = metrics.serve("127.0.0.1:0")
    assert host == "127.0.0.1" and port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    assert value(text, "fork_sidecar_forks_total", status="done") == 1
    assert "python_gc_objects_collected_total" not in text  # a private registry, not the process-global one


def test_serving_adds_one_thread_and_close_joins_it(metrics: Metrics) -> None:
    before = set(threading.enumerate())
    _, port = metrics.serve("127.0.0.1:0")
    [serving] = threads_since(before)
    for _ in range(3):  # scrapes are answered on that thread, not on new ones
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            r.read()
    assert threads_since(before) == [serving]
    metrics.close()
    assert threads_since(before) == [] and not serving.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.close()  # idempotent


def test_port_in_use_is_one_sentence(metrics: Metrics) -> None:
    other = Metrics()
    try:
        _, port = other.serve("127.0.0.1:0")
        with pytest.raises(MetricsError, match=rf"metrics.listen 127.0.0.1:{port}: cannot listen .*pick a free port"):
            metrics.serve(f"127.0.0.1:{port}")
    finally:
        other.close()


@pytest.mark.parametrize(("listen", "expected"), [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:80", ("::1", 80))])
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9464", "host:", ":9464", "h:99999", "h:x"])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(listen)


# --- textfile ---------------------------------------------------------------------------------------------------------
def test_textfile_content_and_no_leftovers(tmp_path: Path, metrics: Metrics) -> None:
    metrics.observe_fork(record(ForkState.DONE, DONE_STAGES))
    target = tmp_path / "fork_sidecar.prom"
    metrics.write_textfile(target)
    assert value(target.read_text(), "fork_sidecar_forks_total", status="done") == 1
    assert target.stat().st_mode & 0o777 == 0o644
    metrics.observe_fork(record(ForkState.DONE, DONE_STAGES))
    metrics.publish(MetricsConfig(textfile=target))
    assert value(target.read_text(), "fork_sidecar_forks_total", status="done") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["fork_sidecar.prom"]


def test_textfile_is_never_seen_partial(tmp_path: Path, metrics: Metrics) -> None:
    """A reader racing many rewrites always sees one complete exposition (it ends with the last family's lines)."""
    target = tmp_path / "fork_sidecar.prom"
    metrics.write_textfile(target)
    complete = metrics.render()
    stop = threading.Event()
    seen: list[bytes] = []

    def read_loop() -> None:
        while not stop.is_set():
            try:
                seen.append(target.read_bytes())
            except FileNotFoundError:  # would mean the target vanished between renames: never expected
                seen.append(b"MISSING")

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for _ in range(300):
            metrics.write_textfile(target)
    finally:
        stop.set()
        reader.join()
    assert seen
    assert all(data == complete for data in seen), {len(d) for d in seen}


def test_textfile_failure_is_logged_not_raised(
    tmp_path: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "missing-dir" / "fork_sidecar.prom"
    with pytest.raises(FileNotFoundError):
        metrics.write_textfile(target)
    metrics.publish(MetricsConfig(textfile=target))
    metrics.publish(MetricsConfig(textfile=target))
    warnings = [r for r in caplog.records if "metrics.textfile" in r.getMessage()]
    assert len(warnings) == 1  # once per distinct reason, not every status tick
    assert not (tmp_path / "missing-dir").exists()


# --- through the real daemon ------------------------------------------------------------------------------------------
def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return None


@pytest.mark.timeout(120)
def test_daemon_serves_and_writes_metrics(tmp_path: Path) -> None:
    art = tmp_path / "art"
    model_dir = art / "p" / "models" / "m"
    write_adapter(model_dir / "checkpoints" / "0000", seed=0)
    write_adapter(model_dir / "checkpoints" / "0003", seed=3)
    probe = Metrics()  # find a free port: bind, read it, release
    _, port = probe.serve("127.0.0.1:0")
    probe.close()
    textfile = tmp_path / "fork_sidecar.prom"
    config = write_config(
        tmp_path / "config.yaml",
        [art],
        tmp_path / "state",
        tmp_path / "run",
        metrics={"listen": f"127.0.0.1:{port}", "textfile": str(textfile)},
    )
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        # The endpoint is up before READY=1 (sidecar/daemon.py); a scrape that a loaded host answers late is retried.
        wait_for(lambda: _scrape(port), 30, f"an answer on the metrics endpoint 127.0.0.1:{port}")
        # the first scan runs on the watcher's thread: the gauge follows at the next status write
        wait_for(lambda: (t := _scrape(port)) and value(t, "fork_sidecar_watched_runs") == 1, 30, "watched_runs 1")
        (model_dir / ".fork").write_text("step: 3\n")
        assert wait_outcome(model_dir)["status"] == "done"

        def counted() -> str | None:
            t = _scrape(port)
            return t if t and value(t, "fork_sidecar_forks_total", status="done") == 1 else None

        text = wait_for(counted, 20, "the fork to be counted")
        assert value(text, "fork_sidecar_last_success_timestamp_seconds") > time.time() - 120
        wait_for(lambda: textfile.exists(), 30, "the metrics textfile")
        assert ("fork_sidecar_watched_runs", ()) in samples(textfile.read_text())
        assert daemon.proc is not None
        tasks = Path(f"/proc/{daemon.proc.pid}/task")
        # main + watcher + the metrics thread once the fork's worker and housekeeping have exited
        wait_for(lambda: len(list(tasks.iterdir())) <= 4, 20, "an idle daemon of at most 4 threads")
