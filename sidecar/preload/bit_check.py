"""Bit for bit: whether a LoRA tensor put into a model holds exactly the file's tensor it came from, compared as
integers of the same width (NaNs equal to themselves, -0.0 unequal to 0.0); memcmp where that is faster.

torch is imported inside the functions, like the rest of the preload.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["c_memcmp", "differing", "local_shard", "same_bits"]


def local_shard(tensor: Any) -> Any:
    """The part of a tensor this process holds (a DTensor's local shard; any other tensor itself)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


# Below this many torch intra-op threads, one memcmp of a CPU tensor beats torch.equal of its integer view: on the
# 2-core machine, 94 MiB compared right after each tensor's copy cost 11 ms by memcmp against 41 ms by torch.equal on
# one thread (and 2 threads were slower still there, the cores being busy); on 16 cores torch.equal took 6 ms against
# 17 ms for one memcmp. torch.equal's share of the work per thread reaches memcmp's at about 4 threads.
_MEMCMP_BELOW_THREADS = 4
# Element size -> the torch integer dtype of that width, by name (torch is imported only inside the functions).
_INT_NAMES = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def same_bits(a: Any, b: Any) -> bool:
    """Bitwise (as integers of the same width), so NaNs in a checkpoint compare equal to themselves and -0.0 differs
    from 0.0. torch.equal runs on every intra-op thread: on 16 cores 3x faster than one memcmp over 96 MiB; with
    few threads, CPU tensors are compared by memcmp."""
    import torch

    a, b = local_shard(a), local_shard(b)  # DTensors: this rank's shards (the same placements, cast by _like)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    memcmp = c_memcmp()
    if memcmp is not None and _compare_by_memcmp(a, b, torch.get_num_threads()):
        return memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    view = getattr(torch, _INT_NAMES[a.element_size()])
    return bool(torch.equal(a.detach().contiguous().view(view), b.detach().contiguous().view(view)))


def differing(pairs: Iterable[tuple[str, Any, Any]]) -> list[str]:
    """The keys of the (key, a, b) pairs whose tensors differ (`same_bits`), in order. Pairs on a GPU are compared
    there and read back once for all of them: torch.equal's bool waits for the GPU on every tensor."""
    import torch

    bad, on_gpu = [], []
    for key, a, b in pairs:
        la, lb = local_shard(a), local_shard(b)
        if la.device.type == "cuda" and lb.device == la.device and la.dtype == lb.dtype and la.shape == lb.shape:
            view = getattr(torch, _INT_NAMES[la.element_size()])
            on_gpu.append((key, torch.ne(la.detach().view(view), lb.detach().view(view)).any()))
        elif not same_bits(a, b):
            bad.append(key)
    if on_gpu:
        flags = torch.stack([flag for _, flag in on_gpu]).tolist()
        bad += [key for (key, _), flag in zip(on_gpu, flags, strict=True) if flag]
    return bad


def _compare_by_memcmp(a: Any, b: Any, threads: int) -> bool:
    """Whether memcmp can compare the two (same dtype and shape) and is the faster way here (if it can be loaded)."""
    on_cpu = a.device.type == "cpu" and b.device.type == "cpu"
    return threads < _MEMCMP_BELOW_THREADS and on_cpu and a.is_contiguous() and b.is_contiguous()


@functools.cache
def c_memcmp() -> Callable[[int, int, int], int] | None:
    """The C library's memcmp, or None where none can be loaded (not expected on Linux): torch.equal then."""
    try:
        function = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return function  # type: ignore[no-any-return]
