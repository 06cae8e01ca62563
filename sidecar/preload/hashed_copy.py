"""Copying a checkpoint's tensors into CPU parameters inside the digest's own pass over them.

For a model on the CPU the digest's thread pool (sidecar/protocol/digest.py) walks every 4 MiB piece of the read
buffer anyway. Here each thread first copies its piece into the parameter (memmove) and compares the two bit for bit
(memcmp), then hashes it: every byte is brought into the CPU's cache once for all three, on every core, where the
digest following the read and a copy after it took the cores from each other (on 16 cores: read 5 ms alone, 19 ms
beside the hashing threads; the copy and its check 9-11 ms on the training thread).

Only for tensors that are, byte for byte, what was read: a plain CPU tensor whose cast is the view of the buffer (same
dtype), both contiguous and of the file's length, each parameter a separate piece of memory. Anything else is copied
by torch (sidecar/preload/peft_load.py). memmove and memcmp are the C library's, called through ctypes, which releases
the GIL for them, as blake3 does for hashing.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Mapping
from typing import Any

from sidecar.preload import checkpoint_read
from sidecar.preload.bit_check import c_memcmp

__all__ = ["copy_while_hashing", "hashable_copies"]


def hashable_copies(read: checkpoint_read.CheckpointTensors, live: Mapping[str, Any], cast: Mapping[str, Any]) -> bool:
    """Whether `copy_while_hashing` may put `cast` into `live`: every pair is plain, on the CPU, contiguous, of one
    dtype and of the file's length, the cast is the read buffer's own bytes, and no two live tensors overlap."""
    if c_memcmp() is None or set(live) != set(cast):
        return False
    base = _address(read.data) if read.data.nbytes else 0
    spans = []
    for key, target in live.items():
        source, entry = cast[key], read.entries[key]
        nbytes = entry.end - entry.begin
        if not _plain_cpu(target) or not _plain_cpu(source) or source.dtype != target.dtype:
            return False
        if target.numel() * target.element_size() != nbytes or source.numel() * source.element_size() != nbytes:
            return False
        if nbytes and source.data_ptr() != base + entry.begin:
            return False  # a copy made by the cast: not the bytes the digest covers
        if nbytes:
            spans.append((target.data_ptr(), target.data_ptr() + nbytes))
    spans.sort()
    return all(end <= begin for (_, end), (begin, _) in itertools.pairwise(spans))


def copy_while_hashing(
    read: checkpoint_read.CheckpointTensors, live: Mapping[str, Any], cast: Mapping[str, Any]
) -> tuple[str, list[str]]:
    """Copy every piece of `cast` into `live` (checked by `hashable_copies`), compare it, and hash it: (the adapter
    digest of the bytes read, the sorted keys whose copy differs). Autograd learns of the in-place change as from
    `copy_` (each tensor's version counter is bumped), so a graph saved before the load cannot be run over it."""
    memcmp = c_memcmp()
    assert memcmp is not None  # hashable_copies said so
    # The tensors themselves stay referenced here until every hashing thread has ended (digest_of waits for them).
    targets = {key: (live[key], cast[key], live[key].data_ptr(), cast[key].data_ptr()) for key in live}
    bad: set[str] = set()

    def copy_piece(name: str, offset: int, length: int) -> None:
        _, _, target, source = targets[name]
        ctypes.memmove(target + offset, source + offset, length)
        if memcmp(target + offset, source + offset, length) != 0:
            bad.add(name)

    try:
        digest = checkpoint_read.digest_of(read, before_hash=copy_piece)
    finally:  # also after a failure half-way: some tensors may have changed
        for tensor, *_ in targets.values():
            tensor.view(-1)[:0].zero_()  # an in-place op on no element: the version counter moves, nothing else
    if digest is None:  # cannot happen: the read was complete before the load began
        raise checkpoint_read.AdapterLoadError(f"{read.path} could not be read completely")
    return digest, sorted(bad)


def _plain_cpu(tensor: Any) -> bool:
    return (
        tensor.device.type == "cpu"
        and getattr(tensor, "device_mesh", None) is None
        and not tensor.is_sparse
        and tensor.is_contiguous()
    )


def _address(view: memoryview) -> int:
    """Where a (non-empty, writable) memoryview's bytes are."""
    import torch

    return int(torch.frombuffer(view, dtype=torch.uint8).data_ptr())
