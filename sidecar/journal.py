"""The daemon's durable memory in its state dir: one journal file per unfinished fork, a history, and a lock.

Layout of `state_dir`:
  lock                  flock()ed by the running daemon; holds its pid (a second daemon refuses, naming it)
  forks/<fork_id>.json  the record of an unfinished fork, rewritten atomically at every transition
  history.jsonl         one line per finished fork (newest last), for `fork-sidecar status`
  status.json           what the running daemon is doing now, rewritten as it changes
A journal record is replaced by write-temp/fsync/rename/fsync-dir, so after a SIGKILL it is the old record or the
new one, never a torn one; a record that still fails to parse (disk corruption, a hand edit) stops the start with
the exact file to remove rather than guessing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.fsops import fsync_dir
from sidecar.marker import write_json_atomic
from sidecar.states import ForkState, check_transition

__all__ = ["ForkRecord", "Journal", "JournalError", "StateDirLocked"]

HISTORY_KEEP = 1000
_CRASH_AFTER = os.environ.get("FORK_SIDECAR_CRASH_AFTER", "")


class JournalError(Exception):
    """The state dir cannot be used, as one sentence naming the file and the fix."""


class StateDirLocked(JournalError):
    pass


@dataclass
class ForkRecord:
    """Everything needed to resume or report one fork."""

    fork_id: str
    model_dir: str
    state: ForkState
    request: dict[str, Any]
    started_at: float  # wall clock, for people; durations use the monotonic clock
    source: str | None = None
    digest: str | None = None
    previous_digest: str | None = None
    stages: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ForkRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["state"] = ForkState(values["state"])
        return cls(**values)


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.forks_dir = state_dir / "forks"
        self._lock_fd: int | None = None

    # --- the lock -------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the state dir for this process, or raise naming the pid that holds it."""
        try:
            self.forks_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise JournalError(
                f"{self.state_dir}: cannot create the state dir ({os.strerror(e.errno or 0)}); "
                "set state_dir to a writable directory."
            ) from None
        path = self.state_dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirLocked(
                f"{path} is held by another fork-sidecar (pid {holder}); stop it or give this one another state_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        # Temp files of atomic writes a SIGKILL interrupted; nobody else writes here while we hold the lock.
        for leftover in self.forks_dir.glob(".*.json.tmp-*"):
            leftover.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- fork records -----------------------------------------------------------------------------------------
    def _path(self, fork_id: str) -> Path:
        return self.forks_dir / f"{fork_id}.json"

    def create(self, record: ForkRecord) -> None:
        self._write(record)

    def advance(self, record: ForkRecord, state: ForkState, **changes: Any) -> None:
        """The one place a fork changes state: check the transition, then make it durable."""
        check_transition(record.state, state)
        for key, value in changes.items():
            setattr(record, key, value)
        record.state = state
        self._write(record)

    def save(self, record: ForkRecord) -> None:
        """Persist a change that is not a transition (a stage outcome recorded before its state)."""
        self._write(record)

    def _write(self, record: ForkRecord) -> None:
        write_json_atomic(self._path(record.fork_id), record.to_json(), mode=0o600)
        if _CRASH_AFTER and record.state.value == _CRASH_AFTER:
            # Fault injection for the crash tests: a SIGKILL exactly after a state became durable, which no real
            # part can be made to deliver at that precise point.
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self, record: ForkRecord) -> None:
        """Append to the history, then forget the record (the outcome file beside the marker is the durable result)."""
        self._append_history(record.to_json())
        self.forget(record)

    def forget(self, record: ForkRecord) -> None:
        """Drop the record without a history line (a fork another daemon took over and finished)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(record.fork_id))
        fsync_dir(self.forks_dir)

    def unfinished(self) -> Iterator[ForkRecord]:
        """Records of forks a previous daemon did not finish, oldest first."""
        for path in sorted(self.forks_dir.glob("*.json")):
            try:
                yield ForkRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise JournalError(
                    f"{path} is corrupt ({e.__class__.__name__}); the fork it recorded cannot be resumed — "
                    "remove that file and restart (checkpoints/0000 is always complete, old or new)."
                ) from None

    # --- history ----------------------------------------------------------------------------------------------
    def _append_history(self, entry: dict[str, Any]) -> None:
        path = self.state_dir / "history.jsonl"
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if path.stat().st_size > 4 * 1024 * 1024:
            self._trim_history(path)

    def _trim_history(self, path: Path) -> None:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-HISTORY_KEEP:]
        tmp = path.with_name("history.jsonl.tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def history(self, limit: int = 20) -> list[dict[str, Any]]:
        return read_history(self.state_dir, limit)

    def write_status(self, status: dict[str, Any]) -> None:
        status = {**status, "updated_at": time.time()}
        write_json_atomic(self.state_dir / "status.json", status, mode=0o644)


def read_history(state_dir: Path, limit: int = 20) -> list[dict[str, Any]]:
    """The last `limit` finished forks; lines torn by a crash are skipped."""
    try:
        lines = (state_dir / "history.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    out: list[dict[str, Any]] = []
    for line in lines[-limit:]:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out
