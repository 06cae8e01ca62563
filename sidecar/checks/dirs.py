"""The doctor's checks of the daemon's directories: the runtime dir (and each user's agent dir in it), the state dir."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.config import Config

if TYPE_CHECKING:
    pass
from sidecar.checks.findings import Context, Finding, read_int

__all__ = ["check_runtime_dir", "check_state_dir", "lock_holder", "running_daemon_pid"]


# --- runtime dir ------------------------------------------------------------------------------------------------------
def check_runtime_dir(ctx: Context) -> list[Finding]:
    """The runtime dir (the daemon creates it) and the per-user agent directories in it (sidecar/agent_dirs.py)."""
    path = ctx.config.runtime_dir
    try:
        st = path.stat()
    except FileNotFoundError:
        return [
            Finding(
                "runtime_dir",
                "problem",
                f"{path} does not exist, so no trainer agent can create its socket (the daemon creates it at start)",
                "start the daemon (`systemctl start fork-sidecar`), or set runtime_dir and FORK_SIDECAR_RUNTIME_DIR "
                "to the same directory.",
            )
        ]
    except OSError as e:
        return [Finding("runtime_dir", "problem", f"{path}: {e.strerror}", "check the path and its parents' modes.")]
    if not stat.S_ISDIR(st.st_mode):
        return [
            Finding("runtime_dir", "problem", f"{path} is not a directory", "remove it or pick another runtime_dir.")
        ]
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return [
            Finding(
                "runtime_dir",
                "problem",
                f"{path} is writable by other users (mode {mode:o}): anyone can create a directory named for another "
                "user's uid before the daemon makes it (the daemon then replaces it)",
                f"`chmod 0755 {path}` (RuntimeDirectoryMode=0755 in the unit); each user's agents use only their own "
                "directory in it.",
            ),
            *_user_dir_findings(path),
        ]
    if not mode & 0o001:
        how = f"mode {mode:o}, owner uid {st.st_uid}: only that user's trainers can reach their agent directory"
    else:
        how = f"mode {mode:o}, owner uid {st.st_uid}: each user's trainers use their own directory in it"
    return [Finding("runtime_dir", "ok", f"{path}: {how}"), *_user_dir_findings(path)]


def _user_dir_findings(runtime_dir: Path) -> list[Finding]:
    """A problem for each `<uid>` entry that is not that user's private directory, and for sockets of old agents."""
    from sidecar.protocol.paths import pid_of_socket, uid_of_agent_dir

    try:
        entries = sorted(runtime_dir.iterdir())
    except OSError:
        return []
    out = []
    for entry in entries:
        if pid_of_socket(entry) is not None:
            out.append(
                Finding(
                    "runtime_dir",
                    "problem",
                    f"{entry} is an agent socket of an older preload (agents now live in {runtime_dir}/<uid>/), "
                    "which this daemon never talks to",
                    "run `fork-sidecar preload install --python <the trainer's python>` again and restart it.",
                )
            )
            continue
        uid = uid_of_agent_dir(entry)
        if uid is None:
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        if not (stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077):
            out.append(
                Finding(
                    "runtime_dir",
                    "problem",
                    f"{entry} is not uid {uid}'s private agent directory (owner uid {st.st_uid}, mode "
                    f"{stat.S_IMODE(st.st_mode):o}), so that user's agents do not use it",
                    "remove it; the daemon (root) makes it again, 0700 and owned by that user, when it sees their run.",
                )
            )
    return out


# --- state dir --------------------------------------------------------------------------------------------------------
def lock_holder(lock: Path, proc: Path = Path("/proc")) -> int | None:
    """The pid holding a flock on `lock` according to /proc/locks (pid as seen in its namespace), or None."""
    try:
        st = lock.stat()
        lines = (proc / "locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK":
            dev, _, inode = fields[5].rpartition(":")
            major, _, minor = dev.partition(":")
            with contextlib.suppress(ValueError):
                if int(inode) == st.st_ino and os.makedev(int(major, 16), int(minor, 16)) == st.st_dev:
                    return int(fields[4])
    return None


def running_daemon_pid(config: Config) -> int | None:
    return lock_holder(config.state_dir / "lock")


def check_state_dir(ctx: Context) -> list[Finding]:
    from sidecar.journal import Journal, JournalError

    state = ctx.config.state_dir
    existing = state
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == state else f"does not exist and its parent {existing} is"
        fix = f"run the doctor as the daemon's user, or make {existing} writable for it, or set state_dir."
        return [Finding("state_dir", "problem", f"{state} {what} not writable by this user", fix)]
    out = []
    holder = lock_holder(state / "lock", ctx.proc)
    recorded = read_int(state / "lock") if (state / "lock").exists() else None
    if holder is None:
        out.append(Finding("state_dir", "ok", f"{state}: writable, no daemon holds its lock"))
    elif (ctx.proc / str(holder)).exists() or (recorded is not None and (ctx.proc / str(recorded)).exists()):
        out.append(Finding("state_dir", "ok", f"{state}: writable, locked by the running daemon (pid {holder})"))
    else:
        out.append(
            Finding(
                "state_dir",
                "problem",
                f"{state}/lock is held by pid {recorded or holder}, which is not a process here (another container "
                "or host shares this state dir)",
                "give each daemon its own state_dir; stop the other one before starting this one.",
            )
        )
    try:
        unfinished = list(Journal(state).unfinished()) if (state / "forks").is_dir() else []
    except JournalError as e:
        out.append(Finding("state_dir", "problem", str(e).split(";")[0], str(e).split("; ", 1)[-1]))
    else:
        if unfinished:
            runs = ", ".join(r.model_dir for r in unfinished[:3])
            out.append(Finding("state_dir", "info", f"{len(unfinished)} unfinished fork(s) to resume: {runs}"))
    return out
