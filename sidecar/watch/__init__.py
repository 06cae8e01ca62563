"""Noticing `.fork` markers in ART run directories (loop.py), over the layout tree (tree.py), the inotify layer
(inotify.py) and the filesystem kinds that inotify cannot follow (mounts.py)."""

from sidecar.watch.inotify import WatchMode
from sidecar.watch.loop import MarkerWatcher
from sidecar.watch.mounts import NETWORK_FILESYSTEMS, fs_type_of, needs_polling
from sidecar.watch.settle import MARKER_SETTLE_S

__all__ = ["MARKER_SETTLE_S", "NETWORK_FILESYSTEMS", "MarkerWatcher", "WatchMode", "fs_type_of", "needs_polling"]
