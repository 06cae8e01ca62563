"""The adapter's live tensors under the names peft saves them with, peft's walk remembered per model.

peft's `get_peft_model_state_dict` builds the whole model's state dict (every base weight too) to pick the adapter's
tensors out of it: 5-9 ms of a reload of the bench's 96 MiB LoRA, and it grows with the base model, not the adapter.
Which parameter each saved name stands for changes only when the model's parameters do (an adapter added, a
parameter replaced, its storage moved by `.to()`), so the answer is kept per model and adapter with a fingerprint of
every parameter: its name, identity, storage, shape, dtype and device, and the adapter's config object. A later
reload whose fingerprint is the same takes the kept answer (1 ms for the fingerprint on the 2-core machine); any
difference walks again. Only an answer made of whole parameters is kept (LoRA): a state dict that peft computes
(prompt learning) is walked every time.

torch and peft are imported inside the functions, like the rest of the preload.
"""

from __future__ import annotations

import weakref
from typing import Any

from sidecar.preload.bit_check import local_shard

__all__ = ["live_adapter_tensors", "walk_adapter_tensors"]

# model -> {adapter name: (fingerprint, {saved name: parameter})}; an entry goes with its model.
_KEPT: weakref.WeakKeyDictionary[Any, dict[str, tuple[tuple[Any, ...], dict[str, Any]]]] = weakref.WeakKeyDictionary()


def walk_adapter_tensors(peft_model: Any, name: str) -> dict[str, Any]:
    """peft's own walk: the adapter's tensors as `get_peft_model_state_dict` returns them (sharing storage with the
    parameters where they are parameters)."""
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(peft_model, adapter_name=name))


def live_adapter_tensors(peft_model: Any, name: str) -> dict[str, Any]:
    """The same as `walk_adapter_tensors`, from the kept answer while the model's parameters are unchanged."""
    fingerprint = _fingerprint(peft_model, name)
    try:
        per_model = _KEPT.setdefault(peft_model, {})
    except TypeError:  # a model that cannot be weakly referenced: walked every time
        return walk_adapter_tensors(peft_model, name)
    kept = per_model.get(name)
    if kept is not None and kept[0] == fingerprint:
        return {key: param.detach() for key, param in kept[1].items()}
    live = walk_adapter_tensors(peft_model, name)
    params = _as_parameters(peft_model, live)
    if params is None:
        per_model.pop(name, None)
    else:
        per_model[name] = (fingerprint, params)
    return live


def _fingerprint(peft_model: Any, name: str) -> tuple[Any, ...]:
    config = getattr(peft_model, "peft_config", {}).get(name)
    return (id(config), *((key, id(p), *_identity(p)) for key, p in peft_model.named_parameters()))


def _as_parameters(peft_model: Any, live: dict[str, Any]) -> dict[str, Any] | None:
    """{saved name: the parameter it is, whole}, or None if any tensor is not exactly one parameter's storage and
    shape (then nothing is kept)."""
    by_storage = {_identity(p): p for p in peft_model.parameters()}
    params = {}
    for key, tensor in live.items():
        local = local_shard(tensor)
        param = by_storage.get(_identity(tensor))
        if param is None or not local.is_contiguous() or not local.numel():
            return None
        params[key] = param
    return params


def _identity(tensor: Any) -> tuple[Any, ...]:
    """Where a tensor's data is and what it is: its (local shard's) storage pointer, shape, dtype and device."""
    local = local_shard(tensor)
    return (local.data_ptr(), tuple(tensor.shape), tensor.dtype, local.device)
