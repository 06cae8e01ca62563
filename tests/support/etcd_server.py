"""A real etcd v3 server on loopback for tests and benchmarks: free ports, a private data dir, and the faults a
coordination test needs (SIGKILL, restart on the same ports and data, SIGSTOP/SIGCONT, auth switched on).

The binary is `etcd` from PATH (Debian's `etcd-server` package, 3.4 here and on CI), or FORK_SIDECAR_ETCD. Without
it `etcd_binary()` skips the test and says how to install it, or fails it under FORK_SIDECAR_REQUIRE_ETCD=1 (set by
`make test`, so the etcd tests cannot quietly vanish from CI). Everything here talks to etcd through its v3 JSON
gateway with urllib, so this module needs neither etcdctl (Debian's separate `etcd-client`) nor a client library.

API (the `etcd_server` fixture in tests/conftest.py yields a started, healthy `EtcdServer`; tests using it are
marked `etcd` automatically):

    server.url / server.endpoints     "http://127.0.0.1:PORT" / [that URL], for `coordination.etcd.endpoints`
    server.wait_healthy(timeout)      until a linearizable read succeeds (a leader exists); raises EtcdServerError
    server.kill()                     SIGKILL, as a crash or the OOM killer would; nothing is flushed on purpose
    server.restart()                  kill if alive, start again on the same ports and data dir, wait until healthy
    server.freeze() / server.thaw()   SIGSTOP / SIGCONT: connections are accepted by the kernel, nothing answers
    server.stop()                     SIGTERM (thaws first), SIGKILL after a grace period; the fixture calls it
    server.enable_auth(user, password, prefix)
                                      creates `root` (role root) and `user` with a role granting read-write on
                                      `prefix` and everything under it, then `auth enable`; returns EtcdAuth with
                                      the root password and a password file for `user` (mode 0600)
    server.put(k, v) / get(k) / keys(prefix)
                                      plain KV through the gateway (as root once auth is on; auth= a token or None)
    server.call(path, body, auth=...) one v3 gateway call, e.g. call("/v3/kv/put", {"key": b64("k"), ...}); returns
                                      the decoded JSON answer; raises EtcdCallError (with .status and .body)
    b64(text) / unb64(text)           the base64 the gateway uses for keys and values

After `enable_auth`, etcd answers with its own auth errors, as a daemon would meet them (3.4, through the gateway):
no token -> HTTP 400 "etcdserver: user name is empty"; wrong password -> HTTP 400 "etcdserver: authentication
failed, invalid user ID or password"; a key outside the user's prefix -> HTTP 403 "etcdserver: permission denied".
`/health` stays "true" with auth on. A frozen server makes every call time out (urllib's 5 s here).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.ports import free_ports
from tests.support.tools import required_tool

__all__ = [
    "EtcdAuth",
    "EtcdCallError",
    "EtcdServer",
    "EtcdServerError",
    "b64",
    "etcd_binary",
    "start_etcd",
    "unb64",
]

INSTALL_HINT = "install etcd 3.4+ (`apt-get install etcd-server` on Debian/Ubuntu)"
_CALL_TIMEOUT_S = 5.0
# How a call authenticates: True = as root once auth is on (no token before), a str = that token, None/False = none.
Auth = str | bool | None


class EtcdServerError(RuntimeError):
    """The server did not start or did not become healthy; the message quotes the end of its log."""


class EtcdCallError(RuntimeError):
    def __init__(self, path: str, status: int, body: str) -> None:
        super().__init__(f"etcd {path}: HTTP {status}: {body.strip()[:300]}")
        self.path = path
        self.status = status
        self.body = body


def etcd_binary() -> Path:
    """The etcd executable; skips the calling test without one, or fails it under FORK_SIDECAR_REQUIRE_ETCD=1."""
    return required_tool(
        "etcd", override_env="FORK_SIDECAR_ETCD", require_env="FORK_SIDECAR_REQUIRE_ETCD", install_hint=INSTALL_HINT
    )


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _prefix_end(prefix: str) -> str:
    # etcd's range end for "every key starting with prefix": the prefix with its last byte incremented.
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b64(b"\0")  # the whole keyspace
    raw[-1] += 1
    return b64(bytes(raw))


@dataclass(frozen=True)
class EtcdAuth:
    """What `enable_auth` created: the root account, and the daemon's account with its password in a file."""

    user: str
    password: str = field(repr=False)
    password_file: Path
    role: str
    prefix: str
    root_password: str = field(repr=False)


@dataclass
class EtcdServer:
    """One etcd member on 127.0.0.1 (see the module docstring for the API). Create it with `start_etcd`."""

    binary: Path
    data_dir: Path
    log_path: Path
    client_port: int
    peer_port: int
    name: str = "fork-sidecar-test"
    process: subprocess.Popen[bytes] | None = None
    auth: EtcdAuth | None = None
    starts: int = 0
    _root_token: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.url]

    @property
    def pid(self) -> int:
        if self.process is None:
            raise EtcdServerError("etcd was never started")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- lifecycle -------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Start the member (a new cluster on first start; the data dir's cluster afterwards) and wait until healthy."""
        if self.alive():
            raise EtcdServerError(f"etcd (pid {self.pid}) is already running")
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            str(self.binary),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.name}={peer}",
            "--initial-cluster-state=new",  # ignored once the data dir holds a member, as on a restart
            f"--initial-cluster-token={self.name}-{self.client_port}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1}: {' '.join(argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.starts += 1
        self._root_token = None  # a fresh token per process, whatever the token kind
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until the member has a leader and answers a linearizable read, or EtcdServerError (with its log tail)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self.alive():
                code = self._returncode()
                raise EtcdServerError(f"etcd exited with {code} before it was healthy:\n{self.log_tail()}")
            try:
                answer = self._get("/health")
            except (OSError, ValueError) as e:
                last = str(e)
            else:
                if answer.get("health") == "true":
                    return
                last = json.dumps(answer)
            time.sleep(0.05)
        raise EtcdServerError(f"etcd at {self.url} not healthy after {timeout:.0f}s ({last}):\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL; returns once the process is gone."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
        if self.process is not None:
            self.process.wait(10)

    def restart(self, timeout: float = 30.0) -> None:
        """Kill if alive, then start again on the same ports and data dir (keys, leases and users kept)."""
        self.kill()
        self.start(timeout)

    def freeze(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is answered, no lease is revoked.

        Returns once every thread is stopped: the signal is delivered asynchronously, and a thread still running
        would answer one more request."""
        self._signal(signal.SIGSTOP)
        self._wait_threads(stopped=True)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)
        self._wait_threads(stopped=False)

    def stop(self, grace: float = 10.0) -> None:
        """SIGCONT + SIGTERM, SIGKILL what is left after `grace` seconds (idempotent)."""
        if self.alive():
            assert self.process is not None
            self._signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        self.kill()

    # --- auth ------------------------------------------------------------------------------------------------------
    def enable_auth(
        self, user: str = "fork-sidecar", password: str = "s3cret-pass", prefix: str = "/fork-sidecar"
    ) -> EtcdAuth:
        """Create root and `user` (read-write on `prefix`), switch auth on; returns what was created."""
        if self.auth is not None:
            raise EtcdServerError("auth is already enabled on this server")
        root_password = "root-" + os.urandom(6).hex()
        role = f"{user}-rw"
        self.call("/v3/auth/role/add", {"name": "root"})
        self.call("/v3/auth/user/add", {"name": "root", "password": root_password})
        self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.call("/v3/auth/role/add", {"name": role})
        perm = {"permType": "READWRITE", "key": b64(prefix), "range_end": _prefix_end(prefix)}
        self.call("/v3/auth/role/grant", {"name": role, "perm": perm})
        self.call("/v3/auth/user/add", {"name": user, "password": password})
        self.call("/v3/auth/user/grant", {"user": user, "role": role})
        self.call("/v3/auth/enable", {})
        password_file = self.data_dir.parent / f"{self.name}-{user}.password"
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        self.auth = EtcdAuth(user, password, password_file, role, prefix, root_password)
        return self.auth

    def token(self, user: str, password: str) -> str:
        """Authenticate as `user`; raises EtcdCallError (HTTP 400) for a wrong password."""
        body = {"name": user, "password": password}
        return str(self.call("/v3/auth/authenticate", body, auth=None)["token"])

    def _root_auth(self) -> str | None:
        if self.auth is None:
            return None
        if self._root_token is None:
            self._root_token = self.token("root", self.auth.root_password)
        return self._root_token

    # --- the JSON gateway ------------------------------------------------------------------------------------------
    def call(self, path: str, body: dict[str, Any], *, auth: Auth = True) -> dict[str, Any]:
        """POST `body` to the v3 gateway at `path` (see `Auth`); the decoded answer, or EtcdCallError."""
        headers = {"Content-Type": "application/json"}
        token = self._root_auth() if auth is True else (auth or None)
        if token:
            headers["Authorization"] = token
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=_CALL_TIMEOUT_S) as answer:
                return dict(json.loads(answer.read() or b"{}"))
        except urllib.error.HTTPError as e:
            raise EtcdCallError(path, e.code, e.read().decode(errors="replace")) from None

    def put(self, key: str, value: str, *, auth: Auth = True) -> dict[str, Any]:
        return self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)}, auth=auth)

    def get(self, key: str, *, auth: Auth = True) -> str | None:
        """The value at `key`, or None."""
        kvs = self.call("/v3/kv/range", {"key": b64(key)}, auth=auth).get("kvs") or []
        return unb64(kvs[0].get("value", "")) if kvs else None

    def keys(self, prefix: str, *, auth: Auth = True) -> list[str]:
        """Every key starting with `prefix`, in key order."""
        body = {"key": b64(prefix), "range_end": _prefix_end(prefix), "keys_only": True}
        return [unb64(kv["key"]) for kv in self.call("/v3/kv/range", body, auth=auth).get("kvs") or []]

    def served(self, method: str) -> int:
        """How many gRPC calls of `method` (Range, Txn, Put, ...) this server has answered, from its /metrics: the
        JSON gateway's calls are counted there too."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=_CALL_TIMEOUT_S) as answer:
            text = answer.read().decode()
        pattern = rf'^grpc_server_handled_total{{[^}}]*grpc_method="{method}"[^}}]*}} (\S+)$'
        return sum(int(float(m.group(1))) for m in re.finditer(pattern, text, re.MULTILINE))

    def _get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=_CALL_TIMEOUT_S) as answer:
            return dict(json.loads(answer.read()))

    # --- helpers ---------------------------------------------------------------------------------------------------
    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def _wait_threads(self, *, stopped: bool, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            states = {_thread_state(stat) for stat in Path(f"/proc/{self.pid}/task").glob("*/stat")} - {"gone"}
            if states and (states == {"T"}) == stopped and ("T" in states) == stopped:
                return
            time.sleep(0.005)
        if self.alive():
            raise EtcdServerError(f"etcd (pid {self.pid}) did not {'stop' if stopped else 'continue'} in {timeout}s")

    def _signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.process is not None
            os.kill(self.process.pid, sig)


def _thread_state(stat: Path) -> str:
    # /proc/PID/task/TID/stat is "tid (comm) STATE ..."; comm may hold spaces or parentheses, so split at the last ")".
    try:
        return stat.read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "gone"  # a thread that exited meanwhile


def start_etcd(base: Path, *, name: str = "fork-sidecar-test", timeout: float = 30.0) -> EtcdServer:
    """Start a healthy single-member etcd with its data dir and log under `base` (skips/fails without etcd)."""
    client_port, peer_port = free_ports(2)
    server = EtcdServer(
        binary=etcd_binary(),
        data_dir=base / f"{name}.etcd",
        log_path=base / f"{name}.log",
        client_port=client_port,
        peer_port=peer_port,
        name=name,
    )
    try:
        server.start(timeout)
    except BaseException:
        server.stop()
        raise
    return server
