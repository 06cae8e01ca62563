"""A torch.distributed job spread over two nodes: each node's daemon tells its own ranks, the ranks agree through the
job's own process group, and the claimer's outcome checks the ranks of every node together.

Two simulated nodes on this host: one torchrun per node (`--nnodes 2 --node-rank K`, static rendezvous on
loopback, one rank each, gloo on CPU), each rank's agent in its node's runtime dir, each node's daemon with its own
node.name, state and runtime dir, coordinated through a real etcd server, all watching one shared root.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from tests.support.daemon import DaemonProcess, write_config
from tests.support.etcd_nodes import Node, start_all
from tests.support.etcd_server import EtcdServer
from tests.support.rank_job import (
    Job,
    Run,
    StepLog,
    assert_ranks_identical,
    check_fork_landed,
    free_port,
)
from tests.support.tiny_model import tiny_assets
from tests.support.venvs import preloaded_venv

pytestmark = [pytest.mark.trainer, pytest.mark.slow, pytest.mark.timeout(420)]

TRAINER = {"required": True, "agent_timeout": "12s", "retries": 0}


@pytest.fixture(scope="module")
def trainer_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return preloaded_venv(tmp_path_factory.mktemp("ranks-venv"))


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path, tiny_assets())


@pytest.fixture
def nodes(tmp_path: Path, run: Run, etcd_server: EtcdServer) -> Iterator[list[Node]]:
    made = [Node(tmp_path / "nodes", f"node-{i}", run.art) for i in range(2)]
    for node in made:
        node.configure(etcd_server.endpoints, {"trainer": TRAINER})
    yield made
    for node in made:
        node.daemon.__exit__()
        shutil.rmtree(node.runtime, ignore_errors=True)


def spread_job(python: Path, run: Run, runtimes: list[Path], control: Path) -> list[Job]:
    """One 2-rank DDP job, rank K on node K (its agent in runtimes[K]); started together, as torchrun needs."""
    port = free_port()
    jobs = [Job(python, run, runtime, control, 1, node=(k, 2, port), wait=False) for k, runtime in enumerate(runtimes)]
    try:
        for job in jobs:
            job.wait_ready()
    except BaseException:
        stop(jobs)
        raise
    return jobs


def stop(jobs: list[Job]) -> None:
    for job in jobs:
        job.stop()


def fork_during(jobs: list[Job], run: Run, step: int) -> tuple[dict[int, dict[int, dict[str, Any]]], dict[str, Any]]:
    """Fork to `step` once every rank has trained two steps, let them train two more, stop; (steps, outcome)."""
    ranks = StepLog(jobs[0].control, range(2))
    try:
        ranks.wait_steps(2)
        outcome = run.fork(step)
        ranks.wait_steps(ranks.last_step() + 2)
    finally:
        stop(jobs)
    return assert_ranks_identical(ranks), outcome


@pytest.mark.etcd
def test_ranks_on_two_nodes_load_a_fork_at_one_step_each_told_by_its_own_nodes_daemon(
    trainer_python: Path, run: Run, nodes: list[Node], tmp_path: Path
) -> None:
    start_all(nodes)
    jobs = spread_job(trainer_python, run, [n.runtime for n in nodes], tmp_path / "control")
    steps, outcome = fork_during(jobs, run, 3)
    assert outcome["status"] == "done", outcome
    assert sorted(outcome["nodes"]) == ["node-0", "node-1"], outcome["nodes"]
    loaded_at = set()
    for k, name in enumerate(["node-0", "node-1"]):
        trainers = outcome["nodes"][name]["trainers"]
        [agent] = trainers["agents"]  # each node told its own rank, and only that one
        assert (agent["rank"], agent["world_size"], agent["pid"]) == (k, 2, jobs[k].pids[0]), agent
        assert agent["applied"] == "agreed step boundary", agent
        loaded_at.add(agent["loaded_at_step"])
        [job] = trainers["jobs"]
        assert (job["ranks_here"], job["ranks_missing"], job["ranks_elsewhere"]) == ([k], [], [1 - k]), job
    [at] = loaded_at  # the same optimizer step on both nodes
    check_fork_landed(steps, at, run.tensors_of(3))


@pytest.mark.etcd
def test_a_rank_on_a_node_without_a_daemon_fails_the_fork_naming_it_and_no_rank_loads(
    trainer_python: Path, run: Run, nodes: list[Node], tmp_path: Path
) -> None:
    # node-1 runs rank 1 but its daemon never ran: no member, no record of what it serves. The claimer can only
    # tell rank 0, which must not load alone; the outcome names the rank nobody reported.
    start_all(nodes[:1])
    jobs = spread_job(trainer_python, run, [n.runtime for n in nodes], tmp_path / "control")
    steps, outcome = fork_during(jobs, run, 3)
    forked = run.tensors_of(3)
    assert all(r["after"] != forked for ranks in steps.values() for r in ranks.values())
    assert outcome["status"] == "failed", outcome
    error = outcome["error"]
    assert (
        error.startswith("rank 1 of the 2-rank job training ")
        and "was reported by no node (expected on other nodes by node-0)" in error
    )
    [agent] = outcome["nodes"]["node-0"]["trainers"]["agents"]
    assert agent["rank"] == 0 and agent["result"] == "failed", agent


def test_a_job_spread_over_nodes_under_the_filesystem_backend_is_told_nothing_and_says_to_use_etcd(
    trainer_python: Path, run: Run, tmp_path: Path
) -> None:
    # One daemon, no coordination: the daemon of rank 1's node would never hear of the fork, so telling rank 0
    # would only make it wait out its timeout. Nothing is told; the sentence says what to set.
    runtimes = [Path(tempfile.mkdtemp(prefix=f"fs-node-{i}-", dir="/tmp")) for i in range(2)]
    config = write_config(tmp_path / "config.yaml", [run.art], tmp_path / "state", runtimes[0], trainer=TRAINER)
    try:
        with DaemonProcess(config, tmp_path / "daemon.log"):
            jobs = spread_job(trainer_python, run, runtimes, tmp_path / "control")
            steps, outcome = fork_during(jobs, run, 3)
    finally:
        for runtime in runtimes:
            shutil.rmtree(runtime, ignore_errors=True)
    forked = run.tensors_of(3)
    assert all(r["after"] != forked for ranks in steps.values() for r in ranks.values())
    assert outcome["status"] == "failed", outcome
    trainers = outcome["trainers"]
    assert trainers["agents"] == [] and trainers["reason"] == "trainer_ranks_missing", trainers
    error = trainers["error"]
    assert error.startswith("rank 1 of the 2-rank job training ") and "run on other nodes" in error, error
    assert "set coordination.backend: etcd" in error, error
