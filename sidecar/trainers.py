"""The trainers stage: find the agents that serve a run, tell them about the fork, check what they loaded.

Agents live inside trainer processes and listen on `{runtime_dir}/{uid}/agent-<pid>.sock` (sidecar/protocol/). A run
is told only to agents of its owner (the uid owning the run directory) and of root: for a fork this stage asks every
live agent in those two users' directories `hello` (in parallel) to learn which runs it serves, sends `fork` to those
serving this run, and compares the digest each one reports with the digest of the new `checkpoints/0000`. An agent
of any other user is never contacted, whatever it claims to serve. A generic PEFT
trainer answers "loaded" with a digest; an ART trainer answers "load pending" (it loads when ART rebuilds its state,
and `fork-sidecar status` shows that result later).

Sockets of processes that are gone, or whose pid now belongs to a younger process, are removed here (the agent
removes its own at exit, but a killed trainer cannot).
"""

from __future__ import annotations

import contextlib
import shutil
import stat
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from sidecar.agent_dirs import ensure_user_dir
from sidecar.config import Config
from sidecar.protocol.client import ControlError, call_agent
from sidecar.protocol.digest import digest_problem
from sidecar.protocol.messages import LOAD_IN_PROGRESS, RESULT_LOADED, RESULT_PENDING, ForkRequest, reply_code
from sidecar.protocol.paths import agent_dir, pid_of_socket, uid_of_agent_dir
from sidecar.protocol.reasons import Reason, of_agent_code, of_control_code
from sidecar.protocol.run_layout import CHECKPOINTS, SERVED_STEP
from sidecar.rank_jobs import JobView, jobs_of, ranked_agent, split_steps
from sidecar.stages import ForkContext, RunHolder, StageOutcome

__all__ = [
    "AgentSocket",
    "TrainerStage",
    "agent_dirs_of",
    "agent_statuses",
    "clean_stale_sockets",
    "list_agent_sockets",
]

HELLO_TIMEOUT_S = 5.0
STATUS_TIMEOUT_S = 3.0
_MAX_PARALLEL = 16
# Errors worth another attempt: the agent was busy or a step did not end in time. Refusals are final.
_RETRY_REPLY_CODES = frozenset({"busy", "step_timeout", "timeout", "io"})
_RETRY_CONTROL_CODES = frozenset({"unreachable", "timeout", "protocol"})
_STALE_PRIVATE_DIR_S = 60.0
_LATE_POLL_S = 0.1  # between looks at the status of an agent whose fork reply is late


@dataclass(frozen=True)
class AgentSocket:
    path: Path
    pid: int
    uid: int  # the user whose agent directory it is in (call_agent checks the process runs as that user)


def agent_dirs_of(runtime_dir: Path) -> list[tuple[int, Path]]:
    """(uid, directory) of every per-user agent directory this process can see."""
    try:
        entries = list(Path(runtime_dir).iterdir())
    except OSError:
        return []
    return sorted((uid, p) for p in entries if (uid := uid_of_agent_dir(p)) is not None)


def list_agent_sockets(runtime_dir: Path, uids: Iterable[int] | None = None) -> list[AgentSocket]:
    """Every `agent-<pid>.sock` (live or not) in the directories of `uids` (default: every user's), by pid.

    A directory another user's (0700) is unreadable unless this process is root or that user: skipped."""
    found = []
    for uid, directory in _dirs(runtime_dir, uids):
        with contextlib.suppress(OSError):
            found += [AgentSocket(p, pid, uid) for p in directory.iterdir() if (pid := pid_of_socket(p)) is not None]
    return sorted(found, key=lambda a: a.pid)


def _dirs(runtime_dir: Path, uids: Iterable[int] | None) -> list[tuple[int, Path]]:
    if uids is None:
        return agent_dirs_of(runtime_dir)
    return [(u, agent_dir(runtime_dir, u)) for u in sorted(set(uids))]


def _is_stale(agent: AgentSocket) -> bool:
    try:
        st = agent.path.lstat()
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False
    try:
        started = psutil.Process(agent.pid).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False
    # The pid was reused: the process holding it started after the socket was made (1 s of clock slack).
    return started > st.st_mtime + 1.0


def clean_stale_sockets(runtime_dir: Path, uids: Iterable[int] | None = None) -> list[Path]:
    """Remove sockets of dead (or reused) pids and leftovers of interrupted binds in the directories of `uids`
    (default: every user's); returns what was removed."""
    removed = []
    for agent in list_agent_sockets(runtime_dir, uids):
        if _is_stale(agent):
            with contextlib.suppress(OSError):
                agent.path.unlink()
                removed.append(agent.path)
    for _, directory in _dirs(runtime_dir, uids):
        removed += _clean_private_dirs(directory)
    return removed


def _clean_private_dirs(directory: Path) -> list[Path]:
    removed = []
    with contextlib.suppress(OSError):
        for private in directory.glob(".agent-*"):
            # A bind's private directory lives for microseconds; an old one was left by a crash in between.
            with contextlib.suppress(OSError):
                if private.is_dir() and time.time() - private.lstat().st_mtime > _STALE_PRIVATE_DIR_S:
                    shutil.rmtree(private)
                    removed.append(private)
    return removed


def agent_statuses(runtime_dir: Path) -> list[dict[str, Any]]:
    """What each live agent reports (`status`), for `fork-sidecar status`; deferred ART loads are in `recent`."""
    out = []
    for agent in list_agent_sockets(runtime_dir):
        entry: dict[str, Any] = {"pid": agent.pid, "uid": agent.uid, "socket": str(agent.path)}
        if _is_stale(agent):
            out.append({**entry, "error": "stale socket (process gone)", "reason": Reason.TRAINER_GONE})
            continue
        try:
            reply = call_agent(agent.path, {"op": "status"}, timeout=STATUS_TIMEOUT_S, pid=agent.pid)
        except ControlError as e:
            out.append({**entry, "error": e.message, "reason": _control_reason(e, agent)})
            continue
        if reply.get("ok"):
            reply.pop("ok", None)
            out.append({**entry, **reply})
        else:
            out.append({**entry, "error": _reply_error(reply), "reason": _reply_reason(reply)})
    return out


def _reply_reason(reply: dict[str, Any]) -> Reason:
    return of_agent_code(reply_code(reply))


def _control_reason(e: ControlError, agent: AgentSocket, ctx: ForkContext | None = None) -> Reason:
    # A trainer killed while it was asked drops the connection ("closed", "reset"): the process table says why. In
    # a fork, looking again never runs past the stage's deadline.
    grace = GONE_GRACE_S if ctx is None else min(GONE_GRACE_S, max(ctx.remaining(), 0.0))
    if e.code in ("unreachable", "protocol") and _process_gone(agent.pid, grace):
        return Reason.TRAINER_GONE
    return of_control_code(e.code)


# A killed process closes its sockets (the daemon reads "reset") a moment before the process table shows it dead: on a
# loaded machine the look came first and a killed trainer was reported unreachable. How long to look again.
GONE_GRACE_S = 0.5


def _process_gone(pid: int, grace: float = GONE_GRACE_S) -> bool:
    """Whether `pid` is dead (gone, or a zombie not reaped yet), looking again for up to `grace` seconds."""
    deadline = time.monotonic() + grace
    while True:
        try:
            if psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return True
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _reply_error(reply: dict[str, Any]) -> str:
    error = reply.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or "error")
    return str(error or "agent answered without ok")


@dataclass
class _Hello:
    agent: AgentSocket
    reply: dict[str, Any] | None = None
    error: str | None = None
    reason: Reason | None = None

    @property
    def runs(self) -> list[str]:
        runs = (self.reply or {}).get("runs")
        return [r for r in runs if isinstance(r, str)] if isinstance(runs, list) else []


class TrainerStage:
    """The pipeline stage that tells trainer agents about a fork (see the module docstring)."""

    name = "trainers"

    def __init__(self, config: Config) -> None:
        self.runtime_dir = Path(config.runtime_dir)
        self.required = config.trainer.required
        self.agent_timeout = float(config.trainer.agent_timeout)
        self.retries = int(config.trainer.retries)
        # Only with etcd do the daemons of the other nodes of a job spread over several hear of its forks.
        self.coordinated = config.coordination.backend == "etcd"

    def on_start(self, run_dirs: Sequence[Path], hold: RunHolder) -> None:
        clean_stale_sockets(self.runtime_dir)

    def run(self, ctx: ForkContext) -> StageOutcome:
        started = time.monotonic()
        # The owner of the directory the fork holds, and root: nobody else's trainer may hear of this run (its id,
        # digest, paths), whatever the path names by now.
        owner = ctx.owner_uid
        uids = {0} if owner is None else {owner, 0}
        if owner is not None:
            ensure_user_dir(self.runtime_dir, owner)  # the daemon's main loop makes it too; a fresh run may beat it
        clean_stale_sockets(self.runtime_dir, uids)
        agents = [a for a in list_agent_sockets(self.runtime_dir, uids) if a.uid in uids]
        run_dir = str(ctx.real_model_dir)
        with ThreadPoolExecutor(max_workers=_MAX_PARALLEL, thread_name_prefix="trainers") as pool:
            hellos = list(pool.map(lambda a: self._hello(a, ctx), agents))
        serving = [h for h in hellos if run_dir in h.runs]
        unreachable = [{"pid": h.agent.pid, "error": h.error, "reason": h.reason} for h in hellos if h.error]
        jobs = jobs_of(ranked_agent(h.agent.pid, h.reply or {}) for h in serving)
        detail: dict[str, Any] = {"agents": []}
        if jobs:
            detail["jobs"] = [job.to_json() for job in jobs]
        if unreachable:
            detail["unreachable"] = unreachable
        incomplete = [job for job in jobs if job.missing]
        if incomplete:
            # Ranks load only together: telling the others would only make them wait out their timeout.
            sentence = _missing_ranks_sentence(incomplete[0], ctx, unreachable)
            return StageOutcome("failed", time.monotonic() - started, sentence, detail, Reason.TRAINER_RANKS_MISSING)
        stranded = [job for job in jobs if job.elsewhere] if not self.coordinated else []
        if stranded:
            sentence = _stranded_ranks_sentence(stranded[0], ctx)
            return StageOutcome("failed", time.monotonic() - started, sentence, detail, Reason.TRAINER_RANKS_MISSING)
        # Every rank of a job must hear of the fork at once (each waits for the others): one thread per agent.
        with ThreadPoolExecutor(max_workers=max(_MAX_PARALLEL, len(serving)), thread_name_prefix="trainers") as pool:
            results = list(pool.map(lambda h: self._fork(h, ctx, run_dir), serving))
        detail["agents"] = results
        seconds = time.monotonic() - started
        if not results:
            return self._none_found(ctx, seconds, detail)
        failed = [r for r in results if r.get("error")]
        if failed:
            more = f" (and {len(failed) - 1} more agent(s) failed)" if len(failed) > 1 else ""
            return StageOutcome("failed", seconds, f"{failed[0]['error']}{more}", detail, failed[0]["reason"])
        split = split_steps(results)
        if split is not None:
            return StageOutcome("failed", seconds, split, detail, Reason.TRAINER_RANKS_OFF)
        return StageOutcome("ok", seconds, None, detail)

    def _none_found(self, ctx: ForkContext, seconds: float, detail: dict[str, Any]) -> StageOutcome:
        silent = detail.get("unreachable") or []
        if silent:
            # A trainer that did not answer hello may be this run's, stuck: say so rather than "none found".
            first = silent[0]
            more = f" (and {len(silent) - 1} more)" if len(silent) > 1 else ""
            why = (
                f"no agent that answered serves {ctx.model_dir}, but trainer pid {first['pid']}{more} did not answer "
                f"hello ({first.get('error')}) and may serve it"
            )
            reason = first.get("reason")
            if not self.required:
                return StageOutcome("skipped", seconds, why, detail, reason)
            return StageOutcome(
                "failed", seconds, f"{why}; check whether that trainer is stuck, then fork again", detail, reason
            )
        if not self.required:
            return StageOutcome("skipped", seconds, "none found", detail, Reason.TRAINER_NONE_FOUND)
        owner = ctx.owner_uid
        where = agent_dir(self.runtime_dir, owner) if owner is not None else self.runtime_dir
        sentence = (
            f"no trainer agent serves {ctx.model_dir} (looked in {where}, for its owner's trainers); start the "
            "trainer with the preload installed (`fork-sidecar preload install`), or set trainer.required: false"
        )
        return StageOutcome("failed", seconds, sentence, detail, Reason.TRAINER_NONE_FOUND)

    def _hello(self, agent: AgentSocket, ctx: ForkContext) -> _Hello:
        timeout = min(HELLO_TIMEOUT_S, max(ctx.remaining(), 0.1))
        try:
            reply = call_agent(agent.path, {"op": "hello"}, timeout=timeout, pid=agent.pid)
        except ControlError as e:
            return _Hello(agent, error=e.message, reason=_control_reason(e, agent, ctx))
        if not reply.get("ok"):
            return _Hello(agent, error=_reply_error(reply), reason=_reply_reason(reply))
        return _Hello(agent, reply=reply)

    def _fork(self, hello: _Hello, ctx: ForkContext, run_dir: str) -> dict[str, Any]:
        agent = hello.agent
        host = (hello.reply or {}).get("host")
        ranked = ranked_agent(agent.pid, hello.reply or {})
        outcome: dict[str, Any] = {"pid": agent.pid, "host": host, "rank": ranked.rank, "world_size": ranked.world_size}
        if ranked.job is not None:
            outcome["job"] = ranked.job
        who = f"trainer pid {agent.pid}{_of_job(ranked.rank, ranked.world_size)}{_on(host)}"
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            reply, failure, retry = self._fork_once(agent, ctx, run_dir)
            if failure is None or not retry or attempts > self.retries or ctx.remaining() <= 0:
                break
        outcome["attempts"] = attempts
        outcome["seconds"] = round(time.monotonic() - started, 4)
        if failure is not None:
            error, reason = failure
            outcome["result"] = "failed"
            outcome["error"] = f"{who}: {error}"
            outcome["reason"] = reason
            return outcome
        assert reply is not None
        result = reply.get("result")
        outcome["result"] = result
        outcome["loaded_at_step"] = reply.get("loaded_at_step")
        if isinstance(reply.get("job"), str):
            outcome["job"] = reply["job"]
        for key in ("digest", "message", "state", "applied", "answered"):
            if key in reply:
                outcome[key] = reply[key]
        if result == RESULT_LOADED:
            digest = reply.get("digest")
            problem = digest_problem(digest)
            if problem is not None:  # e.g. a preload copy older than the daemon: never compare across framings
                outcome["error"] = f"{who} answered with a digest that {problem}"
                outcome["reason"] = Reason.TRAINER_PROTOCOL
            elif digest != ctx.digest:
                outcome["error"] = (
                    f"{who} holds {digest} but {ctx.checkpoint_dir} is {ctx.digest}; it did not load the forked adapter"
                )
                outcome["reason"] = Reason.TRAINER_DIGEST_MISMATCH
        elif result != RESULT_PENDING:
            outcome["error"] = f"{who} answered an unknown result {result!r}"
            outcome["reason"] = Reason.TRAINER_PROTOCOL
        return outcome

    def _fork_once(
        self, agent: AgentSocket, ctx: ForkContext, run_dir: str
    ) -> tuple[dict[str, Any] | None, tuple[str, Reason] | None, bool]:
        """One attempt: (reply, (error sentence, reason) or None, worth retrying)."""
        timeout = min(self.agent_timeout, ctx.remaining())
        if timeout <= 0:
            return None, ("no time left before the trainers stage deadline", Reason.TRAINER_TIMEOUT), False
        # Half the budget may go to waiting for a step boundary; the rest is for reading and loading. `not_after`
        # carries the same limit as a time, so this give-up reaches an agent that reads the request late or runs
        # its step boundary late (a stopped rank): it never starts the load after it.
        wait = round(timeout / 2, 3)
        request = ForkRequest(
            fork_id=ctx.fork_id,
            run_dir=run_dir,
            checkpoint_dir=str(Path(run_dir) / CHECKPOINTS / SERVED_STEP),
            digest=ctx.digest,
            timeout=wait,
            not_after=round(time.monotonic() + wait, 3),
        )
        try:
            reply = call_agent(agent.path, request.to_message(), timeout=timeout, pid=agent.pid)
        except ControlError as e:
            late = self._late_reply(agent, ctx, request) if e.code == "timeout" else None
            if late is not None:
                return self._answered_late(late)
            return None, (e.message, _control_reason(e, agent, ctx)), e.code in _RETRY_CONTROL_CODES
        if not reply.get("ok"):
            code = reply_code(reply)
            late = self._late_reply(agent, ctx, request) if code == LOAD_IN_PROGRESS else None
            if late is not None:
                return self._answered_late(late)
            return None, (_reply_error(reply), _reply_reason(reply)), code in _RETRY_REPLY_CODES
        return reply, None, False

    @staticmethod
    def _answered_late(
        late: dict[str, Any],
    ) -> tuple[dict[str, Any] | None, tuple[str, Reason] | None, bool]:
        if late.get("ok"):
            return {**late, "answered": "late, through status"}, None, False
        return None, (_reply_error(late), _reply_reason(late)), False  # it gave up on the fork itself, and says why

    def _late_reply(self, agent: AgentSocket, ctx: ForkContext, request: ForkRequest) -> dict[str, Any] | None:
        """The agent's own record of this fork, once its reply did not come within the call's timeout or said
        `load_in_progress`: a load that started before `not_after` (a slow copy; ranks held up inside the agreed
        step) may end after that, and calling it a failure would say the trainer kept the old weights while it holds
        the forked ones. Asked for until half an agent timeout more has passed, within the stage's deadline; None if
        no result showed up. Only this attempt's entry counts (its `not_after`): an earlier attempt's answer, say a
        step timeout, is not what became of this one (a preload that does not record it is never matched)."""
        deadline = time.monotonic() + min(self.agent_timeout / 2, ctx.remaining())
        while (left := deadline - time.monotonic()) > 0:
            try:
                status = call_agent(agent.path, {"op": "status"}, timeout=min(STATUS_TIMEOUT_S, left), pid=agent.pid)
            except ControlError:
                return None
            for entry in reversed(status.get("recent") or []):
                if isinstance(entry, dict) and (entry.get("fork_id"), entry.get("not_after")) == (
                    ctx.fork_id,
                    request.not_after,
                ):
                    if reply_code(entry) != LOAD_IN_PROGRESS:
                        return entry
                    break  # the newest word on it: still going
            time.sleep(min(_LATE_POLL_S, max(0.0, deadline - time.monotonic())))
        return None


def _on(host: object) -> str:
    return f" on {host}" if isinstance(host, str) and host else ""


def _of_job(rank: int, world_size: int) -> str:
    return f" (rank {rank} of {world_size})" if world_size > 1 else ""


def _missing_ranks_sentence(job: JobView, ctx: ForkContext, unreachable: list[dict[str, Any]]) -> str:
    missing = job.missing
    where = (
        f"should run on this node (local world size {job.local_world_size})"
        if job.local_world_size
        else "should run on this node (no LOCAL_WORLD_SIZE: the whole job is expected here)"
    )
    pids = ", ".join(str(u["pid"]) for u in unreachable)
    silent = f"; trainer pid(s) {pids} did not answer hello" if unreachable else ""
    ranks = ", ".join(map(str, missing))
    return (
        f"rank{'s' if len(missing) > 1 else ''} {ranks} of the {job.world_size}-rank job training {ctx.model_dir} "
        f"{where} but no agent of {'theirs' if len(missing) > 1 else 'its'} serves the run{silent}; no rank was told, "
        "since ranks load a fork only together: check that rank, then fork again"
    )


def _stranded_ranks_sentence(job: JobView, ctx: ForkContext) -> str:
    elsewhere = job.elsewhere
    ranks = ", ".join(map(str, elsewhere))
    here = ", ".join(map(str, sorted(job.here)))
    return (
        f"rank{'s' if len(elsewhere) > 1 else ''} {ranks} of the {job.world_size}-rank job training {ctx.model_dir} "
        f"run on other nodes (this node runs rank(s) {here}, local world size {job.local_world_size}), and with "
        "coordination.backend: filesystem no daemon there hears of the fork; no rank was told, since ranks load a "
        "fork only together: set coordination.backend: etcd on every node of the job (docs/operations.md), then "
        "fork again"
    )
