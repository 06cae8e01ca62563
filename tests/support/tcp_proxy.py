"""A TCP forwarder in its own process, between one daemon and etcd: freezing it (SIGSTOP) cuts that daemon off from
etcd while every other daemon, and the shared filesystem, stay reachable (a network partition of one node).

    with TcpProxy(target_port) as proxy:   # proxy.url: "http://127.0.0.1:PORT", forwarding to 127.0.0.1:target_port
        proxy.freeze() / proxy.thaw()      # nothing is forwarded while frozen: the kernel accepts, nobody answers
"""

from __future__ import annotations

import signal
import subprocess
import sys
from types import TracebackType

__all__ = ["TcpProxy"]

_FORWARDER = """
import socket, sys, threading
target = ("127.0.0.1", int(sys.argv[1]))
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)

def pump(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

while True:
    client, _ = listener.accept()
    try:
        upstream = socket.create_connection(target)
    except OSError:
        client.close()
        continue
    for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=pump, args=(a, b), daemon=True).start()
"""


class TcpProxy:
    def __init__(self, target_port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _FORWARDER, str(target_port)], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.thaw()
        self.proc.kill()
        self.proc.wait()
