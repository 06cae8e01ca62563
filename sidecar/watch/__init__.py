"""Noticing `.fork` markers in ART run directories (loop.py), over the layout tree (tree.py), the inotify layer
(inotify.py) and the filesystem kinds that inotify cannot follow (mounts.py)."""

from sidecar.watch.loop import MARKER_SETTLE_S, MarkerWatcher, WatchMode
from sidecar.watch.mounts import NETWORK_FILESYSTEMS, fs_type_of, needs_polling

__all__ = ["MARKER_SETTLE_S", "NETWORK_FILESYSTEMS", "MarkerWatcher", "WatchMode", "fs_type_of", "needs_polling"]
