"""Swapping checkpoints/0000 for a big adapter: ours (stage + install) against `cp -r src dst && sync`.

    .venv/bin/python -m bench.swap_bench [--size-mib 1024] [--repeat 3] [--dir DIR] [--warm]

Builds one real safetensors LoRA checkpoint of --size-mib (a few large BF16 A/B tensors + adapter_config.json)
in a run directory under --dir, then, --repeat times each, in the same run:

- baseline: `cp -r SRC DST && sync` (a plain copy made durable),
- openssl: one `openssl dgst -sha256` pass over the adapter file (the cost of hashing it once on one core),
- copy: copy_to_staging(copy_mode="copy") + install_staging: copy_file_range in 8 MiB steps, the digest hashed
  from the staged file's pages right behind the copy (sidecar/swap/copy_digest.py), fsync of every file and
  directory, the adapter check, RENAME_EXCHANGE and the fsyncs of checkpoints/,
- hardlink: the same with copy_mode="hardlink" (the digest must read the shared inode),
- reflink: the same with copy_mode="reflink", on an xfs loop filesystem made for the purpose (root and
  mkfs.xfs needed; the row says why when it is missing); its reference is `cp -r --reflink=always && sync` there.

Unless --warm, the page cache is dropped before every timed run (root only: sync; echo 3 > drop_caches), so
every side reads the source from disk. The table gives medians, the ratio to the baseline, the digest time
(hardlink/reflink only: with copy it overlaps the copy) and the swap time without it, and the CPU seconds each case
used (this process's threads for ours, the child processes for `cp` + `sync` and openssl): on a machine whose cores
are busy with other work, wall times follow CPU seconds, whatever the threads.
Targets: copy <= 1.1x baseline; hardlink and reflink <= 50 ms without the digest; hardlink (digest included)
<= 0.8x the openssl pass (the issue's target for a 256 MiB adapter: `--size-mib 256`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.swap import SwapError, copy_to_staging, discard_retired, install_staging
from tests.support.adapters import write_adapter, write_big_adapter

COPY_TARGET = 1.1  # x baseline
HARDLINK_VS_OPENSSL = 0.8  # ours hardlink, digest included, x one `openssl dgst -sha256` pass over the adapter file
LINK_TARGET_S = 0.050  # without the digest
_ids = itertools.count()


@dataclass
class Row:
    name: str
    where: str
    totals: list[float] = field(default_factory=list)
    digests: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    note: str = ""

    def median(self) -> float:
        return statistics.median(self.totals)

    def digest(self) -> float | None:
        return statistics.median(self.digests) if self.digests else None

    def cpu(self) -> float:
        return statistics.median(self.cpus)


def cpu_seconds() -> float:
    """User + system CPU of this process (all threads) and of its waited-for children, so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def drop_caches(enabled: bool) -> None:
    os.sync()
    if enabled:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def time_baseline(src: Path, dst: Path, cold: bool, extra: tuple[str, ...] = ()) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    drop_caches(cold)
    started = time.perf_counter()
    subprocess.run(["cp", "-r", *extra, str(src), str(dst)], check=True)
    os.sync()
    elapsed = time.perf_counter() - started
    shutil.rmtree(dst)
    return elapsed


def time_openssl(adapter_file: Path, cold: bool) -> float:
    drop_caches(cold)
    started = time.perf_counter()
    subprocess.run(["openssl", "dgst", "-sha256", str(adapter_file)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def time_ours(source: Path, checkpoints: Path, mode: str, cold: bool) -> tuple[float, float]:
    """(stage + install seconds, digest seconds inside the stage)."""
    fork_id = f"bench{next(_ids)}"
    drop_caches(cold)
    started = time.perf_counter()
    staged = copy_to_staging(source, checkpoints, fork_id, copy_mode=mode)
    install_staging(checkpoints, fork_id, staged.digest, stage_inode=staged.inode)
    elapsed = time.perf_counter() - started
    if staged.method != mode:
        raise SystemExit(f"asked for {mode} but staging used {staged.method}")
    discard_retired(checkpoints, fork_id)
    return elapsed, staged.digest_s


def make_run(root: Path, size: int) -> tuple[Path, Path]:
    checkpoints = root / "proj" / "models" / "m" / "checkpoints"
    write_adapter(checkpoints / "0000", seed=0)
    source = write_big_adapter(checkpoints / "0005", size)
    os.sync()
    return checkpoints, source


@contextlib.contextmanager
def _skipped() -> Iterator[Path | str]:
    yield "--skip-reflink"


def can_reflink(directory: Path) -> bool:
    probe = directory / "reflink-probe"
    write_adapter(probe / "src")
    try:
        copy_to_staging(probe / "src", probe, "probe", copy_mode="reflink")
        return True
    except SwapError:
        return False
    finally:
        shutil.rmtree(probe)


@contextlib.contextmanager
def reflink_filesystem(parent: Path, size: int) -> Iterator[Path | str]:
    """Yields a directory on a filesystem with reflinks (`parent` itself when it can, else a new xfs loop mount),
    or a string saying why there is none."""
    if can_reflink(parent):
        yield parent
        return
    if os.geteuid() != 0:
        yield "needs root to mount an xfs loop filesystem"
        return
    if shutil.which("mkfs.xfs") is None:
        yield "mkfs.xfs is missing (apt-get install xfsprogs)"
        return
    image, mount = parent / "xfs.img", parent / "xfs"
    with open(image, "wb") as f:
        f.truncate(max(3 * size + (512 << 20), 1 << 30))
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True, capture_output=True)
    mount.mkdir()
    result = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True)
    if result.returncode:
        yield f"cannot mount xfs: {result.stderr.strip()}"
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


Case = tuple[Row, Callable[[], float | tuple[float, float]]]


def measure(cases: list[Case], repeat: int) -> None:
    """Runs every case once untimed (first-touch effects), then `repeat` rounds with the cases interleaved,
    so a slow spell on a shared machine hits every case rather than one."""
    for _, run in cases:
        run()
    for _ in range(repeat):
        for row, run in cases:
            before = cpu_seconds()  # includes the untimed set-up (a drop_caches, an rmtree): a few ms
            result = run()
            row.cpus.append(cpu_seconds() - before)
            total, digest = result if isinstance(result, tuple) else (result, None)
            row.totals.append(total)
            if digest:
                row.digests.append(digest)


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path`, from /proc/self/mountinfo."""
    best, kind = "", "?"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mount_point, fstype = fields[4], fields[fields.index("-") + 1]
        if f"{path}/".startswith(mount_point.rstrip("/") + "/") and len(mount_point) > len(best):
            best, kind = mount_point, fstype
    return kind


def print_table(rows: list[Row], baseline: Row, size: int) -> bool:
    ok = True
    openssl = next((r for r in rows if r.name == "openssl dgst -sha256" and r.totals), None)
    print(
        f"\n{'case':<22} {'filesystem':<12} {'median s':>9} {'x base':>7} {'digest s':>9} {'w/o digest':>11} "
        f"{'cpu s':>6}  target"
    )
    for row in rows:
        if not row.totals:
            print(f"{row.name:<22} {row.where:<12} {'-':>9} {'-':>7} {'-':>9} {'-':>11} {'-':>6}  skipped: {row.note}")
            continue
        median, digest = row.median(), row.digest()
        without = median - digest if digest is not None else None
        verdict = ""
        if row.name == "ours copy":
            passed = median <= COPY_TARGET * baseline.median()
            verdict = f"<= {COPY_TARGET}x base: {'PASS' if passed else 'FAIL'}"
            ok &= passed
        elif row.name in ("ours hardlink", "ours reflink") and without is not None:
            passed = without <= LINK_TARGET_S
            verdict = f"<= {LINK_TARGET_S * 1000:.0f} ms w/o digest: {'PASS' if passed else 'FAIL'}"
            ok &= passed
            if row.name == "ours hardlink" and openssl is not None:
                ratio = median / openssl.median()
                fast = ratio <= HARDLINK_VS_OPENSSL
                verdict += f"; {ratio:.2f}x openssl, <= {HARDLINK_VS_OPENSSL}x: {'PASS' if fast else 'FAIL'}"
                ok &= fast
        print(
            f"{row.name:<22} {row.where:<12} {median:>9.3f} {median / baseline.median():>7.2f} "
            f"{'' if digest is None else f'{digest:.3f}':>9} {'' if without is None else f'{without:.3f}':>11} "
            f"{row.cpu():>6.3f}  "
            f"{verdict}{'  ' + row.note if row.note else ''}"
        )
    print(f"\n{size / (1 << 20):.0f} MiB adapter; runs: {', '.join(f'{r.name}={len(r.totals)}' for r in rows)}")
    print(f"load average after the runs {os.getloadavg()[0]:.2f}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swap_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="adapter size")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case (medians are reported)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the run dir goes")
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache between runs")
    parser.add_argument(
        "--skip-reflink", action="store_true", help="leave out the reflink rows (no xfs loop filesystem is made)"
    )
    args = parser.parse_args(argv)
    size = args.size_mib << 20
    cold = not args.warm and can_drop_caches()
    print(
        f"kernel {platform.release()}, python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print("page cache dropped before each run" if cold else "page cache NOT dropped (--warm or not root): warm numbers")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="swap-bench-") as tmp:
        root = Path(tmp)
        fs = fs_type(root)
        checkpoints, source = make_run(root, size)
        baseline = Row("baseline cp -r + sync", fs)
        cases: list[Case] = [(baseline, lambda: time_baseline(source, root / "dst", cold))]
        adapter_file = source / "adapter_model.safetensors"
        if shutil.which("openssl"):
            cases.append((Row("openssl dgst -sha256", fs), lambda: time_openssl(adapter_file, cold)))
        else:
            cases.append((Row("openssl dgst -sha256", fs, note="openssl is not installed"), lambda: 0.0))
        for mode in ("copy", "hardlink"):
            cases.append((Row(f"ours {mode}", fs), functools.partial(time_ours, source, checkpoints, mode, cold)))
        with reflink_filesystem(root, size) if not args.skip_reflink else _skipped() as xfs:
            if isinstance(xfs, str):
                cases.append((Row("ours reflink", "xfs", note=xfs), lambda: 0.0))
            else:
                where = fs_type(xfs) + (" (loop)" if xfs != root else "")
                if xfs != root:
                    xfs_checkpoints, xfs_source = make_run(xfs, size)
                else:
                    xfs_checkpoints, xfs_source = checkpoints, source
                reflink_cp = ("--reflink=always",)
                cases.append(
                    (
                        Row("cp --reflink + sync", where),
                        lambda: time_baseline(xfs_source, xfs / "dst", cold, reflink_cp),
                    )
                )
                cases.append(
                    (
                        Row("ours reflink", where),
                        lambda: time_ours(xfs_source, xfs_checkpoints, "reflink", cold),
                    )
                )
            measure([c for c in cases if not c[0].note], args.repeat)
        rows = [row for row, _ in cases]
        ok = print_table(rows, baseline, size)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
