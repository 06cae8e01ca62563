"""Why a trainer agent or a vLLM server failed a fork, as data: one code per failure, set where the failure is known.

Each failed agent entry and server report in an outcome, and each failed or skipped stage, carries `reason` next to
its `error` sentence. The sentence is for a person and may be reworded; the code is for machines and never changes
once released: it is the `reason` label of `fork_sidecar_reload_errors_total`, and alerts match on it. Add codes,
never rename one.

The agent answers errors with its own protocol codes (`step_timeout`, `busy`, ...: protocol/server.py); the daemon
names the reason from that code (`of_agent_code`), so a preload copy older than the daemon still gets the right label.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TRAINER_REASONS", "VLLM_REASONS", "Reason", "of_agent_code", "of_control_code"]


class Reason(StrEnum):
    # vLLM servers
    VLLM_ROUTE_MISSING = "vllm_route_missing"  # no runtime LoRA loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING unset)
    VLLM_UNAUTHORIZED = "vllm_unauthorized"  # the API key is missing, refused or unreadable
    VLLM_UNREACHABLE = "vllm_unreachable"  # no HTTP answer: refused, reset, or none in time (a hung server)
    VLLM_NOT_VLLM = "vllm_not_vllm"  # the URL answers, but has no /v1/models
    VLLM_BAD_ANSWER = "vllm_bad_answer"  # an HTTP answer that is not what the route returns (HTML, truncated JSON)
    VLLM_ROOT_MISMATCH = "vllm_root_mismatch"  # answered 200 but still lists another adapter path
    VLLM_RELATIVE_ROOT = "vllm_relative_root"  # lists an adapter root that cannot be placed (relative)
    VLLM_NOT_ASKED = "vllm_not_asked"  # its port is held by another process than the one found: nothing was sent
    VLLM_SNAPSHOT = "vllm_snapshot"  # the fork snapshot could not be made (space, permissions)
    VLLM_NONE_FOUND = "vllm_none_found"  # no server serves the run
    VLLM_HTTP_ERROR = "vllm_http_error"  # any other HTTP error status (a 500, a 400)
    VLLM_OTHER = "vllm_other"  # a bug in the stage (see journalctl)
    # Trainer agents
    TRAINER_DIGEST_MISMATCH = "trainer_digest_mismatch"  # loaded, but not the adapter checkpoints/0000 holds
    TRAINER_NONE_FOUND = "trainer_none_found"  # no agent serves the run
    TRAINER_TIMEOUT = "trainer_timeout"  # no answer in time: a step that never ends, a hung agent, no time left
    TRAINER_UNREACHABLE = "trainer_unreachable"  # the socket refused or dropped the connection
    TRAINER_GONE = "trainer_gone"  # the trainer process is gone (killed, exited) before or while it was asked
    TRAINER_REFUSED = "trainer_refused"  # the agent said no (not its run, not its user, a request it rejects)
    TRAINER_BUSY = "trainer_busy"  # still applying an earlier fork of that model
    TRAINER_LOAD_FAILED = "trainer_load_failed"  # tried and could not load the adapter (damaged, wrong shapes)
    TRAINER_PROTOCOL = "trainer_protocol"  # an answer this daemon cannot use (old digest framing, unknown result)
    TRAINER_OTHER = "trainer_other"  # a bug in the agent or the stage (see the trainer's log / journalctl)
    # Ranks of a torch.distributed job (sidecar/preload/rank_agreement.py, sidecar/rank_jobs.py)
    TRAINER_RANKS_MISSING = "trainer_ranks_missing"  # ranks expected on this node have no agent serving the run
    TRAINER_RANKS_OFF = "trainer_ranks_off"  # the ranks cannot agree (a rank without the preload, a failed collective)


VLLM_REASONS = tuple(r for r in Reason if r.startswith("vllm_"))
TRAINER_REASONS = tuple(r for r in Reason if r.startswith("trainer_"))

# The agent's error codes (error_reply in sidecar/preload/agent.py and art.py, ControlServer in protocol/server.py).
_AGENT_CODES = {
    "step_timeout": Reason.TRAINER_TIMEOUT,
    "load_in_progress": Reason.TRAINER_TIMEOUT,  # the ranks were still putting it in when the agent had to answer
    "timeout": Reason.TRAINER_TIMEOUT,
    "busy": Reason.TRAINER_BUSY,
    "load_failed": Reason.TRAINER_LOAD_FAILED,
    "mixed": Reason.TRAINER_LOAD_FAILED,
    "gone": Reason.TRAINER_LOAD_FAILED,  # the registered model was garbage-collected: nothing to load into
    "forbidden": Reason.TRAINER_REFUSED,
    "not_serving": Reason.TRAINER_REFUSED,
    "unknown_op": Reason.TRAINER_REFUSED,
    "bad_request": Reason.TRAINER_REFUSED,
    "bad_message": Reason.TRAINER_REFUSED,
    "too_large": Reason.TRAINER_REFUSED,
    "io": Reason.TRAINER_UNREACHABLE,
    "ranks_off": Reason.TRAINER_RANKS_OFF,
    "ranks_split": Reason.TRAINER_RANKS_OFF,  # a roll-back failed on a rank: the ranks' weights may differ
    "superseded": Reason.TRAINER_BUSY,  # a newer fork came before the ranks agreed on this one; the newer one loads
}
# ControlError codes of the daemon's client (call_agent).
_CONTROL_CODES = {
    "timeout": Reason.TRAINER_TIMEOUT,
    "unreachable": Reason.TRAINER_UNREACHABLE,
    "gone": Reason.TRAINER_GONE,
    "refused": Reason.TRAINER_REFUSED,
    "protocol": Reason.TRAINER_UNREACHABLE,  # the connection ended without a whole reply
}


def of_agent_code(code: object) -> Reason:
    """The reason for an agent's error reply code (TRAINER_OTHER for `internal` and codes this daemon does not know)."""
    return _AGENT_CODES.get(code, Reason.TRAINER_OTHER) if isinstance(code, str) else Reason.TRAINER_OTHER


def of_control_code(code: str) -> Reason:
    """The reason for a ControlError code (talking to the agent failed before it could answer)."""
    return _CONTROL_CODES.get(code, Reason.TRAINER_OTHER)
