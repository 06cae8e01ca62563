"""Which ranks of a distributed job belong on this node, and what the claimer finds wrong with a job spread over
several nodes (pure logic, sidecar/rank_jobs.py; the real multi-node jobs are in tests/test_ranks_across_nodes.py)."""

from __future__ import annotations

from typing import Any

from sidecar.rank_jobs import RankedAgent, jobs_of, ranked_agent, split_steps, spread_problems


def test_a_single_process_trainer_is_no_job() -> None:
    assert jobs_of([ranked_agent(10, {"rank": 0, "world_size": 1}), ranked_agent(11, {})]) == []


def test_without_local_world_size_the_whole_job_is_expected_here() -> None:
    [job] = jobs_of([RankedAgent(10, 0, 4), RankedAgent(11, 2, 4)])
    assert job.to_json() == {
        "job": None,
        "world_size": 4,
        "ranks_here": [0, 2],
        "ranks_missing": [1, 3],
        "ranks_elsewhere": [],
    }


def test_torchrun_env_says_which_ranks_are_on_this_node() -> None:
    # Node 1 of 2, 4 ranks each: ranks 4-7 here; 6 is missing; 0-3 run on the other node.
    agents = [RankedAgent(20 + r, r, 8, local_rank=r - 4, local_world_size=4, job="j1") for r in (4, 5, 7)]
    [job] = jobs_of(agents)
    assert (job.job, job.missing, job.elsewhere) == ("j1", [6], [0, 1, 2, 3])


def test_two_jobs_of_one_world_size_are_told_apart_by_job_id() -> None:
    agents = [RankedAgent(1, 0, 2, job="a"), RankedAgent(2, 1, 2, job="a"), RankedAgent(3, 0, 2, job="b")]
    views = {v.job: v for v in jobs_of(agents)}
    assert views["a"].missing == [] and views["b"].missing == [1]


def test_rank_fields_that_make_no_sense_count_as_a_single_process() -> None:
    for hello in ({"rank": 3, "world_size": 2}, {"rank": -1, "world_size": 2}, {"rank": True, "world_size": 2}):
        assert ranked_agent(5, hello) == RankedAgent(5, 0, 1)


def _node(ranks: list[int], world: int, at: int | None = 5, job: str = "j1") -> dict[str, Any]:
    """A node's stages as its report carries them: one agent per rank here, torchrun's local world size known."""
    agents = [{"rank": r, "world_size": world, "job": job, "result": "loaded", "loaded_at_step": at} for r in ranks]
    first = ranks[0]
    view = jobs_of([RankedAgent(r, r, world, r - first, len(ranks), job) for r in ranks])[0]
    return {"trainers": {"status": "ok", "agents": agents, "jobs": [view.to_json()]}, "vllm": {"status": "skipped"}}


def test_a_job_whose_every_rank_some_node_reported_loading_at_one_step_is_fine() -> None:
    nodes = {"a": _node([0, 1], 4), "b": _node([2, 3], 4)}
    assert spread_problems(nodes, "/runs/m") == []


def test_ranks_no_node_reported_are_named_with_the_nodes_that_expect_them_elsewhere() -> None:
    nodes = {"a": _node([0, 1], 6), "b": _node([2, 3], 6), "gone": {"status": "missing", "error": "lease expired"}}
    [problem] = spread_problems(nodes, "/runs/m")
    assert problem.startswith(
        "ranks 4, 5 of the 6-rank job training /runs/m were reported by no node (expected on other nodes by a, b)"
    )


def test_ranks_on_different_nodes_that_loaded_at_different_steps_fail_the_fork() -> None:
    # The agreement rules this out; real ranks cannot be made to do it, so the reports are written here.
    nodes = {"a": _node([0], 2, at=5), "b": _node([1], 2, at=6)}
    assert spread_problems(nodes, "/runs/m") == [
        "the ranks of the 2-rank job j1 loaded the fork at different optimizer steps (5, 6) on different nodes"
    ]


def test_a_split_one_node_already_reported_is_not_reported_twice() -> None:
    split = _node([0, 1], 4, at=5)
    split["trainers"]["agents"][1]["loaded_at_step"] = 6
    assert split_steps(split["trainers"]["agents"]) is not None
    assert spread_problems({"a": split, "b": _node([2, 3], 4, at=5)}, "/runs/m") == []


def test_two_jobs_of_one_world_size_on_the_nodes_are_checked_apart() -> None:
    nodes = {"a": _node([0], 2, job="x"), "b": _node([1], 2, job="x"), "c": _node([0], 2, job="y")}
    [problem] = spread_problems(nodes, "/runs/m")
    assert problem.startswith(
        "rank 1 of the 2-rank job training /runs/m was reported by no node (expected on other nodes by c)"
    )


def test_a_load_answered_late_by_an_old_preload_without_its_step_is_no_split() -> None:
    agents = [
        {"rank": r, "world_size": 2, "job": "j", "result": "loaded", "loaded_at_step": at}
        for r, at in ((0, 5), (1, None))
    ]
    assert split_steps(agents) is None
    agents[1]["loaded_at_step"] = 6
    assert split_steps(agents) is not None
