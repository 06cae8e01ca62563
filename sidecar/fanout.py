"""One fork on every node serving its run (etcd backend): what a node reports, and how the claimer folds reports in.

After the swap the claimer publishes the fork (Claims.publish); every other member daemon runs its own trainers and
vllm stages for it (`tell_this_node`) and reports both outcomes under the fork's key; the claimer waits for them
(Claims.gather, bounded by the two stage timeouts) and its verify step folds them in here. The outcome's `nodes`
names every node that served the run with its stages, and every member that did not report, with why. A node report
is the stage outcomes as the node wrote them, so per-agent fields (ranks, say) merge by node without translation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.config import Config
from sidecar.protocol.reasons import Reason
from sidecar.run_io import RunIOError, run_dir_of_record
from sidecar.rundir import RunDirError, open_run
from sidecar.stages import ForkContext

if TYPE_CHECKING:
    from sidecar.journal import ForkRecord
    from sidecar.pipeline import ForkPipeline

__all__ = [
    "OTHER_REASON",
    "STAGE_NAMES",
    "Gathered",
    "lease_gone",
    "node_problems",
    "nodes_of_fork",
    "raised_report",
    "recorded_members",
    "recorded_nodes",
    "tell_this_node",
]

log = logging.getLogger("sidecar.fanout")
STAGE_NAMES = ("trainers", "vllm")
OTHER_REASON = {"trainers": Reason.TRAINER_OTHER, "vllm": Reason.VLLM_OTHER}  # a bug in the stage


@dataclass
class Gathered:
    """What the claimer learnt from the other members: their reports, who did not report and why, how long."""

    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)  # the other members when the fork was published
    seconds: float | None = None  # from publishing to the last report


def served(report: dict[str, Any]) -> bool:
    """Whether a node's stages found anything of the run to tell (an agent, a server)."""
    return any((report.get(name) or {}).get("status") not in (None, "skipped") for name in STAGE_NAMES)


def raised_report(error: str) -> dict[str, Any]:
    """A node's report when its stages raised: every stage failed, so the node is named and fails the fork where
    a stage is required (a bare error would read as a node that serves nothing of the run)."""
    return {name: {"status": "failed", "error": error, "reason": OTHER_REASON[name]} for name in STAGE_NAMES}


def tell_this_node(pipeline: ForkPipeline, published: dict[str, Any]) -> dict[str, Any]:
    """Run this node's trainers and vllm stages for a fork another node claimed and swapped; their outcomes."""
    model_dir = Path(str(published["model_dir"]))
    try:
        opened = open_run(run_dir_of_record(model_dir))
    except RunDirError as e:
        return {name: {"status": "failed", "error": str(e)} for name in STAGE_NAMES}
    try:
        try:
            io = pipeline.io_for(opened)
        except (RunIOError, OSError) as e:
            return {name: {"status": "failed", "error": f"{model_dir}: {e}"} for name in STAGE_NAMES}
        try:
            report: dict[str, Any] = {}
            for name in STAGE_NAMES:
                ctx = ForkContext(
                    str(published["fork_id"]),
                    model_dir,
                    Path(str(published["source"])),
                    str(published["digest"]),
                    time.monotonic() + float(getattr(pipeline.config.timeouts, name)),
                    owner_uid=opened.uid,
                    run_id=(opened.dev, opened.ino),
                    files=io,
                )
                logger = logging.LoggerAdapter(log, {"fork_id": ctx.fork_id, "fork_stage": name})
                report[name] = pipeline.steps.run_stage(name, ctx, logger).to_json()
            return report
        finally:
            io.close()
    finally:
        opened.close()


def nodes_of_fork(
    record: ForkRecord, gathered: Gathered, config: Config
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The outcome's `nodes` (this node's stages beside the others') and the fan-out facts for metrics."""
    here = {name: record.sections.get(name, {"status": "skipped"}) for name in STAGE_NAMES}
    nodes: dict[str, dict[str, Any]] = {}
    if served(here):
        nodes[config.node.name] = here
    for node, report in sorted(gathered.reports.items()):
        if served(report):
            nodes[node] = {name: report.get(name, {"status": "skipped"}) for name in STAGE_NAMES}
    for node, why in sorted(gathered.missing.items()):
        nodes[node] = {"status": "missing", "error": why}
    fanout = {
        "members": gathered.members,
        "reported": len(gathered.reports) + 1,  # this node, and every other that reported
        "missing": sorted(gathered.missing),
        "seconds": None if gathered.seconds is None else round(gathered.seconds, 4),
    }
    return nodes, fanout


def node_problems(gathered: Gathered, config: Config) -> list[str]:
    """The sentences that fail the fork: another node's failed stage, or a silent node where a stage is required."""
    problems = []
    for node, report in sorted(gathered.reports.items()):
        for name in STAGE_NAMES:
            stage = report.get(name) or {}
            if stage.get("status") == "failed":
                problems.append(f"node {node}: {stage.get('error') or f'its {name} stage failed'}")
    required = [name for name, on in (("trainer", config.trainer.required), ("vllm", config.vllm.required)) if on]
    for node, why in sorted(gathered.missing.items()):
        if required:
            problems.append(
                f"node {node} did not report ({why}), and {' and '.join(required)}.required is set; "
                "check that node's daemon (fork-sidecar status there), then fork again."
            )
    return problems


def recorded_nodes(published: dict[str, Any]) -> list[str]:
    """The nodes that must report on a published fork, as its publisher recorded them."""
    nodes = published.get("nodes")
    if not isinstance(nodes, list):  # published by a daemon of before the list named the publisher too
        others = published.get("members")
        nodes = [*(others if isinstance(others, list) else []), published.get("node")]
    return sorted({str(n) for n in nodes if n})


def recorded_members(published: dict[str, Any]) -> set[str] | None:
    """The members alive when the fork was published, as its publisher recorded them (None: not recorded)."""
    members = published.get("members")
    return {str(m) for m in members} if isinstance(members, list) and "nodes" in published else None


def lease_gone(node: str, live_then: set[str] | None) -> str:
    """Why `node`, which has no live lease now, is missing from a fork's reports (`live_then`: the members alive when
    the fork was published, None when not recorded)."""
    if live_then is None or node in live_then:
        return "its lease expired before it reported (daemon gone, frozen or cut off)"
    return (
        "its daemon was not running (no live lease: stopped or its lease expired) when the fork was published, and "
        "its trainers or servers serve the run (its last survey); they keep the old adapter until that daemon runs "
        "again"
    )
