"""CPU stand-ins for the GPU-only parts of ART's real `UnslothService`, so that ART's own `train()` runs here.

Installed as a post-import hook for `art.unsloth.service` (`install`), also in the child process ART's shared mode
spawns (tests/test_art.py puts `pth_line()` into the trainer venv, after the preload's own `.pth`). Everything else
is ART's: the mode dispatch in `train()`, `_train_dedicated` / `_train_shared`, the `_state` cached_property,
`save_checkpoint` writing the next step directory, `_latest_step`. What stands in, and why:
- `create_unsloth_train_context`: Unsloth's loader needs a GPU; this builds the tiny Llama with the newest step's
  LoRA (the directory ART passes as `init_args["model_name"]`) as a real trainable PEFT model with AdamW.
- `run_unsloth_rl_training`: Unsloth's GRPO loop needs a GPU; this records the LoRA weights it starts from (as a
  safetensors file under $FORK_SIDECAR_TEST_STARTS, read by the test in the parent process) and takes one real
  optimizer step.
- `UnslothTrainContext.reload_to_gpu` / `offload_to_cpu`: CUDA memory moves; nothing to move on CPU.
- `_sleep_runtime`, `_wake_runtime` and the adapter-load method (`_reload_adapter` in 0.5.18,
  `_load_rollout_lora_for_step` in 0.5.23): HTTP to ART's vLLM runtime, which needs a GPU; recorded instead. The
  sidecar's own vLLM path runs against a real vLLM server in tests/test_vllm*.py.
"""

from __future__ import annotations

import asyncio
import os
import time
import types
from pathlib import Path
from typing import Any

TOKENS_ENV = "FORK_SIDECAR_TINY_BASE"
STARTS_ENV = "FORK_SIDECAR_TEST_STARTS"


def pth_line() -> str:
    """A `.pth` line that installs the stand-ins whenever `art.unsloth.service` is imported in a process of that venv
    (lazily: this module is importable only once the process has its working directory on sys.path)."""
    return (
        "import sidecar.preload.hooks as h; h.when_imported('art.unsloth.service', "
        "lambda m: __import__('tests.support.cpu_art', fromlist=['install']).install(m), key='cpu_art')\n"
    )


def install(service_module: types.ModuleType) -> None:
    from art.unsloth.train import UnslothTrainContext

    class CpuTrainContext(UnslothTrainContext):  # type: ignore[misc]
        def reload_to_gpu(self, device: str = "cuda:0") -> None:
            pass

        def offload_to_cpu(self) -> None:
            pass

    def create_unsloth_train_context(*, init_args: dict[str, Any], **_: Any) -> Any:
        import torch
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        base = LlamaForCausalLM.from_pretrained(os.environ[TOKENS_ENV], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, init_args["model_name"], is_trainable=True)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        trainer = types.SimpleNamespace(optimizer=optimizer, model=model, save_model=model.save_pretrained)
        return CpuTrainContext(model, None, model, trainer, asyncio.Queue(), asyncio.Queue())

    async def run_unsloth_rl_training(state: Any, **_: Any) -> Any:
        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        weights = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(state.peft_model).items()}
        save_file(weights, str(Path(os.environ[STARTS_ENV]) / f"start-{time.monotonic_ns()}-{os.getpid()}.safetensors"))
        tokens = torch.arange(3, 19).reshape(1, 16)
        loss = state.peft_model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        state.trainer.optimizer.step()
        state.trainer.optimizer.zero_grad(set_to_none=True)
        yield {"loss": float(loss)}

    async def vllm_call(self: Any, *args: Any) -> None:
        self.__dict__.setdefault("vllm_calls", []).append(args)

    service_module.create_unsloth_train_context = create_unsloth_train_context  # type: ignore[attr-defined]
    service_module.run_unsloth_rl_training = run_unsloth_rl_training  # type: ignore[attr-defined]
    cls = service_module.UnslothService  # type: ignore[attr-defined]
    for name in ("_sleep_runtime", "_wake_runtime", "_reload_adapter", "_load_rollout_lora_for_step"):
        if name in cls.__dict__:
            setattr(cls, name, vllm_call)
