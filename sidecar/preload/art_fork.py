"""Zero-touch forks from ART: after `LocalBackend._experimental_fork_checkpoint` succeeds, write the `.fork` marker.

openpipe-art 0.5.18's `_experimental_fork_checkpoint(self, model, from_model, from_project=None, from_s3_bucket=None,
not_after_step=None, verbose=False, prefix=None)` (async, returns None) picks the newest all-digit step of
`{art_path}/{from_project}/models/{from_model}/checkpoints` that is <= not_after_step (after an optional S3 pull),
copies it to `{art_path}/{model.project}/models/{model.name}/checkpoints/{step:04d}` and stops there: vLLM keeps
serving the old `0000` and the trainer keeps its weights. When `art.local.backend` is imported, the post-import hook
calls `on_art_local_backend`, which wraps that method so that once it has returned, the destination run gets a marker
`step: N` (N = the copied step) written atomically; the daemon then does the rest. ART's own result and exceptions
pass through untouched; a marker that cannot be written is logged, never raised into the training script.

`FORK_SIDECAR_ART_AUTOFORK=0` (read at each call) turns this off; `FORK_SIDECAR_PRELOAD=0` turns the preload off.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any

from sidecar.preload.agent import enabled

__all__ = ["AUTOFORK_ENV", "autofork_enabled", "on_art_local_backend", "patch_backend_class", "write_fork_marker"]

AUTOFORK_ENV = "FORK_SIDECAR_ART_AUTOFORK"
BACKEND_CLASS = "LocalBackend"
FORK_METHOD = "_experimental_fork_checkpoint"
_PATCHED = "__fork_sidecar_autofork__"
_Identity = tuple[int, int]


def _log(key: str, level: int, message: str, *args: object) -> None:
    from sidecar.preload.hooks import log_once

    log_once(key, level, message, *args)


def autofork_enabled() -> bool:
    return os.environ.get(AUTOFORK_ENV, "").strip() != "0"


# --- the post-import hook ----------------------------------------------------------------------------------------
def on_art_local_backend(module: ModuleType) -> None:
    """Post-import hook for `art.local.backend` (see sidecar/preload/hook_table.py)."""
    if not enabled():
        return
    cls = getattr(module, BACKEND_CLASS, None)
    if not isinstance(cls, type):
        _log(
            "art-fork-layout",
            logging.WARNING,
            "%s has no %s; ART forks get no marker here",
            module.__name__,
            BACKEND_CLASS,
        )
        return
    patch_backend_class(cls, getattr(module, "get_output_dir_from_model_properties", None))


def patch_backend_class(cls: type, output_dir: Callable[..., str] | None = None) -> bool:
    """Wrap `cls._experimental_fork_checkpoint` in place (idempotent); False when its shape is not one we know.

    `output_dir` is ART's `get_output_dir_from_model_properties(project, name, art_path)`, so the destination is
    computed exactly as ART computes it; without it, ART 0.5's layout is assumed.
    """
    original = inspect.getattr_static(cls, FORK_METHOD, None)  # through the MRO, as a call would find it
    if getattr(original, _PATCHED, False):
        return True
    if not inspect.iscoroutinefunction(original):
        _log(
            "art-fork-layout",
            logging.WARNING,
            "%s.%s is missing or not async (unsupported openpipe-art version); ART forks get no marker",
            cls.__qualname__,
            FORK_METHOD,
        )
        return False
    signature = inspect.signature(original)
    if "model" not in signature.parameters or "from_model" not in signature.parameters:
        _log(
            "art-fork-layout",
            logging.WARNING,
            "%s.%s%s is not a signature we know",
            cls.__name__,
            FORK_METHOD,
            signature,
        )
        return False
    wrapped = _wrap(original, signature, output_dir or _art_output_dir)
    setattr(wrapped, _PATCHED, True)
    setattr(cls, FORK_METHOD, wrapped)
    return True


def _wrap(
    original: Callable[..., Coroutine[Any, Any, Any]], signature: inspect.Signature, output_dir: Callable[..., str]
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(original)
    async def fork_checkpoint_then_mark(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not autofork_enabled():
            return await original(self, *args, **kwargs)
        plan = _plan(self, signature, output_dir, args, kwargs)
        before = _step_identities(plan["dest"] / "checkpoints") if plan else {}
        result = await original(self, *args, **kwargs)  # ART's exceptions propagate; no marker for a failed fork
        if plan is not None:
            _mark(plan, before)
        return result

    return fork_checkpoint_then_mark


def _art_output_dir(project: str, name: str, art_path: str | None = None) -> str:
    return f"{art_path}/{project}/models/{name}"


def _plan(
    backend: Any, signature: inspect.Signature, output_dir: Callable[..., str], args: Any, kwargs: Any
) -> dict[str, Any] | None:
    """Source and destination run dirs and the step limit, from the call's arguments as ART reads them."""
    try:
        bound = signature.bind(backend, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        model = arguments["model"]
        art_path = str(backend._path)
        project = str(model.project)
        source_project = str(arguments.get("from_project") or project)
        return {
            "dest": Path(output_dir(project=project, name=str(model.name), art_path=art_path)),
            "source": Path(output_dir(project=source_project, name=str(arguments["from_model"]), art_path=art_path)),
            "not_after_step": arguments.get("not_after_step"),
        }
    except Exception as e:  # wrong arguments: let ART raise its own TypeError; we just write no marker
        _log("art-fork-plan", logging.WARNING, "cannot tell where an ART fork goes (%r); no marker will be written", e)
        return None


def _step_identities(checkpoints: Path) -> dict[str, _Identity]:
    out = {}
    try:
        with os.scandir(checkpoints) as it:
            for entry in it:
                if entry.name.isdigit() and entry.is_dir(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    out[entry.name] = (st.st_ino, st.st_ctime_ns)
    except OSError:
        pass
    return out


def _copied_step(plan: dict[str, Any], before: dict[str, _Identity]) -> int | None:
    """The step ART just copied: the one step dir that is new or replaced in the destination; else ART's own rule."""
    after = _step_identities(plan["dest"] / "checkpoints")
    changed = [name for name, ident in after.items() if before.get(name) != ident]
    if len(changed) == 1:
        return int(changed[0])
    steps = sorted(int(name) for name in _step_identities(plan["source"] / "checkpoints"))
    limit = plan["not_after_step"]
    steps = [s for s in steps if limit is None or s <= limit]
    return steps[-1] if steps and f"{steps[-1]:04d}" in after else None


def _mark(plan: dict[str, Any], before: dict[str, _Identity]) -> None:
    dest: Path = plan["dest"]
    step = _copied_step(plan, before)
    if step is None:
        _log(
            f"art-fork-step-{dest}",
            logging.WARNING,
            "ART forked into %s but the copied step is unclear; no marker",
            dest,
        )
        return
    if step == 0:
        # ART copied the source's step 0 straight over our checkpoints/0000, which a `step:` marker cannot name;
        # the source checkpoint itself can, and the daemon then makes vLLM and the trainers load it.
        body = f"source: {_yaml_str(str(Path(os.path.abspath(plan['source'])) / 'checkpoints' / '0000'))}\n"
    else:
        body = f"step: {step}\n"
    request_id = "art-" + time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    try:
        path = write_fork_marker(dest, body + f"request_id: {request_id}\n")
    except OSError as e:
        _log(
            f"art-fork-{request_id}",
            logging.ERROR,
            "ART forked %s but the .fork marker could not be written: %s",
            dest,
            e,
        )
        return
    _log(
        f"art-fork-{request_id}",
        logging.INFO,
        "ART forked step %d into %s: wrote %s (request %s)",
        step,
        dest,
        path,
        request_id,
    )


def _yaml_str(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string is a YAML string, quoting whatever the path holds


def write_fork_marker(model_dir: Path, content: str) -> Path:
    """Write `{model_dir}/.fork` atomically, as `fork-sidecar fork` does; raises OSError."""
    from sidecar.fsops import write_atomic  # stdlib only, like the rest of what the preload imports

    marker = model_dir / ".fork"
    write_atomic(marker, content.encode())  # the daemon's watcher sees one complete marker appear
    return marker
