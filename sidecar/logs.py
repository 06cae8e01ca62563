"""Logging: journald-native records under systemd, readable text on stderr elsewhere.

Under systemd (JOURNAL_STREAM names our stderr) each record goes to journald's native socket with its priority and
the structured fields FORK_RUN, FORK_ID and FORK_STAGE, so `journalctl -u fork-sidecar FORK_RUN=/path/to/model`
lists one run's story. A record that cannot be sent (socket gone, message too large) falls back to stderr.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import TextIO

__all__ = ["JournaldHandler", "setup_logging", "under_journald"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
# LogRecord attribute -> journald field; set through `extra=` by the pipeline's per-fork logger.
_HANDLER_NAME = "fork-sidecar"
_FIELDS = {"fork_run": "FORK_RUN", "fork_id": "FORK_ID", "fork_stage": "FORK_STAGE"}


def under_journald(stream: TextIO = sys.stderr) -> bool:
    """systemd sets JOURNAL_STREAM=dev:ino for the stream it connected; trust it only if that is ours."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", errors="replace")
    if b"\n" in data:
        # The native protocol's binary form: name, newline, 64-bit little-endian length, value.
        return name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


class JournaldHandler(logging.Handler):
    def __init__(self, socket_path: str | Path = JOURNAL_SOCKET, identifier: str = "fork-sidecar") -> None:
        super().__init__()
        self.socket_path = str(socket_path)
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.fallback = logging.StreamHandler(sys.stderr)

    def encode(self, record: logging.LogRecord) -> bytes:
        parts = [
            _field("MESSAGE", self.format(record)),
            _field("PRIORITY", str(_PRIORITY.get(record.levelno, 6))),
            _field("SYSLOG_IDENTIFIER", self.identifier),
            _field("LOGGER", record.name),
            _field("CODE_FILE", record.pathname),
            _field("CODE_LINE", str(record.lineno)),
            _field("CODE_FUNC", record.funcName),
        ]
        for attr, name in _FIELDS.items():
            value = getattr(record, attr, None)
            if value:
                parts.append(_field(name, str(value)))
        return b"".join(parts)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(self.encode(record), self.socket_path)
        except OSError:
            self.fallback.emit(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure the root logger once; called again on SIGHUP with the new level."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    use_journal = fmt == "journal" or (fmt == "auto" and under_journald())
    current = [h for h in root.handlers if h.get_name() == _HANDLER_NAME]
    if current and isinstance(current[0], JournaldHandler) == use_journal:
        return
    for h in current:
        root.removeHandler(h)
        h.close()
    handler: logging.Handler
    if use_journal:
        handler = JournaldHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))  # journald stamps time, priority and unit itself
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.set_name(_HANDLER_NAME)
    root.addHandler(handler)
