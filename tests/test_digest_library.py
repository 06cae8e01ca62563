"""`blake3` put beside the preload's copy (sidecar/digest_library.py) by `fork-sidecar preload install`, and found
by the digest there (sidecar/protocol/hasher.py), in real venvs: copied for the daemon's Python build, fetched by
pip for another, left out where the environment has its own, invisible to that environment's pip and imports, and
a clear refusal that writes nothing when nothing can provide it."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.preload import install as preload_install
from sidecar.protocol.digest import digest_of_tensors
from sidecar.protocol.hasher import LIBRARY_REQUIREMENT
from tests.support.venvs import make_venv, purelib

REPO = Path(__file__).resolve().parents[1]
TENSORS = {"a.lora_A.weight": ("F32", (2, 2), bytes(range(16))), "b": ("BF16", (3,), b"\1\2\3\4\5\6")}
# What a trainer venv prints: the digest of TENSORS made there by the preload's copy, and where its blake3 came from.
DIGEST_THERE = (
    f"import sys, sidecar.protocol.digest as d; print(d.digest_of_tensors({TENSORS!r})); "
    "print(sys.modules['blake3'].__file__)"
)
# Whether that environment itself (its imports, and the metadata pip reads) sees a blake3, the preload armed.
SEEN_THERE = (
    "import importlib.metadata, importlib.util; "
    "print(importlib.util.find_spec('blake3') is not None, "
    "any(d.metadata['Name'] == 'blake3' for d in importlib.metadata.distributions()))"
)


def install(python: Path, **env: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sidecar", "preload", "install", "--python", str(python)]
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(command, capture_output=True, text=True, env=environ, cwd="/", timeout=600, check=False)


def run_there(python: Path, code: str = DIGEST_THERE) -> list[str]:
    environ = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=environ, cwd="/", timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def manifest_of(python: Path) -> dict[str, object]:
    private = purelib(python) / preload_install.PRIVATE_DIR
    return dict(json.loads((private / "manifest.json").read_text()))


def status_line(python: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "preload", "status", "--python", str(python), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd="/",
        timeout=120,
        check=True,
    )
    return str(json.loads(done.stdout)["digest_library"])


def pyenv_python(minor: int) -> str | None:
    found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3.{minor}")))
    on_path = shutil.which(f"python3.{minor}")
    for candidate in [*found[-1:], *([on_path] if on_path else [])]:
        if subprocess.run([candidate, "-c", ""], capture_output=True, check=False).returncode == 0:
            return candidate
    return None


def other_cpython() -> str | None:
    """A CPython 3.11 or 3.12 that is not this one (pyenv's, or on PATH), for the pip path."""
    for minor in (12, 11):
        if minor != sys.version_info.minor and (found := pyenv_python(minor)):
            return found
    return None


def test_a_venv_without_blake3_gets_the_daemons_copy_which_only_the_digest_sees(tmp_path: Path) -> None:
    python, site = make_venv(tmp_path / "venv")
    assert "no blake3: forks would be refused there" in status_line(python)
    done = install(python)
    assert done.returncode == 0, done.stderr
    private = site / preload_install.PRIVATE_DIR
    assert f"blake3 put into {private / '_lib'}/" in done.stdout

    library = manifest_of(python)["library_files"]
    assert isinstance(library, list) and "_lib/blake3/__init__.py" in library
    assert any(name.startswith("_lib/blake3/blake3.cpython-") and name.endswith(".so") for name in library), library
    assert not [name for name in library if ".dist-info" in name], library  # nothing claims an installation
    digest, origin = run_there(python)
    assert digest == digest_of_tensors(TENSORS)
    assert origin.startswith(str(private / "_lib")), origin
    # pip and the trainer's own imports see no blake3 there: a blake3 installed later is that environment's own.
    assert run_there(python, SEEN_THERE) == ["False", "False"]
    assert status_line(python) == f"blake3 in {private / '_lib'}/"


def test_a_venv_that_has_blake3_gets_no_copy(tmp_path: Path) -> None:
    dev_site = Path(__import__("blake3").__file__).resolve().parents[1]
    python, site = make_venv(tmp_path / "venv", dev_site)
    done = install(python)
    assert done.returncode == 0, done.stderr

    assert manifest_of(python)["library_files"] == []
    assert not (site / preload_install.PRIVATE_DIR / "_lib").exists()
    assert "of that environment" in done.stdout and "of that environment" in status_line(python)
    digest, origin = run_there(python)
    assert digest == digest_of_tensors(TENSORS) and origin.startswith(str(dev_site))


def test_a_module_that_only_shares_the_name_is_not_taken_for_blake3(tmp_path: Path) -> None:
    # A `blake3.py` of someone's own on the trainer's path: the install does not count it, the copy's is used.
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    (impostor / "blake3.py").write_text(
        "class blake3:\n    def __init__(self, data=b''): pass\n"
        "    def update(self, data): pass\n"
        "    def digest(self): return b'0' * 32\n"
        "    def hexdigest(self): return '0' * 64\n"
    )
    python, site = make_venv(tmp_path / "venv", impostor)
    done = install(python)
    assert done.returncode == 0, done.stderr

    assert "_lib/blake3/__init__.py" in list(manifest_of(python)["library_files"])  # type: ignore[arg-type]
    digest, origin = run_there(python)
    assert digest == digest_of_tensors(TENSORS) and origin.startswith(str(site / preload_install.PRIVATE_DIR))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["the other of 3.11/3.12", "3.10"])
def test_another_python_version_gets_the_wheel_for_it_from_pip(tmp_path: Path, which: str) -> None:
    other = other_cpython() if which != "3.10" else pyenv_python(10)
    if other is None:
        pytest.skip(f"no CPython {which} on this machine")
    python, site = make_venv(tmp_path / "venv", base=other)
    done = install(python)
    assert done.returncode == 0, done.stderr

    library = manifest_of(python)["library_files"]
    assert isinstance(library, list)
    tag = "".join(other.rsplit("python", 1)[1].split("."))  # "3.12" -> "312"
    assert any(name.startswith(f"_lib/blake3/blake3.cpython-{tag}") for name in library), library
    assert run_there(python)[0] == digest_of_tensors(TENSORS)
    leftovers = [
        p for p in site.rglob("*") if p.name.startswith((".library-", "_fork_sidecar.new-", "_fork_sidecar.old-"))
    ]
    assert not leftovers, leftovers


def test_when_nothing_can_provide_it_the_install_says_how_and_writes_nothing(tmp_path: Path) -> None:
    other = other_cpython()
    if other is None:
        pytest.skip("no second CPython (3.11 or 3.12) on this machine")
    python, site = make_venv(tmp_path / "venv", base=other)
    before = sorted(p.relative_to(site) for p in site.rglob("*"))
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    done = install(python, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty), PIP_CONFIG_FILE=os.devnull)

    assert done.returncode == 2, (done.stdout, done.stderr)
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert str(python) in message and "cannot import blake3" in message
    # Each way tried, with its own reason: the daemon's pip found no wheel, that venv has no pip at all.
    assert "the daemon's pip: " in message and "that environment's pip: " in message, message
    assert f"-m pip install '{LIBRARY_REQUIREMENT}'" in message and "PIP_FIND_LINKS" in message
    assert sorted(p.relative_to(site) for p in site.rglob("*")) == before


def test_pip_is_not_taken_from_the_callers_working_directory(tmp_path: Path) -> None:
    """`python -m pip` would run a `pip.py` in the working directory (as root, under sudo); -I and cwd=/ keep it out."""
    other = other_cpython()
    if other is None:
        pytest.skip("no second CPython (3.11 or 3.12) on this machine")
    python, _ = make_venv(tmp_path / "venv", base=other)
    trap = tmp_path / "cwd"
    trap.mkdir()
    (trap / "pip.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    command = [sys.executable, "-m", "sidecar", "preload", "install", "--python", str(python)]
    environ = {**os.environ, "PYTHONPATH": str(REPO), "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    subprocess.run(command, capture_output=True, text=True, env=environ, cwd=trap, timeout=600, check=False)

    assert not (tmp_path / "ran").exists()
