"""Who listens on a port: the kernel's tables parsed (pure), then real listeners in this and other processes."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sidecar.listeners import Listener, listener_problem, listeners_on, parse_tcp_table, socket_inodes

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 40 1 0 100 0 0 10 0
   1: 0100007F:888C 0100007F:97A3 06 00000000:00000000 03:00000671 00000000     0        0 0 3 0
   2: 0100007F:4657 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 5150 1 0 100 0 0 10 0
"""
TCP6 = (
    "  sl  local_address                         remote_address                        st ...\n"
    "   0: 00000000000000000000000001000000:4657 00000000000000000000000000000000:0000 0A 00000000:00000000 "
    "00:00000000 00000000  1002        0 777 1 0\n"
)


def test_tables_are_parsed_to_listening_sockets_only() -> None:
    assert parse_tcp_table(TCP) == [
        Listener(ipaddress.ip_address("0.0.0.0"), 2024, 0, 40),
        Listener(ipaddress.ip_address("127.0.0.1"), 18007, 1001, 5150),
    ]
    assert parse_tcp_table(TCP6) == [Listener(ipaddress.ip_address("::1"), 18007, 1002, 777)]
    assert parse_tcp_table("header only\n   0: garbage\n") == []


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s
    s.close()


def test_our_own_listener_is_found_and_is_ours(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    [found] = listeners_on("127.0.0.1", port)
    assert found.uid == os.geteuid() and found.inode in socket_inodes([os.getpid()])
    assert listener_problem(os.getpid(), "127.0.0.1", port) is None
    assert listener_problem(os.getpid(), "localhost", port) is None  # names are resolved


def test_a_port_held_by_another_process_is_named_as_such(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        problem = listener_problem(other.pid, "127.0.0.1", port)
        assert problem is not None and f"pid {other.pid}" in problem and f"uid {os.geteuid()}" in problem
    finally:
        other.kill()
        other.wait()
    assert "has exited" in (listener_problem(other.pid, "127.0.0.1", port) or "")


def test_nothing_listening_yet_is_a_problem_too() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: a server still loading its model
        port = s.getsockname()[1]
        assert "nothing listens" in (listener_problem(os.getpid(), "127.0.0.1", port) or "")


def test_a_childs_listener_counts_as_the_parents() -> None:
    # `uv run vllm serve` and ART's launchers: the process found by its command line is the listener's parent.
    code = (
        "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1); "
        "print(s.getsockname()[1], flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}])"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        port = int(parent.stdout.readline())
        assert listener_problem(parent.pid, "127.0.0.1", port) is None
    finally:
        parent.kill()
        parent.wait()


def test_a_wildcard_listener_is_one_a_loopback_connection_reaches() -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert [r.inode for r in listeners_on("127.0.0.1", port)] != []
        assert listeners_on("::1", port) == []  # an IPv4 wildcard takes no IPv6 connection
