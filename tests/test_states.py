"""Fork state transitions: forward one step at a time, or to failed; nothing after a terminal state."""

from __future__ import annotations

import pytest

from sidecar.states import ForkState, IllegalTransition, check_transition, next_state

ORDER = ["claimed", "staged", "swapped", "trainers", "vllm", "verified", "done"]


def test_happy_path_is_the_documented_order() -> None:
    state = ForkState.CLAIMED
    seen = [state.value]
    while not state.terminal:
        new = next_state(state)
        check_transition(state, new)
        state = new
        seen.append(state.value)
    assert seen == ORDER


@pytest.mark.parametrize("state", [s for s in ForkState if not s.terminal])
def test_any_live_state_may_fail(state: ForkState) -> None:
    check_transition(state, ForkState.FAILED)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (ForkState.CLAIMED, ForkState.SWAPPED),
        (ForkState.SWAPPED, ForkState.STAGED),
        (ForkState.DONE, ForkState.FAILED),
        (ForkState.FAILED, ForkState.CLAIMED),
        (ForkState.VERIFIED, ForkState.VERIFIED),
    ],
)
def test_illegal_transitions(old: ForkState, new: ForkState) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(old, new)
