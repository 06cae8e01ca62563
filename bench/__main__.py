"""`make bench`: run the CPU benchmarks one after another, each printing its own table with ratios.

    .venv/bin/python -m bench [NAME ...]

names: daemon idle watch swap digest trainer ranks vllm nodes (default: all CPU ones).

The GPU benchmark (bench/gpu_dtype.py) needs CUDA and the carried Unsloth wheels; see its docstring.
Each benchmark measures its baseline in the same run; machines are noisy, so read medians and ratios.
"""

from __future__ import annotations

import subprocess
import sys

BENCHES = {
    "watch": ["-m", "bench.watch_bench"],
    "daemon": ["-m", "bench.daemon_bench"],
    "idle": ["-m", "bench.idle_windows"],
    "swap": ["-m", "bench.swap_bench"],
    "digest": ["-m", "bench.digest_bench"],
    "trainer": ["-m", "bench.trainer_bench"],
    "ranks": ["-m", "bench.ranks_bench"],
    "vllm": ["-m", "bench.vllm_bench"],
    "nodes": ["-m", "bench.nodes_bench"],
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    worst = 0
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        worst = max(worst, subprocess.run([sys.executable, *BENCHES[name]]).returncode)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
