"""Sharding wrappers the agent cannot load a fork into, named before anything of the checkpoint touches the model.

FullyShardedDataParallel (FSDP1) flattens the parameters of each wrapped unit into one FlatParameter and shards that:
with `use_orig_params=True` each LoRA parameter becomes a 1-D slice of it (an empty one on a rank that holds none of
it), without it the model has no LoRA parameters left at all. No checkpoint tensor fits either, and loading would
take FSDP1's `summon_full_params`, a collective of its own, inside the agreed step. FSDP2 (`fully_shard`) keeps each
parameter a DTensor shard, which the agent loads shard by shard (peft_load._like). Imports nothing: it reads
attributes FSDP1 sets (`_fsdp_flattened`) on the parameters it flattened.
"""

from __future__ import annotations

from typing import Any

__all__ = ["unloadable_wrapper"]


def unloadable_wrapper(model: Any) -> str | None:
    """A sentence saying why a fork cannot be loaded into `model` as it is wrapped, or None when it can."""
    for param in model.parameters():
        # FSDP2 marks its DTensor parameters too; only FSDP1's plain flattened ones have no device mesh.
        if getattr(param, "_fsdp_flattened", False) and getattr(param, "device_mesh", None) is None:
            return (
                "the model is wrapped by FullyShardedDataParallel (FSDP1), whose flattened, sharded parameters no "
                "checkpoint tensor fits; nothing was loaded. Shard it with FSDP2 "
                "(torch.distributed.fsdp.fully_shard), which fork-sidecar loads shard by shard"
            )
    return None
