"""Who listens on a local TCP port: the kernel's socket tables (/proc/net/tcp, tcp6) against a process's fds.

A discovered vLLM server is a process with a port on its command line; that the process *says* it serves the port
does not make it the one listening there (a server still loading its model is not listening yet, and any user may
bind a free port first). So before anything carrying a server's key goes to a port, `listener_problem` checks that
every listening socket that a connection to that address can reach is held by that process or one of its children
(vLLM and ART start the API server as a child process in some modes; `uv run` is a parent). `parse_tcp_table` is pure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

__all__ = ["Listener", "listener_problem", "listeners_on", "parse_tcp_table", "socket_inodes"]

_LISTEN = "0A"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Listener:
    address: IPAddress
    port: int
    uid: int  # who created the socket, from the kernel's table
    inode: int


def _address(hex_text: str) -> IPAddress:
    raw = bytes.fromhex(hex_text)
    # The kernel prints each 32-bit word of the address in host order (little-endian here).
    ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(ordered)


def parse_tcp_table(text: str) -> list[Listener]:
    """The LISTEN rows of a /proc/net/tcp or /proc/net/tcp6 text."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        address, _, port = fields[1].partition(":")
        with contextlib.suppress(ValueError):
            out.append(Listener(_address(address), int(port, 16), int(fields[7]), int(fields[9])))
    return out


def listeners_on(host: str, port: int) -> list[Listener]:
    """Listening sockets that a connection to `host`:`port` could reach (the address itself, or a wildcard)."""
    targets = _addresses(host, port)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = parse_tcp_table(f.read())
        except OSError:
            continue
        found += [r for r in rows if r.port == port and _reaches(r.address, targets)]
    return found


def _addresses(host: str, port: int) -> set[IPAddress]:
    try:
        return {ipaddress.ip_address(host.strip("[]"))}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {ipaddress.ip_address(info[4][0]) for info in infos}


def _reaches(bound: IPAddress, targets: set[IPAddress]) -> bool:
    if bound.is_unspecified:  # 0.0.0.0 takes IPv4; :: takes both (dual stack) unless IPV6_V6ONLY: assume it may
        return bound.version == 6 or any(t.version == 4 for t in targets)
    if bound in targets:
        return True
    mapped = getattr(bound, "ipv4_mapped", None)
    return mapped is not None and mapped in targets


def socket_inodes(pids: Iterable[int]) -> set[int]:
    """Inodes of the sockets open in these processes (needs root, or the same user)."""
    inodes = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for name in names:
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{name}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def listener_problem(pid: int, host: str, port: int) -> str | None:
    """None when every socket listening on `host`:`port` belongs to `pid` or its children, else why not (a
    sentence naming the port and, for a stranger's socket, its uid: that much is in the world-readable table)."""
    found = listeners_on(host, port)
    if not found:
        return f"nothing listens on {host}:{port} yet (is pid {pid} still starting?)"
    try:
        held = socket_inodes([pid])
        if any(r.inode not in held for r in found):
            # Only then the children: psutil walks the whole process table for them (about 8 ms here).
            held |= socket_inodes(c.pid for c in psutil.Process(pid).children(recursive=True))
        elif not psutil.pid_exists(pid):
            return f"pid {pid} has exited"
    except psutil.NoSuchProcess:
        return f"pid {pid} has exited"
    except (psutil.AccessDenied, PermissionError):
        return f"cannot read pid {pid}'s sockets to check that it listens on {host}:{port}; run the daemon as root"
    strangers = [r for r in found if r.inode not in held]
    if strangers:
        return (
            f"{host}:{port} is held by a listening socket of uid {strangers[0].uid}, not by pid {pid} or its children"
        )
    return None
