"""Clock jumps, through the real daemon: forks complete with the wall clock a day behind or ahead, and across steps
backwards and forwards while the daemon runs; a journaled fork resumes after a SIGKILL under a different wall clock;
and a live same-host claim is never adopted because the clock makes its heartbeat and ctime look ancient.

Which clock each timer reads (from the code, so the promises below follow):
- monotonic (immune to jumps): every stage deadline (`ForkContext.deadline` = monotonic + timeouts.trainers / vllm), the
  owner worker's per-call limit (timeouts.swap), control-socket I/O deadlines and `trainer.agent_timeout`, vLLM request
  timeouts and the retry backoff deadline, and the daemon's main loop (orphan claims offered every tick, heartbeat
  refresh every claim_lease / 4, status writes).
- wall clock (can be fooled by a jump): a claim's `heartbeat_at` against `timeouts.claim_lease`, used only for a claim
  by ANOTHER host (same host: the claimer's pid decides); `timeouts.orphan_claim` against the ctime of a
  `.fork.inprogress` that has no readable claim record; the marker settle wait (st_mtime age; a backward step of
  more than 1 s ends the wait instead of stalling); the age of stale `.agent-*` bind dirs; fork ids, `started_at` and
  `finished_at` (labels only).

How the jump is made: libfaketime is the first choice, but its 0.9.10 build (Debian bookworm) cannot run Python 3.11:
with FAKETIME_DONT_FAKE_MONOTONIC=1 (the only realistic mode: a real clock step moves CLOCK_REALTIME, never
CLOCK_MONOTONIC) it shifts the absolute CLOCK_MONOTONIC deadline of `time.sleep` (clock_nanosleep TIMER_ABSTIME) and
the sleep fails with EINVAL; without it, `threading.Event.wait` hangs. `test_libfaketime_can_run_the_daemon` probes
that and skips with the reason. Stepping the host clock (`date -s`) would move every process on a shared machine, so
the daemon instead gets a `sitecustomize` that adds an offset, read from a file the test rewrites, to `time.time`,
`time.time_ns`, `time.gmtime` and `time.localtime` - a fault no real part can produce here without touching the host.
The kernel's file timestamps stay on the real clock, as they do for files written before a real step (or on an NFS
server whose clock differs from the daemon's host).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.reliability.support import Fleet, history, make_run, tree_digest, wait_settled
from tests.support.crash import crash_env
from tests.support.daemon import REPO

pytestmark = pytest.mark.timeout(60)

DAY = 86400.0

SITECUSTOMIZE = r'''
"""Test-only: shift the wall clock of this process by the seconds in $FORK_SIDECAR_TEST_CLOCK_FILE (re-read often)."""
import os
import time

_path = os.environ.get("FORK_SIDECAR_TEST_CLOCK_FILE")
if _path:
    _time, _time_ns, _gmtime, _localtime, _mono = time.time, time.time_ns, time.gmtime, time.localtime, time.monotonic
    _cache = [0.0, -1.0]

    def _offset():
        now = _mono()
        if now - _cache[1] > 0.02:
            try:
                with open(_path) as f:
                    _cache[0] = float(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
            _cache[1] = now
        return _cache[0]

    time.time = lambda: _time() + _offset()
    time.time_ns = lambda: _time_ns() + int(_offset() * 1e9)
    # staticmethod: logging.Formatter keeps `time.localtime` as a class attribute (converter), where a plain
    # function would be bound; staticmethod objects are callable since Python 3.10.
    time.gmtime = staticmethod(lambda secs=None: _gmtime(time.time() if secs is None else secs))
    time.localtime = staticmethod(lambda secs=None: _localtime(time.time() if secs is None else secs))

# Only the first sitecustomize on the path runs: the crash tests' one (tests/support/crash.py) is chained here.
from tests.support.crash import install

install()
'''


class Clock:
    """The daemon's wall-clock offset in seconds; `set()` takes effect within ~20 ms in a running daemon."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "clock-shim"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.file = base / "clock-offset"
        self.set(0)

    def set(self, seconds: float) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(f"{seconds}\n")
        os.replace(tmp, self.file)

    def env(self, **extra: str) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(self.dir), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, "FORK_SIDECAR_TEST_CLOCK_FILE": str(self.file), **extra}


@pytest.fixture
def clock(tmp_path: Path) -> Clock:
    return Clock(tmp_path)


def started_offset(outcome: dict[str, object]) -> float:
    """How far the daemon's clock was from ours when it started the fork (from the outcome's started_at)."""
    started = datetime.fromisoformat(str(outcome["started_at"])).timestamp()
    return started - time.time()


def fork_and_settle(fleet: Fleet, art: Path, name: str, step: int) -> dict[str, object]:
    model_dir = make_run(art, project="clock", model=name, steps=(step,))
    (model_dir / ".fork").write_text(f"step: {step}\n")
    view = wait_settled(model_dir, [fleet.state_dir(0)], 30)
    assert view.ok and view.outcome is not None and view.outcome["status"] == "done", view
    assert tree_digest(model_dir / "checkpoints" / "0000") == tree_digest(model_dir / "checkpoints" / f"{step:04d}")
    return view.outcome


# --- libfaketime ----------------------------------------------------------------------------------------------
def libfaketime() -> Path | None:
    for lib in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1"):
        if Path(lib).exists():
            return Path(lib)
    return None


def test_libfaketime_can_run_the_daemon() -> None:
    """Kept as a probe: if a libfaketime that works with Python's sleeps appears, run the daemon under it instead."""
    lib = libfaketime()
    if lib is None or shutil.which("faketime") is None:
        pytest.skip("faketime is not installed (apt-get install faketime)")
    probe = "import time, threading; threading.Event().wait(0.05); time.sleep(0.05); print(time.time())"
    env = {**os.environ, "LD_PRELOAD": str(lib), "FAKETIME": "-1d", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.skip("libfaketime hangs Python's timed waits; the clock tests use the sitecustomize shim instead")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"libfaketime breaks time.sleep under Python 3.11 ({last}); clock tests use the shim instead")
    assert abs(float(proc.stdout) - (time.time() - DAY)) < 60


# --- jumps ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [-DAY, DAY], ids=["a-day-behind", "a-day-ahead"])
def test_forks_complete_with_the_wall_clock_a_day_off(tmp_path: Path, clock: Clock, offset: float) -> None:
    art = tmp_path / "art"
    clock.set(offset)
    with Fleet(tmp_path, [art]) as fleet:
        fleet.start(0, env=clock.env())
        outcome = fork_and_settle(fleet, art, "skewed", 3)
        assert abs(started_offset(outcome) - offset) < 60, outcome["started_at"]  # the shim is in effect


def test_forks_complete_across_clock_steps_while_running(tmp_path: Path, clock: Clock) -> None:
    art = tmp_path / "art"
    with Fleet(tmp_path, [art], overrides={"timeouts": {"orphan_claim": "1s"}}) as fleet:
        daemon = fleet.start(0, env=clock.env())
        fork_and_settle(fleet, art, "before", 3)
        for i, step in enumerate((-3600.0, 7200.0, -DAY)):  # back an hour, forward two, back a day
            clock.set(step)
            time.sleep(0.1)  # past the shim's re-read interval
            outcome = fork_and_settle(fleet, art, f"after{i}", 4 + i)
            assert abs(started_offset(outcome) - step) < 60
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert len([h for h in history(fleet.state_dir(0)) if h.get("state") == "done"]) == 4


def test_journaled_fork_resumes_after_sigkill_under_another_wall_clock(tmp_path: Path, clock: Clock) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    old, new = tree_digest(model_dir / "checkpoints" / "0000"), tree_digest(model_dir / "checkpoints" / "0003")
    with Fleet(tmp_path, [art]) as fleet:
        crashing = fleet.start(0, env={**clock.env(), **crash_env("staged", shims=[clock.dir])})
        (model_dir / ".fork").write_text("step: 3\n")
        assert crashing.proc is not None
        crashing.proc.wait(20)  # SIGKILLed by itself right after `staged` became durable
        assert crashing.proc.returncode == -9, crashing.log()
        assert tree_digest(model_dir / "checkpoints" / "0000") in (old, new)
        clock.set(-DAY)  # restarted with the clock a day behind the journal's started_at
        fleet.start(0, env=clock.env())
        view = wait_settled(model_dir, [fleet.state_dir(0)], 30)
    assert view.ok and view.outcome is not None and view.outcome["status"] == "done", view
    assert tree_digest(model_dir / "checkpoints" / "0000") == new
    runs = [h for h in history(fleet.state_dir(0)) if h.get("model_dir") == str(model_dir)]
    assert len(runs) == 1 and runs[0]["state"] == "done", runs


@pytest.fixture
def live_claimer() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_live_same_host_claim_is_not_adopted_after_a_forward_jump(
    tmp_path: Path, clock: Clock, live_claimer: subprocess.Popen[bytes]
) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    old = tree_digest(model_dir / "checkpoints" / "0000")
    # What a live daemon on this host writes when it claims (sidecar/pipeline.py `_write_claim`); the claimer is a
    # stand-in process so that it stays alive while the daemon under test looks at the claim.
    claim = {
        "fork_id": "20260101T000000Z-abcdef",
        "claimed_by": {"host": socket.gethostname(), "pid": live_claimer.pid, "state_dir": str(tmp_path / "other")},
        "heartbeat_at": time.time(),
        "request": {"step": 3},
        "marker": "step: 3\n",
    }
    tmp = model_dir / ".fork.inprogress.tmp-test"
    tmp.write_text(json.dumps(claim))
    os.replace(tmp, model_dir / ".fork.inprogress")
    # A day ahead: the heartbeat is 24 h old (claim_lease 2 s) and the ctime far past orphan_claim.
    clock.set(DAY)
    overrides = {"timeouts": {"orphan_claim": "1s", "claim_lease": "2s"}}
    with Fleet(tmp_path, [art], overrides=overrides) as fleet:
        fleet.start(0, env=clock.env())
        # Start-up housekeeping queues the claim as an orphan and the main loop offers it every tick (1 s).
        time.sleep(2.5)
        assert (model_dir / ".fork.inprogress").read_text() != "" and not (model_dir / ".fork.done").exists()
        assert '"20260101T000000Z-abcdef"' in (model_dir / ".fork.inprogress").read_text()
        assert tree_digest(model_dir / "checkpoints" / "0000") == old
        # Control: once the claimer is really gone, the same daemon adopts the claim and finishes the fork.
        live_claimer.kill()
        live_claimer.wait(10)
        view = wait_settled(model_dir, [fleet.state_dir(0)], 30)
    assert view.ok and view.outcome is not None and view.outcome["status"] == "done", view
    assert tree_digest(model_dir / "checkpoints" / "0000") == tree_digest(model_dir / "checkpoints" / "0003")


def test_shim_shifts_only_the_wall_clock(tmp_path: Path, clock: Clock) -> None:
    """The premise of the tests above: time.time moves, time.monotonic does not (as with a real clock step)."""
    clock.set(-DAY)
    code = "import time; print(time.time(), time.monotonic())"
    env = {**os.environ, **clock.env()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=10, check=True)
    wall, mono = map(float, out.stdout.split())
    assert abs(wall - (time.time() - DAY)) < 60
    assert abs(mono - time.monotonic()) < 60
