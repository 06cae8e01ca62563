"""The real etcd the coordination tests run against (tests/support/etcd_server.py): each fault it offers does to the
server what it says, and a missing binary skips with the install command, or fails under `make test`."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest

from tests.support.etcd_server import EtcdCallError, EtcdServer, EtcdServerError, etcd_binary, start_etcd
from tests.support.ports import free_port


def test_a_key_survives_sigkill_and_restart_on_the_same_ports(etcd_server: EtcdServer) -> None:
    etcd_server.put("/fork-sidecar/k", "v1")
    url, pid = etcd_server.url, etcd_server.pid

    etcd_server.kill()
    assert not etcd_server.alive()
    with pytest.raises(OSError):
        etcd_server.get("/fork-sidecar/k")

    etcd_server.restart()
    assert (etcd_server.url, etcd_server.endpoints) == (url, [url])
    assert etcd_server.pid != pid
    assert etcd_server.get("/fork-sidecar/k") == "v1"
    etcd_server.put("/fork-sidecar/l", "v2")
    etcd_server.put("/fork-sidecar-other/k", "v3")
    assert etcd_server.keys("/fork-sidecar/") == ["/fork-sidecar/k", "/fork-sidecar/l"]


def test_a_frozen_server_answers_nothing_until_thawed(etcd_server: EtcdServer) -> None:
    etcd_server.put("/fork-sidecar/k", "v1")
    etcd_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            etcd_server.get("/fork-sidecar/k")
        assert time.monotonic() - started >= 4.0  # the call's own timeout, not a refused connection
        assert etcd_server.alive()
    finally:
        etcd_server.thaw()
    etcd_server.wait_healthy(10)
    assert etcd_server.get("/fork-sidecar/k") == "v1"


def test_a_frozen_server_can_be_killed_and_restarted(etcd_server: EtcdServer) -> None:
    etcd_server.put("/fork-sidecar/k", "v1")
    etcd_server.freeze()
    etcd_server.restart()
    assert etcd_server.get("/fork-sidecar/k") == "v1"


def test_enable_auth_gives_a_user_its_prefix_and_nothing_else(etcd_server: EtcdServer) -> None:
    etcd_server.put("/fork-sidecar/k", "before auth")
    auth = etcd_server.enable_auth(user="daemon", password="pw-1", prefix="/fork-sidecar")

    assert auth.password_file.read_text().strip() == "pw-1"
    assert stat.S_IMODE(auth.password_file.stat().st_mode) == 0o600
    with pytest.raises(EtcdCallError, match="user name is empty") as no_token:
        etcd_server.get("/fork-sidecar/k", auth=None)
    assert no_token.value.status == 400
    with pytest.raises(EtcdCallError, match="authentication failed"):
        etcd_server.token("daemon", "wrong")

    token = etcd_server.token("daemon", "pw-1")
    assert etcd_server.get("/fork-sidecar/k", auth=token) == "before auth"
    etcd_server.put("/fork-sidecar/runs/a", "x", auth=token)
    with pytest.raises(EtcdCallError, match="permission denied") as outside:
        etcd_server.put("/other/k", "x", auth=token)
    assert outside.value.status == 403
    # Root (the helper's default) still reaches everything, and auth stays on across a restart.
    etcd_server.put("/other/k", "by root")
    etcd_server.restart()
    with pytest.raises(EtcdCallError, match="user name is empty"):
        etcd_server.get("/other/k", auth=None)
    assert etcd_server.get("/other/k") == "by root"


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EtcdServer(etcd_binary(), tmp_path / "d.etcd", tmp_path / "d.log", taken.getsockname()[1], free_port())
        with pytest.raises(EtcdServerError, match="address already in use"):
            server.start(timeout=20)
    assert not server.alive()


def test_two_servers_get_distinct_ports_and_data(tmp_path: Path) -> None:
    a = start_etcd(tmp_path / "a")
    try:
        b = start_etcd(tmp_path / "b")
        try:
            assert {a.client_port, a.peer_port}.isdisjoint({b.client_port, b.peer_port})
            a.put("/k", "a")
            assert b.get("/k") is None
        finally:
            b.stop()
    finally:
        a.stop()


@pytest.mark.parametrize("required", [False, True])
def test_without_etcd_it_skips_with_the_install_command_or_fails_when_required(
    required: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a real PATH without etcd on it
    monkeypatch.delenv("FORK_SIDECAR_ETCD", raising=False)
    monkeypatch.setenv("FORK_SIDECAR_REQUIRE_ETCD", "1" if required else "0")
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome, match=r"apt-get install etcd-server"):
        etcd_binary()


def test_fork_sidecar_etcd_names_the_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = etcd_binary()
    link = tmp_path / "my-etcd"
    os.symlink(real, link)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("FORK_SIDECAR_ETCD", str(link))
    assert etcd_binary() == link
