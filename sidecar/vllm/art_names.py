"""The adapter names ART's client requests from the vLLM server ART started for a run, which a fork must reach.

openpipe-art 0.5.23 (`UnslothService`, `LocalBackend._model_inference_name`) starts `art-vllm-runtime-server
--lora-path=<newest checkpoint> --served-model-name={model}@{step}`, loads each trained step under a new name
`{model}@{step}` (from `checkpoints/{step:04d}`), and its client asks for `{model}@{service._latest_step}` in
dedicated mode and `{model}@{newest step directory}` in shared mode; with `rollout_weight_update_mode:
in_flight_lora` it serves one slot `{model}:active` instead, plus `{model}:eval@{step}` for exact evaluations.
`{model}` is the model's `name`, which need not be its run directory (that is `run_name`). After a fork of the run
the current policy is the fork, so each of these names must serve it; names of older steps stay as ART loaded them,
or, once ART has loaded a newer step itself, as an earlier fork loaded them from its snapshot (ART pins them for
rollouts and evaluations of exactly those steps, and unloads them itself). Before that, a step name a fork reloaded
may still be the one ART's dedicated-mode client asks for (its `_latest_step` does not move on a fork), so it follows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["names_to_fork", "superseded"]

_STEP_NAME = re.compile(r"^(?P<model>.+)@(?P<step>\d+)$")
ACTIVE_SLOT = ":active"
EVAL_MARK = ":eval"


def superseded(snapshot_names: Iterable[str], loaded_names: Iterable[str]) -> list[str]:
    """Among the step names served from fork snapshots, those older than a step ART itself has loaded since (a name
    served from a step directory): ART pins them for that step, and no fork's weights belong under them any more."""
    newest: dict[str, int] = {}
    for name in loaded_names:
        if (match := _STEP_NAME.match(name)) is not None:
            newest[match["model"]] = max(int(match["step"]), newest.get(match["model"], -1))
    return [
        name
        for name in snapshot_names
        if (match := _STEP_NAME.match(name)) is not None and int(match["step"]) < newest.get(match["model"], -1)
    ]


def names_to_fork(served: Iterable[str], newest_step: int | None) -> list[str]:
    """ART's current names among `served` (the adapters a server serves from this run's checkpoints), plus
    `{model}@{newest_step}` when the run has a newer step directory than any name served (ART's shared-mode client
    asks for it; ART itself never loads it after `_experimental_fork_checkpoint`)."""
    out: list[str] = []
    latest: dict[str, int] = {}
    for name in served:
        if name.endswith(ACTIVE_SLOT):
            out.append(name)
            continue
        match = _STEP_NAME.match(name)
        if match is None or match["model"].endswith(EVAL_MARK):
            continue  # not ART's naming, or an exact-step evaluation adapter
        model, step = match["model"], int(match["step"])
        latest[model] = max(step, latest.get(model, step))
    for model, step in latest.items():
        out.append(f"{model}@{step}")
        if newest_step is not None and newest_step > step:
            out.append(f"{model}@{newest_step}")
    return out
