"""peft's LoRA rules, checked on a safetensors header and adapter_config.json: tensor names, pairs, ranks, dtypes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.adapter.errors import LORA_ADVICE, AdapterError
from sidecar.protocol.run_layout import CONFIG_FILE
from sidecar.protocol.safetensors_header import LORA_DTYPES, HeaderProblem, TensorEntry, printable, strict_json_object

__all__ = ["PEFT_PREFIX", "LoraConfig", "check_lora_tensors", "parse_lora_config"]

# peft saves LoRA weights as `base_model.model.<module path>.<suffix>` (the adapter name stripped).
PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES: Mapping[str, str] = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "B_bias",  # LoraConfig(lora_bias=True)
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude",  # DoRA
}
_KIND_NAMES = {"A": "lora_A", "B": "lora_B", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B"}
# Full (non-LoRA) tensors peft may save beside LoRA weights: `modules_to_save` and embedding layers
# (peft's EMBEDDING_LAYER_NAMES, saved with save_embedding_layers).
_EMBEDDING_LAYERS = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float | None
    rank_pattern: Mapping[str, int]
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]

    def rank_for(self, module: str) -> int:
        # peft's get_pattern_key: the first pattern key that matches the module path as a dotted suffix.
        for key, rank in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return rank
        return self.rank


def parse_lora_config(raw: bytes) -> LoraConfig:
    """Pure: adapter_config.json bytes -> the parts the checks need (ValueError on a problem)."""
    obj = strict_json_object(raw, CONFIG_FILE)
    peft_type = obj.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise HeaderProblem(f"peft_type is {peft_type!r:.40}, and only LoRA adapters can be forked")
    rank = obj.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise HeaderProblem(f"r is {rank!r:.40}, not a positive integer")
    alpha = obj.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float)):
        raise HeaderProblem(f"lora_alpha is {alpha!r:.40}, not a number")
    pattern = obj.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pattern.values()
    ):
        raise HeaderProblem("rank_pattern is not a mapping of module patterns to positive integers")
    for key in pattern:
        try:
            re.compile(key)
        except re.error as exc:
            raise HeaderProblem(f"rank_pattern key {key!r:.60} is not a regular expression ({exc})") from None
    return LoraConfig(
        rank=rank,
        alpha=float(alpha) if alpha is not None else None,
        rank_pattern=dict(pattern),
        target_modules=_string_tuple(obj.get("target_modules"), "target_modules"),
        modules_to_save=_string_tuple(obj.get("modules_to_save"), "modules_to_save"),
    )


def _string_tuple(value: object, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise HeaderProblem(f"{key} is not a string or a list of strings")


def _split_lora_name(name: str) -> tuple[str, str] | None:
    """(module path, kind) for a peft LoRA tensor name, else None."""
    if not name.startswith(PEFT_PREFIX):
        return None
    for suffix, kind in _LORA_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(PEFT_PREFIX) + len(suffix):
            return name[len(PEFT_PREFIX) : -len(suffix)], kind
    return None


def _is_saved_module_tensor(name: str, config: LoraConfig) -> bool:
    if not name.startswith(PEFT_PREFIX) or "." not in name[len(PEFT_PREFIX) :]:
        return False
    path = "." + name[len(PEFT_PREFIX) :].rsplit(".", 1)[0] + "."
    return any(f".{module}." in path for module in (*config.modules_to_save, *_EMBEDDING_LAYERS))


def _check_module(module: str, parts: Mapping[str, TensorEntry], config: LoraConfig, display: str) -> int:
    """Checks one module's LoRA tensors against each other and the config; returns its rank."""
    expected = config.rank_for(module)
    rank = -1
    for a_kind, b_kind, exact_ndim in (("A", "B", None), ("emb_A", "emb_B", 2)):
        a, b = parts.get(a_kind), parts.get(b_kind)
        if a is None and b is None:
            continue
        if a is None or b is None:
            present = a or b
            assert present is not None
            raise AdapterError(
                display,
                f"{display}: tensor {printable(present.name)} has no partner "
                f"({_KIND_NAMES[a_kind]} and {_KIND_NAMES[b_kind]} come in pairs); "
                f"{LORA_ADVICE}.",
            )
        for entry, rank_axis in ((a, 0), (b, 1)):
            ndim_ok = len(entry.shape) == exact_ndim if exact_ndim else len(entry.shape) >= 2
            if not ndim_ok:
                raise AdapterError(
                    display,
                    f"{display}: tensor {printable(entry.name)} has shape {list(entry.shape)}, not a LoRA matrix; "
                    f"{LORA_ADVICE}.",
                )
            if entry.shape[rank_axis] != expected:
                raise AdapterError(
                    display,
                    f"{display}: tensor {printable(entry.name)} has shape {list(entry.shape)}, rank "
                    f"{entry.shape[rank_axis]}, but adapter_config.json gives r={expected} for module "
                    f"{printable(module)}; the config and the weights disagree — re-save the checkpoint.",
                )
        rank = expected
    if rank < 0:
        extra = next(iter(parts.values()))
        raise AdapterError(
            display, f"{display}: tensor {printable(extra.name)} belongs to no lora_A/lora_B pair; {LORA_ADVICE}."
        )
    bias = parts.get("B_bias")
    if bias is not None and (len(bias.shape) != 1 or "B" not in parts or bias.shape[0] != parts["B"].shape[0]):
        raise AdapterError(
            display,
            f"{display}: tensor {printable(bias.name)} has shape {list(bias.shape)}, which does not fit its "
            f"lora_B; {LORA_ADVICE}.",
        )
    return rank


def check_lora_tensors(tensors: tuple[TensorEntry, ...], config: LoraConfig, display: str) -> dict[str, int]:
    """Returns {module path: rank}; raises AdapterError for the first tensor that breaks a rule."""
    modules: dict[str, dict[str, TensorEntry]] = {}
    for entry in tensors:
        split = _split_lora_name(entry.name)
        if split is None:
            if _is_saved_module_tensor(entry.name, config):
                continue
            raise AdapterError(
                display,
                f"{display}: tensor {printable(entry.name)} is not a LoRA tensor (expected names like "
                f"base_model.model.<module>.lora_A.weight); {LORA_ADVICE}.",
            )
        if entry.dtype not in LORA_DTYPES:
            raise AdapterError(
                display,
                f"{display}: tensor {printable(entry.name)} has dtype {entry.dtype}; LoRA weights are F16, BF16, "
                "F32 or F64 — re-save the checkpoint.",
            )
        module, kind = split
        modules.setdefault(module, {})[kind] = entry
    if not modules:
        raise AdapterError(display, f"{display}: holds no LoRA tensors; {LORA_ADVICE}.")
    return {module: _check_module(module, parts, config, display) for module, parts in modules.items()}
