"""The ranks of one torch.distributed job load a fork at the same optimizer step, agreed through the job's own
default process group (no channel of ours between ranks, nothing new in the training script).

Each rank's agent is told about a fork by its node's daemon at its own moment, and the trainer's ranks reach step
boundaries at their own moments too. Left alone, each rank loaded at its own next boundary: a 2-rank DDP job with
`broadcast_buffers=False` had one rank a step ahead on 4 forks of 5, and DDP never re-syncs parameters, so the
ranks trained on silently different weights from then on. So, on the training thread, at every optimizer-step
boundary of a registered model (the step gate's boundary: gradient accumulation counts once), each rank:

1. reads the result of the tiny all_reduce it started at the previous boundary: MAX over `[t, -t]`, where `t` is
   the token of the newest fork this rank had been told of (0: none), gives the highest and the lowest token;
2. decides with `decide()`: only when every rank had been told the same fork (highest == lowest), and it is not
   the one already acted on. The same reduced values give the same decision on every rank; a rank not told yet
   holds everyone back, and of two quick forks the ranks converge on the newer one before anyone loads;
3. on a decision, loads in votes (each one all_reduce, so every rank takes the same branch): every rank reads
   and checks the file (digest against what its daemon read from disk; a request past its deadline votes no),
   the first vote says whether all succeeded with the same digest; then all put it into the model, keeping what
   they change, and the second vote says whether every put succeeded; if one did not, all put their pre-fork
   weights back (a third vote checks that). A failing rank puts its reason into the job's store before voting, so
   every rank's reply names the failed rank and why;
4. starts the next all_reduce with `async_op=True` and returns: the step pays for launching it, not for a round
   trip (on CUDA the result goes to pinned memory behind an event, so reading it later waits for nothing else).

So a fork loads at the second boundary after the last rank was told, on every rank at the same step. Before the
first reduce, every rank writes its key into the job's store and waits (`HANDSHAKE_ENV`, default 60 s) for all
world_size keys: a rank without the preload (or without a registered model) never issues these collectives, and
a collective the other ranks issue alone would be matched with the job's own gradient all_reduce. If the keys do
not all appear, agreement stays off on every rank and forks are refused with the reason.

Collectives are only ever issued here, on the training thread, in step order; the agent thread only records what
it was told and waits for the outcome. torch is never imported here: `torch.distributed` is looked up in
`sys.modules` (a trainer that uses it has imported it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sidecar.preload.rank_exit import wait_done, watch_exit
from sidecar.preload.rank_reduce import Buffers, InFlight, reduce_device
from sidecar.protocol.messages import LOAD_IN_PROGRESS, ForkRequest, error_reply, ok_reply

__all__ = [
    "HANDSHAKE_ENV",
    "LATE_REQUEST",
    "RankAgreement",
    "decide",
    "distributed_world",
    "expects_ranks",
    "fork_token",
    "rank_info",
]

HANDSHAKE_ENV = "FORK_SIDECAR_RANK_HANDSHAKE_S"
_HANDSHAKE_S = 60.0
_STORE_PREFIX = "fork-sidecar/agree/v1"
_TOKEN_MASK = (1 << 62) - 1  # positive, and -t fits an int64 too
APPLIED = "agreed step boundary"
_FAILED, _TOO_LATE = 1, 2  # a rank's entry in a vote (0: ok)
LATE_REQUEST = (
    "this rank read the fork request only after its daemon's deadline had passed (the process was stopped or "
    "stalled); nothing was loaded"
)
_IN_PROGRESS = (
    "the ranks were still deciding on it or putting it into their models after {:.1f}s; it ends loaded on every "
    "rank or on none, and this agent's status says which"
)
_OUT_OF_INPUTS = "it has run out of inputs and joined (DDP Join): it no longer trains, so no rank loads a fork now"
_GROUP_GONE = "the job's process group was destroyed (the training has ended); no rank loads a fork now"
_REASON_WAIT_S = 5.0  # a failing rank put its reason into the store before the vote: it is there already


def _log(key: str, level: int, message: str, *args: object) -> None:
    from sidecar.preload.hooks import log_once

    log_once(key, level, message, *args)


# --- pure parts --------------------------------------------------------------------------------------------------
def fork_token(text: str) -> int:
    """A positive 62-bit number for a fork id or a digest, the same in every process (0 means "none")."""
    return (int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & _TOKEN_MASK) | 1


def decide(highest: int, lowest: int, settled: int) -> int | None:
    """The fork token every rank loads now, or None: all ranks told the same fork, and not the one acted on."""
    if highest == lowest and highest != 0 and highest != settled:
        return highest
    return None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _dist() -> Any:
    return sys.modules.get("torch.distributed")


def distributed_world() -> tuple[int, int] | None:
    """(rank, world_size) when this process is in an initialized torch.distributed job of 2 or more ranks."""
    dist = _dist()
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    world = int(dist.get_world_size())
    return (int(dist.get_rank()), world) if world > 1 else None


def expects_ranks() -> bool:
    """True when forks must be agreed with other ranks: an initialized job, or a launcher's WORLD_SIZE > 1 (a fork
    that arrives before init_process_group still waits for the agreement)."""
    return distributed_world() is not None or (_env_int("WORLD_SIZE") or 1) > 1


_job_lock = threading.Lock()
_job_id: str | None = None


def rank_info() -> dict[str, Any]:
    """What an agent reports about its place in the job: always `rank` and `world_size` (0 and 1 for a
    single-process trainer); `local_rank`, `local_world_size` (torchrun's env) and `job` (agreed at the first
    boundary) when known, so the daemon can tell ranks missing on its node from ranks on other nodes."""
    world = distributed_world()
    if world is not None:
        rank, size = world
    else:
        rank, size = _env_int("RANK") or 0, _env_int("WORLD_SIZE") or 1
    out: dict[str, Any] = {"rank": rank, "world_size": size}
    if size > 1:
        for key, env in (("local_rank", "LOCAL_RANK"), ("local_world_size", "LOCAL_WORLD_SIZE")):
            value = _env_int(env)
            if value is not None:
                out[key] = value
        out["initialized"] = world is not None
        if _job_id is not None:
            out["job"] = _job_id
    return out


# --- the agreement of one registered model -----------------------------------------------------------------------
@dataclass
class _Told:
    token: int
    request: ForkRequest
    checkpoint: Path
    deadline: float  # time.monotonic(): from then on this rank votes against loading it (see `expired`)
    reply: dict[str, Any] | None = None
    withdrawn: bool = False
    # From this rank's vote on reading it on, the ranks may load it: its agent must not answer that nobody did.
    voting: bool = False

    def expired(self) -> str | None:
        """Why this rank may no longer start loading the fork, or None. Checked on the training thread at the vote,
        not only by the agent thread that waits for the answer: a rank stopped (SIGSTOP, a debugger) past the
        deadline may run its next step boundary before its agent thread runs again."""
        if self.withdrawn or time.monotonic() >= self.deadline:
            return f"its request for fork {self.request.fork_id} had timed out (its daemon has given up on it)"
        return None


@dataclass(frozen=True)
class _Vote:
    """What one vote of the ranks says: the failed ranks and their reasons, whether all read the same digest, and
    whether every failure was only "too late"."""

    failed: dict[int, str]
    same: bool = True
    expired: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and self.same

    def sentence(self, what: str, then: str) -> str:
        if not self.failed:
            return f"the ranks read different adapters; {then}" if not self.same else then
        ranks = sorted(self.failed)
        why = "; ".join(f"rank {r}: {self.failed[r]}" for r in ranks)
        said = f"rank{'s' if len(ranks) > 1 else ''} {_ranks(ranks)} {what} ({why})"
        return f"{said}; {then}" if then else said


@dataclass
class LoadHooks:
    """What the agreement needs of its target: read+check a checkpoint (-> PreparedLoad), apply it, the step count,
    and a guard that holds forwards of other threads back while weights change."""

    prepare: Callable[[Path], Any]
    apply: Callable[[Any], str]
    steps: Callable[[], int]
    hold_forwards: Callable[[], contextlib.AbstractContextManager[None]]
    index: int = 0
    device: Callable[[], Any] = lambda: None  # where the LoRA parameters are (this rank's GPU under NCCL)
    # The reply to a fork whose request had been answered `load_in_progress` (the request, the reply): for `status`.
    settled_late: Callable[[ForkRequest, dict[str, Any]], None] = lambda request, reply: None


class RankAgreement:
    """See the module docstring; `request` runs on the agent's thread, `at_boundary` on the training thread."""

    def __init__(self, hooks: LoadHooks) -> None:
        self.hooks = hooks
        self._cond = threading.Condition()
        self._told: _Told | None = None
        self._settled = 0
        self._settled_reply: dict[str, Any] | None = None
        self._in_flight: InFlight | None = None
        self._in_flight_told: _Told | None = None
        self._joined = False
        self._buffers: Buffers | None = None  # the collectives' tensors, allocated at the first boundary
        self._loads = 0  # decisions so far: the same count on every rank, so it names a load's keys in the store
        self.off: str | None = None  # why agreement is off for good (handshake failed, a collective failed)
        self.last_reduce: tuple[int, int] | None = None
        self.out_of_inputs = False  # at the last boundary this rank shadowed the others' under DDP's Join
        self.boundaries = 0

    # agent side -------------------------------------------------------------------------------------------------
    def request(self, request: ForkRequest, checkpoint: Path, timeout: float) -> dict[str, Any]:
        """Record the fork as this rank's newest and wait until the ranks have acted on it, at most `timeout` (the
        request's `wait_s()`): after it, no rank starts loading it."""
        token = fork_token(request.fork_id)
        deadline = time.monotonic() + timeout
        with self._cond:
            if self.off is not None:
                return error_reply("ranks_off", self.off, **rank_info())
            if token == self._settled and self._settled_reply is not None:
                return self._settled_reply  # e.g. a retry after a timeout that raced the load
            if timeout <= 0:  # read only after its daemon gave up (this process was stopped): never offered
                return error_reply("step_timeout", LATE_REQUEST, **rank_info())
            told = self._told
            # The reduce in flight may still decide the older fork and load it everywhere: then the next boundary
            # answers it, loaded or superseded.
            if told is not None and told.token != token and told.reply is None and told is not self._in_flight_told:
                self._supersede(told, request.fork_id)
            if told is None or told.token != token or told.expired() is not None:
                told = _Told(token, request, checkpoint, deadline)
                self._told = told
            while told.reply is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.off is not None:
                    break
                self._cond.wait(remaining)
            if told.reply is not None:
                return told.reply
            told.withdrawn = True  # no longer offered from the next boundary on: the ranks cannot all agree now
            if told.voting:  # the ranks are deciding or loading: it ends loaded on every rank or on none
                return error_reply(LOAD_IN_PROGRESS, _IN_PROGRESS.format(timeout), **rank_info())
            return error_reply("step_timeout", self._waiting_sentence(timeout), **rank_info())

    def _supersede(self, told: _Told, newer: str) -> None:
        told.reply = error_reply(
            "superseded",
            f"fork {newer} came before the ranks agreed on fork {told.request.fork_id}; "
            "the newer one is loaded on every rank instead",
            **rank_info(),
        )
        self._cond.notify_all()

    def _waiting_sentence(self, timeout: float) -> str:
        if self.off is not None:
            return self.off
        if self.out_of_inputs:
            return f"this rank {_OUT_OF_INPUTS} (waited {timeout:.1f}s)"
        if not self._joined:
            why = (
                "torch.distributed is not initialized in this rank yet"
                if distributed_world() is None
                else "this rank reached no optimizer step since torch.distributed was initialized"
            )
            return f"{why} after {timeout:.1f}s; nothing was loaded (ranks load forks only at an agreed step)"
        if self.last_reduce is not None and self.last_reduce[0] != self.last_reduce[1]:
            return (
                f"not every rank had been told of this fork after {timeout:.1f}s (the ranks' newest forks differed "
                "at the last step); no rank loaded it, since ranks load only together"
            )
        return (
            f"no optimizer step came within {timeout:.1f}s to agree on (the job may be stuck in a collective, "
            "or a rank is gone); no rank loaded it"
        )

    def describe(self) -> dict[str, Any]:
        with self._cond:
            out: dict[str, Any] = {"joined": self._joined, "boundaries": self.boundaries}
            if self.off is not None:
                out["off"] = self.off
            if self.last_reduce is not None:
                out["last_reduce"] = list(self.last_reduce)
            if self._told is not None:
                out["told"] = self._told.request.fork_id
            return out

    # training-thread side ---------------------------------------------------------------------------------------
    def at_boundary(self, *, out_of_inputs: bool = False) -> None:
        """One optimizer-step boundary of the model: read, decide, maybe load, start the next reduce. Never raises.
        `out_of_inputs`: this rank has joined under DDP's Join and shadows the others' boundary (rank_join.py): it
        votes against any load and offers no fork, so nothing loads while a rank no longer trains."""
        if self.off is not None:
            return
        world = distributed_world()
        if world is None:
            return
        self.out_of_inputs = out_of_inputs
        try:
            self._step(*world, out_of_inputs)
        except Exception as e:  # a dead peer, a torn-down group: the training's own next collective says so too
            self._turn_off(f"the ranks' agreement failed ({type(e).__name__}: {e}); nothing was loaded")

    def _step(self, rank: int, world: int, out_of_inputs: bool = False) -> None:
        dist = _dist()
        torch = sys.modules["torch"]
        if not self._joined:
            self._handshake(dist, rank, world)
            self._buffers = Buffers(torch, reduce_device(dist, torch, self.hooks.device()), world)
            self._joined = True
            watch_exit(self)  # the last reduce is left in flight: drained before the group goes (rank_exit.py)
        self.boundaries += 1
        if self._in_flight is not None:
            highest, lowest = self._in_flight.result()
            told_then = self._in_flight_told
            self._in_flight = None
            self.last_reduce = (highest, lowest)
            token = decide(highest, lowest, self._settled)
            if token is not None:
                assert told_then is not None and told_then.token == token  # every rank offered it, this one too
                self._load(dist, torch, rank, world, told_then, out_of_inputs)
        with self._cond:
            then, newest = self._in_flight_told, self._told
            if then is not None and then.reply is None and newest is not None and newest.token != then.token:
                self._supersede(then, newest.request.fork_id)  # not decided, and a newer fork came meanwhile
            told = self._told
            # A rank out of inputs (DDP Join) offers nothing; neither is an expired or already-settled fork offered.
            offerable = not out_of_inputs and told is not None and told.expired() is None
            offered = told if offerable and told is not None and told.token != self._settled else None
            self._in_flight_told = offered  # under the lock: `request` asks whether a fork is in flight
        assert self._buffers is not None
        self._in_flight = InFlight(dist, torch, self._buffers, offered.token if offered else 0)

    def _handshake(self, dist: Any, rank: int, world: int) -> None:
        global _job_id
        store = _default_store(dist)
        prefix = f"{_STORE_PREFIX}/{self.hooks.index}"
        if rank == 0:
            store.set(f"{_STORE_PREFIX}/job", secrets.token_hex(8))
        store.set(f"{prefix}/rank/{rank}", str(os.getpid()))
        keys = [f"{prefix}/rank/{r}" for r in range(world)] + [f"{_STORE_PREFIX}/job"]
        seconds = float(os.environ.get(HANDSHAKE_ENV) or _HANDSHAKE_S)
        group_timeout = _group_timeout_s(dist)
        if group_timeout is not None:
            # A rank without the preload waits for the others in the job's next collective meanwhile: past the
            # group's timeout it would abort the job. Half of it leaves the rest for the step that follows.
            seconds = min(seconds, group_timeout / 2)
        with contextlib.suppress(Exception):  # a timeout: the verdict below says what every rank does
            store.wait(keys, timedelta(seconds=seconds))
        # One verdict for all ranks, first writer wins: a rank that timed out says "off" while a late one may still
        # see every key; acting on its own view, the late one would issue the per-step reduce alone and have it
        # matched with the job's gradient all_reduce.
        mine = "on" if store.check(keys) else "off"
        if store.compare_set(f"{prefix}/verdict", "", mine).decode() != "on":
            missing = [r for r in range(world) if not store.check([f"{prefix}/rank/{r}"])]
            late = f"rank(s) {_ranks(missing)}" if missing else "a rank (here now, but after another rank gave up)"
            raise RuntimeError(
                f"{late} of the {world}-rank job reached no optimizer step with the fork-sidecar preload and a "
                f"registered model within {seconds:g}s of the others (install the preload in every rank's "
                "environment and call register() on every rank)"
            )
        with _job_lock:
            _job_id = store.get(f"{_STORE_PREFIX}/job").decode()

    def _load(self, dist: Any, torch: Any, rank: int, world: int, told: _Told, out_of_inputs: bool = False) -> None:
        """Every rank reads and checks the fork; if all could, all put it in; if any rank's put failed, all put
        their pre-fork weights back. Each step ends in a vote, so every rank takes the same branch."""
        self._loads += 1
        prepared, digest, problem, expired = self._read(told, out_of_inputs)
        read = self._vote(dist, torch, rank, world, "read", problem, expired=expired, digest=digest)
        if not read.ok:
            if prepared is not None:
                prepared.discard()
            if read.expired:
                # The daemon has given up on it (the request's deadline passed on some rank): it stays unloaded,
                # and a retry of the same fork may still be agreed on.
                why = read.sentence("could not take it in time", "no rank loaded it")
                self._log_unloaded(told, why)
                with self._cond:  # decided: not loaded. An agent still waiting must not answer "in progress" now
                    answered = told.withdrawn and told.voting
                    told.voting = False
                if answered:
                    self._send_late(told, error_reply("step_timeout", why, **rank_info(), loaded_at_step=None))
                return
            self._settle(told, error_reply("load_failed", read.sentence("could not load it", "no rank loaded it")))
            return
        assert prepared is not None
        steps = self.hooks.steps()
        with self.hooks.hold_forwards():  # also across the votes: no other thread's forward sees a rolled-back fork
            loaded, problem = None, None
            try:
                loaded = self.hooks.apply(prepared)
            except Exception as e:  # out of memory half-way, a failed check after the copy: undone on every rank
                problem = f"{type(e).__name__}: {e}"
            put = self._vote(dist, torch, rank, world, "apply", problem)
            if put.ok:
                self._settle(told, ok_reply(result="loaded", digest=loaded, applied=APPLIED, loaded_at_step=steps))
                return
            problem = None
            try:
                prepared.roll_back()
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
            back = self._vote(dist, torch, rank, world, "roll back", problem)
        failed = {"failed_ranks": sorted(put.failed)}
        if back.ok:
            why = put.sentence("could not put it into its model", "every rank put its pre-fork weights back")
            self._settle(told, error_reply("load_failed", why, rolled_back=True, **failed))
            return
        why = (
            put.sentence("could not put it into its model", "")
            + "; "
            + back.sentence("could not put its pre-fork weights back", "the ranks' weights may now differ")
            + ": stop the job and restart it from a checkpoint"
        )
        self._settle(told, error_reply("ranks_split", why, rolled_back=False, **failed))
        self._turn_off(f"a fork could not be undone on every rank, forks are off ({why})")

    def _read(self, told: _Told, out_of_inputs: bool) -> tuple[Any, str | None, str | None, bool]:
        """This rank's read and check of the fork: (the prepared load, its digest, why this rank votes no, whether
        only for being too late)."""
        prepared, digest = None, None
        problem = told.expired()
        expired = problem is not None
        if out_of_inputs:
            problem, expired = _OUT_OF_INPUTS, False
        if problem is None:
            try:
                prepared = self.hooks.prepare(told.checkpoint)
                digest = prepared.digest()
                if told.request.digest is not None and digest != told.request.digest:
                    problem = f"read {digest} but its daemon read {told.request.digest} from disk"
            except Exception as e:  # AdapterLoadError and anything else: this rank cannot load it, so nobody does
                problem = str(e)
        with self._cond:
            # Again at the vote, with the agent thread held off: reading a large file can outlast the request, and
            # an agent that answered "nobody loaded it" meanwhile must not see the ranks load it after all.
            if problem is None and (late := told.expired()) is not None:
                problem, expired = late, True
            told.voting = problem is None
        return prepared, digest, problem, expired

    def _vote(
        self,
        dist: Any,
        torch: Any,
        rank: int,
        world: int,
        phase: str,
        problem: str | None,
        *,
        expired: bool = False,
        digest: str | None = None,
    ) -> _Vote:
        """One all_reduce(MAX): per rank 0 (ok), 1 (failed) or 2 (too late), and [t, -t] of the digest read. A
        failing rank puts its reason into the job's store before the reduce, so every rank can name it after."""
        key = f"{_STORE_PREFIX}/{self.hooks.index}/load/{self._loads}/{phase}"
        assert self._buffers is not None
        votes = self._buffers.votes
        votes.zero_()
        if problem is not None:
            votes[rank] = _TOO_LATE if expired else _FAILED
            with contextlib.suppress(Exception):  # the reason is for the outcome; the vote is what counts
                _default_store(dist).set(f"{key}/{rank}", problem)
        elif digest is not None:
            votes[world], votes[world + 1] = fork_token(digest), -fork_token(digest)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        values = [int(v) for v in votes.tolist()]
        failed = {
            r: problem if r == rank and problem is not None else self._reason(dist, f"{key}/{r}")
            for r in range(world)
            if values[r]
        }
        expired_all = bool(failed) and all(values[r] == _TOO_LATE for r in failed)
        return _Vote(failed, values[world] == -values[world + 1], expired_all)

    def _reason(self, dist: Any, key: str) -> str:
        try:
            store = _default_store(dist)
            store.wait([key], timedelta(seconds=_REASON_WAIT_S))
            return str(store.get(key).decode("utf-8", "replace"))
        except Exception:
            return "it gave no reason"

    def _settle(self, told: _Told, reply: dict[str, Any]) -> None:
        reply = {**reply, **rank_info()}
        reply.setdefault("loaded_at_step", None)
        with self._cond:
            self._settled, self._settled_reply = told.token, reply
            for waiting in (told, self._told):  # a retry after a timeout waits on an entry of its own
                if waiting is not None and waiting.token == told.token and waiting.reply is None:
                    waiting.reply = reply
            self._cond.notify_all()
        if told.withdrawn:
            self._log_unloaded(told, "loaded" if reply.get("ok") else "not loaded")
            self._report_late(told, reply)

    def _report_late(self, told: _Told, reply: dict[str, Any]) -> None:
        if told.withdrawn and told.voting:  # its agent answered `load_in_progress`
            self._send_late(told, reply)

    def _send_late(self, told: _Told, reply: dict[str, Any]) -> None:
        """The result of a fork whose request was answered `load_in_progress`, for `status` (the daemon asks)."""
        with contextlib.suppress(Exception):
            self.hooks.settled_late(told.request, reply)

    def _log_unloaded(self, told: _Told, what: str) -> None:
        _log(
            f"late:{told.request.fork_id}",
            logging.INFO,
            "fork-sidecar: fork %s was decided by all ranks after this rank's request had timed out: %s",
            told.request.fork_id,
            what,
        )

    def drain(self, seconds: float) -> None:
        """The job's default group is about to be destroyed (or the interpreter to exit): wait up to `seconds` for
        the reduce in flight, drop it on this thread, and issue no collective from now on (see rank_exit.py)."""
        in_flight = self._in_flight
        if in_flight is not None:
            wait_done(in_flight.work, seconds)
        self._close(_GROUP_GONE)

    def _turn_off(self, why: str) -> None:
        _log(f"ranks-off:{self.hooks.index}", logging.WARNING, "fork-sidecar: %s", why)
        self._close(why)

    def _close(self, why: str) -> None:
        late = []
        with self._cond:
            self.off = why
            self._in_flight = None
            for told in (self._told, self._in_flight_told):
                if told is not None and told.reply is None:
                    told.reply = error_reply("ranks_off", why, **rank_info())
                    if told.voting:  # a collective failed while the ranks decided or loaded it: which weights
                        unknown = f"{why}; it was being loaded, and the ranks' weights may now differ"
                        told.reply = error_reply("ranks_split", unknown, **rank_info(), loaded_at_step=None)
                        late.append(told)
            self._cond.notify_all()
        for told in late:
            self._report_late(told, told.reply or {})


def _default_store(dist: Any) -> Any:
    """The default group's store (torchrun's TCPStore): the handshake's keys and a failing rank's reasons."""
    return dist.distributed_c10d._get_default_store()


def _group_timeout_s(dist: Any) -> float | None:
    """The shortest collective timeout of the default group's backends (init_process_group's `timeout`), or None
    when this torch does not show it."""
    torch: Any = sys.modules.get("torch")
    timeouts = []
    try:
        group = dist.distributed_c10d._get_default_group()
        for device in {d.type for d in group._device_types}:
            with contextlib.suppress(Exception):
                timeouts.append(group._get_backend(torch.device(device)).options._timeout.total_seconds())
    except Exception:
        return None
    return min(timeouts) if timeouts else None


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) if ranks else "?"
