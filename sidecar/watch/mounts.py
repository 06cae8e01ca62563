"""Which filesystem a path is on, and whether inotify can follow changes there (network and FUSE filesystems)."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["NETWORK_FILESYSTEMS", "fs_type_of", "needs_polling"]

# Filesystems where changes made on another host never reach local inotify: a root on one of these is polled in `auto`.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "lustre", "cifs", "smb3", "smbfs", "9p", "ceph", "gpfs", "beegfs"})


def needs_polling(path: Path | str) -> str | None:
    """The filesystem type of `path` when inotify cannot see changes there (network and FUSE filesystems), else None."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mountinfo = f.read()
    except OSError:
        return None
    fs_type = fs_type_of(os.path.realpath(path), mountinfo)
    if fs_type is not None and (fs_type in NETWORK_FILESYSTEMS or fs_type == "fuse" or fs_type.startswith("fuse.")):
        return fs_type
    return None


def fs_type_of(path: str, mountinfo: str) -> str | None:
    """The filesystem type of the mount with the longest mount point containing `path` (an absolute, real path)."""
    best_len, best_type = -1, None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:] or len(fields) < 9:
            continue
        mount_point = _unescape_mountinfo(fields[4])
        fs_type = fields[fields.index("-", 6) + 1]
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        # `>=`: a later line mounted over the same point hides the earlier one.
        if inside and len(mount_point) >= best_len:
            best_len, best_type = len(mount_point), fs_type
    return best_type


def _unescape_mountinfo(field_text: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as 3-digit octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)
