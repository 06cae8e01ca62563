"""A second hold of a run (start-up leftover collection) beside a running fork must leave the fork's claim renewed."""

from __future__ import annotations

from pathlib import Path

import yaml

from sidecar import swap
from sidecar.config import load_config
from sidecar.fork_ids import new_fork_id
from sidecar.journal import Journal
from sidecar.layout import run_dir_of
from sidecar.marker import INPROGRESS
from sidecar.pipeline import ForkPipeline
from sidecar.run_io import LocalRunIO
from sidecar.rundir import open_run
from tests.support.adapters import write_adapter


def test_collecting_leftovers_beside_a_running_fork_keeps_its_claim_renewed(tmp_path: Path) -> None:
    art = tmp_path / "art"
    model_dir = art / "p" / "models" / "m"
    checkpoints = model_dir / "checkpoints"
    write_adapter(checkpoints / "0000", seed=0)
    dead_fork = new_fork_id()
    write_adapter(checkpoints / swap.staging_name(dead_fork), seed=1)  # a crashed fork's copy, known to no journal
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {"watch": {"roots": [str(art)]}, "state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "rt")}
        )
    )
    config = load_config(config_path)
    journal = Journal(config.state_dir)
    journal.lock()
    try:
        pipeline = ForkPipeline(config, journal, [])
        run = run_dir_of(model_dir, config.watch.roots)
        assert run is not None
        # A worker's fork of this run holds its claim with its own RunIO (its heartbeats renew through it).
        opened = open_run(run)
        try:
            forks_io = LocalRunIO(run, opened.fd, frozenset({0}))
            pipeline.claims.registry.hold(model_dir / INPROGRESS, forks_io, {"fork_id": "running"})
            pipeline.collect_leftovers(run, known=lambda _fork_id: False)
            assert not (checkpoints / swap.staging_name(dead_fork)).exists()  # the chore really ran in the run
            assert [(path, io) for path, io, _ in pipeline.claims.registry.items()] == [
                (model_dir / INPROGRESS, forks_io)
            ]
            pipeline.claims.release(model_dir / INPROGRESS, forks_io)
            assert pipeline.claims.registry.items() == []
        finally:
            opened.close()
    finally:
        journal.unlock()
