"""The agent inside this test process: real sockets, a real tiny PEFT model, real training steps on threads."""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from sidecar import preload  # noqa: E402
from sidecar.adapter import adapter_digest  # noqa: E402
from sidecar.preload import agent as agent_module  # noqa: E402
from sidecar.preload.agent import PeftTarget, register_peft_model, shutdown_agent  # noqa: E402
from sidecar.protocol.client import call_agent  # noqa: E402
from sidecar.protocol.messages import ForkRequest  # noqa: E402
from sidecar.protocol.paths import agent_socket_path  # noqa: E402
from tests.support.tiny_model import TinyAssets, tiny_assets  # noqa: E402

pytestmark = pytest.mark.trainer

TOKENS = torch.arange(3, 19).reshape(1, 16)
WAIT_S = 30.0  # generous upper bound for "eventually"; never a speed assertion


@pytest.fixture(scope="module")
def assets() -> TinyAssets:
    return tiny_assets()


def lora(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def file_tensors(checkpoint: Path) -> dict[str, Any]:
    return dict(load_file(str(checkpoint / "adapter_model.safetensors")))


def socket_of(runtime_dir: Path) -> Path:
    return agent_socket_path(runtime_dir, os.geteuid(), os.getpid())


def fork_message(run_dir: Path, timeout: float = 10.0, checkpoint: Path | None = None) -> dict[str, Any]:
    ckpt = checkpoint or run_dir / "checkpoints" / "0000"
    return ForkRequest("fork-1", str(run_dir), str(ckpt), adapter_digest(ckpt), timeout).to_message()


class Background(threading.Thread):
    """Runs `fn` on a thread and keeps its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:
            self.error = e

    def value(self) -> Any:
        self.join(WAIT_S)
        assert not self.is_alive(), "background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def send_fork(runtime_dir: Path, message: dict[str, Any]) -> Background:
    call = Background(lambda: call_agent(socket_of(runtime_dir), message, timeout=WAIT_S, pid=os.getpid()))
    call.start()
    return call


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def gate_of(target: PeftTarget) -> dict[str, Any]:
    return target.gate.describe()


# --- serving -----------------------------------------------------------------------------------------------------
def test_register_serves_the_run(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    preload.register(model, run_dir)
    path = socket_of(runtime_dir)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    hello = call_agent(path, {"op": "hello"}, timeout=5, pid=os.getpid())
    assert hello["ok"] and hello["pid"] == os.getpid() and hello["host"] == socket.gethostname()
    assert hello["runs"] == [str(run_dir.resolve())]
    assert hello["kinds"] == ["peft"]
    assert hello["versions"]["torch"] == torch.__version__ and "peft" in hello["versions"]
    preload.register(model, run_dir)  # again: still one target
    assert len(call_agent(path, {"op": "status"}, timeout=5)["targets"]) == 1


def test_fork_while_idle_loads_at_once(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    optimizer.step()
    preload.register(model, run_dir, optimizer=optimizer)
    reply = call_agent(socket_of(runtime_dir), fork_message(run_dir), timeout=WAIT_S, pid=os.getpid())
    assert reply["ok"] and reply["result"] == "loaded" and reply["applied"] == "between steps"
    assert reply["digest"] == adapter_digest(run_dir / "checkpoints" / "0000")
    assert same(lora(model), file_tensors(run_dir / "checkpoints" / "0000"))
    assert not optimizer.state  # the Adam moments of the old weights are gone
    status = call_agent(socket_of(runtime_dir), {"op": "status"}, timeout=5)
    assert status["recent"][-1]["fork_id"] == "fork-1" and status["recent"][-1]["result"] == "loaded"


def test_fork_mid_step_waits_for_the_optimizer_step(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    target = register_peft_model(model, run_dir)  # the optimizer is found by its first step
    hold, backward_done = threading.Event(), threading.Event()
    starts: list[dict[str, Any]] = []

    def train_two_steps() -> None:
        for _ in range(2):
            starts.append(lora(model))
            model(input_ids=TOKENS, labels=TOKENS).loss.backward()
            backward_done.set()
            hold.wait(WAIT_S)  # a long backward pass, as far as the agent can tell
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    trainer = Background(train_two_steps)
    trainer.start()
    backward_done.wait(WAIT_S)
    before = lora(model)
    call = send_fork(runtime_dir, fork_message(run_dir))
    eventually(lambda: gate_of(target)["fork_waiting"], "the fork to wait for the step boundary")
    assert gate_of(target)["in_step"] and call.is_alive()
    assert same(lora(model), before)  # nothing touched while the step runs
    hold.set()
    reply = call.value()
    trainer.value()
    assert reply["ok"] and reply["applied"] == "step boundary", reply
    assert same(starts[1], file_tensors(run_dir / "checkpoints" / "0000"))  # step 2 started from the fork
    assert not same(lora(model), starts[1])  # ... and trained on from it


def test_fork_that_outlasts_its_timeout_changes_nothing(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    target = register_peft_model(model, run_dir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hold, backward_done = threading.Event(), threading.Event()

    def one_step() -> None:
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        backward_done.set()
        hold.wait(WAIT_S)
        optimizer.step()

    trainer = Background(one_step)
    trainer.start()
    backward_done.wait(WAIT_S)
    before = lora(model)
    reply = call_agent(socket_of(runtime_dir), fork_message(run_dir, timeout=0.2), timeout=WAIT_S, pid=os.getpid())
    assert reply["ok"] is False and reply["error"]["code"] == "step_timeout"
    assert "nothing was changed" in reply["error"]["message"]
    assert same(lora(model), before)
    assert not gate_of(target)["fork_waiting"]  # withdrawn: the boundary will not load it later
    hold.set()
    trainer.value()
    assert not same(lora(model), file_tensors(run_dir / "checkpoints" / "0000"))


def test_gradient_accumulation_is_one_step(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    target = register_peft_model(model, run_dir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()  # micro-batch 1 of 2
    call = send_fork(runtime_dir, fork_message(run_dir))
    eventually(lambda: gate_of(target)["fork_waiting"], "the fork to wait")
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()  # micro-batch 2: still the same step
    assert call.is_alive()
    optimizer.step()
    assert call.value()["applied"] == "step boundary"
    assert same(lora(model), file_tensors(run_dir / "checkpoints" / "0000"))
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)


def test_an_optimizer_step_outside_a_training_step_is_no_boundary(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    # The ranks' agreement issues one collective per boundary, so a boundary some ranks see and others do not
    # (torch.distributed.checkpoint's get_optimizer_state_dict steps on empty state) would mismatch collectives.
    target = register_peft_model(model, run_dir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    boundaries: list[int] = []
    target.gate.on_boundary = lambda: boundaries.append(target.gate.steps)
    optimizer.step()  # no training forward before it
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    optimizer.step()
    optimizer.step()  # a second step of the same training step
    assert boundaries == [1]


def test_a_running_inference_forward_is_waited_for(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    target = register_peft_model(model, run_dir)
    model.eval()
    inside, release = threading.Event(), threading.Event()

    def slow_layer(module: Any, args: Any) -> None:
        inside.set()
        release.wait(WAIT_S)

    handle = model.get_base_model().model.layers[1].register_forward_pre_hook(slow_layer)
    generating = Background(lambda: model(input_ids=TOKENS))
    with torch.no_grad():
        generating.start()
        inside.wait(WAIT_S)
    call = send_fork(runtime_dir, fork_message(run_dir))
    eventually(lambda: gate_of(target)["fork_waiting"], "the fork to wait for the forward")
    assert not gate_of(target)["in_step"] and gate_of(target)["forwards"] >= 1
    release.set()
    generating.value()
    handle.remove()
    assert call.value()["applied"] == "between steps"
    assert same(lora(model), file_tensors(run_dir / "checkpoints" / "0000"))


def test_training_step_context_marks_steps(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    target = register_peft_model(model, run_dir)
    with preload.training_step():
        with torch.no_grad():
            model(input_ids=TOKENS)  # not a training forward, but inside an explicit step
        call = send_fork(runtime_dir, fork_message(run_dir))
        eventually(lambda: gate_of(target)["fork_waiting"], "the fork to wait for the explicit step")
        assert gate_of(target)["marks"] == "training_step()"
    reply = call.value()
    assert reply["applied"] == "step boundary"
    # From now on training forwards alone do not open a step: the loop marks its own.
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    assert not gate_of(target)["in_step"]


# --- refusals ----------------------------------------------------------------------------------------------------
def test_malformed_checkpoint_is_refused_and_the_model_untouched(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    preload.register(model, run_dir)
    message = fork_message(run_dir)
    broken = run_dir / "checkpoints" / "0000" / "adapter_model.safetensors"
    broken.write_bytes(broken.read_bytes()[:-100])
    before = lora(model)
    reply = call_agent(socket_of(runtime_dir), message, timeout=WAIT_S, pid=os.getpid())
    assert reply["ok"] is False and reply["error"]["code"] == "load_failed"
    assert "damaged" in reply["error"]["message"]
    assert same(lora(model), before)


def test_a_load_that_torch_refuses_fails_the_fork_and_the_next_fork_is_taken(
    runtime_dir: Path, run_dir: Path, model: Any
) -> None:
    """A load raising something other than AdapterLoadError (here torch's own error: a LoRA weight whose elements
    share memory, which copy_ refuses) was answered `internal` and left the model's fork lock held: every later fork
    of that model answered `busy`, for the life of the trainer."""
    name = next(n for n, p in model.named_parameters() if "lora_B" in n)
    holder = model.get_submodule(name.rpartition(".")[0])
    rows, cols = holder.weight.shape
    sound = holder.weight
    holder.weight = torch.nn.Parameter(torch.zeros(rows, 1).expand(rows, cols))
    preload.register(model, run_dir)

    failed = call_agent(socket_of(runtime_dir), fork_message(run_dir), timeout=WAIT_S, pid=os.getpid())
    assert failed["ok"] is False and failed["error"]["code"] == "load_failed", failed
    assert "single memory location" in failed["error"]["message"]
    assert "may hold part of the fork" in failed["error"]["message"]  # peft had copied the other tensors

    holder.weight = sound
    again = call_agent(socket_of(runtime_dir), fork_message(run_dir), timeout=WAIT_S, pid=os.getpid())
    assert again["ok"] and again["result"] == "loaded", again
    assert same(lora(model), file_tensors(run_dir / "checkpoints" / "0000"))


def test_checkpoint_outside_the_run_is_refused(runtime_dir: Path, run_dir: Path, model: Any, tmp_path: Path) -> None:
    preload.register(model, run_dir)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_dir / "checkpoints" / "0000", elsewhere)
    (run_dir / "checkpoints" / "0002").symlink_to(elsewhere)  # inside by name, outside in fact
    for checkpoint in (elsewhere, run_dir / "checkpoints" / "0002", run_dir / "checkpoints" / ".." / ".." / ".."):
        message = fork_message(run_dir, checkpoint=elsewhere)
        message["checkpoint_dir"] = str(checkpoint)
        reply = call_agent(socket_of(runtime_dir), message, timeout=WAIT_S, pid=os.getpid())
        assert reply["error"]["code"] == "forbidden_path", checkpoint


def test_fork_for_another_run_is_refused(runtime_dir: Path, run_dir: Path, model: Any, tmp_path: Path) -> None:
    preload.register(model, run_dir)
    other = tmp_path / "art" / "proj" / "models" / "other"
    shutil.copytree(run_dir / "checkpoints" / "0000", other / "checkpoints" / "0000")
    reply = call_agent(socket_of(runtime_dir), fork_message(other), timeout=WAIT_S, pid=os.getpid())
    assert reply["error"]["code"] == "not_serving" and str(run_dir.resolve()) in reply["error"]["message"]


def test_garbage_to_a_real_agent_gets_errors_and_it_keeps_serving(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    preload.register(model, run_dir)
    path = socket_of(runtime_dir)
    for data, code in ((b"\x00\x01garbage\n", "bad_request"), (b'{"op":"rm -rf"}\n', "unknown_op")):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(data)
            assert json.loads(s.makefile("rb").readline())["error"]["code"] == code
    assert call_agent(path, {"op": "hello"}, timeout=5)["ok"]


def test_a_collected_model_is_no_longer_served(runtime_dir: Path, run_dir: Path, assets: TinyAssets) -> None:
    base = LlamaForCausalLM.from_pretrained(assets.base, dtype=torch.float32)
    transient = PeftModel.from_pretrained(base, assets.adapter_a, is_trainable=True)
    preload.register(transient, run_dir)
    assert call_agent(socket_of(runtime_dir), {"op": "hello"}, timeout=5)["runs"]
    del transient, base
    gc.collect()
    assert call_agent(socket_of(runtime_dir), {"op": "hello"}, timeout=5)["runs"] == []
    reply = call_agent(socket_of(runtime_dir), fork_message(run_dir), timeout=5)
    assert reply["error"]["code"] == "not_serving"


def test_a_collected_models_handshake_keys_are_never_given_to_another(
    runtime_dir: Path, run_dir: Path, assets: TinyAssets, model: Any
) -> None:
    # Ranks collect a model at different moments: had the next model taken its keys on some ranks only, their
    # handshake would find the old model's keys of the other ranks in the job's store.
    base = LlamaForCausalLM.from_pretrained(assets.base, dtype=torch.float32)
    transient = PeftModel.from_pretrained(base, assets.adapter_a, is_trainable=True)
    first = register_peft_model(transient, run_dir).ranks.hooks.index
    del transient, base
    gc.collect()
    assert register_peft_model(model, run_dir).ranks.hooks.index == first + 1


def test_preload_off_means_register_does_nothing(
    runtime_dir: Path, run_dir: Path, model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORK_SIDECAR_PRELOAD", "0")
    preload.register(model, run_dir)
    with preload.training_step():
        pass
    assert not socket_of(runtime_dir).exists()
    assert agent_module.current_agent(create=False) is None


def test_register_never_raises_into_the_trainer(
    run_dir: Path, model: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FORK_SIDECAR_RUNTIME_DIR", "/proc/fork-sidecar-cannot-be-here")
    shutdown_agent()
    try:
        preload.register(model, run_dir)  # the socket cannot be made: logged, not raised
        assert "cannot create the agent directory /proc/fork-sidecar-cannot-be-here" in caplog.text
    finally:
        shutdown_agent()
