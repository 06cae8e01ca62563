"""Free loopback TCP ports for the servers tests start (vLLM, etcd, torchrun's rendezvous, fake vLLM servers)."""

from __future__ import annotations

import socket

__all__ = ["free_port", "free_ports"]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: held open together, so the kernel cannot hand out the same one twice; the caller
    binds them right after."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]
