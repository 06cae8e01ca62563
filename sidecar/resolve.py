"""Turning a MarkerRequest into the checkpoint directory to fork from, inside the allowed roots only.

The source is opened, and what was opened is checked: its real path is read back from the descriptor
(`/proc/self/fd`), so no rename of a parent between the check and the copy can point the copy elsewhere, and
the staging copy reads from that same descriptor. Relative paths, steps and sibling models are opened from the
run directory's descriptor, never from its path. The caller runs this with the run owner's rights, so every
sentence below says only what that owner could have found out with `ls`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from sidecar.layout import RunDir, latest_step
from sidecar.marker import MarkerRequest
from sidecar.protocol.run_layout import CHECKPOINTS, SERVED_STEP
from sidecar.rundir import DIR_FLAGS, RunDirError, lexists_at, open_run

__all__ = ["ResolveError", "open_source", "open_source_path", "resolve_source"]

_FOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class ResolveError(Exception):
    """The request names no usable checkpoint, as one sentence naming the path and the fix."""


def resolve_source(request: MarkerRequest, run: RunDir, allowed_roots: Sequence[Path]) -> Path:
    """The real path of the source checkpoint dir (opening the run itself; the daemon uses open_source)."""
    try:
        opened = open_run(run)
    except RunDirError as e:
        raise ResolveError(str(e)) from None
    try:
        fd, real = open_source(request, run, allowed_roots, opened.fd)
        os.close(fd)
        return real
    finally:
        opened.close()


def open_source(request: MarkerRequest, run: RunDir, allowed_roots: Sequence[Path], run_fd: int) -> tuple[int, Path]:
    """The source checkpoint dir, open (the caller closes it), and its real path, checked against the roots."""
    try:
        cfd = os.open(CHECKPOINTS, DIR_FLAGS, dir_fd=run_fd)
    except OSError:
        raise ResolveError(f"{run.checkpoints} is missing or not a real directory; is {run.path} an ART run?") from None
    try:
        shown, fd = _open_candidate(request, run, run_fd, cfd)
        try:
            real = _checked(fd, shown, allowed_roots)
            served = os.stat(SERVED_STEP, dir_fd=cfd, follow_symlinks=False) if lexists_at(cfd, SERVED_STEP) else None
            st = os.fstat(fd)
            if served is not None and (served.st_dev, served.st_ino) == (st.st_dev, st.st_ino):
                raise ResolveError(
                    f"{shown} is checkpoints/{SERVED_STEP} itself; name another checkpoint to fork from."
                )
        except BaseException:
            os.close(fd)
            raise
        return fd, real
    finally:
        os.close(cfd)


def open_source_path(path: Path, allowed_roots: Sequence[Path]) -> tuple[int, Path]:
    """Opens a source already resolved once (a fork resumed after a restart) and checks it again."""
    fd = _open_dir(path, path, None)
    try:
        return fd, _checked(fd, path, allowed_roots)
    except BaseException:
        os.close(fd)
        raise


def _open_candidate(request: MarkerRequest, run: RunDir, run_fd: int, cfd: int) -> tuple[Path, int]:
    if request.kind == "source":
        assert request.source is not None
        path = Path(request.source)
        if path.is_absolute():
            return path, _open_dir(path, path, None)
        return run.path / path, _open_dir(path, run.path / path, run_fd)
    if request.kind == "step":
        assert request.step is not None
        if request.step == 0:
            raise ResolveError(f"{run.checkpoints / SERVED_STEP} is step 0 itself; name a step other than 0.")
        name = f"{request.step:04d}"
        return run.checkpoints / name, _open_dir(Path(name), run.checkpoints / name, cfd)
    if request.kind == "from_model":
        return _open_sibling(request, run)
    step = latest_step(cfd)
    if step is None:
        raise ResolveError(
            f"{run.checkpoints} has no checkpoint other than {SERVED_STEP}; name a source, step or from_model."
        )
    name = f"{step:04d}"
    return run.checkpoints / name, _open_dir(Path(name), run.checkpoints / name, cfd)


def _open_sibling(request: MarkerRequest, run: RunDir) -> tuple[Path, int]:
    assert request.from_model is not None
    other = run.sibling(request.from_model, request.from_project)
    try:
        opened = open_run(other)
    except RunDirError:
        # The same sentence whether it is missing or closed to the run's owner: they could not tell either.
        raise ResolveError(f"{other.path} does not exist; check from_model/from_project.") from None
    try:
        try:
            cfd = opened.checkpoints_fd()
        except OSError:
            raise ResolveError(
                f"{other.checkpoints} is missing or not a real directory; train that model first."
            ) from None
        try:
            step = latest_step(cfd, not_after=request.not_after_step, exclude_served=False)
            if step is None:
                limit = f" at or before step {request.not_after_step}" if request.not_after_step is not None else ""
                raise ResolveError(f"{other.checkpoints} has no checkpoint{limit}; train that model first.")
            name = f"{step:04d}"
            return other.checkpoints / name, _open_dir(Path(name), other.checkpoints / name, cfd)
        finally:
            os.close(cfd)
    finally:
        opened.close()


def _open_dir(path: Path, shown: Path, dir_fd: int | None) -> int:
    """Opens a directory (symlinks followed: where they lead is checked afterwards, on the descriptor)."""
    try:
        return os.open(path, _FOLLOW_DIR, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ResolveError(f"{shown} does not exist; name an existing checkpoint directory.") from None
    except NotADirectoryError:
        raise ResolveError(f"{shown} is not a directory; name a checkpoint directory, not a file.") from None
    except PermissionError:
        raise ResolveError(
            f"{shown} cannot be read by the run's owner (permission denied); fork from a checkpoint that user can read."
        ) from None
    except OSError as e:  # ELOOP for a symlink loop, ...
        raise ResolveError(f"{shown} cannot be resolved ({os.strerror(e.errno or 0)}); fix the path.") from None


def _checked(fd: int, shown: Path, allowed_roots: Sequence[Path]) -> Path:
    """The real path of the directory open as `fd`, which must lie inside one of `allowed_roots`."""
    try:
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError as e:
        raise ResolveError(f"{shown} cannot be resolved ({os.strerror(e.errno or errno.EIO)}); fix the path.") from None
    if not real.is_absolute() or not any(_is_within(real, _real_root(root)) for root in allowed_roots):
        roots = ", ".join(str(r) for r in allowed_roots)
        raise ResolveError(
            f"{shown} resolves to {real}, outside the allowed source roots ({roots}); "
            "fork from inside them or add the location to sources.allowed_roots."
        )
    return real


def _real_root(root: Path) -> Path:
    return Path(os.path.realpath(root))


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
