"""The history file under concurrency: one writer, unique temp names, mode 0600 kept (issue 18, item 5).

Promise: whatever number of forks finish at once, each gets exactly one history line, `history.jsonl` stays 0600
(it lists every run's paths and requests), and a finished fork is never rewritten as failed by the bookkeeping that
follows it. Trimming is what raced: past HISTORY_TRIM_BYTES every append rewrites the file, and workers that did so
at once shared one temp name (`IllegalTransition: done to failed` in the outcome, 0644 after the trim).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sidecar.journal import HISTORY_KEEP
from tests.reliability.support import Fleet, history, make_run, wait_settled

pytestmark = pytest.mark.timeout(120)

RUNS = 8
TRIM_BYTES = 4 * 1024 * 1024  # journal.HISTORY_TRIM_BYTES (spelt out: the test must also run on the code before it)


def seed_history(state_dir: Path) -> None:
    """A history that stays above the trim size after keeping HISTORY_KEEP lines: every append then trims."""
    state_dir.mkdir(parents=True, exist_ok=True)
    filler = "x" * (TRIM_BYTES // HISTORY_KEEP + 512)
    lines = [
        json.dumps({"fork_id": f"20250101T000000Z-{i:06x}", "status": "done", "pad": filler})
        for i in range(HISTORY_KEEP)
    ]
    path = state_dir / "history.jsonl"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def test_concurrent_forks_each_get_one_history_line_and_the_file_stays_private(tmp_path: Path) -> None:
    art = tmp_path / "art"
    runs = [make_run(art, project="p", model=f"m{i}", steps=(3,)) for i in range(RUNS)]
    with Fleet(tmp_path, [art]) as fleet:
        seed_history(fleet.state_dir(0))
        daemon = fleet.start(0)
        for model_dir in runs:
            (model_dir / ".fork").write_text("step: 3\n")
        views = [wait_settled(model_dir, [fleet.state_dir(0)], 60) for model_dir in runs]
        log = daemon.log()
    for view in views:
        assert view.ok and view.outcome is not None, view
        assert view.outcome["status"] == "done", view.outcome
    assert "IllegalTransition" not in log and "Traceback" not in log, log[-4000:]
    path = fleet.state_dir(0) / "history.jsonl"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = history(fleet.state_dir(0))
    ours = [h for h in lines if h.get("model_dir") in {str(r) for r in runs}]
    assert sorted(h["model_dir"] for h in ours) == sorted(str(r) for r in runs)
    assert {h["fork_id"] for h in ours} == {v.outcome["fork_id"] for v in views if v.outcome}
    assert all(h["state"] == "done" for h in ours), ours
    assert len(lines) <= HISTORY_KEEP
    assert not list(fleet.state_dir(0).glob("*.tmp*")) and not list(fleet.state_dir(0).glob(".*tmp*"))
