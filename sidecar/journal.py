"""The daemon's durable memory in its state dir: one journal file per unfinished fork, a history, and a lock.

Layout of `state_dir`:
  lock                  flock()ed by the running daemon; holds its pid (a second daemon refuses, naming it)
  forks/<fork_id>.json  the record of an unfinished fork, rewritten atomically at every transition
  history.jsonl         one line per finished fork (newest last), for `fork-sidecar status`; 0600
  status.json           what the running daemon is doing now, rewritten as it changes
A journal record is replaced by write-temp/fsync/rename/fsync-dir, so after a SIGKILL it is the old record or the
new one, never a torn one; a record that still fails to parse (disk corruption, a hand edit) stops the start with
the exact file to remove rather than guessing.

The history has one writer: the daemon holding the lock, and in it one thread at a time (`_history_lock`), so an
append never lands between a trim's read and its rename, and trims go through fsops.write_atomic (a temp name of
its own per call, mode 0600). A state dir that cannot be written (full, read-only) is a fact forks live with, not
a failure of theirs: a fork already running carries on with its record in memory, its history line is kept
(`unfiled`) until a write succeeds, and no new fork is claimed until a probe write succeeds (`usable`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.fork_ids import is_fork_id
from sidecar.protocol.atomic_write import fsync_dir, write_atomic, write_json_atomic
from sidecar.states import ForkState, check_transition

__all__ = ["ForkRecord", "Journal", "JournalError", "JournalUnwritable", "StateDirLocked", "read_history"]

log = logging.getLogger("sidecar.journal")

HISTORY_KEEP = 1000
# What a fork id may be: a plain file name part. A claim's fork id is text the run's owner may have written.
HISTORY_TRIM_BYTES = 4 * 1024 * 1024
# A fork record is a few KiB (more with many files): a probe of this size says "room for one more record".
_PROBE_BYTES = 64 * 1024
_PROBE_EVERY_S = 1.0


class JournalError(Exception):
    """The state dir cannot be used, as one sentence naming the file and the fix."""


class StateDirLocked(JournalError):
    pass


class JournalUnwritable(JournalError):
    """A write into the state dir failed (ENOSPC, EROFS, EIO): the sentence names state_dir and the fix."""


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
    # What each step found: swap, trainers, vllm, verify, nodes, ... (older journals call it "stages")
    sections: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ForkRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        if "stages" in data and "sections" not in data:  # a journal written before the rename
            data = {**data, "sections": data["stages"]}
        values = {k: v for k, v in data.items() if k in names}
        values["state"] = ForkState(values["state"])
        return cls(**values)


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.forks_dir = state_dir / "forks"
        self._lock_fd: int | None = None
        self._history_lock = threading.Lock()
        self._health = threading.Lock()
        self.problem: str | None = None  # why the state dir cannot be written now; None: it can
        self._probed_at = 0.0
        self._unfiled: dict[str, ForkRecord] = {}  # finished forks whose history line is still to be written
        self.waiting_runs: set[Path] = set()  # runs with a marker left unclaimed while the state dir is unusable

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
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        # Held through a read-only descriptor: a file open for writing makes the kernel refuse `mount -o
        # remount,ro` of state_dir (EBUSY), and that remount is a fault the daemon must live through, not prevent.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirLocked(
                f"{path} is held by another fork-sidecar (pid {holder}); stop it or give this one another state_dir."
            ) from None
        writer = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(writer, f"{os.getpid()}\n".encode())
        finally:
            os.close(writer)
        self._lock_fd = fd
        # Temp files of atomic writes a SIGKILL interrupted; nobody else writes here while we hold the lock.
        for leftover in [*self.forks_dir.glob(".*.json.tmp-*"), *self.state_dir.glob(".history.jsonl.tmp-*")]:
            leftover.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- fork records -----------------------------------------------------------------------------------------
    def _path(self, fork_id: str) -> Path:
        return self.forks_dir / f"{fork_id}.json"

    def has_record(self, fork_id: object) -> bool:
        """Whether `fork_id` is journaled. Never a look outside forks_dir: a claim's id (the run owner's text, read
        by root) such as `../../home/bob/keys` would tell her whether bob's `keys.json` exists."""
        return is_fork_id(fork_id) and self._path(fork_id).exists()

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
        path = self._path(record.fork_id)
        try:
            write_json_atomic(path, record.to_json(), mode=0o600)
        except OSError as e:
            error = self._unwritable(path, e)
            self._sick(error)
            raise error from None
        self._healthy()

    def finish(self, record: ForkRecord) -> bool:
        """Append to the history, then forget the record (the outcome file beside the marker is the durable result).

        Returns False when the state dir refused the line: the record is then kept as unfiled and written by
        `file_unfiled` once the state dir takes writes again (a restart before that files it from the outcome).
        """
        try:
            self._append_history(record.to_json())
        except OSError as e:
            with self._health:
                self._unfiled[record.fork_id] = record
            self._sick(self._unwritable(self.state_dir / "history.jsonl", e))
            return False
        with contextlib.suppress(OSError):  # a stale record left behind is filed (once) by the next start
            self.forget(record)
        return True

    def file_unfiled(self) -> int:
        """Write the history lines kept back while the state dir refused them; returns how many are still kept."""
        with self._health:
            pending = list(self._unfiled.values())
        for record in pending:
            try:
                self._append_history(record.to_json())
            except OSError as e:
                self._sick(self._unwritable(self.state_dir / "history.jsonl", e))
                break
            with self._health:
                self._unfiled.pop(record.fork_id, None)
            with contextlib.suppress(OSError):
                self.forget(record)
        with self._health:
            return len(self._unfiled)

    def filed(self, fork_id: str) -> bool:
        """Whether the history already holds a line for `fork_id` (a restart must not file a fork twice)."""
        return any(h.get("fork_id") == fork_id for h in read_history(self.state_dir, HISTORY_KEEP))

    # --- health of the state dir ---------------------------------------------------------------------------------
    def usable(self) -> bool:
        """Whether a new fork may be claimed: no write has failed, or a probe write (at most once a second) passed."""
        with self._health:
            if self.problem is None:
                return True
            if time.monotonic() - self._probed_at < _PROBE_EVERY_S:
                return False
            self._probed_at = time.monotonic()
        probe = self.forks_dir / f".probe.json.tmp-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"\0" * _PROBE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            self._sick(self._unwritable(probe, e))
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
        self._healthy()
        return True

    def _unwritable(self, path: Path, e: OSError) -> JournalUnwritable:
        why = os.strerror(e.errno) if e.errno else str(e)
        return JournalUnwritable(
            f"cannot write {path} ({why}): the state dir {self.state_dir} is full or read-only; free space there or "
            "remount it read-write (forks are taken again by themselves once it is writable)."
        )

    def _sick(self, e: JournalUnwritable) -> None:
        with self._health:
            first = self.problem is None
            self.problem = str(e)
            self._probed_at = time.monotonic()
        if first:
            log.error("%s", e)

    def _healthy(self) -> None:
        with self._health:
            was, self.problem = self.problem, None
        if was is not None:
            log.info("the state dir %s is writable again", self.state_dir)

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
        with self._history_lock:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > HISTORY_TRIM_BYTES:
                lines = path.read_bytes().splitlines(keepends=True)[-HISTORY_KEEP:]
                write_atomic(path, b"".join(lines), mode=0o600)

    def history(self, limit: int = 20) -> list[dict[str, Any]]:
        return read_history(self.state_dir, limit)

    def write_status(self, status: dict[str, Any]) -> None:
        status = {**status, "updated_at": time.time()}
        write_json_atomic(self.state_dir / "status.json", status, mode=0o644)

    def wait_for_writes(self, run: Path) -> None:
        """Remember a run whose marker was left unclaimed because the state dir refuses writes."""
        with self._health:
            self.waiting_runs.add(run)

    def take_waiting(self) -> list[Path]:
        with self._health:
            waiting, self.waiting_runs = sorted(self.waiting_runs), set()
        return waiting

    def unfiled_count(self) -> int:
        with self._health:
            return len(self._unfiled)


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
