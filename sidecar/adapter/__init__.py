"""LoRA adapter checks and the adapter digest, from safetensors headers and byte ranges; nothing here loads tensors.

A check reads `adapter_config.json` and the safetensors header, the digest reads each tensor's byte range in
`CHUNK_BYTES` pieces, one bounded buffer per hashing thread. The parts, by concern:
  sidecar/protocol/safetensors_header.py  the header parser (shared with the preload), dtypes
  errors.py                               AdapterError and the advice its sentences end with
  files.py                                headers and digests of files open as descriptors
  tree.py                                 the walk of a checkpoint tree and its bounds
  lora.py                                 peft's LoRA rules (names, pairs, ranks, dtypes, adapter_config.json)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sidecar.adapter.errors import CONFIG_ADVICE, AdapterError
from sidecar.adapter.files import (
    ADAPTER_FILE,
    SafetensorsHeader,
    adapter_digest,
    digest_open_file,
    open_checkpoint_dir,
    open_regular,
    read_header,
    read_small_file,
)
from sidecar.adapter.lora import check_lora_tensors, parse_lora_config
from sidecar.adapter.tree import CheckpointEntry, TreeLimits, walk_checkpoint
from sidecar.protocol.run_layout import CONFIG_FILE
from sidecar.protocol.safetensors_header import DTYPE_BITS, TensorEntry, parse_header, printable

__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "DTYPE_BITS",
    "AdapterError",
    "AdapterInfo",
    "CheckpointEntry",
    "SafetensorsHeader",
    "TensorEntry",
    "TreeLimits",
    "adapter_digest",
    "check_adapter",
    "digest_open_file",
    "open_checkpoint_dir",
    "parse_header",
    "printable",
    "read_header",
    "walk_checkpoint",
]

MAX_CONFIG_BYTES = 16 << 20


@dataclass(frozen=True)
class AdapterInfo:
    dir: Path
    rank: int  # `r` from adapter_config.json
    max_rank: int  # the largest rank of any module (rank_pattern may raise it): vLLM's --max-lora-rank must cover it
    alpha: float | None
    target_modules: tuple[str, ...]  # as configured; a regex string is a 1-tuple
    modules: tuple[str, ...]  # module paths carrying LoRA weights, without `base_model.model.`
    tensors: tuple[TensorEntry, ...]  # sorted by name
    tensor_bytes: int
    total_bytes: int  # all regular files of the checkpoint
    files: tuple[str, ...]  # relative paths ("/"-separated), sorted


def check_adapter(checkpoint_dir: Path, *, dir_fd: int | None = None, limits: TreeLimits | None = None) -> AdapterInfo:
    """Checks that `checkpoint_dir` holds a well-formed peft LoRA adapter, reading headers only.

    With `dir_fd`, checks the directory already open as `dir_fd` (`checkpoint_dir` only names it).
    Raises AdapterError with one sentence naming the file and what to do.
    """
    fd = dir_fd if dir_fd is not None else open_checkpoint_dir(checkpoint_dir)
    try:
        return _check_open_dir(checkpoint_dir, fd, limits)
    finally:
        if dir_fd is None:
            os.close(fd)


def _check_open_dir(checkpoint_dir: Path, dir_fd: int, limits: TreeLimits | None) -> AdapterInfo:
    config_path = printable(checkpoint_dir / CONFIG_FILE)
    model_path = printable(checkpoint_dir / ADAPTER_FILE)
    entries = walk_checkpoint(dir_fd, checkpoint_dir, limits)
    top_level = {e.relpath for e in entries if "/" not in e.relpath and not e.is_dir}
    if ADAPTER_FILE not in top_level:
        hint = (
            "only safetensors adapters are supported — re-save with safe_serialization=True"
            if "adapter_model.bin" in top_level
            else "the directory is not a LoRA checkpoint — point the fork at one"
        )
        raise AdapterError(checkpoint_dir, f"{model_path}: missing; {hint}.")
    if CONFIG_FILE not in top_level:
        raise AdapterError(
            checkpoint_dir, f"{config_path}: missing; a peft checkpoint has one — re-save the checkpoint."
        )
    try:
        config = parse_lora_config(read_small_file(CONFIG_FILE, dir_fd, config_path, MAX_CONFIG_BYTES, CONFIG_ADVICE))
    except ValueError as exc:
        raise AdapterError(checkpoint_dir / CONFIG_FILE, f"{config_path}: {exc}; {CONFIG_ADVICE}.") from None
    fd = open_regular(ADAPTER_FILE, dir_fd, model_path)
    try:
        header = read_header(fd, checkpoint_dir / ADAPTER_FILE)
    finally:
        os.close(fd)
    ranks = check_lora_tensors(header.tensors, config, model_path)
    files = [e for e in entries if not e.is_dir]
    return AdapterInfo(
        dir=checkpoint_dir,
        rank=config.rank,
        max_rank=max(ranks.values()),
        alpha=config.alpha,
        target_modules=config.target_modules,
        modules=tuple(sorted(ranks)),
        tensors=header.tensors,
        tensor_bytes=sum(t.nbytes for t in header.tensors),
        total_bytes=sum(e.stat.st_size for e in files),
        files=tuple(e.relpath for e in files),
    )
