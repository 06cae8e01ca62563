"""sidecar/preload/host_pin.py where no GPU is: what it declines to do. Its work on a GPU (registering the read
buffer for the copies, clearing a failed registration's error, unregistering) is tested in
tests/gpu/test_host_pin_gpu.py, which skips without CUDA."""

from __future__ import annotations

import ctypes

import pytest

from sidecar.preload import host_pin


def test_a_library_without_the_cuda_runtime_functions_gives_no_runtime() -> None:
    # The C library (what a process without libcudart has): the copies then stay pageable.
    assert host_pin._lookup(ctypes.CDLL(None)) is None


def test_the_cpu_build_of_torch_has_no_runtime_to_pin_with() -> None:
    torch = pytest.importorskip("torch")
    if torch.version.cuda:
        pytest.skip("a CUDA build of torch: tests/gpu/test_host_pin_gpu.py")
    assert host_pin._runtime() is None


@pytest.mark.parametrize(
    ("device", "gpu_bytes"), [(None, 10 * host_pin.PIN_MIN_BYTES), ("cuda:0", host_pin.PIN_MIN_BYTES - 1)]
)
def test_nothing_is_pinned_without_a_gpu_or_below_the_size_that_pays(device: str | None, gpu_bytes: int) -> None:
    # Neither case may touch CUDA at all (no runtime lookup, no context): it yields False and the buffer is as it was.
    buffer = memoryview(bytearray(b"x" * 4096))
    host_pin._runtime.cache_clear()
    with host_pin.pinned_for_copy(buffer, device, gpu_bytes) as pinned:
        assert pinned is False
    assert host_pin._runtime.cache_info().misses == 0
    assert bytes(buffer) == b"x" * 4096
