"""A fork an agent answered `load_in_progress` for, kept until every target has its result (sidecar/preload/
late_forks.py; the whole path, agent and daemon, runs in tests/test_ranks.py with a real torchrun job)."""

from __future__ import annotations

from sidecar.preload.late_forks import LateFork
from sidecar.protocol.messages import LOAD_IN_PROGRESS, error_reply, ok_reply

IN_PROGRESS = error_reply(LOAD_IN_PROGRESS, "still putting it in")
LOADED = ok_reply(result="loaded", digest="d")


def test_nothing_is_final_before_the_replies_are_in_even_with_a_late_result() -> None:
    late = LateFork("/run", ["a", "b"])
    late.results[0] = LOADED
    assert late.merged() is None


def test_a_target_still_in_progress_keeps_the_fork_open_and_its_late_result_closes_it() -> None:
    late = LateFork("/run", ["a", "b"], replies=[LOADED, IN_PROGRESS])
    assert late.merged() is None
    failed = error_reply("load_failed", "rolled back")
    late.results[1] = failed
    assert late.merged() == [LOADED, failed]


def test_replies_with_none_in_progress_are_final_as_they_are() -> None:
    assert LateFork("/run", ["a"], replies=[LOADED]).merged() == [LOADED]
