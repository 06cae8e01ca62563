"""Everything a fork reads and writes in its run and its source, through the run directory's descriptor.

One RunIO per fork. `LocalRunIO` does the work in the daemon's process: used when the daemon is not root (it has no
rights but its own) or the run belongs to root. For any other owner the daemon uses `owner_worker.OwnerRunIO`, which
does the very same calls in a child process that has dropped to the owner's uid and groups before touching the run,
so a fork can read, write and delete exactly what its owner could with `cp` and `mv`, and its sentences tell only
what the owner could have seen. Every argument and result is plain JSON, because that is what crosses the pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import stat
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar import swap
from sidecar.adapter import ADAPTER_FILE, AdapterError, TreeLimits, adapter_digest
from sidecar.claims.filesystem import read_claimed_marker, take_marker_at
from sidecar.layout import RunDir
from sidecar.marker import (
    DONE,
    FAILED,
    INPROGRESS,
    MARKER,
    MarkerError,
    MarkerRequest,
    bounded_outcome,
    parse_marker,
    read_json_object,
)
from sidecar.protocol.atomic_write import write_atomic_at
from sidecar.protocol.run_layout import CHECKPOINTS, SERVED_STEP
from sidecar.resolve import ResolveError, open_source, open_source_path
from sidecar.rundir import DIR_FLAGS, RunDirError, open_run, remove_at
from sidecar.vllm.snapshots import collect_snapshots, create_snapshot

__all__ = ["LocalRunIO", "Owner", "RunIO", "RunIOError", "local_run_files", "owner_of"]

# File names of a staged checkpoint kept in the outcome; the count is always there.
MAX_LISTED_FILES = 100


class RunIOError(Exception):
    """A fork step on the run failed; the message is one sentence for the outcome."""


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str


def owner_of(uid: int, gid: int) -> Owner:
    """The account that owns a run directory (`uid`, the directory's group `gid`), with the groups it has when it
    logs in. A uid with no account on this host (files from another machine, a user removed, an LDAP outage) is
    still the owner: the fork runs as that bare uid with the directory's group and no supplementary groups, so it
    can do what a process of that uid could, and no more."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return Owner(uid, gid, (), f"uid {uid}")
    return Owner(uid, entry.pw_gid, tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)))), entry.pw_name)


class RunIO:
    """The run-side steps of one fork. Subclasses decide where they run (`_call`)."""

    run: RunDir

    def _call(self, op: str, **args: Any) -> Any:
        raise NotImplementedError

    def _post(self, op: str, **args: Any) -> None:
        """Like _call, without waiting or failing: for heartbeats, which must never queue behind a long copy."""
        raise NotImplementedError

    def close(self) -> None:
        """Ends the fork's use of the run (a worker process exits)."""

    # --- claims -------------------------------------------------------------------------------------------
    def claim(self) -> bool:
        return bool(self._call("claim"))

    def claim_state(self) -> dict[str, Any] | None:
        """The `.fork.inprogress` present: whether it is a regular file, its ctime, its record, its writer."""
        result = self._call("claim_state")
        return dict(result) if result is not None else None

    def read_request(self, embedded: str | None) -> tuple[dict[str, Any], str]:
        """The request of the claimed marker (or of the claim record `embedded` in an adopted claim) and its raw
        text; refused unless the run's owner or root wrote it."""
        request, raw = self._call("read_request", embedded=embedded)
        return dict(request), str(raw)

    def write_claim(self, info: dict[str, Any]) -> None:
        self._call("write_claim", info=info)

    def heartbeat(self, info: dict[str, Any]) -> None:
        self._post("heartbeat", info=info)

    def unclaim(self, raw: str) -> None:
        """Undo a claim nothing has acted on: the marker back as written (unless a newer one came), the claim gone."""
        self._call("unclaim", raw=raw)

    # --- the fork -----------------------------------------------------------------------------------------
    def resolve(self, request: dict[str, Any], allowed_roots: list[str]) -> str:
        return str(self._call("resolve", request=request, allowed_roots=allowed_roots))

    def stage(
        self, fork_id: str, source: str, copy_mode: str, limits: dict[str, int], allowed_roots: list[str]
    ) -> dict[str, Any]:
        return dict(
            self._call(
                "stage",
                fork_id=fork_id,
                source=source,
                copy_mode=copy_mode,
                limits=limits,
                allowed_roots=allowed_roots,
            )
        )

    def install(self, fork_id: str, digest: str, stage_inode: int | None) -> None:
        self._call("install", fork_id=fork_id, digest=digest, stage_inode=stage_inode)

    def disk_digest(self, fingerprint: list[int] | None, digest: str | None) -> str:
        """The digest of 0000's adapter, or `digest` when the file is the one staged (same fingerprint)."""
        return str(self._call("disk_digest", fingerprint=fingerprint, digest=digest))

    def discard_retired(self, fork_id: str) -> None:
        self._call("discard_retired", fork_id=fork_id)

    def discard_copies(self, fork_id: str, staged: bool) -> None:
        self._call("discard_copies", fork_id=fork_id, staged=staged)

    def settle_leftover(self, fork_id: str) -> str:
        return str(self._call("settle_leftover", fork_id=fork_id))

    def leftovers(self) -> list[tuple[str, str]]:
        return [(str(kind), str(fork_id)) for kind, fork_id in self._call("leftovers")]

    def served_digest(self) -> str | None:
        result = self._call("served_digest")
        return None if result is None else str(result)

    # --- endings ------------------------------------------------------------------------------------------
    def finish(self, fork_id: str, outcome: dict[str, Any] | None) -> None:
        """Files `outcome` (when given) beside the marker and removes the claim."""
        self._call("finish", fork_id=fork_id, outcome=outcome)

    def read_outcome(self) -> dict[str, Any] | None:
        result = self._call("read_outcome")
        return dict(result) if result is not None else None

    # --- vLLM snapshots (stages.RunFiles) -----------------------------------------------------------------
    def snapshot(self, fork_id: str) -> tuple[str, str]:
        name, method = self._call("snapshot", fork_id=fork_id)
        return str(name), str(method)

    def collect_snapshots(self, keep: Collection[str] | None, *, partials: bool = True) -> tuple[list[str], list[str]]:
        kept = None if keep is None else sorted(keep)
        removed, left = self._call("collect_snapshots", keep=kept, partials=partials)
        return [str(n) for n in removed], [str(n) for n in left]


class LocalRunIO(RunIO):
    """The steps themselves, on the run directory open as `fd` (which the caller owns and closes)."""

    def __init__(self, run: RunDir, fd: int, allowed_writers: frozenset[int]) -> None:
        self.run = run
        self.fd = fd
        self.allowed_writers = allowed_writers
        self._source_fd: tuple[str, int] | None = None
        self._claim_lock = threading.Lock()
        self._claim_released = False

    def _call(self, op: str, **args: Any) -> Any:
        method: Callable[..., Any] = getattr(self, "_op_" + op)
        try:
            return method(**args)
        except (MarkerError, ResolveError, swap.SwapError, AdapterError) as e:
            raise RunIOError(str(e)) from None

    def _post(self, op: str, **args: Any) -> None:
        with contextlib.suppress(RunIOError, OSError):
            self._call(op, **args)

    def close(self) -> None:
        with self._claim_lock:
            self._claim_released = True  # the caller closes `fd` next: a late heartbeat must not use it
        self._drop_source()

    def _drop_source(self) -> None:
        if self._source_fd is not None:
            os.close(self._source_fd[1])
            self._source_fd = None

    def _shown(self, *names: str) -> Path:
        return Path(self.run.path, *names)

    # --- claims -------------------------------------------------------------------------------------------
    def _op_claim(self) -> bool:
        return take_marker_at(self.fd)

    def _op_claim_state(self) -> dict[str, Any] | None:
        try:
            st = os.stat(INPROGRESS, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return None
        regular = stat.S_ISREG(st.st_mode)
        info = read_json_object(Path(INPROGRESS), dir_fd=self.fd) if regular else None
        return {"regular": regular, "ctime": st.st_ctime, "uid": st.st_uid, "info": info}

    def _op_read_request(self, embedded: str | None) -> tuple[dict[str, Any], str]:
        shown = self._shown(MARKER)
        try:
            st = os.stat(INPROGRESS, dir_fd=self.fd, follow_symlinks=False)
        except OSError as e:
            raise MarkerError(f"{shown} vanished after it was claimed ({e.strerror}); write it again.") from None
        if st.st_uid not in self.allowed_writers:
            raise MarkerError(
                f"{shown} was written by uid {st.st_uid}, not by the run's owner or root; only they may fork "
                f"{self.run.path} — ask its owner."
            )
        raw = embedded.encode() if embedded is not None else read_claimed_marker(shown, self.fd)
        request = parse_marker(raw, shown)
        return request.to_json(), raw.decode("utf-8", errors="replace")

    def _op_write_claim(self, info: dict[str, Any]) -> None:
        with self._claim_lock:
            self._write_json(INPROGRESS, info)

    def _op_heartbeat(self, info: dict[str, Any]) -> None:
        with self._claim_lock:
            if not self._claim_released:  # never bring back a claim the fork has removed
                self._write_json(INPROGRESS, info)

    def _op_unclaim(self, raw: str) -> None:
        try:
            os.stat(MARKER, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            write_atomic_at(self.fd, MARKER, raw.encode())
        with self._claim_lock:
            self._claim_released = True
            remove_at(self.fd, INPROGRESS)

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        write_atomic_at(self.fd, name, (json.dumps(data, indent=2) + "\n").encode())

    # --- the fork -----------------------------------------------------------------------------------------
    def _op_resolve(self, request: dict[str, Any], allowed_roots: list[str]) -> str:
        fd, real = open_source(MarkerRequest(**request), self.run, [Path(r) for r in allowed_roots], self.fd)
        self._drop_source()
        self._source_fd = (str(real), fd)  # the staging copy reads what was checked, not the path again
        return str(real)

    def _op_stage(
        self, fork_id: str, source: str, copy_mode: str, limits: dict[str, int], allowed_roots: list[str]
    ) -> dict[str, Any]:
        if self._source_fd is None or self._source_fd[0] != source:
            self._drop_source()  # resumed after a restart: open it again, and check it again
            fd, _ = open_source_path(Path(source), [Path(r) for r in allowed_roots])
            self._source_fd = (source, fd)
        staged = swap.copy_to_staging(
            Path(source),
            self.run.checkpoints,
            fork_id,
            copy_mode=copy_mode,
            source_fd=self._source_fd[1],
            run_fd=self.fd,
            limits=TreeLimits(**limits),
        )
        return {
            "method": staged.method,
            "file_count": len(staged.files),
            "files": list(staged.files[:MAX_LISTED_FILES]),
            "bytes": staged.bytes,
            "inode": staged.inode,
            "digest": staged.digest,
            "adapter_fingerprint": self._fingerprint(swap.staging_name(fork_id)),
        }

    def _op_install(self, fork_id: str, digest: str, stage_inode: int | None) -> None:
        swap.install_staging(self.run.checkpoints, fork_id, digest, stage_inode=stage_inode, run_fd=self.fd)

    def _op_disk_digest(self, fingerprint: list[int] | None, digest: str | None) -> str:
        if fingerprint is not None and self._fingerprint(SERVED_STEP) == fingerprint:
            # Same inode, size and mtime as the file the digest was computed from while staging: nothing has
            # written to it since, so re-hashing (a full read of the adapter) would only repeat that digest.
            return str(digest)
        try:
            return self._served_digest()
        except (AdapterError, OSError) as e:
            return f"unreadable ({e})"

    def _served_digest(self) -> str:
        cfd = os.open(CHECKPOINTS, DIR_FLAGS, dir_fd=self.fd)
        try:
            sfd = os.open(SERVED_STEP, DIR_FLAGS, dir_fd=cfd)
        finally:
            os.close(cfd)
        try:
            return adapter_digest(self.run.checkpoints / SERVED_STEP, dir_fd=sfd)
        finally:
            os.close(sfd)

    def _fingerprint(self, step_name: str) -> list[int] | None:
        try:
            cfd = os.open(CHECKPOINTS, DIR_FLAGS, dir_fd=self.fd)
        except OSError:
            return None
        try:
            st = os.stat(f"{step_name}/{ADAPTER_FILE}", dir_fd=cfd, follow_symlinks=False)
        except OSError:
            return None
        finally:
            os.close(cfd)
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]

    def _op_discard_retired(self, fork_id: str) -> None:
        swap.discard_retired(self.run.checkpoints, fork_id, run_fd=self.fd)

    def _op_discard_copies(self, fork_id: str, staged: bool) -> None:
        if staged:
            try:
                # Install may have got part of the way; this leaves one complete 0000 and nothing else.
                swap.settle_leftover(self.run.checkpoints, fork_id, run_fd=self.fd)
                return
            except (swap.SwapError, OSError):
                pass  # e.g. 0000 is a symlink: settling refuses to touch it, so just drop our copy below
        with contextlib.suppress(swap.SwapError, OSError):
            swap.abort_staging(self.run.checkpoints, fork_id, run_fd=self.fd)

    def _op_settle_leftover(self, fork_id: str) -> str:
        return swap.settle_leftover(self.run.checkpoints, fork_id, run_fd=self.fd)

    def _op_leftovers(self) -> list[tuple[str, str]]:
        return swap.leftovers(self.run.checkpoints, run_fd=self.fd)

    def _op_served_digest(self) -> str | None:
        try:
            return self._served_digest()
        except (AdapterError, OSError):
            return None

    # --- endings ------------------------------------------------------------------------------------------
    def _op_finish(self, fork_id: str, outcome: dict[str, Any] | None) -> None:
        if outcome is not None:
            done = outcome.get("status") == "done"
            self._write_json(DONE if done else FAILED, bounded_outcome(outcome))
            with contextlib.suppress(OSError):
                remove_at(self.fd, FAILED if done else DONE)
        with self._claim_lock:
            self._claim_released = True
            try:
                remove_at(self.fd, INPROGRESS)
            except OSError:  # a non-empty directory named .fork: move it aside rather than delete a user's files
                with contextlib.suppress(OSError):
                    os.rename(INPROGRESS, f".fork.rejected-{fork_id}", src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def _op_read_outcome(self) -> dict[str, Any] | None:
        for name in (DONE, FAILED):
            found = read_json_object(Path(name), dir_fd=self.fd)
            if found is not None:
                return found
        return None

    # --- vLLM snapshots -----------------------------------------------------------------------------------
    def _op_snapshot(self, fork_id: str) -> list[str]:
        cfd = os.open(CHECKPOINTS, DIR_FLAGS, dir_fd=self.fd)
        try:
            return list(create_snapshot(cfd, fork_id))
        finally:
            os.close(cfd)

    def _op_collect_snapshots(self, keep: list[str] | None, partials: bool = True) -> list[list[str]]:
        try:
            cfd = os.open(CHECKPOINTS, DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return [[], []]
        try:
            return [list(names) for names in collect_snapshots(cfd, keep, partials=partials)]
        finally:
            os.close(cfd)


@contextlib.contextmanager
def local_run_files(model_dir: Path) -> Iterator[RunIO | None]:
    """The run at `model_dir` opened as a fork opens it, its files handled by this process with its own rights: for
    a stage driven without a fork holding the run (tests, benchmarks). None when it cannot be opened."""
    try:
        opened = open_run(run_dir_of_record(model_dir))
    except RunDirError:
        yield None
        return
    io = LocalRunIO(opened.run, opened.fd, frozenset({opened.uid, 0, os.geteuid()}))
    try:
        yield io
    finally:
        io.close()
        opened.close()


def run_dir_of_record(model_dir: Path) -> RunDir:
    """The RunDir a journaled fork names (`{root}/{project}/models/{model}`)."""
    return RunDir(model_dir.parents[2], model_dir.parts[-3], model_dir.name)
