"""`fork-sidecar doctor`: check a node's setup for the daemon and say, for each problem, how to fix it.

Each check is a function `(Context) -> list[Finding]` that only reads, except the RENAME_EXCHANGE probe, which
creates two directories under a hidden temporary name inside each watch root and removes them. Nothing here takes
the daemon's lock (a lock taken by the doctor could make a starting daemon refuse to run): who holds it is read from
/proc/locks. The vLLM probe sends `POST /v1/load_lora_adapter` with an empty JSON object, which no vLLM acts on:
without VLLM_ALLOW_RUNTIME_LORA_UPDATING the route does not exist (FastAPI's 404 `{"detail": "Not Found"}`), with it
the request fails validation (vLLM 0.32 answers 400; older FastAPI defaults 422).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sidecar.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from sidecar.preload.art_compat import ArtInfo

__all__ = ["CHECKS", "Context", "Finding", "add_parser", "main", "run", "run_checks"]

Level = Literal["ok", "info", "problem"]
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
PROBE_TIMEOUT_S = 5.0
_INOTIFY = Path("/proc/sys/fs/inotify")


@dataclass(frozen=True)
class Finding:
    check: str  # which check: inotify, filesystem, runtime_dir, rename_exchange, state_dir, preload, art, agents, vllm
    level: Level
    message: str  # what was found
    fix: str | None = None  # one sentence saying what to do (problems always have one)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Context:
    """What the checks look at; tests build it with their own config, interpreters and /proc paths."""

    config: Config
    pythons: Sequence[str] = ()
    inotify_dir: Path = _INOTIFY
    proc: Path = Path("/proc")
    discover: Callable[[], list[Any]] | None = None  # vLLM discovery; default sidecar.vllm.discovery.discover_servers
    notes: dict[str, Any] = field(default_factory=dict)


# --- inotify limits ---------------------------------------------------------------------------------------------------
def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


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
    max_watches = _read_int(ctx.inotify_dir / "max_user_watches")
    max_instances = _read_int(ctx.inotify_dir / "max_user_instances")
    counts = [watches_needed(r) for r in roots]
    needed, runs = sum(c[0] for c in counts), sum(c[1] for c in counts)
    daemon_pid = _daemon_pid(ctx.config)
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


def _daemon_pid(config: Config) -> int | None:
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
    recorded = _read_int(state / "lock") if (state / "lock").exists() else None
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


# --- preload ----------------------------------------------------------------------------------------------------------
def check_preload(ctx: Context) -> list[Finding]:
    from sidecar.preload import install

    if not ctx.pythons:
        return [
            Finding(
                "preload",
                "info",
                "no trainer interpreter given; pass --python PATH for each trainer environment to check its preload",
            )
        ]
    out = []
    for python in ctx.pythons:
        try:
            status = install.status(os.path.abspath(python) if os.sep in python else python)
        except install.PreloadError as e:
            out.append(Finding("preload", "problem", str(e), "pass the trainer environment's bin/python."))
            continue
        again = f"`fork-sidecar preload install --python {python}`"
        if status.installed and status.up_to_date is not False and not status.disabled_here:
            note = f" ({status.version_note})" if status.version_note else ""
            out.append(Finding("preload", "ok", f"{python}: preload {status.installed_version} installed{note}"))
        elif status.installed and status.up_to_date is False:
            out.append(Finding("preload", "problem", f"{python}: {status.version_note}", f"run {again}."))
        elif status.installed:
            out.append(
                Finding(
                    "preload",
                    "problem",
                    f"{python}: installed, but FORK_SIDECAR_PRELOAD=0 in this environment turns it off",
                    "unset FORK_SIDECAR_PRELOAD where trainers start.",
                )
            )
        else:
            what = "partly installed" if status.partial else "not installed"
            out.append(Finding("preload", "problem", f"{python}: preload {what}", f"run {again}."))
    return out


# --- openpipe-art in trainer environments -----------------------------------------------------------------------------
def check_art(ctx: Context) -> list[Finding]:
    """openpipe-art in each trainer environment: a version without what the preload relies on is a problem."""
    from sidecar.preload import install
    from sidecar.preload.art_compat import probe_art

    out = []
    for python in ctx.pythons:
        try:
            interpreter = install.probe_interpreter(os.path.abspath(python) if os.sep in python else python)
        except install.PreloadError:
            continue  # the preload check already says this interpreter is unusable
        out.append(_art_finding(python, probe_art(interpreter.executable)))
    return out


def _art_finding(python: str, art: ArtInfo) -> Finding:
    from sidecar.preload.art_compat import TESTED_ART_VERSIONS

    problem, line = art.verdict()
    if problem:
        newest = TESTED_ART_VERSIONS[-1]
        return Finding(
            "art",
            "problem",
            f"{python}: {line}",
            f"pin a tested openpipe-art there (0.5.18 on Python 3.11, {newest} on Python 3.12), e.g. "
            f"`{python} -m pip install openpipe-art=={newest}`; until then forks do not reach that trainer "
            "(restart it after each fork) and ART's own forks get no marker (use `fork-sidecar fork`).",
        )
    level: Level = "ok" if art.tested or not art.installed else "info"
    return Finding("art", level, f"{python}: {line}")


# --- agents -----------------------------------------------------------------------------------------------------------
def check_agents(ctx: Context) -> list[Finding]:
    from sidecar.protocol.reasons import Reason
    from sidecar.trainers import agent_statuses

    agents = agent_statuses(ctx.config.runtime_dir)
    if not agents:
        return [Finding("agents", "info", f"no trainer agent in {ctx.config.runtime_dir} (no trainer running here?)")]
    out = []
    for agent in agents:
        pid, error = agent.get("pid"), agent.get("error")
        if error and agent.get("reason") == Reason.TRAINER_GONE:
            out.append(Finding("agents", "info", f"pid {pid}: {error}; the daemon removes it"))
        elif error:
            out.append(
                Finding(
                    "agents",
                    "problem",
                    f"agent of pid {pid} ({agent.get('socket')}) did not answer: {error}",
                    "run the doctor (and the daemon) as root or as the trainer's user; check the trainer is not hung.",
                )
            )
        else:
            runs = agent.get("runs") or []
            who = f"agent of pid {pid} (uid {agent.get('uid')})"
            out.append(Finding("agents", "ok", f"{who} answers; serves {len(runs)} run(s) (forks of its uid's runs)"))
    return out


# --- vLLM -------------------------------------------------------------------------------------------------------------
def _vllm_targets(ctx: Context) -> list[Any]:
    from sidecar.vllm.discovery import configured_servers, discover_servers, merge_targets

    config = ctx.config
    # Every configured server, whatever runs it is for: make each match any run, then reuse the key loading.
    every = tuple(dataclasses.replace(s, runs=("*",)) for s in config.vllm.servers)
    configured = configured_servers(
        dataclasses.replace(config, vllm=dataclasses.replace(config.vllm, servers=every)), Path("/")
    )
    discover = ctx.discover or discover_servers
    return merge_targets(configured, discover() if config.vllm.discover else [])


def probe_vllm(target: Any, request_timeout: float = PROBE_TIMEOUT_S) -> Finding:
    """Reachable with its key (GET /v1/models) and runtime LoRA loading enabled (the load route exists)."""
    import time

    from sidecar.vllm.client import ConnectFailed, HttpError, RequestFailed, VllmClient
    from sidecar.vllm.discovery import listener_check

    where = f"{target.url} ({target.origin})"
    if target.problem:
        return Finding("vllm", "problem", f"{where}: {target.problem}", "fix the server's entry under vllm.servers.")
    if stranger := listener_check(target):  # its key goes only to its own process's socket
        return Finding("vllm", "problem", f"{where}: {stranger}", "check which process holds that port.")
    client = VllmClient(target.url, target.api_key, request_timeout)
    deadline = time.monotonic() + request_timeout
    try:
        cards = client.models(deadline)
    except ConnectFailed as e:
        return Finding(
            "vllm", "problem", f"{where} did not answer ({e})", "start it, or fix its URL under vllm.servers."
        )
    except HttpError as e:
        return _http_problem(where, target, e, "GET /v1/models")
    except RequestFailed as e:  # an answer that is not a model list (an HTML page, truncated JSON)
        return Finding("vllm", "problem", f"{where} answered GET /v1/models with {e}", "check that the URL is vLLM's.")
    try:
        client.request("POST", "/v1/load_lora_adapter", {}, deadline)
    except ConnectFailed as e:
        return Finding("vllm", "problem", f"{where} stopped answering ({e})", "check that it runs.")
    except HttpError as e:
        if e.route_missing:
            return Finding(
                "vllm",
                "problem",
                f"{where} has no runtime LoRA loading (HTTP {e.status} on /v1/load_lora_adapter), so forks cannot "
                "reach it",
                "restart it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment.",
            )
        if e.status in (401, 403):
            return _http_problem(where, target, e, "POST /v1/load_lora_adapter")
        if not 400 <= e.status < 500:
            return Finding(
                "vllm", "problem", f"{where} answered HTTP {e.status} to a load probe: {e.message}", "check its log."
            )
    adapters = sum(1 for c in cards if c.parent is not None)
    keyed = " with its API key" if target.api_key else ""
    return Finding("vllm", "ok", f"{where}: reachable{keyed}, runtime LoRA loading on, {adapters} adapter(s) loaded")


def _http_problem(where: str, target: Any, e: Any, what: str) -> Finding:
    if e.status in (401, 403):
        if target.api_key:
            fix = "the configured key was refused: check api_key_file / api_key_env under vllm.servers."
        else:
            fix = "give its key with api_key_file or api_key_env under vllm.servers (or run as the server's user)."
        return Finding("vllm", "problem", f"{where} requires an API key (HTTP {e.status} on {what})", fix)
    if e.route_missing:
        return Finding(
            "vllm", "problem", f"{where} is not a vLLM OpenAI server (HTTP {e.status} on {what})", "check its URL."
        )
    return Finding("vllm", "problem", f"{where} answered HTTP {e.status} on {what}: {e.message}", "check its log.")


def check_vllm(ctx: Context) -> list[Finding]:
    targets = _vllm_targets(ctx)
    if not targets:
        how = "discovery found none" if ctx.config.vllm.discover else "discovery is off"
        level: Level = "problem" if ctx.config.vllm.required else "info"
        fix = "start the servers, or list them under vllm.servers." if level == "problem" else None
        return [Finding("vllm", level, f"no vLLM server found ({how}, {len(ctx.config.vllm.servers)} configured)", fix)]
    timeout = min(PROBE_TIMEOUT_S, float(ctx.config.vllm.request_timeout))
    findings = [probe_vllm(t, timeout) for t in targets]
    silent = [t.url for t, f in zip(targets, findings, strict=True) if f.level == "problem"]
    kept = _fork_snapshots(ctx.config) if silent else []
    if kept:
        findings.append(
            Finding(
                "vllm",
                "problem",
                f"{len(kept)} vLLM fork snapshot(s) on disk (e.g. {kept[0]}) and kept: {', '.join(silent)} cannot be "
                "asked which adapter paths it reads, so none is removed and every fork adds one",
                f"start {silent[0]} or remove it from vllm.servers; the next fork then removes the unused ones.",
            )
        )
    return findings


def _fork_snapshots(config: Config) -> list[Path]:
    from sidecar.layout import iter_run_dirs
    from sidecar.vllm.snapshots import list_snapshots

    return [p for root in watched_roots(config) for run in iter_run_dirs(root) for p in list_snapshots(run.checkpoints)]


# --- coordination -----------------------------------------------------------------------------------------------------
def check_coordination(ctx: Context) -> list[Finding]:
    from sidecar.claims.etcd_health import coordination_findings

    return [Finding("coordination", level, message, fix) for level, message, fix in coordination_findings(ctx.config)]


CHECKS: tuple[tuple[str, Callable[[Context], list[Finding]]], ...] = (
    ("inotify", check_inotify),
    ("filesystem", check_filesystems),
    ("runtime_dir", check_runtime_dir),
    ("rename_exchange", check_exchange),
    ("state_dir", check_state_dir),
    ("preload", check_preload),
    ("art", check_art),
    ("agents", check_agents),
    ("vllm", check_vllm),
    ("coordination", check_coordination),
)


def run_checks(ctx: Context) -> list[Finding]:
    """Every check in order; a check that crashes is itself a finding (the doctor must always finish its list)."""
    out: list[Finding] = []
    for name, check in CHECKS:
        try:
            out += check(ctx)
        except Exception as e:  # a bug in one check must not hide the others' findings
            out.append(Finding(name, "problem", f"the check itself failed ({e!r})", "report this as a bug."))
    return out


# --- command line -----------------------------------------------------------------------------------------------------
_DESCRIPTION = """\
Check this node's setup for fork-sidecar and say how to fix each problem found:

  inotify          fs.inotify.max_user_watches / max_user_instances against the runs under the roots
  filesystem       roots on NFS, Lustre, FUSE... where inotify misses other hosts' markers (watch.mode)
  runtime_dir      exists, not writable by other users; each <uid>/ in it is that user's 0700 agent directory
  rename_exchange  renameat2(RENAME_EXCHANGE) in each root (tried on two scratch directories, then removed)
  state_dir        writable, lock held only by a live daemon, journal files readable
  preload          installed and current in each trainer interpreter given with --python
  art              openpipe-art there: a tested version, or one with every ART internal the preload relies on
  agents           every trainer agent socket in runtime_dir/<uid>/ answers
  vllm             every configured or discovered vLLM server answers GET /v1/models with its key and has
                   runtime LoRA loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)
  coordination     with coordination.backend etcd: each endpoint answers, the credentials are accepted, a lease
                   granted reads back and refreshes (etcd's clock only), and this node's daemon holds a live lease

Run it as the daemon's user (usually root) to see what the daemon sees.

examples:
  fork-sidecar doctor --config /etc/fork-sidecar/config.yaml
  fork-sidecar doctor --python /opt/trainer-venv/bin/python --python /opt/other/bin/python
  fork-sidecar doctor --json | jq '.findings[] | select(.level == "problem")'

exit codes: 0 no problem found, 1 problems found (listed with their fixes), 2 configuration error.
"""


def add_parser(subparsers: Any) -> None:
    """Register `doctor` on the CLI's subparsers; the parsed namespace's `func(args)` returns the exit code."""
    parser = subparsers.add_parser(
        "doctor",
        help="check this node's setup and say how to fix each problem",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="PATH", help="YAML config (default: $FORK_SIDECAR_CONFIG, else built-in defaults)"
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        action="append",
        default=[],
        help="a trainer environment's interpreter whose preload to check (repeat for several)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    value = args.config or os.environ.get("FORK_SIDECAR_CONFIG")
    try:
        config = load_config(Path(value) if value else None)
    except ConfigError as e:
        print(f"fork-sidecar doctor: {e}", file=sys.stderr)
        return EXIT_USAGE
    findings = run_checks(Context(config, pythons=list(args.python)))
    problems = [f for f in findings if f.level == "problem"]
    if args.json:
        where = str(config.source_file) if config.source_file else None
        print(json.dumps({"config": where, "ok": not problems, "findings": [f.to_json() for f in findings]}, indent=1))
    else:
        print(f"fork-sidecar doctor: {config.source_file or 'built-in defaults'}")
        for f in findings:
            print(f"  {f.level.upper() if f.level == 'problem' else f.level:8} {f.check}: {f.message}")
            if f.fix:
                print(f"  {'':8} fix: {f.fix}")
        print(f"{len(problems)} problem(s) found." if problems else "no problems found.")
    return EXIT_PROBLEMS if problems else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m sidecar.doctor [--config PATH] [--python PATH]... [--json]`."""
    parser = argparse.ArgumentParser(
        prog="fork-sidecar doctor", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
