"""The agent end of the control socket: its private directory and the server thread (see the package docstring)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sidecar.protocol.fdwait import readable
from sidecar.protocol.framing import ProtocolError, encode_message, recv_message, send_message
from sidecar.protocol.messages import Request, error_reply, parse_request
from sidecar.protocol.peercred import PeerCred, peer_credentials

__all__ = ["AgentDirPending", "ControlServer", "Handler", "ensure_private_dir"]

log = logging.getLogger("sidecar.control")

_MAX_SOCKET_PATH = 107
_IO_TIMEOUT_S = 5.0
_MAX_CLIENTS = 8
_REBIND_EVERY_S = 2.0


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
