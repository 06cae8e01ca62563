"""The ART integration: a stand-in with ART's surface here, and the real `UnslothService` in its own venv.

The stand-in mirrors openpipe-art 0.5.18: a dataclass whose `_state` is a cached_property that builds the PEFT model
from the newest step checkpoint (what ART does through Unsloth), async-generator training entries that call each
other, and a context with a background training task. The real class runs in each supported ART's venv
(tests/support/art_venvs.py: openpipe-art 0.5.18 on Python 3.11, 0.5.23 on Python 3.12):
`test_real_art_in_its_own_venv` installs the preload into a venv chained to it and runs the `real_art` tests of this
file there, through the real `.pth` hook, with the GPU-only parts of ART replaced by tests/support/cpu_art.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import os
import pickle
import subprocess
import sys
import threading
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from sidecar.preload import art  # noqa: E402
from sidecar.preload.peft_load import digest_of, read_checkpoint  # noqa: E402
from sidecar.protocol.client import call_agent  # noqa: E402
from sidecar.protocol.messages import ForkRequest  # noqa: E402
from sidecar.protocol.paths import agent_socket_path  # noqa: E402
from tests.support import cpu_art  # noqa: E402
from tests.support.art_venvs import ART_VERSIONS, art_python  # noqa: E402
from tests.support.tiny_model import TinyAssets, tiny_assets  # noqa: E402
from tests.support.venvs import chained_venv, install_preload, purelib  # noqa: E402

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[1]
IN_REAL_ART = os.environ.get("FORK_SIDECAR_REAL_ART") == "1"
TOKENS = torch.arange(3, 19).reshape(1, 16)


@pytest.fixture(scope="module")
def assets() -> TinyAssets:
    if IN_REAL_ART:  # built by the outer test with the dev venv's transformers; just read here
        return TinyAssets(*(Path(os.environ[f"FORK_SIDECAR_TINY_{k}"]) for k in ("BASE", "A", "B")))
    return tiny_assets()


def adapter_digest(checkpoint: Path) -> str:
    """The checkpoint's adapter digest as the trainer side computes it: the inner tests run where the preload is
    installed, and that copy holds only `sidecar/preload` and `sidecar/protocol`, not the daemon's `sidecar.adapter`."""
    digest = digest_of(read_checkpoint(checkpoint))
    assert digest is not None, f"{checkpoint} could not be read"
    return digest


def lora(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def equals_file(weights: dict[str, Any], checkpoint: Path) -> bool:
    expected = load_file(str(checkpoint / "adapter_model.safetensors"))
    return weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


def newest_step(output_dir: str) -> str:
    steps = sorted(p for p in Path(output_dir, "checkpoints").iterdir() if p.name.isdigit() and p.name != "0000")
    return str(steps[-1])


def build_peft(base_dir: Path, adapter: str) -> Any:
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    model.train()
    return model


def fork(runtime_dir: Path, run_dir: Path, fork_id: str = "fork-1", pid: int | None = None) -> dict[str, Any]:
    """What the daemon's trainers stage sends the agent of process `pid` (default: this one)."""
    pid = pid or os.getpid()
    ckpt = run_dir / "checkpoints" / "0000"
    message = ForkRequest(fork_id, str(run_dir), str(ckpt), adapter_digest(ckpt), 10.0).to_message()
    return call_agent(agent_socket_path(runtime_dir, os.geteuid(), pid), message, timeout=30, pid=pid)


def status(runtime_dir: Path, pid: int | None = None) -> dict[str, Any]:
    pid = pid or os.getpid()
    return call_agent(agent_socket_path(runtime_dir, os.geteuid(), pid), {"op": "status"}, timeout=10, pid=pid)


# --- the stand-in ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    """Like ART's UnslothTrainContext: the PEFT model, a trainer with an optimizer, a background training task."""

    peft_model: Any
    trainer: Any
    train_task: asyncio.Task[None] | None = None
    stopped: bool = False

    async def stop_background_training(self) -> None:
        task, self.train_task = self.train_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.stopped = True


async def forever() -> None:
    """ART's background training task waits on its input queue between training calls."""
    await asyncio.Event().wait()


def make_service_module(assets: TinyAssets) -> types.ModuleType:
    """A fresh module with a fresh UnslothService-like class (patching is per class, so each test gets its own)."""
    module = types.ModuleType(f"standin_art_{id(object())}")
    builds: list[str] = []

    @dataclasses.dataclass
    class UnslothService:
        model_name: str
        base_model: str
        config: dict[str, Any]
        output_dir: str
        starts: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)

        @functools.cached_property
        def _state(self) -> Context:
            checkpoint = newest_step(self.output_dir)  # what ART's get_last_checkpoint_dir gives Unsloth
            builds.append(checkpoint)
            model = build_peft(assets.base, checkpoint)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            return Context(model, types.SimpleNamespace(optimizer=optimizer))

        async def train(self, steps: int = 1) -> AsyncIterator[dict[str, float]]:
            async for result in self._train_dedicated(steps):
                yield result

        async def _train_dedicated(self, steps: int) -> AsyncIterator[dict[str, float]]:
            state = self._state
            if state.train_task is None:
                state.train_task = asyncio.get_running_loop().create_task(forever())
            for _ in range(steps):
                self.starts.append(lora(state.peft_model))
                loss = state.peft_model(input_ids=TOKENS, labels=TOKENS).loss
                loss.backward()
                state.trainer.optimizer.step()
                state.trainer.optimizer.zero_grad(set_to_none=True)
                yield {"loss": float(loss)}

        async def _train_shared(self, steps: int) -> AsyncIterator[dict[str, float]]:
            async for result in self._train_dedicated(steps):
                yield result

    UnslothService.__module__ = module.__name__
    UnslothService.__qualname__ = "UnslothService"
    module.UnslothService = UnslothService  # type: ignore[attr-defined]
    module.builds = builds  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module  # so pickle finds the class
    return module


@pytest.fixture
def service_module(assets: TinyAssets) -> Iterator[types.ModuleType]:
    module = make_service_module(assets)
    art.on_art_service(module)
    yield module
    sys.modules.pop(module.__name__, None)


def new_service(module: types.ModuleType, run_dir: Path) -> Any:
    return module.UnslothService(model_name="m", base_model="base", config={}, output_dir=str(run_dir))


def train(service: Any, steps: int = 1) -> list[dict[str, float]]:
    async def consume() -> list[dict[str, float]]:
        return [r async for r in service.train(steps)]

    return asyncio.run(consume())


@pytest.mark.skipif(IN_REAL_ART, reason="stand-in tests run in the dev venv")
class TestStandIn:
    def test_patch_keeps_the_methods_kind_and_signature(self, assets: TinyAssets) -> None:
        module = make_service_module(assets)
        originals = {n: module.UnslothService.__dict__[n] for n in ("train", "_train_dedicated", "_train_shared")}
        assert art.patch_service_class(module.UnslothService)
        assert art.patch_service_class(module.UnslothService)  # idempotent
        for name, original in originals.items():
            patched = getattr(module.UnslothService, name)
            assert patched is not original and inspect.isasyncgenfunction(patched)
            assert inspect.signature(patched) == inspect.signature(original)

    def test_instances_are_tracked_without_building_state(
        self, runtime_dir: Path, run_dir: Path, service_module: types.ModuleType
    ) -> None:
        service = new_service(service_module, run_dir)
        hello = status(runtime_dir)
        assert hello["runs"] == [str(run_dir.resolve())] and hello["kinds"] == ["art"]
        assert hello["targets"][0]["services"][0]["state_built"] is False
        assert "_state" not in service.__dict__ and service_module.builds == []

    def test_fork_before_the_state_exists_loads_when_art_builds_it(
        self, runtime_dir: Path, run_dir: Path, service_module: types.ModuleType
    ) -> None:
        service = new_service(service_module, run_dir)
        reply = fork(runtime_dir, run_dir)
        assert reply["ok"] and reply["result"] == "load pending" and reply["state"] == "not built"
        assert service_module.builds == []  # the fork did not build the state
        train(service, steps=2)
        assert service_module.builds == [str(run_dir / "checkpoints" / "0001")]  # ART rebuilt from its newest step
        assert equals_file(service.starts[0], run_dir / "checkpoints" / "0000")  # ... but trained from the fork
        assert not equals_file(service.starts[1], run_dir / "checkpoints" / "0000")
        deferred = status(runtime_dir)["recent"][-1]
        assert deferred["fork_id"] == "fork-1" and deferred["result"] == "loaded" and deferred["deferred"]
        assert deferred["digest"] == adapter_digest(run_dir / "checkpoints" / "0000")

    def test_fork_drops_a_built_state_and_the_next_training_reloads(
        self, runtime_dir: Path, run_dir: Path, service_module: types.ModuleType
    ) -> None:
        service = new_service(service_module, run_dir)
        train(service)
        reply = fork(runtime_dir, run_dir)
        assert reply["message"] == "state dropped, load pending" and reply["state"] == "dropped"
        assert "_state" not in service.__dict__
        train(service)
        assert len(service_module.builds) == 2
        assert equals_file(service.starts[-1], run_dir / "checkpoints" / "0000")
        targets = status(runtime_dir)["targets"][0]["services"][0]
        assert targets["last_load"]["result"] == "loaded" and targets["pending"] is None

    def test_fork_during_a_training_call_drops_the_state_when_it_returns(
        self, runtime_dir: Path, run_dir: Path, service_module: types.ModuleType
    ) -> None:
        service = new_service(service_module, run_dir)

        async def scenario() -> dict[str, Any]:
            gen = service.train(3)
            await gen.__anext__()  # mid-call: one step done, two to go
            reply = await asyncio.to_thread(fork, runtime_dir, run_dir)
            assert "_state" in service.__dict__  # still training on it
            async for _ in gen:
                pass
            return reply

        reply = asyncio.run(scenario())
        assert reply["state"] == "drop deferred until the running training call returns"
        assert "_state" not in service.__dict__
        train(service)
        assert equals_file(service.starts[-1], run_dir / "checkpoints" / "0000")

    def test_background_task_on_another_thread_is_stopped_on_its_loop(
        self, runtime_dir: Path, run_dir: Path, service_module: types.ModuleType
    ) -> None:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            service = new_service(service_module, run_dir)

            async def one_step() -> None:
                async for _ in service.train(1):
                    pass

            asyncio.run_coroutine_threadsafe(one_step(), loop).result(60)
            state = service.__dict__["_state"]
            assert state.train_task is not None and not state.train_task.done()
            assert fork(runtime_dir, run_dir)["state"] == "dropped"
            assert state.stopped and state.train_task is None
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

    def test_a_broken_checkpoint_is_reported_and_training_goes_on(
        self, runtime_dir: Path, run_dir: Path, service_module: types.ModuleType, caplog: pytest.LogCaptureFixture
    ) -> None:
        service = new_service(service_module, run_dir)
        fork(runtime_dir, run_dir, fork_id="fork-broken")
        broken = run_dir / "checkpoints" / "0000" / "adapter_model.safetensors"
        broken.write_bytes(broken.read_bytes()[:100])
        train(service)  # not raised into ART
        assert equals_file(service.starts[0], run_dir / "checkpoints" / "0001")
        deferred = status(runtime_dir)["recent"][-1]
        assert deferred["fork_id"] == "fork-broken" and deferred["result"] == "load failed"
        assert "damaged" in deferred["error"]
        assert "fork fork-broken: load failed" in caplog.text

    def test_a_newer_fork_replaces_a_pending_one(
        self, runtime_dir: Path, run_dir: Path, service_module: types.ModuleType
    ) -> None:
        service = new_service(service_module, run_dir)
        fork(runtime_dir, run_dir, fork_id="old")
        fork(runtime_dir, run_dir, fork_id="new")
        train(service)
        loads = [r for r in status(runtime_dir)["recent"] if r.get("deferred")]
        assert [r["fork_id"] for r in loads] == ["new"]

    def test_unpickled_instances_are_tracked(
        self, runtime_dir: Path, run_dir: Path, service_module: types.ModuleType
    ) -> None:
        # ART's shared mode pickles the service into a spawned child: __init__ never runs there.
        copy = pickle.loads(pickle.dumps(new_service(service_module, run_dir)))
        assert copy in art.tracked_services()
        assert fork(runtime_dir, run_dir)["services"] >= 1

    def test_preload_off_leaves_art_alone(self, assets: TinyAssets, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("FORK_SIDECAR_PRELOAD", "0")
        module = make_service_module(assets)
        art.on_art_service(module)
        assert not module.UnslothService.__dict__.get("__fork_sidecar_patched__")
        assert isinstance(module.UnslothService.__dict__["_state"], functools.cached_property)

    def test_an_unknown_layout_is_left_alone(self, caplog: pytest.LogCaptureFixture) -> None:
        @dataclasses.dataclass
        class UnslothService:
            output_dir: str

            @property
            def _state(self) -> None:
                return None

        assert art.patch_service_class(UnslothService) is False
        assert isinstance(UnslothService.__dict__["_state"], property)


# --- the real class (inside .venv-art) ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(IN_REAL_ART, reason="this is the outer test")
@pytest.mark.parametrize("version", ART_VERSIONS)
def test_real_art_in_its_own_venv(version: str, tmp_path: Path, assets: TinyAssets) -> None:
    art_python_ = art_python(version)
    python = chained_venv(tmp_path / "venv", purelib(art_python_), base=art_python_)
    install = install_preload(python)
    assert install.returncode == 0, install.stderr
    (purelib(python) / "zz_cpu_art.pth").write_text(cpu_art.pth_line())  # after the preload's own .pth
    env = {
        **os.environ,
        "FORK_SIDECAR_REAL_ART": "1",
        "FORK_SIDECAR_TINY_BASE": str(assets.base),
        "FORK_SIDECAR_TINY_A": str(assets.adapter_a),
        "FORK_SIDECAR_TINY_B": str(assets.adapter_b),
        "PYTHONDONTWRITEBYTECODE": "1",
        "WANDB_MODE": "disabled",
    }
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-k", "real_art and not own_venv", "-v"]
    done = subprocess.run(
        [str(python), *args, str(Path(__file__))], cwd=REPO, env=env, capture_output=True, text=True, timeout=840
    )
    failures = done.stdout[done.stdout.find("= FAILURES =") :]  # the inner tracebacks, not its progress output
    assert done.returncode == 0, failures[:8000] + done.stderr[-3000:]
    assert "4 passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-3000:]


real_art = pytest.mark.skipif(not IN_REAL_ART, reason="runs inside .venv-art through test_real_art_in_its_own_venv")


@pytest.fixture
def real_service_module() -> Any:
    return pytest.importorskip("art.unsloth.service")


@real_art
def test_real_art_class_is_patched_by_the_pth_hook(real_service_module: Any) -> None:
    cls = real_service_module.UnslothService
    assert cls.__dict__.get("__fork_sidecar_patched__") is True  # by the .pth-armed post-import hook, not by us
    for name in ("train", "_train_dedicated", "_train_shared", "train_sft"):
        method = cls.__dict__[name]
        assert inspect.isasyncgenfunction(method), name
        assert inspect.signature(method) == inspect.signature(method.__wrapped__), name


@real_art
def test_real_art_fork_cycle(
    runtime_dir: Path, run_dir: Path, assets: TinyAssets, real_service_module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from art.unsloth.train import UnslothTrainContext

    builds: list[str] = []

    def cpu_train_context(*, init_args: dict[str, Any], **_: Any) -> Any:
        # Stands in for Unsloth's GPU-only loader, which ART's real `_state` calls; everything around it is ART's.
        builds.append(init_args["model_name"])
        model = build_peft(assets.base, init_args["model_name"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        trainer = types.SimpleNamespace(optimizer=optimizer)
        return UnslothTrainContext(model, None, model, trainer, asyncio.Queue(), asyncio.Queue())

    monkeypatch.setattr(real_service_module, "create_unsloth_train_context", cpu_train_context)
    service = real_service_module.UnslothService(
        model_name="m", base_model=str(assets.base), config={}, output_dir=str(run_dir)
    )
    assert status(runtime_dir)["runs"] == [str(run_dir.resolve())]
    # A fork before the state exists does not build it.
    assert fork(runtime_dir, run_dir, "early")["state"] == "not built" and builds == []
    # ART's own cached_property builds the state from the newest step; the pending fork lands right after.
    state = service._state
    assert builds == [str(run_dir / "checkpoints" / "0001")]
    assert equals_file(lora(state.peft_model), run_dir / "checkpoints" / "0000")
    # A fork of a built state drops it; the next access rebuilds and loads.
    reply = fork(runtime_dir, run_dir, "late")
    assert reply["message"] == "state dropped, load pending" and "_state" not in service.__dict__
    state = service._state
    assert len(builds) == 2 and equals_file(lora(state.peft_model), run_dir / "checkpoints" / "0000")
    loads = [r for r in status(runtime_dir)["recent"] if r.get("deferred")]
    digest = adapter_digest(run_dir / "checkpoints" / "0000")
    assert [(r["fork_id"], r["result"], r["digest"]) for r in loads] == [
        ("early", "loaded", digest),
        ("late", "loaded", digest),
    ]

    # ART's real training entry runs through the wrapper: here it fails at its first step (no vLLM to put to sleep)
    # and the error reaches the caller unchanged, with the service no longer counted as training.
    async def train_once() -> None:
        async for _ in service.train(None, {}, {}):
            pass

    with pytest.raises(Exception) as failure:
        asyncio.run(train_once())
    assert "sidecar" not in "".join(str(failure.value))
    assert status(runtime_dir)["targets"][0]["services"][0]["training"] is False
    # The service survives pickling into a child the way ART's shared mode moves it, and stays tracked.
    service.__dict__.pop("_state", None)
    copy = pickle.loads(pickle.dumps(service))
    assert copy in art.tracked_services()


def starts_since(starts: Path, seen: int) -> list[dict[str, Any]]:
    """The LoRA weights each CPU training step started from (written by tests/support/cpu_art.py), oldest first."""
    files = sorted(starts.glob("start-*.safetensors"), key=lambda p: int(p.name.split("-")[1]))
    return [load_file(str(f)) for f in files[seen:]]


def train_real(service: Any) -> list[dict[str, float]]:
    """ART's own `train()`, which dispatches to `_train_dedicated` or `_train_shared` by the service's config."""

    async def consume() -> list[dict[str, float]]:
        return [r async for r in service.train(None, types.SimpleNamespace(), {})]

    return asyncio.run(consume())


@real_art
@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_real_art_training_after_a_fork_starts_from_the_fork(
    mode: str, runtime_dir: Path, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ART's real `train()` in each mode: dedicated keeps the service in this process; shared moves it into a child
    process with ART's own `mp_actors.move_to_child_process` (spawn, pickled), where the preload's agent then lives."""
    import art.unsloth.service as service_module  # with tests/support/cpu_art.py's stand-ins, in every process
    from mp_actors import close_proxy, move_to_child_process

    starts = tmp_path / "starts"
    starts.mkdir()
    monkeypatch.setenv(cpu_art.STARTS_ENV, str(starts))
    # Dedicated mode is ART's config with separate trainer and inference GPUs (0.5.18 also reads its weights mode).
    dedicated = {"trainer_gpu_ids": [0], "inference_gpu_ids": [1], "rollout_weights_mode": "lora"}
    config = dedicated if mode == "dedicated" else {}
    service = service_module.UnslothService(
        model_name="m", base_model=os.environ["FORK_SIDECAR_TINY_BASE"], config=config, output_dir=str(run_dir)
    )
    assert service.is_dedicated is (mode == "dedicated")
    target = move_to_child_process(service, process_name="model-service") if mode == "shared" else service
    pid = target._process.pid if mode == "shared" else os.getpid()
    try:
        train_real(target)  # ART builds its state from the newest step (0001) and saves step 0002
        (first,) = starts_since(starts, 0)
        assert equals_file(first, run_dir / "checkpoints" / "0001")
        assert (run_dir / "checkpoints" / "0002").is_dir()
        reply = fork(runtime_dir, run_dir, f"fork-{mode}", pid=pid)
        assert reply["ok"] and reply["message"] == "state dropped, load pending", reply
        train_real(target)
        (second,) = starts_since(starts, 1)
        assert equals_file(second, run_dir / "checkpoints" / "0000")  # the fork, not ART's step 0002
        assert (run_dir / "checkpoints" / "0003").is_dir()
        loads = [r for r in status(runtime_dir, pid)["recent"] if r.get("deferred")]
        assert [(r["fork_id"], r["result"]) for r in loads] == [(f"fork-{mode}", "loaded")]
    finally:
        if mode == "shared":
            close_proxy(target)
