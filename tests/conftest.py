"""Shared fixtures. The expensive ones are session-scoped: the tiny model (built once, cached on disk) and one real
vLLM CPU server for every `vllm`-marked test. Without `.venv-vllm` those tests are skipped with the command to run.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.etcd_server import EtcdServer, start_etcd
from tests.support.tiny_model import TinyAssets
from tests.support.vllm_server import VLLM_VENV, VllmServer, start_vllm_server, vllm_python


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, so `-m "not etcd"` sees the marks added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # Everything that starts a real etcd is an etcd test, whether or not its author marked it.
        if "etcd_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.etcd)
    if vllm_python() is not None:
        return
    skip = pytest.mark.skip(reason=f"needs the vLLM CPU server in {VLLM_VENV}: run `make vllm-venv` (about 4 min)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def art(tmp_path: Path) -> Path:
    """An empty ART root for `{art}/PROJECT/models/MODEL` runs; a module needing a populated one overrides it."""
    path = tmp_path / "art"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def tiny_assets() -> TinyAssets:
    """The tiny Llama base and two distinct LoRA adapters (A, B), built once into `.cache/tiny-model`."""
    pytest.importorskip("peft", reason="building the tiny model needs torch, transformers and peft in .venv")
    from tests.support.tiny_model import tiny_assets as build  # torch is imported only when building

    return build()


MODEL = "m"  # the run's model name; ART serves its checkpoints/0000 as f"{MODEL}@0"


@dataclass
class VllmRun:
    """An ART run `{art}/proj/models/m` with checkpoints 0000 (= A), 0003 (= A) and 0005 (= B), and the session's
    vLLM server started as ART starts it (`m@0` = checkpoints/0000), with A and B also served as `ref-a`/`ref-b`."""

    art: Path
    model_dir: Path
    assets: TinyAssets
    logs: Path
    server: VllmServer
    starts: int = 1

    @property
    def checkpoints(self) -> Path:
        return self.model_dir / "checkpoints"

    @property
    def served_name(self) -> str:
        return f"{MODEL}@0"

    def restart(self, *, api_key: str | None = None) -> VllmServer:
        """Stop the server (if still alive) and start it again the same way, optionally requiring `api_key`."""
        self.server.stop()
        self.starts += 1
        self.server = _start(self, api_key)
        return self.server


def _start(run: VllmRun, api_key: str | None) -> VllmServer:
    return start_vllm_server(
        run.assets.base,
        lora_modules=[
            (run.served_name, run.checkpoints / "0000"),
            ("ref-a", run.assets.adapter_a),
            ("ref-b", run.assets.adapter_b),
        ],
        log_path=run.logs / f"vllm-{run.starts}.log",
        api_key=api_key,
        max_lora_rank=16,
    )


@pytest.fixture(scope="session")
def vllm_run(tiny_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmRun]:
    if vllm_python() is None:
        pytest.skip(f"needs {VLLM_VENV}: run `make vllm-venv`")
    root = tmp_path_factory.mktemp("vllm-run")
    model_dir = root / "art" / "proj" / "models" / MODEL
    checkpoints = model_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step, adapter in (
        ("0000", tiny_assets.adapter_a),
        ("0003", tiny_assets.adapter_a),
        ("0005", tiny_assets.adapter_b),
    ):
        shutil.copytree(adapter, checkpoints / step)
    logs = root / "logs"
    run = VllmRun(root / "art", model_dir, tiny_assets, logs, server=None)  # type: ignore[arg-type]
    run.server = _start(run, None)
    try:
        yield run
    finally:
        run.server.stop()


@pytest.fixture
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real, healthy single-member etcd on loopback with its own data dir (tests/support/etcd_server.py has the
    API: endpoints, kill, restart, freeze/thaw, enable_auth). Skips without `etcd`, fails under
    FORK_SIDECAR_REQUIRE_ETCD=1."""
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield server
    finally:
        server.stop()


# --- trainer-side fixtures (test_agent, test_trainers, test_art); torch is imported only when they are used ------
@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private FORK_SIDECAR_RUNTIME_DIR (short, under /tmp: Unix socket paths are limited to 108 bytes)."""
    import tempfile

    from sidecar.preload.agent import shutdown_agent

    path = Path(tempfile.mkdtemp(prefix="fs-agt-", dir="/tmp"))
    monkeypatch.setenv("FORK_SIDECAR_RUNTIME_DIR", str(path))
    shutdown_agent()
    yield path
    shutdown_agent()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run_dir(tmp_path: Path, assets: TinyAssets) -> Path:
    """An ART run: 0000 holds the forked adapter (B), the newest step 0001 the one ART would rebuild from (A).

    The requesting module supplies `assets` (TinyAssets)."""
    run = tmp_path / "art" / "proj" / "models" / "m"
    shutil.copytree(assets.adapter_b, run / "checkpoints" / "0000")
    shutil.copytree(assets.adapter_a, run / "checkpoints" / "0001")
    return run


@pytest.fixture
def model(assets: TinyAssets) -> Any:
    """The tiny Llama with adapter A as a trainable LoRA, in train mode."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(assets.base, dtype=torch.float32)
    m = PeftModel.from_pretrained(base, assets.adapter_a, is_trainable=True)
    m.train()
    return m
