"""The daemon end of the control socket: trust checks on an agent's socket, then one request and its reply."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.protocol.framing import ProtocolError, recv_message, send_message
from sidecar.protocol.paths import uid_of_agent_dir
from sidecar.protocol.peercred import peer_credentials, process_uid

__all__ = ["ControlError", "call_agent", "verify_agent_socket"]


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
