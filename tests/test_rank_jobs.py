"""Which ranks of a distributed job belong on this node (pure logic, sidecar/rank_jobs.py)."""

from __future__ import annotations

from sidecar.rank_jobs import RankedAgent, jobs_of, ranked_agent


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
