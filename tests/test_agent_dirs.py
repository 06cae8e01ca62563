"""The daemon's runtime dir and per-user agent directories, on the real filesystem (chown needs root)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.agent_dirs import AgentDirs, RuntimeDirError, ensure_runtime_dir, ensure_user_dir
from tests.reliability.tenants import SYSTEM_PYTHON
from tests.support.daemon import DaemonProcess, wait_for, write_config

OTHER, THIRD = 4242, 4343


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fs-adir-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("handing a directory to another uid needs root")


def owner_and_mode(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, stat.S_IMODE(st.st_mode)


def test_the_runtime_dir_is_created_0755_whatever_the_umask(base: Path) -> None:
    old = os.umask(0o077)
    try:
        ensure_runtime_dir(base / "a" / "run")
    finally:
        os.umask(old)
    assert owner_and_mode(base / "a" / "run") == (os.geteuid(), 0o755)
    (base / "file").write_text("")
    with pytest.raises(RuntimeDirError, match="is not a directory"):
        ensure_runtime_dir(base / "file")
    with pytest.raises(RuntimeDirError, match="cannot create the runtime dir"):
        ensure_runtime_dir(base / "file" / "run")
    assert AgentDirs(base / "file" / "run").prepare() is False  # the daemon logs it and runs on


def test_an_existing_runtime_dir_keeps_its_mode(base: Path) -> None:
    (base / "run").mkdir(mode=0o750)
    ensure_runtime_dir(base / "run")
    assert owner_and_mode(base / "run")[1] == 0o750


def test_a_users_directory_is_made_0700_and_theirs(base: Path, as_root: None) -> None:
    made = ensure_user_dir(base, OTHER)
    assert made == base / str(OTHER) and owner_and_mode(made) == (OTHER, 0o700)
    assert ensure_user_dir(base, OTHER) == made  # kept as it is


@pytest.mark.parametrize("squat", ["dir of another user", "dir of root", "loose dir", "file", "symlink"])
def test_whatever_squats_a_users_name_is_replaced(base: Path, as_root: None, squat: str) -> None:
    name = base / str(OTHER)
    target = base / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("not to be touched")
    if squat == "file":
        name.write_text("")
    elif squat == "symlink":
        name.symlink_to(target)
    else:
        name.mkdir()
        (name / f"agent-{os.getpid()}.sock").write_text("")  # a name squatted for a future agent
        os.chown(name, {"dir of another user": THIRD, "dir of root": 0, "loose dir": OTHER}[squat], -1)
        if squat == "loose dir":
            name.chmod(0o777)
    assert ensure_user_dir(base, OTHER) == name
    assert owner_and_mode(name) == (OTHER, 0o700) and list(name.iterdir()) == []
    assert (target / "keep").read_text() == "not to be touched"  # a symlink is removed, never followed


def test_keep_makes_each_owners_directory_and_makes_it_again(base: Path, as_root: None) -> None:
    runtime = base / "run"
    dirs = AgentDirs(runtime)
    dirs.prepare()
    dirs.keep({OTHER, THIRD})
    assert owner_and_mode(runtime / str(OTHER)) == (OTHER, 0o700)
    assert owner_and_mode(runtime / str(THIRD)) == (THIRD, 0o700)
    shutil.rmtree(runtime / str(THIRD))  # cleaned away (tmpfiles): made again at the next look
    dirs.keep({OTHER, THIRD})
    assert owner_and_mode(runtime / str(THIRD)) == (THIRD, 0o700)


def test_the_daemon_follows_a_runs_chown_without_waiting_for_a_rescan(base: Path, as_root: None) -> None:
    # Owners come from the watcher's tree (IN_ATTRIB on the run dir), not from a stat of every run every minute:
    # a run created by root and then handed over gets its owner's directory at once. The old minute-long refresh
    # made it only up to 60 s later, past this test's wait.
    runtime, art = base / "run", base / "art"
    handed, late = art / "p" / "models" / "handed", art / "p" / "models" / "late"
    handed.mkdir(parents=True)
    config = write_config(base / "config.yaml", [art], base / "state", runtime, watch={"rescan_interval": "1h"})
    with DaemonProcess(config, base / "daemon.log"):
        assert owner_and_mode(runtime / "0") == (0, 0o700)  # made before READY=1
        os.chown(handed, OTHER, -1)
        wait_for(lambda: (runtime / str(OTHER)).is_dir(), timeout=10.0, what="the new owner's agent directory")
        assert owner_and_mode(runtime / str(OTHER)) == (OTHER, 0o700)
        late.mkdir()
        os.chown(late, THIRD, -1)
        wait_for(lambda: (runtime / str(THIRD)).is_dir(), timeout=10.0, what="a new run's owner's agent directory")


RACER = """
import os, sys
rt, name = sys.argv[1], sys.argv[2]
i = 0
while True:
    i += 1
    try:
        os.rename(os.path.join(rt, name), os.path.join(rt, f"moved-{i}"))
        os.symlink("/", os.path.join(rt, name))
    except OSError:
        pass
"""


def test_a_tenant_racing_the_creation_in_a_world_writable_runtime_dir_never_stops_the_daemon(
    base: Path, as_root: None
) -> None:
    """Under a 0777 runtime dir (warned about, still supported) another user may rename the directory just made and
    put a symlink at its name before the daemon opens it: the open (O_NOFOLLOW) failed with an OSError that went up
    through the daemon's main loop and stopped the daemon. Real racing process of an unprivileged uid."""
    base.chmod(0o777)
    racer = subprocess.Popen([SYSTEM_PYTHON, "-c", RACER, str(base), str(OTHER)], user=THIRD, group=THIRD)
    try:
        deadline = time.monotonic() + 8.0  # the old code raised about 6 times a second here
        rounds = 0
        while time.monotonic() < deadline:
            rounds += 1
            made = ensure_user_dir(base, OTHER)  # never raises: None or the user's directory
            assert made is None or made == base / str(OTHER)
    finally:
        racer.kill()
        racer.wait()
    assert rounds > 100
