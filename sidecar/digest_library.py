"""Puts `blake3`, the library the adapter digest needs (sidecar/protocol/digest.py), beside the preload's copy.

A trainer environment that cannot import `blake3` gets one written into `_fork_sidecar/_lib/` (LIBRARY_DIR), a folder
that is not on that environment's sys.path: only the digest looks there (`require_hasher`), after the environment's
own `blake3`, so pip and the trainer's own imports never see it, and a `blake3` installed there later is the one used.
The package only, no `.dist-info`: nothing there claims to be installed. Its wheel is built for one Python ABI, so
the library is, in this order, the first that imports in that environment and gives BLAKE3's known answer:
- copied from the daemon's own installation, where the trainer's extension suffix (`EXT_SUFFIX`: version, ABI,
  platform) is the daemon's: no network;
- installed by the daemon's pip for the trainer's CPython version (`--python-version`, `--abi`), where the trainer
  runs a plain CPython build on the daemon's platform: the trainer needs no pip of its own;
- installed by the trainer's own pip, which knows its ABI (PyPy, a free-threaded build, ...).
pip's own settings apply, so a node without an index uses a folder of wheels: `PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR`.
Every pip runs from `/`, isolated from the caller's working directory, without input and with the preload off.

Daemon side only (`fork-sidecar preload install`): never copied into trainers.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sidecar.preload import DISABLE_ENV
from sidecar.protocol.hasher import LIBRARY, LIBRARY_DIR, LIBRARY_REQUIREMENT

__all__ = ["LibraryError", "Target", "write_library"]

# What pip may take at most to fetch one wheel (a slow mirror).
_PIP_TIMEOUT_S = 300


class LibraryError(Exception):
    """The library could not be put beside the copy: one sentence saying what to do."""


@dataclass(frozen=True)
class Target:
    """The trainer's interpreter, as its probe described it."""

    python: str  # as the user named it
    executable: str
    version: tuple[int, ...]
    implementation: str  # sys.implementation.name
    ext_suffix: str  # sysconfig's EXT_SUFFIX there, e.g. ".cpython-312-x86_64-linux-gnu.so"


# Whether the library written into a folder imports in the target and gives the known answer: None, or why not.
Check = Callable[[Path], str | None]


def write_library(staging: Path, target: Target, check: Check) -> list[str]:
    """Write the library for `target` into `staging/LIBRARY_DIR/`; returns the paths written, relative to `staging`.
    Each way is tried in turn until `check` passes; LibraryError naming every way's reason when none does."""
    reasons = []
    for way, fill in _ways(target):
        with tempfile.TemporaryDirectory(prefix=".library-", dir=staging) as folder:
            lib = Path(folder) / LIBRARY_DIR
            lib.mkdir()
            try:
                fill(lib)
                problem = check(lib)
            except LibraryError as e:
                problem = str(e)
            except OSError as e:
                problem = f"{e.strerror or e} ({e.filename or 'a file'})"
            if problem is None:
                final = staging / LIBRARY_DIR
                lib.rename(final)
                return sorted(
                    f"{LIBRARY_DIR}/{p.relative_to(final).as_posix()}" for p in final.rglob("*") if p.is_file()
                )
            reasons.append(f"{way}: {problem}")
    raise LibraryError(
        f"{target.python} cannot import {LIBRARY} (the adapter digest needs it) and fork-sidecar could not provide it "
        f"({'; '.join(reasons)}); install it there (`{target.python} -m pip install '{LIBRARY_REQUIREMENT}'`), or "
        "give pip a folder of wheels (PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR), and run this again"
    )


def _ways(target: Target) -> list[tuple[str, Callable[[Path], None]]]:
    ours = str(sysconfig.get_config_var("EXT_SUFFIX") or "")
    ways: list[tuple[str, Callable[[Path], None]]] = []
    if target.ext_suffix and target.ext_suffix == ours:
        ways.append(("copying the daemon's", _copy_installed))
    # A plain CPython build on the daemon's platform: ".cpython-312-" + the daemon's "x86_64-linux-gnu.so".
    version = f"{target.version[0]}{target.version[1]}"
    plain = f".cpython-{version}-"
    if (
        sys.implementation.name == "cpython"
        and target.implementation == "cpython"
        and ours.startswith(".cpython-")
        and target.ext_suffix == plain + ours.split("-", 2)[-1]
    ):
        dotted = f"{target.version[0]}.{target.version[1]}"
        asked = ["--python-version", dotted, f"--abi=cp{version}", "--implementation=cp"]
        ways.append(("the daemon's pip", lambda lib: _pip(sys.executable, asked, lib)))
    ways.append(("that environment's pip", lambda lib: _pip(target.executable, [], lib)))
    return ways


def _copy_installed(lib: Path) -> None:
    try:
        distribution = importlib.metadata.distribution(LIBRARY)
    except importlib.metadata.PackageNotFoundError:
        raise LibraryError(f"the daemon's Python ({sys.executable}) has no {LIBRARY} distribution") from None
    copied = 0
    for entry in distribution.files or ():
        parts = PurePosixPath(entry.as_posix()).parts
        # The package's own files only: no metadata (nothing may claim an installation), no scripts, no escapes.
        if not parts or parts[0] != LIBRARY or "__pycache__" in parts or ".." in parts or entry.is_absolute():
            continue
        target = lib.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(str(distribution.locate_file(entry))), target)
        copied += 1
    if not copied:
        raise LibraryError(f"the daemon's {LIBRARY} lists no files of its package")


def _pip(python: str, options: list[str], lib: Path) -> None:
    """`python -m pip install --target` into a folder beside `lib`, then the package's own files moved into `lib`."""
    fetched = lib.parent / "pip"
    command = [
        python,
        "-I",  # not the caller's working directory, PYTHONPATH or user site: they could shadow pip itself
        "-m",
        "pip",
        "install",
        *options,
        "--quiet",
        "--no-input",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        "--target",
        str(fetched),
        LIBRARY_REQUIREMENT,
    ]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=_PIP_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            cwd="/",
            env={**os.environ, DISABLE_ENV: "0"},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LibraryError(f"pip did not finish within {_PIP_TIMEOUT_S} s") from None
    except OSError as e:
        raise LibraryError(f"pip could not be started ({e.strerror or e})") from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
        raise LibraryError(lines[-1] if lines else f"pip exited with status {done.returncode}")
    package = fetched / LIBRARY
    if not package.is_dir():
        raise LibraryError(f"pip installed no {LIBRARY} package")
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            target = lib / path.relative_to(fetched)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
