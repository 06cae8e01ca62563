"""Fork ids: what the daemon names each fork (journal files, stage and retired dirs, snapshots, log fields).

The syntax is one place's: a journal file name, a `.fork-stage-<id>` and a systemd journal field must all accept
every id the daemon makes and nothing that could climb out of a directory.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import TypeGuard

__all__ = ["FORK_ID", "checked_fork_id", "is_fork_id", "new_fork_id"]

FORK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def new_fork_id() -> str:
    """A new id: UTC time to the second, then 6 random hex digits (sortable, unique across restarts)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def is_fork_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and FORK_ID.fullmatch(value) is not None


def checked_fork_id(fork_id: str) -> str:
    """`fork_id` itself; ValueError when it is not a fork id."""
    if not is_fork_id(fork_id):
        raise ValueError(f"fork id {fork_id!r} must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return fork_id
