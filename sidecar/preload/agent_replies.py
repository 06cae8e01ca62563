"""One reply for the daemon from the replies of every target (model) of a process that serves the run.

The agent tells each target of the run at once (agent.py, `_fork_all`); what the daemon reads off the combined
reply is the digest, the result, and the rank fields every target carries alike (`trainers.agents`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.protocol.messages import RESULT_LOADED, RESULT_PENDING, error_reply, ok_reply

__all__ = ["combine_replies", "reply_summary"]


def combine_replies(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """The one reply: the first failure as it came; different digests are `mixed`; else loaded (or pending)."""
    if len(replies) == 1:
        return replies[0]
    failed = [r for r in replies if not r.get("ok")]
    if failed:
        return {**failed[0], "targets": replies}
    digests = {r.get("digest") for r in replies if r.get("digest")}
    results = {r.get("result") for r in replies}
    if len(digests) > 1:
        return error_reply("mixed", "the models of this run loaded different adapters", targets=replies)
    result = RESULT_LOADED if results == {RESULT_LOADED} else RESULT_PENDING
    return ok_reply(result=result, digest=next(iter(digests), None), **_shared(replies), targets=replies)


# What the daemon reads off a reply besides the digest (the rank fields and the step of the load, `trainers.agents`).
_SHARED_KEYS = (
    "rank",
    "world_size",
    "local_rank",
    "local_world_size",
    "initialized",
    "job",
    "loaded_at_step",
    "applied",
)


def _shared(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields every target's reply carries alike; `loaded_at_step` and `applied` also when the targets differ,
    so every agent entry of the outcome has them (each target's own value is in `targets`). Two models of one rank
    may load at adjacent boundaries (each model's ranks agree on their own): `loaded_at_step` is then the step by
    which every model held the fork, the same on every rank of the job."""
    out: dict[str, Any] = {}
    for key in _SHARED_KEYS:
        values = [r.get(key) for r in replies if key in r]
        if values and all(v == values[0] for v in values) and len(values) == len(replies):
            out[key] = values[0]
    steps = [r.get("loaded_at_step") for r in replies]
    ints = [v for v in steps if isinstance(v, int) and not isinstance(v, bool)]
    out["loaded_at_step"] = max(ints) if ints and len(ints) == len(steps) else None
    if any("applied" in r for r in replies):
        out.setdefault("applied", "mixed")
    return out


def reply_summary(reply: Mapping[str, Any]) -> dict[str, Any]:
    # Also what the daemon reads off a fork reply, for one that asks `status` after the reply came too late.
    keys = ("ok", "result", "digest", "seconds", "applied", "state", "error", "loaded_at_step", "job")
    return {k: reply[k] for k in keys if k in reply}
