"""What the vLLM stage tests share: a run, fake servers started and closed per test, a config loaded as the daemon
loads it, the real swap before the stage, and the entry point of the stub `vllm.entrypoints.openai.api_server`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import swap
from sidecar.config import Config, load_config
from sidecar.stages import ForkContext
from sidecar.vllm.client import RetryPolicy
from sidecar.vllm.discovery import parse_server_command
from tests.support.adapters import write_adapter
from tests.support.fake_vllm import FakeVllm

__all__ = [
    "FAST",
    "fakes",
    "fork_id",
    "make_config",
    "names_in",
    "run_dir",
    "serve_fake_from_argv",
    "start_fake",
    "swap_in",
]

FAST = RetryPolicy(attempts=3, initial=0.01, cap=0.02)


# --- a vLLM-shaped HTTP server (tests/support/fake_vllm.py) ----------------------------------------------------
def serve_fake_from_argv(argv: Sequence[str]) -> None:
    """Entry point of the stub `vllm.entrypoints.openai.api_server` used by the discovery test."""
    command = parse_server_command(["python", "-m", "vllm.entrypoints.openai.api_server", *argv])
    assert command is not None
    modules = argv[argv.index("--lora-modules") + 1 :]
    modules = modules[: next((i for i, m in enumerate(modules) if m.startswith("--")), len(modules))]
    adapters = dict(m.split("=", 1) for m in modules)
    FakeVllm(adapters, api_key=command.api_key, port=command.port).httpd.serve_forever()


@pytest.fixture
def fakes() -> Iterator[list[FakeVllm]]:
    started: list[FakeVllm] = []
    yield started
    for fake in started:
        fake.close()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """An ART run with checkpoints 0000 (seed 1) and 0005 (seed 2)."""
    model_dir = tmp_path / "art" / "proj" / "models" / "m"
    write_adapter(model_dir / "checkpoints" / "0000", seed=1)
    write_adapter(model_dir / "checkpoints" / "0005", seed=2)
    return model_dir


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def start_fake(fakes: list[FakeVllm], adapters: dict[str, str], **kw: Any) -> FakeVllm:
    fake = FakeVllm(adapters, **kw).start()
    fakes.append(fake)
    return fake


def make_config(tmp_path: Path, **vllm: Any) -> Config:
    """A real config file with a `vllm` section (discovery off unless asked), loaded as the daemon would."""
    path = tmp_path / "sidecar.yaml"
    data = {"watch": {"roots": [str(tmp_path / "art")]}, "vllm": {"discover": False, **vllm}}
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


_IDS = iter(range(1, 10_000))


def fork_id() -> str:
    return f"20261126T0830{next(_IDS) % 60:02d}Z-{next(_IDS):06x}"


def swap_in(model_dir: Path, source: Path, fid: str | None = None, timeout: float = 30.0) -> ForkContext:
    """Make `source` the run's checkpoints/0000 with the real swap, as the pipeline does before its stages."""
    fid = fid or fork_id()
    checkpoints = model_dir / "checkpoints"
    staged = swap.copy_to_staging(source, checkpoints, fid)
    swap.install_staging(checkpoints, fid, staged.digest, stage_inode=staged.inode)
    swap.discard_retired(checkpoints, fid)
    return ForkContext(fid, model_dir, source, staged.digest, time.monotonic() + timeout)
