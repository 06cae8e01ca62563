"""The bit-for-bit check of a loaded tensor against the file's (sidecar/preload/bit_check.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(params=[1, 8], ids=["memcmp", "torch-equal"])
def intra_op_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Runs a test with 1 torch thread (CPU tensors compared by memcmp) and with 8 (by torch.equal)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_the_check_is_bitwise(intra_op_threads: int) -> None:
    from sidecar.preload.bit_check import _compare_by_memcmp, same_bits

    t = torch.zeros(4)
    assert _compare_by_memcmp(t, t, torch.get_num_threads()) == (intra_op_threads == 1)
    grid = torch.arange(12.0).reshape(3, 4)
    assert not _compare_by_memcmp(grid.t(), grid.t(), torch.get_num_threads())  # not contiguous: torch.equal
    assert same_bits(grid.t(), grid.clone().t())
    assert not same_bits(grid.t(), grid.t().contiguous() + 1)
    a = torch.tensor([0.0, 1.0, float("nan")])
    assert same_bits(a, a.clone())  # NaN equals itself
    assert not same_bits(a, torch.tensor([-0.0, 1.0, float("nan")]))  # -0.0 is not 0.0
    assert not same_bits(a, a.to(torch.float64))
    assert not same_bits(a, a[:2])
    assert same_bits(torch.empty(0), torch.empty(0))
    big = torch.randn(1 << 20)
    other = big.clone()
    other[-1] = torch.nextafter(other[-1], torch.tensor(float("inf")))  # one bit of the last element
    assert not same_bits(big, other)


def test_differing_names_exactly_the_pairs_that_differ(intra_op_threads: int) -> None:
    from sidecar.preload.bit_check import differing

    nan = torch.tensor([float("nan"), 1.0])
    grid = torch.arange(6.0).reshape(2, 3)
    pairs = [
        ("nan", nan, nan.clone()),  # NaN is its own bits
        ("zero", torch.tensor([0.0]), torch.tensor([-0.0])),  # equal as floats, not as bits
        ("same", grid.t(), grid.clone().t()),  # not contiguous
        ("dtype", grid, grid.to(torch.float64)),
        ("value", grid, grid + 1),
    ]
    assert differing(pairs) == ["zero", "dtype", "value"]
    assert differing(iter([])) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_differing_on_a_gpu_reads_back_once_and_agrees_with_same_bits() -> None:
    from sidecar.preload.bit_check import differing, same_bits

    a = torch.tensor([float("nan"), 0.0, 2.0], device="cuda")
    grid = torch.arange(6.0, device="cuda").reshape(2, 3)
    pairs = [
        ("nan", a, a.clone()),
        ("zero", a, torch.tensor([float("nan"), -0.0, 2.0], device="cuda")),
        ("strided", grid.t(), grid.clone().t()),
        ("bf16", grid.bfloat16(), grid.bfloat16() + 1),
        ("cpu", grid.cpu(), grid.cpu()),
    ]
    assert differing(pairs) == ["zero", "bf16"]
    assert [k for k, x, y in pairs if not same_bits(x, y)] == ["zero", "bf16"]
