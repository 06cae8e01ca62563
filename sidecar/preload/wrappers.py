"""Sharding wrappers around a registered model, found before anything of the checkpoint touches the model.

FSDP2 (`fully_shard`) keeps each parameter a DTensor shard, which the agent loads shard by shard (peft_load._like).
FullyShardedDataParallel (FSDP1) flattens the parameters of each wrapped unit into one FlatParameter and shards that:
with `use_orig_params=True` each LoRA parameter is a 1-D slice of this rank's shard (an empty one on a rank that
holds none of it), so no checkpoint tensor fits it. Such a model is loaded inside FSDP1's own
`summon_full_params(writeback=True)` (`full_params`), which gives every rank the full parameters and writes each
rank's shard back on exit. It is a collective of its own: called only where every rank calls it, inside the agreed
step's apply (all ranks apply, or none does), never while reading and checking the file, where a rank whose request
expired skips the work. Without `use_orig_params` the model keeps no LoRA parameters of its own at all: refused.

FSDP1's root (the FullyShardedDataParallel that wraps the registered model, or an ancestor of it) holds no link from
the model to it: it is looked for among live objects once per model and remembered. torch is not imported here:
FSDP1's class is taken from `sys.modules`, and the flattened parameters are told by the attribute FSDP sets on them
(`_fsdp_flattened`; FSDP2's DTensor parameters carry it too, but have a device mesh).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import weakref
from collections.abc import Iterator
from typing import Any

__all__ = ["fsdp1_live_tensors", "fsdp1_root", "full_params", "unloadable_wrapper"]

_FSDP1_TO_USE = (
    "; nothing was loaded. Wrap it with FullyShardedDataParallel(..., use_orig_params=True), or shard it with "
    "FSDP2 (torch.distributed.fsdp.fully_shard); fork-sidecar loads both"
)
_roots: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _fsdp1_class() -> Any:
    module = sys.modules.get("torch.distributed.fsdp")
    return getattr(module, "FullyShardedDataParallel", None)


def _flattened_by_fsdp1(model: Any) -> bool:
    return any(
        getattr(p, "_fsdp_flattened", False) and getattr(p, "device_mesh", None) is None for p in model.parameters()
    )


def fsdp1_root(model: Any) -> Any | None:
    """The module whose `summon_full_params` gathers `model`'s FSDP1-flattened parameters (the outermost FSDP1 root
    wrapping the model, or the model itself when its FSDP1 units are inside it), or None when FSDP1 has not
    flattened any of its parameters."""
    if not _flattened_by_fsdp1(model):
        return None
    with contextlib.suppress(TypeError):
        if model in _roots:
            return _roots[model]
    fsdp = _fsdp1_class()
    if fsdp is None:
        return None
    roots = [
        o
        for o in gc.get_objects()
        if isinstance(o, fsdp) and getattr(o, "_is_root", False) and any(m is model for m in o.modules())
    ]
    root = roots[0] if roots else (model if any(isinstance(m, fsdp) for m in model.modules()) else None)
    if root is not None:
        with contextlib.suppress(TypeError):
            _roots[model] = root
    return root


def unloadable_wrapper(model: Any, adapter: str) -> str | None:
    """A sentence saying why a fork cannot be loaded into `model` as it is wrapped, or None when it can."""
    if not _flattened_by_fsdp1(model):
        return None
    root = fsdp1_root(model)
    if root is None:
        why = "its parameters are flattened by FullyShardedDataParallel (FSDP1), but no FSDP1 root holding them"
        return f"{why} was found (run a forward first){_FSDP1_TO_USE}"
    fsdp = _fsdp1_class()
    units = [m for m in root.modules() if fsdp is not None and isinstance(m, fsdp)]
    if not all(getattr(unit, "_use_orig_params", False) for unit in units):
        why = "the model is wrapped by FullyShardedDataParallel (FSDP1) without use_orig_params=True"
        return f"{why}, which leaves it no LoRA parameters of its own{_FSDP1_TO_USE}"
    config = getattr(model, "peft_config", {}).get(adapter)
    kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "")))
    if kind != "LORA" or getattr(config, "bias", "none") != "none":
        return (
            f"under FullyShardedDataParallel (FSDP1) fork-sidecar loads LoRA adapters without bias terms, and adapter "
            f"{adapter!r} is {kind or 'not LoRA'} (bias {getattr(config, 'bias', None)!r}); nothing was loaded. "
            "Shard it with FSDP2 (torch.distributed.fsdp.fully_shard) instead"
        )
    return None


@contextlib.contextmanager
def full_params(root: Any) -> Iterator[None]:
    """Every rank's FSDP1 parameters gathered in full, written back to each rank's shard on exit (a collective)."""
    fsdp = _fsdp1_class()
    with fsdp.summon_full_params(root, writeback=True):
        yield


def fsdp1_live_tensors(model: Any, adapter: str) -> dict[str, Any]:
    """Inside `full_params`: the adapter's full parameters under the names peft saves a LoRA adapter with (its own
    state dict holds none of them there), FSDP1's wrapper segments taken out."""
    marker = f".{adapter}"
    out = {}
    for name, param in model.named_parameters():
        name = name.replace("_fsdp_wrapped_module.", "")
        if "lora_" in name and marker in name:
            out[name.replace(marker, "")] = param
    return out
