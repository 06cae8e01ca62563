"""FSDP1 cases in one process (gloo, world size 1, which FSDP1 runs as NO_SHARD) for tests/test_fsdp1_slices.py:
real torch, peft and FullyShardedDataParallel, printed as one JSON object. Run by path with a trainer's Python:

    python tests/support/fsdp1_world1.py BASE_DIR LORA_ADAPTER_DIR WORK_DIR

Cases (each key of the output):
- `prompt_learning`: a prompt-tuning adapter (its state dict is computed by peft, not a parameter) loaded into
  FSDP1: `error` (the refusal) and `unchanged` (the model's prompt embeddings are still the old ones);
- `model_freed`: a PEFT model FSDP1 wraps, loaded into once, then dropped: whether it was freed;
- `root_scans`: a PEFT model with FSDP1 units inside it and none around it, loaded into twice: how many times the
  gc search for a root unit ran (once: "none" is remembered too).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import weakref
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's sidecar package


def _prompt_model(base: str, seed: int) -> Any:
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return get_peft_model(LlamaForCausalLM.from_pretrained(base), config)


def prompt_learning(base: str, work: Path) -> dict[str, Any]:
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel

    from sidecar.preload.peft_load import AdapterLoadError, load_adapter_from_checkpoint

    _prompt_model(base, 2).save_pretrained(str(work / "prompt-b"))
    peft = _prompt_model(base, 1)
    FullyShardedDataParallel(peft, device_id=torch.device("cpu"), use_orig_params=True)
    before = peft.prompt_encoder["default"].embedding.weight.detach().clone()
    try:
        load_adapter_from_checkpoint(peft, work / "prompt-b")
        error = None
    except AdapterLoadError as e:
        error = str(e)
    after = peft.prompt_encoder["default"].embedding.weight.detach()
    return {"error": error, "unchanged": bool(torch.equal(before, after))}


def _lora_model(base: str, adapter: str) -> Any:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


def model_freed(base: str, adapter: str) -> bool:
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel

    from sidecar.preload.peft_load import load_adapter_from_checkpoint

    def once() -> weakref.ref[Any]:
        peft = _lora_model(base, adapter)
        FullyShardedDataParallel(peft, device_id=torch.device("cpu"), use_orig_params=True)
        load_adapter_from_checkpoint(peft, adapter)
        return weakref.ref(peft)

    ref = once()
    gc.collect()
    return ref() is None


def root_scans(base: str, adapter: str) -> int:
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel

    from sidecar.preload import fsdp1_slices
    from sidecar.preload.peft_load import load_adapter_from_checkpoint

    peft = _lora_model(base, adapter)
    layers = peft.base_model.model.model.layers
    for i, layer in enumerate(layers):  # units inside the model, none around it
        layers[i] = FullyShardedDataParallel(layer, device_id=torch.device("cpu"), use_orig_params=True)
    real, scans = fsdp1_slices._root_handle, []

    def counted(model: Any) -> Any:
        scans.append(1)
        return real(model)

    fsdp1_slices._root_handle = counted  # type: ignore[assignment]
    try:
        for _ in range(2):
            load_adapter_from_checkpoint(peft, adapter)
    finally:
        fsdp1_slices._root_handle = real  # type: ignore[assignment]
    return len(scans)


def main(base: str, adapter: str, work: str) -> int:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo")
    out = {
        "prompt_learning": prompt_learning(base, Path(work)),
        "model_freed": model_freed(base, adapter),
        "root_scans": root_scans(base, adapter),
    }
    dist.destroy_process_group()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:4]))
