"""The ranks' per-step reduce and its buffers (sidecar/preload/rank_reduce.py), in a real gloo group of one process;
the reduce between real ranks runs in the torchrun jobs of tests/test_ranks.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.preload.rank_reduce import Buffers, InFlight, reduce_device


@pytest.fixture
def gloo() -> Iterator[Any]:
    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_the_buffers_keep_a_cpp_reference_of_their_own_through_every_reduce(gloo: Any) -> None:
    import torch

    # Made where a boundary may run (under inference_mode): still normal tensors, filled in place at every step.
    with torch.inference_mode():
        buffers = Buffers(torch, reduce_device(gloo, torch), world=4)
    assert buffers.votes.numel() == 6 and buffers.host is None
    where = buffers.step.data_ptr()
    for token in (5, 0, 7):
        in_flight = InFlight(gloo, torch, buffers, token)
        assert in_flight.result() == (token, token)
        del in_flight
    # A finished collective's teardown in gloo's worker thread takes a count of 3 to 2, never 2 to 1 (which would
    # need the GIL there: the hang at exit). Once the worker has let go, each buffer still has a C++ owner.
    gloo.barrier()
    assert buffers.step._use_count() >= 2 and buffers.votes._use_count() >= 2
    assert buffers.step.data_ptr() == where  # one buffer for the job's life: nothing allocated per step


def test_gloo_reduces_live_on_the_cpu(gloo: Any) -> None:
    import torch

    assert reduce_device(gloo, torch, model_device="cpu") == torch.device("cpu")
