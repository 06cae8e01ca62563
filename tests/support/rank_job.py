"""Distributed-trainer test parts: a run dir with checkpoints to fork to, a torchrun job of `ddp_script.py` (on one
node, or one node's share of a job spread over several simulated nodes of this host), and the checks on the ranks'
per-step fingerprints that tests/test_ranks.py and tests/test_ranks_across_nodes.py share."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support.daemon import wait_for, wait_outcome
from tests.support.ddp_script import fingerprint
from tests.support.ports import free_port
from tests.support.tiny_model import TinyAssets, tiny_assets

__all__ = [
    "START_S",
    "Job",
    "Run",
    "StepLog",
    "assert_ranks_identical",
    "check_fork_landed",
    "free_port",
    "short_dir",
]

SCRIPT = Path(__file__).resolve().parent / "ddp_script.py"
START_S = 120.0


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fs-rk-", dir="/tmp"))  # short: socket paths are limited to 107 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Run:
    """A run dir whose 0000 is adapter A; 0002 holds A too, 0003 holds B and 0004 B halved (each fork changes the
    weights: training has moved away from A by then)."""

    def __init__(self, root: Path, assets: TinyAssets) -> None:
        from safetensors.torch import load_file, save_file

        self.art = root / "art"
        self.model_dir = self.art / "proj" / "models" / "m"
        checkpoints = self.model_dir / "checkpoints"
        shutil.copytree(assets.adapter_a, checkpoints / "0000")
        shutil.copytree(assets.adapter_a, checkpoints / "0002")
        shutil.copytree(assets.adapter_b, checkpoints / "0003")
        shutil.copytree(assets.adapter_b, checkpoints / "0004")
        halved = {k: v * 0.5 for k, v in load_file(str(checkpoints / "0003" / "adapter_model.safetensors")).items()}
        save_file(halved, str(checkpoints / "0004" / "adapter_model.safetensors"))

    def tensors_of(self, step: int) -> str:
        from safetensors.torch import load_file

        path = self.model_dir / "checkpoints" / f"{step:04d}" / "adapter_model.safetensors"
        return fingerprint(dict(load_file(str(path))))

    def mark(self, step: int) -> float:
        """Write the `.fork` marker; returns the time an outcome of it is newer than."""
        after = time.time()
        tmp = self.model_dir / ".fork.tmp"
        tmp.write_text(f"step: {step}\n")
        tmp.replace(self.model_dir / ".fork")
        return after

    def fork(self, step: int, *, timeout: float = 90.0) -> dict[str, Any]:
        return wait_outcome(self.model_dir, timeout, self.mark(step))


class StepLog:
    """What the ranks `ranks` of a job logged in `control` (ddp_script.py writes one file per global rank)."""

    def __init__(self, control: Path, ranks: Sequence[int]) -> None:
        self.control, self.ranks = control, list(ranks)

    def records(self, rank: int) -> list[dict[str, Any]]:
        try:
            lines = (self.control / f"steps-{rank}.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def steps(self, rank: int) -> list[dict[str, Any]]:
        return [r for r in self.records(rank) if "step" in r]

    def last_step(self) -> int:
        return max(len(self.steps(r)) for r in self.ranks)

    def wait_steps(self, n: int) -> None:
        wait_for(lambda: all(len(self.steps(r)) >= n for r in self.ranks), START_S, f"{n} steps on every rank")

    def by_step(self) -> dict[int, dict[int, dict[str, Any]]]:
        """step -> rank -> that rank's record of the step, over the steps every rank logged."""
        per_rank = {rank: {r["step"]: r for r in self.steps(rank)} for rank in self.ranks}
        common = set.intersection(*(set(p) for p in per_rank.values()))
        return {step: {rank: per_rank[rank][step] for rank in self.ranks} for step in sorted(common)}


class Job(StepLog):
    """One torchrun of `ddp_script.py`: a whole job on this node, or with `node=(node_rank, nnodes, port)` the
    `nproc` ranks of one node of a job over `nnodes` simulated nodes (static rendezvous on 127.0.0.1:port; start
    every node's Job with `wait=False`, then `wait_ready()` each: no rank starts before all nodes have joined)."""

    def __init__(
        self,
        python: Path,
        run: Run,
        runtime_dir: Path,
        control: Path,
        nproc: int,
        *extra: str,
        node: tuple[int, int, int] | None = None,
        wait: bool = True,
    ) -> None:
        node_rank, nnodes, port = node if node is not None else (0, 1, 0)
        super().__init__(control, range(node_rank * nproc, (node_rank + 1) * nproc))
        control.mkdir(parents=True, exist_ok=True)
        self.nproc = nproc
        self.log_path = control / f"torchrun-{node_rank}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        launch = [str(python), "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        if node is None:
            launch.append("--standalone")
        else:
            launch += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--master-addr=127.0.0.1"]
            launch.append(f"--master-port={port}")
        args = ["--base", str(tiny_assets().base), "--adapter", str(run.model_dir / "checkpoints" / "0000")]
        self.proc = subprocess.Popen(
            [*launch, str(SCRIPT), *args, "--run-dir", str(run.model_dir), "--control", str(control), *extra],
            env={**os.environ, "FORK_SIDECAR_RUNTIME_DIR": str(runtime_dir), "OMP_NUM_THREADS": "1"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd="/",
            start_new_session=True,  # torchrun does not pass a SIGKILL on to its ranks: stop() kills the group
        )
        self.pids: list[int] = []
        if wait:
            self.wait_ready()

    def wait_ready(self) -> list[int]:
        """The pids of this node's ranks, once each has registered its model."""
        self.pids = [int(self._ready(r)["pid"]) for r in self.ranks]
        return self.pids

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
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        (self.control / "exit").touch()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for pid in self.pids:  # a hung job's ranks were seen to outlive torchrun (left with parent 1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


def assert_ranks_identical(job: StepLog) -> dict[int, dict[int, dict[str, Any]]]:
    steps = job.by_step()
    split = [s for s, ranks in steps.items() if len({r["after"] for r in ranks.values()}) > 1]
    assert not split, f"the ranks' LoRA weights differ after {len(split)} of {len(steps)} steps: {split[:10]}"
    return steps


def check_fork_landed(steps: dict[int, dict[int, dict[str, Any]]], at: int, forked: str) -> None:
    """After optimizer step `at` every rank holds the forked tensors, and step at+1 trains from them."""
    assert {r["after"] for r in steps[at].values()} == {forked}
    first = min(steps[at])
    if at + 1 in steps and steps[at + 1][first]["start"]:  # DDP: step at+1's forward trained from them
        assert {r["start"][0] for r in steps[at + 1].values()} == {forked}
    assert all(r["after"] != forked for r in steps.get(at - 1, {}).values())
