"""Recovery and cleanup: removing the retired checkpoint or an abandoned stage, and settling the leftovers of forks that
no journal knows."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sidecar.adapter import printable
from sidecar.fsops import lstat_at
from sidecar.fsops import rename_noreplace_at as rename_noreplace
from sidecar.protocol.atomic_write import fsync_dir_fd as _fsync_dir
from sidecar.swap.dirs import (
    LEFTOVER_NAME,
    LIVE_NAME,
    STAGING_PREFIX,
    SwapError,
    open_checkpoints_dir,
    our_entries,
    remove_entry,
    retired_name,
    staging_name,
)

__all__ = ["abort_staging", "discard_retired", "leftovers", "settle_leftover"]

log = logging.getLogger("sidecar.swap")


def _remove_named(checkpoints_dir: Path, name: str, run_fd: int | None) -> None:
    cfd = open_checkpoints_dir(checkpoints_dir, run_fd)
    try:
        if remove_entry(cfd, name):
            _fsync_dir(cfd)
    except OSError as exc:
        shown = printable(checkpoints_dir / name)
        raise SwapError(
            checkpoints_dir / name, f"{shown}: cannot remove ({exc.strerror}); remove it by hand."
        ) from None
    finally:
        os.close(cfd)


def discard_retired(checkpoints_dir: Path, fork_id: str, *, run_fd: int | None = None) -> None:
    """Removes .fork-retired-<id> (the checkpoint 0000 held before the fork); nothing if it is gone."""
    _remove_named(checkpoints_dir, retired_name(fork_id), run_fd)


def abort_staging(checkpoints_dir: Path, fork_id: str, *, run_fd: int | None = None) -> None:
    """Removes the stage of a fork that failed before install_staging was called; nothing if it is gone.

    Once install_staging has started, a fork can only go forward: call install_staging again instead.
    Refuses when 0000 is missing and the retired copy exists (a half-done rename-aside), because
    removing the stage then would leave the run without 0000.
    """
    cfd = open_checkpoints_dir(checkpoints_dir, run_fd)
    try:
        missing_live = lstat_at(cfd, LIVE_NAME) is None
        has_retired = lstat_at(cfd, retired_name(fork_id)) is not None
    finally:
        os.close(cfd)
    if missing_live and has_retired:
        shown = printable(checkpoints_dir / LIVE_NAME)
        raise SwapError(
            checkpoints_dir,
            f"{shown}: is missing because fork {fork_id} was half installed; finish it with install_staging "
            f"instead of aborting.",
        )
    _remove_named(checkpoints_dir, staging_name(fork_id), run_fd)


def leftovers(checkpoints_dir: Path, *, run_fd: int | None = None) -> list[tuple[str, str]]:
    """(kind, fork id) for each .fork-stage-* ("stage") and .fork-retired-* ("retired") entry, sorted."""
    try:
        cfd = open_checkpoints_dir(checkpoints_dir, run_fd)
    except SwapError:
        return []
    try:
        names = os.listdir(cfd)
    finally:
        os.close(cfd)
    found = []
    for name in names:
        match = LEFTOVER_NAME.fullmatch(name)
        if match:
            found.append(("stage" if match.group(1) == STAGING_PREFIX else "retired", match.group(2)))
    return sorted(found)


def settle_leftover(checkpoints_dir: Path, fork_id: str, *, run_fd: int | None = None) -> str:
    """Cleans up after a fork no journal knows: leaves 0000 a complete checkpoint and removes the rest.

    If 0000 is missing, a half-done rename-aside is completed (the stage had been checked before
    install began) or, with no stage, the retired copy is put back. Then the stage and the retired
    copy are removed. Returns what it did, for the log.
    """
    staging, retired = staging_name(fork_id), retired_name(fork_id)
    cfd = open_checkpoints_dir(checkpoints_dir, run_fd)
    try:
        present = our_entries(cfd, checkpoints_dir, (LIVE_NAME, staging, retired))
        done = []
        if present[LIVE_NAME] is None:
            if present[staging] is not None and present[retired] is not None:
                rename_noreplace(cfd, staging, LIVE_NAME)
                done.append(f"completed the install of {staging}")
            elif present[retired] is not None:
                rename_noreplace(cfd, retired, LIVE_NAME)
                done.append(f"put {retired} back as 0000")
            _fsync_dir(cfd)
        for name in (staging, retired):
            if remove_entry(cfd, name):
                done.append(f"removed {name}")
        _fsync_dir(cfd)
        return "; ".join(done) or "nothing to do"
    except OSError as exc:
        raise SwapError(
            checkpoints_dir,
            f"{printable(checkpoints_dir)}: {exc.strerror or exc} while cleaning up fork {fork_id}; "
            f"check the directory by hand.",
        ) from None
    finally:
        os.close(cfd)
