"""state_dir faults through the real daemon (issue 17, items 5 and 6): full or read-only, before and during a fork.

Promises: a state dir that cannot be written never makes the daemon spin or strand a claim: no fork is claimed while
it refuses writes (the marker stays `.fork`, the log says why once, the metric fork_sidecar_state_dir_writable is 0),
and the run is forked once it takes writes again. A fork that was already running when the state dir went read-only
or full ends with an outcome that says what disk and servers hold (here: done), and every claimed fork gets exactly
one history line, also across a restart.

The faults are real: state_dir is a small tmpfs mounted for the test, filled with a file (ENOSPC) or remounted
read-only (`mount -o remount,ro`, EROFS). Root is needed to mount; without it these tests are skipped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.support import Fleet, cpu_seconds, history, make_run, mounted_tmpfs, remount, settled
from tests.support.daemon import wait_for
from tests.support.fake_vllm import FakeVllm

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def state_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """The first daemon's state dir (Fleet's state0) on its own 2 MiB tmpfs."""
    with mounted_tmpfs(tmp_path / "state0", "2m") as mounted:
        if mounted is None:
            pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
        try:
            yield mounted
        finally:
            remount(mounted, "rw")


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a file until the filesystem is full (ENOSPC), then give back `leave` bytes."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:  # the last partial block
                f.write(b"\0" * 512)
    with pytest.raises(OSError) as full:
        (directory / "probe").write_bytes(b"\0" * 8192)
    assert full.value.errno == errno.ENOSPC
    (directory / "probe").unlink(missing_ok=True)
    if leave:
        os.truncate(filler, filler.stat().st_size - leave)
    return filler


def runs_in_history(state: Path, model_dir: Path) -> list[dict[str, Any]]:
    return [h for h in history(state) if h.get("model_dir") == str(model_dir)]


def wait_done(model_dir: Path, state: Path, within: float = 20) -> dict[str, Any]:
    view = wait_for(lambda: (v := settled(model_dir, [state])).ok and v, within, "the fork to settle")
    assert view.outcome is not None
    return view.outcome


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_unwritable_state_dir_leaves_the_marker_alone_then_forks_once_writable(
    tmp_path: Path, state_tmpfs: Path, fault: str
) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    with Fleet(tmp_path, [art]) as fleet:
        daemon = fleet.start(0)
        assert daemon.proc is not None
        before = len(daemon.log().splitlines())
        filler = None
        if fault == "read-only":
            assert remount(state_tmpfs, "ro"), "remount,ro refused (a writer holds a file of the state dir open)"
        else:
            filler = fill(state_tmpfs)
        (model_dir / ".fork").write_text("step: 3\n")

        def said_why() -> bool:
            lines = daemon.log().splitlines()[before:]
            return any(str(state_tmpfs) in line and ("read-only" in line or "full" in line) for line in lines)

        # The daemon has seen the marker and refused it (an event, however loaded the host), then 3 s of watching.
        wait_for(said_why, 30, f"the daemon's sentence about {state_tmpfs}")
        cpu_before = cpu_seconds(daemon.proc.pid)
        time.sleep(3.0)
        cpu = cpu_seconds(daemon.proc.pid) - cpu_before
        log = daemon.log().splitlines()[before:]
        # Nothing claimed, nothing spinning: the marker waits, one sentence names the state dir and the fix.
        assert os.path.lexists(model_dir / ".fork") and not os.path.lexists(model_dir / ".fork.inprogress")
        assert cpu < 0.5, cpu
        assert len(log) < 20 and not any("Traceback" in line for line in log), log
        if fault == "read-only":
            assert remount(state_tmpfs, "rw")
        else:
            assert filler is not None
            filler.unlink()
        outcome = wait_done(model_dir, state_tmpfs)
    assert outcome["status"] == "done", outcome
    assert len(runs_in_history(state_tmpfs, model_dir)) == 1


@pytest.mark.parametrize("filed", ["while-running", "after-restart"])
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_state_dir_lost_during_the_vllm_stage_still_ends_done_with_one_history_line(
    tmp_path: Path, state_tmpfs: Path, fault: str, filed: str
) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    root = (model_dir / "checkpoints" / "0000").resolve()
    fillers: list[Path] = []

    def break_state_dir(_: object) -> None:
        if fault == "read-only":
            assert remount(state_tmpfs, "ro")
        else:
            fillers.append(fill(state_tmpfs))

    def repair_state_dir() -> None:
        if fault == "read-only":
            assert remount(state_tmpfs, "rw")
        else:
            fillers.pop().unlink()

    server = FakeVllm({model_dir.name: str(root)}, on_load=break_state_dir).start()
    overrides = {"vllm": {"discover": False, "servers": [{"url": server.url}]}}
    try:
        with Fleet(tmp_path, [art], overrides=overrides) as fleet:
            daemon = fleet.start(0)
            (model_dir / ".fork").write_text("step: 3\n")
            outcome = wait_for(
                lambda: (v := settled(model_dir, [])).outcome and not v.markers and v.outcome, 60, "the outcome"
            )
            # What disk and the server hold: the fork, so the outcome says done.
            assert outcome["status"] == "done", outcome
            assert "internal error" not in daemon.log()
            assert server.adapters[model_dir.name].endswith(outcome["vllm"]["snapshot"])
            assert runs_in_history(state_tmpfs, model_dir) == []  # nowhere to write it yet
            if filed == "while-running":
                repair_state_dir()
                wait_for(lambda: runs_in_history(state_tmpfs, model_dir), 30, "the history line")
            fleet.close()
            if filed == "after-restart":
                repair_state_dir()
            fleet.start(0)  # a restart finds the stale record, and files it from the outcome only if not yet filed
            wait_for(lambda: not list((state_tmpfs / "forks").glob("*.json")), 30, "the journal record gone")
            wait_for(lambda: runs_in_history(state_tmpfs, model_dir), 30, "the history line")
            time.sleep(0.5)
    finally:
        server.close()
    lines = runs_in_history(state_tmpfs, model_dir)
    assert [(h["fork_id"], h["state"]) for h in lines] == [(outcome["fork_id"], "done")], lines
