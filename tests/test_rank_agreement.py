"""The ranks' decision rule and fork tokens (pure parts of sidecar/preload/rank_agreement.py); the collectives
themselves run in real torchrun jobs in tests/test_ranks.py; the handshake runs here against a real c10d store."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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
from sidecar.protocol.messages import ForkRequest


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


class _Prepared:
    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint

    def digest(self) -> str:
        return self.checkpoint.name

    def discard(self) -> None:
        pass


class _OneRank:
    """A RankAgreement in a real gloo group of one process: the boundaries' collectives run, and the order of
    events (requests, boundaries) is the test's to set."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        hooks = LoadHooks(
            prepare=_Prepared,
            apply=lambda prepared: self.loaded.append(prepared.digest()) or prepared.digest(),
            steps=lambda: len(self.loaded),
            hold_forwards=contextlib.nullcontext,
        )
        self.agreement = RankAgreement(hooks)
        self.replies: dict[str, dict[str, Any]] = {}
        self.threads: list[threading.Thread] = []

    def ask(self, fork_id: str, timeout: float = 30.0) -> None:
        request = ForkRequest(fork_id, "/run", f"/run/{fork_id}", None, timeout)

        def call() -> None:
            self.replies[fork_id] = self.agreement.request(request, Path(fork_id), timeout)

        self.threads.append(threading.Thread(target=call))
        self.threads[-1].start()
        while self.agreement.describe().get("told") != fork_id:
            time.sleep(0.01)

    def boundary(self) -> None:
        self.agreement._step(0, 1)

    def answers(self) -> dict[str, str]:
        for thread in self.threads:
            thread.join(10)
        return {k: v.get("digest") or v["error"]["code"] for k, v in self.replies.items()}


@pytest.fixture
def one_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[_OneRank]:
    dist = pytest.importorskip("torch.distributed")
    monkeypatch.setattr(rank_agreement, "_job_id", None)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield _OneRank()
    finally:
        if dist.is_initialized():  # a test may have destroyed it itself
            dist.destroy_process_group()


def test_a_fork_decided_by_the_reduce_in_flight_is_answered_loaded_not_superseded(one_rank: _OneRank) -> None:
    one_rank.ask("a")
    one_rank.boundary()  # fork a goes into the reduce in flight
    one_rank.ask("b")
    one_rank.boundary()  # that reduce decides a: it is loaded
    one_rank.boundary()  # then b
    assert one_rank.answers() == {"a": "a", "b": "b"}
    assert one_rank.loaded == ["a", "b"]


def test_a_fork_not_yet_in_a_reduce_is_superseded_by_a_newer_one(one_rank: _OneRank) -> None:
    one_rank.ask("a")
    one_rank.ask("b")
    one_rank.boundary()
    one_rank.boundary()
    assert one_rank.answers() == {"a": "superseded", "b": "b"}
    assert one_rank.loaded == ["b"]


def test_a_fork_whose_request_timed_out_is_not_loaded_when_the_reduce_in_flight_decides_it(one_rank: _OneRank) -> None:
    one_rank.ask("a", timeout=0.5)
    one_rank.boundary()  # fork a goes into the reduce in flight
    one_rank.threads[-1].join(30)  # its request has timed out: its daemon has given up on it
    one_rank.boundary()  # that reduce decides a, and this rank votes "too late"
    one_rank.boundary()
    assert one_rank.answers() == {"a": "step_timeout"}
    assert one_rank.loaded == []


def test_a_request_read_after_its_daemon_gave_up_is_answered_at_once_and_never_offered(one_rank: _OneRank) -> None:
    request = ForkRequest("a", "/run", "/run/a", None, 30.0, not_after=time.monotonic() - 1)
    reply = one_rank.agreement.request(request, Path("a"), request.wait_s())
    assert reply["error"]["code"] == "step_timeout" and "after its daemon's deadline" in reply["error"]["message"]
    assert "told" not in one_rank.agreement.describe()


def test_destroying_the_group_first_waits_for_the_reduce_in_flight_and_drops_it(one_rank: _OneRank) -> None:
    import torch.distributed as dist

    one_rank.ask("a")
    one_rank.boundary()  # starts the reduce read at the next boundary: after the last step it stays in flight
    in_flight = one_rank.agreement._in_flight
    assert in_flight is not None
    dist.destroy_process_group()  # as a training script does at its end, through torch.distributed's own name
    assert one_rank.agreement._in_flight is None
    assert in_flight.work.is_completed()
    assert one_rank.agreement.off is not None and "process group was destroyed" in one_rank.agreement.off
    assert one_rank.answers() == {"a": "ranks_off"}  # its request is answered, not left to time out
    one_rank.agreement.at_boundary()  # no collective after that (the group is gone: one would raise)
    assert one_rank.agreement.off is not None and "destroyed" in one_rank.agreement.off


_EXITS_WITHOUT_DESTROY = """
import atexit, contextlib, sys
from pathlib import Path
import torch.distributed as dist
from sidecar.preload.rank_agreement import LoadHooks, RankAgreement

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
agreement = RankAgreement(LoadHooks(prepare=Path, apply=str, steps=int, hold_forwards=contextlib.nullcontext))
# Registered before the agreement's own hook, so it runs after it (atexit runs hooks last-in first-out).
atexit.register(lambda: print("in flight at exit:", agreement._in_flight is not None, flush=True))
agreement._step(0, 1)
print("in flight after the last step:", agreement._in_flight is not None, flush=True)
"""


def test_a_script_that_exits_without_destroying_the_group_has_its_reduce_in_flight_dropped_first() -> None:
    pytest.importorskip("torch.distributed")
    done = subprocess.run(
        [sys.executable, "-c", _EXITS_WITHOUT_DESTROY], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["in flight after the last step: True", "in flight at exit: False"]
