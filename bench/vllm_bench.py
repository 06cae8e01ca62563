"""A fork of a tiny adapter as vLLM sees it, against the direct steps it replaces, on one real vLLM CPU server.

    .venv/bin/python -m bench.vllm_bench [--repeat 15] [--no-daemon] [--hidden 128 --rank 8]

The default model is the tests' tiny Llama (72 KiB adapters): fixed costs dominate. `--hidden 4096 --rank 256`
builds a wider one (64 MiB adapters) where the bytes do.

Rows (medians over --repeat forks, alternating between two checkpoints so every fork changes the weights):
- baseline: what a person would do by hand, measured in the same run: `cp -r` of the checkpoint to a new
  directory, then one `POST /v1/load_lora_adapter` (load_inplace) of that directory under a name of its own;
- daemon end to end: `.fork` written -> `.fork.done` seen (claim, staged copy with fsyncs, atomic exchange, trainer
  stage with nobody to tell, snapshot, reload, verify via /v1/models, adapter digest check, outcome file);
- in-process: the swap (sidecar.swap) + `VllmStage.run` called directly, i.e. the daemon's work without the marker,
  journal and outcome; shown so the daemon's own overhead is visible.
A second table says where the time goes. Target: daemon end to end <= 1.2x the baseline. Needs `.venv-vllm`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sidecar import swap
from sidecar.config import load_config
from sidecar.stages import ForkContext
from sidecar.vllm.stage import VllmStage
from tests.support.tiny_model import tiny_assets
from tests.support.vllm_server import VllmServer, start_vllm_server, vllm_python

TARGET = 1.2
STEPS = ("0003", "0005")  # A and B, alternately

Parts = dict[str, float]  # where one sample's time went, seconds


class Row:
    def __init__(self) -> None:
        self.totals: list[float] = []
        self.parts: dict[str, list[float]] = {}

    def add(self, total: float, parts: Parts) -> None:
        self.totals.append(total)
        for name, seconds in parts.items():
            self.parts.setdefault(name, []).append(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--no-daemon", action="store_true", help="skip the end-to-end row")
    parser.add_argument("--hidden", type=int, default=128, help="model width (multiple of 64)")
    parser.add_argument("--rank", type=int, default=8, choices=(8, 16, 32, 64, 128, 256), help="LoRA rank")
    args = parser.parse_args(argv)
    if vllm_python() is None:
        print("needs .venv-vllm: run `make vllm-venv` first", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    try:
        return run(root, args.repeat, not args.no_daemon, args.hidden, args.rank)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, repeat: int, with_daemon: bool, hidden: int, rank: int) -> int:
    assets = tiny_assets(hidden=hidden, rank=rank)
    model_dir = root / "art" / "proj" / "models" / "m"
    checkpoints = model_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step, adapter in (("0000", assets.adapter_a), ("0003", assets.adapter_a), ("0005", assets.adapter_b)):
        shutil.copytree(adapter, checkpoints / step)
    print("starting vLLM (about a minute)...", flush=True)
    server = start_vllm_server(
        assets.base,
        lora_modules=[("m@0", checkpoints / "0000")],
        log_path=root / "vllm.log",
        max_lora_rank=max(16, rank),
        max_model_len=256,
    )
    try:
        config_path = root / "bench.yaml"
        config_path.write_text(json.dumps({"watch": {"roots": [str(root / "art")]}, "vllm": {"discover": True}}))
        stage = VllmStage(load_config(config_path))
        sides: dict[str, Callable[[int], tuple[float, Parts]]] = {
            "baseline: cp -r + load_lora_adapter": lambda i: baseline(server, checkpoints, root, i),
            "in-process: swap + VllmStage.run": lambda i: in_process(stage, model_dir, i),
        }
        with contextlib.ExitStack() as stack:
            if with_daemon:
                sides["daemon: .fork -> .fork.done"] = stack.enter_context(daemon_side(root, model_dir))
            rows = measure(repeat, sides)
    finally:
        server.stop()
    return print_tables(rows, adapter_bytes=sum(f.stat().st_size for f in assets.adapter_a.iterdir()))


def measure(repeat: int, sides: dict[str, Callable[[int], tuple[float, Parts]]]) -> dict[str, Row]:
    """Round-robin over the sides, so that a busy moment of the machine hits all of them alike."""
    rows = {name: Row() for name in sides}
    for i in range(-1, repeat):  # -1 warms caches and connections; not counted
        for name, once in sides.items():
            total, parts = once(i)
            if i >= 0:
                rows[name].add(total, parts)
    return rows


def baseline(server: VllmServer, checkpoints: Path, root: Path, i: int) -> tuple[float, Parts]:
    copy = root / "direct" / f"copy-{i + 1}"
    copy.parent.mkdir(exist_ok=True)
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(checkpoints / STEPS[i % 2]), str(copy)], check=True)
    copied = time.perf_counter()
    body = json.dumps({"lora_name": "direct", "lora_path": str(copy), "load_inplace": True}).encode()
    request = urllib.request.Request(
        server.url + "/v1/load_lora_adapter", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        answer.read()
    done = time.perf_counter()
    return done - started, {"cp -r": copied - started, "load_lora_adapter": done - copied}


_COUNTER = iter(range(1_000_000))


def in_process(stage: VllmStage, model_dir: Path, i: int) -> tuple[float, Parts]:
    checkpoints = model_dir / "checkpoints"
    source = checkpoints / STEPS[i % 2]
    fork_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{next(_COUNTER):06x}"
    started = time.perf_counter()
    staged = swap.copy_to_staging(source, checkpoints, fork_id)
    swap.install_staging(checkpoints, fork_id, staged.digest, stage_inode=staged.inode)
    swapped = time.perf_counter()
    outcome = stage.run(ForkContext(fork_id, model_dir, source, staged.digest, time.monotonic() + 60))
    reloaded = time.perf_counter()
    swap.discard_retired(checkpoints, fork_id)
    done = time.perf_counter()
    if outcome.status != "ok":
        raise SystemExit(f"in-process fork failed: {outcome.error}")
    return done - started, {
        "swap (stage + install)": swapped - started,
        "VllmStage.run": reloaded - swapped,
        "discard retired": done - reloaded,
    }


@contextlib.contextmanager
def daemon_side(root: Path, model_dir: Path) -> Iterator[Callable[[int], tuple[float, Parts]]]:
    from tests.support.daemon import DaemonProcess, read_outcome, write_config

    config = write_config(root / "daemon.yaml", [root / "art"], root / "state", root / "rt", vllm={"discover": True})
    with DaemonProcess(config, root / "daemon.log") as daemon:

        def once(i: int) -> tuple[float, Parts]:
            before = (read_outcome(model_dir) or {}).get("fork_id")
            started = time.perf_counter()
            with open(model_dir / ".fork", "w") as marker:
                marker.write(f"step: {int(STEPS[i % 2])}\n")
            deadline = time.monotonic() + 120
            while True:
                outcome = read_outcome(model_dir)
                if outcome and outcome.get("fork_id") != before and not (model_dir / ".fork.inprogress").exists():
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"no outcome after 120 s; daemon log:\n{daemon.log()}")
                time.sleep(0.001)
            elapsed = time.perf_counter() - started
            if outcome["status"] != "done":
                raise SystemExit(f"daemon fork failed: {outcome.get('error')}")
            parts = {
                f"{s} stage": float(outcome[s].get("seconds") or 0.0) for s in ("swap", "trainers", "vllm", "verify")
            }
            parts["started_at -> finished_at"] = _span(outcome)
            return elapsed, parts

        yield once


def _span(outcome: dict[str, Any]) -> float:
    started = datetime.fromisoformat(outcome["started_at"])
    return (datetime.fromisoformat(outcome["finished_at"]) - started).total_seconds()


def print_tables(rows: dict[str, Row], adapter_bytes: int) -> int:
    base = statistics.median(next(iter(rows.values())).totals)
    runs = len(next(iter(rows.values())).totals)
    print(f"\nfork of a {adapter_bytes / 1024:.0f} KiB LoRA on one vLLM CPU server, {runs} forks a row")
    print(f"{'case':<40} {'median ms':>10} {'p90 ms':>8} {'x base':>7}  target")
    ok = True
    for name, row in rows.items():
        median = statistics.median(row.totals)
        p90 = sorted(row.totals)[int(0.9 * (len(row.totals) - 1))]
        verdict = ""
        if name.startswith("daemon"):
            passed = median <= TARGET * base
            ok &= passed
            verdict = f"<= {TARGET}x base: {'PASS' if passed else 'FAIL'}"
        print(f"{name:<40} {median * 1000:>10.1f} {p90 * 1000:>8.1f} {median / base:>7.2f}  {verdict}")
    print(f"\n{'where the time goes (medians)':<60} {'ms':>8}")
    for name, row in rows.items():
        for part, samples in row.parts.items():
            print(f"{name.split(':')[0] + ': ' + part:<60} {statistics.median(samples) * 1000:>8.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
