"""Tenants: a root daemon on a shared node acts for a run only with its owner's rights, and fairly (issue 18).

Real users (`alice` owns `pa/models/m`, `bob` owns the project `pq`, created with `useradd` when absent), the real
daemon as root, real files. Promise: alice cannot make the daemon read what she cannot read, write where she cannot
write, learn through its sentences what she could not see, or delay bob's forks.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.fsops import exchange_dirs
from sidecar.layout import RunDir
from sidecar.marker import MAX_RECORD_BYTES
from sidecar.owner_worker import OwnerRunIO
from sidecar.run_io import RunIOError, owner_of
from sidecar.rundir import open_run
from tests.reliability.support import Fleet, mounted_tmpfs, proc_sample, tree_digest, wait_settled
from tests.reliability.tenants import Tenant, ensure_user, install_scripts, logged_requests, stop
from tests.support.adapters import write_adapter
from tests.support.crash import held_at, hold_env
from tests.support.daemon import wait_for, wait_outcome

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="tenant tests create users and run the daemon as root"),
]


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def run(self, command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """A shell command as this user (no groups but its own), as a tenant would type it."""
        return subprocess.run(
            ["/bin/sh", "-c", command],
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )


def _user(name: str) -> User:
    entry = ensure_user(name)
    return User(name, entry.pw_uid, entry.pw_gid)


@pytest.fixture(scope="session")
def alice() -> User:
    return _user("alice")


@pytest.fixture(scope="session")
def bob() -> User:
    return _user("bob")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path lives under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="tenants-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(path / "small")], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def art(base: Path) -> Path:
    root = base / "art"
    root.mkdir(mode=0o755)
    return root


@pytest.fixture
def fleet(base: Path, art: Path) -> Iterator[Fleet]:
    state = base / "daemon"
    state.mkdir(mode=0o700)
    with Fleet(state, [art], overrides={"log": {"level": "info"}}) as f:
        yield f


def chown_tree(path: Path, user: User) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, user.uid, user.gid, follow_symlinks=False)


def make_owned_run(art: Path, project: str, model: str, user: User, steps: tuple[int, ...] = (3,)) -> Path:
    """`{art}/{project}/models/{model}` owned by `user` (dirs 0755, files 0644, as umask 022 leaves them)."""
    model_dir = art / project / "models" / model
    write_adapter(model_dir / "checkpoints" / "0000", seed=0)
    for step in steps:
        write_adapter(model_dir / "checkpoints" / f"{step:04d}", seed=step)
    chown_tree(art / project, user)
    return model_dir


@pytest.fixture
def bobs(art: Path, bob: User) -> Path:
    """bob's project `pq` (0700) with the model `secret`; its checkpoints are 0644 inside."""
    model_dir = make_owned_run(art, "pq", "secret", bob, steps=(3,))
    (art / "pq").chmod(0o700)
    return model_dir


@pytest.fixture
def alices(art: Path, alice: User) -> Path:
    return make_owned_run(art, "pa", "m", alice, steps=(1,))


def write_marker_as(user: User, model_dir: Path, text: str) -> None:
    """The marker as `user` writes it: a temp file renamed into place."""
    tmp = model_dir / ".fork.tmp-tenant"
    done = user.run(f"printf '%s' '{text}' > '{tmp}' && mv '{tmp}' '{model_dir / '.fork'}'")
    assert done.returncode == 0, done.stderr


def outcome_of(fleet: Fleet, model_dir: Path, timeout: float = 60) -> dict[str, object]:
    view = wait_settled(model_dir, [fleet.state_dir(0)], timeout)
    assert view.outcome is not None and not view.markers, (view, fleet.daemons[0].log())
    return dict(view.outcome)


def snapshot(path: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Every entry under `path` with its owner, mode and content (or link target)."""
    out: dict[str, tuple[int, int, bytes | str]] = {}
    for p in sorted([path, *path.rglob("*")]):
        st = p.lstat()
        content: bytes | str = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else b"")
        out[str(p.relative_to(path))] = (st.st_uid, st.st_mode, content)
    return out


# --- cross-user reads ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "how",
    ["absolute", "dotdot", "symlink-alice-owns", "step-symlink", "from_model"],
)
def test_alice_cannot_fork_from_bobs_closed_project(
    fleet: Fleet, art: Path, alices: Path, bobs: Path, alice: User, how: str
) -> None:
    secret = bobs / "checkpoints" / "0003"
    markers = {
        "absolute": f"source: {secret}",
        "dotdot": "source: ../../../pq/models/secret/checkpoints/0003",
        "symlink-alice-owns": "source: shortcut",
        "step-symlink": "step: 7",
        "from_model": "from_model: secret\nfrom_project: pq",
    }
    if how == "symlink-alice-owns":
        assert alice.run(f"ln -s '{secret}' '{alices / 'shortcut'}'").returncode == 0
    if how == "step-symlink":
        assert alice.run(f"ln -s '{secret}' '{alices / 'checkpoints' / '0007'}'").returncode == 0
    before = tree_digest(alices / "checkpoints" / "0000")
    fleet.start(0)
    write_marker_as(alice, alices, markers[how])
    outcome = outcome_of(fleet, alices)
    assert outcome["status"] == "failed", outcome
    assert tree_digest(alices / "checkpoints" / "0000") == before
    # Nothing of bob's reached her: not his bytes, not his adapter's digest, not his file list or sizes.
    assert alice.run(f"cat '{alices}/checkpoints/0000/adapter_config.json'").returncode == 0
    assert outcome["digest"] is None and "files" not in dict(outcome["swap"])  # type: ignore[arg-type]
    assert "\n" not in str(outcome["error"])


def test_bobs_strict_project_tells_alice_nothing_she_could_not_see(
    fleet: Fleet, art: Path, alices: Path, bob: User, alice: User
) -> None:
    """0755 directories but 0600 files: alice may list them, not read them; the outcome has no digest or sizes."""
    strict = make_owned_run(art, "ps", "strict", bob, steps=(3,))
    for p in strict.rglob("*"):
        if p.is_file():
            p.chmod(0o600)
    source = strict / "checkpoints" / "0003"
    assert alice.run(f"cat '{source}/adapter_config.json'").returncode != 0
    fleet.start(0)
    write_marker_as(alice, alices, f"source: {source}")
    outcome = outcome_of(fleet, alices)
    assert outcome["status"] == "failed" and outcome["digest"] is None, outcome
    assert "Permission denied" in str(outcome["error"]), outcome
    assert "bytes" not in dict(outcome["swap"])  # type: ignore[arg-type]


def test_a_marker_bob_drops_into_alices_open_run_is_refused(fleet: Fleet, alices: Path, alice: User, bob: User) -> None:
    """The marker's writer must be the run's owner (or root): otherwise bob forks alice's run with her rights."""
    alices.chmod(0o777)
    before = tree_digest(alices / "checkpoints" / "0000")
    fleet.start(0)
    write_marker_as(bob, alices, "step: 1")
    outcome = outcome_of(fleet, alices)
    assert outcome["status"] == "failed" and f"uid {bob.uid}" in str(outcome["error"]), outcome
    assert tree_digest(alices / "checkpoints" / "0000") == before


def test_alices_own_fork_works_and_is_hers(fleet: Fleet, alices: Path, alice: User) -> None:
    fleet.start(0)
    write_marker_as(alice, alices, "step: 1")
    outcome = outcome_of(fleet, alices)
    assert outcome["status"] == "done", (outcome, fleet.daemons[0].log())
    assert tree_digest(alices / "checkpoints" / "0000") == tree_digest(alices / "checkpoints" / "0001")
    served = alices / "checkpoints" / "0000"
    assert {p.stat().st_uid for p in [served, *served.rglob("*")]} == {alice.uid}
    assert (alices / ".fork.done").stat().st_uid == alice.uid  # written as alice, not as root


# --- the root realpath oracle -------------------------------------------------------------------------------------
def test_error_sentences_reveal_nothing_alice_could_not_see(
    fleet: Fleet, base: Path, alices: Path, alice: User, bob: User
) -> None:
    """bob's process cwd behind /proc/PID/cwd, the file behind his /proc/PID/fd/7, and what exists in a 0700
    directory stay unknown to alice."""
    home = base / "bobhome"
    (home / "plans-for-2027").mkdir(parents=True)
    (home / "plans-for-2027" / "notes").write_text("private\n")
    chown_tree(home, bob)
    home.chmod(0o700)
    sleeper = subprocess.Popen(
        ["/bin/sh", "-c", "exec 7<notes; exec sleep 120"], cwd=home / "plans-for-2027", user=bob.uid, group=bob.gid
    )
    try:
        fleet.start(0)
        errors = {}
        for name, source in [
            ("cwd", f"/proc/{sleeper.pid}/cwd"),
            ("fd", f"/proc/{sleeper.pid}/fd/7"),
            ("exists", f"{home}/plans-for-2027"),
            ("missing", f"{home}/no-such-plans"),
        ]:
            for leftover in (".fork.done", ".fork.failed"):
                (alices / leftover).unlink(missing_ok=True)
            write_marker_as(alice, alices, f"source: {source}")
            outcome = outcome_of(fleet, alices)
            assert outcome["status"] == "failed", outcome
            errors[name] = str(outcome["error"]).replace(source, "SOURCE")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "plans-for-2027" not in errors["cwd"] + errors["fd"], errors
    # What exists behind a directory alice cannot search reads exactly like what does not.
    assert errors["exists"] == errors["missing"], errors


# --- no path re-resolution ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["bobs-run", "root-dir"])
def test_run_swapped_for_a_symlink_to_bobs_run_after_the_claim(
    fleet: Fleet, base: Path, art: Path, alices: Path, bobs: Path, alice: User, target: str
) -> None:
    """alice owns pa/models/, so she can exchange her model dir with a symlink to bob's run (or to a directory of
    root's holding a `.fork.done` of its own) once her fork has claimed it, before it copies. The fork is held right
    after its claim is journaled (a test-side shim, tests/support/crash.py) while she does, instead of racing a big
    copy that a fast host finishes before the exchange."""
    write_adapter(alices / "checkpoints" / "0002", seed=2)
    chown_tree(alices / "checkpoints" / "0002", alice)
    (art / "pq").chmod(0o755)  # the worst case: bob's run is reachable by path
    victim = bobs
    if target == "root-dir":
        victim = base / "roots-own"
        write_adapter(victim / "checkpoints" / "0000", seed=8)
        (victim / ".fork.done").write_text("root's file\n")
        victim.chmod(0o700)
    bobs_before = snapshot(victim)
    models = alices.parent
    os.symlink(victim, models / "m.evil")
    gate = base / "claimed-gate"
    fleet.start(0, env=hold_env("claimed", gate))
    write_marker_as(alice, alices, "step: 2")
    wait_for(held_at(gate).exists, 30, "her fork held after its claim")
    models_fd = os.open(models, os.O_RDONLY | os.O_DIRECTORY)
    try:
        exchange_dirs(models_fd, "m", "m.evil")  # pa/models/m is now the symlink, her run is pa/models/m.evil
    finally:
        os.close(models_fd)
    gate.touch()
    moved = models / "m.evil"
    outcome = outcome_of(fleet, moved)
    assert snapshot(victim) == bobs_before, f"{victim} was changed"
    assert outcome["status"] == "failed" and "moved or replaced" in str(outcome["error"]), outcome
    assert not [n for n in os.listdir(moved / "checkpoints") if n.startswith(".fork-")]


def test_source_parent_raced_out_of_the_roots(fleet: Fleet, base: Path, alices: Path, alice: User, bob: User) -> None:
    """A thread flips a *parent* of the source between a real dir and a symlink to bob's 0700 home."""
    home = base / "bobhome"
    write_adapter(home / "ckpt", seed=66)
    chown_tree(home, bob)
    home.chmod(0o700)
    evil = tree_digest(home / "ckpt")
    inside = alices / "racy-real"
    write_adapter(inside / "ckpt", seed=5)
    chown_tree(inside, alice)
    allowed = {tree_digest(alices / "checkpoints" / "0000"), tree_digest(inside / "ckpt")}
    racy, hidden = alices / "racy", alices / "racy-hidden"
    stop = threading.Event()

    def flip() -> None:
        os.rename(inside, racy)
        while not stop.is_set():
            os.rename(racy, hidden)
            os.symlink(home, racy)  # racy/ckpt is now bob's checkpoint
            time.sleep(0.002)
            os.unlink(racy)
            os.rename(hidden, racy)
            time.sleep(0.002)

    flipper = threading.Thread(target=flip, daemon=True)
    fleet.start(0)
    flipper.start()
    statuses = []
    try:
        for i in range(15):
            for leftover in (".fork.done", ".fork.failed"):
                (alices / leftover).unlink(missing_ok=True)
            write_marker_as(alice, alices, f"source: racy/ckpt\nrequest_id: r{i}")
            outcome = outcome_of(fleet, alices)
            statuses.append(f"{outcome['status']}: {outcome['error']}")
            served = tree_digest(alices / "checkpoints" / "0000")
            assert served in allowed and served != evil, (i, outcome)
    finally:
        stop.set()
        flipper.join(10)
    assert any(s.startswith("done") for s in statuses), statuses


# --- noisy neighbours ---------------------------------------------------------------------------------------------
def test_alices_busy_runs_never_delay_bobs_fork(fleet: Fleet, art: Path, alice: User, bob: User) -> None:
    """alice keeps rewriting the markers of 10 runs, so each of her forks is followed by another that waits (up to
    10 s) for its marker to settle: with one pool shared first come first served, she would hold every worker."""
    runs = [make_owned_run(art, "pa", f"m{i}", alice, steps=(1,)) for i in range(10)]
    bobs_run = make_owned_run(art, "pb", "b", bob, steps=(1,))
    dirs = " ".join(f"'{r}'" for r in runs)
    rewrite = "printf 'step: 1' > $d/.fork.t && mv $d/.fork.t $d/.fork"
    loop = f"while :; do for d in {dirs}; do {rewrite}; done; sleep 0.02; done"
    fleet.start(0)
    writer = subprocess.Popen(["/bin/sh", "-c", loop], user=alice.uid, group=alice.gid, extra_groups=[])
    try:
        wait_for(lambda: sum((r / ".fork.done").exists() for r in runs) >= 8, 60, "alice's forks under way")
        time.sleep(1.0)
        started = time.monotonic()
        write_marker_as(bob, bobs_run, "step: 1")
        outcome = outcome_of(fleet, bobs_run, timeout=30)
        waited = time.monotonic() - started
    finally:
        writer.kill()
        writer.wait()
    assert outcome["status"] == "done", outcome
    # Behind her, it would wait out a 10 s settle at least; 9 s leaves his own fork room on a loaded 2-core machine.
    assert waited < 9.0, f"bob's fork waited {waited:.1f}s behind alice's"


def test_alices_hanging_trainer_holding_8_forks_never_delays_bobs_fork(
    base: Path, art: Path, alice: User, bob: User
) -> None:
    """Issue 18's case: 8 of alice's forks held by her own trainer agent, which hangs in every fork (a real agent
    process of hers, the real preload agent). Each holds its worker for the trainers stage (agent_timeout 60 s);
    bob's unrelated fork must take only its own time, not wait for a worker she holds."""
    runs = [make_owned_run(art, "pa", f"m{i}", alice, steps=(1,)) for i in range(8)]
    bobs_run = make_owned_run(art, "pb", "b", bob, steps=(1,))
    bin_dir = install_scripts(base)
    agent_log = base / "alice-agent.jsonl"
    overrides = {"log": {"level": "info"}, "trainer": {"agent_timeout": "60s", "retries": 0}}
    agent_log.touch()
    os.chown(agent_log, alice.uid, alice.gid)
    with Fleet(base, [art], overrides=overrides) as fleet:  # its runtime dir, base/run0, is reachable by alice
        fleet.start(0)
        runtime_dir = base / "run0"
        tenant = Tenant(alice.name, alice.uid, alice.gid)
        out = base / "alice-agent.out"
        trainer = tenant.python(
            bin_dir / "stub_trainer.py",
            ":".join(str(r) for r in runs),
            str(agent_log),
            "hang",
            env={"FORK_SIDECAR_RUNTIME_DIR": str(runtime_dir)},
            log=out,
        )
        try:
            wait_for(lambda: "registered" in out.read_text() or trainer.poll() is not None, 30, "alice's trainer")
            assert trainer.poll() is None, out.read_text()
            for run in runs:
                write_marker_as(alice, run, "step: 1")
            # Her agent holds every fork the daemon lets her have at once (forks.per_owner), all hanging.
            wait_for(lambda: len(logged_requests(agent_log)) >= 2, 60, "alice's forks to hang in her agent")
            time.sleep(1.0)
            started = time.monotonic()
            write_marker_as(bob, bobs_run, "step: 1")
            # Not outcome_of: it waits for the whole journal to settle, and alice's forks are meant to stay.
            outcome = wait_outcome(bobs_run, 30)
            waited = time.monotonic() - started
            still_held = [r for r in runs if (r / ".fork.inprogress").exists() or (r / ".fork").exists()]
            log = fleet.daemons[0].log()
        finally:
            stop(trainer)
    assert outcome["status"] == "done", outcome
    assert len(still_held) == 8, "alice's forks ended before bob's: nothing was holding her workers"
    # His own work: a small swap and no trainer of his; nowhere near the 60 s a held worker would cost him.
    assert waited < 9.0, f"bob's fork waited {waited:.1f}s behind alice's hanging forks:\n{log}"


def test_a_thousand_markers_do_not_cost_a_thousand_threads(fleet: Fleet, art: Path) -> None:
    template = art.parent / "template"
    write_adapter(template / "checkpoints" / "0000", seed=0)
    write_adapter(template / "checkpoints" / "0001", seed=1)
    runs = []
    for i in range(1000):
        model_dir = art / f"p{i % 10}" / "models" / f"m{i}"
        shutil.copytree(template, model_dir)
        runs.append(model_dir)
    daemon = fleet.start(0)
    assert daemon.proc is not None
    for model_dir in runs:
        (model_dir / ".fork").write_text("step: 1\n")
    most = 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        most = max(most, proc_sample(daemon.proc.pid).threads)
        if all((r / ".fork.done").exists() for r in runs[-20:]) and not any((r / ".fork").exists() for r in runs):
            break
        time.sleep(0.05)
    assert most <= 2 + 8 * 2 + 4, f"{most} threads for 1,000 markers"


def test_a_source_of_100000_tiny_files_is_refused_before_copying(fleet: Fleet, alices: Path, alice: User) -> None:
    source = alices / "checkpoints" / "0009"
    write_adapter(source, seed=9)
    junk = source / "junk"
    junk.mkdir()
    for i in range(100_000):
        (junk / f"{i:06d}").write_bytes(b"x")
    chown_tree(source, alice)
    fleet.start(0)
    write_marker_as(alice, alices, "step: 9")
    outcome = outcome_of(fleet, alices, timeout=120)
    assert outcome["status"] == "failed" and "sources.max_files" in str(outcome["error"]), outcome
    assert len(json.dumps(outcome)) < MAX_RECORD_BYTES // 16
    assert not [n for n in os.listdir(alices / "checkpoints") if n.startswith(".fork-")]


def test_a_sparse_100_gb_file_is_refused_before_it_fills_the_disk(fleet: Fleet, base: Path, alice: User) -> None:
    with mounted_tmpfs(base / "small", size="64m") as small:
        if small is None:
            pytest.skip("cannot mount a tmpfs here")
        small.chmod(0o755)
        fleet.roots.append(small)
        model_dir = make_owned_run(small, "pa", "m", alice, steps=())
        source = model_dir / "checkpoints" / "0004"
        write_adapter(source, seed=4)
        with open(source / "optimizer.pt", "wb") as f:
            f.truncate(100 << 30)  # 100 GiB apparent, no blocks
        chown_tree(model_dir / "checkpoints", alice)
        free_before = os.statvfs(small).f_bavail
        lowest = [free_before]
        fleet.start(0)
        write_marker_as(alice, model_dir, "step: 4")
        stop = threading.Event()

        def watch_free() -> None:
            while not stop.is_set():
                lowest[0] = min(lowest[0], os.statvfs(small).f_bavail)
                time.sleep(0.001)

        watcher = threading.Thread(target=watch_free, daemon=True)
        watcher.start()
        try:
            outcome = outcome_of(fleet, model_dir)
        finally:
            stop.set()
            watcher.join(5)
        assert outcome["status"] == "failed" and "no space left" in str(outcome["error"]), outcome
        frsize = os.statvfs(small).f_frsize
        assert (free_before - lowest[0]) * frsize < 4 << 20, "the copy ate into the free space before failing"


# --- owners without an account ------------------------------------------------------------------------------------
def _uid_without_account() -> int:
    uid = 61000
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def test_a_run_of_a_uid_with_no_account_is_forked_as_that_bare_uid(fleet: Fleet, art: Path) -> None:
    """Files from another host, or a user removed: the uid owns the run all the same. The fork runs as that uid with
    the run dir's group and no supplementary groups (nothing of root's), and ends with an outcome like any other."""
    uid = _uid_without_account()
    gid = uid  # no such group either
    nobody = User(f"uid{uid}", uid, gid)
    model_dir = make_owned_run(art, "px", "m", nobody, steps=(3,))
    # A checkpoint only root's group may read: readable to a fork that kept any of root's groups.
    closed = make_owned_run(art, "pr", "r", User("root", 0, 0), steps=(4,))
    for p in (closed / "checkpoints" / "0004").rglob("*"):
        p.chmod(0o640)
    fleet.start(0)
    (model_dir / ".fork").write_text("step: 3\n")  # root may write any run's marker
    outcome = outcome_of(fleet, model_dir)
    assert outcome["status"] == "done", (outcome, fleet.daemons[0].log())
    served = model_dir / "checkpoints" / "0000"
    assert tree_digest(served) == tree_digest(model_dir / "checkpoints" / "0003")
    assert {(p.stat().st_uid, p.stat().st_gid) for p in [served, *served.rglob("*")]} == {(uid, gid)}
    done = (model_dir / ".fork.done").stat()
    assert (done.st_uid, done.st_gid) == (uid, gid)

    (model_dir / ".fork.done").unlink()
    (model_dir / ".fork").write_text(f"source: {closed / 'checkpoints' / '0004'}\n")
    outcome = outcome_of(fleet, model_dir)
    assert outcome["status"] == "failed" and "Permission denied" in str(outcome["error"]), outcome


# --- the owner worker: alice may signal it (its real uid is hers); nothing she does to it may stall the daemon ---


def _worker_for(model_dir: Path, timeout: float) -> OwnerRunIO:
    opened = open_run(RunDir(model_dir.parents[2], model_dir.parts[-3], model_dir.name))
    io = OwnerRunIO(opened.run, opened.fd, owner_of(opened.uid, opened.gid), timeout)
    os.close(opened.fd)  # the worker has its own copy
    return io


def _stop_as(user: User, pid: int) -> None:
    done = user.run(f"kill -STOP {pid}")
    assert done.returncode == 0, done.stderr


def test_alice_stopping_her_worker_never_blocks_the_heartbeat_loop(alices: Path, alice: User) -> None:
    """A heartbeat carries the claim's marker (up to 64 KiB): one fills the pipe of a worker she stopped, and a
    blocking write there held the daemon's main loop (no watchdog pings: systemd killed the daemon after 30 s)."""
    io = _worker_for(alices, timeout=3.0)
    try:
        assert io.served_digest() is not None  # the worker is up and answering as alice
        _stop_as(alice, io._proc.pid)
        info = {"fork_id": "x", "marker": "a" * 65536, "heartbeat_at": 0.0}
        returned = threading.Event()

        def beat() -> None:
            for _ in range(3):  # three rounds of the main loop
                io.heartbeat(info)
            returned.set()

        threading.Thread(target=beat, daemon=True).start()
        assert returned.wait(5.0), "a heartbeat to alice's stopped worker blocked the daemon's main loop"
        # Her own fork's next step fails with the timeout sentence, in bounded time, and kills the worker.
        started = time.monotonic()
        with pytest.raises(RunIOError, match="did not finish within 3s"):
            io.served_digest()
        assert time.monotonic() - started < 10.0
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed already by the timeout, as it should be
            os.kill(io._proc.pid, signal.SIGKILL)
        io.close()


# --- the claim record alice writes is read by root: its fork id must not become a root existence oracle --------------
def test_a_claim_alice_writes_tells_her_nothing_about_root_only_files(
    fleet: Fleet, base: Path, art: Path, alice: User, bob: User
) -> None:
    """The daemon looked up a claim's `fork_id` in its journal as `{forks_dir}/{fork_id}.json`, as root: with
    `../../…/bobhome/keys` alice learned whether bob's 0700 `keys.json` exists (an orphan claim is adopted, or
    left alone as if journaled). Both claims below must be treated alike: adopted."""
    home = base / "bobhome"
    home.mkdir()
    (home / "keys.json").write_text("{}\n")
    chown_tree(home, bob)
    home.chmod(0o700)
    climb = "/".join([".."] * len(fleet.state_dir(0).resolve().parts))
    runs = {}
    for name, target in [("present", home / "keys"), ("absent", home / "no-such-keys")]:
        model_dir = make_owned_run(art, "pa", name, alice, steps=(1,))
        claim = {
            "fork_id": f"{climb}{target}",
            "claimed_by": {"host": "another-node", "pid": 4242, "state_dir": "/var/lib/fork-sidecar"},
            "heartbeat_at": time.time() - 3600,
            "request": {"kind": "step", "step": 1},
            "marker": "step: 1\n",
        }
        done = alice.run(f"printf '%s' '{json.dumps(claim)}' > '{model_dir / '.fork.inprogress'}'")
        assert done.returncode == 0, done.stderr
        runs[name] = model_dir
    fleet.start(0)
    outcomes = {name: outcome_of(fleet, model_dir, timeout=30)["status"] for name, model_dir in runs.items()}
    assert outcomes == {"present": "done", "absent": "done"}, (outcomes, fleet.daemons[0].log())


def test_a_heartbeat_after_the_fork_ended_never_writes_into_a_reused_descriptor(
    base: Path, alices: Path, alice: User
) -> None:
    """The main loop may post a heartbeat to a claim whose fork has just closed its worker; the pipe's number may by
    then be another file's (written by hand, not through the closed file object)."""
    io = _worker_for(alices, timeout=3.0)
    stdin_fd = io._stdin_fd
    io.close()
    other = base / "reused"
    fd = os.open(other, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if fd != stdin_fd:
            os.dup2(fd, stdin_fd)  # the number taken by the next open, as in a busy daemon
        io.heartbeat({"fork_id": "x", "heartbeat_at": 0.0})
    finally:
        os.close(fd)
        if fd != stdin_fd:
            os.close(stdin_fd)
    assert other.read_bytes() == b""


# --- a worker that outlives timeouts.swap is killed: the fork still ends, written by a fresh worker as the owner -----
def _workers_of(user: User) -> list[int]:
    """Pids of the owner workers now running as `user` (after their drop from root)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            mine = entry.name.isdigit() and entry.stat().st_uid == user.uid
            if mine and b"sidecar.owner_worker" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _stall_the_fork(gate: Path, alice: User) -> None:
    """While the fork is held after its claim (hold_env), alice stops her worker, as she may; then it goes on to its
    staging copy, a call into the stopped worker. Not a race with a big copy that a fast host finishes first."""
    wait_for(held_at(gate).exists, 30, "the fork held after its claim")
    pids = wait_for(lambda: _workers_of(alice), 30, "alice's worker")
    for pid in pids:
        _stop_as(alice, pid)
    gate.touch()


@pytest.mark.parametrize("outcome_writable", [True, False], ids=["outcome-written", "outcome-unwritable"])
def test_a_worker_stopped_past_the_swap_timeout_still_ends_the_fork_as_failed(
    base: Path, art: Path, alice: User, outcome_writable: bool
) -> None:
    """The killed worker was also the one asked to clean up and write `.fork.failed`: every later call died with it,
    so the fork ended with no outcome, its claim left behind. A fresh worker (as alice, under the same limit) must
    write the timeout sentence; where even that fails, the journal still ends the fork as failed, the daemon says
    where the outcome could not go, and the claim left behind is never forked again."""
    model_dir = art / "pa" / "models" / "m"
    write_adapter(model_dir / "checkpoints" / "0000", seed=0)
    write_adapter(model_dir / "checkpoints" / "0001", seed=1)
    chown_tree(art / "pa", alice)
    served = tree_digest(model_dir / "checkpoints" / "0000")
    state = base / "daemon"
    state.mkdir(mode=0o700)
    overrides = {"log": {"level": "info"}, "timeouts": {"swap": "2s", "orphan_claim": "1s", "claim_lease": "1s"}}
    with Fleet(state, [art], overrides=overrides) as fleet:
        gate = base / "claimed-gate"
        fleet.start(0, env=hold_env("claimed", gate))
        write_marker_as(alice, model_dir, "step: 1")
        _stall_the_fork(gate, alice)
        if not outcome_writable:
            assert alice.run(f"chmod 0555 '{model_dir}'").returncode == 0
        history = fleet.state_dir(0) / "history.jsonl"
        try:
            wait_for(lambda: history.exists() and history.read_text().strip(), 30, "the fork's end in the history")
        except AssertionError as e:
            files = sorted(p.name for p in [*model_dir.iterdir(), *(model_dir / "checkpoints").iterdir()])
            raise AssertionError(f"{e}; the run holds {files}; the daemon logged:\n{fleet.daemons[0].log()}") from None
        ended = [json.loads(line) for line in history.read_text().splitlines()]
        assert [e["state"] for e in ended] == ["failed"], ended
        assert "timeouts.swap" in ended[0]["error"] and "did not finish within 2s" in ended[0]["error"], ended
        leftovers = sorted(p.name for p in (model_dir / "checkpoints").iterdir())
        assert leftovers == ["0000", "0001"], leftovers  # the fresh worker dropped the staged copy
        assert tree_digest(model_dir / "checkpoints" / "0000") == served
        log = fleet.daemons[0].log()
        if outcome_writable:
            outcome = wait_outcome(model_dir, 10)
            assert outcome["status"] == "failed" and outcome["error"] == ended[0]["error"], outcome
            assert (model_dir / ".fork.failed").stat().st_uid == alice.uid  # written as alice, not as root
            assert not (model_dir / ".fork.inprogress").exists() and not (model_dir / ".fork").exists()
        else:
            assert not (model_dir / ".fork.failed").exists()
            assert f"the outcome could not be written to {model_dir}/.fork.failed" in log, log
            # The claim it could not remove outlives its lease: it must not be adopted and forked a second time.
            time.sleep(3.0)
            assert alice.run(f"chmod 0755 '{model_dir}'").returncode == 0
            fleet.daemons[0].stop()
            fleet.start(0)
            time.sleep(3.0)
            assert "adopting" not in fleet.daemons[-1].log(), fleet.daemons[-1].log()
            assert [json.loads(line)["state"] for line in history.read_text().splitlines()] == ["failed"]
            assert not (model_dir / ".fork.done").exists()
