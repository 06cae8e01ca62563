"""The ranks' decision rule and fork tokens (pure parts of sidecar/preload/rank_agreement.py); the collectives
themselves run in real torchrun jobs in tests/test_ranks.py."""

from __future__ import annotations

import pytest

from sidecar.preload.rank_agreement import decide, expects_ranks, fork_token, rank_info


def test_ranks_load_only_when_every_rank_was_told_the_same_new_fork() -> None:
    a, b = fork_token("20261201T130000Z-aaaaaa"), fork_token("20261201T130001Z-bbbbbb")
    assert decide(a, a, 0) == a
    assert decide(a, 0, 0) is None  # a rank not told yet holds everyone back
    assert decide(b, a, 0) is None  # two quick forks: wait until every rank has the newer one
    assert decide(b, b, a) == b
    assert decide(a, a, a) is None  # acted on already
    assert decide(0, 0, 0) is None


def test_fork_tokens_are_positive_and_fit_an_int64_negated() -> None:
    tokens = {fork_token(f"fork-{i}") for i in range(1000)}
    assert len(tokens) == 1000
    assert all(0 < t < 2**62 for t in tokens)
    assert fork_token("x") == fork_token("x")


def test_a_single_process_trainer_reports_rank_0_of_1(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert rank_info() == {"rank": 0, "world_size": 1}
    assert not expects_ranks()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    # A launcher's rank before init_process_group: forks wait for the agreement.
    assert rank_info() == {"rank": 1, "world_size": 2, "local_world_size": 2, "initialized": False}
    assert expects_ranks()
