"""Resolving the source checkpoint of a request, inside the allowed roots only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.layout import RunDir
from sidecar.marker import MarkerRequest
from sidecar.resolve import ResolveError, open_source, resolve_source


@pytest.fixture
def art(tmp_path: Path) -> Path:
    root = tmp_path / "art"
    for step in ("0000", "0003", "0007"):
        (root / "p/models/m/checkpoints" / step).mkdir(parents=True)
    for step in ("0000", "0002", "0010", "0020"):
        (root / "p/models/base/checkpoints" / step).mkdir(parents=True)
    (root / "q/models/other/checkpoints/0004").mkdir(parents=True)
    return root


def resolve(art: Path, request: MarkerRequest, allowed: tuple[Path, ...] | None = None) -> Path:
    return resolve_source(request, RunDir(art, "p", "m"), allowed or (art,))


def test_each_request_kind(art: Path) -> None:
    cp = art / "p/models/m/checkpoints"
    assert resolve(art, MarkerRequest("latest")) == cp / "0007"
    assert resolve(art, MarkerRequest("step", step=3)) == cp / "0003"
    assert resolve(art, MarkerRequest("source", source="checkpoints/0003")) == cp / "0003"
    assert resolve(art, MarkerRequest("source", source=str(cp / "0007"))) == cp / "0007"
    base = art / "p/models/base/checkpoints"
    assert resolve(art, MarkerRequest("from_model", from_model="base")) == base / "0020"
    assert resolve(art, MarkerRequest("from_model", from_model="base", not_after_step=15)) == base / "0010"
    other = MarkerRequest("from_model", from_model="other", from_project="q")
    assert resolve(art, other) == art / "q/models/other/checkpoints/0004"


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        (MarkerRequest("step", step=5), "does not exist"),
        (MarkerRequest("step", step=0), "step 0 itself"),
        (MarkerRequest("source", source="checkpoints/0000"), "checkpoints/0000 itself"),
        (MarkerRequest("source", source="checkpoints/0003/adapter_config.json"), "does not exist"),
        (MarkerRequest("from_model", from_model="nope"), "does not exist"),
        (MarkerRequest("from_model", from_model="other", from_project="q", not_after_step=1), "at or before step 1"),
    ],
)
def test_unusable_requests(art: Path, request_: MarkerRequest, problem: str) -> None:
    with pytest.raises(ResolveError, match=problem):
        resolve(art, request_)


def test_source_that_is_a_file(art: Path) -> None:
    (art / "p/models/m/checkpoints/0003/adapter_config.json").write_text("{}")
    with pytest.raises(ResolveError, match="not a directory"):
        resolve(art, MarkerRequest("source", source="checkpoints/0003/adapter_config.json"))


def test_no_checkpoint_but_0000(tmp_path: Path) -> None:
    (tmp_path / "p/models/m/checkpoints/0000").mkdir(parents=True)
    with pytest.raises(ResolveError, match="no checkpoint other than 0000"):
        resolve(tmp_path, MarkerRequest("latest"))


def test_missing_checkpoints_dir(tmp_path: Path) -> None:
    (tmp_path / "p/models/m").mkdir(parents=True)
    with pytest.raises(ResolveError, match="is missing or not a real directory"):
        resolve(tmp_path, MarkerRequest("latest"))


def test_outside_allowed_roots_even_through_a_symlink(art: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside/ckpt"
    outside.mkdir(parents=True)
    with pytest.raises(ResolveError, match="outside the allowed source roots"):
        resolve(art, MarkerRequest("source", source=str(outside)))
    os.symlink(outside, art / "p/models/m/checkpoints/0009")
    with pytest.raises(ResolveError, match="outside the allowed source roots"):
        resolve(art, MarkerRequest("step", step=9))
    assert resolve(art, MarkerRequest("source", source=str(outside)), (art, tmp_path / "outside")) == outside


def test_symlink_loop(art: Path) -> None:
    loop = art / "p/models/m/loop"
    os.symlink(loop, loop)
    with pytest.raises(ResolveError, match="cannot be resolved"):
        resolve(art, MarkerRequest("source", source="loop"))


def test_the_opened_source_is_what_was_checked_whatever_happens_to_its_name(art: Path, tmp_path: Path) -> None:
    """A parent of the source swapped for a symlink out of the roots after the check changes nothing we read."""
    outside = tmp_path / "outside"
    (outside / "ckpt").mkdir(parents=True)
    (art / "p/models/m/dir/ckpt").mkdir(parents=True)
    run_fd = os.open(art / "p/models/m", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd, real = open_source(MarkerRequest("source", source="dir/ckpt"), RunDir(art, "p", "m"), (art,), run_fd)
    finally:
        os.close(run_fd)
    try:
        before = os.fstat(fd).st_ino
        os.rename(art / "p/models/m/dir", art / "p/models/m/dir-away")
        os.symlink(outside, art / "p/models/m/dir")
        assert real == art / "p/models/m/dir/ckpt"
        assert os.fstat(fd).st_ino == before != (outside / "ckpt").stat().st_ino
    finally:
        os.close(fd)


def test_relative_sources_resolve_from_the_run_directory_held_open(art: Path, tmp_path: Path) -> None:
    run = RunDir(art, "p", "m")
    run_fd = os.open(run.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(run.path, run.path.with_name("m-moved"))
        os.symlink(art / "q/models/other", run.path)  # the name now leads into another run
        fd, real = open_source(MarkerRequest("source", source="checkpoints/0003"), run, (art,), run_fd)
        os.close(fd)
    finally:
        os.close(run_fd)
    assert real == art / "p/models/m-moved/checkpoints/0003"
