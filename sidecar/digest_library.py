"""Puts `blake3`, the library the adapter digest needs (sidecar/protocol/digest.py), beside the preload's copy.

A trainer environment that cannot import `blake3` gets the daemon's own version of it written into the preload's
private directory (`_fork_sidecar/`, appended to sys.path, so a `blake3` the environment installs later takes
precedence). Its wheel is built for one CPython version, so it is either
- copied from the daemon's own installation when the trainer runs the same Python (`major.minor`, CPython): no
  network, nothing downloaded; or
- installed by pip for the trainer's Python into a temporary folder, then moved: the daemon's pip asked for that
  version's wheel (`--python-version`), else the trainer's own pip. pip's own settings apply, so a node without an
  index uses a folder of wheels: `PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR`.

Daemon side only (`fork-sidecar preload install`): never copied into trainers.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["LIBRARY", "LibraryError", "library_version", "write_library"]

LIBRARY = "blake3"
# What pip may take at most to fetch one wheel (a slow mirror), and what the copy leaves out of its metadata.
_PIP_TIMEOUT_S = 300
_UNUSED = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


class LibraryError(Exception):
    """The library could not be put beside the copy: one sentence saying what to do."""


def library_version() -> str:
    """The version of the library the daemon itself runs (the one a trainer gets)."""
    return importlib.metadata.version(LIBRARY)


def write_library(into: Path, python: str, version: tuple[int, ...], implementation: str) -> list[str]:
    """Write the library for the interpreter `python` (of `version`, `implementation`) under `into`; returns the
    paths written, relative to `into`. LibraryError when neither a copy nor pip can provide it."""
    wanted = library_version()
    if (implementation, tuple(version[:2])) == (sys.implementation.name, sys.version_info[:2]):
        return _copy_installed(into)
    with tempfile.TemporaryDirectory(prefix=".fork-sidecar-pip-", dir=into.parent) as folder:
        fetched = Path(folder)
        _pip_install(fetched, python, version, f"{LIBRARY}=={wanted}")
        return _move_files(fetched, into)


def _copy_installed(into: Path) -> list[str]:
    distribution = importlib.metadata.distribution(LIBRARY)
    written = []
    for entry in distribution.files or ():
        parts = entry.parts
        if "__pycache__" in parts or parts[-1] in _UNUSED or parts[0] in ("..", "bin"):
            continue
        source = Path(str(distribution.locate_file(entry)))
        target = into / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(entry.as_posix())
    if not any(name.startswith(f"{LIBRARY}/") for name in written):
        raise LibraryError(f"the daemon's {LIBRARY} installation lists no package files; reinstall fork-sidecar")
    return sorted(written)


def _pip_install(folder: Path, python: str, version: tuple[int, ...], requirement: str) -> None:
    common = ["install", "--quiet", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:"]
    dotted = ".".join(map(str, version[:2]))
    attempts = [
        # The daemon's pip, asked for the trainer's CPython: works where the trainer environment has no pip.
        [sys.executable, "-m", "pip", *common, "--target", str(folder), "--python-version", dotted, requirement],
        [python, "-m", "pip", *common, "--target", str(folder), requirement],
    ]
    said = ""
    for command in attempts:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            said = str(e)
            continue
        if done.returncode == 0:
            return
        lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
        said = lines[-1].strip() if lines else f"exit status {done.returncode}"
    raise LibraryError(
        f"{python} cannot import {LIBRARY} (the adapter digest needs it) and pip could not get {requirement} for "
        f"Python {dotted} ({said}); install it there (`{python} -m pip install {requirement}`), or give pip a folder "
        "of wheels (PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR), and run this again"
    )


def _move_files(fetched: Path, into: Path) -> list[str]:
    written = []
    for path in sorted(fetched.rglob("*")):
        relative = path.relative_to(fetched)
        if not path.is_file() or "__pycache__" in relative.parts or relative.parts[0] == "bin":
            continue
        if path.name in _UNUSED:
            continue
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
        written.append(relative.as_posix())
    if not any(name.startswith(f"{LIBRARY}/") for name in written):
        raise LibraryError(f"pip installed no {LIBRARY} package files; install {LIBRARY} into the trainer yourself")
    return written
