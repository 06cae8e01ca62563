"""The ART run layout, read-only: `{art_path}/{project}/models/{model}/checkpoints/{step:04d}/`.

ART treats every all-digit name in `checkpoints/` as a training step (`0000` is the adapter vLLM serves as
`{model}@0`); names that are not all digits are invisible to it, which is why the sidecar's own working copies are
hidden dot-names there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from sidecar.protocol.run_layout import CHECKPOINTS

__all__ = [
    "RunDir",
    "checkpoint_dir",
    "iter_run_dirs",
    "latest_step",
    "run_dir_of",
    "step_dirs",
]


@dataclass(frozen=True)
class RunDir:
    """A model directory of ART, placed under the art path (root) it was found in."""

    root: Path
    project: str
    model: str

    @cached_property
    def path(self) -> Path:
        return self.root / self.project / "models" / self.model

    @cached_property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def sibling(self, model: str, project: str | None = None) -> RunDir:
        return RunDir(self.root, project or self.project, model)

    def __str__(self) -> str:
        return f"{self.project}/{self.model}"


def run_dir_of(model_dir: Path, roots: tuple[Path, ...]) -> RunDir | None:
    """The RunDir for `model_dir` if it sits exactly at `{root}/{project}/models/{model}` under one of `roots`."""
    for root in roots:
        try:
            rel = model_dir.relative_to(root)
        except ValueError:
            continue
        parts = rel.parts
        if len(parts) == 3 and parts[1] == "models":
            return RunDir(root, parts[0], parts[2])
    return None


def iter_run_dirs(root: Path) -> Iterator[RunDir]:
    """Every `{project}/models/{model}` directory under `root` (real directories only, hidden names skipped)."""
    for project in _subdirs(root):
        for model in _subdirs(root / project / "models"):
            yield RunDir(root, project, model)


def _subdirs(path: Path) -> list[str]:
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def step_dirs(checkpoints: Path | int) -> dict[int, Path]:
    """All-digit step directories of a run, by step number (what ART sees as its checkpoints).

    `checkpoints` may be an open directory descriptor; the paths are then names relative to it.
    """
    steps: dict[int, Path] = {}
    try:
        with os.scandir(checkpoints) as it:
            for e in it:
                if e.name.isascii() and e.name.isdigit() and e.is_dir(follow_symlinks=False):
                    steps[int(e.name)] = Path(e.path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return steps


def latest_step(checkpoints: Path | int, *, not_after: int | None = None, exclude_served: bool = True) -> int | None:
    """The newest step, optionally at or before `not_after`, skipping step 0 (the served adapter) by default."""
    candidates = [
        s for s in step_dirs(checkpoints) if not (exclude_served and s == 0) and (not_after is None or s <= not_after)
    ]
    return max(candidates, default=None)


def checkpoint_dir(checkpoints: Path, step: int) -> Path:
    """Where ART keeps `step`: zero-padded to four digits, wider when the step needs it."""
    return checkpoints / f"{step:04d}"
