"""Distributed trainers with real parts: a torchrun gloo job on CPU (2 and 4 ranks, DDP, FSDP2 and FSDP1), the preload
installed by the CLI into the ranks' venv, the real daemon and real `.fork` markers.

Each rank logs a fingerprint of its LoRA tensors after every optimizer step (`tests/support/ddp_script.py`). The
tests check that the ranks' weights are identical after every step, that from the step the outcome names
(`loaded_at_step`, the same on every rank) they are the forked tensors, and what happens when a rank hangs or
goes missing. Rank 0 waits longer between steps than the others, as it does in real jobs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from sidecar.protocol.client import call_agent  # noqa: E402
from sidecar.protocol.paths import agent_socket_path  # noqa: E402
from tests.support.daemon import DaemonProcess, wait_for, wait_outcome, write_config  # noqa: E402
from tests.support.rank_job import (  # noqa: E402
    START_S,
    Job,
    Run,
    assert_ranks_identical,
    check_fork_landed,
    short_dir,
)
from tests.support.tiny_model import TinyAssets, tiny_assets  # noqa: E402
from tests.support.venvs import preloaded_venv  # noqa: E402

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


@pytest.fixture(scope="module")
def assets() -> TinyAssets:
    return tiny_assets()


@pytest.fixture(scope="module")
def trainer_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return preloaded_venv(tmp_path_factory.mktemp("ranks-venv"))


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@contextlib.contextmanager
def daemon_for_run(root: Path, runtime_dir: Path, agent_timeout: str = "12s") -> Iterator[tuple[Run, DaemonProcess]]:
    run = Run(root, tiny_assets())
    trainer = {"required": True, "agent_timeout": agent_timeout, "retries": 0}
    config = write_config(root / "config.yaml", [run.art], root / "state", runtime_dir, trainer=trainer)
    with DaemonProcess(config, root / "daemon.log") as process:
        yield run, process


@pytest.fixture
def daemon(tmp_path: Path, runtime_dir: Path) -> Iterator[tuple[Run, DaemonProcess]]:
    with daemon_for_run(tmp_path, runtime_dir) as pair:
        yield pair


@pytest.fixture(scope="module")
def pair_job(trainer_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Run, Job]]:
    """One 2-rank DDP job (broadcast_buffers off, rank 0 saving a slow checkpoint every 3 steps) and its daemon,
    for the tests below in order (each job costs 10-40 s to start on two busy cores)."""
    root = tmp_path_factory.mktemp("pair")
    save = ("--save-every", "3", "--save-seconds", "1.0")
    with short_dir() as runtime_dir, daemon_for_run(root, runtime_dir) as (run, _):
        job = Job(trainer_python, run, runtime_dir, root / "control", 2, "--no-broadcast-buffers", *save)
        try:
            job.wait_steps(2)
            yield run, job
        finally:
            job.stop()


def assert_loaded_together(outcome: dict[str, Any], nproc: int) -> int:
    assert outcome["status"] == "done", outcome
    agents = outcome["trainers"]["agents"]
    assert sorted(a["rank"] for a in agents) == list(range(nproc))
    assert {a["world_size"] for a in agents} == {nproc}
    assert {a["applied"] for a in agents} == {"agreed step boundary"}
    [at] = {a["loaded_at_step"] for a in agents}  # the same optimizer step on every rank
    assert isinstance(at, int) and at > 0
    [job] = outcome["trainers"]["jobs"]
    assert job["ranks_here"] == list(range(nproc)) and job["ranks_missing"] == [] == job["ranks_elsewhere"]
    return int(at)


def fork_a_new_job(
    python: Path, run: Run, runtime_dir: Path, control: Path, nproc: int, *extra: str
) -> tuple[dict[int, dict[int, dict[str, Any]]], dict[str, Any]]:
    """Start a job, fork it to checkpoint 3 after two steps, let it take two more; (its steps, checked identical on
    every rank, and the outcome)."""
    job = Job(python, run, runtime_dir, control, nproc, *extra)
    try:
        job.wait_steps(2)
        outcome = run.fork(3)
        job.wait_steps(job.last_step() + 2)
    finally:
        job.stop()
    return assert_ranks_identical(job), outcome


def fork_once_in_a_new_job(python: Path, run: Run, runtime_dir: Path, control: Path, nproc: int, *extra: str) -> None:
    """fork_a_new_job, and the fork loaded by every rank at one step."""
    steps, outcome = fork_a_new_job(python, run, runtime_dir, control, nproc, *extra)
    check_fork_landed(steps, assert_loaded_together(outcome, nproc), run.tensors_of(3))


def test_four_ranks_with_broadcast_buffers_load_a_fork_at_one_step(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    fork_once_in_a_new_job(trainer_python, daemon[0], runtime_dir, tmp_path / "control", 4)


def test_fsdp2_sharded_lora_loads_each_ranks_shard_at_the_same_step(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    # Fingerprints over the full tensors: a shard loaded a step early or late would show half old, half new.
    fork_once_in_a_new_job(trainer_python, daemon[0], runtime_dir, tmp_path / "control", 2, "--fsdp")


def test_ranks_accumulating_gradients_load_a_fork_at_one_optimizer_step_never_between_micro_batches(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    # Three forward/backward passes per optimizer step, DDP's all-reduce on the last (no_sync() before): a load
    # between two of them would make that step start from the old weights and finish on the forked ones, which the
    # fingerprints of each step's first forward show.
    fork_once_in_a_new_job(trainer_python, daemon[0], runtime_dir, tmp_path / "control", 2, "--accumulate", "3")


@pytest.mark.parametrize(
    "layout",
    [
        # A unit per decoder layer and the root, use_orig_params: each LoRA parameter a 1-D slice of its layer's
        # FlatParameter shard (or nothing), the PEFT model registered before it was wrapped.
        ("--fsdp1", "layers"),
        # peft's fsdp_auto_wrap_policy, no use_orig_params: each LoRA layer its own unit, optimizers over the
        # FlatParameters, the FullyShardedDataParallel root registered.
        ("--fsdp1", "lora-units", "--register-wrapped"),
    ],
    ids=["orig-params-layer-units", "flat-params-lora-units"],
)
def test_fsdp1_sharded_lora_loads_each_ranks_own_slice_at_the_same_step(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path, layout: tuple[str, ...]
) -> None:
    # The fingerprints are over the full tensors, gathered on every rank (summon_full_params). The old code refused
    # FSDP1 on every rank ("no checkpoint tensor fits") and the job trained on unforked.
    fork_once_in_a_new_job(trainer_python, daemon[0], runtime_dir, tmp_path / "control", 2, *layout)


def test_fsdp1_flat_parameter_mixing_lora_with_other_trained_weights_is_refused_on_every_rank(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    # Without use_orig_params the optimizer holds the FlatParameter: its state cannot be reset for the LoRA part
    # alone, so the fork is refused with one sentence before any rank changes anything; the job trains on.
    run = daemon[0]
    layout = ("--fsdp1", "root-all-trainable")
    steps, refused = fork_a_new_job(trainer_python, run, runtime_dir, tmp_path / "control", 2, *layout)
    forked = run.tensors_of(3)
    assert all(r["after"] != forked for ranks in steps.values() for r in ranks.values())
    assert refused["status"] == "failed", refused
    agents = {a["rank"]: a for a in refused["trainers"]["agents"]}
    assert sorted(agents) == [0, 1] and {a["reason"] for a in agents.values()} == {"trainer_load_failed"}, agents
    for agent in agents.values():
        assert "without use_orig_params holds LoRA tensors together with" in agent["error"], agent["error"]
        assert "use_orig_params=True" in agent["error"], agent["error"]


def test_a_rank_whose_apply_fails_after_the_vote_makes_every_rank_put_its_pre_fork_weights_back(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    # Rank 1's first apply copies one tensor and fails (the mock in ddp_script.py: a CPU job has no such real fault).
    run = daemon[0]
    job = Job(trainer_python, run, runtime_dir, tmp_path / "control", 2, "--fail-apply-rank", "1")
    try:
        job.wait_steps(2)
        failed = run.fork(3)
        job.wait_steps(job.last_step() + 2)
        later = run.fork(4)  # the agreement goes on after a roll-back
        job.wait_steps(job.last_step() + 2)
    finally:
        job.stop()
    steps = assert_ranks_identical(job)  # the old code: rank 0 kept the fork, rank 1 one tensor of it
    forked = run.tensors_of(3)
    assert all(r["after"] != forked for ranks in steps.values() for r in ranks.values())
    assert failed["status"] == "failed", failed
    agents = {a["rank"]: a for a in failed["trainers"]["agents"]}
    assert sorted(agents) == [0, 1] and {a["reason"] for a in agents.values()} == {"trainer_load_failed"}
    for agent in agents.values():  # every rank names the rank that failed and why
        error = agent["error"]
        assert "rank 1 could not put it into its model (rank 1: RuntimeError: CUDA out of memory" in error, error
        assert error.endswith("every rank put its pre-fork weights back"), error
    check_fork_landed(steps, assert_loaded_together(later, 2), run.tensors_of(4))


def test_a_rank_with_two_registered_models_reports_the_job_fields_and_the_step_of_the_load(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    # Each agent combines its two targets' replies into one entry of trainers.agents (the old code dropped
    # loaded_at_step and applied there).
    fork_once_in_a_new_job(trainer_python, daemon[0], runtime_dir, tmp_path / "control", 2, "--second-model")


def fork_with_a_rank_held(
    python: Path, run: Run, runtime_dir: Path, control: Path, phase: str, seconds: float
) -> tuple[dict[int, dict[int, dict[str, Any]]], dict[str, Any]]:
    """Fork a new 2-rank job to checkpoint 3 while rank 1's `phase` of the load ("apply" or "read", ddp_script's
    mocks of a slow copy or a slow filesystem) is held until `seconds` after the marker; (its steps, the outcome)."""
    job = Job(python, run, runtime_dir, control, 2, f"--hold-{phase}-rank", "1")
    held = job.control / f"hold-{phase}-1"
    try:
        job.wait_steps(2)
        held.touch()
        after = run.mark(3)
        wait_for(lambda: (job.control / f"holding-{phase}-1").exists(), 30, f"rank 1 to start the {phase}")
        time.sleep(max(0.0, after + seconds - time.time()))
        held.unlink()
        outcome = wait_outcome(run.model_dir, 60, after)
        job.wait_steps(job.last_step() + 3)
    finally:
        held.unlink(missing_ok=True)
        job.stop()
    return assert_ranks_identical(job), outcome


def test_a_load_that_ends_after_the_calls_timeout_is_reported_loaded_not_failed(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    # Rank 1's apply is held inside the agreed step past the agents' 6 s to answer (half the 12 s agent timeout),
    # within the daemon's 12 s call: both answer `load_in_progress`, and the daemon asks their status until the load
    # ends. The old code answered "no rank loaded it", filed `failed`, and both ranks then loaded it.
    run = daemon[0]
    steps, outcome = fork_with_a_rank_held(trainer_python, run, runtime_dir, tmp_path / "control", "apply", 9.0)
    check_fork_landed(steps, assert_loaded_together(outcome, 2), run.tensors_of(3))
    assert {a["answered"] for a in outcome["trainers"]["agents"]} == {"late, through status"}, outcome


def test_a_read_that_outlasts_the_request_is_loaded_by_no_rank_as_the_agents_said(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    # Rank 1's read of the file is held in the agreed step until its request has expired (past the agents' 6 s);
    # rank 0 has read it and waits in the vote. Every rank must then vote "too late": the old code checked the
    # deadline only before reading, answered "no rank loaded it", and then both ranks loaded it.
    run = daemon[0]
    steps, outcome = fork_with_a_rank_held(trainer_python, run, runtime_dir, tmp_path / "control", "read", 8.0)
    forked = run.tensors_of(3)
    loaded = [s for s, ranks in steps.items() if any(r["after"] == forked for r in ranks.values())]
    assert not loaded, f"fork loaded after the outcome said failed, at step(s) {loaded}"
    assert outcome["status"] == "failed", outcome
    for agent in outcome["trainers"]["agents"]:
        assert "no rank loaded it" in agent["error"], agent


def told_of_a_fork(runtime_dir: Path, pid: int) -> bool:
    """Whether the agent of `pid` has recorded a fork for the ranks to agree on (its `status`)."""
    reply = call_agent(agent_socket_path(runtime_dir, os.geteuid(), pid), {"op": "status"}, timeout=10, pid=pid)
    return any("told" in t.get("ranks", {}) for t in reply.get("targets", []))


def test_a_fork_given_up_on_while_a_rank_was_stopped_is_never_loaded_when_it_continues(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    run = daemon[0]
    job = Job(trainer_python, run, runtime_dir, tmp_path / "control", 2)
    control, forked = job.control, run.tensors_of(3)
    try:
        job.wait_steps(2)
        # Both ranks wait before an optimizer step, so both are told of the fork before either reaches a boundary.
        for name in ("hold-0", "hold-1", "hold-after-1"):
            (control / name).touch()
        wait_for(lambda: all((control / f"holding-{r}").exists() for r in (0, 1)), 60, "both ranks to hold")
        done = len(job.steps(0))
        after = run.mark(3)
        wait_for(lambda: all(told_of_a_fork(runtime_dir, pid) for pid in job.pids), 60, "both ranks to be told")
        # The next boundary offers the fork on both ranks (the reduce in flight); rank 1 then stops before the
        # boundary that reads it, past the daemon's timeout (its agent thread cannot answer: the stage fails).
        (control / "hold-0").unlink()
        (control / "hold-1").unlink()
        wait_for(lambda: (control / "holding-after-1").exists(), 60, "rank 1 past its step boundary")
        wait_for(lambda: len(job.steps(0)) > done, 60, "rank 0 past its step boundary")
        os.kill(job.pids[1], signal.SIGSTOP)
        try:
            (control / "hold-after-1").unlink()
            outcome = wait_outcome(run.model_dir, 90, after)
        finally:
            os.kill(job.pids[1], signal.SIGCONT)
        job.wait_steps(job.last_step() + 3)  # the boundaries that read the reduce in flight, and more
    finally:
        job.stop()
    assert outcome["status"] == "failed", outcome
    steps = assert_ranks_identical(job)
    loaded = [s for s, ranks in steps.items() if any(r["after"] == forked for r in ranks.values())]
    assert not loaded, f"fork loaded after the outcome said failed, at step(s) {loaded}"  # the old code: both ranks


def test_the_handshake_gives_up_within_the_groups_timeout_so_a_rank_without_register_keeps_the_job_alive(
    trainer_python: Path, runtime_dir: Path, tmp_path: Path
) -> None:
    # The job's collectives time out after 40 s, the handshake's default wait is 60 s: waited out in full, rank 1
    # (no register(), so never in the handshake) would time out in its next all_reduce meanwhile and end the job.
    run = Run(tmp_path, tiny_assets())
    extra = ("--pg-timeout", "40", "--no-register-rank", "1")
    job = Job(trainer_python, run, runtime_dir, tmp_path / "control", 2, *extra)
    try:
        job.wait_steps(4)  # the old code: rank 1 timed out at 40 s, torchrun ended the job
        pid = job.pids[0]
        status = call_agent(agent_socket_path(runtime_dir, os.geteuid(), pid), {"op": "status"}, timeout=10, pid=pid)
    finally:
        job.stop()
    off = status["targets"][0]["ranks"]["off"]
    assert "rank(s) 1 of the 2-rank job reached no optimizer step with the fork-sidecar preload" in off, off
    assert "within 20s" in off, off  # half the group's timeout, not the 60 s default
    assert_ranks_identical(job)


def test_under_ddp_join_a_rank_out_of_inputs_keeps_the_job_in_step_and_no_rank_loads_meanwhile(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    # Rank 1 stops after 4 steps inside `with Join([ddp_model])`; rank 0 trains on until `exit`. The old code's
    # per-step reduce on rank 0 had no partner on rank 1 (Join's own collectives got it): the job broke.
    run, forked = daemon[0], daemon[0].tensors_of(3)
    job = Job(trainer_python, run, runtime_dir, tmp_path / "control", 2, "--uneven-rank", "1", "--uneven-steps", "4")
    try:
        wait_for(lambda: len(job.steps(1)) >= 4 and len(job.steps(0)) >= 7, START_S, "rank 0 to train past rank 1")
        outcome = run.fork(3)  # rank 1 no longer trains: nobody loads
        (job.control / "exit").touch()
        assert job.proc.wait(START_S) == 0, job.output()
    finally:
        job.stop()
    assert len(job.steps(1)) == 4 and len(job.steps(0)) > 7
    assert_ranks_identical(job)  # steps 1-4, which both ranks trained
    assert all(r["after"] != forked for r in job.steps(0))
    assert outcome["status"] == "failed", outcome
    agents = {a["rank"]: a for a in outcome["trainers"]["agents"]}
    assert "run out of inputs and joined (DDP Join)" in agents[1]["error"], agents[1]


# The 2-rank job below is shared by the last two tests (module scope: it stops when the module ends).
def test_two_forks_back_to_back_one_during_a_checkpoint_save_land_on_every_rank_at_one_step(
    pair_job: tuple[Run, Job],
) -> None:
    run, job = pair_job
    first = run.fork(3)
    wait_for(lambda: (job.control / "saving").exists(), 60, "rank 0 to save a checkpoint")
    second = run.fork(2)  # told while rank 0 writes its checkpoint: back to adapter A's tensors
    job.wait_steps(job.last_step() + 4)
    steps = assert_ranks_identical(job)  # first: on the old code this is what fails
    saves = [r for r in job.records(0) if "saved" in r and r["saved"] in steps]
    for saved in saves:  # each save holds exactly the weights of the step it followed: never half old, half new
        assert saved["fingerprint"] == steps[saved["saved"]][0]["after"], saved
    at_first, at_second = assert_loaded_together(first, 2), assert_loaded_together(second, 2)
    assert at_second > at_first and any(s["saved"] < at_second for s in saves)
    check_fork_landed(steps, at_first, run.tensors_of(3))
    check_fork_landed(steps, at_second, run.tensors_of(2))


def test_a_stopped_or_hung_rank_fails_the_fork_naming_it_and_no_rank_loads_alone(pair_job: tuple[Run, Job]) -> None:
    run, job = pair_job
    control = job.control
    forked = run.tensors_of(4)
    # Stopped before the fork: its agent cannot answer hello, so nobody is told.
    os.kill(job.pids[1], signal.SIGSTOP)
    try:
        stopped = run.fork(4)
    finally:
        os.kill(job.pids[1], signal.SIGCONT)
    # Hung mid-fork: rank 1 stops inside a step (after backward), rank 0 then waits in DDP's own all_reduce.
    (control / "hold-1").touch()
    wait_for(lambda: (control / "holding-1").exists(), 30, "rank 1 to hold")
    hung = run.fork(4)
    (control / "hold-1").unlink()
    job.wait_steps(job.last_step() + 3)
    after = run.fork(4)  # the same checkpoint once both ranks step again
    job.wait_steps(job.last_step() + 2)
    steps = assert_ranks_identical(job)
    at = assert_loaded_together(after, 2)
    assert all(r["after"] != forked for s, ranks in steps.items() if s < at for r in ranks.values())
    check_fork_landed(steps, at, forked)

    assert stopped["status"] == "failed"
    error = stopped["trainers"]["error"]
    assert error.startswith("rank 1 of the 2-rank job training ") and f"pid(s) {job.pids[1]}" in error, error
    assert stopped["trainers"]["agents"] == []  # rank 0 was never told
    assert stopped["trainers"]["jobs"][0]["ranks_missing"] == [1]
    assert stopped["trainers"]["reason"] == "trainer_ranks_missing"

    assert hung["status"] == "failed"
    agents = {a["rank"]: a for a in hung["trainers"]["agents"]}
    assert sorted(agents) == [0, 1] and {a["result"] for a in agents.values()} == {"failed"}
    assert "rank 0 of 2" in agents[0]["error"] and "no rank loaded it" in agents[0]["error"], agents[0]
    assert "rank 1 of 2" in agents[1]["error"], agents[1]
