"""Hostile layouts and names: symlinks where directories belong, odd bytes in names, a source raced out of the roots.

Promise: each ends with one clear sentence in `.fork.failed` (or a correct fork, for names that are merely odd) and
nothing outside the run's checkpoints/ is read into 0000 or changed; the daemon keeps working.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.support import (
    Fleet,
    leftovers,
    make_run,
    settled,
    tree_digest,
    wait_settled,
    write_marker_atomically,
)
from tests.support.adapters import write_adapter
from tests.support.daemon import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, [tmp_path / "art"], overrides={"log": {"level": "info"}}) as f:
        yield f


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    write_adapter(path / "ckpt", seed=66)
    (path / "secret").write_text("step: 3\n")
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def failed_with(fleet: Fleet, model_dir: Path, words: str) -> str:
    view = wait_for(lambda: (v := settled(model_dir, [fleet.state_dir(0)])).outcome and not v.markers and v, 30, "end")
    assert view.outcome is not None and view.outcome["status"] == "failed", view
    error = str(view.outcome["error"])
    assert words in error and "\n" not in error, error
    return error


def test_symlinked_0000_is_refused_and_its_target_untouched(tmp_path: Path, fleet: Fleet, outside: Path) -> None:
    model_dir = make_run(tmp_path / "art", steps=(3,))
    shutil.rmtree(model_dir / "checkpoints" / "0000")
    os.symlink(outside / "ckpt", model_dir / "checkpoints" / "0000")
    before = snapshot(outside)
    fleet.start(0)
    write_marker_atomically(model_dir, "step: 3\n")
    failed_with(fleet, model_dir, "is a symlink")
    assert snapshot(outside) == before
    assert os.readlink(model_dir / "checkpoints" / "0000") == str(outside / "ckpt")


def test_symlinked_0000_leaves_no_staging_copy(tmp_path: Path, fleet: Fleet, outside: Path) -> None:
    model_dir = make_run(tmp_path / "art", steps=(3,))
    shutil.rmtree(model_dir / "checkpoints" / "0000")
    os.symlink(outside / "ckpt", model_dir / "checkpoints" / "0000")
    fleet.start(0)
    write_marker_atomically(model_dir, "step: 3\n")
    failed_with(fleet, model_dir, "is a symlink")
    assert leftovers(model_dir) == []


def test_symlinked_checkpoints_dir_is_refused(tmp_path: Path, fleet: Fleet, outside: Path) -> None:
    model_dir = make_run(tmp_path / "art", steps=(3,))
    real = tmp_path / "elsewhere-checkpoints"
    shutil.move(model_dir / "checkpoints", real)
    os.symlink(real, model_dir / "checkpoints")
    before = snapshot(real)
    fleet.start(0)
    write_marker_atomically(model_dir, "step: 3\n")
    failed_with(fleet, model_dir, "symlink")
    assert snapshot(real) == before


def test_marker_symlinked_to_a_file_elsewhere_is_refused(tmp_path: Path, fleet: Fleet, outside: Path) -> None:
    model_dir = make_run(tmp_path / "art", steps=(3,))
    old = tree_digest(model_dir / "checkpoints" / "0000")
    fleet.start(0)
    os.symlink(outside / "secret", model_dir / ".fork")
    failed_with(fleet, model_dir, "is a symlink")
    assert (outside / "secret").read_text() == "step: 3\n"
    assert tree_digest(model_dir / "checkpoints" / "0000") == old


@pytest.mark.parametrize("raw", [b"new\nline", b"\xff\xfe-not-utf8", b"tab\tand space", b"-dash"])
def test_odd_run_names_fork_correctly(tmp_path: Path, fleet: Fleet, raw: bytes) -> None:
    name = os.fsdecode(raw)
    model_dir = make_run(tmp_path / "art", project=name, model=name, steps=(3,))
    fleet.start(0)
    (model_dir / ".fork").write_text("")
    view = wait_settled(model_dir, [fleet.state_dir(0)], 30)
    assert view.ok and view.outcome is not None and view.outcome["status"] == "done", (view, fleet.daemons[0].log())
    assert tree_digest(model_dir / "checkpoints" / "0000") == tree_digest(model_dir / "checkpoints" / "0003")
    assert all(d.proc is not None and d.proc.poll() is None for d in fleet.daemons)


def test_source_raced_between_inside_and_outside_the_roots(tmp_path: Path, fleet: Fleet, outside: Path) -> None:
    """A thread flips `racy` between a real checkpoint and a symlink out of the roots while forks run."""
    model_dir = make_run(tmp_path / "art", steps=())
    inside = model_dir / "inside"
    write_adapter(inside, seed=5)
    allowed = {tree_digest(model_dir / "checkpoints" / "0000"), tree_digest(inside)}
    evil = tree_digest(outside / "ckpt")
    before = snapshot(outside)
    racy, link = model_dir / "racy", model_dir / "racy-link"
    stop = threading.Event()

    def flip() -> None:
        os.symlink(outside / "ckpt", link)
        shutil.copytree(inside, racy)
        hidden = model_dir / "racy-dir"
        while not stop.is_set():
            os.rename(racy, hidden)  # the real dir moves away ...
            os.symlink(outside / "ckpt", racy)  # ... a symlink out of the roots takes its name ...
            os.unlink(racy)
            os.rename(hidden, racy)  # ... and the real dir comes back
            time.sleep(0.003)  # and stays a moment, so some forks see it whole

    flipper = threading.Thread(target=flip, daemon=True)
    fleet.start(0)
    flipper.start()
    statuses = []
    try:
        for i in range(25):
            (model_dir / ".fork.done").unlink(missing_ok=True)
            (model_dir / ".fork.failed").unlink(missing_ok=True)
            write_marker_atomically(model_dir, f"source: racy\nrequest_id: r{i}\n")
            view = wait_settled(model_dir, [fleet.state_dir(0)], 30)
            assert view.outcome is not None, view
            statuses.append(f"{view.outcome['status']}: {view.outcome['error']}")
            served = tree_digest(model_dir / "checkpoints" / "0000")
            assert served in allowed and served != evil, (i, view.outcome)
    finally:
        stop.set()
        flipper.join(10)
    assert snapshot(outside) == before
    assert any(s.startswith("done") for s in statuses), statuses  # the race did not simply make every fork fail
