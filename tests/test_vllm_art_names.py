"""Which adapter names a fork reaches on a vLLM server ART started (sidecar/vllm_art.py), and that none is unloaded.

The whole path against the real vLLM CPU server started by ART 0.5.23's own launcher is tests/test_vllm_art.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.vllm import VllmStage
from sidecar.vllm_art import names_to_fork
from sidecar.vllm_discovery import ServerTarget
from tests.test_vllm import FAST, FakeVllm, fakes, make_config, run_dir, start_fake, swap_in

__all__ = ["fakes", "run_dir"]


@pytest.mark.parametrize(
    ("served", "newest", "expected"),
    [
        (["m@0"], 0, ["m@0"]),
        (["m@0", "m@3"], 3, ["m@3"]),  # ART's dedicated-mode name is its latest loaded step
        (["m@3"], 7, ["m@3", "m@7"]),  # shared mode asks for the newest step dir, which ART did not load
        (["m@1", "m@3"], 2, ["m@3"]),  # a step dir older than what is served changes nothing
        (["agent:active", "agent:eval@2"], 5, ["agent:active"]),  # in_flight_lora: the slot, not exact evals
        (["x@y@4", "x@y@2"], None, ["x@y@4"]),  # names may hold "@"; the step is what follows the last one
        (["ref-a", "m"], 5, []),  # not ART's naming
        (["a@1", "b@2"], 3, ["a@1", "a@3", "b@2", "b@3"]),
    ],
)
def test_names_to_fork(served: list[str], newest: int | None, expected: list[str]) -> None:
    assert names_to_fork(served, newest) == expected


def test_an_art_server_never_gets_unload_and_load(
    tmp_path: Path,
    run_dir: Path,
    fakes: list[FakeVllm],
) -> None:
    checkpoints = run_dir / "checkpoints"
    fake = start_fake(fakes, {"m@5": str(checkpoints / "0005")}, inplace=False)
    art_server = ServerTarget(fake.url, "pid 1", lora_paths=(checkpoints / "0005",), claimed=True, uid=0, art=True)
    stage = VllmStage(make_config(tmp_path, discover=True), discover=lambda: [art_server], policy=FAST)

    outcome = stage.run(swap_in(run_dir, checkpoints / "0005"))

    assert outcome.status == "failed" and "already been loaded" in (outcome.error or "")
    assert [p for _, p, _, _ in fake.requests if "lora" in p] == ["/v1/load_lora_adapter"]
    assert fake.adapters == {"m@5": str(checkpoints / "0005")}  # still there, as ART's bookkeeping says
