"""Load: many runs forked in bursts, re-touches of one run, and a marker still being written when a fork ends.

Promises (README "The marker"): one `.fork` file is one queued request, re-touches while a fork runs queue exactly one
more, every request is served by a fork claimed after it was written, forks of one run never overlap, and the daemon's
memory does not grow with the number of forks. bench/soak.py runs the 1,000-run version.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.support import (
    Fleet,
    HeldVllmStage,
    history,
    make_run,
    rss_kib,
    silent_server,
    slow_stage_overrides,
    wait_settled,
    write_marker_atomically,
)
from tests.support.daemon import wait_for

pytestmark = pytest.mark.timeout(150)


def ts(value: Any) -> float:
    return datetime.fromisoformat(value).timestamp() if isinstance(value, str) else float(value)


def per_run(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for h in entries:
        runs[h["model_dir"]].append(h)
    return runs


def overlapping(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    spans = sorted((ts(h["started_at"]), ts(h["finished_at"]), h["fork_id"]) for h in entries)
    return [(a[2], b[2]) for a, b in itertools.pairwise(spans) if b[0] < a[1]]


def burst(runs: list[Path], start: int, size: int, touched: dict[str, float]) -> None:
    for model_dir in runs[start : start + size]:
        touched[str(model_dir)] = time.time()
        write_marker_atomically(model_dir, "")


def check_accounting(runs: list[Path], state: Path, touched: dict[str, float], touches: dict[str, int]) -> None:
    for model_dir in runs:
        view = wait_settled(model_dir, [state], 60)
        assert view.ok, view
    by_run = per_run(history(state))
    for model_dir in runs:
        entries = by_run[str(model_dir)]
        assert 1 <= len(entries) <= touches[str(model_dir)], (model_dir, len(entries))
        # The last request was served by a fork claimed after it was written (1 ms of clock granularity).
        assert max(ts(h["started_at"]) for h in entries) >= touched[str(model_dir)] - 0.001, model_dir
        assert overlapping(entries) == [], model_dir
        assert all(h["state"] == "done" for h in entries), entries


def test_bursts_over_200_runs_account_for_every_request(tmp_path: Path) -> None:
    art = tmp_path / "art"
    runs = [make_run(art, project=f"p{i % 10}", model=f"m{i}", steps=(1, 2)) for i in range(200)]
    touched: dict[str, float] = {}
    touches: dict[str, int] = defaultdict(int)
    with Fleet(tmp_path, [art], overrides={"log": {"level": "info"}}) as fleet:
        daemon = fleet.start(0)
        assert daemon.proc is not None
        pid = daemon.proc.pid
        state = fleet.state_dir(0)
        for rnd in range(3):
            # Bursts of 100 across runs; the second half is touched again while the first bursts still run.
            for start in (0, 100, 100):
                burst(runs, start, 100, touched)
                for model_dir in runs[start : start + 100]:
                    touches[str(model_dir)] += 1
            check_accounting(runs, state, touched, touches)
            if rnd == 0:
                warm = rss_kib(pid)
        grown = rss_kib(pid) - warm
        assert len(os.listdir(f"/proc/{pid}/task")) <= 6, "idle worker threads should have exited"
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB over two rounds of 400 requests"


def test_fifty_retouches_during_a_fork_queue_exactly_one_more(tmp_path: Path) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3, 5))
    with silent_server() as url:
        held = HeldVllmStage(tmp_path, url)
        with Fleet(tmp_path, [art], overrides=held.overrides()) as fleet, held:
            fleet.start(0)
            write_marker_atomically(model_dir, "step: 5\n")
            held.wait_held()  # the first fork is in its vLLM stage until released: every re-touch lands during it
            for i in range(50):
                write_marker_atomically(model_dir, f"step: 3\nrequest_id: touch-{i}\n")
            assert (model_dir / ".fork.inprogress").exists()
            held.release()
            held.wait_held()  # the second fork, for the re-touches
            held.release()
            wait_for(lambda: len(history(fleet.state_dir(0))) >= 2, 60, "two forks")
            wait_settled(model_dir, [fleet.state_dir(0)], 30)
            entries = history(fleet.state_dir(0))
    assert [h["request"].get("request_id") for h in entries] == [None, "touch-49"]
    assert overlapping(entries) == []


def test_a_marker_still_being_written_when_a_fork_ends_is_not_claimed_half_written(tmp_path: Path) -> None:
    """`echo "step: 3" > .fork` creates an empty file, then writes; an empty marker means "the newest step"."""
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3, 5))
    with silent_server() as url, Fleet(tmp_path, [art], overrides=slow_stage_overrides(url)) as fleet:
        fleet.start(0)
        write_marker_atomically(model_dir, "step: 5\n")
        wait_for(lambda: (model_dir / ".fork.inprogress").exists(), 10, "the first claim")
        fd = os.open(model_dir / ".fork", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # the shell's `>`
        try:
            wait_for(lambda: len(history(fleet.state_dir(0))) >= 1, 20, "the first fork to end")
            os.write(fd, b"step: 3\n")
        finally:
            os.close(fd)
        wait_for(lambda: len(history(fleet.state_dir(0))) >= 2, 20, "the second fork")
        entries = history(fleet.state_dir(0))
    assert [h["request"] for h in entries] == [{"kind": "step", "step": 5}, {"kind": "step", "step": 3}]
