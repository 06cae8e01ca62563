"""Copies of a fork's tensors to the GPU from the page-locked read buffer (sidecar/preload/host_pin.py), on a real
GPU (`pytest -m gpu`; skipped without CUDA): the buffer is registered exactly while the copies run, a registration
the driver refuses leaves no error behind for torch's next kernel, and the loaded weights are the file's, cast on the
GPU bit for bit as on the CPU."""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

from sidecar.adapter import adapter_digest  # noqa: E402
from sidecar.preload import checkpoint_read, host_pin, peft_load  # noqa: E402

HIDDEN = 1024


def lora_model(layers: int, rank: int, dtype: Any) -> Any:
    """A stack of Linear layers with a LoRA on each, on the GPU: `layers * rank * HIDDEN * 2` LoRA elements."""
    base = torch.nn.Sequential(*[torch.nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(layers)])
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=[str(i) for i in range(layers)])
    return peft.get_peft_model(base, config).to(device="cuda", dtype=dtype)


def save_fork(model: Any, where: Path) -> Path:
    """A random adapter for `model`, saved in float32 (the file's dtype need not be the model's)."""
    where.mkdir(parents=True)
    state = peft.get_peft_model_state_dict(model)
    save_file({k: torch.randn(v.shape) for k, v in state.items()}, str(where / peft_load.ADAPTER_FILE))
    return where


@contextlib.contextmanager
def watching_the_pin(monkeypatch: pytest.MonkeyPatch, seen: list[Any]) -> Iterator[None]:
    """Record, around the real pinned_for_copy, whether the buffer is page-locked once registered and after the
    unregistration (on a thread of its own, so waited for here)."""
    real = host_pin.HostPin

    class Watched(real):  # type: ignore[misc, valid-type]
        def ready(self) -> bool:
            pinned = super().ready()
            seen.append(("ready", pinned, torch.frombuffer(self._buffer, dtype=torch.uint8).is_pinned()))
            return pinned

        def release(self) -> None:
            super().release()
            for thread in threading.enumerate():
                if thread.name == "fork-sidecar-unpin":
                    thread.join()
            seen.append(("released", torch.frombuffer(self._buffer, dtype=torch.uint8).is_pinned()))

    monkeypatch.setattr(host_pin, "HostPin", Watched)
    yield


def assert_holds_the_file(model: Any, checkpoint: Path, dtype: Any) -> None:
    # The file's float32 tensors cast on the CPU: the GPU's cast after the copy must give the same bits.
    file = load_file(str(checkpoint / peft_load.ADAPTER_FILE))
    live = peft.get_peft_model_state_dict(model)
    assert set(live) == set(file)
    for key, value in file.items():
        assert torch.equal(
            live[key].cpu().view(torch.int16 if dtype != torch.float32 else torch.int32),
            value.to(dtype).view(torch.int16 if dtype != torch.float32 else torch.int32),
        ), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_large_fork_is_copied_from_the_buffer_page_locked_for_the_copies_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: Any
) -> None:
    model = lora_model(layers=6, rank=256, dtype=dtype)  # 12 MiB of float32 in the file
    checkpoint = save_fork(model, tmp_path / "fork")
    seen: list[Any] = []
    with watching_the_pin(monkeypatch, seen):
        digest = peft_load.load_adapter_from_checkpoint(model, checkpoint)
    assert seen[0] == ("ready", True, True) and seen[-1] == ("released", False)
    assert digest == adapter_digest(checkpoint)
    assert_holds_the_file(model, checkpoint, dtype)


def test_a_small_fork_is_copied_from_pageable_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = lora_model(layers=2, rank=64, dtype=torch.float32)  # 1 MiB: registering would cost more than it saves
    checkpoint = save_fork(model, tmp_path / "fork")
    seen: list[Any] = []
    with watching_the_pin(monkeypatch, seen):
        peft_load.load_adapter_from_checkpoint(model, checkpoint)
    assert seen[0] == ("ready", False, False) and seen[-1] == ("released", False)
    assert_holds_the_file(model, checkpoint, torch.float32)


def test_a_refused_registration_loads_from_pageable_memory_and_leaves_no_error_for_the_next_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The buffer is registered by someone else first (through torch's own binding), so the driver refuses ours
    (already registered): the load goes on pageable, and the refusal's error, read back at once, is not raised by
    the kernels that follow (without the read-back, torch's next launch check raises it)."""
    model = lora_model(layers=6, rank=256, dtype=torch.float32)
    checkpoint = save_fork(model, tmp_path / "fork")
    cudart = torch.cuda.cudart()
    taken: list[memoryview] = []
    real_buffer = checkpoint_read._buffer

    def registered_elsewhere(size: int) -> memoryview:
        buffer = real_buffer(size)
        address = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
        assert int(cudart.cudaHostRegister(address, len(buffer), 0)) == 0
        taken.append(buffer)
        return buffer

    monkeypatch.setattr(checkpoint_read, "_buffer", registered_elsewhere)
    seen: list[Any] = []
    try:
        with watching_the_pin(monkeypatch, seen):
            digest = peft_load.load_adapter_from_checkpoint(model, checkpoint)
        assert seen[0][:2] == ("ready", False)
        x = torch.ones(1024, device="cuda") * 2  # a kernel launch: raises a stale error if one was left
        torch.cuda.synchronize()
        assert float(x.sum()) == 2048.0
    finally:
        for buffer in taken:
            cudart.cudaHostUnregister(torch.frombuffer(buffer, dtype=torch.uint8).data_ptr())
    assert digest == adapter_digest(checkpoint)
    assert_holds_the_file(model, checkpoint, torch.float32)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_the_second_gpu_creates_no_context_on_the_first(tmp_path: Path) -> None:
    """Run in a fresh process: this one has a context on GPU 0 already."""
    import subprocess
    import sys

    code = f"""
import torch, peft
from pathlib import Path
from safetensors.torch import save_file
from sidecar.preload import peft_load
base = torch.nn.Sequential(*[torch.nn.Linear({HIDDEN}, {HIDDEN}, bias=False) for _ in range(6)])
model = peft.get_peft_model(base, peft.LoraConfig(r=256, target_modules=[str(i) for i in range(6)])).to("cuda:1")
where = Path({str(tmp_path)!r})
state = peft.get_peft_model_state_dict(model)
save_file({{k: torch.randn(v.shape) for k, v in state.items()}}, str(where / peft_load.ADAPTER_FILE))
peft_load.load_adapter_from_checkpoint(model, where)
print(torch._C._cuda_hasPrimaryContext(0), torch._C._cuda_hasPrimaryContext(1))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"], out


def test_the_runtime_is_the_one_torch_loaded_so_an_error_left_in_it_reaches_torch() -> None:
    """A refused registration made on this thread through host_pin's runtime, its error not read back, is raised by
    torch's next kernel launch on this thread: the runtime is torch's. Read back (`_cleared`), nothing is raised.
    (The agent registers on a thread of its own, which also reads the error back before it ends.)"""
    runtime = host_pin._runtime()
    assert runtime is not None
    buffer = memoryview(mmap.mmap(-1, host_pin.PIN_MIN_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    address = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(address, len(buffer), 0)) == 0
    try:
        assert runtime.register(address, len(buffer), 0) != 0  # already registered: refused, error left
        with pytest.raises(RuntimeError, match="CUDA error"):
            torch.ones(8, device="cuda").mul_(2)
            torch.cuda.synchronize()
        assert runtime.register(address, len(buffer), 0) != 0
        host_pin._cleared(runtime, "cudaHostRegister", "the copies stay pageable")
        torch.ones(8, device="cuda").mul_(2)
        torch.cuda.synchronize()
    finally:
        cudart.cudaHostUnregister(address)
