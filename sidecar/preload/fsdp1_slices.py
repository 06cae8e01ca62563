"""Where each LoRA tensor of an FSDP1 (`FullyShardedDataParallel`) model lives on this rank, so that a fork is
loaded into each rank's own slice with no collective.

FSDP1 flattens the parameters of each wrapped unit into one FlatParameter and keeps on each rank a contiguous slice
of it (the whole of it with NO_SHARD). An original parameter is then a 1-D piece of that slice on some ranks, a
part of it on one rank, or nothing. The unit's handle says where: `_fqns` (names from the unit's wrapped module),
`_shapes` (full shapes) and `_shard_param_infos` (for each, whether it is in this rank's slice, its offset there, and
which run of its flattened elements it holds). Every rank has read the whole file, so each copies its run of each
tensor into its slice: `file_tensor.flatten()[start : end + 1]` into `flat_param[offset : offset + numel]`. With
`use_orig_params=True` the original parameters are views of exactly those pieces (what optimizers hold); without it
the optimizer holds the FlatParameter, whose gradient and state can only be dropped as a whole, so a fork is
refused when one mixes LoRA tensors of the adapter with other trainable parameters.

Names as peft saves them come from peft's own `get_peft_model_state_dict` over a state dict built here (FSDP1's
`state_dict()` would gather every unit: a collective). The handles come from the FSDP units inside the registered
model, and for a root unit around it (a PEFT model registered before it was wrapped) from the one object that
refers to the model, found once through `gc` and remembered.

torch and peft are imported inside the functions, like the rest of the preload.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Fsdp1Layout", "Fsdp1Refused", "fsdp1_layout", "is_fsdp1"]

# The module-name segments FSDP1 and activation checkpointing insert; peft's names do not have them.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_LIST_LIMIT = 5


class Fsdp1Refused(Exception):
    """The fork cannot be loaded into this FSDP1 model as it stands now; the sentence says why and what to do."""


@dataclass(frozen=True)
class _Slot:
    """One original parameter's piece of this rank's slice of a FlatParameter."""

    local: Any  # a 1-D view of the slice (empty where this rank holds none of it)
    start: int  # which elements of the flattened full tensor it holds: [start, start + local.numel())
    shape: tuple[int, ...]  # the full shape, as in the checkpoint


@dataclass
class Fsdp1Layout:
    """The adapter's tensors on this rank: `local` (what is copied into, by peft name), `shapes` (full shapes, what
    the file must have), `params` (whose gradients and optimizer states an apply drops)."""

    local: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    params: list[Any]
    _slots: dict[str, _Slot]

    def take(self, key: str, full: Any) -> Any:
        """This rank's part of the file's full tensor `full`, in the dtype and on the device of where it goes."""
        slot = self._slots.get(key)
        if slot is not None:
            full = full.reshape(-1)[slot.start : slot.start + slot.local.numel()]
        target = self.local[key]
        return full.to(device=target.device, dtype=target.dtype, non_blocking=target.device.type == "cuda")


def is_fsdp1(model: Any) -> bool:
    """Whether any parameter of `model` was flattened by FSDP1 (FSDP2 marks its DTensor parameters too; only FSDP1's
    plain flattened ones have no device mesh). Imports nothing."""
    return any(
        getattr(p, "_fsdp_flattened", False) and getattr(p, "device_mesh", None) is None for p in model.parameters()
    )


def fsdp1_layout(model: Any, adapter_name: str) -> Fsdp1Layout:
    """The layout of adapter `adapter_name` of the FSDP1 model `model` (the PEFT model, or a FullyShardedDataParallel
    around it) on this rank. Raises Fsdp1Refused."""
    from peft import get_peft_model_state_dict

    peft = _innermost(model)
    handles = _handles(model, peft)
    slots, owners = _slots_by_name(peft, handles)
    plain = {
        name: p
        for name, p in peft.named_parameters()
        if not getattr(p, "_fsdp_flattened", False)  # FSDP1 left it alone (an ignored module)
    }
    _refuse_uncovered(peft, handles)
    # peft names the adapter's tensors from this dict: each value comes back as given.
    placeholders = {name: _placeholder(slot) for name, slot in slots.items()}
    by_placeholder = {id(t): name for name, t in placeholders.items()}
    try:
        mapped = get_peft_model_state_dict(peft, state_dict={**plain, **placeholders}, adapter_name=adapter_name)
    except Exception as e:  # peft's own mapping failing on names FSDP1 gave it (modules_to_save units, ...)
        raise Fsdp1Refused(
            f"peft could not name the adapter's tensors in this FullyShardedDataParallel (FSDP1) model "
            f"({type(e).__name__}: {e}); nothing was loaded. Wrap with use_orig_params=True around whole layers"
        ) from None
    plain_ids = {id(p) for p in plain.values()}
    layout = Fsdp1Layout({}, {}, [], {})
    loaded: set[str] = set()  # the flattened parameters (by slot name) that hold the adapter's tensors
    for raw_key, value in mapped.items():
        key = _checkpoint_key(raw_key, adapter_name)
        if id(value) in by_placeholder:
            loaded.add(by_placeholder[id(value)])
            slot = slots[by_placeholder[id(value)]]
            layout._slots[key] = slot
            layout.local[key], layout.shapes[key] = slot.local, slot.shape
        elif id(value) in plain_ids:
            layout.local[key], layout.shapes[key] = value, tuple(value.shape)
            layout.params.append(value)
        else:  # computed by peft (prompt learning): copying into it would change nothing in the model
            raise Fsdp1Refused(
                f"the adapter's tensor {_clean(raw_key)} is computed by peft, not held by a parameter, and cannot be "
                "loaded into a FullyShardedDataParallel (FSDP1) model; nothing was loaded. Use FSDP2 (fully_shard) "
                "or DDP for this adapter type"
            )
    layout.params += _params_to_reset(loaded, owners)
    return layout


def _innermost(model: Any) -> Any:
    """The module FSDP1 wraps (FullyShardedDataParallel.module is the innermost one), or `model` itself."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return model.module if isinstance(model, FullyShardedDataParallel) else model


# The root unit around a registered model, looked for through gc once per model (the model does not refer to it; a
# scan of every object costs about 0.5 s in a process of 3 million): a weak reference to its handle, or None when no
# unit wraps the model itself. Weak both ways: the handle refers to the model, which must still be freed with it.
_ROOT_HANDLES: weakref.WeakKeyDictionary[Any, weakref.ref[Any] | None] = weakref.WeakKeyDictionary()


def _handles(model: Any, peft: Any) -> list[Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    handles = [u._handle for u in FullyShardedDataParallel.fsdp_modules(model) if u._handle is not None]
    if not any(h._fully_sharded_module is peft for h in handles):
        if peft not in _ROOT_HANDLES:
            found = _root_handle(peft)
            _ROOT_HANDLES[peft] = None if found is None else weakref.ref(found)
        ref = _ROOT_HANDLES[peft]
        root = None if ref is None else ref()
        if root is not None:
            handles.append(root)
    return handles


def _root_handle(peft: Any) -> Any:
    """The FlatParamHandle of the unit that wraps `peft` itself: it refers to it as its `_fully_sharded_module`
    (through its __dict__ on Python 3.11; directly where the dict is inlined)."""
    from torch.distributed.fsdp._flat_param import FlatParamHandle

    referrers = gc.get_referrers(peft)
    dicts = [r for r in referrers if isinstance(r, dict)]
    for holder in [*referrers, *(gc.get_referrers(*dicts) if dicts else ())]:  # two scans of the heap in all
        if isinstance(holder, FlatParamHandle) and holder._fully_sharded_module is peft:
            return holder
    return None


def _clean(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _checkpoint_key(raw: str, adapter_name: str) -> str:
    """peft's name for a tensor it was given under a name with FSDP1's wrapper segments: those go, and so does the
    adapter name peft could not take out when a segment came after it (`lora_A.default._fsdp_wrapped_module.weight`
    for a LoRA layer wrapped as its own unit), by peft's rule: it is the second-to-last part of the name."""
    key = _clean(raw)
    if key != raw:
        head, _, last = key.rpartition(".")
        key = f"{head.removesuffix('.' + adapter_name)}.{last}"
    return key


def _slots_by_name(peft: Any, handles: Iterable[Any]) -> tuple[dict[str, _Slot], dict[str, tuple[Any, int]]]:
    """Every flattened original parameter by its name in `peft.named_modules()` terms (FSDP1's wrapper segments
    included: peft picks the adapter's tensors by walking those modules): its slot, and (its handle, its index)."""
    prefixes = {id(m): name + "." if name else "" for name, m in peft.named_modules()}
    slots: dict[str, _Slot] = {}
    owners: dict[str, tuple[Any, int]] = {}
    for handle in handles:
        flat = handle.flat_param
        if not _holds_local_shard(handle, flat):
            raise Fsdp1Refused(
                "FullyShardedDataParallel (FSDP1) holds the full parameters right now (inside summon_full_params "
                "or a forward pass), not this rank's shard; nothing was loaded. Fork again between optimizer steps"
            )
        prefix = prefixes.get(id(handle._fully_sharded_module), "")
        for index, (fqn, shape, info) in enumerate(zip(flat._fqns, flat._shapes, flat._shard_param_infos, strict=True)):
            name = prefix + fqn
            if info.in_shard:
                offset = info.offset_in_shard
                local, start = flat.data[offset : offset + info.numel_in_shard], info.intra_param_start_idx
            else:
                local, start = flat.data[:0], 0
            slots[name] = _Slot(local, start, tuple(shape))
            owners[name] = (handle, index)
    return slots, owners


def _holds_local_shard(handle: Any, flat: Any) -> bool:
    """Whether the FlatParameter's data is now this rank's own full-precision shard (`_local_shard`, set at FSDP1's
    lazy init; before it, the sharded data itself), not the gathered or low-precision copy a forward uses."""
    shard = getattr(flat, "_local_shard", None)
    if shard is None:
        return not handle.uses_sharded_strategy or handle.is_sharded(flat)
    data = flat.data
    return bool(data.data_ptr() == shard.data_ptr() and data.dtype == shard.dtype and data.numel() == shard.numel())


def _refuse_uncovered(peft: Any, handles: Iterable[Any]) -> None:
    """Every flattened parameter must belong to a unit found: else its tensors could not be placed."""
    known: set[int] = set()
    for handle in handles:
        known.add(id(handle.flat_param))
        known.update(id(p) for p in getattr(handle.flat_param, "_params", None) or ())
    lost = [name for name, p in peft.named_parameters() if getattr(p, "_fsdp_flattened", False) and id(p) not in known]
    if lost:
        raise Fsdp1Refused(
            f"the FullyShardedDataParallel (FSDP1) unit holding {_names([_clean(n) for n in lost])} was not found "
            "from the registered model; nothing was loaded. Register the model FSDP1 wraps or the "
            "FullyShardedDataParallel module itself with sidecar.preload.register"
        )


def _placeholder(slot: _Slot) -> Any:
    import torch

    return torch.empty(slot.shape, device="meta")


def _params_to_reset(loaded: set[str], owners: Mapping[str, tuple[Any, int]]) -> list[Any]:
    """The parameters optimizers hold for the loaded tensors: the original ones with use_orig_params, else the
    FlatParameters holding them, each of which must hold nothing trainable besides the adapter's tensors."""
    params: list[Any] = []
    flats: dict[int, Any] = {}
    for name in sorted(loaded):
        handle, index = owners[name]
        if handle._use_orig_params:
            params.append(handle.flat_param._params[index])
        else:
            flats[id(handle)] = handle
    for handle in flats.values():
        others = sorted(_clean(name) for name, (h, _) in owners.items() if h is handle and name not in loaded)
        if handle.flat_param.requires_grad and others:
            raise Fsdp1Refused(
                f"FullyShardedDataParallel (FSDP1) without use_orig_params holds LoRA tensors together with "
                f"{len(others)} other trainable parameter(s) ({_names(others)}) in one FlatParameter, whose "
                "gradient and optimizer state cannot be reset for the LoRA part alone; nothing was loaded. Wrap "
                "with use_orig_params=True, or wrap the LoRA layers in their own units (peft's fsdp_auto_wrap_policy)"
            )
        params.append(handle.flat_param)
    return params


def _names(items: list[str]) -> str:
    more = f" and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return ", ".join(items[:_LIST_LIMIT]) + more
