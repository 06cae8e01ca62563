"""What the ranks' agreement costs a torch.distributed trainer (sidecar/preload/rank_agreement.py).

    .venv/bin/python -m bench.ranks_bench [--nproc 2] [--backend gloo|nccl] [--repeat 3] [--steps 60] [--forks 5]

Three tables, each against a baseline measured in the same run (medians):

1. steps/s of the tiny-Llama LoRA job of `tests/support/ddp_script.py` (DDP, torchrun, `--nproc` ranks) with the
   preload's `register()` (so an agreement at every optimizer step) and with `FORK_SIDECAR_PRELOAD=0` (nothing),
   interleaved `--repeat` times each; target: without / with <= 1.01x the time per step;
2. the agreement's own cost per step: `RankAgreement.at_boundary()` (read the reduce started a step earlier, start
   the next) in a loop with a little work between calls, against a blocking `all_reduce` of the same two int64s
   (the design it replaced: a round trip every step), microseconds, rank 0;
3. fork latency: the trainers stage (`TrainerStage.run`, the daemon side) from the first `hello` to the last reply,
   for the DDP job against a single-process trainer (`tests/support/trainer_script.py`) stepping at the same pace.

`--backend nccl` runs the ranks on one GPU each (`--nproc` <= the GPUs); the rest is the same. Prints the tables;
exits 1 when the steps/s ratio misses the target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "support" / "ddp_script.py"
SINGLE = REPO / "tests" / "support" / "trainer_script.py"
TARGET = 1.01


def _env(runtime_dir: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "FORK_SIDECAR_RUNTIME_DIR": str(runtime_dir), "OMP_NUM_THREADS": "1"}
    return {**env, **extra}


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(SCRIPT)]


def _job_args(base: Path, run_dir: Path, control: Path, backend: str) -> list[str]:
    adapter = run_dir / "checkpoints" / "0000"
    paths = ["--base", str(base), "--adapter", str(adapter), "--run-dir", str(run_dir), "--control", str(control)]
    return [*paths, "--backend", backend]


def steps_per_second(args: argparse.Namespace, base: Path, run_dir: Path, work: Path) -> dict[str, list[float]]:
    """Seconds per step of rank 0 (steady state), with and without the preload, interleaved."""
    out: dict[str, list[float]] = {"without": [], "with": []}
    for i in range(args.repeat):
        for side in ("without", "with"):
            control = work / f"sps-{side}-{i}"
            control.mkdir()
            env = _env(work / "rt", **({"FORK_SIDECAR_PRELOAD": "0"} if side == "without" else {}))
            cmd = _torchrun(args.nproc) + _job_args(base, run_dir, control, args.backend)
            cmd += ["--steps", str(args.steps), "--warmup", "10", "--no-record", "--pause", "0", "--rank0-pause", "0"]
            subprocess.run(cmd, env=env, check=True, capture_output=True, cwd="/")
            timing = json.loads((control / "timing-0.json").read_text())
            out[side].append(timing["seconds"] / timing["steps"])
    return out


_BOUNDARY_CODE = r"""
import os, sys, time, json, statistics
import torch, torch.distributed as dist
from pathlib import Path
from sidecar.preload.rank_agreement import LoadHooks, RankAgreement
import contextlib
dist.init_process_group(sys.argv[1])
rank = dist.get_rank()
cuda = sys.argv[1] == "nccl"
if cuda:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
device = torch.device("cuda") if cuda else torch.device("cpu")
hooks = LoadHooks(prepare=lambda p: None, apply=lambda p: "", steps=lambda: 0, hold_forwards=contextlib.nullcontext)
agreement = RankAgreement(hooks)
work = torch.randn(256, 256, device=device)
def between():  # a little work, so a reduce started at one call has time to finish before the next
    for _ in range(20):
        work.mul_(0.999)
n = int(sys.argv[2])
agreement.at_boundary()  # the handshake
ours, blocking = [], []
buf = torch.zeros(2, dtype=torch.int64, device=device)
for i in range(n):
    between()
    t = time.perf_counter(); agreement.at_boundary(); ours.append(time.perf_counter() - t)
    between()
    t = time.perf_counter()
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    buf.tolist()
    blocking.append(time.perf_counter() - t)
assert agreement.off is None, agreement.off
if rank == 0:
    print(json.dumps({"ours": statistics.median(ours) * 1e6, "blocking": statistics.median(blocking) * 1e6}))
dist.destroy_process_group()
"""


def boundary_cost(args: argparse.Namespace, work: Path) -> dict[str, float]:
    code = work / "boundary.py"
    code.write_text(_BOUNDARY_CODE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", str(code)]
    done = subprocess.run(
        [*cmd, args.backend, "2000"], env=_env(work / "rt"), check=True, capture_output=True, text=True
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def fork_latency(
    args: argparse.Namespace, base: Path, adapters: tuple[Path, Path], work: Path
) -> dict[str, list[float]]:
    """Trainers-stage seconds per fork: a single-process trainer, then the DDP job, both stepping every 50 ms."""
    import dataclasses

    from sidecar.adapter import adapter_digest
    from sidecar.config import load_config
    from sidecar.stages import ForkContext
    from sidecar.trainers import TrainerStage
    from tests.support.trainer_script import stop_trainer

    runtime = work / "rt"
    runtime.mkdir(exist_ok=True)
    config = load_config(None)
    stage = TrainerStage(dataclasses.replace(config, runtime_dir=runtime))
    out: dict[str, list[float]] = {}
    for side in ("single process", f"DDP, {args.nproc} ranks"):
        run_dir = work / side.replace(" ", "-").replace(",", "") / "art" / "p" / "models" / "m"
        shutil.copytree(adapters[0], run_dir / "checkpoints" / "0000")
        control = run_dir.parents[3] / "control"
        control.mkdir()
        if side == "single process":
            cmd = [sys.executable, str(SINGLE), "--base", str(base), "--adapter", str(run_dir / "checkpoints" / "0000")]
            cmd += ["--run-dir", str(run_dir), "--control", str(control), "--step-pause", "0.05"]
            ready = [control / "ready.json"]
        else:
            cmd = _torchrun(args.nproc) + _job_args(base, run_dir, control, args.backend)
            cmd += ["--no-record", "--pause", "0.05", "--rank0-pause", "0.05"]
            ready = [control / f"ready-{r}.json" for r in range(args.nproc)]
        proc = subprocess.Popen(cmd, env=_env(runtime), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        try:
            while not all(p.exists() for p in ready):
                if proc.poll() is not None:
                    raise SystemExit(f"{side}: the trainer exited with {proc.returncode}")
                time.sleep(0.1)
            time.sleep(2.0)  # a few steps in
            seconds = []
            for i in range(args.forks):
                served = run_dir / "checkpoints" / "0000"
                shutil.rmtree(served)
                shutil.copytree(adapters[(i + 1) % 2], served)
                ctx = ForkContext(
                    f"bench-{side[:3]}-{i}", run_dir, served, adapter_digest(served), time.monotonic() + 60
                )
                outcome = stage.run(ctx)
                if outcome.status != "ok":
                    raise SystemExit(f"{side}: fork {i} failed: {outcome.error}")
                seconds.append(outcome.seconds)
            out[side] = seconds
        finally:
            stop_trainer(proc, control, 60)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--forks", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from tests.support.tiny_model import tiny_assets

    assets = tiny_assets()
    work = Path(tempfile.mkdtemp(prefix="fs-rb-", dir="/tmp"))
    try:
        run_dir = work / "art" / "p" / "models" / "m"
        shutil.copytree(assets.adapter_a, run_dir / "checkpoints" / "0000")
        sps = steps_per_second(args, assets.base, run_dir, work)
        cost = boundary_cost(args, work)
        latency = fork_latency(args, assets.base, (assets.adapter_a, assets.adapter_b), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    without, with_ = statistics.median(sps["without"]), statistics.median(sps["with"])
    ratio = with_ / without
    print(f"ranks: {args.nproc}, backend {args.backend}, {args.steps} steps per run, {args.repeat} runs per side")
    print("\n| DDP job | ms per step (median) | steps/s | with / without |\n| --- | --- | --- | --- |")
    print(f"| without the preload (baseline) | {without * 1e3:.2f} | {1 / without:.1f} | 1.000x |")
    print(f"| with the preload (agreement every step) | {with_ * 1e3:.2f} | {1 / with_:.1f} | {ratio:.3f}x |")
    print(f"target <= {TARGET}x: {'met' if ratio <= TARGET else 'MISSED'}")
    print("\n| per optimizer step, rank 0 | microseconds (median of 2000) |\n| --- | --- |")
    print(f"| blocking all_reduce of 2 int64 + read (baseline) | {cost['blocking']:.1f} |")
    print(f"| RankAgreement.at_boundary (read the previous, start the next) | {cost['ours']:.1f} |")
    print("\n| trainers stage per fork | median s | min s | max s |\n| --- | --- | --- | --- |")
    for side, seconds in latency.items():
        print(f"| {side} | {statistics.median(seconds):.3f} | {min(seconds):.3f} | {max(seconds):.3f} |")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
