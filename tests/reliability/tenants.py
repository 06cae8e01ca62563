"""Two real tenants for the binding tests: users alice and bob, a shared base directory, and their processes.

Everything a tenant runs is a real process of that user (`subprocess` with `user=`/`group=`), started with the system
interpreter (the dev venv lives under /root, which other users cannot enter) and this repo on PYTHONPATH, so a
tenant's trainer runs the real preload agent. The scripts below are what a hostile alice would run: stdlib only, and
written against no version of our code, so the same attack runs against old and new code alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "FAKE_VLLM",
    "SYSTEM_PYTHON",
    "Tenant",
    "logged_requests",
    "shared_base",
    "tenants",
]

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3.11"
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Tenant:
    name: str
    uid: int
    gid: int

    def chown(self, *paths: Path) -> None:
        for top in paths:
            for p in [top, *top.rglob("*")]:
                os.lchown(p, self.uid, self.gid)

    def popen(self, argv: list[str], *, env: dict[str, str] | None = None, log: Path) -> subprocess.Popen[bytes]:
        """Start `argv` as this user, output to `log` (owned by the user, readable by the test)."""
        out = open(log, "ab")  # noqa: SIM115 - handed to the child
        os.chown(log, self.uid, self.gid)
        base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HOME": "/"}
        try:
            return subprocess.Popen(
                argv,
                user=self.uid,
                group=self.gid,
                extra_groups=[],
                env={**base, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
            )
        finally:
            out.close()

    def python(self, script: Path, *args: str, env: dict[str, str] | None = None, log: Path) -> subprocess.Popen[bytes]:
        return self.popen([SYSTEM_PYTHON, str(script), *args], env=env, log=log)


def ensure_user(name: str) -> pwd.struct_passwd:
    """The account `name`, created with `useradd` (no home, no shell) if this host lacks it."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)


def _ensure_user(name: str) -> Tenant:
    entry = ensure_user(name)
    return Tenant(name, entry.pw_uid, entry.pw_gid)


@pytest.fixture(scope="session")
def tenants() -> dict[str, Tenant]:
    """alice and bob, created with `useradd` if this host lacks them (tests run as root here and in CI)."""
    if os.geteuid() != 0 or not Path(SYSTEM_PYTHON).exists() or shutil.which("useradd") is None:
        pytest.skip("needs root, useradd and /usr/bin/python3.11 to run processes as alice and bob")
    return {name: _ensure_user(name) for name in ("alice", "bob")}


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is root's 0700), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="fs-ten-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def logged_requests(log: Path) -> list[dict[str, Any]]:
    """The JSON lines a fake agent or server wrote for each request it received."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# The scripts, as files a tenant can read (the test copies them into the shared base).
FAKE_AGENT = HERE / "tenant_scripts" / "fake_agent.py"
STUB_TRAINER = HERE / "tenant_scripts" / "stub_trainer.py"
FAKE_VLLM = REPO / "tests" / "support" / "fake_vllm.py"  # installed as `vllm`, the name discovery looks for
SQUAT = HERE / "tenant_scripts" / "squat.py"


def install_scripts(base: Path) -> Path:
    """Copy the tenant scripts where every user can read them; returns that directory."""
    target = base / "bin"
    shutil.copytree(HERE / "tenant_scripts", target)
    shutil.copy(FAKE_VLLM, target / "vllm")
    for p in [target, *target.iterdir()]:
        p.chmod(0o755)
    return target


def python_of_daemon() -> str:
    return sys.executable
