"""Finding BLAKE3, the hash of the adapter digest (sidecar/protocol/digest.py), in the process that needs it.

The environment's own `blake3` comes first. A trainer environment that has none gets the daemon's version from
`fork-sidecar preload install` in `_fork_sidecar/_lib/` (sidecar/digest_library.py): a folder on no sys.path, so
that pip and the trainer's own imports never see it, loaded from here by its path only when the preload's copy
(the directory with `manifest.json` holding this package) asks for it. Either must give BLAKE3's known answer for
the empty input before it is used: a module that only shares the name (a `blake3.py` beside a training script)
would make every digest there differ, and every fork fail as "did not load the forked adapter".
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "EMPTY_INPUT_DIGEST",
    "LIBRARY",
    "LIBRARY_DIR",
    "LIBRARY_REQUIREMENT",
    "DigestUnavailable",
    "load_library_from",
    "require_hasher",
]

LIBRARY = "blake3"
LIBRARY_REQUIREMENT = "blake3>=1.0,<2"  # as in pyproject.toml: every 1.x gives the same hashes
LIBRARY_DIR = "_lib"  # inside the preload's private directory
# BLAKE3 of b"" (the BLAKE3 paper's test vectors, 32-byte output).
EMPTY_INPUT_DIGEST = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
_COPY_MARK = "manifest.json"  # what `preload install` writes at the top of its copy

_found: list[Any] = []
_lock = threading.Lock()


class DigestUnavailable(ImportError):
    """No working `blake3` in this Python: no digest can be made here (the message says how to get one)."""


def require_hasher() -> Any:
    """The `blake3` constructor, found once; DigestUnavailable if this Python has none that works."""
    with _lock:
        if not _found:
            _found.append(_find())
        return _found[0]


def load_library_from(folder: Path) -> Any:
    """The `blake3` package in `folder` (as `preload install` writes it), imported by its path and checked;
    DigestUnavailable if it is not there or does not work. It is registered as `blake3` for its own imports."""
    init = folder / LIBRARY / "__init__.py"
    spec = importlib.util.spec_from_file_location(LIBRARY, init, submodule_search_locations=[str(init.parent)])
    if spec is None or spec.loader is None or not init.is_file():
        raise DigestUnavailable(f"{folder} holds no {LIBRARY} package")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(LIBRARY)
    sys.modules[LIBRARY] = module
    try:
        spec.loader.exec_module(module)
        return _checked(module, str(init))
    except Exception as e:
        if previous is None:
            sys.modules.pop(LIBRARY, None)
        else:
            sys.modules[LIBRARY] = previous
        if isinstance(e, DigestUnavailable):
            raise
        raise DigestUnavailable(f"{init} does not load ({type(e).__name__}: {e})") from None


def _find() -> Any:
    problem = f"the `{LIBRARY}` package, which makes the adapter digest, is not importable in {sys.executable}"
    try:
        module = importlib.import_module(LIBRARY)
    except ImportError:
        module = None
    if module is not None:
        try:
            return _checked(module, str(getattr(module, "__file__", LIBRARY)))
        except DigestUnavailable as e:
            problem = str(e)
    copy = Path(__file__).resolve().parents[2]
    if (copy / _COPY_MARK).is_file() and (copy / LIBRARY_DIR).is_dir():
        return load_library_from(copy / LIBRARY_DIR)
    raise DigestUnavailable(
        f"{problem}; for a trainer run `fork-sidecar preload install --python {sys.executable}` again, for the "
        "daemon reinstall fork-sidecar"
    )


def _checked(module: Any, where: str) -> Any:
    constructor = getattr(module, LIBRARY, None)
    try:
        answer = constructor(b"").hexdigest() if constructor is not None else None
    except Exception:
        answer = None
    if answer != EMPTY_INPUT_DIGEST:
        raise DigestUnavailable(f"`import {LIBRARY}` in {sys.executable} gives {where}, which is not BLAKE3")
    return constructor
