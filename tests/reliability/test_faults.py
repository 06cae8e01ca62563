"""Filesystem faults during a fork: disk full, read-only checkpoints, EPERM, a source changed or deleted mid-copy.

Promise: each ends as `.fork.failed` with one sentence, checkpoints/0000 byte-identical to before, no staging copy
left, and the daemon still forking other runs. The faults are real: a size-limited tmpfs, a read-only bind mount,
an immutable directory (chattr +i, which stops root too), and a thread writing the source while it is copied.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.support import Fleet, leftovers, make_run, mounted_tmpfs, tree_digest, wait_settled
from tests.support.adapters import write_big_adapter
from tests.support.daemon import wait_for

pytestmark = pytest.mark.timeout(120)


def assert_failed_cleanly(fleet: Fleet, model_dir: Path, old: str | None, words: tuple[str, ...]) -> str:
    view = wait_settled(model_dir, [fleet.state_dir(0)], 60)
    assert view.outcome is not None, view
    assert view.outcome["status"] == "failed", view.outcome
    error = str(view.outcome["error"])
    assert "\n" not in error
    assert any(w in error for w in words), error
    assert tree_digest(model_dir / "checkpoints" / "0000") == old
    assert view.leftovers == [] and view.markers == [], view
    return error


def assert_still_forks(fleet: Fleet, art: Path, name: str) -> None:
    model_dir = make_run(art, project="alive", model=name, steps=(5,))
    (model_dir / ".fork").write_text("")
    view = wait_settled(model_dir, [fleet.state_dir(0)], 30)
    assert view.outcome is not None and view.outcome["status"] == "done", view
    assert tree_digest(model_dir / "checkpoints" / "0000") == tree_digest(model_dir / "checkpoints" / "0005")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, [tmp_path / "art"]) as f:
        yield f


def test_disk_full_while_staging(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", "8m") as small:
        if small is None:
            pytest.skip("needs root to mount a small tmpfs")
        art = small / "art"
        model_dir = make_run(art, steps=())
        write_big_adapter(model_dir / "checkpoints" / "0009", 5 << 20, seed=9)  # 5 MiB + 5 MiB stage > 8 MiB
        old = tree_digest(model_dir / "checkpoints" / "0000")
        ok_root = tmp_path / "ok"
        with Fleet(tmp_path, [art, ok_root]) as fleet:
            fleet.start(0)
            (model_dir / ".fork").write_text("step: 9\n")
            error = assert_failed_cleanly(fleet, model_dir, old, ("no space left",))
            assert str(model_dir / "checkpoints") in error
            assert_still_forks(fleet, ok_root, "after-enospc")


@contextlib.contextmanager
def read_only_bind(path: Path) -> Iterator[bool]:
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode != 0:
        yield False
        return
    try:
        ok = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode == 0
        yield ok
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_checkpoints_dir(tmp_path: Path, fleet: Fleet) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    old = tree_digest(model_dir / "checkpoints" / "0000")
    with read_only_bind(model_dir / "checkpoints") as ok:
        if not ok:
            pytest.skip("needs root to make a read-only bind mount")
        fleet.start(0)
        (model_dir / ".fork").write_text("step: 3\n")
        assert_failed_cleanly(fleet, model_dir, old, ("Read-only file system",))
        assert_still_forks(fleet, art, "after-erofs")


def test_permission_denied_on_the_checkpoints_dir(tmp_path: Path, fleet: Fleet) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    old = tree_digest(model_dir / "checkpoints" / "0000")
    # We are root, so mode bits stop nothing; the immutable attribute refuses even root (EPERM).
    if subprocess.run(["chattr", "+i", str(model_dir / "checkpoints")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        fleet.start(0)
        (model_dir / ".fork").write_text("step: 3\n")
        assert_failed_cleanly(fleet, model_dir, old, ("Operation not permitted", "permission"))
        assert_still_forks(fleet, art, "after-eperm")
    finally:
        subprocess.run(["chattr", "-i", str(model_dir / "checkpoints")], capture_output=True)


def test_source_modified_during_the_copy(tmp_path: Path, fleet: Fleet) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=())
    source = write_big_adapter(model_dir / "checkpoints" / "0009", 64 << 20, seed=9)
    old = tree_digest(model_dir / "checkpoints" / "0000")
    target = source / "adapter_model.safetensors"
    size = target.stat().st_size
    stop = threading.Event()

    def rewrite() -> None:  # a trainer still writing the checkpoint: same size, bytes change in the data region
        rng = random.Random(1)
        fd = os.open(target, os.O_WRONLY)
        try:
            while not stop.is_set():
                os.pwrite(fd, rng.randbytes(4096), rng.randrange(size // 2, size - 4096))
        finally:
            os.close(fd)

    writer = threading.Thread(target=rewrite, daemon=True)
    fleet.start(0)
    writer.start()
    try:
        (model_dir / ".fork").write_text("step: 9\n")
        assert_failed_cleanly(fleet, model_dir, old, ("was modified", "changed"))
    finally:
        stop.set()
        writer.join(10)
    assert_still_forks(fleet, art, "after-modified")


def test_source_deleted_during_the_copy(tmp_path: Path, fleet: Fleet) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=())
    source = write_big_adapter(model_dir / "checkpoints" / "0009", 192 << 20, seed=9)
    old = tree_digest(model_dir / "checkpoints" / "0000")
    deleted = threading.Event()
    stop = threading.Event()

    def delete_when_staging() -> None:  # ART's delete_checkpoints pruning the step we fork from
        while not stop.is_set():
            if any(n.startswith(".fork-stage-") for n in leftovers(model_dir)):
                shutil.rmtree(source, ignore_errors=True)
                deleted.set()
                return

    remover = threading.Thread(target=delete_when_staging, daemon=True)
    fleet.start(0)
    remover.start()
    try:
        (model_dir / ".fork").write_text("step: 9\n")
        view = wait_settled(model_dir, [fleet.state_dir(0)], 60)
    finally:
        stop.set()
        remover.join(10)
    assert view.outcome is not None
    if not deleted.is_set() or view.outcome["status"] == "done":  # the copy won the race (a loaded machine)
        assert view.outcome["status"] == "done", view.outcome
        pytest.skip("the copy finished before the delete landed; nothing to check")
    assert_failed_cleanly(
        # "vanished": a walk of the source tree (staging walks it for its bounds, issue 18) saw the file go.
        fleet,
        model_dir,
        old,
        ("was deleted", "was modified", "changed", "does not exist", "No such file", "vanished"),
    )
    wait_for(lambda: fleet.daemons[0].proc is not None and fleet.daemons[0].proc.poll() is None, 1, "daemon alive")
