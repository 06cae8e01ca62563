"""sidecar/preload/fsdp1_slices.py in one real process: torch, peft and FullyShardedDataParallel at world size 1
(gloo; FSDP1 runs it as NO_SHARD), through tests/support/fsdp1_world1.py. Sharded FSDP1 jobs, where each rank loads
its own slice, are tested with real 2-rank torchrun jobs in tests/test_ranks.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.support.ports import free_port
from tests.support.tiny_model import tiny_assets

pytestmark = [pytest.mark.trainer]

SCRIPT = Path(__file__).parent / "support" / "fsdp1_world1.py"


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    assets = tiny_assets()
    work = tmp_path_factory.mktemp("fsdp1")
    env = {"MASTER_PORT": str(free_port()), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(assets.base), str(assets.adapter_a), str(work)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_prompt_learning_adapter_is_refused_not_copied_into_a_tensor_peft_computed(cases: dict[str, Any]) -> None:
    # Its state dict is computed by peft (a fresh tensor): the first version copied the fork into that tensor,
    # checked the copy, and answered with the digest while the model still held the old embeddings.
    result = cases["prompt_learning"]
    assert result["error"] is not None and "computed by peft" in result["error"], result
    assert result["unchanged"], result


def test_a_model_that_was_loaded_into_is_freed_when_the_trainer_drops_it(cases: dict[str, Any]) -> None:
    # The root unit's handle refers to the model: kept as the value of a weak-key cache, it kept the model alive.
    assert cases["model_freed"] is True


def test_the_gc_search_for_a_root_unit_runs_once_per_model_even_when_there_is_none(cases: dict[str, Any]) -> None:
    assert cases["root_scans"] == 1
