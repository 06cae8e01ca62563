"""`load_adapter_from_checkpoint`: put a forked LoRA checkpoint into a live PEFT model, all or nothing.

Only `adapter_model.safetensors` is read (never pickle), once, into the trainer's memory, and its digest computed
over exactly those bytes alongside (sidecar/preload/checkpoint_read.py). Copies to a GPU are made from that buffer
page-locked for the while (sidecar/preload/host_pin.py).

Everything that can fail is checked before the model is touched: missing or unexpected keys, shapes, the LoRA
hyper-parameters in `adapter_config.json` (a different `lora_alpha` would silently rescale the update). When the
adapter's state dict is the parameters themselves (LoRA), each tensor is copied into its parameter with copy_ and at
once compared bit for bit with its file tensor cast to the parameter's dtype; other adapter
kinds go through peft's set_peft_model_state_dict and are compared after it. Then gradients of those
parameters are dropped and their optimizer state cleared, so the next step starts from the forked weights the way
a fresh start from that checkpoint would.

torch and peft are imported inside the functions: this module is imported by the agent, which must stay light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sidecar.preload.adapter_walk import live_adapter_tensors, walk_adapter_tensors
from sidecar.preload.bit_check import differing, local_shard
from sidecar.preload.checkpoint_read import (
    ALL_READERS,
    AdapterLoadError,
    CheckpointTensors,
    DigestThread,
    digest_of,
    read_checkpoint,
)
from sidecar.preload.fsdp1_slices import Fsdp1Layout, Fsdp1Refused, fsdp1_layout, is_fsdp1
from sidecar.preload.hashed_copy import copy_while_hashing, hashable_copies
from sidecar.preload.host_pin import pinned_for_copy, synchronize
from sidecar.preload.rollback import Rollback, optimizer_state
from sidecar.protocol.digest import DigestUnavailable, require_hasher
from sidecar.protocol.run_layout import ADAPTER_FILE, CONFIG_FILE

__all__ = [
    "ADAPTER_FILE",
    "AdapterLoadError",
    "CheckpointTensors",
    "PreparedLoad",
    "digest_of",
    "load_adapter_from_checkpoint",
    "local_shard",
    "lora_device",
    "prepare_adapter_load",
    "read_checkpoint",
]

_MAX_CONFIG = 1024 * 1024
# safetensors dtype name -> (torch dtype attribute, bytes per element), for each of LORA_DTYPES.
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
}
# Hyper-parameters that change what the same tensors mean; a mismatch is refused rather than loaded.
_CONFIG_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
_LIST_LIMIT = 5


def load_adapter_from_checkpoint(
    peft_model: Any,
    checkpoint_dir: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    optimizers: Iterable[Any] = (),
) -> str:
    """Load `checkpoint_dir/adapter_model.safetensors` into the active (or named) adapter of `peft_model`.

    Returns the adapter digest of the tensors read. Raises AdapterLoadError, with the model untouched, when the
    checkpoint does not fit the model. Call it between optimizer steps; `optimizers` get their state for the
    loaded parameters cleared (ART's trainer optimizer, the one passed to `sidecar.preload.register`, ...).
    """
    return prepare_adapter_load(peft_model, checkpoint_dir, adapter_name=adapter_name).apply(optimizers)


class PreparedLoad:
    """A checkpoint read, checked and cast for one model, not yet put into it (`apply`), or dropped (`discard`).

    The two halves let the ranks of a distributed job all read and check a fork before any of them changes its
    weights (sidecar/preload/rank_agreement.py)."""

    def __init__(self, peft_model: Any, name: str, tensors: CheckpointTensors, digest: DigestThread | None) -> None:
        self.model = peft_model
        self.name = name
        self.tensors = tensors
        # Hashing beside the read (None: not begun; a model on the CPU hashes while it copies, in apply).
        self._digest = digest
        self._digested: str | None = None  # the digest made by the copy (copy_while_hashing)
        self.live: dict[str, Any] = {}
        self.cast: dict[str, Any] = {}
        self._fsdp1: Fsdp1Layout | None = None
        self._undo: Rollback | None = None

    def digest(self) -> str:
        """The adapter digest of what was read (waits for the hashing threads)."""
        if self._digested is not None:
            return self._digested
        return self._hash().value()

    def _hash(self) -> DigestThread:
        """The hashing threads, started if they have not been (asked for the digest before the apply)."""
        if self._digest is None:
            self._digest = DigestThread(self.tensors)
            self._digest.start()
        return self._digest

    def apply(self, optimizers: Iterable[Any] = (), *, undoable: bool = False) -> str:
        """Put the tensors into the model and return the digest (see load_adapter_from_checkpoint). With
        `undoable`, what the apply changes is kept first, and `roll_back()` puts it back (also after an apply that
        failed half-way)."""
        import torch

        try:
            optimizers = list(optimizers)
            if self._fsdp1 is not None:  # views of this rank's FlatParameter slices: always copied into
                params, in_place = self._fsdp1.params, True
            else:
                params = _params_of(self.model, self.live.values())
                in_place = _shares_parameter_storage(self.live, params)
            # Not hashed yet (a CPU model's read has nothing following it): hashed by the copies where they can be.
            hash_while_copying = (
                self._digest is None
                and in_place
                and self._fsdp1 is None
                and hashable_copies(self.tensors, self.live, self.cast)
            )
            if not hash_while_copying:
                self._hash()
            if undoable:
                self._undo = Rollback(self.live, params, optimizers, lambda saved: self._put(saved, in_place))
            with torch.no_grad():
                if hash_while_copying:
                    self._digested = _copy_and_verify(self.live, self.cast, self.tensors.path, self.tensors)
                else:
                    self._put(self.cast, in_place)
                for p in params:
                    p.grad = None
                _clear_optimizer_state(optimizers, params)
                _drop_unsloth_decode_cache(params)
        finally:
            if self._digest is not None:
                self._digest.join()  # never leave the hashing thread reading a buffer we are done with
        return self.digest()

    def _put(self, tensors: Mapping[str, Any], in_place: bool) -> None:
        if in_place:
            _copy_and_verify(self.live, tensors, self.tensors.path)
            return
        _set_state(self.model, dict(tensors), self.name)
        # peft may have put new tensors in: ask the model again for what it now holds.
        _verify(walk_adapter_tensors(self.model, self.name), tensors, self.tensors.path)

    def roll_back(self) -> None:
        """Undo an `apply(undoable=True)`, finished or not; nothing to do if it never got to change anything."""
        if self._undo is not None:
            self._undo.restore()

    def discard(self) -> None:
        if self._digest is not None:
            self._digest.join()


def prepare_adapter_load(
    peft_model: Any,
    checkpoint_dir: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    digest_first: bool = False,
) -> PreparedLoad:
    """Read and check the checkpoint for `peft_model` and cast it to the live tensors' dtypes, devices and (for
    FSDP2's sharded DTensor parameters) placements; the model is not touched. Raises AdapterLoadError.

    `digest_first`: the digest will be asked for before the apply (the ranks of a job compare theirs first), so it
    follows the read on every device instead of being made by a CPU model's copies."""
    name = _adapter_name(peft_model, adapter_name)
    try:
        require_hasher()  # before anything is read: without it no digest can be made here
    except DigestUnavailable as e:
        raise AdapterLoadError(str(e)) from None
    fsdp1 = is_fsdp1(peft_model)
    device = lora_device(peft_model)
    # A model on the CPU is hashed while the tensors are copied into it (sidecar/preload/hashed_copy.py): nothing
    # follows its read, which then takes more cores. Elsewhere the hashing threads follow the read.
    hash_later = device is not None and device.type == "cpu" and not fsdp1 and not digest_first
    threads: list[DigestThread] = []

    def start_digest(tensors: CheckpointTensors) -> None:
        threads.append(DigestThread(tensors))
        threads[0].start()

    found: dict[str, Any] = {}

    def check(tensors: CheckpointTensors) -> None:
        """The fork against the model: the adapter's live tensors, the file's names and shapes, the config."""
        layout = _fsdp1_layout(peft_model, name) if fsdp1 else None
        if layout is not None:
            live, shapes = layout.local, layout.shapes
        else:
            live = live_adapter_tensors(peft_model, name)
            shapes = {key: tuple(t.shape) for key, t in live.items()}
        _check_keys_and_shapes(tensors, shapes, live)
        _check_config(Path(checkpoint_dir), peft_model, name)
        found.update(layout=layout, live=live)

    try:
        if hash_later:  # checked while the data is read: the checks need only the header
            tensors = read_checkpoint(Path(checkpoint_dir), meanwhile=check, readers=ALL_READERS)
        else:
            tensors = read_checkpoint(Path(checkpoint_dir), follow=start_digest)
    except BaseException:
        for thread in threads:
            thread.join()
        raise
    prepared = PreparedLoad(peft_model, name, tensors, threads[0] if threads else None)
    try:
        # Page-locking the buffer for copies to a GPU runs on a thread of its own while the fork is checked.
        gpu = device if device is not None and device.type == "cuda" else None
        with pinned_for_copy(tensors.data, gpu) as pin:
            if not found:
                check(tensors)
            layout = prepared._fsdp1 = found["layout"]
            live = prepared.live = found["live"]
            # Cast (and moved) before the model is touched: a cast that fails (out of memory) leaves it as it was.
            # Of the same dtype and device, the cast is the view of the bytes read.
            take = layout.take if layout is not None else lambda key, full: _like(full, live[key])
            pin.ready()  # copies start once the registration is over, never while the driver locks the pages
            try:
                prepared.cast = {key: take(key, _as_tensor(tensors, key)) for key in live}
            finally:
                synchronize(_gpus(live))  # the copies were queued (non_blocking); also those before one raised
    except BaseException:
        prepared.discard()
        raise
    return prepared


def _fsdp1_layout(peft_model: Any, name: str) -> Fsdp1Layout:
    try:
        return fsdp1_layout(peft_model, name)
    except Fsdp1Refused as e:
        raise AdapterLoadError(str(e)) from None


def lora_device(peft_model: Any) -> Any:
    """The device of the first trainable parameter (for an FSDP2 DTensor, of its local shard), where a LoRA lives;
    None if nothing is trainable. Needs no walk of the adapter's tensors."""
    for p in peft_model.parameters():
        if p.requires_grad:
            return local_shard(p).device
    return None


def _gpus(live: Mapping[str, Any]) -> set[Any]:
    return {device for device in (local_shard(t).device for t in live.values()) if device.type == "cuda"}


def _like(tensor: Any, live: Any) -> Any:
    """`tensor` (the file's, full size) as the live tensor holds it: same dtype and device, and for a DTensor
    (FSDP2 shards parameters as DTensors) the same mesh and placements. Every rank read the whole file, so each
    takes its own shard locally (src_data_rank=None: no communication).

    To a GPU the copy is queued (`non_blocking`, waited for by the caller): from page-locked memory it is then a DMA
    of the file's bytes, and a cast is made on the GPU after it, not on the CPU into pageable memory before it."""
    local = tensor.to(device=live.device, dtype=live.dtype, non_blocking=live.device.type == "cuda")
    mesh = getattr(live, "device_mesh", None)
    if mesh is None:
        return local
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(local, mesh, live.placements, src_data_rank=None)


def _drop_unsloth_decode_cache(params: Iterable[Any]) -> None:
    # Unsloth's fast_linear_forward keeps a dtype-cast copy of each LoRA weight as `weight._fast_lora` from its first
    # decode call on and never refreshes it: left in place, decoding would go on with the pre-fork weights.
    for p in params:
        if hasattr(p, "_fast_lora"):
            delattr(p, "_fast_lora")


def _adapter_name(peft_model: Any, requested: str | None) -> str:
    if requested is not None:
        names = getattr(peft_model, "peft_config", {})
        if requested not in names:
            raise AdapterLoadError(f"the model has no adapter {requested!r} (it has {sorted(names)})")
        return requested
    active = getattr(peft_model, "active_adapter", None)
    if isinstance(active, list | tuple):
        if len(active) != 1:
            raise AdapterLoadError(f"the model has {len(active)} active adapters {list(active)}; name one to load")
        active = active[0]
    if not isinstance(active, str):
        raise AdapterLoadError(f"{type(peft_model).__name__} is not a PEFT model with an active adapter")
    return active


def _check_keys_and_shapes(
    tensors: CheckpointTensors, shapes: Mapping[str, tuple[int, ...]], live: Mapping[str, Any]
) -> None:
    """`shapes`: the full shape of each live tensor (FSDP1 holds a flat slice of it in `live`)."""
    missing = sorted(set(shapes) - set(tensors.entries))
    unexpected = sorted(set(tensors.entries) - set(shapes))
    wrong = [
        f"{k} (file {list(tensors.entries[k].shape)}, model {list(shapes[k])})"
        for k in sorted(set(shapes) & set(tensors.entries))
        if tuple(tensors.entries[k].shape) != tuple(shapes[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} LoRA tensor(s) the model has: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model does not have: {_names(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_names(wrong)}")
    if problems:
        raise AdapterLoadError(f"{tensors.path} does not fit this model: {'; '.join(problems)}; nothing was loaded")
    for key, t in live.items():
        if t.device.type == "meta":
            raise AdapterLoadError(f"LoRA tensor {key} is on the meta device (not materialised); cannot load into it")


def _names(items: list[str]) -> str:
    more = f" and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return ", ".join(items[:_LIST_LIMIT]) + more


def _check_config(checkpoint_dir: Path, peft_model: Any, name: str) -> None:
    path = checkpoint_dir / CONFIG_FILE
    try:
        with open(path, "rb") as f:
            saved = json.loads(f.read(_MAX_CONFIG))
    except FileNotFoundError:
        return  # the tensors alone decide; shapes already match
    except (OSError, ValueError):
        raise AdapterLoadError(f"{path} is not readable JSON; fix or remove it") from None
    config = getattr(peft_model, "peft_config", {}).get(name)
    if not isinstance(saved, dict) or config is None:
        return
    for key in _CONFIG_KEYS:
        if key in saved and hasattr(config, key):
            ours, theirs = _plain(getattr(config, key)), _plain(saved[key])
            if ours != theirs and not (key.endswith("_pattern") and not ours and not theirs):
                raise AdapterLoadError(
                    f"{path} has {key}={theirs!r} but the live adapter {name!r} has {key}={ours!r}; "
                    "a fork must keep the LoRA configuration (nothing was loaded)"
                )


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _as_tensor(tensors: CheckpointTensors, key: str) -> Any:
    import torch

    e = tensors.entries[key]
    dtype = getattr(torch, _DTYPES[e.dtype][0])
    if e.end == e.begin:
        return torch.empty(e.shape, dtype=dtype)
    # A view of the read buffer: no copy unless the cast or the device move needs one.
    return torch.frombuffer(tensors.raw(key), dtype=dtype).reshape(e.shape)


def _params_of(peft_model: Any, live: Iterable[Any]) -> list[Any]:
    pointers = {local_shard(t).data_ptr() for t in live if local_shard(t).numel()}
    return [p for p in peft_model.parameters() if local_shard(p).numel() and local_shard(p).data_ptr() in pointers]


def _shares_parameter_storage(live: Mapping[str, Any], params: list[Any]) -> bool:
    """Whether every tensor of the adapter's state dict is a whole parameter (its storage, its shape): then it is
    loaded with copy_, the in-place copy load_state_dict makes too, without peft's generic key mapping (43 % of a
    reload). Adapter kinds whose state dict is computed (prompt learning) take peft's path. A zero-element local
    tensor (an FSDP2 shard of a dim smaller than the world size) has nothing to copy and counts as in place: else
    only the ranks holding one would take peft's path."""
    shards = [local_shard(p) for p in params]
    whole = {(p.data_ptr(), tuple(p.shape), p.dtype, p.device) for p in shards}
    return all(
        not t.numel() or (t.is_contiguous() and (t.data_ptr(), tuple(t.shape), t.dtype, t.device) in whole)
        for t in map(local_shard, live.values())
    )


def _set_state(peft_model: Any, cast: dict[str, Any], name: str) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, cast, adapter_name=name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:  # cannot happen after the key check; if peft disagrees, say so loudly
        raise AdapterLoadError(f"peft did not place {len(unexpected)} tensor(s): {_names(sorted(unexpected))}")


def _clear_optimizer_state(optimizers: Iterable[Any], params: list[Any]) -> None:
    for opt in optimizers:
        state = optimizer_state(opt)
        if state is not None:
            for p in params:
                state.pop(p, None)


def _copy_and_verify(
    live: Mapping[str, Any], cast: Mapping[str, Any], path: Path, read: CheckpointTensors | None = None
) -> str | None:
    """Copy each file tensor into its parameter and compare the parameter with it bit for bit at once, while both
    are still in the CPU's cache (a second pass over 100 MB after the load cost a third of the reload); on a GPU the
    comparisons are queued and read back once. Given the checkpoint `read` (copies that `hashable_copies` passed),
    the copies are made piece by piece by the digest's threads, and the digest is returned."""
    if read is not None:
        digest, bad = copy_while_hashing(read, live, cast)
        _refuse_differences(bad, path)
        return digest

    def copied() -> Iterator[tuple[str, Any, Any]]:
        for key in sorted(live):
            live[key].copy_(cast[key])
            yield key, live[key], cast[key]

    _refuse_differences(differing(copied()), path)
    return None


def _verify(after: Mapping[str, Any], cast: Mapping[str, Any], path: Path) -> None:
    missing = [k for k in sorted(cast) if k not in after]
    differ = differing((k, after[k], cast[k]) for k in sorted(cast) if k in after)
    _refuse_differences(sorted(missing + differ), path)


def _refuse_differences(bad: list[str], path: Path) -> None:
    if bad:
        raise AdapterLoadError(f"after loading {path}, {len(bad)} LoRA tensor(s) differ from the file: {_names(bad)}")
