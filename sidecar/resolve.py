"""Turning a ForkRequest into the checkpoint directory to fork from, inside the allowed roots only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sidecar.layout import SERVED_STEP, RunDir, checkpoint_dir, latest_step
from sidecar.marker import ForkRequest

__all__ = ["ResolveError", "resolve_source"]


class ResolveError(Exception):
    """The request names no usable checkpoint, as one sentence naming the path and the fix."""


def resolve_source(request: ForkRequest, run: RunDir, allowed_roots: Sequence[Path]) -> Path:
    """The real path of the source checkpoint dir; symlinks resolved, then checked against `allowed_roots`."""
    if not run.checkpoints.is_dir() or run.checkpoints.is_symlink():
        raise ResolveError(f"{run.checkpoints} is missing or not a real directory; is {run.path} an ART run?")
    candidate = _candidate(request, run)
    try:
        real = Path(os.path.realpath(candidate, strict=True))
    except FileNotFoundError:
        raise ResolveError(f"{candidate} does not exist; name an existing checkpoint directory.") from None
    except OSError as e:  # ELOOP for a symlink loop, EACCES, ...
        raise ResolveError(f"{candidate} cannot be resolved ({os.strerror(e.errno or 0)}); fix the path.") from None
    if not any(_is_within(real, Path(os.path.realpath(root))) for root in allowed_roots):
        roots = ", ".join(str(r) for r in allowed_roots)
        raise ResolveError(
            f"{candidate} resolves to {real}, outside the allowed source roots ({roots}); "
            "fork from inside them or add the location to sources.allowed_roots."
        )
    if not real.is_dir():
        raise ResolveError(f"{candidate} is not a directory; name a checkpoint directory, not a file.")
    if real == Path(os.path.realpath(run.checkpoints / SERVED_STEP)):
        raise ResolveError(f"{candidate} is checkpoints/{SERVED_STEP} itself; name another checkpoint to fork from.")
    return real


def _candidate(request: ForkRequest, run: RunDir) -> Path:
    if request.kind == "source":
        assert request.source is not None
        path = Path(request.source)
        return path if path.is_absolute() else run.path / path
    if request.kind == "step":
        assert request.step is not None
        if request.step == 0:
            raise ResolveError(f"{run.checkpoints / SERVED_STEP} is step 0 itself; name a step other than 0.")
        return checkpoint_dir(run.checkpoints, request.step)
    if request.kind == "from_model":
        assert request.from_model is not None
        other = run.sibling(request.from_model, request.from_project)
        if not other.path.is_dir():
            raise ResolveError(f"{other.path} does not exist; check from_model/from_project.")
        step = latest_step(other.checkpoints, not_after=request.not_after_step, exclude_served=False)
        if step is None:
            limit = f" at or before step {request.not_after_step}" if request.not_after_step is not None else ""
            raise ResolveError(f"{other.checkpoints} has no checkpoint{limit}; train that model first.")
        return checkpoint_dir(other.checkpoints, step)
    step = latest_step(run.checkpoints)
    if step is None:
        raise ResolveError(
            f"{run.checkpoints} has no checkpoint other than {SERVED_STEP}; name a source, step or from_model."
        )
    return checkpoint_dir(run.checkpoints, step)


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
