"""Agents and vLLM servers are bound to run owners (issue 18, item 3), with real users, processes and sockets.

bob owns a run; alice, another unprivileged user on the same node, attacks it the way issue 18 describes: an
impostor agent claiming bob's run, names squatted for bob's future agents, a listener on the port of bob's vLLM that
is still loading (to take its key), and a fake vLLM of her own claiming bob's run. The daemon runs as root, as under
systemd. The runtime dir starts as the old unit made it (1777, world-writable and sticky) where an attack needs one,
so each attack can be tried for real; the daemon must be safe with it anyway.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.adapter import adapter_digest
from sidecar.agent_dirs import ensure_user_dir
from sidecar.config import load_config
from sidecar.fsops import exchange_dirs
from sidecar.stages import ForkContext
from sidecar.trainers import TrainerStage
from tests.reliability.support import Fleet, fifo_writer, make_run, write_marker_atomically
from tests.reliability.tenants import (
    SYSTEM_PYTHON,
    Tenant,
    install_scripts,
    logged_requests,
    shared_base,
    stop,
    tenants,
)
from tests.support.daemon import DaemonProcess, read_outcome, wait_for, wait_outcome, write_config
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(150)

__all__ = ["shared_base", "tenants"]  # fixtures, imported for pytest

KEY = "sk-bob-7d1e93a0c4"


@dataclass
class World:
    base: Path
    alice: Tenant
    bob: Tenant
    model_dir: Path  # bob's run
    bin: Path  # the tenant scripts

    @property
    def runtime_dir(self) -> Path:
        return self.base / "run0"  # the Fleet's daemon 0 uses it

    def file_for(self, tenant: Tenant, name: str) -> Path:
        path = self.base / name
        path.touch()
        os.chown(path, tenant.uid, tenant.gid)
        return path

    def agent_socket_of(self, pid: int) -> Path | None:
        for p in self.runtime_dir.rglob(f"agent-{pid}.sock"):
            if stat.S_ISSOCK(p.lstat().st_mode):
                return p
        return None

    def start_trainer(self, tenant: Tenant, runtime_dir: Path | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.file_for(tenant, f"{tenant.name}-trainer.jsonl")
        env = {"FORK_SIDECAR_RUNTIME_DIR": str(runtime_dir or self.runtime_dir)}
        out = self.base / f"{tenant.name}-trainer.out"
        proc = tenant.python(self.bin / "stub_trainer.py", str(self.model_dir), str(log), env=env, log=out)
        wait_for(lambda: "registered" in out.read_text() or proc.poll() is not None, 20, "the trainer to register")
        assert proc.poll() is None, out.read_text()
        return proc, log


@pytest.fixture
def world(tenants: dict[str, Tenant], shared_base: Path) -> World:
    art = shared_base / "art"
    model_dir = make_run(art, project="pb", steps=(3,))
    bob = tenants["bob"]
    bob.chown(art / "pb")
    return World(shared_base, tenants["alice"], bob, model_dir, install_scripts(shared_base))


def shared_runtime_dir(path: Path) -> Path:
    """The runtime dir as the old unit made it: world-writable and sticky (RuntimeDirectoryMode=1777)."""
    path.mkdir()
    path.chmod(0o1777)
    return path


def fork(model_dir: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Write a marker and return the outcome of the fork it starts (not the previous fork's)."""
    before = (read_outcome(model_dir) or {}).get("fork_id")
    write_marker_atomically(model_dir, "step: 3\n")

    def new_outcome() -> dict[str, Any] | None:
        outcome = wait_outcome(model_dir, timeout)
        return outcome if outcome.get("fork_id") != before else None

    result: dict[str, Any] = wait_for(new_outcome, timeout, f"a new outcome in {model_dir}")
    return result


def agent_pids(outcome: dict[str, Any]) -> list[int]:
    return [a.get("pid") for a in outcome.get("trainers", {}).get("agents", [])]


def fleet_for(world: World, **overrides: Any) -> Fleet:
    return Fleet(world.base, [world.base / "art"], overrides={"log": {"level": "info"}, **overrides})


# --- agents --------------------------------------------------------------------------------------------------------
def test_an_impostor_agent_is_never_told_about_another_users_run(world: World) -> None:
    rt = shared_runtime_dir(world.runtime_dir)
    alice_log = world.file_for(world.alice, "alice-agent.jsonl")
    out = world.base / "alice-agent.out"
    # She claims bob's run from every place she can write, including a directory named for bob's uid.
    impostor = world.alice.python(
        world.bin / "fake_agent.py", str(rt), str(world.model_dir), str(alice_log), str(world.bob.uid), log=out
    )
    bob_trainer = None
    try:
        wait_for(lambda: "bound" in out.read_text(), 20, "alice's impostor to bind")
        with fleet_for(world, trainer={"required": True, "agent_timeout": "5s"}) as fleet:
            fleet.start(0)
            outcome = fork(world.model_dir)
            # trainer.required and no trainer of bob's: the fork must fail, not end done listing alice's pid.
            assert outcome["status"] == "failed", outcome
            assert impostor.pid not in agent_pids(outcome), outcome
            assert [r for r in logged_requests(alice_log) if r.get("op") == "fork"] == []

            # A real trainer of bob's is told, and still only he is.
            bob_trainer, bob_log = world.start_trainer(world.bob)
            wait_for(lambda: world.agent_socket_of(bob_trainer.pid), 20, "bob's agent socket")
            outcome = fork(world.model_dir)
            assert outcome["status"] == "done", outcome
            assert agent_pids(outcome) == [bob_trainer.pid], outcome
            assert [r["fork_id"] for r in logged_requests(bob_log)] == [outcome["fork_id"]]
        # Alice's process never received bob's fork id, digest or paths.
        seen = json.dumps(logged_requests(alice_log))
        assert outcome["fork_id"] not in seen and str(world.model_dir / "checkpoints") not in seen, seen
        assert [r for r in logged_requests(alice_log) if r.get("op") == "fork"] == []
    finally:
        stop(impostor, *([bob_trainer] if bob_trainer else []))


def test_squatted_socket_names_do_not_stop_another_users_agent(world: World) -> None:
    rt = shared_runtime_dir(world.runtime_dir)
    # Regular files named for the next 3000 pids, in the runtime dir and in a directory named for bob's uid.
    squat = subprocess.run(
        [SYSTEM_PYTHON, str(world.bin / "squat.py"), str(rt), "3000", str(world.bob.uid)],
        user=world.alice.uid,
        group=world.alice.gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(squat.stdout).get(str(rt)) == 3000, squat.stdout
    with fleet_for(world) as fleet:
        fleet.start(0)
        bob_trainer, _ = world.start_trainer(world.bob)
        try:
            socket_path = wait_for(lambda: world.agent_socket_of(bob_trainer.pid), 20, "bob's agent socket")
            st = socket_path.parent.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (world.bob.uid, 0o700), socket_path
            outcome = fork(world.model_dir)
            assert outcome["status"] == "done" and agent_pids(outcome) == [bob_trainer.pid], outcome
        finally:
            stop(bob_trainer)


def test_the_daemon_creates_the_runtime_dir_and_each_run_owners_directory(world: World) -> None:
    rt = world.runtime_dir
    assert not rt.exists()
    with fleet_for(world) as fleet:
        fleet.start(0)
        st = rt.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)  # issue 12 item 7
        bob_dir = wait_for(lambda: (rt / str(world.bob.uid)).is_dir() and rt / str(world.bob.uid), 15, "bob's dir")
        st = bob_dir.lstat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (world.bob.uid, 0o700)
        # A run of alice's that appears while the daemon runs gets her directory too (she creates it, as ART would).
        alice_run = world.base / "art" / "pa" / "models" / "m"
        alice_run.parent.parent.mkdir()
        world.alice.chown(alice_run.parent.parent)  # her project directory
        subprocess.run(["mkdir", "-p", str(alice_run)], user=world.alice.uid, group=world.alice.gid, check=True)
        alice_dir = rt / str(world.alice.uid)
        wait_for(lambda: alice_dir.is_dir(), 15, "alice's dir after her run appeared")
        assert alice_dir.lstat().st_uid == world.alice.uid and alice_run.is_dir()


def test_a_missing_runtime_dir_under_a_world_writable_parent_is_left_to_the_daemon(world: World) -> None:
    parent = world.base / "shared"
    parent.mkdir()
    parent.chmod(0o1777)
    rt = parent / "fork-sidecar"
    bob_trainer, _ = world.start_trainer(world.bob, runtime_dir=rt)
    try:
        out = (world.base / "bob-trainer.out").read_text()
        time.sleep(1.0)  # the agent has tried its socket by now (it registered); nothing may have been created
        assert not rt.exists(), f"a trainer created {rt}: {out}"
        config = write_config(world.base / "config.yaml", [world.base / "art"], world.base / "state", rt)
        with DaemonProcess(config, world.base / "daemon.log"):
            st = rt.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
            found = wait_for(lambda: next(rt.rglob(f"agent-{bob_trainer.pid}.sock"), None), 20, "bob's agent socket")
            assert found.parent == rt / str(world.bob.uid) and found.parent.lstat().st_uid == world.bob.uid
            status = subprocess.run(
                [sys.executable, "-m", "sidecar", "status", "--json", "--config", str(config)],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parents[2],
            )
            agents = json.loads(status.stdout)["agents"]
            assert [(a["pid"], a.get("error")) for a in agents] == [(bob_trainer.pid, None)], agents
    finally:
        stop(bob_trainer)


# --- vLLM ----------------------------------------------------------------------------------------------------------
def vllm_serve(world: World, tenant: Tenant, port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    argv = [SYSTEM_PYTHON, str(world.bin / "vllm"), "serve", "base", "--port", str(port)]
    argv += ["--lora-modules", f"m@0={world.model_dir}/checkpoints/0000"]
    return tenant.popen(argv, env={"FAKE_LOG": str(log), **env}, log=log.with_suffix(".out"))


def listening(out: Path) -> bool:
    return out.exists() and "listening" in out.read_text()


def test_a_discovered_servers_key_goes_only_to_that_servers_own_listener(world: World) -> None:
    port = free_port()
    go = world.base / "go"
    bob_log, alice_log = world.file_for(world.bob, "bob-vllm.jsonl"), world.file_for(world.alice, "alice-ear.jsonl")
    # bob's server is still loading its model: running, its key in its environment, nothing listening yet ...
    bob_server = vllm_serve(world, world.bob, port, bob_log, VLLM_API_KEY=KEY, FAKE_LISTEN_AFTER=str(go))
    # ... and alice listens on its port.
    ear = world.alice.popen(
        [SYSTEM_PYTHON, str(world.bin / "vllm"), "listen", "--port", str(port)],
        env={"FAKE_LOG": str(alice_log)},
        log=alice_log.with_suffix(".out"),
    )
    try:
        wait_for(lambda: listening(alice_log.with_suffix(".out")), 20, "alice's listener")
        with fleet_for(world, vllm={"discover": True, "request_timeout": "2s"}) as fleet:
            fleet.start(0)
            outcome = fork(world.model_dir)
            heard = [r.get("authorization") for r in logged_requests(alice_log)]
            assert not any(KEY in (h or "") for h in heard), heard
            assert heard == [], heard  # nothing at all is sent to a listener that is not bob's server
            assert outcome["vllm"]["status"] == "failed", outcome
            assert f"pid {bob_server.pid}" in outcome["vllm"]["error"], outcome["vllm"]

            # Once bob's own server listens there, it gets its key and the fork.
            stop(ear)
            go.touch()
            wait_for(lambda: listening(bob_log.with_suffix(".out")), 20, "bob's server")
            outcome = fork(world.model_dir)
            assert outcome["vllm"]["status"] == "ok", outcome["vllm"]["error"]
            assert f"Bearer {KEY}" in {r.get("authorization") for r in logged_requests(bob_log)}
    finally:
        stop(bob_server, ear)


def test_a_fake_server_of_another_user_cannot_claim_a_run(world: World) -> None:
    port = free_port()
    alice_log = world.file_for(world.alice, "alice-vllm.jsonl")
    fake = vllm_serve(world, world.alice, port, alice_log)  # claims bob's checkpoints/0000 in its --lora-modules
    try:
        wait_for(lambda: listening(alice_log.with_suffix(".out")), 20, "alice's fake server")
        with fleet_for(world, vllm={"discover": True, "request_timeout": "2s"}) as fleet:
            fleet.start(0)
            outcome = fork(world.model_dir)
        assert outcome["vllm"]["status"] != "ok", outcome["vllm"]
        assert f"127.0.0.1:{port}" not in json.dumps(outcome["vllm"]), outcome["vllm"]
        assert logged_requests(alice_log) == []
    finally:
        stop(fake)


def test_a_root_a_server_of_alices_reports_is_never_resolved_as_root_for_her(world: World) -> None:
    """alice's own fake server is trusted for her own run; after the reload it lists her adapter with the root
    `/proc/<bob's pid>/cwd`. The daemon resolved that as root and wrote the result into alice's outcome ("lists m
    with root /home/bob/plans-2027 ..."): bob's working directory, which alice cannot read."""
    home = world.base / "bobhome"
    (home / "plans-2027").mkdir(parents=True)
    world.bob.chown(home, home / "plans-2027")
    home.chmod(0o700)
    sleeper = subprocess.Popen(["/bin/sleep", "120"], cwd=home / "plans-2027", user=world.bob.uid, group=world.bob.gid)
    alices = make_run(world.base / "art", project="pa", steps=(3,))
    world.alice.chown(world.base / "art" / "pa")
    port = free_port()
    alice_log = world.file_for(world.alice, "alice-own-vllm.jsonl")
    argv = [SYSTEM_PYTHON, str(world.bin / "vllm"), "serve", "base", "--port", str(port)]
    argv += ["--lora-modules", f"m@0={alices}/checkpoints/0000"]
    fake = world.alice.popen(
        argv,
        env={"FAKE_LOG": str(alice_log), "FAKE_ROOT": f"/proc/{sleeper.pid}/cwd"},
        log=alice_log.with_suffix(".out"),
    )
    try:
        wait_for(lambda: listening(alice_log.with_suffix(".out")), 20, "alice's fake server")
        with fleet_for(world, vllm={"discover": True, "request_timeout": "2s"}) as fleet:
            fleet.start(0)
            outcome = fork(alices)
        assert outcome["vllm"]["status"] == "failed", outcome["vllm"]  # her server did not load the fork
        assert "plans-2027" not in json.dumps(outcome), outcome["vllm"]
    finally:
        stop(fake)
        sleeper.kill()
        sleeper.wait()


def _alices_run_beside_bobs_symlink(world: World) -> tuple[Path, Path]:
    """alice's run `pa/m` in a models directory she shares (0777), where bob made `m.evil`, a symlink to his run."""
    art = world.base / "art"
    alices = make_run(art, project="pa", steps=(3,))
    world.alice.chown(art / "pa")
    models = alices.parent
    models.chmod(0o777)
    made = subprocess.run(
        ["ln", "-s", str(world.model_dir), str(models / "m.evil")], user=world.bob.uid, group=world.bob.gid, check=False
    )
    assert made.returncode == 0 and (models / "m.evil").lstat().st_uid == world.bob.uid
    return alices, models


def test_a_run_swapped_during_the_vllm_stage_is_still_the_forks_own(world: World) -> None:
    """The vLLM stage must take the run's owner, its checkpoints and where it writes from the directory the fork
    holds, not from the path looked at again: alice exchanges her run with a symlink bob made to his own run, in
    the models directory she shares (0777), while the stage runs (after the pipeline's last check). An operator's
    server whose key file is a FIFO holds the stage there, so the window is the same every time."""
    alices, models = _alices_run_beside_bobs_symlink(world)
    bobs_checkpoints = sorted(os.listdir(world.model_dir / "checkpoints"))
    fifo = world.base / "key.fifo"
    os.mkfifo(fifo)
    port = free_port()
    bob_log = world.file_for(world.bob, "bob-vllm.jsonl")
    bob_server = vllm_serve(world, world.bob, port, bob_log)  # serves bob's own checkpoints/0000
    servers = [{"url": f"http://127.0.0.1:{free_port()}", "api_key_file": str(fifo), "runs": ["pa/m"]}]
    try:
        wait_for(lambda: listening(bob_log.with_suffix(".out")), 20, "bob's server")
        with fleet_for(world, vllm={"discover": True, "request_timeout": "2s", "servers": servers}) as fleet:
            fleet.start(0)
            write_marker_atomically(alices, "step: 3\n")
            writer = wait_for(lambda: fifo_writer(fifo), 60, "the vLLM stage to read its key file")
            try:
                models_fd = os.open(models, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    exchange_dirs(models_fd, "m", "m.evil")  # pa/models/m is now bob's symlink to his run
                finally:
                    os.close(models_fd)
                os.write(writer, b"sk-operator\n")
            finally:
                os.close(writer)
            outcome = wait_outcome(models / "m.evil", 60)
        # Nothing was written into bob's run, and his server heard nothing of alice's fork.
        assert sorted(os.listdir(world.model_dir / "checkpoints")) == bobs_checkpoints, outcome["vllm"]
        assert logged_requests(bob_log) == [], outcome["vllm"]
        assert f"127.0.0.1:{port}" not in json.dumps(outcome["vllm"]), outcome["vllm"]
    finally:
        stop(bob_server)


def test_the_trainers_stage_tells_the_owner_of_the_directory_the_fork_holds(world: World) -> None:
    """The trainers stage as the pipeline runs it, with the owner of the directory the fork opened: alice's run path
    names a symlink bob made to his own run by then (swapped in after the pipeline's check, as above). Taken from the
    path, the owner would be bob and the run his, so bob's trainer would be told to load alice's fork."""
    alices, models = _alices_run_beside_bobs_symlink(world)
    rt = world.runtime_dir
    rt.mkdir(mode=0o755)
    for tenant in (world.alice, world.bob):
        ensure_user_dir(rt, tenant.uid)  # what the daemon does for each run owner
    bob_trainer, bob_log = world.start_trainer(world.bob)
    alice_log = world.file_for(world.alice, "alice-trainer.jsonl")
    out = world.base / "alice-trainer.out"
    env = {"FORK_SIDECAR_RUNTIME_DIR": str(rt)}
    alice_trainer = world.alice.python(world.bin / "stub_trainer.py", str(alices), str(alice_log), env=env, log=out)
    try:
        wait_for(lambda: "registered" in out.read_text() or alice_trainer.poll() is not None, 20, "alice's trainer")
        held = os.stat(alices, follow_symlinks=False)  # what the fork opened and holds
        models_fd = os.open(models, os.O_RDONLY | os.O_DIRECTORY)
        try:
            exchange_dirs(models_fd, "m", "m.evil")
        finally:
            os.close(models_fd)
        source = models / "m.evil" / "checkpoints" / "0003"
        ctx = ForkContext(
            "20261201T000000Z-abcdef",
            alices,
            source,
            adapter_digest(source),
            time.monotonic() + 30,
            owner_uid=held.st_uid,
            run_id=(held.st_dev, held.st_ino),
        )
        outcome = TrainerStage(dataclasses.replace(load_config(None), runtime_dir=rt)).run(ctx)
        # Only alice's agent is asked (it refuses: the path it is given now resolves into bob's run, which it does
        # not train), and bob's trainer hears nothing of her fork.
        assert [a["pid"] for a in outcome.detail["agents"]] == [alice_trainer.pid], outcome
        assert [r for r in logged_requests(bob_log) if r.get("op") == "fork"] == []
        assert logged_requests(alice_log) == []
    finally:
        stop(bob_trainer, alice_trainer)
