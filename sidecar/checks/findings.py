"""What a doctor check reports (`Finding`) and what it looks at (`Context`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sidecar.config import Config

if TYPE_CHECKING:
    pass

__all__ = ["EXIT_OK", "EXIT_PROBLEMS", "EXIT_USAGE", "PROBE_TIMEOUT_S", "Context", "Finding", "Level", "read_int"]

Level = Literal["ok", "info", "problem"]
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
PROBE_TIMEOUT_S = 5.0
_INOTIFY = Path("/proc/sys/fs/inotify")


@dataclass(frozen=True)
class Finding:
    check: str  # which check: inotify, filesystem, runtime_dir, rename_exchange, state_dir, preload, art, agents, vllm
    level: Level
    message: str  # what was found
    fix: str | None = None  # one sentence saying what to do (problems always have one)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Context:
    """What the checks look at; tests build it with their own config, interpreters and /proc paths."""

    config: Config
    pythons: Sequence[str] = ()
    inotify_dir: Path = _INOTIFY
    proc: Path = Path("/proc")
    discover: Callable[[], list[Any]] | None = None  # vLLM discovery; default sidecar.vllm.discovery.discover_servers
    notes: dict[str, Any] = field(default_factory=dict)


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
