"""Fan-out through etcd: a fork reaches every node serving its run, and the outcome says what each node did.

Three daemons (distinct node.name, state and runtime dirs, one shared root) and on each node a real trainer process
(a PEFT model registered with the preload, its agent in that node's runtime dir). The fork is claimed by one node;
every node's agent must load the forked adapter, and the outcome's `nodes` names all three.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sidecar.claims.base import ClaimLost
from sidecar.journal import ForkRecord
from sidecar.layout import run_dir_of
from sidecar.marker import INPROGRESS, MARKER
from sidecar.run_io import LocalRunIO
from sidecar.rundir import open_run
from sidecar.states import ForkState
from tests.support.adapters import write_adapter
from tests.support.daemon import wait_for, wait_outcome
from tests.support.etcd_nodes import Node, etcd_claims, prom, settled_history, start_all
from tests.support.etcd_server import EtcdServer, b64
from tests.support.tiny_model import TinyAssets

if TYPE_CHECKING:
    from sidecar.claims.etcd import EtcdClaims
    from sidecar.claims.etcd_client import KeyValue
    from tests.conftest import VllmRun

pytest.importorskip("etcd3gw")
pytest.importorskip("peft")
pytestmark = [pytest.mark.etcd, pytest.mark.trainer, pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
_TRAINER = """
import sys
from peft import PeftModel
from transformers import LlamaForCausalLM
from sidecar import preload
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2])
preload.register(model, sys.argv[3])
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def run_dir(tmp_path: Path, tiny_assets: TinyAssets) -> Path:
    model_dir = tmp_path / "art" / "p" / "models" / "m"
    for step, adapter in (("0000", tiny_assets.adapter_a), ("0003", tiny_assets.adapter_b)):
        shutil.copytree(adapter, model_dir / "checkpoints" / step)
    return model_dir


@pytest.fixture
def nodes(tmp_path: Path, run_dir: Path, etcd_server: EtcdServer) -> Iterator[list[Node]]:
    made = [Node(tmp_path / "nodes", f"node-{i}", tmp_path / "art") for i in range(3)]
    for node in made:
        node.configure(etcd_server.endpoints, {"trainer": {"required": True, "agent_timeout": "20s"}})
    yield made
    for node in made:
        node.daemon.signal(signal.SIGCONT) if node.daemon.proc and node.daemon.proc.poll() is None else None
        node.daemon.__exit__()
        shutil.rmtree(node.runtime, ignore_errors=True)


@pytest.fixture
def trainers(nodes: list[Node], run_dir: Path, tiny_assets: TinyAssets) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One real trainer process per node, its agent in that node's runtime dir, serving the run."""
    children = []
    for node in nodes:
        env = {**os.environ, "FORK_SIDECAR_RUNTIME_DIR": str(node.runtime)}
        args = [
            sys.executable,
            "-c",
            _TRAINER,
            str(tiny_assets.base),
            str(run_dir / "checkpoints" / "0000"),
            str(run_dir),
        ]
        children.append(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO))
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        yield children
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_a_fork_reaches_the_agents_of_every_node_and_the_outcome_names_them(
    nodes: list[Node], trainers: list[subprocess.Popen[bytes]], run_dir: Path
) -> None:
    start_all(nodes)
    (run_dir / ".fork").write_text("step: 3")
    outcome = wait_outcome(run_dir, timeout=120)
    assert outcome["status"] == "done", outcome
    assert sorted(outcome["nodes"]) == ["node-0", "node-1", "node-2"]
    pids = {child.pid for child in trainers}
    told = set()
    for name, report in outcome["nodes"].items():
        assert report["trainers"]["status"] == "ok", (name, report)
        agents = report["trainers"]["agents"]
        assert {a["result"] for a in agents} == {"loaded"}, (name, agents)
        assert {a["digest"] for a in agents} == {outcome["digest"]}
        told |= {a["pid"] for a in agents}
    assert told == pids  # each node told its own trainer, and only its own
    assert [line["fork_id"] for line in settled_history(nodes, 1)] == [outcome["fork_id"]]
    wait_for(lambda: "fork_sidecar_nodes_reported_sum 3.0" in prom(nodes), 30, "the fan-out metrics")
    assert "fork_sidecar_fanout_seconds_count 1.0" in prom(nodes)


def test_a_node_frozen_when_the_fork_is_published_is_named_and_fails_the_required_stage(
    nodes: list[Node], trainers: list[subprocess.Popen[bytes]], run_dir: Path
) -> None:
    start_all(nodes)
    frozen = nodes[2]
    frozen.daemon.signal(signal.SIGSTOP)  # still a member (its lease runs for up to 2 s), never reports
    (run_dir / ".fork").write_text("step: 3")
    outcome = wait_outcome(run_dir, timeout=120)
    frozen.daemon.signal(signal.SIGCONT)
    assert outcome["status"] == "failed", outcome
    assert outcome["nodes"]["node-2"]["status"] == "missing"
    assert "lease expired" in outcome["nodes"]["node-2"]["error"]
    assert "node node-2 did not report" in outcome["error"]
    for name in ("node-0", "node-1"):
        assert outcome["nodes"][name]["trainers"]["status"] == "ok"
    settled_history(nodes, 1)
    assert frozen.history() == []
    wait_for(lambda: 'fork_sidecar_nodes_missing_total{node="node-2"} 1.0' in prom(nodes), 30, "the missing node")


def test_a_fork_adopted_after_the_publish_names_the_dead_claimers_own_node(
    nodes: list[Node], trainers: list[subprocess.Popen[bytes]], run_dir: Path, etcd_server: EtcdServer
) -> None:
    # Every trainer frozen: the claimer publishes, then waits on its own trainer's hello (5 s) before it has told
    # it or reported; killed there, its node's trainer keeps the old weights, and the adopter must say so.
    start_all(nodes)
    for child in trainers:
        child.send_signal(signal.SIGSTOP)
    try:
        (run_dir / ".fork").write_text("step: 3")
        published = wait_for(lambda: _published_fork(etcd_server), 60, "the fork to be published")
        claimer = next(n for n in nodes if n.name == published["node"])
        claimer.daemon.kill()
        fork_id = published["fork_id"]
        assert etcd_server.keys(f"/fork-sidecar/reports/{fork_id}/{claimer.name}") == [], "killed after reporting"
    finally:
        for child in trainers:
            child.send_signal(signal.SIGCONT)
    outcome = wait_outcome(run_dir, timeout=120)
    assert outcome["fork_id"] == fork_id
    assert outcome["status"] == "failed", outcome
    assert outcome["nodes"][claimer.name]["status"] == "missing", outcome["nodes"]
    assert "lease expired" in outcome["nodes"][claimer.name]["error"]
    assert f"node {claimer.name} did not report" in outcome["error"]
    assert sorted(outcome["nodes"]) == ["node-0", "node-1", "node-2"]


def test_a_node_whose_daemon_stopped_while_its_trainer_runs_is_named_not_running(
    nodes: list[Node], trainers: list[subprocess.Popen[bytes]], run_dir: Path, etcd_server: EtcdServer
) -> None:
    outcome = _fork_with_node_2_stopped(nodes, run_dir, etcd_server, serving=True)
    assert outcome["status"] == "failed", outcome
    assert outcome["nodes"]["node-2"]["status"] == "missing", outcome["nodes"]
    assert "not running" in outcome["nodes"]["node-2"]["error"]
    assert "node node-2 did not report" in outcome["error"]
    for name in ("node-0", "node-1"):
        assert outcome["nodes"][name]["trainers"]["status"] == "ok"


def test_a_node_that_stopped_serving_before_its_daemon_stopped_is_not_waited_for(
    nodes: list[Node], trainers: list[subprocess.Popen[bytes]], run_dir: Path, etcd_server: EtcdServer
) -> None:
    trainer = trainers[2]

    def stop_serving() -> None:
        trainer.kill()
        trainer.wait()

    outcome = _fork_with_node_2_stopped(nodes, run_dir, etcd_server, serving=False, before_stop=stop_serving)
    assert outcome["status"] == "done", outcome
    assert sorted(outcome["nodes"]) == ["node-0", "node-1"]


def _fork_with_node_2_stopped(
    nodes: list[Node],
    run_dir: Path,
    etcd_server: EtcdServer,
    *,
    serving: bool,
    before_stop: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The outcome of a fork written once node-2's daemon, having seen its trainer, is stopped (gracefully: its
    lease revoked); `serving`: whether its serves record still names the run then (after `before_stop`)."""
    start_all(nodes)
    down = nodes[2]
    wait_for(lambda: _serves(etcd_server, down.name, run_dir), 30, "node-2's survey to find its trainer")
    if before_stop is not None:
        before_stop()
    wait_for(lambda: _serves(etcd_server, down.name, run_dir) == serving, 30, "node-2's survey to see that")
    down.daemon.stop()
    wait_for(lambda: nodes[0].status().get("coordination", {}).get("members") == 2, 20, "node-2 to leave")
    assert _serves(etcd_server, down.name, run_dir) == serving  # what it served outlives its daemon
    (run_dir / ".fork").write_text("step: 3")
    return wait_outcome(run_dir, timeout=120)


def _serves(etcd_server: EtcdServer, node: str, run_dir: Path) -> bool:
    raw = etcd_server.get(f"/fork-sidecar/serves/{node}")
    return bool(raw) and str(run_dir.resolve()) in json.loads(raw or "{}").get("runs", [])


def _published_fork(etcd_server: EtcdServer) -> dict[str, Any] | None:
    keys = etcd_server.keys("/fork-sidecar/forks/")
    raw = etcd_server.get(keys[0]) if keys else None
    return dict(json.loads(raw)) if raw else None


@pytest.mark.vllm
def test_a_vllm_server_known_to_one_node_is_reloaded_through_that_node(
    tmp_path: Path, vllm_run: VllmRun, etcd_server: EtcdServer
) -> None:
    # Each node knows only its own servers: node-1 lists the real vLLM CPU server, the others none. Whichever node
    # claims, the server is reloaded by node-1 and the outcome says so under node-1 alone.
    made = [Node(tmp_path / "nodes", f"node-{i}", vllm_run.art) for i in range(3)]
    for node in made:
        servers = [{"url": vllm_run.server.url}] if node.name == "node-1" else []
        node.configure(etcd_server.endpoints, {"vllm": {"discover": False, "servers": servers}})
    try:
        start_all(made)
        (vllm_run.model_dir / ".fork").write_text("step: 5")
        outcome = wait_outcome(vllm_run.model_dir, timeout=180)
    finally:
        for node in made:
            node.daemon.__exit__()
    assert outcome["status"] == "done", outcome
    assert sorted(outcome["nodes"]) == ["node-1"], outcome["nodes"]
    vllm = outcome["nodes"]["node-1"]["vllm"]
    assert vllm["status"] == "ok", vllm
    assert [s["url"] for s in vllm["servers"]] == [vllm_run.server.url]


def test_closing_the_watch_ends_its_read_at_once_while_nothing_changes(etcd_server: EtcdServer) -> None:
    # Imported here: the etcd client is an optional extra, and this module's other tests drive daemons only.
    from sidecar.claims.etcd_client import EtcdSession
    from sidecar.claims.etcd_watch import Changes
    from sidecar.config import EtcdConfig

    session = EtcdSession(EtcdConfig(endpoints=tuple(etcd_server.endpoints)), request_timeout=5.0)
    changes = Changes(session, "/quiet", "/quiet/forks/", "/quiet/reports/")
    wait_for(lambda: changes.seen(("forks put",)) > 0, 20, "the watch open")  # its "created" wakes the waiters once
    wait_for(lambda: changes._stream is not None, 20, "the stream kept")
    # Nothing changes under these keys: the watch thread sits in a read that would last until IDLE_S (60 s).
    closer = threading.Thread(target=changes.close)
    closer.start()
    closer.join(10)  # a stopping daemon waited here 7-60 s (closing the response waited for that read)
    assert not closer.is_alive(), "close() waited for the watch's read to end"
    changes._thread.join(10)
    assert not changes._thread.is_alive()


def test_a_change_wakes_only_the_waiters_of_its_topic(etcd_server: EtcdServer) -> None:
    # A claimer's progress writes lie inside the watched range: they woke every member's listener, which read etcd
    # again each time (most of the reads of a 3-node fork); so did the deletes of a fork's keys once it ended.
    from sidecar.claims.etcd_client import EtcdSession
    from sidecar.claims.etcd_watch import Changes
    from sidecar.config import EtcdConfig

    session = EtcdSession(EtcdConfig(endpoints=tuple(etcd_server.endpoints)), request_timeout=5.0)
    changes = Changes(session, "/topics", "/topics/forks/", "/topics/reports/", "node-1")
    try:
        wait_for(lambda: changes.seen(("forks put",)) > 0, 20, "the watch open")
        forks, reports = changes.seen(("forks put",)), changes.seen(("reports put",))
        etcd_server.put("/topics/progress/run", "{}")
        etcd_server.put("/topics/reports/f1/node-1", "{}")  # this node's own report: it waits for the others'
        etcd_server.put("/topics/reports/f1/node-2", "{}")
        wait_for(lambda: changes.seen(("reports put",)) != reports, 20, "the report streamed")
        # Streamed in order: the progress write and the own report came first and woke no one.
        assert changes.seen(("forks put",)) == forks and changes.seen(("reports put",)) == reports + 1
        etcd_server.put("/topics/forks/f1", "{}")
        waiter = threading.Thread(target=changes.wait, args=(("forks put",), forks, 20.0))
        waiter.start()
        waiter.join(20)
        assert not waiter.is_alive() and changes.seen(("forks put",)) == forks + 1
        gone = changes.seen(("forks deleted",))
        etcd_server.call("/v3/kv/deleterange", {"key": b64("/topics/forks/f1")})
        etcd_server.put("/topics/reports/f1/node-3", "{}")
        wait_for(lambda: changes.seen(("reports put",)) == reports + 2, 20, "the second report streamed")
        assert changes.seen(("forks deleted",)) == gone + 1 and changes.seen(("forks put",)) == forks + 1
    finally:
        changes.close()


# --- publishing with the swap's record (in this process: one EtcdClaims, the other nodes' keys put directly) ------
@contextlib.contextmanager
def _claimed(claims: EtcdClaims, art: Path, model: str) -> Iterator[Path]:
    """The claim (`.fork.inprogress`) of a new run's marker, taken by `claims` as a daemon's take() takes it."""
    model_dir = art / "p" / "models" / model
    for step in (0, 3):
        write_adapter(model_dir / "checkpoints" / f"{step:04d}", seed=step)
    (model_dir / MARKER).write_text("step: 3")
    run = run_dir_of(model_dir, (art,))
    assert run is not None
    opened = open_run(run)
    try:
        assert claims.take(model_dir / INPROGRESS, LocalRunIO(run, opened.fd, frozenset({os.getuid()})))
        yield model_dir / INPROGRESS
    finally:
        opened.close()


def _swapped(claim: Path, fork_id: str) -> dict[str, Any]:
    """The journal record of a fork of `claim`'s run that has just swapped (what _advance hands progress())."""
    model_dir = str(claim.parent)
    return {"fork_id": fork_id, "model_dir": model_dir, "source": f"{model_dir}/checkpoints/0003", "digest": "d"}


def test_the_fork_published_with_the_swap_names_who_serves_the_run_at_the_swap_not_at_the_take(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    # The look at the members and serves records rides in the take; a record that changes before the swap must
    # count as it is at the swap: a member that joined or a node now serving the run must report, one gone need not.
    with etcd_claims(tmp_path / "nodes", art, etcd_server.endpoints) as claims:
        p = claims.keys.prefix
        etcd_server.put(f"{p}/members/node-left", "{}")
        with _claimed(claims, art, "joined") as claim:
            assert claims.keys.claim(claim) in claims._surveys  # the take read who serves the run
            etcd_server.call("/v3/kv/deleterange", {"key": b64(f"{p}/members/node-left")})
            etcd_server.put(f"{p}/members/node-joined", "{}")
            etcd_server.put(f"{p}/serves/node-serving", json.dumps({"runs": [str(claim.parent)]}))
            claims.progress(claim, {**_swapped(claim, "f-joined"), "state": "swapped"})
            published = json.loads(etcd_server.get(f"{p}/forks/f-joined") or "{}")
            assert published["nodes"] == ["node-0", "node-joined", "node-serving"], published
            assert published["members"] == ["node-0", "node-joined"]
            assert json.loads(etcd_server.get(claims.keys.progress(claim)) or "{}")["state"] == "swapped"
            assert claims._published["f-joined"][1] == ["node-joined", "node-serving"]


def test_a_swap_recorded_once_the_claim_is_an_adopters_publishes_nothing_and_overwrites_nothing(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    with etcd_claims(tmp_path / "nodes", art, etcd_server.endpoints) as claims, _claimed(claims, art, "lost") as claim:
        key = claims.keys.claim(claim)
        adopter = claims.session.grant(30)  # this daemon's lease expired, and another daemon adopted the claim
        claims.session.delete(key)
        assert claims.session.create(key, {"node": "node-1", "state": "adopting"}, adopter)
        claims.session.put(claims.keys.progress(claim), {"fork_id": "f-lost", "by": "the adopter"})
        with pytest.raises(ClaimLost):
            claims.progress(claim, {**_swapped(claim, "f-lost"), "state": "swapped"})
        assert etcd_server.keys(claims.keys.fork()) == []
        assert json.loads(etcd_server.get(claims.keys.progress(claim)) or "{}")["by"] == "the adopter"


def test_a_fork_published_before_its_swap_was_recorded_again_keeps_its_list(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    # Resumed after a restart from a journal that said STAGED: the fork was published before, with its list.
    with etcd_claims(tmp_path / "nodes", art, etcd_server.endpoints) as claims, _claimed(claims, art, "again") as claim:
        before = {**_swapped(claim, "f-again"), "node": "node-0", "nodes": ["node-0", "node-x"], "members": ["node-0"]}
        claims.session.put(claims.keys.fork("f-again"), before)
        claims.progress(claim, {**_swapped(claim, "f-again"), "state": "swapped"})
        assert json.loads(etcd_server.get(claims.keys.fork("f-again")) or "{}") == before
        assert json.loads(etcd_server.get(claims.keys.progress(claim)) or "{}")["state"] == "swapped"
        assert claims._published["f-again"][1] == ["node-x"]
        assert claims._live_at_publish["f-again"] == {"node-0"}


# --- the fan-out from the watch's values; etcd read again only when the watch may have missed something ---------------
def _record(claim: Path, fork_id: str) -> ForkRecord:
    fields = _swapped(claim, fork_id)
    return ForkRecord(fork_id, fields["model_dir"], ForkState.SWAPPED, {}, time.time(), fields["source"], "d")


def test_a_member_starts_its_stages_from_the_streamed_fork_without_reading_the_published_ones(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    with etcd_claims(tmp_path / "nodes", art, etcd_server.endpoints) as claims:
        wait_for(lambda: claims._changes.seen(()) > 0, 20, "the watch open")
        # The listener's reads find nothing: only the put's own value, as streamed, can tell this node of f3 (before,
        # the put woke the listener, and it read P/forks/ to learn what it was: a round trip on every member's path).
        read = claims.session.get_prefix
        claims.session.get_prefix = lambda prefix: [] if prefix == claims.keys.fork() else read(prefix)  # type: ignore[method-assign]
        told: list[str] = []

        def tell(published: dict[str, Any]) -> dict[str, Any]:
            told.append(str(published["fork_id"]))
            return {name: {"status": "skipped"} for name in ("trainers", "vllm")}

        claims.on_published = tell
        claims.session.put(claims.keys.fork("f3"), {"fork_id": "f3", "node": "node-1", "nodes": ["node-0", "node-1"]})
        wait_for(lambda: claims.session.get(claims.keys.report("f3", "node-0")), 20, "node-0's report")
        assert told == ["f3"]


@contextlib.contextmanager
def _published_with_node_1(tmp_path: Path, art: Path, etcd_server: EtcdServer, model: str) -> Iterator[Any]:
    """node-0's claims, having published a fork of a new run that node-1 (a member under its own lease) must report
    on: (claims, claim, record, node-1's lease)."""
    with etcd_claims(tmp_path / "nodes", art, etcd_server.endpoints) as claims:
        wait_for(lambda: claims._changes.seen(()) > 0, 20, "the watch open")
        lease = claims.session.grant(30)
        claims.session.put(claims.keys.member("node-1"), {"node": "node-1"}, lease)
        with _claimed(claims, art, model) as claim:
            record = _record(claim, f"f-{model}")
            claims.progress(claim, record.to_json())
            assert claims._published[record.fork_id][1] == ["node-1"]
            yield claims, claim, record, lease


def test_a_gathering_claimer_takes_a_report_from_its_event_without_reading_again(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    with _published_with_node_1(tmp_path, art, etcd_server, "streamed") as (claims, claim, record, _):
        reads: list[tuple[str, ...]] = []
        read = claims.session.get_prefixes

        def counted(*prefixes: str) -> list[list[KeyValue]]:
            reads.append(prefixes)
            return read(*prefixes)

        claims.session.get_prefixes = counted  # type: ignore[method-assign]
        report = {"trainers": {"status": "ok"}, "vllm": {"status": "skipped"}}
        later = threading.Timer(0.2, lambda: claims.session.put(claims.keys.report(record.fork_id, "node-1"), report))
        later.start()  # while the claimer waits: before, its wake-up read every report (a round trip on its path)
        gathered = claims.gather(claim, record, 30.0)
        later.join()
        assert gathered.reports == {"node-1": report} and gathered.missing == {}
        assert reads == []


def test_a_gathering_claimer_whose_watch_is_gone_still_gathers_the_reports(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    with _published_with_node_1(tmp_path, art, etcd_server, "unwatched") as (claims, claim, record, _):
        claims._changes.close()  # as a watch lost for good would be: only the slow reads remain
        claims._changes._thread.join(20)
        report = {"trainers": {"status": "ok"}, "vllm": {"status": "skipped"}}
        later = threading.Timer(0.2, lambda: claims.session.put(claims.keys.report(record.fork_id, "node-1"), report))
        later.start()
        gathered = claims.gather(claim, record, 30.0)
        later.join()
        assert gathered.reports == {"node-1": report} and gathered.missing == {}


def test_a_member_whose_lease_goes_while_the_claimer_gathers_is_named_missing_at_once(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    with _published_with_node_1(tmp_path, art, etcd_server, "gone") as (claims, claim, record, lease):
        later = threading.Timer(0.2, lambda: claims.session.revoke(lease))
        later.start()
        started = time.monotonic()
        gathered = claims.gather(claim, record, 30.0)
        later.join()
        assert gathered.reports == {} and list(gathered.missing) == ["node-1"]
        assert "lease expired" in gathered.missing["node-1"]
        assert time.monotonic() - started < 10  # the deletion streamed, not the 30 s budget waited out


def test_the_claimers_own_report_sent_while_it_gathers_is_in_etcd_before_its_outcome(
    tmp_path: Path, art: Path, etcd_server: EtcdServer
) -> None:
    # gather no longer waits for its own report's put (the others' come in meanwhile); confirm(), the step before
    # every outcome, does: an adopter of a claimer that dies before its outcome finds this node's report, as before.
    with _published_with_node_1(tmp_path, art, etcd_server, "own") as (claims, claim, record, _):
        put = claims.session.put_if_exists

        def slow(*args: Any, **kwargs: Any) -> tuple[bool, list[list[KeyValue]]]:
            time.sleep(1.0)  # an etcd slow to answer (the one thing not real here)
            return put(*args, **kwargs)

        claims.session.put_if_exists = slow  # type: ignore[method-assign]
        report = {"trainers": {"status": "ok"}, "vllm": {"status": "skipped"}}
        later = threading.Timer(0.2, lambda: claims.session.put(claims.keys.report(record.fork_id, "node-1"), report))
        later.start()
        gathered = claims.gather(claim, record, 30.0)
        later.join()
        assert gathered.reports == {"node-1": report}
        claims.confirm(claim)
        assert etcd_server.get(claims.keys.report(record.fork_id, "node-0")) is not None
