"""Helpers for the reliability suite and bench/soak.py: runs on disk, daemons, settling checks, /proc sampling.

Everything here drives the real daemon (tests.support.daemon.DaemonProcess) and reads the real files it leaves:
outcome files beside the marker, `history.jsonl` and `forks/` in the state dir, and `checkpoints/` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.adapters import write_adapter, write_big_adapter
from tests.support.daemon import DaemonProcess, wait_for, write_config

__all__ = [
    "Fleet",
    "HeldVllmStage",
    "ProcSample",
    "Settled",
    "cpu_seconds",
    "fifo_writer",
    "history",
    "leftovers",
    "make_run",
    "mounted_tmpfs",
    "proc_sample",
    "rss_kib",
    "settled",
    "tree_digest",
    "wait_settled",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_digest(path: Path) -> str | None:
    """One hash over every file's relative path and bytes (None if `path` is missing): equal = byte-identical tree."""
    if not path.is_dir() or path.is_symlink():
        return None
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path)).encode()
        if p.is_symlink():
            h.update(b"L" + rel + b"\0" + os.fsencode(os.readlink(p)) + b"\0")
        elif p.is_file():
            h.update(b"F" + rel + b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        elif p.is_dir():
            h.update(b"D" + rel + b"\0")
    return h.hexdigest()


def make_run(
    art: Path,
    project: str = "p",
    model: str = "m",
    steps: tuple[int, ...] = (3,),
    big_step: int | None = None,
    big_bytes: int = 0,
    big_template: Path | None = None,
) -> Path:
    """An ART run: 0000 (seed 0), small steps (seed = step) and optionally one big step (copied from a template)."""
    model_dir = art / project / "models" / model
    write_adapter(model_dir / "checkpoints" / "0000", seed=0)
    for step in steps:
        write_adapter(model_dir / "checkpoints" / f"{step:04d}", seed=step)
    if big_step is not None:
        target = model_dir / "checkpoints" / f"{big_step:04d}"
        if big_template is not None:
            shutil.copytree(big_template, target)
        else:
            write_big_adapter(target, big_bytes, seed=big_step)
    return model_dir


def leftovers(model_dir: Path) -> list[str]:
    """Hidden fork debris in checkpoints/ (stage or retired copies)."""
    try:
        return sorted(p.name for p in (model_dir / "checkpoints").iterdir() if p.name.startswith(".fork-"))
    except FileNotFoundError:
        return []


def history(state_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (state_dir / "history.jsonl").read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def journal_files(state_dir: Path) -> list[str]:
    """Fork records left in forks/ (not the `.<id>.json.tmp-<pid>` temp files a SIGKILL can strand: reported apart)."""
    try:
        return sorted(p.name for p in (state_dir / "forks").iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        return []


@dataclass
class Settled:
    model_dir: Path
    outcome: dict[str, Any] | None
    markers: list[str]  # .fork / .fork.inprogress still present
    leftovers: list[str]
    journal: list[str]

    @property
    def ok(self) -> bool:
        return self.outcome is not None and not self.markers and not self.leftovers and not self.journal


def settled(model_dir: Path, state_dirs: list[Path]) -> Settled:
    outcome = None
    for name in (".fork.done", ".fork.failed"):
        with contextlib.suppress(FileNotFoundError, ValueError):
            outcome = json.loads((model_dir / name).read_text())
    markers = [n for n in (".fork", ".fork.inprogress") if os.path.lexists(model_dir / n)]
    journal = [f for s in state_dirs for f in journal_files(s)]
    return Settled(model_dir, outcome, markers, leftovers(model_dir), journal)


def wait_settled(model_dir: Path, state_dirs: list[Path], timeout: float) -> Settled:
    """Poll until the run has an outcome and nothing in flight; returns the last view either way."""
    deadline = time.monotonic() + timeout
    view = settled(model_dir, state_dirs)
    while not view.ok and time.monotonic() < deadline:
        time.sleep(0.02)
        view = settled(model_dir, state_dirs)
    return view


# --- several daemons ------------------------------------------------------------------------------------------
@dataclass
class Fleet:
    """Daemons with their own state dirs and logs, all cleaned up by close() (use as a context manager)."""

    base: Path
    roots: list[Path]
    overrides: dict[str, Any] = field(default_factory=dict)
    daemons: list[DaemonProcess] = field(default_factory=list)

    def state_dir(self, i: int) -> Path:
        return self.base / f"state{i}"

    def config(self, i: int) -> Path:
        return write_config(
            self.base / f"config{i}.yaml", self.roots, self.state_dir(i), self.base / f"run{i}", **self.overrides
        )

    def start(self, i: int, env: dict[str, str] | None = None, wait_ready: bool = True) -> DaemonProcess:
        d = DaemonProcess(self.config(i), self.base / f"daemon{i}.log", env=env)
        self.daemons.append(d)
        d.start(wait_ready=wait_ready)
        return d

    def close(self) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                    d.stop(timeout=15)
            d.kill()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- /proc ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcSample:
    rss_kib: int
    cpu_s: float
    threads: int


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_sample(pid: int) -> ProcSample:
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return ProcSample(rss_kib(pid), cpu_seconds(pid), threads)


# --- filesystems ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str = "8m") -> Iterator[Path | None]:
    """A small tmpfs at `path` (None when this process cannot mount: not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield None
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> bool:
    return subprocess.run(["mount", "-o", f"remount,{options}", str(path)], capture_output=True).returncode == 0


# --- one SIGKILL-at-a-random-moment trial (shared by test_crash.py and bench/soak.py) ----------------------------
@dataclass
class CrashTrial:
    delay_s: float
    claimed_at_kill: bool  # .fork.inprogress existed when the kill landed
    at_kill: str  # "old", "new", "missing" or "torn": what checkpoints/0000 was right after the kill
    after: str  # the same after restart and settling
    outcomes: int  # history entries for the run across state dirs (must be exactly 1)
    status: str | None
    leftovers: list[str]
    journal: list[str]
    markers: list[str]
    recovery_s: float  # restart (READY) to settled

    @property
    def good(self) -> bool:
        return (
            self.at_kill in ("old", "new")
            and self.after == "new"
            and self.outcomes == 1
            and self.status == "done"
            and not self.leftovers
            and not self.journal
            and not self.markers
        )


def classify(path: Path, old: str, new: str) -> str:
    digest = tree_digest(path)
    return "missing" if digest is None else "old" if digest == old else "new" if digest == new else "torn"


def crash_trial(base: Path, template: Path, delay_s: float, settle_timeout: float = 90.0) -> CrashTrial:
    """Fork `template` (a big adapter) into a fresh run, SIGKILL the daemon after `delay_s`, restart, settle."""
    art = base / "art"
    model_dir = make_run(art, steps=(), big_step=9, big_template=template)
    old = tree_digest(model_dir / "checkpoints" / "0000")
    new = tree_digest(template)
    assert old is not None and new is not None
    fleet = Fleet(base, [art], overrides={"timeouts": {"orphan_claim": "500ms"}, "log": {"level": "info"}})
    with fleet:
        daemon = fleet.start(0)
        (model_dir / ".fork").write_text("step: 9\n")
        time.sleep(delay_s)
        claimed = os.path.lexists(model_dir / ".fork.inprogress")
        daemon.kill()
        at_kill = classify(model_dir / "checkpoints" / "0000", old, new)
        restarted = time.monotonic()
        fleet.start(0)
        view = wait_settled(model_dir, [fleet.state_dir(0)], settle_timeout)
        recovery = time.monotonic() - restarted
    runs = [h for h in history(fleet.state_dir(0)) if h.get("model_dir") == str(model_dir)]
    return CrashTrial(
        delay_s=delay_s,
        claimed_at_kill=claimed,
        at_kill=at_kill,
        after=classify(model_dir / "checkpoints" / "0000", old, new),
        outcomes=len(runs),
        status=(view.outcome or {}).get("status"),
        leftovers=view.leftovers,
        journal=view.journal,
        markers=view.markers,
        recovery_s=recovery,
    )


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A TCP listener that accepts connections and never answers: a hung vLLM (requests time out)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # the kernel completes handshakes; nobody ever reads
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def slow_stage_overrides(url: str, seconds: str = "300ms") -> dict[str, Any]:
    """Config sections that make every fork spend `seconds` in the vLLM stage (talking to a silent server)."""
    return {"vllm": {"discover": False, "servers": [{"url": url}], "request_timeout": seconds}}


def fifo_writer(fifo: Path) -> int | None:
    """The FIFO's write end once a reader has it open (or is blocked opening it), else None (ENXIO: nobody reads)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


class HeldVllmStage:
    """A `vllm.servers` entry (at `url`) whose api_key_file is a FIFO: every fork's vLLM stage blocks reading the key
    until release() writes it, so a test holds a fork in flight for as long as it needs, on a fast host as on a
    loaded one, instead of racing a stage it made slow (silent_server) and hoping it is still running."""

    def __init__(self, base: Path, url: str, request_timeout: str = "300ms") -> None:
        self.fifo = base / "held-stage-key.fifo"
        os.mkfifo(self.fifo)
        self.url = url
        self.request_timeout = request_timeout
        self._writer: int | None = None

    def overrides(self) -> dict[str, Any]:
        server = {"url": self.url, "api_key_file": str(self.fifo)}
        return {"vllm": {"discover": False, "servers": [server], "request_timeout": self.request_timeout}}

    def wait_held(self, timeout: float = 60.0) -> None:
        """Until a fork's vLLM stage is reading the key, i.e. that fork is in flight and stays so until release()."""
        self._writer = wait_for(lambda: fifo_writer(self.fifo), timeout, "a fork's vLLM stage reading its key file")

    def __enter__(self) -> HeldVllmStage:
        return self

    def __exit__(self, *exc: object) -> None:
        """Lets go of any fork still held (a test that failed mid-way), so its daemon can stop."""
        if self._writer is None:
            self._writer = fifo_writer(self.fifo)
        if self._writer is not None:
            self.release()

    def release(self) -> None:
        """Let the held stage go on: it reads the key and goes on to the server at `url`."""
        assert self._writer is not None, "release() without wait_held()"
        try:
            # A fresh FIFO at the path first: the released reader may still have the old one open (it reads to EOF),
            # and the next wait_held() must see only the next fork's reader.
            fresh = self.fifo.with_name(self.fifo.name + ".next")
            os.mkfifo(fresh)
            os.replace(fresh, self.fifo)
            os.write(self._writer, b"sk-held\n")
        finally:
            os.close(self._writer)
            self._writer = None


def write_marker_atomically(model_dir: Path, text: str) -> None:
    """Writes `.fork` as `fork-sidecar fork` does (temp file + rename), so no half-written marker is ever seen."""
    tmp = model_dir / ".fork.tmp-test"
    tmp.write_text(text)
    os.replace(tmp, model_dir / ".fork")


class Storm:
    """A thread writing small files into checkpoints/<step>/ and trajectories/ of runs at `per_minute` files."""

    def __init__(self, runs: list[Path], per_minute: int) -> None:
        import threading

        self.runs = runs
        self.interval = 60.0 / per_minute
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storm", daemon=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        i = 0
        while not self._stop.is_set():
            run = self.runs[i % len(self.runs)]
            where = run / ("trajectories" if i % 2 else "checkpoints/0500") / f"g{i // 500:04d}"
            where.mkdir(parents=True, exist_ok=True)
            (where / f"f{i:07d}.jsonl").write_bytes(b'{"reward": 1.0}\n' * 4)
            self.written += 1
            i += 1
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)

    def __enter__(self) -> Storm:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def claim_latencies_ms(state_dir: Path, written_at: dict[str, float]) -> list[float]:
    """Marker written (time.time() before the rename) -> claimed (history started_at), per run, in ms."""
    out = []
    for h in history(state_dir):
        t = written_at.get(h.get("model_dir", ""))
        if t is not None:
            out.append((float(h["started_at"]) - t) * 1000)
    return out
