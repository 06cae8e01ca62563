"""The ART run layout: run discovery, step dirs, latest step."""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.layout import RunDir, checkpoint_dir, iter_run_dirs, latest_step, run_dir_of, step_dirs


def make_steps(checkpoints: Path, *names: str) -> None:
    for name in names:
        (checkpoints / name).mkdir(parents=True)


def test_iter_run_dirs_finds_models_and_skips_hidden_and_files(tmp_path: Path) -> None:
    for p in ("p1/models/a", "p1/models/b", "p2/models/c", "p2/models/.hidden", "p3/other/x"):
        (tmp_path / p).mkdir(parents=True)
    (tmp_path / "p2/models/file").write_text("")
    os.symlink(tmp_path / "p1/models/a", tmp_path / "p2/models/link")
    assert [str(r) for r in iter_run_dirs(tmp_path)] == ["p1/a", "p1/b", "p2/c"]


def test_steps_are_all_digit_dirs_only(tmp_path: Path) -> None:
    cp = tmp_path / "checkpoints"
    make_steps(cp, "0000", "0003", "0010", ".fork-stage-x", "0005-tmp", "10000")
    (cp / "0007").write_text("not a dir")
    assert sorted(step_dirs(cp)) == [0, 3, 10, 10000]
    assert latest_step(cp) == 10000
    assert latest_step(cp, not_after=9) == 3
    assert latest_step(cp, not_after=0) is None
    assert latest_step(cp, not_after=0, exclude_served=False) == 0
    assert latest_step(tmp_path / "missing") is None


def test_checkpoint_dir_pads_like_art(tmp_path: Path) -> None:
    assert checkpoint_dir(tmp_path, 5).name == "0005"
    assert checkpoint_dir(tmp_path, 12345).name == "12345"


def test_run_dir_of(tmp_path: Path) -> None:
    run = run_dir_of(tmp_path / "proj/models/m", (tmp_path / "other", tmp_path))
    assert run == RunDir(tmp_path, "proj", "m")
    assert run is not None and run.path == tmp_path / "proj/models/m"
    assert run_dir_of(tmp_path / "proj/m", (tmp_path,)) is None
    assert run_dir_of(tmp_path / "proj/models/m/checkpoints", (tmp_path,)) is None
