"""`blake3` put beside the preload's copy (sidecar/digest_library.py) by `fork-sidecar preload install`, in real venvs:
copied for the daemon's Python version, fetched by pip for another, left out where the environment has its own, and
a clear refusal that writes nothing when pip cannot get it."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.digest_library import library_version
from sidecar.preload import install as preload_install
from sidecar.protocol.digest import digest_of_tensors
from tests.support.venvs import make_venv, purelib

REPO = Path(__file__).resolve().parents[1]
TENSORS = {"a.lora_A.weight": ("F32", (2, 2), bytes(range(16))), "b": ("BF16", (3,), b"\1\2\3\4\5\6")}
# What a trainer venv prints: the digest of TENSORS made there by the preload's copy, and where its blake3 is from.
DIGEST_THERE = (
    f"import blake3, sidecar.protocol.digest as d; print(d.digest_of_tensors({TENSORS!r})); print(blake3.__file__)"
)


def install(python: Path, **env: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sidecar", "preload", "install", "--python", str(python)]
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(command, capture_output=True, text=True, env=environ, cwd="/", timeout=600, check=False)


def run_there(python: Path) -> list[str]:
    environ = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [str(python), "-c", DIGEST_THERE], capture_output=True, text=True, env=environ, cwd="/", timeout=120
    )
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


def other_cpython() -> str | None:
    """A CPython 3.11 or 3.12 that is not this one (pyenv's, or on PATH), for the pip path."""
    for minor in (12, 11):
        if minor == sys.version_info.minor:
            continue
        found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3.{minor}")))
        if found:
            return found[-1]
        on_path = shutil.which(f"python3.{minor}")
        if on_path and subprocess.run([on_path, "-c", ""], capture_output=True, check=False).returncode == 0:
            return on_path
    return None


def test_a_venv_without_blake3_gets_the_daemons_copy_and_digests_as_the_daemon_does(tmp_path: Path) -> None:
    python, site = make_venv(tmp_path / "venv")
    assert "no blake3: forks would be refused there" in status_line(python)
    done = install(python)
    assert done.returncode == 0, done.stderr
    assert f"blake3 {library_version()} put into" in done.stdout

    library = manifest_of(python)["library_files"]
    assert isinstance(library, list) and "blake3/__init__.py" in library
    assert any(name.startswith("blake3/blake3.cpython-") and name.endswith(".so") for name in library), library
    digest, origin = run_there(python)
    assert digest == digest_of_tensors(TENSORS)
    assert origin.startswith(str(site / preload_install.PRIVATE_DIR)), origin
    assert status_line(python) == f"blake3 in {site / preload_install.PRIVATE_DIR}/"


def test_a_venv_that_has_blake3_gets_no_copy(tmp_path: Path) -> None:
    dev_site = Path(__import__("blake3").__file__).resolve().parents[1]
    python, site = make_venv(tmp_path / "venv", dev_site)
    done = install(python)
    assert done.returncode == 0, done.stderr

    assert manifest_of(python)["library_files"] == []
    assert not (site / preload_install.PRIVATE_DIR / "blake3").exists()
    assert "of that environment" in done.stdout and "of that environment" in status_line(python)
    digest, origin = run_there(python)
    assert digest == digest_of_tensors(TENSORS) and origin.startswith(str(dev_site))


@pytest.mark.slow
def test_another_python_version_gets_the_wheel_for_it_from_pip(tmp_path: Path) -> None:
    other = other_cpython()
    if other is None:
        pytest.skip("no second CPython (3.11 or 3.12) on this machine")
    python, site = make_venv(tmp_path / "venv", base=other)
    done = install(python)
    assert done.returncode == 0, done.stderr

    library = manifest_of(python)["library_files"]
    assert isinstance(library, list)
    tag = "".join(other.rsplit("python", 1)[1].split("."))  # "3.12" -> "312"
    assert any(name.startswith(f"blake3/blake3.cpython-{tag}") for name in library), library
    assert run_there(python)[0] == digest_of_tensors(TENSORS)
    assert not list(site.glob(".fork-sidecar-pip-*")), "pip's temporary folder was left behind"


def test_when_pip_cannot_get_it_the_install_says_how_and_writes_nothing(tmp_path: Path) -> None:
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
    assert f"-m pip install blake3=={library_version()}" in message and "PIP_FIND_LINKS" in message
    assert sorted(p.relative_to(site) for p in site.rglob("*")) == before
