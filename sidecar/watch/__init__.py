"""Noticing `.fork` markers in ART run directories (loop.py), over the layout tree (tree.py), the inotify layer
(inotify.py) and the filesystem kinds that inotify cannot follow (mounts.py)."""

from sidecar.watch.inotify import WatchMode
from sidecar.watch.loop import MarkerWatcher
from sidecar.watch.mounts import NETWORK_FILESYSTEMS, fs_type_of, needs_polling

__all__ = ["NETWORK_FILESYSTEMS", "MarkerWatcher", "WatchMode", "fs_type_of", "needs_polling"]
