"""An event storm inside watched runs (training writing checkpoints and trajectories) must not stall the daemon.

The CI version checks responsiveness only: forks of the storming runs are claimed and done during the storm. The CPU
(< 5 %) and claim-latency (p99 < 5 ms) targets are measured by bench/soak.py, against an idle baseline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.support import Fleet, Storm, make_run, wait_settled, write_marker_atomically

pytestmark = pytest.mark.timeout(60)


def test_daemon_stays_responsive_during_a_storm(tmp_path: Path) -> None:
    art = tmp_path / "art"
    runs = [make_run(art, project="p", model=f"m{i}", steps=(3,)) for i in range(5)]
    with Fleet(tmp_path, [art], overrides={"log": {"level": "info"}}) as fleet:
        fleet.start(0)
        with Storm(runs, per_minute=60_000) as storm:  # 1,000 files/s, six times the soak's rate
            for model_dir in runs:
                write_marker_atomically(model_dir, "step: 3\n")
                view = wait_settled(model_dir, [fleet.state_dir(0)], 15)
                assert view.ok and view.outcome is not None and view.outcome["status"] == "done", view
        assert storm.written > 100
        assert fleet.daemons[0].proc is not None and fleet.daemons[0].proc.poll() is None
