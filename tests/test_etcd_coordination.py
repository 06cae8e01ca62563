"""Several daemons coordinated through a real etcd: distinct node names, state and runtime dirs, one shared root.

Claims (exactly once, by an etcd transaction), takeover when a claimer dies (its lease expires, the next daemon
resumes from the state recorded with the claim) and what happens while etcd cannot be reached (markers wait,
daemons say so, every waiting fork completes once it is back).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("etcd3gw")  # before the etcd backend's modules, which import it

from sidecar.claims.base import ClaimLost
from sidecar.claims.etcd import EtcdClaims
from sidecar.config import load_config
from sidecar.fanout import served
from sidecar.layout import run_dir_of
from sidecar.marker import INPROGRESS, MARKER
from sidecar.run_io import LocalRunIO
from sidecar.rundir import open_run
from tests.reliability.support import HeldVllmStage
from tests.support.adapters import write_adapter, write_big_adapter
from tests.support.crash import held_at, hold_env
from tests.support.daemon import read_outcome, wait_for, wait_outcome
from tests.support.etcd_nodes import Node, etcd_claims, prom, settled_history, start_all
from tests.support.etcd_server import EtcdServer
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(240)]


@pytest.fixture
def nodes(tmp_path: Path, art: Path, etcd_server: EtcdServer) -> Iterator[list[Node]]:
    made = [Node(tmp_path / "nodes", f"node-{i}", art) for i in range(3)]
    for node in made:
        node.configure(etcd_server.endpoints)
    yield made
    for node in made:
        with contextlib.suppress(AssertionError):
            node.daemon.__exit__()


def make_run(art: Path, model: str, steps: tuple[int, ...] = (3,)) -> Path:
    model_dir = art / "p" / "models" / model
    write_adapter(model_dir / "checkpoints" / "0000", seed=0)
    for step in steps:
        write_adapter(model_dir / "checkpoints" / f"{step:04d}", seed=step)
    return model_dir


def test_three_daemons_fork_each_marker_exactly_once(nodes: list[Node], art: Path) -> None:
    runs = [make_run(art, f"m{i}") for i in range(9)]
    for node in nodes:
        node.daemon.start()
    wait_for(lambda: all(n.status().get("coordination", {}).get("members") == 3 for n in nodes), 20, "3 members")
    for model_dir in runs:
        (model_dir / ".fork").write_text("step: 3")
    for model_dir in runs:
        assert wait_outcome(model_dir)["status"] == "done"
    forked = sorted(line["model_dir"] for line in settled_history(nodes, len(runs)))
    assert forked == sorted(str(r) for r in runs)
    prom = (nodes[0].dir / "metrics.prom").read_text()
    assert 'fork_sidecar_coordination_up{backend="etcd"} 1.0' in prom
    assert "fork_sidecar_cluster_members 3.0" in prom


def _start_a_long_fork(nodes: list[Node], art: Path, model: str) -> Path:
    """Every daemon started and a fork of a 256 MiB adapter asked for: long enough to fault it mid-way."""
    model_dir = make_run(art, model, steps=())
    write_big_adapter(model_dir / "checkpoints" / "0009", 256 * 1024 * 1024)
    start_all(nodes)
    (model_dir / ".fork").write_text("step: 9")
    return model_dir


def _start_a_held_fork(nodes: list[Node], art: Path, model: str, state: str) -> tuple[Path, Path]:
    """As _start_a_long_fork, every daemon's forks pausing right after journaling `state` until the gate returned
    exists (tests/support/crash.py): the fault lands there however fast the host runs the fork."""
    gate = nodes[0].dir.parent / f"{model}-gate"
    for node in nodes:
        node.daemon.env = hold_env(state, gate)
    return _start_a_long_fork(nodes, art, model), gate


def _claimer(nodes: list[Node]) -> Node:
    return wait_for(lambda: next((n for n in nodes if n.journaled()), None), 30, "a node to journal the fork")


def test_a_claimer_killed_mid_fork_is_resumed_by_another_node_from_its_recorded_state(
    nodes: list[Node], art: Path, etcd_server: EtcdServer
) -> None:
    # What an adopter resumes from is the record in etcd, written just after the journal's: held once "trainers" is
    # journaled, etcd holds "swapped" and the claimer cannot have gone on to verify and file the outcome.
    model_dir, gate = _start_a_held_fork(nodes, art, "big", "trainers")
    wait_for(held_at(gate).exists, 60, "the claimer's fork held after its trainers stage")
    claimer = _claimer(nodes)
    record = _swapped_record(claimer)
    assert record is not None and _swapped_in_etcd(etcd_server, model_dir, record["fork_id"])
    claimer.daemon.kill()  # SIGKILL after the swap: the others must resume (same fork id), not fork again
    gate.touch()  # the adopter's fork goes through
    outcome = wait_outcome(model_dir, timeout=60)
    assert outcome["status"] == "done", outcome
    assert outcome["fork_id"] == record["fork_id"]
    survivors = [n for n in nodes if n is not claimer]
    lines = settled_history(survivors, 1)
    assert [line["fork_id"] for line in lines] == [record["fork_id"]]
    adopter = next(n for n in survivors if n.history())
    log = adopter.daemon.log_path.read_text()  # whole: log() keeps only the end
    assert re.search(r"adopting the fork of .* from state (swapped|trainers|vllm)", log), log[-3000:]


def _swapped_in_etcd(etcd_server: EtcdServer, model_dir: Path, fork_id: str) -> bool:
    raw = etcd_server.get(f"/fork-sidecar/progress{model_dir}")
    progress = json.loads(raw) if raw else {}
    return progress.get("fork_id") == fork_id and progress.get("state") in ("swapped", "trainers", "vllm")


def _swapped_record(node: Node) -> dict[str, Any] | None:
    for path in node.journaled():
        with contextlib.suppress(FileNotFoundError, ValueError):
            data = json.loads(path.read_text())
            if data.get("state") in ("swapped", "trainers", "vllm"):
                return dict(data)
    return None


def test_while_etcd_is_down_markers_wait_and_each_forks_once_when_it_is_back(
    nodes: list[Node], art: Path, etcd_server: EtcdServer
) -> None:
    runs = [make_run(art, f"w{i}") for i in range(4)]
    for node in nodes:
        node.daemon.start()
    wait_for(lambda: all(n.status().get("coordination", {}).get("up") for n in nodes), 20, "coordination up")
    etcd_server.kill()
    wait_for(lambda: all(n.status().get("coordination", {}).get("up") is False for n in nodes), 20, "down noticed")
    for model_dir in runs:
        (model_dir / ".fork").write_text("step: 3")
    time.sleep(3.0)  # several lease TTLs: nothing may be claimed meanwhile
    assert all((r / ".fork").exists() and not (r / ".fork.inprogress").exists() for r in runs)
    assert all(read_outcome(r) is None for r in runs)
    status = nodes[0].status()
    assert status["running"] and status["coordination"]["problem"]
    assert wait_for(lambda: "fork_sidecar_markers_waiting_for_coordination 4.0" in prom(nodes), 20, "the gauge")
    assert 'fork_sidecar_coordination_up{backend="etcd"} 0.0' in (nodes[0].dir / "metrics.prom").read_text()
    assert "etcd unreachable" in nodes[0].daemon.log_path.read_text()
    etcd_server.restart()
    for model_dir in runs:
        assert wait_outcome(model_dir, timeout=60)["status"] == "done"
    assert sorted(line["model_dir"] for line in settled_history(nodes, len(runs))) == sorted(str(r) for r in runs)


def test_etcd_killed_and_restarted_mid_fork_ends_the_fork_once(
    nodes: list[Node], art: Path, etcd_server: EtcdServer
) -> None:
    model_dir, gate = _start_a_held_fork(nodes, art, "mid", "swapped")
    wait_for(held_at(gate).exists, 60, "the claimer's fork held after its swap")
    etcd_server.kill()
    gate.touch()  # the fork goes on into the etcd that is gone: its progress, publish and checks wait for it
    time.sleep(3.0)  # past the lease TTL: nobody can take the claim over while etcd is down
    etcd_server.restart()
    outcome = wait_outcome(model_dir, timeout=90)
    assert outcome["status"] == "done", outcome
    assert [line["fork_id"] for line in settled_history(nodes, 1)] == [outcome["fork_id"]]


def test_a_member_frozen_past_its_lease_loses_the_claim_and_files_nothing(nodes: list[Node], art: Path) -> None:
    model_dir, gate = _start_a_held_fork(nodes, art, "frozen", "swapped")
    wait_for(held_at(gate).exists, 60, "the claimer's fork held after its swap")
    claimer = _claimer(nodes)
    claimer.daemon.signal(signal.SIGSTOP)
    gate.touch()  # seen by the frozen claimer only once thawed; the adopter's fork goes through
    try:
        outcome = wait_outcome(model_dir, timeout=60)  # another node adopts once the frozen one's lease expires
    finally:
        claimer.daemon.signal(signal.SIGCONT)
    assert outcome["status"] == "done", outcome
    wait_for(
        lambda: "fork stopped without an outcome" in claimer.daemon.log_path.read_text(),
        30,
        "the thawed claimer to stop",
    )
    assert claimer.history() == []
    assert [line["fork_id"] for line in settled_history(nodes, 1)] == [outcome["fork_id"]]
    assert read_outcome(model_dir) == outcome  # the thawed claimer did not overwrite it


def test_a_claim_held_by_a_live_daemon_is_looked_at_about_once_a_second_not_in_a_loop(
    nodes: list[Node], art: Path, etcd_server: EtcdServer
) -> None:
    # The other daemons re-offered the claimed run after every pass, and each pass read its claim key: about 110 etcd
    # reads a second each, for as long as the fork ran (held here at its swap, so it runs as long as the test says).
    gate = nodes[0].dir.parent / "looked-gate"
    for node in nodes:
        node.daemon.env = hold_env("swapped", gate)
    model_dir = make_run(art, "looked")
    start_all(nodes)
    (model_dir / MARKER).write_text("step: 3")
    wait_for(held_at(gate).exists, 60, "the claimer's fork held after its swap")
    time.sleep(1.0)  # past the first looks each other daemon takes when it sees the claim appear
    before, started = etcd_server.served("Range"), time.monotonic()
    time.sleep(3.0)
    reads, seconds = etcd_server.served("Range") - before, time.monotonic() - started
    gate.touch()
    assert wait_outcome(model_dir)["status"] == "done"
    # Per daemon and second: one look at the claim, one fan-out read (LISTEN_POLL_S), the keeper's member list every
    # lease_ttl/3; 5 allows for a slow host's catch-up.
    assert reads <= 5 * len(nodes) * seconds, f"{reads} etcd reads in {seconds:.1f}s while one fork was held"


def test_a_restarted_member_rejoins_and_claims_again(nodes: list[Node], art: Path) -> None:
    for node in nodes:
        node.daemon.start()
    wait_for(lambda: nodes[0].status().get("coordination", {}).get("members") == 3, 20, "3 members")
    nodes[1].daemon.stop()
    wait_for(lambda: nodes[0].status().get("coordination", {}).get("members") == 2, 20, "the member to leave")
    nodes[1].daemon.start()
    wait_for(lambda: nodes[0].status().get("coordination", {}).get("members") == 3, 20, "the member to rejoin")
    runs = [make_run(art, f"r{i}") for i in range(6)]
    for model_dir in runs:
        (model_dir / ".fork").write_text("step: 3")
    for model_dir in runs:
        assert wait_outcome(model_dir)["status"] == "done"
    assert sorted(line["model_dir"] for line in settled_history(nodes, len(runs))) == sorted(str(r) for r in runs)


def test_etcd_refusing_the_credentials_leaves_markers_waiting_and_says_why(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    auth = etcd_server.enable_auth()
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    node = Node(tmp_path / "auth", "node-auth", art)
    node.configure(etcd_server.endpoints, user=auth.user, password_file=str(wrong))
    model_dir = make_run(art, "auth")
    with node.daemon:
        (model_dir / ".fork").write_text("step: 3")
        problem = wait_for(
            lambda: "refused" in (p := node.status().get("coordination", {}).get("problem") or "") and p,
            20,
            "the auth problem",
        )
        assert "password" in problem
        time.sleep(1.0)
        assert (model_dir / ".fork").exists() and read_outcome(model_dir) is None
    node.configure(etcd_server.endpoints, user=auth.user, password_file=str(auth.password_file))
    with node.daemon:
        assert wait_outcome(model_dir)["status"] == "done"


def _doctor(node: Node) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor", "--config", str(node.config), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    return [f for f in json.loads(result.stdout)["findings"] if f["check"] == "coordination"]


def test_doctor_checks_endpoints_credentials_and_the_lease_by_etcds_clock(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    node = Node(tmp_path / "doctor", "node-doc", art)
    node.configure([*etcd_server.endpoints, "http://127.0.0.1:9"])  # a second endpoint that never answers
    findings = _doctor(node)
    assert [f["level"] for f in findings if "answers" in f["message"]] == ["ok"]
    assert any(f["level"] == "problem" and "127.0.0.1:9" in f["message"] for f in findings)
    assert any(f["level"] == "ok" and "leases work" in f["message"] for f in findings)
    assert any("no daemon is registered as node node-doc" in f["message"] for f in findings)
    with node.daemon:
        wait_for(lambda: node.status().get("coordination", {}).get("up"), 20, "the daemon's lease")
        assert any("holds a live lease" in f["message"] for f in _doctor(node))
    auth = etcd_server.enable_auth()
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    node.configure(etcd_server.endpoints, user=auth.user, password_file=str(wrong))
    findings = _doctor(node)
    assert any(f["level"] == "problem" and "refused" in f["message"] for f in findings), findings


def _etcd_claims(tmp_path: Path, art: Path, etcd_server: EtcdServer) -> contextlib.AbstractContextManager[EtcdClaims]:
    """node-0's claims backend in this process (no daemon), its lease granted."""
    return etcd_claims(tmp_path / "nodes", art, etcd_server.endpoints)


def test_a_report_put_by_another_node_wakes_the_gathering_claimer(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    # The claimer's watch ended at the end of `P/reports//`, before every report key (fork ids start with the
    # year): a gather heard of no report and waited out its 0.5 s poll (one 3-node fork in 4 took 0.5 s longer).
    reports = ("reports put",)  # not the members too: this node's own member key is written meanwhile
    with _etcd_claims(tmp_path, art, etcd_server) as claims:
        wait_for(lambda: claims._changes.seen(reports) > 0, 20, "the watch open")  # its "created" wakes everyone
        seen = claims._changes.seen(reports)
        etcd_server.put(f"{claims.keys.prefix}/reports/20261201T120000Z-abc123/node-2", "{}")
        wait_for(lambda: claims._changes.seen(reports) != seen, 10, "the report to wake the claimer")


def test_an_adoption_whose_create_reply_was_lost_holds_the_claim_it_made(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    # The create went through and its reply was lost, so the session sent it again to the next endpoint, which
    # answered "exists": the old adopt() gave up, and its own key, under its live lease, kept every daemon (itself
    # included) from adopting the dead claimer's fork until this daemon restarted. Here the first create's effect
    # is made directly (the one thing not real: a lost reply).
    model_dir = make_run(art, "lost-reply")
    with _etcd_claims(tmp_path, art, etcd_server) as claims:
        claim = model_dir / INPROGRESS
        assert claims.session.create(claims.keys.claim(claim), {"node": "node-0", "state": "adopting"}, claims.lease)
        assert claims.adopt(claim, {"claimed_by": {"host": "gone"}})
        found = claims.session.get(claims.keys.claim(claim))
        assert found is not None and found.lease == claims.lease


def test_a_member_whose_stages_raised_reports_both_failed_so_it_is_named(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    with _etcd_claims(tmp_path, art, etcd_server) as claims:

        def raising(_published: dict[str, Any]) -> dict[str, Any]:
            raise RuntimeError("a bug in this node's stages")  # a fault no real stage produces on demand

        claims.on_published = raising
        published = {"fork_id": "f1", "node": "node-1", "nodes": ["node-0", "node-1"]}
        claims.session.put(claims.keys.fork("f1"), published)  # a report is kept only while its fork is published
        claims._report(published)
        found = claims.session.get(claims.keys.report("f1", "node-0"))
        assert found is not None
        report = found.value
        assert served(report)
        assert [report[name]["status"] for name in ("trainers", "vllm")] == ["failed", "failed"], report
        assert [report[name]["reason"] for name in ("trainers", "vllm")] == ["trainer_other", "vllm_other"]
        assert "a bug in this node's stages" in report["vllm"]["error"]


def test_a_member_whose_watch_is_gone_still_hears_of_a_published_fork_and_reports(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    with _etcd_claims(tmp_path, art, etcd_server) as claims:
        # The watch closed for good, as one stalled or lost would be (etcd_watch.py): only the slow reads remain.
        claims._changes.close()
        claims._changes._thread.join(20)
        assert not claims._changes._thread.is_alive()
        told: list[str] = []

        def tell(published: dict[str, Any]) -> dict[str, Any]:
            told.append(str(published["fork_id"]))
            return {name: {"status": "skipped"} for name in ("trainers", "vllm")}

        claims.session.put(claims.keys.fork("f2"), {"fork_id": "f2", "node": "node-1", "nodes": ["node-0", "node-1"]})
        claims.on_published = tell  # only now: the listener has read nothing of f2, and no wake-up will come
        wait_for(lambda: claims.session.get(claims.keys.report("f2", "node-0")), 20, "node-0's report")
        assert told == ["f2"]


def test_a_claim_key_left_under_this_daemons_own_lease_does_not_block_the_marker(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    model_dir = make_run(art, "leftover")
    (model_dir / MARKER).write_text(json.dumps({"checkpoint": "0003"}))
    with _etcd_claims(tmp_path, art, etcd_server) as claims:
        claim = model_dir / INPROGRESS
        assert claims.lease is not None
        # What a create that committed while its reply was lost leaves (a real txn; only the lost reply is assumed).
        assert claims.session.create(claims.keys.claim(claim), {"node": "node-0", "state": "claiming"}, claims.lease)
        run = run_dir_of(model_dir, (art,))
        assert run is not None
        opened = open_run(run)
        try:
            assert claims.take(claim, LocalRunIO(run, opened.fd, frozenset({0})))
            assert claim.exists() and not (model_dir / MARKER).exists()
        finally:
            opened.close()


def test_a_member_killed_mid_fork_and_restarted_resumes_its_fork_under_its_new_lease(
    nodes: list[Node], art: Path
) -> None:
    model_dir, gate = _start_a_held_fork(nodes[:1], art, "restarted", "swapped")
    node = nodes[0]
    wait_for(held_at(gate).exists, 60, "the node's fork held after its swap")
    record = _swapped_record(node)
    assert record is not None
    node.daemon.kill()  # its claim key goes with its lease: the restarted daemon must take it again under its own
    gate.touch()
    node.daemon.start()
    outcome = wait_outcome(model_dir, timeout=60)
    assert outcome["status"] == "done", outcome
    assert outcome["fork_id"] == record["fork_id"]
    assert [line["fork_id"] for line in settled_history([node], 1)] == [record["fork_id"]]
    log = node.daemon.log_path.read_text()  # whole: log() keeps only the end
    assert "resuming fork from state" in log and "fork stopped without an outcome" not in log


def test_an_outcome_that_cannot_be_filed_done_is_filed_failed_under_the_claim_still_held(
    nodes: list[Node], art: Path
) -> None:
    model_dir = make_run(art, "undone")
    (model_dir / ".fork.done" / "keep").mkdir(parents=True)  # a directory: .fork.done cannot be written over it
    start_all(nodes[:1])
    (model_dir / ".fork").write_text("step: 3")
    failed = json.loads(wait_for(lambda: _text_of(model_dir / ".fork.failed"), 60, "the failed outcome"))
    assert "IsADirectoryError" in failed["error"], failed
    # Filed under the claim, which is released right after: the marker goes once the outcome is there, not with it.
    wait_for(lambda: not (model_dir / ".fork.inprogress").exists(), 20, "the claim released after the outcome")
    log = nodes[0].daemon.log_path.read_text()
    assert "fork stopped without an outcome" not in log


def _text_of(path: Path) -> str | None:
    with contextlib.suppress(FileNotFoundError):
        return path.read_text()
    return None


def test_a_claimer_cut_off_from_etcd_pauses_its_fork_and_leaves_it_to_the_adopter(
    tmp_path: Path, nodes: list[Node], art: Path, etcd_server: EtcdServer
) -> None:
    model_dir = make_run(art, "cut")
    held = HeldVllmStage(tmp_path, "http://127.0.0.1:9")  # nothing listens there: the stage ends once released
    cut, adopter = nodes[0], nodes[1]
    with TcpProxy(int(urlsplit(etcd_server.url).port or 0)) as proxy:
        cut.configure([proxy.url], {**held.overrides(), "timeouts": {"trainers": "2s", "vllm": "2s"}})
        start_all([cut])
        (model_dir / ".fork").write_text("step: 3")
        held.wait_held()  # swapped and published: the fork sits in its vLLM stage
        proxy.freeze()  # cut off from etcd alone: the run's files stay writable
        wait_for(lambda: cut.status().get("coordination", {}).get("up") is False, 20, "the cut-off noticed")
        adopter.daemon.start()
        held.release()
        # Old code went on to verify (journaled "verified") and waited only before the outcome file.
        wait_for(
            lambda: "fork paused" in cut.daemon.log_path.read_text() or _journal_state(cut) in ("verified", "done"),
            60,
            "the cut-off claimer to pause (or act)",
        )
        assert _journal_state(cut) == "vllm", cut.daemon.log()
        assert "fork paused" in cut.daemon.log_path.read_text()
        outcome = wait_outcome(model_dir, timeout=60)  # the adopter's, once the cut-off claimer's lease expired
        proxy.thaw()
        wait_for(
            lambda: "fork stopped without an outcome" in cut.daemon.log_path.read_text(), 30, "the claimer to stop"
        )
    assert cut.history() == []
    assert read_outcome(model_dir) == outcome
    assert [line["fork_id"] for line in settled_history(nodes[:2], 1)] == [outcome["fork_id"]]


def _journal_state(node: Node) -> str | None:
    for path in node.journaled():
        with contextlib.suppress(FileNotFoundError, ValueError):
            return str(json.loads(path.read_text()).get("state"))
    return None


def test_a_claimer_that_has_not_noticed_its_lease_expired_neither_overwrites_nor_deletes_the_adopters_keys(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    model_dir = make_run(art, "released")
    (model_dir / MARKER).write_text(json.dumps({"checkpoint": "0003"}))
    run = run_dir_of(model_dir, (art,))
    assert run is not None
    claim = model_dir / INPROGRESS
    opened = open_run(run)
    adopter_node = Node(tmp_path / "adopter", "node-1", art)
    adopter_node.configure(etcd_server.endpoints)
    adopter = EtcdClaims(load_config(adopter_node.config))
    try:
        with _etcd_claims(tmp_path, art, etcd_server) as claims:
            io = LocalRunIO(run, opened.fd, frozenset({0}))
            assert claims.take(claim, io)
            claims.record(claim, io, "f1", {"kind": "step", "step": 3}, "")
            claims.progress(claim, {"fork_id": "f1", "state": "swapped"})
            # The window between the lease expiring in etcd and this daemon's keeper noticing, held open: its keeper
            # is stopped (the one thing not real here), and the lease revoked, as etcd expires it.
            claims._stop.set()
            claims._keeper.join()
            assert claims.lease is not None
            etcd_server.call("/v3/kv/lease/revoke", {"ID": claims.lease})
            wait_for(adopter.usable, 20, "the adopter's lease")
            assert adopter.adopt(claim, {"fork_id": "f1"})
            adopter.progress(claim, {"fork_id": "f1", "state": "trainers"})
            adopter.session.put(adopter.keys.fork("f1"), {"fork_id": "f1", "node": "node-1", "nodes": ["node-1"]})
            with pytest.raises(ClaimLost):
                claims.progress(claim, {"fork_id": "f1", "state": "vllm"})
            claims.release(claim, io)
            progress = etcd_server.get(f"/fork-sidecar/progress{model_dir}")
            assert progress is not None and json.loads(progress)["state"] == "trainers"
            assert etcd_server.get("/fork-sidecar/forks/f1") is not None
            assert etcd_server.get(f"/fork-sidecar/claims{model_dir}") is not None
    finally:
        adopter.close()
        opened.close()


def test_a_daemon_stopped_while_its_fork_waits_for_etcd_leaves_it_journaled_and_resumes_it(
    tmp_path: Path, nodes: list[Node], art: Path, etcd_server: EtcdServer
) -> None:
    model_dir = make_run(art, "stopping")
    held = HeldVllmStage(tmp_path, "http://127.0.0.1:9")
    node = nodes[0]
    node.configure(etcd_server.endpoints, {**held.overrides(), "timeouts": {"trainers": "2s", "vllm": "2s"}})
    start_all([node])
    (model_dir / ".fork").write_text("step: 3")
    held.wait_held()
    etcd_server.kill()
    wait_for(lambda: node.status().get("coordination", {}).get("up") is False, 20, "etcd's loss noticed")
    held.release()
    wait_for(lambda: "fork paused" in node.daemon.log_path.read_text(), 60, "the fork to pause")
    [record] = node.journaled()
    fork_id = json.loads(record.read_text())["fork_id"]
    node.daemon.stop()
    # Old code kept waiting in confirm() until the stop gave up on the fork's thread, then filed it unconfirmed.
    assert "fork left as journaled for the next start" in node.daemon.log_path.read_text()
    assert read_outcome(model_dir) is None and node.history() == []
    assert [p.name for p in node.journaled()] == [record.name]
    etcd_server.restart()
    node.daemon.start()
    outcome = wait_outcome(model_dir, timeout=60)
    assert outcome["fork_id"] == fork_id
    assert [line["fork_id"] for line in settled_history([node], 1)] == [fork_id]
