"""The control socket between the daemon and the agents inside trainer processes: both ends, stdlib only.

Each agent listens on `{runtime_dir}/{uid}/agent-{pid}.sock`: one directory per user, 0700 and owned by that user,
so nobody can put a socket or a squatting file where another user's agents go. The daemon (root) makes these
directories for the owners of the runs it watches; an agent creates a missing one itself only inside a directory its
own user alone controls (single-user setups and tests), and otherwise waits for the daemon.

One request per connection: the client writes one JSON object and a newline, reads one JSON object and a newline
back, and both sides close. Messages are bounded
(`MAX_MESSAGE_BYTES`) and every read and write has a timeout, so a stuck or hostile peer costs a thread for a few
seconds, never the trainer. Replies are `{"ok": true, ...}` or `{"ok": false, "error": {"code", "message"}}`.

Trust runs both ways and is checked with the kernel's word for it (`SO_PEERCRED`), never the peer's:
- the agent answers only its own uid and root;
- the daemon talks to `{uid}/agent-<pid>.sock` only if the directory and the socket file belong to <uid>, <pid> runs
  as <uid>, and the process listening on it is <pid> itself, so one user cannot pose as another user's trainer;
- which runs an agent is told about is the trainers stage's rule: only runs its uid owns (or any, for root).
Nothing a peer sends is executed; a `fork` names directories that the agent checks against the runs it serves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import stat
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.fdwait import readable

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "AgentDirPending",
    "ControlError",
    "ControlServer",
    "ForkRequest",
    "HelloRequest",
    "PeerCred",
    "ProtocolError",
    "Request",
    "StatusRequest",
    "agent_dir",
    "agent_socket_path",
    "call_agent",
    "ensure_private_dir",
    "error_reply",
    "ok_reply",
    "parse_request",
    "peer_credentials",
    "pid_of_socket",
    "process_uid",
    "uid_of_agent_dir",
]

log = logging.getLogger("sidecar.control")

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
SOCKET_PREFIX = "agent-"
SOCKET_SUFFIX = ".sock"
# AF_UNIX paths are limited to 108 bytes including the terminating NUL (Linux `sun_path`).
_MAX_SOCKET_PATH = 107
_IO_TIMEOUT_S = 5.0
_MAX_CLIENTS = 8
_REBIND_EVERY_S = 2.0
_PEERCRED = struct.Struct("3i")


# --- names -------------------------------------------------------------------------------------------------------
def agent_dir(runtime_dir: Path, uid: int) -> Path:
    """Where the agents of user `uid` put their sockets."""
    return Path(runtime_dir) / str(uid)


def agent_socket_path(runtime_dir: Path, uid: int, pid: int) -> Path:
    return agent_dir(runtime_dir, uid) / f"{SOCKET_PREFIX}{pid}{SOCKET_SUFFIX}"


def uid_of_agent_dir(path: Path) -> int | None:
    """The uid a per-user agent directory is named for, or None for any other name."""
    name = Path(path).name
    return int(name) if name.isdigit() and (name == "0" or name[0] != "0") else None


def pid_of_socket(path: Path) -> int | None:
    """The pid in an `agent-<pid>.sock` name, or None for any other name."""
    name = Path(path).name
    if not (name.startswith(SOCKET_PREFIX) and name.endswith(SOCKET_SUFFIX)):
        return None
    digits = name[len(SOCKET_PREFIX) : -len(SOCKET_SUFFIX)]
    return int(digits) if digits.isdigit() and digits[0] != "0" else None


# --- messages ----------------------------------------------------------------------------------------------------
class ProtocolError(Exception):
    """A request or reply that breaks the protocol; `code` goes into the structured error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def ok_reply(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error_reply(code: str, message: str, **fields: Any) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}, **fields}


def encode_message(message: Mapping[str, Any]) -> bytes:
    try:
        data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"
    except (TypeError, ValueError) as e:
        raise ProtocolError("bad_message", f"message is not plain JSON ({e})") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    return data


def decode_message(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("bad_request", "message is not one line of UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", f"message must be a JSON object, got {type(obj).__name__}")
    return obj


def recv_message(sock: socket.socket, *, deadline: float) -> dict[str, Any]:
    """Read one newline-terminated JSON object, at most MAX_MESSAGE_BYTES, by `deadline` (time.monotonic())."""
    buf = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError("timeout", "peer did not send a complete message in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(65536, MAX_MESSAGE_BYTES + 1 - len(buf)))
        except TimeoutError:
            raise ProtocolError("timeout", "peer did not send a complete message in time") from None
        if not chunk:
            raise ProtocolError("bad_request", "connection closed before a complete message (no newline)")
        newline = chunk.find(b"\n")
        if newline >= 0:
            buf += chunk[:newline]
            return decode_message(bytes(buf))
        buf += chunk
        if len(buf) > MAX_MESSAGE_BYTES:
            raise ProtocolError("too_large", f"message exceeds the {MAX_MESSAGE_BYTES}-byte limit")


def send_message(sock: socket.socket, message: Mapping[str, Any], *, deadline: float) -> None:
    data = encode_message(message)
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        sock.sendall(data)
    except TimeoutError:
        raise ProtocolError("timeout", "peer did not read the message in time") from None


# --- requests ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HelloRequest:
    op = "hello"


@dataclass(frozen=True)
class StatusRequest:
    op = "status"


@dataclass(frozen=True)
class ForkRequest:
    """Load the adapter in `checkpoint_dir` (normally `{run_dir}/checkpoints/0000`) into what serves `run_dir`."""

    fork_id: str
    run_dir: str
    checkpoint_dir: str
    digest: str | None  # what the daemon read from disk; the agent reports its own, the daemon compares
    timeout: float  # how long the agent may wait for a step boundary before answering

    op = "fork"

    def to_message(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "v": PROTOCOL_VERSION,
            "fork_id": self.fork_id,
            "run_dir": self.run_dir,
            "checkpoint_dir": self.checkpoint_dir,
            "digest": self.digest,
            "timeout": self.timeout,
        }


Request = HelloRequest | StatusRequest | ForkRequest


def parse_request(obj: Mapping[str, Any]) -> Request:
    op = obj.get("op")
    if op == "hello":
        return HelloRequest()
    if op == "status":
        return StatusRequest()
    if op == "fork":
        return _parse_fork(obj)
    raise ProtocolError("unknown_op", f"unknown op {op!r}; this agent knows hello, status and fork")


def _parse_fork(obj: Mapping[str, Any]) -> ForkRequest:
    def text(key: str, *, path: bool = False) -> str:
        value = obj.get(key)
        if not isinstance(value, str) or not value or len(value) > 4096 or "\0" in value:
            raise ProtocolError("bad_request", f"fork needs {key!r} as a non-empty string")
        if path and not Path(value).is_absolute():
            raise ProtocolError("bad_request", f"fork needs {key!r} as an absolute path, got {value!r}")
        return value

    digest = obj.get("digest")
    if digest is not None and not isinstance(digest, str):
        raise ProtocolError("bad_request", "fork's 'digest' must be a string or null")
    timeout = obj.get("timeout", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout < 0:
        raise ProtocolError("bad_request", "fork's 'timeout' must be a non-negative number of seconds")
    return ForkRequest(
        fork_id=text("fork_id"),
        run_dir=text("run_dir", path=True),
        checkpoint_dir=text("checkpoint_dir", path=True),
        digest=digest,
        timeout=float(timeout),
    )


# --- credentials -------------------------------------------------------------------------------------------------
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


# --- agent end: the directory ------------------------------------------------------------------------------------
class AgentDirPending(OSError):
    """The agent directory does not exist and this process may not create it: the daemon will (keep trying)."""


def _only_mine(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def ensure_private_dir(directory: Path) -> None:
    """Make sure `directory` is a directory that only this process's user controls, creating it if that is safe.

    A missing directory (and a missing parent of it: the runtime dir) is created only inside a directory this user
    alone controls (owned by the user, writable by nobody else). Anywhere else whoever created it could take it
    over: a runtime dir made by the first trainer under a world-writable /tmp belonged to that trainer's user. So
    under a root-owned runtime dir a user's directory is the daemon's to make; until it does, AgentDirPending.
    """
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        _create_inside_own_dir(Path(directory), 0o700, parent_too=True)
        return
    if not _only_mine(st):
        # Waited for like a missing one: a root daemon replaces whatever squats a user's name.
        raise AgentDirPending(
            f"{directory} is not a directory that only uid {os.geteuid()} controls (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o}); the fork-sidecar daemon replaces it (or remove it)"
        )


def _create_inside_own_dir(path: Path, mode: int, *, parent_too: bool) -> None:
    """Create `path` if its parent is only ours; with `parent_too`, `path` is a user's directory and its parent the
    runtime dir, which may be created the same way."""
    parent = path.parent
    try:
        st = os.lstat(parent)
    except FileNotFoundError:
        if not parent_too:
            raise AgentDirPending(_no_runtime_dir(path)) from None
        _create_inside_own_dir(parent, 0o755, parent_too=False)
        st = os.lstat(parent)
    if not _only_mine(st):
        raise AgentDirPending(
            f"{path} does not exist yet; the fork-sidecar daemon creates it for each user who owns a run it watches"
            if parent_too
            else _no_runtime_dir(path)
        )
    try:
        os.mkdir(path, mode)
        os.chmod(path, mode)  # exactly `mode`, whatever the umask
    except FileExistsError:
        pass  # another thread or process of ours won the race; checked below like any existing directory
    except OSError as e:
        raise OSError(f"cannot create the agent directory {path} ({e.strerror or e})") from None
    if not _only_mine(os.lstat(path)):
        raise OSError(f"{path} changed under us while it was being created; refusing to use it")


def _no_runtime_dir(runtime_dir: Path) -> str:
    return (
        f"{runtime_dir} does not exist; start the fork-sidecar daemon (it creates it) or set "
        "FORK_SIDECAR_RUNTIME_DIR to a directory of this user's"
    )


# --- agent end: the server ---------------------------------------------------------------------------------------
Handler = Callable[[Request, PeerCred], Mapping[str, Any]]

_live_servers: weakref.WeakSet[ControlServer] = weakref.WeakSet()


class ControlServer:
    """Serves one socket path on a daemon thread; each connection gets its own short-lived thread.

    The socket is bound inside a private (0700) directory next to its final name, made 0600, and renamed into
    place, so it is never reachable with looser permissions. That replaces the usual umask dance, which would
    change the mode of files that other threads of the trainer create at the same moment (umask is per process).
    Its directory must be one only this user controls (`ensure_private_dir`). If that directory does not exist yet
    (the daemon has not made it), or the file disappears (someone cleaned the runtime dir), the server keeps trying
    every few seconds and binds as soon as it can.
    """

    def __init__(self, path: Path, handler: Handler, *, max_clients: int = _MAX_CLIENTS) -> None:
        self.path = Path(path)
        self.handler = handler
        self._slots = threading.BoundedSemaphore(max_clients)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._owner_pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe()  # close() writes here to end the wait at once
        self._rebind_failing = False
        self.waiting: str | None = None  # why the socket is not bound yet, while it waits for its directory

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        """Bind and start serving; raises OSError with a sentence when the socket cannot be created.

        A directory that only the daemon may create (AgentDirPending) is not an error: the server starts unbound,
        with the reason in `waiting`, and binds once the directory exists."""
        try:
            self._bind()
        except AgentDirPending as e:
            self.waiting = str(e)
            self._rebind_failing = True  # the reason is the caller's to log, once
        self._thread = threading.Thread(target=self._serve, name="fork-sidecar-agent", daemon=True)
        self._thread.start()
        _live_servers.add(self)

    def close(self, *, wait: bool = False) -> None:
        """Stop serving and remove the socket file if it is still ours (at exit, without waiting for the thread)."""
        self._stop.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
            if not self._thread.is_alive():
                self._close_wake_pipe()
        self._close_socket(unlink=os.getpid() == self._owner_pid)

    def _bind(self) -> None:
        parent = self.path.parent
        if len(os.fsencode(self.path)) > _MAX_SOCKET_PATH:
            raise OSError(f"{self.path} is longer than a Unix socket path may be; set FORK_SIDECAR_RUNTIME_DIR shorter")
        ensure_private_dir(parent)
        try:
            private = Path(tempfile.mkdtemp(prefix=".agent-", dir=parent))
        except OSError as e:
            raise OSError(f"cannot create the agent socket {self.path} ({e.strerror or e})") from None
        staged = private / "s"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(staged))
            staged.chmod(0o600)
            sock.listen(16)
            staged.replace(self.path)
            st = self.path.stat()
        except OSError as e:
            sock.close()
            raise OSError(f"cannot create the agent socket {self.path} ({e.strerror or e})") from None
        finally:
            with contextlib.suppress(OSError):
                staged.unlink()
            with contextlib.suppress(OSError):
                private.rmdir()
        sock.setblocking(False)  # accepted only when poll() says so
        self._sock, self._inode = sock, (st.st_dev, st.st_ino)

    def _still_bound(self) -> bool:
        try:
            st = self.path.stat()
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    def _close_socket(self, *, unlink: bool) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        if unlink and self._still_bound():
            with contextlib.suppress(OSError):
                self.path.unlink()
        self._inode = None

    def forget_in_child(self) -> None:
        """After fork(): the child must not serve or remove the parent's socket; just drop the inherited fd."""
        self._stop.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _serve(self) -> None:
        # poll() with a wake-up pipe: no polling while idle, a prompt exit on close(), and a look every
        # few seconds at whether the socket file is still ours.
        while not self._stop.is_set():
            sock = self._sock
            if sock is None:
                self._rebind()
                if self._sock is None:
                    self._stop.wait(_REBIND_EVERY_S)
                continue
            try:
                ready = readable([sock.fileno(), self._wake_r], _REBIND_EVERY_S)
            except (OSError, ValueError):
                ready = []
            if self._stop.is_set():
                return
            if sock.fileno() not in ready:
                if not self._still_bound():
                    self._rebind()
                continue
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                time.sleep(0.1)
                continue
            conn.setblocking(True)
            self._dispatch(conn)

    def _rebind(self) -> None:
        self._close_socket(unlink=False)
        try:
            self._bind()
        except OSError as e:
            if not self._rebind_failing:  # once per outage, not every few seconds
                log.warning("%s; will keep trying", e)
            self._rebind_failing = True
            return
        self._rebind_failing = False
        if self.waiting is not None:
            self.waiting = None
            log.info("fork-sidecar agent listening on %s", self.path)
        else:
            log.info("agent socket %s was removed; bound it again", self.path)

    def _dispatch(self, conn: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError, ProtocolError):
                send_message(conn, error_reply("busy", "agent is serving too many requests"), deadline=_soon())
            conn.close()
            return
        worker = threading.Thread(target=self._handle, args=(conn,), name="fork-sidecar-agent-conn", daemon=True)
        try:
            worker.start()
        except RuntimeError:  # interpreter shutting down
            self._slots.release()
            conn.close()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                reply = self._answer(conn)
                with contextlib.suppress(OSError, ProtocolError):
                    send_message(conn, reply, deadline=_soon())
        finally:
            self._slots.release()

    def _answer(self, conn: socket.socket) -> Mapping[str, Any]:
        try:
            peer = peer_credentials(conn)
            if peer.uid not in (os.geteuid(), 0):
                log.warning("refused a control request from uid %d (pid %d)", peer.uid, peer.pid)
                return error_reply("forbidden", "this agent answers only its own user and root")
            request = parse_request(recv_message(conn, deadline=_soon()))
            reply = self.handler(request, peer)
            encode_message(reply)  # a reply we cannot send is our bug: report it as one, not as silence
            return reply
        except ProtocolError as e:
            return error_reply(e.code, e.message)
        except OSError as e:
            return error_reply("io", f"connection failed ({e})")
        except Exception as e:  # the agent must never take the trainer down; the daemon gets a sentence instead
            log.exception("agent request failed")
            return error_reply("internal", f"agent error: {e!r}")


def _soon() -> float:
    return time.monotonic() + _IO_TIMEOUT_S


def _forget_servers_in_child() -> None:
    for server in list(_live_servers):
        server.forget_in_child()
    _live_servers.clear()


os.register_at_fork(after_in_child=_forget_servers_in_child)


# --- daemon end: the client --------------------------------------------------------------------------------------
class ControlError(Exception):
    """Talking to an agent failed. `code`: unreachable, gone (the process or its socket), timeout, refused (trust
    check), protocol; sidecar/protocol/reasons.py names the reason of each."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def verify_agent_socket(path: Path, pid: int) -> int:
    """Check that `path` is a socket in the agent directory of the user running `pid`, both owned by that user;
    returns that uid."""
    expected = uid_of_agent_dir(path.parent)
    if expected is None:
        raise ControlError("refused", f"{path} is not in a per-user agent directory ({{runtime_dir}}/<uid>/)")
    try:
        dir_st = os.lstat(path.parent)
    except OSError as e:
        raise ControlError("unreachable", f"cannot stat {path.parent} ({e.strerror})") from None
    if not stat.S_ISDIR(dir_st.st_mode) or dir_st.st_uid != expected:
        raise ControlError("refused", f"{path.parent} is not a directory owned by uid {expected}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ControlError("gone", f"{path} is gone") from None
    except OSError as e:
        raise ControlError("unreachable", f"cannot stat {path} ({e.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError("refused", f"{path} is not a socket")
    uid = process_uid(pid)
    if uid is None:
        raise ControlError("gone", f"process {pid} of {path.name} is gone")
    if uid != expected:
        raise ControlError("refused", f"{path} is in uid {expected}'s directory but pid {pid} runs as uid {uid}")
    if st.st_uid != uid:
        raise ControlError("refused", f"{path} is owned by uid {st.st_uid} but pid {pid} runs as uid {uid}")
    return uid


def call_agent(path: Path, request: Mapping[str, Any], *, timeout: float, pid: int | None = None) -> dict[str, Any]:
    """Send one request to the agent at `path` and return its reply (which may itself be an error reply).

    With `pid` (the daemon always passes it), the socket must belong to that process, as described above.
    Raises ControlError when no reply could be had or the peer failed a trust check.
    """
    deadline = time.monotonic() + max(timeout, 0.001)
    uid = verify_agent_socket(path, pid) if pid is not None else None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.connect(os.fspath(path))
        except TimeoutError:
            raise ControlError("timeout", f"connecting to {path} timed out") from None
        except OSError as e:
            raise ControlError("unreachable", f"cannot connect to {path} ({e.strerror or e})") from None
        if pid is not None:
            peer = peer_credentials(sock)
            if peer.pid != pid or peer.uid != uid:
                raise ControlError(
                    "refused", f"{path} is served by pid {peer.pid} uid {peer.uid}, not by pid {pid} uid {uid}"
                )
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # An agent that refuses at once (busy, forbidden) answers and closes before reading: read its answer.
                send_message(sock, request, deadline=deadline)
            return recv_message(sock, deadline=deadline)
        except ProtocolError as e:
            code = "timeout" if e.code == "timeout" else "protocol"
            raise ControlError(code, f"{path}: {e.message}") from None
        except OSError as e:
            raise ControlError("unreachable", f"{path}: connection failed ({e.strerror or e})") from None
