"""What a failed request to a vLLM server means: one sentence a person can act on, and its reason code."""

from __future__ import annotations

from sidecar.protocol.reasons import Reason
from sidecar.vllm.client import ConnectFailed, HttpError, RequestFailed
from sidecar.vllm.discovery import ServerTarget

__all__ = ["explain_failure", "summarise_failures"]


def explain_failure(e: RequestFailed, target: ServerTarget, what: str) -> tuple[str, Reason]:
    """One sentence a person can act on, for a request that failed (never containing the key), and its reason."""
    sentence, reason = _sentence(e, target, what)
    return (sentence.replace(target.api_key, "***") if target.api_key else sentence), reason


def _sentence(e: RequestFailed, target: ServerTarget, what: str) -> tuple[str, Reason]:
    url = target.url
    if isinstance(e, ConnectFailed) and e.maybe_applied and not what.startswith("GET"):
        return (
            f"vLLM server {url} ({target.origin}) did not answer {what} in time ({e}) and does not list the new "
            "root; it may still apply it (its snapshot is kept) - check its log, then fork again."
        ), Reason.VLLM_UNREACHABLE
    if isinstance(e, ConnectFailed):
        return (
            f"vLLM server {url} ({target.origin}) did not answer {what} ({e}) after {e.attempts} attempt(s); "
            "check that it runs - a restarted server loads checkpoints/0000, which already holds the fork."
        ), Reason.VLLM_UNREACHABLE
    if not isinstance(e, HttpError):  # BadAnswer, or an answer of the wrong shape
        return (
            f"vLLM server {url} ({target.origin}) answered {what} with {e}; check that the URL is the vLLM server "
            "itself (not a proxy or another service) and that it is healthy."
        ), Reason.VLLM_BAD_ANSWER
    if e.route_missing and what.startswith("GET"):
        sentence = f"{url} ({target.origin}) is not a vLLM OpenAI server (HTTP {e.status} on {what}); check its URL."
        return sentence, Reason.VLLM_NOT_VLLM
    if e.route_missing:
        return (
            f"vLLM server {url} has no runtime LoRA loading (HTTP {e.status} on /v1/load_lora_adapter); restart it "
            "with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment."
        ), Reason.VLLM_ROUTE_MISSING
    if e.status in (401, 403):
        fix = (
            "the configured key was refused; check api_key_file / api_key_env"
            if target.api_key
            else "give its key with api_key_file or api_key_env under vllm.servers (or run the daemon as its user)"
        )
        return f"vLLM server {url} requires an API key (HTTP {e.status} on {what}); {fix}.", Reason.VLLM_UNAUTHORIZED
    tries = f"after {e.attempts} attempt(s)"
    sentence = f"vLLM server {url} ({target.origin}) failed to {what} (HTTP {e.status}: {e.message}) {tries}."
    return sentence, Reason.VLLM_HTTP_ERROR


def summarise_failures(errors: list[str]) -> str | None:
    if not errors:
        return None
    more = f" (and {len(errors) - 1} more server(s) failed; see servers)" if len(errors) > 1 else ""
    return errors[0] + more
