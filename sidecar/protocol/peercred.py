"""Who is on the other end of a socket, in the kernel's word (SO_PEERCRED), and which uid a process runs as."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

__all__ = ["PeerCred", "peer_credentials", "process_uid"]

_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    """The kernel's record of who is on the other end (for a listener: who called listen())."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


def process_uid(pid: int) -> int | None:
    """The effective uid of a live process (from /proc), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return None
