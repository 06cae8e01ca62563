"""One request per connection: one newline-terminated JSON object each way, bounded in size and time."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_MESSAGE_BYTES", "ProtocolError", "decode_message", "encode_message", "recv_message", "send_message"]

MAX_MESSAGE_BYTES = 64 * 1024


class ProtocolError(Exception):
    """A request or reply that breaks the protocol; `code` goes into the structured error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
