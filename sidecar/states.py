"""The states of one fork and the transitions between them; stdlib only, no I/O.

A state names the last step that COMPLETED and was journaled, so resuming after a crash means running the step
that follows the journaled state. Every step after `claimed` is idempotent (see sidecar/swap/ and the stages), which is
what makes "run the next step again" correct after a SIGKILL at any point.
"""

from __future__ import annotations

import enum

__all__ = ["ForkState", "IllegalTransition", "check_transition", "next_state"]


class ForkState(enum.StrEnum):
    CLAIMED = "claimed"  # marker renamed to .fork.inprogress, request parsed, source resolved
    STAGED = "staged"  # source copied into checkpoints/.fork-stage-<id>, fsynced and validated
    SWAPPED = "swapped"  # checkpoints/0000 holds the new adapter; the old one is at .fork-retired-<id>
    TRAINERS = "trainers"  # trainer agents told (or none found)
    VLLM = "vllm"  # vLLM servers reloaded (or none found)
    VERIFIED = "verified"  # disk, trainers and vLLM checked against the digest
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (ForkState.DONE, ForkState.FAILED)


_ORDER = [
    ForkState.CLAIMED,
    ForkState.STAGED,
    ForkState.SWAPPED,
    ForkState.TRAINERS,
    ForkState.VLLM,
    ForkState.VERIFIED,
    ForkState.DONE,
]


class IllegalTransition(RuntimeError):
    pass


def next_state(state: ForkState) -> ForkState:
    """The state that the next step of a fork in `state` leads to."""
    if state.terminal:
        raise IllegalTransition(f"a fork in state {state} has no next step")
    return _ORDER[_ORDER.index(state) + 1]


def check_transition(old: ForkState, new: ForkState) -> None:
    """Only forward by one step, or to FAILED from any non-terminal state."""
    if old.terminal or not (new is ForkState.FAILED or new is next_state(old)):
        raise IllegalTransition(f"fork cannot go from {old} to {new}")
