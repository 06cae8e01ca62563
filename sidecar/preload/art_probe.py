"""Run by `art_compat.probe_art` inside a trainer's interpreter (stdlib only, never imports ART): prints one JSON object
with openpipe-art's version and, read from ART's source with `ast`, whether each internal the preload relies on is
there in the shape it expects. Run it through `runpy.run_path`, which leaves sys.path alone: this directory holds a
module named `art`, which must not shadow the real package.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import importlib.util
import json
import os
from typing import Any

_Function = ast.FunctionDef | ast.AsyncFunctionDef
TRAINING_ENTRIES = ("train", "_train_dedicated", "_train_shared", "train_sft")
OPTIONAL_ENTRIES = ("train_sft",)


def _tree(root: str, *relative: str) -> ast.Module | None:
    try:
        with open(os.path.join(root, *relative), encoding="utf-8") as f:
            return ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None


def _classes(module: ast.Module | None) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in (module.body if module else []) if isinstance(n, ast.ClassDef)}


def _methods(cls: ast.ClassDef | None) -> dict[str, _Function]:
    return {n.name: n for n in (cls.body if cls else []) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def _fields(cls: ast.ClassDef | None) -> set[str]:
    body = cls.body if cls else []
    return {n.target.id for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _imported(module: ast.Module | None) -> set[str]:
    body = module.body if module else []
    return {a.asname or a.name for n in body if isinstance(n, ast.ImportFrom) for a in n.names}


def _is_cached_property(fn: _Function | None) -> bool:
    decorators = fn.decorator_list if fn else []
    return any(
        (isinstance(d, ast.Name) and d.id == "cached_property")
        or (isinstance(d, ast.Attribute) and d.attr == "cached_property")
        for d in decorators
    )


def _is_async_generator(fn: _Function | None) -> bool:
    return isinstance(fn, ast.AsyncFunctionDef) and any(isinstance(n, ast.Yield | ast.YieldFrom) for n in ast.walk(fn))


def _arguments(fn: _Function) -> list[str]:
    return [a.arg for a in fn.args.args + fn.args.kwonlyargs]


def _check(name: str, found: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "found": found, "detail": detail}


def _fork_checks(root: str) -> list[dict[str, Any]]:
    backend = _tree(root, "local", "backend.py")
    fork = _methods(_classes(backend).get("LocalBackend")).get("_experimental_fork_checkpoint")
    if fork is None:
        shape = _check("LocalBackend._experimental_fork_checkpoint", False, "missing")
    else:
        names = _arguments(fork)
        known = names[:3] == ["self", "model", "from_model"] and {"from_project", "not_after_step"} <= set(names)
        kind = "async def" if isinstance(fork, ast.AsyncFunctionDef) else "def (not async)"
        shape = _check(
            "LocalBackend._experimental_fork_checkpoint",
            known and isinstance(fork, ast.AsyncFunctionDef),
            f"{kind} ({', '.join(names)})",
        )
    helper = "get_output_dir_from_model_properties" in _imported(backend)
    storage = [c for c, cls in _classes(_tree(root, "model.py")).items() if "_storage_name" in _methods(cls)]
    return [
        shape,
        _check(
            "art.local.backend.get_output_dir_from_model_properties", helper, "imported there" if helper else "missing"
        ),
        _check(
            "Model._storage_name",
            bool(storage),
            f"defined on {', '.join(sorted(storage))}" if storage else "absent: runs are stored under model.name",
        ),
    ]


def _service_checks(root: str) -> list[dict[str, Any]]:
    service = _classes(_tree(root, "unsloth", "service.py")).get("UnslothService")
    methods = _methods(service)
    state = methods.get("_state")
    if _is_cached_property(state):
        state_detail = "functools.cached_property"
    else:
        state_detail = "not a cached_property" if state else "missing"
    out = [
        _check("UnslothService._state", _is_cached_property(state), state_detail),
        _check(
            "UnslothService.output_dir",
            "output_dir" in _fields(service),
            "dataclass field" if "output_dir" in _fields(service) else "missing",
        ),
    ]
    for entry in TRAINING_ENTRIES:
        fn = methods.get(entry)
        if _is_async_generator(fn):
            out.append(_check(f"UnslothService.{entry}", True, "async generator"))
        elif fn is None and entry in OPTIONAL_ENTRIES:
            out.append(_check(f"UnslothService.{entry}", True, "absent (optional)"))
        else:
            out.append(_check(f"UnslothService.{entry}", False, "not an async generator" if fn else "missing"))
    return out


def probe() -> dict[str, Any]:
    out: dict[str, Any] = {"version": None, "root": None, "checks": []}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        out["version"] = importlib.metadata.version("openpipe-art")
    try:
        spec = importlib.util.find_spec("art")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if locations:
        out["root"] = locations[0]
        out["checks"] = _fork_checks(locations[0]) + _service_checks(locations[0])
    return out


if __name__ == "__main__":
    print(json.dumps(probe()))
