"""The requests an agent answers (hello, status, fork) and the shape of its replies."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.protocol.framing import ProtocolError

__all__ = [
    "LOAD_IN_PROGRESS",
    "PROTOCOL_VERSION",
    "RESULT_LOADED",
    "RESULT_PENDING",
    "ForkRequest",
    "HelloRequest",
    "Request",
    "StatusRequest",
    "error_reply",
    "ok_reply",
    "parse_request",
    "reply_code",
]

PROTOCOL_VERSION = 1
# A fork reply's `result`: the forked weights are in the model (with their digest), or an ART trainer loads them when
# ART next rebuilds its state (reported later through `status`).
RESULT_LOADED = "loaded"
RESULT_PENDING = "load pending"
# An error reply's code when the agent had to answer while its ranks were putting the fork in: the result, loaded on
# every rank or on none, is kept for `status` under the fork's id.
LOAD_IN_PROGRESS = "load_in_progress"


def ok_reply(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error_reply(code: str, message: str, **fields: Any) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}, **fields}


def reply_code(reply: Mapping[str, Any]) -> object:
    """An error reply's code (None for a reply that is not an error)."""
    error = reply.get("error")
    return error.get("code") if isinstance(error, Mapping) else None


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
    # CLOCK_MONOTONIC time (time.monotonic()) after which the daemon has given up waiting for a load to start: an
    # agent that reads the request late, or reaches its step boundary late, never starts it then. Monotonic, not
    # the wall clock: daemon and agent are on one node and share that clock, which no NTP step or `date -s` moves
    # (a wall-clock step back between the daemon's send and the agent's read would let a given-up fork load).
    not_after: float | None = None

    op = "fork"

    def wait_s(self, now: float | None = None) -> float:
        """How long the agent may still wait for a step boundary: `timeout`, cut short by `not_after`."""
        if self.not_after is None:
            return self.timeout
        return min(self.timeout, self.not_after - (time.monotonic() if now is None else now))

    def to_message(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "v": PROTOCOL_VERSION,
            "fork_id": self.fork_id,
            "run_dir": self.run_dir,
            "checkpoint_dir": self.checkpoint_dir,
            "digest": self.digest,
            "timeout": self.timeout,
            **({"not_after": self.not_after} if self.not_after is not None else {}),
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


def _finite_number(value: Any) -> bool:
    """A JSON number that is neither a bool (JSON's true is Python's 1) nor inf/nan."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


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
    if not _finite_number(timeout) or timeout < 0:
        raise ProtocolError("bad_request", "fork's 'timeout' must be a non-negative number of seconds")
    not_after = obj.get("not_after")
    if not_after is not None and not _finite_number(not_after):
        raise ProtocolError("bad_request", "fork's 'not_after' must be a CLOCK_MONOTONIC time in seconds, or absent")
    return ForkRequest(
        fork_id=text("fork_id"),
        run_dir=text("run_dir", path=True),
        checkpoint_dir=text("checkpoint_dir", path=True),
        digest=digest,
        timeout=float(timeout),
        not_after=None if not_after is None else float(not_after),
    )
