"""The control-socket protocol with real Unix sockets: framing, limits, errors, permissions and peer checks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from sidecar.protocol.client import ControlError, call_agent
from sidecar.protocol.framing import MAX_MESSAGE_BYTES, ProtocolError, encode_message
from sidecar.protocol.messages import ForkRequest, HelloRequest, Request, StatusRequest, parse_request
from sidecar.protocol.paths import agent_socket_path, pid_of_socket, uid_of_agent_dir
from sidecar.protocol.peercred import PeerCred, peer_credentials, process_uid
from sidecar.protocol.server import AgentDirPending, ControlServer, ensure_private_dir

REPO = Path(__file__).resolve().parents[1]
# The system interpreter: the dev venv's python lives under /root, which `nobody` cannot enter.
SYSTEM_PYTHON = "/usr/bin/python3.11"
NOBODY = 65534


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    # Short on purpose: a Unix socket path must fit in 107 bytes, pytest's tmp_path often does not.
    path = Path(tempfile.mkdtemp(prefix="fs-ctl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def echo_handler(request: Request, peer: PeerCred) -> Mapping[str, Any]:
    if isinstance(request, ForkRequest):
        return {"ok": True, "op": "fork", "fork_id": request.fork_id, "timeout": request.timeout}
    return {"ok": True, "op": request.op, "peer_pid": peer.pid, "peer_uid": peer.uid}


@pytest.fixture
def server(runtime_dir: Path) -> Iterator[ControlServer]:
    srv = ControlServer(agent_socket_path(runtime_dir, os.geteuid(), os.getpid()), echo_handler)
    srv.start()
    yield srv
    srv.close(wait=True)


def raw_exchange(path: Path, data: bytes, *, shutdown: bool = True) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply


# --- names and parsing (pure) -------------------------------------------------------------------------------------
def test_socket_names_round_trip() -> None:
    path = agent_socket_path(Path("/run/fork-sidecar"), 1001, 1234)
    assert path == Path("/run/fork-sidecar/1001/agent-1234.sock")
    assert pid_of_socket(path) == 1234 and uid_of_agent_dir(path.parent) == 1001
    assert uid_of_agent_dir(Path("/run/fork-sidecar/0")) == 0
    for other in ("agent-.sock", "agent-01.sock", "agent-12.sock.tmp", "daemon.sock", "agent-x1.sock"):
        assert pid_of_socket(Path(other)) is None
    for other in ("", "01", "-1", "x1", ".agent-1"):
        assert uid_of_agent_dir(Path("/run") / other) is None


def test_parse_requests() -> None:
    assert isinstance(parse_request({"op": "hello"}), HelloRequest)
    assert isinstance(parse_request({"op": "status", "v": 1}), StatusRequest)
    fork = ForkRequest("f1", "/a/run", "/a/run/checkpoints/0000", "sha256:" + "0" * 64, 12.5)
    assert parse_request(fork.to_message()) == fork
    assert "not_after" not in fork.to_message()  # an older agent gets the message it knows
    late = ForkRequest("f2", "/a/run", "/a/run/checkpoints/0000", None, 12.5, not_after=1000.0)
    assert parse_request(late.to_message()) == late


def test_a_fork_request_waits_at_most_until_its_daemon_gives_up() -> None:
    fork = ForkRequest("f1", "/r", "/r/checkpoints/0000", None, 6.0, not_after=1000.0)
    assert fork.wait_s(now=990.0) == 6.0
    assert fork.wait_s(now=997.5) == 2.5
    assert fork.wait_s(now=1001.0) < 0  # read after the daemon gave up: never waited for, never loaded
    assert ForkRequest("f1", "/r", "/r/checkpoints/0000", None, 6.0).wait_s(now=1e12) == 6.0


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"op": "reboot"}, "unknown_op"),
        ({}, "unknown_op"),
        ({"op": "fork", "run_dir": "/r", "checkpoint_dir": "/r/c"}, "bad_request"),
        ({"op": "fork", "fork_id": "f", "run_dir": "rel/run", "checkpoint_dir": "/r/c"}, "bad_request"),
        ({"op": "fork", "fork_id": "f", "run_dir": "/r", "checkpoint_dir": "/r/c", "timeout": -1}, "bad_request"),
        ({"op": "fork", "fork_id": "f", "run_dir": "/r", "checkpoint_dir": "/r/c", "timeout": True}, "bad_request"),
        ({"op": "fork", "fork_id": "f", "run_dir": "/r", "checkpoint_dir": "/r/c", "digest": 5}, "bad_request"),
        ({"op": "fork", "fork_id": "f", "run_dir": "/r\0x", "checkpoint_dir": "/r/c"}, "bad_request"),
        ({"op": "fork", "fork_id": "f", "run_dir": "/r", "checkpoint_dir": "/r/c", "not_after": "soon"}, "bad_request"),
    ],
)
def test_bad_requests_are_refused_with_a_code(message: dict[str, Any], code: str) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_request(message)
    assert e.value.code == code


def test_encode_refuses_oversize_and_non_json() -> None:
    with pytest.raises(ProtocolError) as e:
        encode_message({"x": "a" * MAX_MESSAGE_BYTES})
    assert e.value.code == "too_large"
    with pytest.raises(ProtocolError):
        encode_message({"x": float("nan")})
    assert encode_message({"ok": True}) == b'{"ok":true}\n'


# --- the server with real sockets ----------------------------------------------------------------------------------
def test_socket_is_private_from_the_start(server: ControlServer, runtime_dir: Path) -> None:
    st = server.path.lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert [p.name for p in server.path.parent.iterdir()] == [server.path.name]  # the private bind dir is gone
    assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700  # made by the agent: its own user's dir


def test_hello_and_fork_round_trip(server: ControlServer) -> None:
    reply = call_agent(server.path, {"op": "hello"}, timeout=5, pid=os.getpid())
    assert reply == {"ok": True, "op": "hello", "peer_pid": os.getpid(), "peer_uid": os.geteuid()}
    fork = ForkRequest("f9", "/r", "/r/checkpoints/0000", None, 3.0)
    assert call_agent(server.path, fork.to_message(), timeout=5)["fork_id"] == "f9"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b'{"op": "launch-missiles"}\n', "unknown_op"),
        (b"this is not json\n", "bad_request"),
        (b"[1, 2, 3]\n", "bad_request"),
        (b"\xff\xfe\n", "bad_request"),
        (b'{"op": "hello"}', "bad_request"),  # no newline before EOF
        (b"x" * (MAX_MESSAGE_BYTES + 10), "too_large"),
    ],
)
def test_garbage_gets_a_structured_error(server: ControlServer, data: bytes, code: str) -> None:
    reply = raw_exchange(server.path, data)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert isinstance(reply["error"]["message"], str)
    # ... and the server is still there for the next client.
    assert call_agent(server.path, {"op": "status"}, timeout=5)["op"] == "status"


def test_a_silent_client_times_out_without_blocking_others(server: ControlServer, monkeypatch: Any) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(server.path))  # says nothing; holds one connection thread until its read timeout
        assert call_agent(server.path, {"op": "hello"}, timeout=5)["ok"] is True


def test_handler_exception_becomes_an_internal_error(runtime_dir: Path) -> None:
    def broken(request: Request, peer: PeerCred) -> Mapping[str, Any]:
        raise RuntimeError("boom")

    srv = ControlServer(runtime_dir / "agent-1.sock", broken)
    srv.start()
    try:
        reply = call_agent(srv.path, {"op": "hello"}, timeout=5)
        assert reply["error"]["code"] == "internal" and "boom" in reply["error"]["message"]
        unserialisable = ControlServer(runtime_dir / "agent-2.sock", lambda r, p: {"ok": True, "x": object()})
        unserialisable.start()
        assert call_agent(unserialisable.path, {"op": "hello"}, timeout=5)["error"]["code"] == "bad_message"
        unserialisable.close(wait=True)
    finally:
        srv.close(wait=True)


def test_close_removes_the_socket_and_a_removed_socket_is_bound_again(server: ControlServer) -> None:
    server.path.unlink()  # someone cleaned the runtime dir
    deadline = time.monotonic() + 10
    while not server.path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert call_agent(server.path, {"op": "hello"}, timeout=5)["ok"] is True
    server.close(wait=True)
    assert not server.path.exists()


def test_close_leaves_a_socket_that_is_no_longer_ours(runtime_dir: Path) -> None:
    srv = ControlServer(runtime_dir / "agent-7.sock", echo_handler)
    srv.start()
    successor = ControlServer(runtime_dir / "agent-7.sock", echo_handler)
    successor.start()  # replaced the file (a restarted process with a reused pid, say)
    srv.close(wait=True)
    assert successor.path.exists()
    assert call_agent(successor.path, {"op": "hello"}, timeout=5)["ok"] is True
    successor.close(wait=True)


def test_forked_child_neither_serves_nor_removes_the_parents_socket(server: ControlServer) -> None:
    pid = os.fork()
    if pid == 0:  # child: close everything as an exiting process would
        code = 0
        try:
            server.close()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert server.path.exists()
    assert call_agent(server.path, {"op": "hello"}, timeout=5)["ok"] is True


def test_busy_agent_says_so(runtime_dir: Path) -> None:
    release, entered = threading.Event(), threading.Event()

    def slow(request: Request, peer: PeerCred) -> Mapping[str, Any]:
        entered.set()
        release.wait(10)
        return {"ok": True}

    srv = ControlServer(runtime_dir / "agent-3.sock", slow, max_clients=1)
    srv.start()
    try:
        first = threading.Thread(target=call_agent, args=(srv.path, {"op": "hello"}), kwargs={"timeout": 10})
        first.start()
        assert entered.wait(10)  # the only slot is taken now
        reply = call_agent(srv.path, {"op": "hello"}, timeout=5)
        assert reply["error"]["code"] == "busy"
        release.set()
        first.join()
    finally:
        release.set()
        srv.close(wait=True)


def test_too_long_a_socket_path_is_a_clear_error(runtime_dir: Path) -> None:
    deep = runtime_dir / ("d" * 100)
    with pytest.raises(OSError, match="FORK_SIDECAR_RUNTIME_DIR"):
        ControlServer(deep / "agent-1.sock", echo_handler).start()


# --- trust -------------------------------------------------------------------------------------------------------
def become_nobody() -> None:
    # preexec_fn: the test process runs no other threads at this point.
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def run_as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or not Path(SYSTEM_PYTHON).exists():
        pytest.skip("needs root and /usr/bin/python3.11 to run a client as nobody")
    return subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", code],
        preexec_fn=become_nobody,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )


CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1] if len(sys.argv) > 1 else {path!r})
except PermissionError:
    print("EACCES"); sys.exit(0)
try:
    s.sendall(b'{{"op": "hello"}}\\n')
except BrokenPipeError:
    pass  # refused before it read the request; the answer is waiting
print(s.recv(65536).decode().strip())
"""


def test_another_user_cannot_even_connect_to_a_0600_socket(server: ControlServer, runtime_dir: Path) -> None:
    for d in (runtime_dir, server.path.parent):  # loosened (the user's dir is 0700) to reach the socket's own mode
        d.chmod(0o755)
    out = run_as_nobody(CLIENT.format(path=str(server.path)))
    assert out.stdout.strip() == "EACCES", out.stderr


def test_another_user_is_refused_by_peer_credentials(server: ControlServer, runtime_dir: Path) -> None:
    # Loosen the file permissions (a misconfigured host) to reach the second line of defence: SO_PEERCRED.
    for d in (runtime_dir, server.path.parent):
        d.chmod(0o755)
    server.path.chmod(0o666)
    out = run_as_nobody(CLIENT.format(path=str(server.path)))
    reply = json.loads(out.stdout)
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden", out.stderr


def test_daemon_refuses_a_socket_owned_by_someone_else(server: ControlServer) -> None:
    os.chown(server.path, NOBODY, NOBODY)  # the file claims our pid but belongs to another user
    with pytest.raises(ControlError) as e:
        call_agent(server.path, {"op": "hello"}, timeout=5, pid=os.getpid())
    assert e.value.code == "refused"
    assert f"uid {NOBODY}" in e.value.message


def test_daemon_refuses_a_socket_served_by_another_pid(runtime_dir: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # A live process of the same user, but the socket named after it is served by this test process.
        srv = ControlServer(agent_socket_path(runtime_dir, os.geteuid(), sleeper.pid), echo_handler)
        srv.start()
        with pytest.raises(ControlError) as e:
            call_agent(srv.path, {"op": "hello"}, timeout=5, pid=sleeper.pid)
        assert e.value.code == "refused" and f"not by pid {sleeper.pid}" in e.value.message
        srv.close(wait=True)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_daemon_side_errors_are_sentences(runtime_dir: Path) -> None:
    with pytest.raises(ControlError) as e:
        call_agent(agent_socket_path(runtime_dir, os.geteuid(), 1), {"op": "hello"}, timeout=1, pid=1)
    assert e.value.code == "unreachable"
    plain = agent_socket_path(runtime_dir, os.geteuid(), os.getpid())
    plain.parent.mkdir(mode=0o700)
    plain.write_text("not a socket")
    with pytest.raises(ControlError) as e:
        call_agent(plain, {"op": "hello"}, timeout=1, pid=os.getpid())
    assert e.value.code == "refused" and "not a socket" in e.value.message


def test_daemon_refuses_a_socket_outside_a_users_directory(runtime_dir: Path) -> None:
    srv = ControlServer(runtime_dir / f"agent-{os.getpid()}.sock", echo_handler)  # the old flat layout
    srv.start()
    try:
        with pytest.raises(ControlError) as e:
            call_agent(srv.path, {"op": "hello"}, timeout=5, pid=os.getpid())
        assert e.value.code == "refused" and "per-user agent directory" in e.value.message
    finally:
        srv.close(wait=True)


def test_daemon_refuses_a_users_directory_owned_by_someone_else(server: ControlServer) -> None:
    os.chown(server.path.parent, NOBODY, NOBODY)  # named for our uid, but another user's: they could have put it there
    with pytest.raises(ControlError) as e:
        call_agent(server.path, {"op": "hello"}, timeout=5, pid=os.getpid())
    assert e.value.code == "refused" and f"owned by uid {os.geteuid()}" in e.value.message


# --- the agent's directory -----------------------------------------------------------------------------------------
def test_a_missing_directory_is_made_only_inside_one_of_our_own(runtime_dir: Path) -> None:
    ensure_private_dir(runtime_dir / "rt" / "0")  # the runtime dir too: its parent is ours alone
    assert stat.S_IMODE((runtime_dir / "rt").stat().st_mode) == 0o755
    assert stat.S_IMODE((runtime_dir / "rt" / "0").stat().st_mode) == 0o700
    runtime_dir.chmod(0o1777)  # like /tmp: whoever made a directory here would own it, so nobody may
    with pytest.raises(AgentDirPending, match="start the fork-sidecar daemon"):
        ensure_private_dir(runtime_dir / "shared-rt" / "0")
    assert not (runtime_dir / "shared-rt").exists()


def test_a_directory_of_another_user_is_never_used(runtime_dir: Path) -> None:
    squatted = runtime_dir / "0"
    squatted.mkdir()
    os.chown(squatted, NOBODY, NOBODY)
    with pytest.raises(AgentDirPending, match=f"owner uid {NOBODY}"):
        ensure_private_dir(squatted)
    loose = runtime_dir / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    with pytest.raises(AgentDirPending, match="mode 777"):
        ensure_private_dir(loose)


def test_an_agent_waits_for_the_daemon_to_make_its_directory(runtime_dir: Path) -> None:
    os.chown(runtime_dir, NOBODY, NOBODY)  # a runtime dir that is not ours: our directory is the daemon's to make
    runtime_dir.chmod(0o755)
    srv = ControlServer(agent_socket_path(runtime_dir, os.geteuid(), os.getpid()), echo_handler)
    srv.start()
    try:
        assert srv.running and srv.waiting is not None and "daemon creates it" in srv.waiting
        assert not srv.path.parent.exists()
        srv.path.parent.mkdir(mode=0o700)  # what the daemon does
        deadline = time.monotonic() + 10
        while not srv.path.exists():
            assert time.monotonic() < deadline, "the agent did not bind once its directory existed"
            time.sleep(0.05)
        assert srv.waiting is None
        assert call_agent(srv.path, {"op": "hello"}, timeout=5, pid=os.getpid())["ok"] is True
    finally:
        srv.close(wait=True)


def test_peer_credentials_and_process_uid() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer_credentials(a) == PeerCred(os.getpid(), os.geteuid(), os.getegid())
    assert process_uid(os.getpid()) == os.geteuid()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert process_uid(int(finished.stdout)) is None


def test_module_is_stdlib_only() -> None:
    code = (
        "import sys, sidecar.protocol.server, sidecar.protocol.client; "
        "print(sorted(m for m in ('torch', 'psutil', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_an_agent_in_a_process_with_over_1024_open_files_still_answers(runtime_dir: Path) -> None:
    """select() refuses descriptors >= 1024: a trainer with many open files (data loaders, shards) must still be
    reachable. Before poll(), the server's wait raised, was swallowed, and no client was ever accepted."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        srv = ControlServer(agent_socket_path(runtime_dir, os.geteuid(), os.getpid()), echo_handler)
        srv.start()
        try:
            reply = call_agent(srv.path, {"op": "hello"}, timeout=5, pid=os.getpid())
            assert reply["ok"] is True and reply["peer_pid"] == os.getpid()
        finally:
            srv.close(wait=True)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_failed_roll_back_of_the_ranks_is_named_as_ranks_off() -> None:
    from sidecar.protocol.reasons import Reason, of_agent_code

    assert of_agent_code("ranks_split") == Reason.TRAINER_RANKS_OFF
