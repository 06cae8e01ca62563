"""Page-lock the read checkpoint while its tensors are copied to a GPU, and only then.

A copy to a GPU from ordinary (pageable) memory goes through the driver's staging buffers: 96 MiB took about 20 ms
on an H200 host, most of a fork's reload there. The same bytes page-locked with `cudaHostRegister` first, copied, and
unregistered took about 2.8 ms in all (a fresh pinned allocation took 115 ms; a cached one would keep the adapter's
size page-locked in the trainer for good). So the buffer the file was read into (sidecar/preload/checkpoint_read.py,
a mapping of its own) is registered for the copies and unregistered right after them.

What can go wrong, and what is done about it:
- The runtime: the functions are looked up through torch's own extension module, so they are the CUDA runtime that
  torch loaded, whose error state torch's next kernel launch reads. A failed call leaves its error there as the
  calling thread's "last error"; the calls run on threads of their own, which read it back at once
  (`cudaGetLastError`), so no training or agent thread's kernel launch ever raises it. ROCm builds are left alone
  (their runtime is named differently).
- The device: a runtime call makes the calling thread's current device's context current (creating it if need be),
  so each runs under a guard for the LoRA's own device; a process using only GPU 3 gets no context on GPU 0.
- Overlap: registering and unregistering take milliseconds and release the GIL, so they run beside the checks of
  the fork against the model (before the copies) and beside the load into the model (after them).
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
import mmap
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["PIN_MIN_BYTES", "HostPin", "pinned_for_copy", "synchronize"]

_logger = logging.getLogger("fork_sidecar.preload")
# Below this many bytes of file data, registering (a page-table walk and a driver call each way) is not worth it.
PIN_MIN_BYTES = 8 * 1024 * 1024
_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every context, not only the current device's
_KEPT: list[Any] = []  # buffers whose unregistration failed: never unmapped while the driver may still lock them
_KEPT_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Runtime:
    register: Callable[[int, int, int], int]
    unregister: Callable[[int], int]
    last_error: Callable[[], int]


class HostPin:
    """`buffer` page-locked by a thread of its own, started at once: the driver calls take milliseconds (2.4 ms to
    register and 1.6 ms to unregister 96 MiB on the H200 host) and release the GIL, so the caller checks the fork
    against the model meanwhile. `ready()` waits for it; `release()` hands the unregistration to a thread too.

    `device`: where the copies will go (the LoRA's device; None: no GPU, nothing is done). Only a buffer that is a
    mapping of its own (sidecar/preload/checkpoint_read.py) is registered, so no neighbour's pages are locked with
    it, and only from PIN_MIN_BYTES on."""

    def __init__(self, buffer: memoryview, device: Any) -> None:
        self._buffer = buffer
        self._device = device
        self._registered = False
        self._thread: threading.Thread | None = None
        eligible = device is not None and len(buffer) >= PIN_MIN_BYTES and isinstance(buffer.obj, mmap.mmap)
        self._runtime = _runtime() if eligible else None
        if self._runtime is not None:
            self._address = _address(buffer)
            thread = threading.Thread(target=self._register, name="fork-sidecar-pin", daemon=True)
            with contextlib.suppress(RuntimeError):  # no thread to be had: the copies stay pageable
                thread.start()
                self._thread = thread

    def ready(self) -> bool:
        """Wait for the registration; whether the buffer is now page-locked."""
        if self._thread is not None:
            self._thread.join()
        return self._registered

    def release(self) -> None:
        """Unregister (after the registration ended), on a thread of its own. The caller guarantees that no copy
        from the buffer is still in flight (it waited for its streams: `synchronize`)."""
        if not self.ready():
            return
        self._registered = False
        unregister = threading.Thread(target=self._unregister, name="fork-sidecar-unpin", daemon=True)
        try:
            unregister.start()
        except RuntimeError:  # no thread to be had: unregister here
            self._unregister()

    def _register(self) -> None:
        assert self._runtime is not None
        if self._call(self._runtime.register, (self._address, len(self._buffer), _PORTABLE)):
            self._registered = True
        else:
            _cleared(self._runtime, "cudaHostRegister", "the copies stay pageable")

    def _unregister(self) -> None:
        assert self._runtime is not None
        if not self._call(self._runtime.unregister, (self._address,)):
            _cleared(self._runtime, "cudaHostUnregister", "the buffer is kept for the life of the process")
            with _KEPT_LOCK:
                _KEPT.append(self._buffer)

    def _call(self, function: Callable[..., int], args: tuple[int, ...]) -> bool:
        """Whether `function(*args)` succeeded, called with the LoRA's device current on this thread (never GPU 0
        by default)."""
        import torch

        with torch.cuda.device(self._device):
            return function(*args) == 0


@contextlib.contextmanager
def pinned_for_copy(buffer: memoryview, device: Any) -> Iterator[HostPin]:
    """A HostPin of `buffer` for `device`, released on leaving. The caller waits for `ready()` before its first
    copy and for its copies (`synchronize`) before leaving."""
    pin = HostPin(buffer, device)
    try:
        yield pin
    finally:
        pin.release()


def synchronize(devices: Iterable[Any]) -> None:
    """Wait for the current stream of each device (copies are queued non_blocking); every device is waited for even
    if one raises, and then the first error is raised."""
    import torch

    errors = []
    for device in devices:
        try:
            torch.cuda.current_stream(device).synchronize()
        except Exception as e:  # raised below, once the other devices are waited for too
            errors.append(e)
    if errors:
        raise errors[0]


def _address(buffer: memoryview) -> int:
    holder = ctypes.c_char.from_buffer(buffer)  # needs a writable buffer: the read buffer is one
    try:
        return ctypes.addressof(holder)
    finally:
        del holder  # releases the export, so the mapping can be unmapped once the tensors are gone


def _cleared(runtime: _Runtime, call: str, consequence: str) -> None:
    """Read back (and so reset) this thread's last error, which torch would otherwise raise, and log it."""
    error = runtime.last_error()
    _logger.info("fork-sidecar: %s failed (CUDA error %d); %s", call, error, consequence)


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
