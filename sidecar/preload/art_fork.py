"""Zero-touch forks from ART: after `LocalBackend._experimental_fork_checkpoint` succeeds, write the `.fork` marker.

`_experimental_fork_checkpoint(self, model, from_model, from_project=None, from_s3_bucket=None, not_after_step=None,
verbose=False, prefix=None)` (async, returns None; the same in openpipe-art 0.5.18 and 0.5.23) picks the newest
all-digit step of `{art_path}/{from_project}/models/{from_model}/checkpoints` that is <= not_after_step, removes
the destination step dir if present and copies the source step there, and stops: vLLM keeps serving the old `0000`
and the trainer keeps its weights. The destination run is `{art_path}/{model.project}/models/{storage name}`, where
the storage name is `model._storage_name()` in ART versions that have it (0.5.23: `run_name`) and `model.name`
before (0.5.18) - which is why the destination is derived here the way ART derives it, never from `model.name`.

Forking the wrong run is the one failure that must never happen, so a marker is written only when the call is
seen to have created exactly the step directory ART's own rule selects, in the directory ART's helpers name, with
the source step's files (names and sizes): "created" means a directory entry that did not exist before the call or
is a different directory than before (the old one's inode is held open across the call, so it cannot be reused).
The marker then names that exact checkpoint (`source: <new step dir>`) and lies two levels above it. In any other
case nothing is written and one sentence says which `fork-sidecar fork` command to run instead. ART's own result
and exceptions pass through untouched; a marker that cannot be written is logged, never raised into the script.

`FORK_SIDECAR_ART_AUTOFORK=0` (read at each call) turns this off; `FORK_SIDECAR_PRELOAD=0` turns the preload off.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from sidecar.preload import enabled
from sidecar.protocol.run_layout import CHECKPOINTS, SERVED_STEP

__all__ = ["AUTOFORK_ENV", "autofork_enabled", "on_art_local_backend", "patch_backend_class", "write_fork_marker"]

AUTOFORK_ENV = "FORK_SIDECAR_ART_AUTOFORK"
BACKEND_CLASS = "LocalBackend"
FORK_METHOD = "_experimental_fork_checkpoint"
_PATCHED = "__fork_sidecar_autofork__"
_OutputDir = Callable[..., str]


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


def patch_backend_class(cls: type, output_dir: _OutputDir | None = None) -> bool:
    """Wrap `cls._experimental_fork_checkpoint` in place (idempotent); False when its shape is not one we know.

    `output_dir` is ART's `get_output_dir_from_model_properties(project, name, art_path)`, so directories are
    computed exactly as ART computes them; without it, ART 0.5's `{art_path}/{project}/models/{name}` is assumed.
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
    if not {"model", "from_model"} <= signature.parameters.keys():
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
    original: Callable[..., Coroutine[Any, Any, Any]], signature: inspect.Signature, output_dir: _OutputDir
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(original)
    async def fork_checkpoint_then_mark(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not autofork_enabled():
            return await original(self, *args, **kwargs)
        plan = _plan(self, signature, output_dir, args, kwargs)
        if plan is None:
            return await original(self, *args, **kwargs)
        with _held_steps(plan.dest / CHECKPOINTS) as created:
            result = await original(self, *args, **kwargs)  # ART's exceptions propagate; no marker for a failed fork
            new_steps = created()
        _mark(plan, new_steps)
        return result

    return fork_checkpoint_then_mark


def _art_output_dir(project: str, name: str, art_path: str | None = None) -> str:
    return f"{art_path}/{project}/models/{name}"


# --- where ART forks from and to ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    dest: Path  # the run directory ART copies into
    source: Path  # the run directory ART copies from
    not_after_step: int | None
    label: str  # how the destination was derived, for messages


def _plan(backend: Any, signature: inspect.Signature, output_dir: _OutputDir, args: Any, kwargs: Any) -> _Plan | None:
    """Source and destination run dirs as ART derives them from this call's arguments; None when we cannot tell."""
    try:
        bound = signature.bind(backend, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        model = arguments["model"]
        art_path = str(backend._path)
        project = str(model.project)
        storage_name, label = _storage_name(model)
        source_project = str(arguments.get("from_project") or project)
        return _Plan(
            dest=Path(output_dir(project=project, name=storage_name, art_path=art_path)),
            source=Path(output_dir(project=source_project, name=str(arguments["from_model"]), art_path=art_path)),
            not_after_step=arguments.get("not_after_step"),
            label=label,
        )
    except Exception as e:  # wrong arguments: ART raises its own TypeError; we only write no marker
        _log(
            "art-fork-plan",
            logging.WARNING,
            "cannot tell which run an ART fork writes into (%r); no .fork marker will be written for it, so run "
            "`fork-sidecar fork MODEL_DIR --step N` for that run once ART's fork has returned",
            e,
        )
        return None


def _storage_name(model: Any) -> tuple[str, str]:
    """The directory name ART stores `model` under: its own `_storage_name()` where ART has one (0.5.2x)."""
    storage_name = getattr(model, "_storage_name", None)
    if callable(storage_name):
        return str(storage_name()), "model._storage_name()"
    return str(model.name), "model.name"  # openpipe-art <= 0.5.18 stores runs under the model's name


# --- which step directory the call created -----------------------------------------------------------------------
@contextmanager
def _held_steps(checkpoints: Path) -> Iterator[Callable[[], list[str]]]:
    """Hold each existing step dir open across the call; yields a function naming the step dirs created since."""
    held: dict[str, tuple[int, tuple[int, int]]] = {}
    try:
        for name in _step_names(checkpoints):
            try:
                fd = os.open(checkpoints / name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue  # gone or unreadable: if ART creates it, it counts as new
            st = os.fstat(fd)
            held[name] = (fd, (st.st_dev, st.st_ino))

        def created() -> list[str]:
            out = []
            for name in _step_names(checkpoints):
                try:
                    st = os.stat(checkpoints / name, follow_symlinks=False)
                except OSError:
                    continue
                before = held.get(name)
                if before is None or before[1] != (st.st_dev, st.st_ino):
                    out.append(name)
            return sorted(out)

        yield created
    finally:
        for fd, _ in held.values():
            os.close(fd)


def _step_names(checkpoints: Path) -> list[str]:
    try:
        with os.scandir(checkpoints) as it:
            return [e.name for e in it if e.name.isdigit() and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _selected_step(plan: _Plan) -> int | None:
    """The step ART's rule picks from the source run (newest all-digit step not after `not_after_step`)."""
    steps = sorted(int(n) for n in _step_names(plan.source / CHECKPOINTS))
    limit = plan.not_after_step
    steps = [s for s in steps if limit is None or s <= limit]
    return steps[-1] if steps else None


def _files(step_dir: Path) -> dict[str, int] | None:
    """Relative file name -> size under `step_dir`; None when it cannot be read."""
    out = {}
    try:
        for root, _, names in os.walk(step_dir, onerror=_raise):
            for name in names:
                path = Path(root, name)
                out[str(path.relative_to(step_dir))] = path.stat(follow_symlinks=False).st_size
    except OSError:
        return None
    return out


def _raise(error: OSError) -> None:
    raise error


def _confirmed_step(plan: _Plan, created: list[str]) -> tuple[Path | None, str]:
    """The step dir this call created in `plan.dest`, or None and the reason in a few words."""
    step = _selected_step(plan)
    if step is None:
        return None, f"{plan.source}/checkpoints has no step ART could have copied"
    expected = f"{step:04d}"
    if created != [expected]:
        found = ", ".join(created) if created else "none"
        return None, f"ART's copy of step {step} did not appear as the one new step dir there (new: {found})"
    new_dir = plan.dest / CHECKPOINTS / expected
    source_files = _files(plan.source / CHECKPOINTS / expected)
    if not source_files or _files(new_dir) != source_files:
        return None, f"{new_dir} does not hold the files of {plan.source}/checkpoints/{expected}"
    return new_dir, ""


# --- the marker --------------------------------------------------------------------------------------------------
def _mark(plan: _Plan, created: list[str]) -> None:
    new_dir, why = _confirmed_step(plan, created)
    if new_dir is None:
        step = _selected_step(plan)
        _log(
            f"art-fork-unsure-{plan.dest}-{time.monotonic_ns()}",
            logging.WARNING,
            "ART forked %s into %s (from %s) but %s, so no .fork marker was written; "
            "run `fork-sidecar fork MODEL_DIR --step %s` for the run ART actually forked into",
            plan.source,
            plan.dest,
            plan.label,
            why,
            step if step is not None else "N",
        )
        return
    run_dir = new_dir.parent.parent  # the marker goes where the new checkpoint is, by construction
    if new_dir.name == SERVED_STEP:
        # ART copied the source's step 0 straight over this run's checkpoints/0000, which cannot be a fork source;
        # the identical checkpoint ART copied from can, and the daemon then makes vLLM and the trainers load it.
        source = Path(os.path.abspath(plan.source)) / CHECKPOINTS / SERVED_STEP
    else:
        source = Path(os.path.abspath(new_dir))
    request_id = "art-" + time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    body = f"source: {json.dumps(str(source))}\nrequest_id: {request_id}\n"  # a JSON string is a YAML string
    try:
        path = write_fork_marker(run_dir, body)
    except OSError as e:
        _log(
            f"art-fork-{request_id}",
            logging.ERROR,
            "ART forked %s but the .fork marker could not be written (%s); run `fork-sidecar fork %s --source %s`",
            run_dir,
            e,
            run_dir,
            source,
        )
        return
    _log(
        f"art-fork-{request_id}",
        logging.INFO,
        "ART forked %s into %s: wrote %s (source %s, request %s)",
        plan.source,
        new_dir,
        path,
        source,
        request_id,
    )


def write_fork_marker(model_dir: Path, content: str) -> Path:
    """Write `{model_dir}/.fork` atomically, as `fork-sidecar fork` does; raises OSError."""
    from sidecar.protocol.atomic_write import write_atomic  # stdlib only, like the rest of what the preload imports

    marker = model_dir / ".fork"
    write_atomic(marker, content.encode())  # the daemon's watcher sees one complete marker appear
    return marker
