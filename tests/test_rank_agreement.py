"""The ranks' decision rule and fork tokens (pure parts of sidecar/preload/rank_agreement.py); the collectives
themselves run in real torchrun jobs in tests/test_ranks.py; the handshake runs here against a real c10d store."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.preload import rank_agreement
from sidecar.preload.rank_agreement import (
    HANDSHAKE_ENV,
    LoadHooks,
    RankAgreement,
    decide,
    expects_ranks,
    fork_token,
    rank_info,
)


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


def _handshake(store: Any, rank: int, world: int) -> str | None:
    """One rank's handshake against a real c10d store; the `dist` namespace only hands that store out."""
    dist = SimpleNamespace(distributed_c10d=SimpleNamespace(_get_default_store=lambda: store))
    hooks = LoadHooks(prepare=Path, apply=str, steps=int, hold_forwards=contextlib.nullcontext)
    try:
        RankAgreement(hooks)._handshake(dist, rank, world)
    except RuntimeError as e:
        return str(e)
    return None


def test_a_rank_that_arrives_after_another_gave_up_stays_off_too(monkeypatch: pytest.MonkeyPatch) -> None:
    dist = pytest.importorskip("torch.distributed")
    monkeypatch.setattr(rank_agreement, "_job_id", None)  # the handshake records the job id for rank_info
    monkeypatch.setenv(HANDSHAKE_ENV, "0.2")
    store = dist.HashStore()
    off = _handshake(store, 0, 2)  # rank 1 is not there yet: rank 0 gives up
    assert off is not None and "rank(s) 1 of the 2-rank job" in off
    # Rank 1 now finds every key, but rank 0 issues no per-step reduce: rank 1 must not either.
    late = _handshake(store, 1, 2)
    assert late is not None and "after another rank gave up" in late


def test_ranks_that_all_check_in_agree_on(monkeypatch: pytest.MonkeyPatch) -> None:
    dist = pytest.importorskip("torch.distributed")
    monkeypatch.setattr(rank_agreement, "_job_id", None)
    monkeypatch.setenv(HANDSHAKE_ENV, "30")
    store = dist.HashStore()
    results: dict[int, str | None] = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, _handshake(store, r, 2))) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: None, 1: None}
