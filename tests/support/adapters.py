"""Real LoRA adapter checkpoint directories for tests and benchmarks (safetensors + numpy, no torch).

`write_adapter(dir)` writes what `peft`'s `save_pretrained` writes for a Llama-style model:
`adapter_model.safetensors` with `base_model.model.model.layers.<i>.<block>.<module>.lora_{A,B}.weight`
tensors (A: [r, hidden], B: [hidden, r]) written by the safetensors package itself, plus
`adapter_config.json` and a README.md. It returns the tensors it wrote (name -> dtype, shape, raw
bytes) so a test can compute expectations independently of the code under test.

For malformed files, `write_raw_safetensors` writes any header (object or bytes) and data verbatim.
`write_big_adapter` writes a few large tensors quickly, for benchmarks.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import safetensors

__all__ = [
    "ATTENTION_MODULES",
    "PEFT_METADATA",
    "RawTensor",
    "WrittenAdapter",
    "float_bytes",
    "lora_tensor_name",
    "lora_tensors",
    "write_adapter",
    "write_adapter_config",
    "write_big_adapter",
    "write_raw_safetensors",
    "write_safetensors",
]

RawTensor = tuple[str, tuple[int, ...], bytes]  # (safetensors dtype, shape, little-endian bytes)

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

# safetensors header dtype -> the dtype name safetensors' serializer takes.
_SERIALIZER_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
PEFT_METADATA: Mapping[str, str] = MappingProxyType({"format": "pt"})  # what peft writes into the header


@dataclass(frozen=True)
class WrittenAdapter:
    dir: Path
    tensors: dict[str, RawTensor]
    config: dict[str, Any]
    files: tuple[str, ...] = field(default=())  # relative paths of every file written, sorted

    @property
    def model_file(self) -> Path:
        return self.dir / "adapter_model.safetensors"


def lora_tensor_name(layer: int, module: str, kind: str = "A") -> str:
    """The name peft gives a Llama layer's LoRA weight, e.g. lora_tensor_name(0, "q_proj", "B")."""
    block = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{kind}.weight"


def float_bytes(values: np.ndarray, dtype: str) -> bytes:
    """float32 values as raw little-endian bytes of a safetensors float dtype (BF16 by truncation)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    if dtype == "F64":
        return values.astype("<f8").tobytes()
    if dtype == "BF16":  # numpy has no bfloat16: keep the top 16 bits of each float32
        return (values.view("<u4") >> 16).astype("<u2").tobytes()
    raise ValueError(f"not a float dtype: {dtype}")


def lora_tensors(
    *,
    rank: int = 4,
    modules: Iterable[str] = ("q_proj", "v_proj"),
    layers: int = 2,
    hidden: int = 128,
    dtype: str = "F32",
    seed: int = 0,
    rank_pattern: Mapping[str, int] | None = None,
) -> dict[str, RawTensor]:
    """LoRA A/B tensors for `layers` x `modules` with random (seeded) values.

    `rank_pattern` maps a module name (e.g. "v_proj") to its own rank, as peft's rank_pattern does.
    """
    rng = np.random.default_rng(seed)
    pattern = dict(rank_pattern or {})
    tensors: dict[str, RawTensor] = {}
    for layer in range(layers):
        for module in modules:
            r = pattern.get(module, rank)
            a = rng.standard_normal((r, hidden), dtype=np.float32) * 0.02
            b = rng.standard_normal((hidden, r), dtype=np.float32) * 0.02
            tensors[lora_tensor_name(layer, module, "A")] = (dtype, (r, hidden), float_bytes(a, dtype))
            tensors[lora_tensor_name(layer, module, "B")] = (dtype, (hidden, r), float_bytes(b, dtype))
    return tensors


def write_safetensors(path: Path, tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` with the safetensors package's own serializer."""
    buffers = [np.frombuffer(raw, dtype=np.uint8) if raw else np.zeros(1, np.uint8) for _, _, raw in tensors.values()]
    specs = {
        name: safetensors.TensorSpec(
            dtype=_SERIALIZER_DTYPES[dtype], shape=list(shape), data_ptr=buf.ctypes.data, data_len=len(raw)
        )
        for (name, (dtype, shape, raw)), buf in zip(tensors.items(), buffers, strict=True)
    }
    safetensors.serialize_file(specs, os.fspath(path), metadata=dict(metadata) if metadata else None)
    del buffers  # kept alive until the serializer has read them


def write_raw_safetensors(
    path: Path, header: Mapping[str, Any] | bytes, data: bytes = b"", *, header_len: int | None = None
) -> None:
    """Writes a safetensors-shaped file verbatim: u64 header length, header, data (for malformed cases)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len))
        f.write(raw)
        f.write(data)


def write_adapter_config(
    directory: Path,
    *,
    rank: int = 4,
    alpha: float | None = 8,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    rank_pattern: Mapping[str, int] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes a peft-style adapter_config.json; `overrides` replaces or adds keys (None values delete)."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": {},
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    for key, value in (overrides or {}).items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def write_adapter(
    directory: Path,
    *,
    rank: int = 4,
    modules: Iterable[str] = ("q_proj", "v_proj"),
    layers: int = 2,
    hidden: int = 128,
    dtype: str = "F32",
    seed: int = 0,
    alpha: float | None = 8,
    rank_pattern: Mapping[str, int] | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = PEFT_METADATA,
    extra_files: Mapping[str, bytes | str] | None = None,
    readme: bool = True,
) -> WrittenAdapter:
    """Writes a complete LoRA checkpoint directory (created if missing) and returns what it wrote.

    `extra_files` maps relative paths (subdirectories allowed) to contents, e.g. {"tokenizer.json": "{}"}.
    Different `seed`s give different weights, hence different adapter digests.
    """
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"LoRA dtype must be one of {_FLOAT_DTYPES}, not {dtype}")
    modules = tuple(modules)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = lora_tensors(
        rank=rank, modules=modules, layers=layers, hidden=hidden, dtype=dtype, seed=seed, rank_pattern=rank_pattern
    )
    write_safetensors(directory / "adapter_model.safetensors", tensors, metadata)
    config = write_adapter_config(
        directory,
        rank=rank,
        alpha=alpha,
        target_modules=modules,
        rank_pattern=rank_pattern,
        overrides=config_overrides,
    )
    files = {"adapter_model.safetensors", "adapter_config.json"}
    if readme:
        (directory / "README.md").write_text(f"# test adapter (seed {seed})\n")
        files.add("README.md")
    for relpath, content in (extra_files or {}).items():
        target = directory / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        files.add(relpath)
    return WrittenAdapter(directory, tensors, config, tuple(sorted(files)))


def write_big_adapter(
    directory: Path, size_bytes: int, *, tensors: int = 4, dtype: str = "BF16", rank: int = 64, seed: int = 0
) -> Path:
    """Writes a LoRA checkpoint of about `size_bytes` made of a few large A/B pairs (random bytes).

    The values are random bit patterns, not meaningful floats: good enough for copy and digest timing.
    """
    if tensors < 2 or tensors % 2:
        raise ValueError("tensors must be an even number >= 2 (A/B pairs)")
    directory.mkdir(parents=True, exist_ok=True)
    itemsize = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}[dtype]
    per_tensor = max(size_bytes // tensors, rank * itemsize)
    width = max(per_tensor // (rank * itemsize), 1)
    rng = np.random.default_rng(seed)
    written: dict[str, RawTensor] = {}
    for pair in range(tensors // 2):
        for kind, shape in (("A", (rank, width)), ("B", (width, rank))):
            raw = rng.bytes(rank * width * itemsize)
            written[lora_tensor_name(pair, "q_proj", kind)] = (dtype, shape, raw)
    write_safetensors(directory / "adapter_model.safetensors", written, {"format": "pt"})
    write_adapter_config(directory, rank=rank, target_modules=("q_proj",))
    (directory / "README.md").write_text("# benchmark adapter\n")
    return directory
