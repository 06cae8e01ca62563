"""Claims on the shared filesystem: taking a marker (one winner, any kind of file, never a writer's half-written
content) and telling a dead claimer from a live one."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.claims import filesystem as claims_filesystem
from sidecar.claims.filesystem import FilesystemClaims, read_claimed_marker, take_marker_at
from sidecar.config import load_config
from sidecar.marker import INPROGRESS, MARKER


@pytest.fixture
def run_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_claim_is_exclusive_and_keeps_a_queued_marker(tmp_path: Path, run_fd: int) -> None:
    (tmp_path / MARKER).write_text("step: 1")
    assert take_marker_at(run_fd)
    assert (tmp_path / INPROGRESS).read_text() == "step: 1"
    assert not (tmp_path / MARKER).exists()
    assert not take_marker_at(run_fd)  # nothing to claim
    (tmp_path / MARKER).write_text("step: 2")
    assert not take_marker_at(run_fd)  # one in progress: the new marker waits
    assert (tmp_path / MARKER).read_text() == "step: 2"
    assert (tmp_path / INPROGRESS).read_text() == "step: 1"


def test_claim_race_has_exactly_one_winner(tmp_path: Path, run_fd: int) -> None:
    for _ in range(50):
        (tmp_path / MARKER).write_text("")
        results: list[bool] = []
        barrier = threading.Barrier(4)

        def claim(barrier: threading.Barrier, results: list[bool]) -> None:
            barrier.wait()
            results.append(take_marker_at(run_fd))

        threads = [threading.Thread(target=claim, args=(barrier, results)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 1
        (tmp_path / INPROGRESS).unlink()


def test_claim_takes_directories_and_fifos_so_they_can_be_failed(tmp_path: Path, run_fd: int) -> None:
    (tmp_path / MARKER).mkdir()
    assert take_marker_at(run_fd)
    assert (tmp_path / INPROGRESS).is_dir()
    os.rmdir(tmp_path / INPROGRESS)
    os.mkfifo(tmp_path / MARKER)
    assert take_marker_at(run_fd)
    assert stat.S_ISFIFO(os.lstat(tmp_path / INPROGRESS).st_mode)


_RETOUCH_AT_UNLINK = """
import os, sys
from pathlib import Path
from sidecar.claims.filesystem import take_marker_at
run = Path(sys.argv[1])
armed = [True]

def retouch(event, args):
    # The user's `echo step: 3 > .fork`, run the moment a claim made by link()+unlink() is visible but `.fork`
    # still names the claimed file (the daemon descheduled between the two calls, as under heavy load).
    if armed[0] and event == "os.remove" and args[0] == ".fork":
        armed[0] = False
        (run / ".fork").write_text("step: 3")

sys.addaudithook(retouch)
fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
assert take_marker_at(fd)
if armed[0]:  # a claim in one step has no such moment: the same writer runs as soon as the claim exists
    (run / ".fork").write_text("step: 3")
"""


def test_a_marker_rewritten_the_moment_the_claim_appears_is_the_next_request(tmp_path: Path) -> None:
    # The flake of test_retouching_during_a_fork_queues_exactly_one_more: the test rewrote `.fork` as soon as it saw
    # `.fork.inprogress`; with link()+unlink() the rewrite truncated the claimed marker (the first fork then took
    # the newest checkpoint, or the second request) and the unlink then deleted the rewrite. The writer is placed
    # in that window by an audit hook, in a separate interpreter (audit hooks cannot be removed).
    (tmp_path / MARKER).write_text("step: 9")
    subprocess.run([sys.executable, "-c", _RETOUCH_AT_UNLINK, str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / INPROGRESS).read_text() == "step: 9"
    assert (tmp_path / MARKER).read_text() == "step: 3"


def test_a_claim_taken_between_a_writers_truncate_and_its_write_reads_what_it_wrote(
    tmp_path: Path, run_fd: int
) -> None:
    (tmp_path / MARKER).write_text("step: 9")
    writer = os.open(tmp_path / MARKER, os.O_WRONLY | os.O_TRUNC)  # `echo step: 3 > .fork`, before its write()
    assert take_marker_at(run_fd)

    def finish_writing() -> None:
        os.write(writer, b"step: 3")
        os.close(writer)

    timer = threading.Timer(0.05, finish_writing)
    timer.start()
    try:
        assert read_claimed_marker(tmp_path / MARKER, run_fd) == b"step: 3"
    finally:
        timer.join()


class _SleepLog:
    """`time` as sidecar.claims.filesystem sees it, each sleep it asks for recorded (and still slept)."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        time.sleep(seconds)


def test_an_empty_marker_just_closed_by_its_writer_is_read_at_once(
    tmp_path: Path, run_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No writer has it open (the kernel grants a read lease): no settle wait, however young the file is. Whether it
    # waited is read from the sleeps it asked for, not from a stopwatch that a loaded host can stop for 0.2 s.
    clock = _SleepLog()
    monkeypatch.setattr(claims_filesystem, "time", clock)
    (tmp_path / MARKER).write_text("")
    assert take_marker_at(run_fd)
    assert read_claimed_marker(tmp_path / MARKER, run_fd) == b""
    assert clock.slept == []  # neither the age-based wait (MARKER_SETTLE_S) nor the wait for a writer ran


@pytest.fixture
def claims(tmp_path: Path) -> FilesystemClaims:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "watch": {"roots": [str(tmp_path)]},
                "state_dir": str(tmp_path / "state"),
                "runtime_dir": str(tmp_path / "rt"),
                "timeouts": {"claim_lease": "30s"},
            }
        )
    )
    return FilesystemClaims(load_config(config))


def _claim(host: str, pid: int, beat: float, fork_id: str = "f") -> dict[str, Any]:
    return {"fork_id": fork_id, "claimed_by": {"host": host, "pid": pid}, "heartbeat_at": beat}


def test_a_claimer_on_this_host_is_gone_when_its_process_is(claims: FilesystemClaims) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not claims.claimer_gone(_claim(socket.gethostname(), child.pid, 0.0))  # no heartbeat needed
    finally:
        child.kill()
        child.wait()
    assert claims.claimer_gone(_claim(socket.gethostname(), child.pid, time.time()))
    # Our own pid: gone unless we hold that fork (a previous process that had our pid, in a container).
    assert claims.claimer_gone(_claim(socket.gethostname(), os.getpid(), time.time(), "not-ours"))
    claims.registry.hold(Path("/r/.fork.inprogress"), None, {"fork_id": "ours"})  # type: ignore[arg-type]
    assert not claims.claimer_gone(_claim(socket.gethostname(), os.getpid(), 0.0, "ours"))


def test_a_claimer_on_another_host_is_gone_when_its_heartbeat_is_older_than_the_lease(
    claims: FilesystemClaims,
) -> None:
    assert not claims.claimer_gone(_claim("elsewhere", 1, time.time() - 20))
    assert claims.claimer_gone(_claim("elsewhere", 1, time.time() - 40))
    assert claims.claimer_gone({"fork_id": "f", "claimed_by": {"host": "elsewhere"}})  # never beat
