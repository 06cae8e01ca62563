"""Real filesystems for tests that need a kind the machine's own disk is not: a loop-mounted XFS or btrfs, and a
FUSE mount (bindfs) whose renames take no flags. Each skips, saying why, where this host cannot mount it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["fuse_without_exchange", "loop_filesystem", "mounted", "require_root"]


def require_root(tool: str | None = None) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    if tool and shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt-get install {tool})")


@contextlib.contextmanager
def mounted(argv: list[str], target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount ({' '.join(argv)}): {result.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@contextlib.contextmanager
def loop_filesystem(tmp_path: Path, kind: str) -> Iterator[Path]:
    mkfs = {"xfs": ["mkfs.xfs", "-q"], "btrfs": ["mkfs.btrfs", "-q"]}[kind]
    require_root(mkfs[0])
    image = tmp_path / f"{kind}.img"
    with open(image, "wb") as f:
        f.truncate(320 << 20)  # sparse; mkfs.xfs wants at least 300 MB
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    with mounted(["mount", "-o", "loop", str(image), str(tmp_path / kind)], tmp_path / kind) as root:
        yield root


@contextlib.contextmanager
def fuse_without_exchange(tmp_path: Path) -> Iterator[Path]:
    """bindfs: a real FUSE filesystem whose renames take no flags (RENAME_EXCHANGE/NOREPLACE give EINVAL)."""
    require_root("bindfs")
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse")
    backing = tmp_path / "backing"
    backing.mkdir()
    with mounted(["bindfs", str(backing), str(tmp_path / "fuse")], tmp_path / "fuse") as root:
        yield root
