"""Page-lock the read checkpoint while its tensors are copied to a GPU, and only then.

A copy to a GPU from ordinary (pageable) memory goes through the driver's staging buffers: 96 MiB took about 20 ms
on an H200 host, most of a fork's reload there. The same bytes page-locked with `cudaHostRegister` first, copied, and
unregistered took about 2.8 ms in all (a fresh pinned allocation took 115 ms; a cached one would keep the adapter's
size page-locked in the trainer for good). So the buffer the file was read into (sidecar/preload/checkpoint_read.py,
a mapping of its own) is registered for the copies and unregistered right after them.

What can go wrong, and what is done about it:
- The runtime: the functions are looked up through torch's own extension module, so they are the CUDA runtime that
  torch loaded, whose error state torch's next kernel launch reads. A failed call leaves its error there as "last
  error"; it is read back at once (`cudaGetLastError`), else torch would raise it later, inside the load or in
  training. ROCm builds are left alone (their runtime is named differently).
- The device: registering makes the calling thread's current device's context current (creating it if need be), so
  it runs under a guard for the LoRA's own device; a process using only GPU 3 gets no context on GPU 0.
- An unregistration that fails leaves the pages locked: the buffer is then kept for the life of the process instead
  of being unmapped under the driver.
- Anything refused (no CUDA runtime found, too small to pay, registration failing) falls back to pageable copies,
  which are correct, only slower.

torch is imported inside the functions, like the rest of the preload.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["PIN_MIN_BYTES", "pinned_for_copy"]

_logger = logging.getLogger("fork_sidecar.preload")
# Below this many bytes bound for a GPU, registering (a page-table walk and a driver call each way) is not worth it.
PIN_MIN_BYTES = 8 * 1024 * 1024
_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every context, not only the current device's
_KEPT: list[Any] = []  # buffers whose unregistration failed: never unmapped while the driver may still lock them
_KEPT_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Runtime:
    register: Callable[[int, int, int], int]
    unregister: Callable[[int], int]
    last_error: Callable[[], int]


@contextlib.contextmanager
def pinned_for_copy(buffer: memoryview, device: Any, gpu_bytes: int) -> Iterator[bool]:
    """While inside, `buffer` is page-locked (yields True) or left pageable (yields False, nothing to undo).

    `device`: the GPU most of the copies go to (None: no GPU); `gpu_bytes`: how many bytes of the buffer go to GPUs.
    The caller makes its copies inside and waits for them (a stream synchronize) before leaving; leaving waits for
    the device's current stream again before unregistering, so no copy can still be reading the pages."""
    runtime = _runtime() if device is not None and gpu_bytes >= PIN_MIN_BYTES and len(buffer) else None
    if runtime is None:
        yield False
        return
    import torch

    address = _address(buffer)
    with torch.cuda.device(device):
        if runtime.register(address, len(buffer), _PORTABLE) != 0:
            _clear(runtime, "cudaHostRegister")
            yield False
            return
        try:
            yield True
        finally:
            try:
                torch.cuda.current_stream(device).synchronize()
            finally:
                if runtime.unregister(address) != 0:
                    _clear(runtime, "cudaHostUnregister")
                    with _KEPT_LOCK:
                        _KEPT.append(buffer)


def _address(buffer: memoryview) -> int:
    holder = ctypes.c_char.from_buffer(buffer)  # needs a writable buffer: the read buffer is one
    try:
        return ctypes.addressof(holder)
    finally:
        del holder  # releases the export, so the mapping can be unmapped once the tensors are gone


def _clear(runtime: _Runtime, call: str) -> None:
    error = runtime.last_error()  # reads and resets this thread's last error, which torch would otherwise raise
    _logger.info("fork-sidecar: %s failed (CUDA error %d); copying the checkpoint from pageable memory", call, error)


@functools.cache
def _runtime() -> _Runtime | None:
    """The CUDA runtime torch uses, or None (a CPU or ROCm build, or a runtime whose functions cannot be found)."""
    import torch

    if getattr(torch.version, "hip", None) or not getattr(torch.version, "cuda", None):
        return None
    try:
        # dlsym on the extension's handle searches the libraries it was loaded with: torch's libcudart.
        library = ctypes.CDLL(torch._C.__file__)
    except OSError:
        return None
    return _lookup(library)


def _lookup(library: ctypes.CDLL) -> _Runtime | None:
    """The three functions in `library` (or what it was loaded with), or None if any is missing."""
    try:
        register, unregister, last_error = (
            library.cudaHostRegister,
            library.cudaHostUnregister,
            library.cudaGetLastError,
        )
    except AttributeError:
        return None
    register.argtypes, register.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint], ctypes.c_int
    unregister.argtypes, unregister.restype = [ctypes.c_void_p], ctypes.c_int
    last_error.argtypes, last_error.restype = [], ctypes.c_int
    return _Runtime(register, unregister, last_error)
