"""The adapter digest on its own: the BLAKE3 tree on 1..N threads against one `openssl dgst -sha256` pass.

    .venv/bin/python -m bench.digest_bench [--size-mib 256] [--repeat 7]

Writes one safetensors adapter of --size-mib (a few large BF16 tensors, `tests.support.adapters.write_big_adapter`),
reads it once so it is in the page cache, then --repeat times each, interleaved, in the same run:

- openssl: `openssl dgst -sha256 FILE` (one stream on one core; SHA-NI where the CPU has it), the baseline;
- one stream: the first digest framing's cost (`sha256:`), hashlib sha256 over every tensor's bytes in one stream;
- sha256 tree: the previous framing's cost (`sha256-tree:`), the same 4 MiB pieces read and hashed with hashlib's
  sha256 by one thread per core;
- tree, T threads: `sidecar.adapter.digest_open_file(fd, threads=T)` (`blake3-tree:`, this release's digest) for
  T = 1, 2, 4, ... up to the cores, and the default (as many threads as cores, fewer for a small file);
- blake3, 1 / all threads, in memory: the library's own speed over the file's bytes already in memory, no read.

Prints medians and ratios to openssl. Nothing here has a target of its own: the targets that use the digest are in
swap_bench (hardlink fork <= 0.8x openssl) and trainer_bench (agent <= 1.3x a direct load).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from sidecar.adapter import digest_open_file, read_header
from sidecar.protocol.digest import CHUNK_BYTES
from tests.support.adapters import write_big_adapter


def one_stream(path: Path) -> None:
    """The old framing's hashing work: one sha256 over all tensor bytes, read in 4 MiB pieces."""
    fd = os.open(path, os.O_RDONLY)
    try:
        header = read_header(fd, path)
        h, buffer = hashlib.sha256(), bytearray(4 << 20)
        view = memoryview(buffer)
        for entry in header.tensors:
            at = entry.begin
            while at < entry.end:
                got = os.preadv(fd, [view[: min(len(buffer), entry.end - at)]], at)
                h.update(view[:got])
                at += got
    finally:
        os.close(fd)


def sha256_tree(path: Path) -> None:
    """The previous framing's hashing work: every 4 MiB piece read and sha256'd by one thread per core."""
    fd = os.open(path, os.O_RDONLY)
    local = threading.local()

    def leaf(piece: tuple[int, int]) -> bytes:
        if not hasattr(local, "buffer"):
            local.buffer = memoryview(bytearray(CHUNK_BYTES))
        at, length = piece
        got = os.preadv(fd, [local.buffer[:length]], at)
        return hashlib.sha256(local.buffer[:got]).digest()

    try:
        header = read_header(fd, path)
        pieces = [
            (at, min(CHUNK_BYTES, entry.end - at))
            for entry in header.tensors
            for at in range(entry.begin, entry.end, CHUNK_BYTES)
        ]
        with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
            root = hashlib.sha256()
            for value in pool.map(leaf, pieces):
                root.update(value)
    finally:
        os.close(fd)


def tree(path: Path, threads: int | None) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        digest_open_file(fd, path, threads=threads)
    finally:
        os.close(fd)


def blake3_cases(path: Path) -> dict[str, Callable[[], object]]:
    data = path.read_bytes()
    return {
        "blake3, 1 thread (in memory)": lambda: blake3.blake3(data).digest(),
        "blake3, all threads (in memory)": lambda: blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.digest_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="digest-bench-") as tmp:
        path = write_big_adapter(Path(tmp) / "ckpt", args.size_mib << 20, tensors=8) / "adapter_model.safetensors"
        path.read_bytes()  # into the page cache
        openssl = ["openssl", "dgst", "-sha256", str(path)]
        cases: dict[str, Callable[[], object]] = {}
        if shutil.which("openssl"):
            cases["openssl dgst -sha256"] = lambda: subprocess.run(openssl, check=True, stdout=subprocess.DEVNULL)
        cases["one stream (old framing)"] = lambda: one_stream(path)
        cases["sha256 tree (previous framing)"] = lambda: sha256_tree(path)
        threads = sorted({1, 2, 4, 8, 16, 32, 64, 128, cores} & set(range(1, cores + 1)))
        for t in threads:
            cases[f"tree, {t} thread{'s' if t > 1 else ''}"] = lambda t=t: tree(path, t)  # type: ignore[misc]
        cases["tree, default threads"] = lambda: tree(path, None)
        cases.update(blake3_cases(path))
        times: dict[str, list[float]] = {name: [] for name in cases}
        for run in cases.values():
            run()  # warm-up
        for _ in range(args.repeat):
            for name, run in cases.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times.get("openssl dgst -sha256") or times["one stream (old framing)"])
    print(
        f"\n{args.size_mib} MiB adapter, warm page cache, {cores} cores, load average {os.getloadavg()[0]:.2f}, "
        f"median of {args.repeat}"
    )
    print(f"{'case':<34} {'median s':>9} {'GB/s':>7} {'x openssl':>10}   (x one stream when openssl is missing)")
    for name, values in times.items():
        median = statistics.median(values)
        rate = (args.size_mib << 20) / median / 1e9
        print(f"{name:<34} {median:>9.4f} {rate:>7.2f} {median / base:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
