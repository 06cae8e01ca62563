"""A fork's run-side work done as the run's owner: a child process per fork, speaking JSON lines over pipes.

The root daemon opens the run directory (sidecar.rundir), starts `python -m sidecar.owner_worker FD ROOT PROJECT
MODEL` with that descriptor passed down (`pass_fds`), and sends it the RunIO calls of the fork. The child starts as
root only because the daemon's interpreter may live where the owner cannot read (/root/.pyenv, a 0700 venv): it
imports what it needs, drops to the owner with setgroups/setresgid/setresuid, checks that root cannot be regained,
and only then touches the run. The kernel then does every permission check as the owner, so a source the owner
cannot read fails like `cp` would, nothing outside the owner's reach is written or deleted, root's reserved blocks
stay untouched, and the child is not dumpable (no ptrace by the owner into a process that ever was root).

Why a process and not a thread that changes its ids: the daemon is threaded, and Python's id calls change every
thread's (glibc broadcasts them); a per-thread raw syscall keeps the effective capabilities (CAP_SYS_PTRACE would
still read another user's /proc/PID/cwd). A process per fork costs about one interpreter start (tens of ms).

Heartbeats are answered on the reading thread, so a claim's lease is renewed during a ten-minute copy; every other
call runs in order on one worker thread, one at a time. A worker killed for outliving `timeouts.swap` (or dead) is
replaced once, so that the calls ending the fork (dropping its copies, writing `.fork.failed`) still run as the owner.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import sidecar
from sidecar.layout import RunDir
from sidecar.protocol.fdwait import readable, wait_writable
from sidecar.protocol.hasher import DigestUnavailable, require_hasher
from sidecar.run_io import LocalRunIO, Owner, RunIO, RunIOError

__all__ = ["OwnerRunIO", "main"]

log = logging.getLogger("sidecar.owner_worker")

MAX_REPLY_BYTES = 2 << 20  # a reply is a small JSON object (file lists are cut to 100 names)
_INLINE_OPS = frozenset({"heartbeat"})


class OwnerRunIO(RunIO):
    """RunIO calls carried out by a child process running as `owner` on the run open as `fd`."""

    def __init__(self, run: RunDir, fd: int, owner: Owner, timeout: float) -> None:
        self.run = run
        self.owner = owner
        self.timeout = timeout
        # Our own copy of the run's descriptor: a fresh worker started after a kill must get the same directory,
        # and the caller's number may be closed (and reused) by then.
        self._fd = os.dup(fd)
        self._write_lock = threading.Lock()
        self._call_lock = threading.Lock()
        self._next_id = 0
        self._fresh_started = False
        self._proc = self._start_worker()

    def _start_worker(self) -> subprocess.Popen[bytes]:
        package_parent = str(Path(sidecar.__file__).resolve().parent.parent)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar.owner_worker",
                *(str(self._fd), str(self.run.root), self.run.project, self.run.model),
                *(str(self.owner.uid), str(self.owner.gid), ",".join(str(g) for g in self.owner.groups)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(self._fd,),
            cwd="/",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": package_parent, "LC_ALL": "C.UTF-8"},
        )
        assert proc.stdin is not None and proc.stdout is not None
        # Written by hand, never blocking: the worker runs as the owner, who may stop it (kill -STOP), and then a
        # full pipe must not hold the daemon's main loop, which posts every claim's heartbeat.
        self._stdin: IO[bytes] = proc.stdin
        self._stdin_fd = self._stdin.fileno()
        os.set_blocking(self._stdin_fd, False)
        self._unsent = b""  # the rest of a message the pipe did not take yet: always finished before the next one
        self._stdout: IO[bytes] = proc.stdout
        self._stdout_fd = self._stdout.fileno()
        self._buffer = b""
        return proc

    def _replace_dead_worker(self) -> None:
        """After a worker was killed (timeouts.swap) or died, the calls that end the fork (drop the copies, write
        the outcome) go to one fresh worker, under the same limit; pipeline steps never go on after such a call
        failed, so nothing is done twice. Called with `_call_lock` held."""
        if self._proc.poll() is None:
            return
        if self._fresh_started:
            raise RunIOError(
                f"{self.run.path}: the fresh worker acting as {self.owner.name} was lost too; nothing more was done."
            )
        self._fresh_started = True
        with self._write_lock:
            self._close_pipes()
            self._proc = self._start_worker()

    def _close_pipes(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()
        self._stdout.close()

    def _write_some(self) -> None:
        """Whatever of `_unsent` the pipe takes now (called with `_write_lock` held)."""
        if self._stdin.closed:  # its number may already be another file's: never write to it
            raise ValueError("the worker's pipe is closed")
        while self._unsent:
            try:
                written = os.write(self._stdin_fd, self._unsent)
            except BlockingIOError:
                return
            self._unsent = self._unsent[written:]

    def _call(self, op: str, **args: Any) -> Any:
        with self._call_lock:
            self._replace_dead_worker()
            self._next_id += 1
            deadline = time.monotonic() + self.timeout
            try:
                with self._write_lock:
                    self._unsent += json.dumps({"id": self._next_id, "op": op, "args": args}).encode() + b"\n"
                    self._write_some()
                    while self._unsent:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise self._timed_out(op)
                        wait_writable(self._stdin_fd, min(left, 1.0))
                        self._write_some()
            except (OSError, ValueError):  # ValueError: closed already
                raise self._died() from None
            reply = self._read_reply(deadline, op)
        if "error" in reply:
            raise RunIOError(str(reply["error"]))
        return reply.get("ok")

    def _post(self, op: str, **args: Any) -> None:
        """Sent if the pipe takes it now; else dropped (a heartbeat: the next one follows), never waited for."""
        if not self._write_lock.acquire(blocking=False):
            return
        try:
            self._write_some()
            if not self._unsent:
                self._unsent = json.dumps({"op": op, "args": args, "noreply": True}).encode() + b"\n"
                self._write_some()
        except (OSError, ValueError):  # ValueError: the pipe was closed, the fork is over
            pass
        finally:
            self._write_lock.release()

    def _timed_out(self, op: str) -> RunIOError:
        self._kill()
        return RunIOError(
            f"{self.run.path}: the fork's {op} step, done as {self.owner.name}, did not finish within "
            f"{self.timeout:.0f}s (timeouts.swap); check that filesystem and fork again."
        )

    def _read_reply(self, deadline: float, op: str) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(op)
            ready = readable([self._stdout_fd], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(self._stdout_fd, 65536)
            if not chunk:
                raise self._died()
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY_BYTES:
                self._kill()
                raise RunIOError(
                    f"{self.run.path}: the worker acting as {self.owner.name} answered too much; report a bug."
                )
        line, _, self._buffer = self._buffer.partition(b"\n")
        value = json.loads(line)
        if not isinstance(value, dict):
            raise RunIOError(
                f"{self.run.path}: the worker acting as {self.owner.name} answered nonsense; report a bug."
            )
        return value

    def _died(self) -> RunIOError:
        code = self._proc.wait(5)
        return RunIOError(
            f"{self.run.path}: the worker acting as {self.owner.name} exited ({code}) in the middle of the fork; "
            "see journalctl."
        )

    def _kill(self) -> None:
        with contextlib.suppress(OSError):
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)

    def close(self) -> None:
        with self._write_lock, contextlib.suppress(OSError):  # not while a heartbeat is being written
            self._stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._kill()
        self._stdout.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --------------------------------------------------------------------------------------------- the child


def _drop_to(uid: int, gid: int, groups: list[int]) -> None:
    """Become the owner for good: groups, then gid, then uid (after which none of them can change back)."""
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # cannot happen once all three uids are the owner's; refuse to work if it did
            raise SystemExit("owner worker: root could be regained after dropping privileges")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise SystemExit("owner worker: privileges were not dropped")


def _serve(io: LocalRunIO, out: IO[bytes]) -> None:
    write_lock = threading.Lock()
    calls: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def answer(message: dict[str, Any]) -> None:
        try:
            reply = {"id": message.get("id"), "ok": io._call(str(message["op"]), **message.get("args", {}))}
        except RunIOError as e:
            reply = {"id": message.get("id"), "error": str(e)}
        except OSError as e:  # as the owner would see it with `cp` or `mv`
            where = io.run.path / e.filename if isinstance(e.filename, str) else io.run.path
            reply = {"id": message.get("id"), "error": f"{where}: {e.strerror or e}; check its permissions and disk."}
        except Exception as e:  # a bug: the fork fails with this sentence rather than hang
            log.exception("owner worker: %s failed", message.get("op"))
            reply = {"id": message.get("id"), "error": f"internal error in the owner worker ({e!r}); see journalctl."}
        if message.get("noreply"):
            return
        with write_lock:
            out.write(json.dumps(reply).encode() + b"\n")
            out.flush()

    def worker() -> None:
        while (message := calls.get()) is not None:
            answer(message)

    thread = threading.Thread(target=worker, name="owner-worker", daemon=True)
    thread.start()
    for line in sys.stdin.buffer:
        message = json.loads(line)
        if not isinstance(message, dict) or not hasattr(io, "_op_" + str(message.get("op"))):
            continue
        if message["op"] in _INLINE_OPS:
            answer(message)
        else:
            calls.put(message)
    calls.put(None)
    thread.join()


def main(argv: list[str]) -> int:
    fd, root, project, model, uid, gid, groups = argv
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="fork-sidecar owner worker: %(message)s")
    owner_groups = [int(g) for g in groups.split(",") if g]
    # The digest's blake3 is imported lazily; here it must be before the drop, like every other import: as the owner
    # the daemon's interpreter may be out of reach. Missing, it is reported by the first digest, as anywhere else.
    with contextlib.suppress(DigestUnavailable):
        require_hasher()
    _drop_to(int(uid), int(gid), owner_groups)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # nothing but replies may reach the daemon's pipe
    run = RunDir(Path(root), project, model)
    io = LocalRunIO(run, int(fd), frozenset({int(uid), 0}))
    try:
        _serve(io, out)
    finally:
        io.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
