"""SIGKILL of the daemon at random moments and at the terminal journal states.

Promise (README "How it stays correct"): after any SIGKILL and a restart, checkpoints/0000 is byte-identical to the
old or the new adapter (never a mix, never missing), every claimed fork ends done or failed exactly once, and no
staging or retired copy is left behind. bench/soak.py runs the random-moment trial 200+ times.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from tests.reliability.support import Fleet, crash_trial, history, journal_files, make_run
from tests.support.adapters import write_big_adapter
from tests.support.crash import crash_env
from tests.support.daemon import wait_for

pytestmark = pytest.mark.timeout(180)

BIG = 64 << 20


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_big_adapter(tmp_path_factory.mktemp("big") / "tpl", BIG, seed=9)


# Spread over the whole life of a fork on this machine (settle, claim, ~0.1 s copy, swap, outcome); seeded so a
# failure reproduces with the same delay.
DELAYS = [round(random.Random(6).uniform(0.0, 0.6), 3) for _ in range(4)]


@pytest.mark.parametrize("delay", DELAYS)
def test_sigkill_at_a_random_moment_leaves_old_or_new_and_one_outcome(
    tmp_path: Path, template: Path, delay: float
) -> None:
    trial = crash_trial(tmp_path, template, delay)
    assert trial.at_kill in ("old", "new"), trial
    assert trial.after == "new", trial
    assert trial.outcomes == 1, trial
    assert trial.status == "done", trial
    assert trial.leftovers == [] and trial.journal == [] and trial.markers == [], trial


@pytest.mark.parametrize("state", ["done", "failed"])
def test_sigkill_right_after_the_terminal_state_is_journaled(tmp_path: Path, state: str) -> None:
    """The window between journaling DONE/FAILED and appending history: the fork must still be recorded once."""
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    with Fleet(tmp_path, [art]) as fleet:
        crashing = fleet.start(0, env=crash_env(state))
        if state == "failed":  # a source that resolves but fails the adapter check while staging (journaled)
            model_file = model_dir / "checkpoints" / "0003" / "adapter_model.safetensors"
            model_file.write_bytes(model_file.read_bytes()[:20])
        (model_dir / ".fork").write_text("step: 3\n")
        assert crashing.proc is not None
        crashing.proc.wait(30)
        assert crashing.proc.returncode == -signal.SIGKILL
        crashing.kill()
        fleet.start(0)
        # The restart resumes journaled forks on worker threads after READY: wait for this run's history line.
        wait_for(
            lambda: (
                any(h.get("model_dir") == str(model_dir) for h in history(fleet.state_dir(0)))
                and not journal_files(fleet.state_dir(0))
            ),
            30,
            "the resumed fork's history line",
        )
        entries = [h for h in history(fleet.state_dir(0)) if h.get("model_dir") == str(model_dir)]
        leftover_journal = journal_files(fleet.state_dir(0))
    assert [h["state"] for h in entries] == [state], entries
    assert leftover_journal == []
