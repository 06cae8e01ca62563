"""Distributed trainers with real parts: a torchrun gloo job on CPU (2 and 4 ranks, DDP and FSDP2), the preload
installed by the CLI into the ranks' venv, the real daemon and real `.fork` markers.

Each rank logs a fingerprint of its LoRA tensors after every optimizer step (`tests/support/ddp_script.py`). The
tests check that the ranks' weights are identical after every step, that from the step the outcome names
(`loaded_at_step`, the same on every rank) they are the forked tensors, and what happens when a rank hangs or
goes missing. Rank 0 waits longer between steps than the others, as it does in real jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from tests.support.daemon import DaemonProcess, wait_for, wait_outcome, write_config  # noqa: E402
from tests.support.ddp_script import fingerprint  # noqa: E402
from tests.support.tiny_model import TinyAssets, tiny_assets  # noqa: E402
from tests.support.venvs import chained_venv, install_preload  # noqa: E402

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "support" / "ddp_script.py"
START_S = 120.0


@pytest.fixture(scope="module")
def assets() -> TinyAssets:
    return tiny_assets()


@pytest.fixture(scope="module")
def trainer_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    python = chained_venv(tmp_path_factory.mktemp("ranks-venv"))
    install = install_preload(python)
    assert install.returncode == 0, install.stderr
    return python


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fs-rk-", dir="/tmp"))  # short: socket paths are limited to 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Run:
    """A run dir whose 0000 is adapter A; 0002 holds A too and 0003 holds B (forks to either change the weights)."""

    def __init__(self, root: Path, assets: TinyAssets) -> None:
        self.art = root / "art"
        self.model_dir = self.art / "proj" / "models" / "m"
        shutil.copytree(assets.adapter_a, self.model_dir / "checkpoints" / "0000")
        shutil.copytree(assets.adapter_a, self.model_dir / "checkpoints" / "0002")
        shutil.copytree(assets.adapter_b, self.model_dir / "checkpoints" / "0003")

    def tensors_of(self, step: int) -> str:
        path = self.model_dir / "checkpoints" / f"{step:04d}" / "adapter_model.safetensors"
        return fingerprint(dict(load_file(str(path))))

    def fork(self, step: int, *, timeout: float = 90.0) -> dict[str, Any]:
        after = time.time()
        tmp = self.model_dir / ".fork.tmp"
        tmp.write_text(f"step: {step}\n")
        tmp.replace(self.model_dir / ".fork")
        return wait_outcome(self.model_dir, timeout, after)


class Job:
    """One torchrun job of `ddp_script.py`."""

    def __init__(self, python: Path, run: Run, runtime_dir: Path, control: Path, nproc: int, *extra: str) -> None:
        control.mkdir(parents=True)
        self.control, self.nproc = control, nproc
        self.log = open(control / "torchrun.log", "wb")  # noqa: SIM115 - closed in stop()
        launch = [str(python), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        args = ["--base", str(tiny_assets().base), "--adapter", str(run.model_dir / "checkpoints" / "0000")]
        self.proc = subprocess.Popen(
            [*launch, str(SCRIPT), *args, "--run-dir", str(run.model_dir), "--control", str(control), *extra],
            env={**os.environ, "FORK_SIDECAR_RUNTIME_DIR": str(runtime_dir), "OMP_NUM_THREADS": "1"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd="/",
        )
        self.pids = [int(self._ready(r)["pid"]) for r in range(nproc)]

    def _ready(self, rank: int) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"torchrun exited with {self.proc.returncode}:\n{self.output()}")
            try:
                return dict(json.loads((self.control / f"ready-{rank}.json").read_text()))
            except (FileNotFoundError, ValueError):
                return None

        result: dict[str, Any] = wait_for(ready, START_S, f"rank {rank} to register")
        return result

    def output(self) -> str:
        return (self.control / "torchrun.log").read_text(errors="replace")[-6000:]

    def records(self, rank: int) -> list[dict[str, Any]]:
        try:
            lines = (self.control / f"steps-{rank}.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def steps(self, rank: int) -> list[dict[str, Any]]:
        return [r for r in self.records(rank) if "step" in r]

    def wait_steps(self, n: int) -> None:
        wait_for(lambda: all(len(self.steps(r)) >= n for r in range(self.nproc)), START_S, f"{n} steps on every rank")

    def stop(self) -> None:
        (self.control / "exit").touch()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def daemon(tmp_path: Path, runtime_dir: Path) -> Iterator[tuple[Run, DaemonProcess]]:
    run = Run(tmp_path, tiny_assets())
    config = write_config(
        tmp_path / "config.yaml",
        [run.art],
        tmp_path / "state",
        runtime_dir,
        trainer={"required": True, "agent_timeout": "12s", "retries": 0},
    )
    with DaemonProcess(config, tmp_path / "daemon.log") as process:
        yield run, process


def by_step(job: Job) -> dict[int, dict[int, dict[str, Any]]]:
    """step -> rank -> that rank's record of the step, over the steps every rank logged."""
    per_rank = [{r["step"]: r for r in job.steps(rank)} for rank in range(job.nproc)]
    common = set.intersection(*(set(p) for p in per_rank))
    return {step: {rank: per_rank[rank][step] for rank in range(job.nproc)} for step in sorted(common)}


def assert_ranks_identical(job: Job) -> dict[int, dict[int, dict[str, Any]]]:
    steps = by_step(job)
    split = [s for s, ranks in steps.items() if len({r["after"] for r in ranks.values()}) > 1]
    assert not split, f"the ranks' LoRA weights differ after {len(split)} of {len(steps)} steps: {split[:10]}"
    return steps


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


def check_fork_landed(steps: dict[int, dict[int, dict[str, Any]]], at: int, forked: str) -> None:
    """After optimizer step `at` every rank holds the forked tensors, and step at+1 trains from them."""
    assert {r["after"] for r in steps[at].values()} == {forked}
    if at + 1 in steps and steps[at + 1][0]["start"]:  # DDP: step at+1's forward trained from them
        assert {r["start"][0] for r in steps[at + 1].values()} == {forked}
    assert all(r["after"] != forked for r in steps.get(at - 1, {}).values())


@pytest.mark.parametrize(
    ("nproc", "extra"),
    [(2, ("--no-broadcast-buffers",)), (4, ())],
    ids=["2-ranks-broadcast-buffers-off", "4-ranks-broadcast-buffers-on"],
)
def test_every_rank_loads_each_fork_at_the_same_step(
    trainer_python: Path,
    runtime_dir: Path,
    daemon: tuple[Run, DaemonProcess],
    tmp_path: Path,
    nproc: int,
    extra: tuple[str, ...],
) -> None:
    run, _ = daemon
    job = Job(trainer_python, run, runtime_dir, tmp_path / "control", nproc, *extra)
    try:
        job.wait_steps(3)
        outcomes = [run.fork(3), run.fork(2)]  # the second straight after, back to adapter A's tensors
        job.wait_steps(max(len(job.steps(r)) for r in range(nproc)) + 3)
    finally:
        job.stop()
    steps = assert_ranks_identical(job)  # first: on the old code this is what fails
    first, second = (assert_loaded_together(o, nproc) for o in outcomes)
    assert second > first
    check_fork_landed(steps, first, run.tensors_of(3))
    check_fork_landed(steps, second, run.tensors_of(2))


def test_fsdp2_sharded_lora_loads_each_ranks_shard_at_the_same_step(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    run, _ = daemon
    job = Job(trainer_python, run, runtime_dir, tmp_path / "control", 2, "--fsdp")
    try:
        job.wait_steps(3)
        outcome = run.fork(3)
        job.wait_steps(max(len(job.steps(r)) for r in range(2)) + 2)
    finally:
        job.stop()
    at = assert_loaded_together(outcome, 2)
    # Fingerprints over the full tensors: a shard loaded a step early or late would show half old, half new.
    steps = assert_ranks_identical(job)
    check_fork_landed(steps, at, run.tensors_of(3))


def test_a_fork_during_a_checkpoint_save_never_lands_inside_it(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    run, _ = daemon
    job = Job(trainer_python, run, runtime_dir, tmp_path / "control", 2, "--save-every", "2", "--save-seconds", "0.6")
    try:
        job.wait_steps(2)
        outcome = run.fork(3)
        job.wait_steps(max(len(job.steps(r)) for r in range(2)) + 4)
    finally:
        job.stop()
    steps = assert_ranks_identical(job)
    at = assert_loaded_together(outcome, 2)
    check_fork_landed(steps, at, run.tensors_of(3))
    saves = [r for r in job.records(0) if "saved" in r]
    assert len(saves) >= 3
    for save in saves:  # each save holds exactly the weights of the step it followed: never half old, half new
        assert save["fingerprint"] == steps[save["saved"]][0]["after"], save


def test_a_hung_rank_mid_fork_keeps_every_rank_on_the_old_weights(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    run, _ = daemon
    job = Job(trainer_python, run, runtime_dir, tmp_path / "control", 2, "--no-broadcast-buffers")
    control = job.control
    try:
        job.wait_steps(2)
        (control / "hold-1").touch()  # rank 1 stops inside a step; rank 0 soon waits in DDP's all_reduce
        wait_for(lambda: (control / "holding-1").exists(), 30, "rank 1 to hold")
        outcome = run.fork(3)
        assert outcome["status"] == "failed"
        agents = {a["rank"]: a for a in outcome["trainers"]["agents"]}
        assert sorted(agents) == [0, 1] and {a["result"] for a in agents.values()} == {"failed"}
        assert "no rank loaded it" in agents[0]["error"] and "rank 0 of 2" in agents[0]["error"]
        assert "rank 1 of 2" in agents[1]["error"]
        (control / "hold-1").unlink()
        job.wait_steps(len(job.steps(0)) + 4)
    finally:
        job.stop()
    steps = assert_ranks_identical(job)
    forked = run.tensors_of(3)
    assert all(r["after"] != forked for ranks in steps.values() for r in ranks.values())


def test_a_stopped_rank_fails_the_fork_naming_it_and_nobody_is_told(
    trainer_python: Path, runtime_dir: Path, daemon: tuple[Run, DaemonProcess], tmp_path: Path
) -> None:
    run, _ = daemon
    job = Job(trainer_python, run, runtime_dir, tmp_path / "control", 2, "--no-broadcast-buffers")
    try:
        job.wait_steps(2)
        os.kill(job.pids[1], signal.SIGSTOP)  # its agent cannot answer hello either
        try:
            outcome = run.fork(3)
        finally:
            os.kill(job.pids[1], signal.SIGCONT)
        assert outcome["status"] == "failed"
        error = outcome["trainers"]["error"]
        assert error.startswith("rank 1 of the 2-rank job training ") and f"pid(s) {job.pids[1]}" in error, error
        assert outcome["trainers"]["agents"] == []  # rank 0 was never told
        assert outcome["trainers"]["jobs"][0]["ranks_missing"] == [1]
        job.wait_steps(len(job.steps(0)) + 3)
    finally:
        job.stop()
    steps = assert_ranks_identical(job)
    assert all(r["after"] != run.tensors_of(3) for ranks in steps.values() for r in ranks.values())
