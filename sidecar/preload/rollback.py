"""What putting a fork into a model changes, kept so that it can be put back: the ranks of a distributed job that
all applied a fork undo it when one rank's apply failed (sidecar/preload/rank_agreement.py), so that every rank ends
on the same weights.

An apply changes three things: the adapter's tensors (copied in place, or set by peft), the gradients of their
parameters (dropped) and the optimizer's state for them (popped). The tensors are cloned (the LoRA tensors only: a
small fraction of the model); gradients and optimizer states are only dropped by an apply, never changed in place,
so references to them are enough.

torch is imported only inside the functions, like the rest of the preload.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["Rollback", "optimizer_state"]


def optimizer_state(optimizer: Any) -> Any:
    """The per-parameter state mapping of a torch optimizer (accelerate / HF wrappers keep it inside), or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    state = getattr(inner, "state", None)
    return state if state is not None and hasattr(state, "pop") else None


class Rollback:
    """Taken just before an apply; `restore()` puts the model and its optimizers back as they were then.

    `put_back(tensors)` writes adapter tensors into the model the way the apply did (in place, or through peft) and
    checks them bit for bit."""

    def __init__(
        self,
        tensors: Mapping[str, Any],
        params: Iterable[Any],
        optimizers: Iterable[Any],
        put_back: Callable[[Mapping[str, Any]], None],
    ) -> None:
        self._put_back = put_back
        self.saved = {key: t.detach().clone() for key, t in tensors.items()}
        params = list(params)
        self.grads = [(p, p.grad) for p in params]
        self.states = []
        for opt in optimizers:
            state = optimizer_state(opt)
            if state is not None:
                self.states += [(state, p, state[p]) for p in params if p in state]

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            self._put_back(self.saved)
        for p, grad in self.grads:
            p.grad = grad
        for state, p, saved in self.states:
            state[p] = saved
