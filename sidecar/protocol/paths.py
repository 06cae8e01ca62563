"""Names under the runtime dir: `{runtime_dir}/{uid}/agent-{pid}.sock`, and reading uid and pid back from them."""

from __future__ import annotations

from pathlib import Path

__all__ = ["SOCKET_PREFIX", "SOCKET_SUFFIX", "agent_dir", "agent_socket_path", "pid_of_socket", "uid_of_agent_dir"]

SOCKET_PREFIX = "agent-"
SOCKET_SUFFIX = ".sock"


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
