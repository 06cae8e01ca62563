"""Replacing `checkpoints/0000` with a forked checkpoint, atomically (the etcd / Prometheus TSDB recipe).

1. copy_to_staging: copy every file of the source into `checkpoints/.fork-stage-<id>` (same filesystem;
   a hidden, never all-digit name, because ART treats all-digit names as steps), by reflink where the
   filesystem can, else by copy (hardlinks only when asked); fsync each file and directory; check the
   staged adapter; compute its digest.
2. install_staging: `renameat2(RENAME_EXCHANGE)` the staging copy with `0000`, fsync `checkpoints/`, then rename
   the staging name (now holding the old checkpoint) to `.fork-retired-<id>` and fsync again. Readers see
   the old directory or the new one, never a mix. Where the filesystem cannot exchange (vfat, NFS,
   most FUSE filesystems answer EINVAL), rename `0000` aside to `.fork-retired-<id>` and the staging copy to
   `0000`: there is a moment without `0000`, which install_staging completes when called again.
3. discard_retired: remove `.fork-retired-<id>` once nothing needs it.

Every step is a function of (checkpoints dir, fork id, expected digest) that looks at which names
exist and brings the directory to its end state, so a journaled caller resumes after a SIGKILL by
calling the step it recorded again. `leftovers` and `settle_leftover` clean up after forks that no
journal knows. Every failure is a SwapError with one sentence naming the path and what to do; before
install nothing in `checkpoints/` but the staging copy changes, and a failed one is removed.

All work happens through directory file descriptors opened with O_NOFOLLOW, so a symlink swapped in
after a check is never followed. `0000` stays a real directory: ART deletes checkpoints with
`shutil.rmtree`, which refuses symlinks.

The modules: `dirs` (the names and opening them), `staging` (step 1), `install` (step 2), `recovery` (step 3 and
the leftovers).
"""

from sidecar.swap.dirs import LIVE_NAME, SwapError, retired_name, staging_name
from sidecar.swap.install import SwapResult, install_staging
from sidecar.swap.recovery import abort_staging, discard_retired, leftovers, settle_leftover
from sidecar.swap.staging import COPY_MODES, Progress, StagingCopy, copy_to_staging

__all__ = [
    "COPY_MODES",
    "LIVE_NAME",
    "Progress",
    "StagingCopy",
    "SwapError",
    "SwapResult",
    "abort_staging",
    "copy_to_staging",
    "discard_retired",
    "install_staging",
    "leftovers",
    "retired_name",
    "settle_leftover",
    "staging_name",
]
