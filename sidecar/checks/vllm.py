"""The doctor's checks of vLLM servers: each answers with its key and has runtime LoRA loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.config import Config

if TYPE_CHECKING:
    pass
from sidecar.checks.findings import PROBE_TIMEOUT_S, Context, Finding, Level
from sidecar.checks.host import watched_roots

__all__ = ["check_vllm", "probe_vllm"]


# --- vLLM -------------------------------------------------------------------------------------------------------------
def _vllm_targets(ctx: Context) -> list[Any]:
    from sidecar.vllm.discovery import configured_servers, discover_servers, merge_targets

    config = ctx.config
    # Every configured server, whatever runs it is for: make each match any run, then reuse the key loading.
    every = tuple(dataclasses.replace(s, runs=("*",)) for s in config.vllm.servers)
    configured = configured_servers(
        dataclasses.replace(config, vllm=dataclasses.replace(config.vllm, servers=every)), Path("/")
    )
    discover = ctx.discover or discover_servers
    return merge_targets(configured, discover() if config.vllm.discover else [])


def probe_vllm(target: Any, request_timeout: float = PROBE_TIMEOUT_S) -> Finding:
    """Reachable with its key (GET /v1/models) and runtime LoRA loading enabled (the load route exists)."""
    import time

    from sidecar.vllm.client import ConnectFailed, HttpError, RequestFailed, VllmClient
    from sidecar.vllm.discovery import listener_check

    where = f"{target.url} ({target.origin})"
    if target.problem:
        return Finding("vllm", "problem", f"{where}: {target.problem}", "fix the server's entry under vllm.servers.")
    if stranger := listener_check(target):  # its key goes only to its own process's socket
        return Finding("vllm", "problem", f"{where}: {stranger}", "check which process holds that port.")
    client = VllmClient(target.url, target.api_key, request_timeout)
    deadline = time.monotonic() + request_timeout
    try:
        cards = client.models(deadline)
    except ConnectFailed as e:
        return Finding(
            "vllm", "problem", f"{where} did not answer ({e})", "start it, or fix its URL under vllm.servers."
        )
    except HttpError as e:
        return _http_problem(where, target, e, "GET /v1/models")
    except RequestFailed as e:  # an answer that is not a model list (an HTML page, truncated JSON)
        return Finding("vllm", "problem", f"{where} answered GET /v1/models with {e}", "check that the URL is vLLM's.")
    try:
        client.request("POST", "/v1/load_lora_adapter", {}, deadline)
    except ConnectFailed as e:
        return Finding("vllm", "problem", f"{where} stopped answering ({e})", "check that it runs.")
    except HttpError as e:
        if e.route_missing:
            return Finding(
                "vllm",
                "problem",
                f"{where} has no runtime LoRA loading (HTTP {e.status} on /v1/load_lora_adapter), so forks cannot "
                "reach it",
                "restart it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment.",
            )
        if e.status in (401, 403):
            return _http_problem(where, target, e, "POST /v1/load_lora_adapter")
        if not 400 <= e.status < 500:
            return Finding(
                "vllm", "problem", f"{where} answered HTTP {e.status} to a load probe: {e.message}", "check its log."
            )
    adapters = sum(1 for c in cards if c.parent is not None)
    keyed = " with its API key" if target.api_key else ""
    return Finding("vllm", "ok", f"{where}: reachable{keyed}, runtime LoRA loading on, {adapters} adapter(s) loaded")


def _http_problem(where: str, target: Any, e: Any, what: str) -> Finding:
    if e.status in (401, 403):
        if target.api_key:
            fix = "the configured key was refused: check api_key_file / api_key_env under vllm.servers."
        else:
            fix = "give its key with api_key_file or api_key_env under vllm.servers (or run as the server's user)."
        return Finding("vllm", "problem", f"{where} requires an API key (HTTP {e.status} on {what})", fix)
    if e.route_missing:
        return Finding(
            "vllm", "problem", f"{where} is not a vLLM OpenAI server (HTTP {e.status} on {what})", "check its URL."
        )
    return Finding("vllm", "problem", f"{where} answered HTTP {e.status} on {what}: {e.message}", "check its log.")


def check_vllm(ctx: Context) -> list[Finding]:
    targets = _vllm_targets(ctx)
    if not targets:
        how = "discovery found none" if ctx.config.vllm.discover else "discovery is off"
        level: Level = "problem" if ctx.config.vllm.required else "info"
        fix = "start the servers, or list them under vllm.servers." if level == "problem" else None
        return [Finding("vllm", level, f"no vLLM server found ({how}, {len(ctx.config.vllm.servers)} configured)", fix)]
    timeout = min(PROBE_TIMEOUT_S, float(ctx.config.vllm.request_timeout))
    findings = [probe_vllm(t, timeout) for t in targets]
    silent = [t.url for t, f in zip(targets, findings, strict=True) if f.level == "problem"]
    kept = _fork_snapshots(ctx.config) if silent else []
    if kept:
        findings.append(
            Finding(
                "vllm",
                "problem",
                f"{len(kept)} vLLM fork snapshot(s) on disk (e.g. {kept[0]}) and kept: {', '.join(silent)} cannot be "
                "asked which adapter paths it reads, so none is removed and every fork adds one",
                f"start {silent[0]} or remove it from vllm.servers; the next fork then removes the unused ones.",
            )
        )
    return findings


def _fork_snapshots(config: Config) -> list[Path]:
    from sidecar.layout import iter_run_dirs
    from sidecar.vllm.snapshots import list_snapshots

    return [p for root in watched_roots(config) for run in iter_run_dirs(root) for p in list_snapshots(run.checkpoints)]
