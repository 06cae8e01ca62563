"""sidecar/preload/host_pin.py where no GPU is: what it declines to do. Its work on a GPU (registering the read
buffer for the copies, clearing a failed registration's error, unregistering) is tested in
tests/gpu/test_host_pin_gpu.py, which skips without CUDA."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

import pytest

from sidecar.preload import host_pin


def test_a_library_without_the_cuda_runtime_functions_gives_no_runtime() -> None:
    # libm and what it was loaded with (the C library): no CUDA runtime there, so the copies stay pageable. Not
    # CDLL(None): in a process that loaded torch's CUDA runtime globally, the global scope has it.
    libm = ctypes.util.find_library("m")
    assert libm is not None
    assert host_pin._lookup(ctypes.CDLL(libm)) is None


def test_the_cpu_build_of_torch_has_no_runtime_to_pin_with() -> None:
    torch = pytest.importorskip("torch")
    if torch.version.cuda:
        pytest.skip("a CUDA build of torch: tests/gpu/test_host_pin_gpu.py")
    assert host_pin._runtime() is None


def mapping(size: int) -> memoryview:
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


@pytest.mark.parametrize(
    ("buffer", "device"),
    [
        (mapping(2 * host_pin.PIN_MIN_BYTES), None),  # no GPU
        (mapping(host_pin.PIN_MIN_BYTES - 4096), "cuda:0"),  # too little to pay
        (memoryview(bytearray(2 * host_pin.PIN_MIN_BYTES)), "cuda:0"),  # may share pages with others
    ],
)
def test_nothing_is_pinned_without_a_gpu_below_the_size_that_pays_or_outside_a_mapping_of_its_own(
    buffer: memoryview, device: str | None
) -> None:
    # None of these may touch CUDA at all (no runtime lookup, no thread, no context): not pinned, buffer as it was.
    buffer[:4] = b"abcd"
    host_pin._runtime.cache_clear()
    with host_pin.pinned_for_copy(buffer, device) as pin:
        assert pin.ready() is False
        assert pin._thread is None
    assert host_pin._runtime.cache_info().misses == 0
    assert bytes(buffer[:4]) == b"abcd"
