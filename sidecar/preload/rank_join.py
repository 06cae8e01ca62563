"""DDP's `Join` (uneven inputs) and the ranks' agreement: a rank that has run out of inputs shadows the others'
per-step agreement collectives, so those are matched with the same collectives as on every rank.

Under `with Join([ddp_model]):` a rank whose inputs ended leaves its loop, and `Join` then runs, once per iteration
of the ranks still training, the join hooks of its joinables: DDP's shadows the forward and backward collectives.
The agreement issues one more collective per optimizer step (sidecar/preload/rank_agreement.py); without a shadow of
its own, the others' agreement reduce would be matched with the next collective of `Join` on the joined rank (a
mismatch: an error or a hang). So every `Join` made after `register()` gets one more joinable, after the user's (its
hook runs after DDP's, the order the others issue theirs in): its hook runs the registered models' step boundaries
as a rank out of inputs (`at_boundary(out_of_inputs=True)`: no fork offered, a "no" in any vote), so nothing is
loaded while a rank no longer trains, and the ranks stay in step.

Only where every joinable of that `Join` uses the default group (the one the agreement uses). Not covered: gradient
accumulation under `Join` (the joined rank shadows once per forward, the others' agreement runs once per optimizer
step), and a `Join` made before `register()`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

__all__ = ["install_join_support"]

_installed = False


def install_join_support(agreements: Callable[[], list[Any]]) -> None:
    """Make every later `torch.distributed.algorithms.join.Join` shadow `agreements()` (the live RankAgreements, in
    the order their step boundaries run). Once per process; torch is loaded by then (a model is registered)."""
    global _installed
    if _installed:
        return
    from torch.distributed.algorithms import join

    _installed = True
    real_init = join.Join.__init__

    @functools.wraps(real_init)
    def init(self: Any, joinables: list[Any], *args: Any, **kwargs: Any) -> None:
        extra = _shadow(join, joinables, agreements)
        real_init(self, [*joinables, *extra], *args, **kwargs)

    join.Join.__init__ = init  # type: ignore[method-assign]


def _shadow(join: Any, joinables: list[Any], agreements: Callable[[], list[Any]]) -> list[Any]:
    import torch.distributed as dist

    if not dist.is_initialized() or not agreements():
        return []
    group = dist.distributed_c10d._get_default_group()
    with contextlib.suppress(Exception):  # a joinable without a group: leave the Join as the user made it
        if all(j.join_process_group == group for j in joinables):
            return [_joinable_class(join)(agreements, group, joinables[0].join_device)]
    return []


@functools.cache
def _joinable_class(join: Any) -> type:
    class AgreementHook(join.JoinHook):  # type: ignore[misc,name-defined]
        def __init__(self, agreements: Callable[[], list[Any]]) -> None:
            self.agreements = agreements

        def main_hook(self) -> None:
            for agreement in self.agreements():
                agreement.at_boundary(out_of_inputs=True)

    class AgreementJoinable(join.Joinable):  # type: ignore[misc,name-defined]
        def __init__(self, agreements: Callable[[], list[Any]], group: Any, device: Any) -> None:
            super().__init__()
            self.agreements, self.group, self.device = agreements, group, device

        def join_hook(self, **kwargs: Any) -> Any:
            return AgreementHook(self.agreements)

        @property
        def join_device(self) -> Any:
            return self.device

        @property
        def join_process_group(self) -> Any:
            return self.group

    return AgreementJoinable
