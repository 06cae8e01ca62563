"""Which runs this node serves (etcd backend): what its daemon keeps in etcd so that a fork waits for this node.

A node serves a run while a trainer agent in its runtime_dir says so (`hello`'s `runs`), a vLLM server found in its
process table was started with an adapter of the run, or a `vllm.servers` entry's `runs` globs match it. Trainers and
servers outlive the daemon (a stop, a crash, an upgrade), so what the daemon last saw is kept twice:
  PREFIX/members/NODE   under the lease, with the liveness: gone with the daemon
  PREFIX/serves/NODE    under no lease: stays while the daemon is down, so a fork published meanwhile names this node
                        as not running instead of leaving it out; rewritten (emptied) only by a survey that finds the
                        node really serves nothing of a run any more
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from sidecar.config import Config
from sidecar.protocol.client import ControlError, call_agent
from sidecar.protocol.run_layout import CHECKPOINTS
from sidecar.trainers import list_agent_sockets
from sidecar.vllm.discovery import discover_servers, run_matches

__all__ = ["Serving", "ServingSurvey"]

_HELLO_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Serving:
    runs: tuple[str, ...] = ()  # run directories (real paths) an agent or a discovered server here serves
    patterns: tuple[str, ...] = ()  # the `runs` globs of vllm.servers: a configured server may serve any of those

    def to_json(self) -> dict[str, Any]:
        return {"runs": list(self.runs), "patterns": list(self.patterns)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Serving:
        runs, patterns = value.get("runs"), value.get("patterns")
        return cls(
            tuple(str(r) for r in runs) if isinstance(runs, list) else (),
            tuple(str(p) for p in patterns) if isinstance(patterns, list) else (),
        )

    def serves(self, model_dir: str) -> bool:
        return bool({model_dir, os.path.realpath(model_dir)} & set(self.runs)) or run_matches(
            self.patterns, Path(model_dir)
        )


@dataclass
class ServingSurvey:
    """Looks again at what this node serves; an agent that does not answer keeps the runs it last named while its
    process lives (busy loading a fork, say: it still serves them)."""

    config: Config
    _agent_runs: dict[int, frozenset[str]] = field(default_factory=dict)

    def survey(self) -> Serving:
        agents = list_agent_sockets(Path(self.config.runtime_dir))
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="serves") as pool:
            answers = list(pool.map(self._runs_of, [(a.path, a.pid) for a in agents]))
        known: dict[int, frozenset[str]] = {}
        for agent, runs in zip(agents, answers, strict=True):
            if runs is None and psutil.pid_exists(agent.pid):
                runs = self._agent_runs.get(agent.pid)
            if runs is not None:
                known[agent.pid] = runs
        self._agent_runs = known
        found = {run for runs in known.values() for run in runs}
        vllm = self.config.vllm
        if vllm.discover:
            found |= set(_runs_of_paths(p for target in discover_servers() for p in target.lora_paths))
        patterns = sorted({glob for server in vllm.servers for glob in server.runs})
        return Serving(tuple(sorted(found)), tuple(patterns))

    @staticmethod
    def _runs_of(agent: tuple[Path, int]) -> frozenset[str] | None:
        path, pid = agent
        try:
            reply = call_agent(path, {"op": "hello"}, timeout=_HELLO_TIMEOUT_S, pid=pid)
        except ControlError:
            return None
        runs = reply.get("runs") if reply.get("ok") else None
        return frozenset(r for r in runs if isinstance(r, str)) if isinstance(runs, list) else None


def _runs_of_paths(paths: Iterable[Path]) -> list[str]:
    """The run directories of adapter paths a server was started with (`RUN/checkpoints/STEP`)."""
    out = []
    for path in paths:
        parts = Path(os.path.realpath(path)).parts
        if CHECKPOINTS in parts:
            out.append(str(Path(*parts[: parts.index(CHECKPOINTS)])))
    return out
