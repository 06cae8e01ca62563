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

from sidecar.protocol.messages import RESULT_LOADED

__all__ = ["JobView", "RankedAgent", "jobs_of", "ranked_agent", "split_steps", "spread_problems"]


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


def split_steps(agents: Iterable[Mapping[str, Any]]) -> str | None:
    """A sentence when the ranks of one job (trainers stage agent entries) report different `loaded_at_step`s, which
    the agreement should rule out; None when they agree."""
    steps: dict[tuple[str | None, int], set[object]] = {}
    for a in agents:
        world = a.get("world_size", 1)
        # A preload too old to record the step of a load answered late says nothing of it: not a split.
        at = a.get("loaded_at_step")
        if isinstance(world, int) and world > 1 and a.get("result") == RESULT_LOADED and at is not None:
            steps.setdefault((a.get("job"), world), set()).add(at)
    for (job, world), seen in steps.items():
        if len(seen) > 1:
            shown = ", ".join(sorted(map(str, seen)))
            name = f" {job}" if job else ""
            return f"the ranks of the {world}-rank job{name} loaded the fork at different optimizer steps ({shown})"
    return None


def spread_problems(nodes: Mapping[str, Mapping[str, Any]], model_dir: object) -> list[str]:
    """What the claimer finds wrong with the jobs whose ranks are spread over several nodes, from every node's
    trainers stage (the outcome's `nodes`): ranks that no node reported, and ranks on different nodes that loaded
    at different optimizer steps. Each node's stage has already checked its own ranks (missing here, one step)."""
    trainers = {node: stages.get("trainers") or {} for node, stages in nodes.items() if isinstance(stages, Mapping)}
    problems = []
    for (world, _), entries in _spread_jobs(trainers).items():
        reported = {rank for _, job in entries for rank in _ranks(job, "ranks_here") + _ranks(job, "ranks_missing")}
        unseen = [rank for rank in range(world) if rank not in reported]
        if unseen:
            waiting = sorted({node for node, job in entries if _ranks(job, "ranks_elsewhere")})
            ranks = ", ".join(map(str, unseen))
            problems.append(
                f"rank{'s' if len(unseen) > 1 else ''} {ranks} of the {world}-rank job training {model_dir} "
                f"{'were' if len(unseen) > 1 else 'was'} reported by no node (expected on other nodes by "
                f"{', '.join(waiting)}), so the ranks that were told could not load it: on the node that runs "
                f"{'them' if len(unseen) > 1 else 'it'}, fork-sidecar is not running with coordination.backend: etcd, "
                "or its agent did not answer (that node's entry and `fork-sidecar status` there say which); fix "
                "that, then fork again"
            )
    agents = [a for t in trainers.values() for a in t.get("agents") or [] if isinstance(a, Mapping)]
    if len({node for node, t in trainers.items() if t.get("agents")}) > 1 and all(
        split_steps(t.get("agents") or []) is None for t in trainers.values()
    ):
        split = split_steps(agents)
        if split is not None:
            problems.append(f"{split} on different nodes")
    return problems


def _spread_jobs(
    trainers: Mapping[str, Mapping[str, Any]],
) -> dict[tuple[int, str | None], list[tuple[str, Mapping[str, Any]]]]:
    """(world size, job id where needed) -> (node, its `jobs` entry), for the jobs some node expects ranks of
    elsewhere."""
    by_world: dict[int, list[tuple[str, Mapping[str, Any]]]] = {}
    for node, stage in sorted(trainers.items()):
        for job in stage.get("jobs") or []:
            world = job.get("world_size") if isinstance(job, Mapping) else None
            if isinstance(world, int) and world > 1:
                by_world.setdefault(world, []).append((node, job))
    groups: dict[tuple[int, str | None], list[tuple[str, Mapping[str, Any]]]] = {}
    for world, entries in by_world.items():
        here = [rank for _, job in entries for rank in _ranks(job, "ranks_here")]
        clash = len(here) != len(set(here))  # two jobs of one world size train the run: tell them apart by id
        for node, job in entries:
            groups.setdefault((world, job.get("job") if clash else None), []).append((node, job))
    return {key: e for key, e in groups.items() if any(_ranks(job, "ranks_elsewhere") for _, job in e)}


def _ranks(job: Mapping[str, Any], key: str) -> list[int]:
    value = job.get(key)
    return [r for r in value if isinstance(r, int)] if isinstance(value, list) else []
