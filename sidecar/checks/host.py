"""The doctor's checks of the host: inotify limits, filesystems inotify cannot follow, RENAME_EXCHANGE in each root."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.config import Config

if TYPE_CHECKING:
    pass
from sidecar.checks.dirs import running_daemon_pid
from sidecar.checks.findings import Context, Finding, read_int

__all__ = [
    "check_exchange",
    "check_filesystems",
    "check_inotify",
    "exchange_supported",
    "inotify_in_use",
    "watched_roots",
    "watches_needed",
]


# --- inotify limits ---------------------------------------------------------------------------------------------------


def watched_roots(config: Config) -> list[Path]:
    """The roots the daemon would watch with inotify (mode auto polls network/FUSE roots, poll watches none)."""
    from sidecar.watch import needs_polling

    if config.watch.mode == "poll":
        return []
    roots = [r for r in config.watch.roots if r.is_dir()]
    return roots if config.watch.mode == "inotify" else [r for r in roots if needs_polling(r) is None]


def watches_needed(root: Path) -> tuple[int, int]:
    """(watches, runs) for one root: the root, each project and its models dir, and each run dir."""
    from sidecar.layout import iter_run_dirs

    runs = list(iter_run_dirs(root))
    projects = {r.project for r in runs}
    with contextlib.suppress(OSError):
        projects |= {e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and e.name[0] != "."}
    return 1 + 2 * len(projects) + len(runs), len(runs)


def inotify_in_use(proc: Path, uid: int, exclude_pid: int | None = None) -> tuple[int, int]:
    """(instances, watches) held by readable processes of `uid`, from /proc/*/fdinfo (a lower bound as non-root)."""
    instances = watches = 0
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == exclude_pid:
            continue
        try:
            if pid_dir.stat().st_uid != uid:
                continue
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(fd) == "anon_inode:inotify":
                    instances += 1
                    watches += (pid_dir / "fdinfo" / fd.name).read_text().count("inotify wd:")
    return instances, watches


def check_inotify(ctx: Context) -> list[Finding]:
    roots = watched_roots(ctx.config)
    if not roots:
        return [Finding("inotify", "info", "no root is watched with inotify (polling or no root exists yet)")]
    max_watches = read_int(ctx.inotify_dir / "max_user_watches")
    max_instances = read_int(ctx.inotify_dir / "max_user_instances")
    counts = [watches_needed(r) for r in roots]
    needed, runs = sum(c[0] for c in counts), sum(c[1] for c in counts)
    daemon_pid = running_daemon_pid(ctx.config)
    instances, in_use = inotify_in_use(ctx.proc, os.geteuid(), exclude_pid=daemon_pid)
    out = []
    sysctl = "/etc/sysctl.d/90-fork-sidecar.conf"
    if max_watches is None:
        out.append(Finding("inotify", "info", f"cannot read {ctx.inotify_dir}/max_user_watches"))
    elif needed + in_use > max_watches:
        want = _round_up(2 * (needed + in_use))
        out.append(
            Finding(
                "inotify",
                "problem",
                f"{runs} runs need {needed} inotify watches and this user already holds {in_use}, but "
                f"fs.inotify.max_user_watches is {max_watches}; runs past the limit are only polled",
                f"raise it: `sysctl fs.inotify.max_user_watches={want}` and put that line in {sysctl}.",
            )
        )
    else:
        out.append(
            Finding(
                "inotify", "ok", f"{runs} runs need {needed} watches; {in_use} in use by this user; limit {max_watches}"
            )
        )
    if max_instances is not None and instances + 1 > max_instances:
        out.append(
            Finding(
                "inotify",
                "problem",
                f"this user holds {instances} inotify instances and fs.inotify.max_user_instances is {max_instances}; "
                "the daemon needs one more",
                f"raise it: `sysctl fs.inotify.max_user_instances={_round_up(2 * max_instances)}` and put that line "
                f"in {sysctl}.",
            )
        )
    return out


def _round_up(n: int) -> int:
    size = 1024
    while size < n:
        size *= 2
    return size


# --- filesystems ------------------------------------------------------------------------------------------------------
def check_filesystems(ctx: Context) -> list[Finding]:
    from sidecar.watch import needs_polling

    out = []
    mode = ctx.config.watch.mode
    for root in ctx.config.watch.roots:
        if not root.is_dir():
            out.append(
                Finding("filesystem", "info", f"{root} does not exist yet; the daemon watches it once it appears")
            )
            continue
        fs_type = needs_polling(root)
        if fs_type is None:
            out.append(Finding("filesystem", "ok", f"{root}: a local filesystem, inotify sees every change"))
        elif mode == "inotify":
            out.append(
                Finding(
                    "filesystem",
                    "problem",
                    f"{root} is on {fs_type}, where inotify misses markers written on other hosts, "
                    "and watch.mode is inotify",
                    "set watch.mode: auto (polls such roots every watch.poll_interval) or poll.",
                )
            )
        else:
            every = f"every {float(ctx.config.watch.poll_interval):g}s"
            out.append(Finding("filesystem", "info", f"{root} is on {fs_type}: polled {every} (watch.mode {mode})"))
    return out


# --- RENAME_EXCHANGE --------------------------------------------------------------------------------------------------
def exchange_supported(root: Path) -> tuple[bool | None, str]:
    """(True/False, how) whether renameat2(RENAME_EXCHANGE) works in `root`; None when it could not be tried."""
    from sidecar.fsops import exchange_dirs

    try:
        scratch = Path(tempfile.mkdtemp(prefix=".fork-sidecar-doctor-", dir=root))
    except OSError as e:
        return None, f"cannot create a temporary directory in it ({e.strerror})"
    try:
        (scratch / "a").mkdir()
        (scratch / "b").mkdir()
        (scratch / "a" / "was-a").touch()
        fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            exchange_dirs(fd, "a", "b")
        finally:
            os.close(fd)
        if not (scratch / "b" / "was-a").exists():
            return False, "renameat2 answered success but did not exchange"
        return True, "exchanged two directories atomically"
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY):
            return False, f"renameat2(RENAME_EXCHANGE) answered {errno.errorcode.get(e.errno or 0, e.errno)}"
        return None, f"the probe failed ({e.strerror})"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_exchange(ctx: Context) -> list[Finding]:
    out = []
    for root in ctx.config.watch.roots:
        if not root.is_dir():
            continue
        supported, how = exchange_supported(root)
        if supported:
            out.append(Finding("rename_exchange", "ok", f"{root}: {how}"))
        elif supported is None:
            out.append(
                Finding("rename_exchange", "info", f"{root}: not tested, {how}; run the doctor as the daemon's user")
            )
        else:
            out.append(
                Finding(
                    "rename_exchange",
                    "problem",
                    f"{root}: {how}, so a swap renames checkpoints/0000 aside and leaves a moment without it",
                    "keep run directories on a local filesystem that can exchange (ext4, xfs, btrfs, tmpfs).",
                )
            )
    return out
