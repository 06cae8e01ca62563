"""What runs inside trainer processes: the post-import hooks, the control-socket agent, the ART glue.

Installed with `fork-sidecar preload install`, a `.pth` line imports `sidecar.preload.bootstrap` at interpreter start;
it only arms post-import hooks (ART's `UnslothService` needs nothing else). A generic PEFT training script opts in
with one call and no other change to its loop:

    from sidecar.preload import register
    register(peft_model, "/path/to/.art/project/models/my-model", optimizer=optimizer)

From then on a fork of that run loads the forked adapter into `peft_model` between two training steps (after an
optimizer step, or at once while the model is idle) and the agent tells the daemon the digest it loaded.
`training_step()` marks steps explicitly for loops the automatic hooks cannot see.

This package's import must stay stdlib-only and cheap: the bootstrap imports it at every interpreter start.
"""

from __future__ import annotations

import os

# The bootstrap imports this package at interpreter start: import nothing the interpreter has not loaded already.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from contextlib import AbstractContextManager
    from typing import Any

__all__ = ["DISABLE_ENV", "enabled", "is_disabled", "load_adapter_from_checkpoint", "register", "training_step"]

DISABLE_ENV = "FORK_SIDECAR_PRELOAD"  # =0 turns the preload off in the processes that see it


def is_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when FORK_SIDECAR_PRELOAD=0 in `environ` (default: this process's environment)."""
    env = os.environ if environ is None else environ
    return env.get(DISABLE_ENV, "").strip() == "0"


def enabled() -> bool:
    """False when FORK_SIDECAR_PRELOAD=0 turns the preload off for this process."""
    return not is_disabled()


def register(peft_model: Any, run_dir: str | os.PathLike[str], *, optimizer: Any | None = None) -> None:
    """Serve forks of the run in `run_dir` ({art_path}/{project}/models/{model}) for this PEFT model.

    `optimizer` is optional: any torch optimizer that steps the model's parameters is found on its first step;
    passing it lets a fork that arrives before that step clear its state too. Calling again is harmless.
    Never raises for sidecar problems (a trainer must not stop because of it): they are logged once.
    With FORK_SIDECAR_PRELOAD=0 it does nothing.
    """
    if not enabled():
        return
    try:
        from sidecar.preload.agent import register_peft_model

        register_peft_model(peft_model, run_dir, optimizer=optimizer)
    except Exception:
        import logging

        from sidecar.preload.hooks import log_once

        log_once(
            "register-failed",
            logging.WARNING,
            "fork-sidecar register() failed; forks will not reach this model",
            exc_info=True,
        )


def training_step() -> AbstractContextManager[None]:
    """`with training_step(): ...` around each step (forward, backward, optimizer step) marks its boundaries.

    Only needed when the automatic marks do not fit (e.g. an optimizer that is not a torch.optim.Optimizer).
    Once used, the registered models' step boundaries come only from it.
    """
    if not enabled():
        import contextlib

        return contextlib.nullcontext()
    from sidecar.preload.agent import training_step as agent_training_step

    return agent_training_step()


def load_adapter_from_checkpoint(peft_model: Any, checkpoint_dir: str | os.PathLike[str], **kwargs: Any) -> str:
    """See `sidecar.preload.peft_load.load_adapter_from_checkpoint`; returns the adapter digest of what it read."""
    from sidecar.preload.peft_load import load_adapter_from_checkpoint as load

    return load(peft_model, checkpoint_dir, **kwargs)
