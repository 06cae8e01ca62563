"""Installing a staged checkpoint as `checkpoints/0000`: one exchange (or aside + rename where the filesystem cannot
exchange), planned from which names exist so that a call after a crash finishes what the last one started."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sidecar.adapter import (
    AdapterError,
    adapter_digest,
    printable,
)
from sidecar.fsops import exchange_dirs, lstat_at
from sidecar.fsops import rename_noreplace_at as rename_noreplace
from sidecar.protocol.atomic_write import fsync_dir_fd as _fsync_dir
from sidecar.swap.dirs import (
    LIVE_NAME,
    SwapError,
    open_checkpoints_dir,
    our_entries,
    retired_name,
    staging_name,
)

__all__ = ["SwapResult", "install_staging"]

log = logging.getLogger("sidecar.swap")


@dataclass(frozen=True)
class SwapResult:
    live: Path  # checkpoints/0000, now the new checkpoint
    digest: str
    how: str  # "exchange", "aside", "rename", or "none" when 0000 was already the new checkpoint
    retired: Path | None  # where the previous 0000 now is, if it still exists
    resumed: bool  # this call found and finished an install interrupted earlier


def _digest_matches(cfd: int, checkpoints_dir: Path, name: str, new_digest: str) -> bool:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cfd)
    try:
        return adapter_digest(checkpoints_dir / name, dir_fd=fd) == new_digest
    except (AdapterError, OSError):
        return False
    finally:
        os.close(fd)


def _which_is_new(
    cfd: int, checkpoints_dir: Path, candidates: dict[str, os.stat_result], new_digest: str, stage_inode: int | None
) -> str | None:
    """Which of the candidate entries holds the staged checkpoint.

    The stage directory's inode travels with it through renames and exchanges, so when the caller
    passes it, one fstatat answers. Without it, or on a filesystem whose inode numbers changed (some
    FUSE and network filesystems after a remount), the adapter digests decide; if both hold the same
    tensors, 0000 counts as new (the fork changed no weights).
    """
    if stage_inode is not None:
        for name, info in candidates.items():
            if info.st_ino == stage_inode:
                return name
    for name in candidates:
        if _digest_matches(cfd, checkpoints_dir, name, new_digest):
            return name
    return None


def _plan_install(has_live: bool, has_stage: bool, has_retired: bool, new: str | None) -> str:
    """Pure: the next operation for the names present and which entry holds the new adapter ("live" is 0000,
    "stage", or None for neither).

    Returns one of: "exchange" (stage <-> 0000), "retire" (stage -> retired), "promote" (stage -> 0000),
    "done", or "error:<reason>".
    """
    if has_stage and has_live:
        if has_retired:
            return "error:conflict"
        if new == "stage":
            return "exchange"
        if new == "live":
            return "retire"  # exchanged earlier; the stage name holds the old checkpoint
        return "error:neither"
    if has_stage:
        return "promote" if new == "stage" else "error:neither"
    if has_live:
        return "done" if new == "live" else "error:stage-gone"
    return "error:retired-only" if has_retired else "error:nothing"


def install_staging(
    checkpoints_dir: Path,
    fork_id: str,
    new_digest: str,
    *,
    stage_inode: int | None = None,
    allow_exchange: bool = True,
    run_fd: int | None = None,
) -> SwapResult:
    """Brings `checkpoints_dir` to: 0000 is the staged checkpoint, the previous 0000 at .fork-retired-<id>.

    Idempotent: after a crash at any point inside it, call it again with the same arguments. Pass
    `stage_inode` (StagingCopy.inode) so it can tell old from new without reading adapters;
    without it the adapter digests decide, which reads them. `allow_exchange=False` forces the
    rename-aside path, which leaves a moment without 0000.
    """
    staging, retired = staging_name(fork_id), retired_name(fork_id)
    cfd = open_checkpoints_dir(checkpoints_dir, run_fd)
    try:
        how, resumed = "none", False
        for step in range(4):  # the longest path is aside, promote, done
            present = our_entries(cfd, checkpoints_dir, (LIVE_NAME, staging, retired))
            candidates = {n: i for n, i in present.items() if i is not None and n != retired}
            new_name = _which_is_new(cfd, checkpoints_dir, candidates, new_digest, stage_inode)
            action = _plan_install(
                present[LIVE_NAME] is not None,
                present[staging] is not None,
                present[retired] is not None,
                {LIVE_NAME: "live", staging: "stage"}.get(new_name or ""),
            )
            if step == 0:
                resumed = action == "retire" or (action == "promote" and present[retired] is not None)
            if action == "done":
                if step == 0:  # a crash may have come between the last rename and its fsync
                    _fsync_dir(cfd)
                # Otherwise this call's last rename was fsynced by _apply (every action but "aside" fsyncs, and
                # "aside" is always followed by "promote"): a second fsync would only cost another disk flush.
                left = checkpoints_dir / retired if lstat_at(cfd, retired) is not None else None
                return SwapResult(checkpoints_dir / LIVE_NAME, new_digest, how, left, resumed)
            if action.startswith("error:"):
                raise _install_error(action, checkpoints_dir, staging, retired, new_digest)
            used = _apply(action, cfd, staging, retired, allow_exchange=allow_exchange)
            if how == "none" and used != "retire":
                how = used
        raise SwapError(checkpoints_dir, f"{printable(checkpoints_dir)}: the install did not settle; report a bug.")
    except OSError as exc:
        raise SwapError(
            checkpoints_dir,
            f"{printable(checkpoints_dir)}: {exc.strerror or exc} while installing fork {fork_id}; fix the cause "
            f"and install again (the step is safe to repeat).",
        ) from None
    finally:
        os.close(cfd)


def _apply(action: str, cfd: int, staging: str, retired: str, *, allow_exchange: bool) -> str:
    """Performs one planned rename (then fsyncs checkpoints/); returns how: exchange, aside, rename, retire."""
    if action == "exchange":
        if allow_exchange:
            try:
                exchange_dirs(cfd, staging, LIVE_NAME)
                _fsync_dir(cfd)
                return "exchange"
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                log.info("this filesystem cannot exchange directories (%s); renaming 0000 aside", exc.strerror)
        # Rename-aside: 0000 is missing until the next step (promote), which a re-run also performs.
        rename_noreplace(cfd, LIVE_NAME, retired)
        return "aside"
    if action == "retire":
        rename_noreplace(cfd, staging, retired)
        _fsync_dir(cfd)
        return "retire"
    if action == "promote":
        rename_noreplace(cfd, staging, LIVE_NAME)
        _fsync_dir(cfd)
        return "rename"
    raise AssertionError(action)


def _install_error(action: str, checkpoints_dir: Path, staging: str, retired: str, digest: str) -> SwapError:
    live = printable(checkpoints_dir / LIVE_NAME)
    reasons = {
        "error:conflict": (
            f"{printable(checkpoints_dir / retired)}: already exists beside {staging} and 0000, so this fork id was "
            f"used before; remove that directory after checking it, then install again."
        ),
        "error:neither": (
            f"{printable(checkpoints_dir / staging)}: neither it nor 0000 holds the staged adapter ({digest}); "
            f"stage the checkpoint again."
        ),
        "error:stage-gone": (
            f"{live}: does not hold the staged adapter ({digest}) and {staging} is gone; stage the checkpoint again."
        ),
        "error:retired-only": (
            f"{live}: is missing and only {retired} (the previous checkpoint) is left; rename it back to 0000 "
            f"and fork again."
        ),
        "error:nothing": f"{live}: is missing and so is {staging}; stage the checkpoint again.",
    }
    return SwapError(checkpoints_dir, reasons[action])
