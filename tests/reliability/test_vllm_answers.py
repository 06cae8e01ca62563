"""What vLLM servers answer, and when, through the real daemon (issue 17, items 1-4 and 7).

Promises: `.fork.done` means every server serving the run holds the fork, so an answer the daemon cannot read from a
configured server is a failed stage naming the URL and what came back (never "none found"); every HTTP exchange ends
by the stage deadline whatever the peer does, and bodies are bounded; servers proceed independently and the outcome
blames exactly the one that failed; a load that may still be running is never POSTed again, and its snapshot is
kept while it may still land.

The servers are tests/support/fake_vllm.py: real HTTP servers on loopback, misbehaving on demand; the daemon is the
real `fork-sidecar run` process.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.support import Fleet, Settled, make_run, settled, silent_server, tree_digest
from tests.support.daemon import wait_for
from tests.support.fake_vllm import LOAD, FakeVllm
from tests.support.vllm_stage import fakes

__all__ = ["fakes"]  # the fixture of tests/support/vllm_stage.py, found by pytest under this name

pytestmark = pytest.mark.timeout(90)


def serve(fakes: list[FakeVllm], model_dir: Path, **knobs: Any) -> FakeVllm:
    """A server started with --lora-modules m=<run>/checkpoints/0000, with faults."""
    fake = FakeVllm({model_dir.name: str((model_dir / "checkpoints" / "0000").resolve())}, **knobs).start()
    fakes.append(fake)
    return fake


def overrides(*urls: str, stage_s: float, request_s: float = 5.0) -> dict[str, Any]:
    return {
        "vllm": {"discover": False, "servers": [{"url": u} for u in urls], "request_timeout": f"{request_s}s"},
        "timeouts": {"vllm": f"{stage_s}s"},
    }


def fork(fleet: Fleet, model_dir: Path, within: float = 30, write: bool = True) -> dict[str, Any]:
    """The outcome of a fork of step 3 (its marker written here unless `write` is False), removed once read."""
    if write:
        (model_dir / ".fork").write_text("step: 3\n")
    view: Settled = wait_for(
        lambda: (v := settled(model_dir, [fleet.state_dir(0)])).outcome and not v.markers and not v.journal and v,
        within,
        "the fork's outcome",
    )
    assert view.outcome is not None
    (model_dir / ".fork.done").unlink(missing_ok=True)
    (model_dir / ".fork.failed").unlink(missing_ok=True)
    return view.outcome


# --- item 1: answers that cannot be read -----------------------------------------------------------------------
TRUNCATED = b'{"object": "list", "data": [{"id": "m", "object": "model", "root": "/x/checkpoints/00'
HTML = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ((200, "application/json", TRUNCATED), "not JSON"),
        ((200, "text/html", HTML), "an HTML page"),
    ],
    ids=["truncated-json", "html"],
)
def test_an_unreadable_model_list_fails_the_stage_naming_the_server(
    tmp_path: Path, fakes: list[FakeVllm], answer: tuple[int, str, bytes], said: str
) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    server = serve(fakes, model_dir, models_answer=answer)
    with Fleet(tmp_path, [art], overrides=overrides(server.url, stage_s=3)) as fleet:
        fleet.start(0)
        outcome = fork(fleet, model_dir)
    vllm = outcome["vllm"]
    assert outcome["status"] == "failed" and vllm["status"] == "failed", outcome
    assert server.url in outcome["error"] and said in outcome["error"], outcome["error"]
    assert "none found" not in json.dumps(vllm)
    assert len(server.calls("/v1/models")) == 1  # not retried: a 200 with garbage is not a passing hiccup


def test_a_configured_server_listing_a_relative_root_fails_the_stage(tmp_path: Path, fakes: list[FakeVllm]) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    fake = FakeVllm({"m": "p/models/m/checkpoints/0000"}).start()  # started in art/ with a relative --lora-modules
    fakes.append(fake)
    with Fleet(tmp_path, [art], overrides=overrides(fake.url, stage_s=3)) as fleet:
        fleet.start(0)
        outcome = fork(fleet, model_dir)
    assert outcome["status"] == "failed" and outcome["vllm"]["status"] == "failed", outcome
    assert fake.url in outcome["error"] and "relative root 'p/models/m/checkpoints/0000'" in outcome["error"]


# --- item 2: deadlines and bounds ------------------------------------------------------------------------------
def test_a_drip_fed_answer_ends_at_the_stage_deadline(tmp_path: Path, fakes: list[FakeVllm]) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    server = serve(fakes, model_dir, drip_s=0.5)  # a 200-byte listing would take 100 s
    with Fleet(tmp_path, [art], overrides=overrides(server.url, stage_s=2, request_s=30)) as fleet:
        fleet.start(0)
        started = time.monotonic()
        outcome = fork(fleet, model_dir)
        took = time.monotonic() - started
    assert outcome["status"] == "failed" and server.url in outcome["error"], outcome
    assert "timed out" in outcome["error"]
    assert outcome["vllm"]["seconds"] <= 2.0 + 1.5, outcome["vllm"]
    assert took < 10, took


def test_a_huge_model_list_is_not_read(tmp_path: Path, fakes: list[FakeVllm]) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    body = b'{"object": "list", "data": [], "padding": "' + b"x" * (100 * 1024 * 1024) + b'"}'
    server = serve(fakes, model_dir, models_answer=(200, "application/json", body))
    with Fleet(tmp_path, [art], overrides=overrides(server.url, stage_s=10)) as fleet:
        daemon = fleet.start(0)
        outcome = fork(fleet, model_dir, within=60)
        assert daemon.proc is not None
        peak_kib = peak_rss_kib(daemon.proc.pid)
    assert outcome["status"] == "failed" and server.url in outcome["error"], outcome
    assert "over 8 MiB" in outcome["error"], outcome["error"]
    assert peak_kib < 120 * 1024, peak_kib  # the daemon idles at about 30 MB; 100 MB read would show


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# --- item 3: one hung server ---------------------------------------------------------------------------------------
def test_a_hung_server_does_not_starve_or_get_the_healthy_one_blamed(tmp_path: Path, fakes: list[FakeVllm]) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    healthy = serve(fakes, model_dir, load_delay_s=0.3)  # a real load takes a moment
    with silent_server() as hung, Fleet(tmp_path, [art], overrides=overrides(hung, healthy.url, stage_s=4)) as fleet:
        fleet.start(0)
        (model_dir / ".fork").write_text("step: 3\n")
        # Reloaded at once, not after the hung one's timeout: its load lands while the hung server still holds the
        # fork in its stage (until the 4 s deadline), checked as that order of events rather than by a stopwatch.
        wait_for(lambda: healthy.applied, 30, "the healthy server's load")
        in_flight = settled(model_dir, [fleet.state_dir(0)])
        assert in_flight.outcome is None and ".fork.inprogress" in in_flight.markers, "reloaded only after the fork"
        outcome = fork(fleet, model_dir, write=False)
    vllm = outcome["vllm"]
    assert outcome["status"] == "failed", outcome
    by_url = {s["url"]: s for s in vllm["servers"]}
    assert by_url[healthy.url]["error"] is None and by_url[healthy.url]["method"] == "inplace", by_url
    assert by_url[hung]["error"] is not None and hung in by_url[hung]["error"]
    assert hung in outcome["error"] and healthy.url not in outcome["error"], outcome["error"]
    assert healthy.adapters[model_dir.name].endswith(vllm["snapshot"])


# --- items 4 and 7: slow loads -------------------------------------------------------------------------------------
def test_a_slow_load_is_posted_once_and_seen_landing(tmp_path: Path, fakes: list[FakeVllm]) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    server = serve(fakes, model_dir, load_delay_s=2.5)
    with Fleet(tmp_path, [art], overrides=overrides(server.url, stage_s=8, request_s=0.5)) as fleet:
        fleet.start(0)
        outcome = fork(fleet, model_dir)
    assert outcome["status"] == "done", outcome
    assert len(server.arrived(LOAD)) == 1, server.arrived(LOAD)  # never sent again while the first was running
    (report,) = outcome["vllm"]["servers"]
    assert report["error"] is None and report["method"] == "inplace", report
    assert server.adapters[model_dir.name].endswith(outcome["vllm"]["snapshot"])


def test_a_load_landing_after_its_stage_never_reads_a_removed_snapshot(tmp_path: Path, fakes: list[FakeVllm]) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    server = serve(fakes, model_dir, load_delay_s=4.0)
    with Fleet(tmp_path, [art], overrides=overrides(server.url, stage_s=3, request_s=0.5)) as fleet:
        fleet.start(0)
        first = fork(fleet, model_dir)
        assert first["status"] == "failed", first
        assert "may still apply it" in first["error"] and server.url in first["error"], first["error"]
        snapshot_a = model_dir / "checkpoints" / first["vllm"]["snapshot"]
        assert snapshot_a.is_dir() and first["vllm"]["kept"] == [snapshot_a.name], first["vllm"]
        second = fork(fleet, model_dir)  # right after: its load waits behind the first, as vLLM's per-name lock does
        wait_for(lambda: len(server.applied) >= 2, 10, "both loads applied")
    assert len(server.arrived(LOAD)) == 2, server.arrived(LOAD)
    # Each load found its snapshot when the server applied it, and the server ends on the newest fork.
    assert [(Path(path).name, existed) for _, path, existed in server.applied][:1] == [(snapshot_a.name, True)]
    assert all(existed for *_, existed in server.applied), server.applied
    assert second["status"] == "done", second
    assert server.adapters[model_dir.name].endswith(second["vllm"]["snapshot"])
    assert Path(server.adapters[model_dir.name]).is_dir() and not snapshot_a.exists()
    assert tree_digest(Path(server.adapters[model_dir.name])) == tree_digest(model_dir / "checkpoints" / "0003")


# --- item 7: a server down keeps snapshots, and says so ----------------------------------------------------------
def test_snapshots_kept_for_a_server_that_is_down_are_logged_once_counted_and_named_by_doctor(
    tmp_path: Path, fakes: list[FakeVllm]
) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    healthy = serve(fakes, model_dir)
    with socket.socket() as s:  # a port nobody listens on: a server that is down
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    textfile = tmp_path / "metrics.prom"
    settings = overrides(healthy.url, down, stage_s=2)
    settings["metrics"] = {"textfile": str(textfile)}
    with Fleet(tmp_path, [art], overrides=settings) as fleet:
        daemon = fleet.start(0)
        outcomes = [fork(fleet, model_dir) for _ in range(3)]
        log = daemon.log()
        config = fleet.config(0)
    # The newest snapshot is the healthy server's root; every older one is kept for the server that is down.
    assert [len(o["vllm"].get("kept", [])) for o in outcomes] == [0, 1, 2], [o["vllm"] for o in outcomes]
    assert all(down in o["error"] and healthy.url not in o["error"] for o in outcomes)
    warnings = [line for line in log.splitlines() if "WARNING" in line and "keeping" in line]
    assert len(warnings) == 1 and down in warnings[0], warnings
    assert "fork_sidecar_snapshots_kept 2.0" in textfile.read_text()
    doctor = subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    findings = json.loads(doctor.stdout)["findings"]
    kept = [f for f in findings if f["check"] == "vllm" and "snapshot" in f["message"]]
    assert len(kept) == 1 and down in kept[0]["message"] and "3 vLLM fork snapshot(s) on disk" in kept[0]["message"], (
        kept
    )
