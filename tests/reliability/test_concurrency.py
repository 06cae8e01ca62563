"""Concurrent writers and several daemons sharing roots (a cluster on one shared filesystem, simulated on one host).

Promises: ART writing new steps while forks swap 0000 is not disturbed; with several daemons (own state dirs) on the
same roots every marker is claimed by exactly one and every fork is done exactly once; a daemon that dies mid-fork
leaves a `.fork.inprogress` that another daemon takes over (on one host a dead claimer pid is adoptable at once).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.support import (
    Fleet,
    history,
    journal_files,
    leftovers,
    make_run,
    tree_digest,
    wait_settled,
    write_marker_atomically,
)
from tests.support.adapters import write_adapter
from tests.support.crash import crash_env, held_at, hold_env
from tests.support.daemon import wait_for

pytestmark = pytest.mark.timeout(120)


def all_history(fleet: Fleet, n: int) -> list[dict[str, Any]]:
    return [h for i in range(n) for h in history(fleet.state_dir(i))]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, [tmp_path / "art"], overrides={"timeouts": {"orphan_claim": "1s"}}) as f:
        yield f


def test_art_writing_new_steps_while_forks_swap_0000(tmp_path: Path, fleet: Fleet) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3, 5))
    checkpoints = model_dir / "checkpoints"
    written: dict[str, str | None] = {}
    stop = threading.Event()

    def art_trainer() -> None:  # writes step dirs file by file, as ART's save does, until the forks are over
        step = 10
        while not stop.is_set() and step < 400:
            name = f"{step:04d}"
            write_adapter(checkpoints / name, seed=step, extra_files={"trainer_state.json": "{}" * 1000})
            written[name] = tree_digest(checkpoints / name)
            step += 1

    writer = threading.Thread(target=art_trainer, daemon=True)
    fleet.start(0)
    writer.start()
    try:
        for i in range(12):
            step = 3 if i % 2 else 5
            # Atomically: a half-written marker is another test's subject (test_load.py).
            write_marker_atomically(model_dir, f"step: {step}\n")
            view = wait_settled(model_dir, [fleet.state_dir(0)], 30)
            assert view.outcome is not None and view.outcome["status"] == "done", view
            assert tree_digest(checkpoints / "0000") == tree_digest(checkpoints / f"{step:04d}"), (i, view.outcome)
            (model_dir / ".fork.done").unlink()
    finally:
        stop.set()
        writer.join(30)
    assert len(written) > 5
    for name, digest in written.items():
        assert tree_digest(checkpoints / name) == digest, f"{name} changed under the forks"
    assert len(history(fleet.state_dir(0))) == 12


def test_three_daemons_on_shared_roots_fork_each_marker_exactly_once(tmp_path: Path, fleet: Fleet) -> None:
    art = tmp_path / "art"
    runs = [make_run(art, project=f"p{i % 3}", model=f"m{i}", steps=(i + 1,)) for i in range(30)]
    for i in range(3):
        fleet.start(i)
    for model_dir in runs:
        (model_dir / ".fork").write_text("")
    states = [fleet.state_dir(i) for i in range(3)]
    for i, model_dir in enumerate(runs):
        view = wait_settled(model_dir, states, 30)
        assert view.ok and view.outcome is not None and view.outcome["status"] == "done", view
        assert tree_digest(model_dir / "checkpoints" / "0000") == tree_digest(
            model_dir / "checkpoints" / f"{i + 1:04d}"
        )
    entries = all_history(fleet, 3)
    per_run = {str(r): sum(1 for h in entries if h["model_dir"] == str(r)) for r in runs}
    assert set(per_run.values()) == {1}, {k: v for k, v in per_run.items() if v != 1}


def crash_one_mid_fork(tmp_path: Path, fleet: Fleet, while_it_holds_the_claim: Callable[[], object] = list) -> Path:
    """Daemon 0 claims a fork and dies after staging it. `while_it_holds_the_claim` runs once daemon 0's claim is
    journaled and before it goes on (a peer started there cannot take the marker itself: it sees the claim)."""
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    gate = tmp_path / "claimed-gate"
    crashing = fleet.start(0, env={**crash_env("staged"), **hold_env("claimed", gate)})
    (model_dir / ".fork").write_text("step: 3\n")
    wait_for(held_at(gate).exists, 30, "daemon 0 to claim the fork")
    while_it_holds_the_claim()
    gate.touch()
    assert crashing.proc is not None
    crashing.proc.wait(30)
    crashing.kill()
    assert (model_dir / ".fork.inprogress").exists()
    assert any(n.startswith(".fork-stage-") for n in leftovers(model_dir))
    return model_dir


def assert_taken_over_once(fleet: Fleet, model_dir: Path, n: int) -> None:
    states = [fleet.state_dir(i) for i in range(n)]
    # Lease (orphan_claim 1s) + a rescan tick, bounded well below claim_lease (120 s), which must not be waited out.
    view = wait_settled(model_dir, states[1:], 30)
    assert view.outcome is not None and view.outcome["status"] == "done", view
    assert tree_digest(model_dir / "checkpoints" / "0000") == tree_digest(model_dir / "checkpoints" / "0003")
    assert view.markers == [] and view.leftovers == [], view
    assert len([h for h in all_history(fleet, n) if h["model_dir"] == str(model_dir)]) == 1


def test_a_daemon_started_after_a_peer_died_mid_fork_takes_the_claim_over(tmp_path: Path, fleet: Fleet) -> None:
    model_dir = crash_one_mid_fork(tmp_path, fleet)
    fleet.start(1)
    assert_taken_over_once(fleet, model_dir, 2)


def test_a_running_daemon_takes_over_the_claim_of_a_peer_that_died(tmp_path: Path, fleet: Fleet) -> None:
    # Already running when its peer dies; started once the peer holds the claim: started before, on a slow machine
    # it could see the marker as soon as the peer and take the fork itself (then nothing dies, and the test hangs).
    model_dir = crash_one_mid_fork(tmp_path, fleet, lambda: fleet.start(1))
    assert_taken_over_once(fleet, model_dir, 2)


def test_the_dead_claimer_coming_back_does_not_fork_again(tmp_path: Path, fleet: Fleet) -> None:
    model_dir = crash_one_mid_fork(tmp_path, fleet)
    fleet.start(1)
    states = [fleet.state_dir(0), fleet.state_dir(1)]
    wait_settled(model_dir, states[1:], 30)
    fleet.start(0)  # the node comes back with its journal
    wait_for(lambda: journal_files(states[0]) == [], 30, "the returning daemon to drop its stale record")
    view = wait_settled(model_dir, states, 30)
    entries = [h for h in all_history(fleet, 2) if h["model_dir"] == str(model_dir)]
    assert [h["state"] for h in entries] == ["done"], entries
    assert view.leftovers == [], view
