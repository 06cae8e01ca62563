"""Which adapter names a fork reaches on a vLLM server ART started (vllm/art_names.py), and that none is unloaded.

The whole path against the real vLLM CPU server started by ART 0.5.23's own launcher is tests/test_vllm_art.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.vllm.art_names import names_to_fork, superseded
from sidecar.vllm.discovery import ServerTarget
from sidecar.vllm.stage import VllmStage
from tests.support.adapters import write_adapter
from tests.support.fake_vllm import FakeVllm
from tests.support.vllm_stage import FAST, fakes, make_config, run_dir, start_fake, swap_in

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


def test_a_second_fork_leaves_the_step_names_of_the_first_as_they_are(
    tmp_path: Path,
    run_dir: Path,
    fakes: list[FakeVllm],
) -> None:
    """ART pins `{model}@{step}` for rollouts and evaluations of exactly that step. The first fork's step names are
    served from its snapshot once ART has trained past them; the next fork must reach only ART's current names, not
    load its weights under the names of the steps before (which a snapshot, never written again, still serves)."""
    checkpoints = run_dir / "checkpoints"
    write_adapter(checkpoints / "0003", seed=3)
    fake = start_fake(fakes, {"m@3": str(checkpoints / "0003")})
    art_server = ServerTarget(fake.url, "pid 1", lora_paths=(checkpoints / "0003",), claimed=True, uid=0, art=True)
    stage = VllmStage(make_config(tmp_path, discover=True), discover=lambda: [art_server], policy=FAST)

    first = stage.run(swap_in(run_dir, checkpoints / "0005"))  # ART forked into step 5
    assert first.status == "ok", first.error
    first_snapshot = str(checkpoints / str(first.detail["snapshot"]))
    assert fake.adapters == {"m@3": first_snapshot, "m@5": first_snapshot}

    write_adapter(checkpoints / "0006", seed=6)  # ART trains step 6 and serves it under its own new name
    fake.adapters["m@6"] = str(checkpoints / "0006")
    write_adapter(checkpoints / "0007", seed=7)  # then forks again, into step 7
    second = stage.run(swap_in(run_dir, checkpoints / "0007"))

    assert second.status == "ok", second.error
    second_snapshot = str(checkpoints / str(second.detail["snapshot"]))
    assert fake.adapters == {
        "m@3": first_snapshot,
        "m@5": first_snapshot,  # step 5's weights, as ART expects for that name
        "m@6": second_snapshot,
        "m@7": second_snapshot,
    }
    assert (checkpoints / str(first.detail["snapshot"])).is_dir()  # still served: never collected


def test_a_second_fork_before_art_trains_again_reaches_the_names_the_first_reached(
    tmp_path: Path,
    run_dir: Path,
    fakes: list[FakeVllm],
) -> None:
    """Until ART loads a newer step itself, the step name it asks for in dedicated mode is still the one the first
    fork reloaded from its snapshot (ART's `_latest_step` does not move on a fork): the second fork reaches it too."""
    checkpoints = run_dir / "checkpoints"
    write_adapter(checkpoints / "0003", seed=3)
    fake = start_fake(fakes, {"m@3": str(checkpoints / "0003")})
    art_server = ServerTarget(fake.url, "pid 1", lora_paths=(checkpoints / "0003",), claimed=True, uid=0, art=True)
    stage = VllmStage(make_config(tmp_path, discover=True), discover=lambda: [art_server], policy=FAST)

    assert stage.run(swap_in(run_dir, checkpoints / "0005")).status == "ok"
    write_adapter(checkpoints / "0007", seed=7)
    second = stage.run(swap_in(run_dir, checkpoints / "0007"))

    assert second.status == "ok", second.error
    snapshot = str(checkpoints / str(second.detail["snapshot"]))
    assert fake.adapters == {"m@3": snapshot, "m@5": snapshot, "m@7": snapshot}


@pytest.mark.parametrize(
    ("from_snapshots", "from_step_dirs", "expected"),
    [
        (["m@3", "m@5"], ["m@6"], ["m@3", "m@5"]),
        (["m@3", "m@5"], ["m@1"], []),  # ART has loaded nothing newer: any of them may be its current name
        (["m@3", "m@7"], ["m@5"], ["m@3"]),
        (["m@3", "ref", "m:active"], ["m@6", "other@9"], ["m@3"]),
    ],
)
def test_superseded(from_snapshots: list[str], from_step_dirs: list[str], expected: list[str]) -> None:
    assert superseded(from_snapshots, from_step_dirs) == expected
