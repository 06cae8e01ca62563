"""Installs the preload into a trainer's Python environment, removes it, and reports on it.

What `install` writes into that interpreter's site-packages (purelib), and nothing else:
- `_fork_sidecar/`: a private copy of the trainer side of the `sidecar` package, `sidecar/preload/` and
  `sidecar/protocol/` (stdlib only but for the digest's `blake3`, imports lazily) under a package `__init__` of its
  own, plus `manifest.json` (version, content digest, the files written). None of the daemon is copied. The
  trainer's environment imports the preload from here, so nothing of the daemon's environment leaks into it and
  upgrading the daemon never changes a running trainer's code.
- `_fork_sidecar.pth`: one `import` line that appends that directory to sys.path and imports
  `sidecar.preload.bootstrap`, inside try/except, unless FORK_SIDECAR_PRELOAD=0. Being a `.pth` file it runs in
  every interpreter started from that environment: the trainer, its multiprocessing spawn/forkserver children and
  torchrun workers. The directory is appended, so a `sidecar` package already importable there takes precedence.
- `_fork_sidecar/_lib/blake3/`, only when that environment cannot import `blake3`, which the adapter digest needs: a
  copy of it made or fetched for that Python (sidecar/digest_library.py), on no sys.path (sidecar/protocol/hasher.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sidecar
from sidecar.digest_library import LibraryError, Target, write_library
from sidecar.preload import DISABLE_ENV as PRELOAD_DISABLE_ENV
from sidecar.preload import dtype_patch, is_disabled
from sidecar.preload.art_compat import ArtInfo, probe_art
from sidecar.preload.probe import PROBE_TIMEOUT_S, run_python_probe
from sidecar.protocol.hasher import EMPTY_INPUT_DIGEST, LIBRARY, LIBRARY_DIR

__all__ = [
    "MIN_PYTHON",
    "PRIVATE_DIR",
    "PTH_NAME",
    "InstallReport",
    "Interpreter",
    "PreloadError",
    "PreloadStatus",
    "UnslothInfo",
    "install",
    "probe_interpreter",
    "pth_line",
    "status",
    "uninstall",
]

# The variable sidecar.preload.bootstrap reads (not imported from there: importing the bootstrap arms the preload).
PTH_NAME = "_fork_sidecar.pth"
PRIVATE_DIR = "_fork_sidecar"
MANIFEST_NAME = "manifest.json"
PTH_MARK = "# fork-sidecar preload"
MIN_PYTHON = (3, 10)

# Runs inside the target interpreter (any Python 3): where its site-packages is, whether another `sidecar` is
# importable there, and what Unsloth it has, read from metadata and source without importing Unsloth.
_PROBE = r"""
import ast, json, os, sys, sysconfig
import importlib.util
info = {"executable": sys.executable, "version": list(sys.version_info[:3]),
        "implementation": sys.implementation.name, "blake3": None,
        "purelib": sysconfig.get_paths()["purelib"], "sidecar": None,
        "unsloth": {"version": None, "functions": [], "classes": []}}
try:
    spec = importlib.util.find_spec("sidecar")
    info["sidecar"] = spec.origin or list(spec.submodule_search_locations or [""])[0] if spec else None
except Exception:
    pass
info["ext_suffix"] = sysconfig.get_config_var("EXT_SUFFIX") or ""
try:
    import blake3
    if blake3.blake3(b"").hexdigest() == "@EMPTY_INPUT_DIGEST@":
        info["blake3"] = getattr(blake3, "__version__", "unknown")
except Exception:
    pass
try:
    import importlib.metadata
    info["unsloth"]["version"] = importlib.metadata.version("unsloth")
except Exception:
    pass
wanted = set(sys.argv[1:])
def defined(root, relative, kind):
    try:
        with open(os.path.join(root, "kernels", relative), encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except Exception:
        return []
    return sorted(n.name for n in tree.body if isinstance(n, kind) and n.name in wanted)
try:
    spec = importlib.util.find_spec("unsloth")
    if spec is not None and spec.submodule_search_locations:
        root = list(spec.submodule_search_locations)[0]
        info["unsloth"]["functions"] = defined(root, "utils.py", ast.FunctionDef)
        info["unsloth"]["classes"] = defined(root, "fast_lora.py", ast.ClassDef)
except Exception:
    pass
print(json.dumps(info))
""".replace("@EMPTY_INPUT_DIGEST@", EMPTY_INPUT_DIGEST)  # the check the digest itself makes (hasher.py)


class PreloadError(Exception):
    """Bad input or an environment we cannot write: one sentence the user can act on (exit code 2)."""


@dataclass(frozen=True)
class UnslothInfo:
    version: str | None
    functions: tuple[str, ...]  # patchable functions defined in unsloth/kernels/utils.py
    classes: tuple[str, ...]  # patchable autograd functions defined in unsloth/kernels/fast_lora.py


@dataclass(frozen=True)
class Interpreter:
    python: str
    executable: str
    version: tuple[int, ...]
    purelib: Path
    sidecar_origin: str | None  # where `import sidecar` resolves there without the preload, if anywhere
    unsloth: UnslothInfo
    implementation: str = "cpython"
    ext_suffix: str = ""  # sysconfig's EXT_SUFFIX: which builds of a compiled package it can import
    digest_library: str | None = None  # the version of a working `blake3` that environment imports by itself


@dataclass(frozen=True)
class InstallReport:
    python: str
    purelib: str
    pth: str
    private_dir: str
    version: str
    files: int
    replaced_version: str | None
    digest_library: str = ""  # where the trainer's `blake3` comes from (its environment, or the copy)


@dataclass(frozen=True)
class PreloadStatus:
    python: str
    executable: str
    python_version: str
    purelib: str
    installed: bool
    partial: bool  # one of the .pth / private copy without the other
    installed_version: str | None
    cli_version: str
    up_to_date: bool | None
    version_note: str
    disabled_here: bool
    shadowed_by: str | None
    dtype_patch_applies: bool
    unsloth_version: str | None
    unsloth_tested: bool
    dtype_patch_note: str
    digest_library: str  # where that environment's trainers get `blake3` (the adapter digest) from, or what to do
    art: ArtInfo  # openpipe-art there: its version, whether tested, the internals the preload relies on

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "art": self.art.to_json()}

    def lines(self) -> list[str]:
        if self.installed:
            preload = f"installed, version {self.installed_version} ({self.version_note})"
        elif self.partial:
            preload = "partly installed: run `fork-sidecar preload install` again, or `uninstall`"
        else:
            preload = "not installed"
        switch = "0 here: off in processes started from this environment" if self.disabled_here else "not 0 here: on"
        verdict = "would apply" if self.dtype_patch_applies else "would not apply"
        lines = [
            f"python:        {self.executable} (Python {self.python_version})",
            f"site-packages: {self.purelib}",
            f"preload:       {preload}",
            f"{PRELOAD_DISABLE_ENV}: {switch}",
            f"dtype patch:   {verdict}: {self.dtype_patch_note}",
            f"digest:        {self.digest_library}",
            *self.art.lines(),
        ]
        if self.shadowed_by:
            lines.append(f"note:          `import sidecar` there is {self.shadowed_by}, which takes precedence")
        return lines


def pth_line(private_dir: Path) -> str:
    """The .pth content: a comment naming us, and one `import` line that can never fail interpreter start."""
    code = (
        "try:\n"
        "    import os, sys\n"
        f"    if os.environ.get({PRELOAD_DISABLE_ENV!r}, '').strip() != '0':\n"
        f"        if {str(private_dir)!r} not in sys.path:\n"
        f"            sys.path.append({str(private_dir)!r})\n"
        "        import sidecar.preload.bootstrap\n"
        "except Exception:\n"
        "    pass\n"
    )
    return (
        f"{PTH_MARK} {sidecar.__version__}: `fork-sidecar preload uninstall` removes this file and {PRIVATE_DIR}/\n"
        f"import sys; exec({code!r}, {{}})\n"
    )


def _is_executable_file(path: str) -> bool:
    try:
        return Path(path).is_file() and os.access(path, os.X_OK)
    except OSError:  # a directory on the way we may not search
        return False


def probe_interpreter(python: str | None = None) -> Interpreter:
    """Run `python` (default: this one) once to learn its site-packages and Unsloth; PreloadError if unusable."""
    given = python or sys.executable
    executable = shutil.which(given) if os.sep not in given else given
    if executable is None or not _is_executable_file(executable):
        raise PreloadError(f"{given} is not a Python interpreter (no executable file by that name).")
    wanted = [*dtype_patch.KERNEL_FUNCTIONS, *dtype_patch.INPLACE_HELPERS, *dtype_patch.AUTOGRAD_FUNCTIONS]
    try:
        done = run_python_probe(executable, _PROBE, *wanted)
        info = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except subprocess.TimeoutExpired:
        raise PreloadError(f"{given} did not answer within {PROBE_TIMEOUT_S} s; is it a Python interpreter?") from None
    except (OSError, ValueError, IndexError):
        info = None
    if not isinstance(info, dict) or "purelib" not in info:
        raise PreloadError(f"{given} is not a Python interpreter (running it with -c did not print its site-packages).")
    version = tuple(int(part) for part in info["version"])
    if version < MIN_PYTHON:
        found, needed = ".".join(map(str, version)), ".".join(map(str, MIN_PYTHON))
        raise PreloadError(f"{given} is Python {found}; the preload needs {needed} or newer.")
    unsloth = info.get("unsloth") or {}
    return Interpreter(
        python=given,
        executable=str(info["executable"]),
        version=version,
        purelib=Path(info["purelib"]),
        sidecar_origin=info.get("sidecar"),
        unsloth=UnslothInfo(
            version=unsloth.get("version"),
            functions=tuple(unsloth.get("functions") or ()),
            classes=tuple(unsloth.get("classes") or ()),
        ),
        implementation=str(info.get("implementation") or "cpython"),
        ext_suffix=str(info.get("ext_suffix") or ""),
        digest_library=info.get("blake3"),
    )


def _package_root() -> Path:
    return Path(sidecar.__file__).resolve().parent


# The trainer side: everything a trainer process runs lives in these two packages (the daemon imports them too).
TRAINER_PACKAGES = ("preload", "protocol")
_INIT = "sidecar/__init__.py"
# The daemon's own __init__ starts its SIGHUP guard when argv[1] is "run", whose module is not copied (and a trainer
# started as `python train.py run` must not try to import it); the copy's says only which version it is.
_INIT_TEXT = '''"""fork-sidecar's trainer side: preload and protocol, copied by `fork-sidecar preload install`."""

__all__ = ["__version__"]
__version__ = {version!r}
'''


def _trainer_files(root: Path) -> dict[str, bytes]:
    """The copy's contents by path relative to the directory holding `sidecar/`: the trainer packages' source files
    as they are, and the copy's own package __init__."""
    files = {_INIT: _INIT_TEXT.format(version=sidecar.__version__).encode()}
    for package in TRAINER_PACKAGES:
        for path in (root / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and (path.suffix == ".py" or path.name == "py.typed"):
                files[path.relative_to(root.parent).as_posix()] = path.read_bytes()
    return dict(sorted(files.items()))


def _digest(files: Mapping[str, bytes]) -> str:
    hasher = hashlib.sha256()
    for name, content in files.items():
        hasher.update(name.encode() + b"\0" + content + b"\0")
    return "sha256:" + hasher.hexdigest()


def _read_manifest(private: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((private / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _ensure_writable(purelib: Path) -> None:
    if not purelib.is_dir():
        raise PreloadError(f"site-packages {purelib} does not exist; pass the python of an existing environment.")
    if not os.access(purelib, os.W_OK | os.X_OK):
        raise PreloadError(f"site-packages {purelib} is not writable: run with sudo or pass a venv's python.")


def _check_ours(purelib: Path) -> None:
    private, pth = purelib / PRIVATE_DIR, purelib / PTH_NAME
    if private.exists() and _read_manifest(private) is None:
        raise PreloadError(f"{private} exists but was not written by fork-sidecar: move it away and run this again.")
    if pth.exists() and not pth.read_text(encoding="utf-8", errors="replace").startswith(PTH_MARK):
        raise PreloadError(f"{pth} exists but was not written by fork-sidecar: move it away and run this again.")


def install(python: str | None = None) -> InstallReport:
    """Copy the package into `{purelib}/_fork_sidecar/` and write the .pth (replacing an earlier install)."""
    interpreter = probe_interpreter(python)
    purelib = interpreter.purelib
    _ensure_writable(purelib)
    _check_ours(purelib)
    private, pth = purelib / PRIVATE_DIR, purelib / PTH_NAME
    previous = _read_manifest(private) if private.exists() else None
    root = _package_root()
    contents = _trainer_files(root)
    files = list(contents)
    staging = purelib / f"{PRIVATE_DIR}.new-{os.getpid()}"
    retired = purelib / f"{PRIVATE_DIR}.old-{os.getpid()}"
    try:
        for name, content in contents.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        library = _add_digest_library(interpreter, staging)
        files += library
        manifest = {
            "format": 1,
            "version": sidecar.__version__,
            "digest": _digest(contents),
            "files": files,
            "library_files": library,
            "pth": PTH_NAME,
            "source": str(root),
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if private.exists():
            private.rename(retired)
        staging.rename(private)
        _compile(interpreter.executable, private)
        # The .pth goes last: an interpreter starting meanwhile finds either no .pth or a complete copy.
        temporary = pth.with_name(f".{PTH_NAME}.{os.getpid()}")
        temporary.write_text(pth_line(private), encoding="utf-8")
        temporary.replace(pth)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise PreloadError(f"could not write the preload into {purelib}: {error.strerror or error}.") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)
    return InstallReport(
        python=interpreter.python,
        purelib=str(purelib),
        pth=str(pth),
        private_dir=str(private),
        version=sidecar.__version__,
        files=len(files),
        replaced_version=None if previous is None else str(previous.get("version")),
        digest_library=(
            f"{LIBRARY} {interpreter.digest_library} of that environment"
            if interpreter.digest_library is not None
            else f"{LIBRARY} put into {private / LIBRARY_DIR}/ (that environment has none)"
        ),
    )


def _digest_library_note(interpreter: Interpreter, manifest: dict[str, Any] | None, private: Path) -> str:
    if interpreter.digest_library is not None:
        return f"{LIBRARY} {interpreter.digest_library} of that environment"
    copied = [] if manifest is None else manifest.get("library_files") or []
    if any(str(name).startswith(f"{LIBRARY_DIR}/{LIBRARY}/") for name in copied) and (private / LIBRARY_DIR).is_dir():
        return f"{LIBRARY} in {private / LIBRARY_DIR}/"
    return (
        f"no {LIBRARY}: forks would be refused there; run `fork-sidecar preload install --python {interpreter.python}`"
    )


def _add_digest_library(interpreter: Interpreter, staging: Path) -> list[str]:
    """`blake3` for an environment that lacks it, written into the staged copy and checked to load there as the
    copy's digest will load it (else PreloadError, before anything is in place); the files written."""
    if interpreter.digest_library is not None:
        return []

    def loads_there(lib: Path) -> str | None:
        code = (
            f"import sys; sys.path.insert(0, {str(staging)!r}); from pathlib import Path; "
            f"from sidecar.protocol.hasher import load_library_from; load_library_from(Path({str(lib)!r}))"
        )
        try:
            done = run_python_probe(interpreter.executable, code)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"it could not be tried there ({e})"
        if done.returncode == 0:
            return None
        return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]

    target = Target(
        interpreter.python,
        interpreter.executable,
        interpreter.version,
        interpreter.implementation,
        interpreter.ext_suffix,
    )
    try:
        return write_library(staging, target, loads_there)
    except LibraryError as e:
        raise PreloadError(f"{e}.") from None


def _compile(executable: str, directory: Path) -> None:
    """Byte-compile the copy with the target interpreter: every start of it then reads .pyc files, even where
    PYTHONDONTWRITEBYTECODE is set. Not fatal: without .pyc files the preload only starts a little slower."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [executable, "-m", "compileall", "-q", str(directory)],
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            cwd="/",
            check=False,
        )


def uninstall(python: str | None = None) -> list[Path]:
    """Remove exactly what install wrote (and the bytecode Python compiled from it); returns the paths removed."""
    interpreter = probe_interpreter(python)
    purelib = interpreter.purelib
    private, pth = purelib / PRIVATE_DIR, purelib / PTH_NAME
    if not private.exists() and not pth.exists():
        return []
    _ensure_writable(purelib)
    _check_ours(purelib)
    removed: list[Path] = []
    try:
        if pth.exists():
            pth.unlink()  # first, so that no interpreter starting now looks for the copy
            removed.append(pth)
        manifest = _read_manifest(private) if private.exists() else None
        if manifest is not None:
            removed += _remove_copy(private, [str(name) for name in manifest.get("files", [])])
    except OSError as error:
        raise PreloadError(f"could not remove the preload from {purelib}: {error.strerror or error}.") from error
    return removed


def _remove_copy(private: Path, files: list[str]) -> list[Path]:
    removed = []
    directories = {private}
    for name in files:
        path = private / name
        directories.update(parent for parent in path.parents if private in parent.parents)
        if path.is_file():
            path.unlink()
            removed.append(path)
    for directory in directories:
        cache = directory / "__pycache__"
        if cache.is_dir():
            shutil.rmtree(cache)
            removed.append(cache)
    manifest = private / MANIFEST_NAME
    manifest.unlink()
    removed.append(manifest)
    for directory in sorted(directories, key=lambda path: len(path.parts), reverse=True):
        try:
            directory.rmdir()  # only when empty: anything someone else put there stays
            removed.append(directory)
        except OSError:
            pass
    return removed


def _compare(manifest: dict[str, Any]) -> tuple[bool, str]:
    installed = str(manifest.get("version"))
    cli = sidecar.__version__
    if _numeric(installed) < _numeric(cli):
        return False, f"older than this CLI's {cli}: run `fork-sidecar preload install` to update it"
    if _numeric(installed) > _numeric(cli):
        return False, f"newer than this CLI's {cli}"
    if manifest.get("digest") != _digest(_trainer_files(_package_root())):
        return False, "same version as this CLI but different files: run `fork-sidecar preload install` to update it"
    return True, "same as this CLI"


def _numeric(version: str) -> tuple[int, ...]:
    """Leading integer of each dot-separated part: enough to order our own release numbers."""
    key = []
    for part in version.split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        key.append(int(digits or 0))
    return tuple(key)


def _dtype_patch_verdict(interpreter: Interpreter, installed: bool, environ: Mapping[str, str]) -> tuple[bool, str]:
    unsloth = interpreter.unsloth
    candidates = (*dtype_patch.KERNEL_FUNCTIONS, *dtype_patch.INPLACE_HELPERS)
    patchable = tuple(name for name in candidates if name in unsloth.functions)
    if not installed:
        return False, "the preload is not installed there"
    if is_disabled(environ):
        return False, f"{PRELOAD_DISABLE_ENV}=0 in this environment"
    if dtype_patch.is_disabled(environ):
        return False, f"{dtype_patch.DISABLE_ENV}=0 in this environment"
    if unsloth.version is None and not unsloth.functions:
        return False, "Unsloth is not installed there"
    version = unsloth.version or "of unknown version"
    if not patchable:
        return False, f"Unsloth {version} defines none of {', '.join(dtype_patch.KERNEL_FUNCTIONS)}: nothing to patch"
    tested = "a tested version" if unsloth.version in dtype_patch.TESTED_UNSLOTH_VERSIONS else "an untested version"
    covered = ", ".join(patchable + unsloth.classes)
    return True, f"Unsloth {version} ({tested}): {covered}"


def status(python: str | None = None, environ: Mapping[str, str] | None = None) -> PreloadStatus:
    """What is installed in `python`'s environment and what it would do there."""
    interpreter = probe_interpreter(python)
    env = os.environ if environ is None else environ
    private, pth = interpreter.purelib / PRIVATE_DIR, interpreter.purelib / PTH_NAME
    manifest = _read_manifest(private) if private.exists() else None
    installed = manifest is not None and pth.is_file()
    up_to_date, note = _compare(manifest) if manifest is not None else (None, "")
    disabled_here = is_disabled(env)
    applies, patch_note = _dtype_patch_verdict(interpreter, installed, env)
    shadow = interpreter.sidecar_origin
    return PreloadStatus(
        python=interpreter.python,
        executable=interpreter.executable,
        python_version=".".join(map(str, interpreter.version)),
        purelib=str(interpreter.purelib),
        installed=installed,
        partial=not installed and (pth.exists() or private.exists()),
        installed_version=None if manifest is None else str(manifest.get("version")),
        cli_version=sidecar.__version__,
        up_to_date=up_to_date,
        version_note=note,
        disabled_here=disabled_here,
        shadowed_by=shadow if shadow and not shadow.startswith(str(private)) else None,
        dtype_patch_applies=applies,
        unsloth_version=interpreter.unsloth.version,
        unsloth_tested=interpreter.unsloth.version in dtype_patch.TESTED_UNSLOTH_VERSIONS,
        dtype_patch_note=patch_note,
        digest_library=_digest_library_note(interpreter, manifest, private),
        art=probe_art(interpreter.executable),
    )
