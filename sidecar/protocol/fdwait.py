"""Waiting on descriptors with poll(2), never select(2): select refuses descriptors numbered 1024 and above, which a
trainer with many open files (data loaders, dataset shards, NCCL) has long before its agent opens a socket, and a
daemon under a raised LimitNOFILE can reach too."""

from __future__ import annotations

import select

__all__ = ["readable", "wait_writable"]


def readable(fds: list[int], timeout: float) -> list[int]:
    """The descriptors of `fds` ready to read (or at EOF/error, where a read says why) within `timeout` seconds."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(max(0, int(timeout * 1000)))]


def wait_writable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(max(0, int(timeout * 1000))))
