"""Which torch.distributed jobs the agents serving a run belong to, and which of their ranks this node lacks.

Every agent's hello carries `rank` and `world_size` (0 and 1 for a single-process trainer) and, under a launcher
such as torchrun, `local_rank` and `local_world_size`; after its first agreed step also `job` (an id rank 0 put into
the job's store, the same on every node). The ranks of a job load a fork only together (sidecar/preload/
rank_agreement.py), so telling some of them while another rank expected on this node is missing only makes them
wait out their timeout: the trainers stage checks first and fails with one sentence naming the missing ranks.

Which ranks belong on this node: with `local_world_size` L and the node's first rank (rank - local_rank, the same
for every rank here), ranks first .. first+L-1; without it (torch.multiprocessing.spawn, a hand-written launcher)
every rank of the job is expected here. The others are "elsewhere": each node's daemon tells its own ranks, and the
several-nodes coordination merges the per-node `jobs` entries of the outcome (same `job`, disjoint `ranks_here`).
Pure logic: no I/O, so it is tested without processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobView", "RankedAgent", "jobs_of", "ranked_agent"]


@dataclass(frozen=True)
class RankedAgent:
    pid: int
    rank: int
    world_size: int
    local_rank: int | None = None
    local_world_size: int | None = None
    job: str | None = None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def ranked_agent(pid: int, hello: Mapping[str, Any]) -> RankedAgent:
    """The rank fields of a hello reply; an agent that sends none (a preload older than ranks) is rank 0 of 1."""
    rank, world = _int(hello.get("rank")), _int(hello.get("world_size"))
    if rank is None or world is None or world < 1 or rank >= world:
        rank, world = 0, 1
    job = hello.get("job")
    return RankedAgent(
        pid,
        rank,
        world,
        _int(hello.get("local_rank")),
        _int(hello.get("local_world_size")),
        job if isinstance(job, str) and job else None,
    )


@dataclass
class JobView:
    """One distributed job as this node sees it."""

    world_size: int
    job: str | None
    here: dict[int, int] = field(default_factory=dict)  # rank -> pid
    expected_here: list[int] = field(default_factory=list)
    local_world_size: int | None = None

    @property
    def missing(self) -> list[int]:
        return [r for r in self.expected_here if r not in self.here]

    @property
    def elsewhere(self) -> list[int]:
        expected = set(self.expected_here)
        return [r for r in range(self.world_size) if r not in expected]

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "world_size": self.world_size,
            "ranks_here": sorted(self.here),
            "ranks_missing": self.missing,
            "ranks_elsewhere": self.elsewhere,
        }


def jobs_of(agents: Iterable[RankedAgent]) -> list[JobView]:
    """The distributed jobs (world_size > 1) among `agents`, grouped by world size; by job id as well where one
    world size holds the same rank twice (two jobs training one run)."""
    by_world: dict[int, list[RankedAgent]] = {}
    for agent in agents:
        if agent.world_size > 1:
            by_world.setdefault(agent.world_size, []).append(agent)
    groups: list[list[RankedAgent]] = []
    for members in by_world.values():
        ranks = [a.rank for a in members]
        if len(ranks) == len(set(ranks)):
            groups.append(members)
            continue
        by_job: dict[str | None, list[RankedAgent]] = {}
        for a in members:
            by_job.setdefault(a.job, []).append(a)
        groups += list(by_job.values())
    return [_view(members) for members in groups]


def _view(members: list[RankedAgent]) -> JobView:
    world = members[0].world_size
    jobs = {a.job for a in members if a.job}
    view = JobView(world, next(iter(jobs)) if len(jobs) == 1 else None)
    for a in members:
        view.here.setdefault(a.rank, a.pid)
    local = {a.local_world_size for a in members if a.local_world_size}
    firsts = {a.rank - a.local_rank for a in members if a.local_rank is not None}
    if len(local) == 1 and len(firsts) == 1:
        view.local_world_size = next(iter(local))
        first = next(iter(firsts))
        view.expected_here = [r for r in range(first, first + view.local_world_size) if r < world]
    else:
        view.expected_here = list(range(world))
    return view
