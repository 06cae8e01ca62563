"""The ranks' per-step reduce (sidecar/preload/rank_agreement.py): where its tensors live, the buffers every
collective of an agreement works on, and the all_reduce started at one boundary and read at the next. torch is
passed in by the caller, never imported here."""

from __future__ import annotations

from typing import Any

__all__ = ["Buffers", "InFlight", "reduce_device"]


def reduce_device(dist: Any, torch: Any, model_device: Any = None) -> Any:
    """Where the default group's backend takes tensors: CPU for gloo (also in a mixed "cpu:gloo,cuda:nccl"), else
    the device of the model's LoRA parameters (NCCL wants this rank's own GPU; the current device is only a guess:
    a job that never called torch.cuda.set_device has cuda:0 current on every rank)."""
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    if model_device is not None and torch.device(model_device).type != "cpu":
        return torch.device(model_device)
    return torch.device("cuda", torch.cuda.current_device())


_kept: list[Any] = []  # every agreement's Buffers, for the life of the process (see Buffers)


class Buffers:
    """The tensors an agreement's collectives work on, allocated once (at its first boundary) and never freed.

    Why: since torch's PyObject preservation rework (torch 2.13 here: `c10/util/intrusive_ptr.h` calls
    `decref_pyobject` when a tensor's C++ refcount goes from 2 to 1), the thread that drops a finished collective's
    reference to a tensor made in Python, leaving only its Python object's, needs the GIL. For gloo that is its
    worker thread, which then queued for the GIL behind the training thread at every step, and at the job's end it
    deadlocked: the main thread, holding the GIL, destroyed the group (`~ProcessGroupGloo` joins the worker) while
    the worker, tearing down a barrier that held the last reduce, waited for the GIL (3 of 13 runs of the bench's
    DDP job hung at exit).
    A view of each buffer, kept with it, is one more C++ reference that is never dropped (a view holds its base
    in its autograd view info), so a collective only ever takes the count from 3 to 2: no GIL. (A torch Future
    would not do: it holds the Python object, not the tensor.)"""

    def __init__(self, torch: Any, device: Any, world: int) -> None:
        # Not inference tensors (a boundary may run under inference_mode): those could neither be filled in place
        # later nor have views that track their base.
        with torch.inference_mode(False):
            self.step = torch.zeros(2, dtype=torch.int64, device=device)
            self.votes = torch.zeros(world + 2, dtype=torch.int64, device=device)
            # On CUDA the step's result goes to pinned memory behind an event: reading it waits for nothing else.
            self.host: Any = torch.zeros(2, dtype=torch.int64, pin_memory=True) if device.type == "cuda" else None
            self._views = [t.view(t.shape) for t in (self.step, self.votes, self.host) if t is not None]
        _kept.append(self)


class InFlight:
    """One all_reduce(MAX) of [t, -t] in `buffers.step`, started at a boundary and read at the next (which is
    before the buffer is filled again)."""

    def __init__(self, dist: Any, torch: Any, buffers: Buffers, token: int) -> None:
        # Filled in place (on the device under NCCL: torch.tensor(..., device=cuda) would copy from pageable
        # memory and wait for the stream, i.e. for the optimizer step just queued; a fill is one more kernel).
        buf = buffers.step
        buf[0].fill_(token)
        buf[1].fill_(-token)
        self.buffers = buffers
        self.work = dist.all_reduce(buf, op=dist.ReduceOp.MAX, async_op=True)
        self.event: Any = None
        if buffers.host is not None:
            self.work.wait()  # orders the copy after the reduce on the stream; the CPU does not wait
            buffers.host.copy_(buf, non_blocking=True)
            self.event = torch.cuda.Event()
            # On the stream of the LoRA's device, which the copy ran on: the current device may be another GPU.
            self.event.record(torch.cuda.current_stream(buf.device))

    def result(self) -> tuple[int, int]:
        if self.event is not None:
            self.event.synchronize()  # recorded a whole step ago: long done
            highest, negated = self.buffers.host.tolist()
        else:
            self.work.wait()
            highest, negated = self.buffers.step.tolist()
        return int(highest), int(-negated)
