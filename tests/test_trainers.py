"""The trainers stage against real agents (in this process and in a child), real sockets and a real tiny model."""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")


from sidecar import preload  # noqa: E402
from sidecar.adapter import adapter_digest  # noqa: E402
from sidecar.config import Config, Duration, TrainerConfig, load_config  # noqa: E402
from sidecar.metrics import reload_error_reasons  # noqa: E402
from sidecar.preload import art  # noqa: E402
from sidecar.protocol.paths import agent_dir, agent_socket_path  # noqa: E402
from sidecar.run_io import local_run_files  # noqa: E402
from sidecar.stages import ForkContext  # noqa: E402
from sidecar.trainers import TrainerStage, agent_statuses, clean_stale_sockets, list_agent_sockets  # noqa: E402
from tests.support.tiny_model import TinyAssets, tiny_assets  # noqa: E402

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[1]
TOKENS = torch.arange(3, 19).reshape(1, 16)


@pytest.fixture(scope="module")
def assets() -> TinyAssets:
    return tiny_assets()


def config(runtime_dir: Path, **trainer: Any) -> Config:
    fields = {"agent_timeout": Duration(trainer.pop("agent_timeout", 30.0)), **trainer}
    return dataclasses.replace(load_config(None), runtime_dir=runtime_dir, trainer=TrainerConfig(**fields))


def context(run_dir: Path, digest: str | None = None, budget: float = 60.0) -> ForkContext:
    ckpt = run_dir / "checkpoints" / "0000"
    return ForkContext("fork-7", run_dir, ckpt, digest or adapter_digest(ckpt), time.monotonic() + budget)


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def counted(outcome: Any) -> list[str]:
    """The `fork_sidecar_reload_errors_total` labels this stage outcome counts, as the daemon records it."""
    return reload_error_reasons({"trainers": outcome.to_json()})


def leave_socket(path: Path) -> None:
    """A socket file with nobody listening, as a killed trainer leaves behind."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


# --- nobody there ------------------------------------------------------------------------------------------------
def test_no_agent_is_skipped_unless_required(runtime_dir: Path, run_dir: Path) -> None:
    outcome = TrainerStage(config(runtime_dir)).run(context(run_dir))
    assert outcome.status == "skipped" and outcome.error == "none found"
    assert outcome.to_json()["reason"] == "trainer_none_found" and counted(outcome) == []
    outcome = TrainerStage(config(runtime_dir, required=True)).run(context(run_dir))
    assert outcome.status == "failed"
    assert counted(outcome) == ["trainer_none_found"]
    assert str(run_dir) in (outcome.error or "") and "fork-sidecar preload install" in (outcome.error or "")


def test_an_agent_of_another_run_does_not_count(runtime_dir: Path, run_dir: Path, model: Any, tmp_path: Path) -> None:
    preload.register(model, tmp_path / "art" / "proj" / "models" / "other")
    outcome = TrainerStage(config(runtime_dir)).run(context(run_dir))
    assert outcome.status == "skipped" and outcome.detail["agents"] == []


# --- agents that answer ------------------------------------------------------------------------------------------
def test_a_generic_peft_trainer_loads_and_reports_its_digest(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    preload.register(model, run_dir)
    outcome = TrainerStage(config(runtime_dir)).run(context(run_dir))
    assert outcome.status == "ok", outcome
    [agent] = outcome.detail["agents"]
    assert agent["pid"] == os.getpid() and agent["host"] == socket.gethostname()
    assert agent["result"] == "loaded" and agent["digest"] == adapter_digest(run_dir / "checkpoints" / "0000")
    assert agent["attempts"] == 1 and agent["seconds"] >= 0
    assert "error" not in agent
    assert outcome.to_json()["agents"] == outcome.detail["agents"]  # what lands in .fork.done


def test_a_digest_mismatch_fails_with_who_holds_what(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    preload.register(model, run_dir)
    claimed = "sha256:" + "0" * 64  # the daemon believes checkpoints/0000 holds something else
    outcome = TrainerStage(config(runtime_dir)).run(context(run_dir, digest=claimed))
    assert outcome.status == "failed"
    held = adapter_digest(run_dir / "checkpoints" / "0000")
    assert f"trainer pid {os.getpid()}" in (outcome.error or "")
    assert held in (outcome.error or "") and claimed in (outcome.error or "")
    assert counted(outcome) == ["trainer_digest_mismatch"]


@pytest.mark.parametrize("framing", ["sha256:", "sha256-tree:"])
def test_an_agent_replying_with_the_old_digest_framing_is_refused_with_the_fix(
    runtime_dir: Path, run_dir: Path, model: Any, monkeypatch: pytest.MonkeyPatch, framing: str
) -> None:
    """A trainer whose preload copy predates this framing answers `sha256:` (one stream, two releases back) or
    `sha256-tree:` (the same tree over SHA-256, the previous release: every trainer running when the daemon is
    upgraded). Installing an old release is not possible here, so the agent's digest function is swapped for that
    old framing (a stand-in)."""
    import hashlib

    from sidecar.preload import checkpoint_read

    real = checkpoint_read.digest_of
    chunk = 4 << 20

    def old_digest_of(tensors: checkpoint_read.CheckpointTensors, before_hash: Any = None) -> str:
        if before_hash is not None:  # a model on the CPU copies inside the digest's pass: let it copy
            real(tensors, before_hash=before_hash)
        h = hashlib.sha256()
        for name in sorted(tensors.entries):
            e = tensors.entries[name]
            raw = bytes(tensors.raw(name))
            h.update(f"{name}\0{e.dtype}\0{','.join(map(str, e.shape))}\0".encode() + len(raw).to_bytes(8, "little"))
            if framing == "sha256:":
                h.update(raw)
            else:
                for at in range(0, len(raw), chunk):
                    h.update(hashlib.sha256(raw[at : at + chunk]).digest())
        return framing + h.hexdigest()

    monkeypatch.setattr(checkpoint_read, "digest_of", old_digest_of)
    preload.register(model, run_dir)
    outcome = TrainerStage(config(runtime_dir)).run(context(run_dir))
    assert outcome.status == "failed"
    error = outcome.error or ""
    assert f"trainer pid {os.getpid()}" in error and "old adapter digest" in error, error
    assert f"(`{framing}`)" in error and "fork-sidecar preload install" in error
    assert counted(outcome) == ["trainer_protocol"]


def test_an_agent_that_cannot_load_fails_the_stage(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    preload.register(model, run_dir)
    ctx = context(run_dir)
    broken = run_dir / "checkpoints" / "0000" / "adapter_model.safetensors"
    broken.write_bytes(broken.read_bytes()[:50])
    outcome = TrainerStage(config(runtime_dir)).run(ctx)
    assert outcome.status == "failed" and "damaged" in (outcome.error or "")
    assert outcome.detail["agents"][0]["attempts"] == 1  # a refusal is not retried
    assert counted(outcome) == ["trainer_load_failed"]


def test_a_step_that_never_ends_is_retried_then_reported(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    preload.register(model, run_dir)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()  # a step begins, and no optimizer step follows
    outcome = TrainerStage(config(runtime_dir, agent_timeout=0.6, retries=1)).run(context(run_dir))
    assert outcome.status == "failed"
    assert outcome.detail["agents"][0]["attempts"] == 2
    assert "training step was still running" in (outcome.error or "")
    # A step that never ends is a timeout (the old sentence regexes counted it as trainer_other).
    assert outcome.detail["agents"][0]["reason"] == "trainer_timeout"
    assert counted(outcome) == ["trainer_timeout"]


def test_a_load_that_outlasts_the_call_is_found_in_the_agents_status_not_reported_failed(
    runtime_dir: Path, run_dir: Path, model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The copy into the model takes 2.4 s (a mock: a slow copy of a large adapter; a tiny one is never that slow),
    # past the 2 s call; the agent finishes it and keeps the result, and the daemon finds it there. The old code
    # reported a trainer timeout while the model held the forked weights.
    from sidecar.preload import peft_load

    real = peft_load._copy_and_verify

    def slow(*args: Any) -> str | None:
        time.sleep(2.4)
        return real(*args)

    monkeypatch.setattr(peft_load, "_copy_and_verify", slow)
    preload.register(model, run_dir)
    outcome = TrainerStage(config(runtime_dir, agent_timeout=2.0, retries=1)).run(context(run_dir))
    assert outcome.status == "ok", outcome
    [agent] = outcome.detail["agents"]
    assert (agent["result"], agent["answered"], agent["attempts"]) == ("loaded", "late, through status", 1), agent
    assert outcome.seconds < 3.2, outcome  # the status asked for at most half an agent timeout more


def test_the_status_asked_after_a_late_reply_is_this_attempts_not_an_earlier_ones(
    runtime_dir: Path, run_dir: Path, model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An earlier attempt of the same fork that answered "step timeout, nothing was changed" is in the agent's
    # recent results (written here: a real earlier attempt would cost another 2 s timeout). Matched by fork id
    # alone, it would be taken for what became of this attempt, whose slow copy then loads the fork.
    from sidecar.preload import peft_load
    from sidecar.preload.agent import current_agent

    real = peft_load._copy_and_verify
    monkeypatch.setattr(peft_load, "_copy_and_verify", lambda *args: (time.sleep(2.4), real(*args))[1])
    preload.register(model, run_dir)
    agent = current_agent(create=False)
    assert agent is not None
    earlier = {"code": "step_timeout", "message": "a training step was still running; nothing was changed"}
    agent.record({"fork_id": "fork-7", "not_after": time.monotonic() - 5, "ok": False, "error": earlier})
    outcome = TrainerStage(config(runtime_dir, agent_timeout=2.0, retries=0)).run(context(run_dir))
    assert outcome.status == "ok", outcome
    assert outcome.detail["agents"][0]["answered"] == "late, through status"


def test_retry_succeeds_once_the_step_ends(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    preload.register(model, run_dir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    stage = TrainerStage(config(runtime_dir, agent_timeout=0.6, retries=3))
    attempts: list[int] = []

    def finish_step_after_the_first_attempt() -> None:
        # Wait (without a deadline on the stage) until the first fork attempt has been withdrawn, then end the step.
        status = agent_statuses(runtime_dir)
        while not any(r.get("error") for a in status for r in a.get("recent", [])):
            time.sleep(0.05)
            status = agent_statuses(runtime_dir)
        attempts.append(1)
        optimizer.step()

    helper = threading.Thread(target=finish_step_after_the_first_attempt, daemon=True)
    helper.start()
    outcome = stage.run(context(run_dir))
    helper.join(30)
    assert attempts and outcome.status == "ok", outcome
    assert outcome.detail["agents"][0]["attempts"] >= 2


def test_an_art_trainer_answers_load_pending(runtime_dir: Path, run_dir: Path) -> None:
    @dataclasses.dataclass
    class UnslothService:
        output_dir: str

        @functools.cached_property
        def _state(self) -> None:
            return None

    assert art.patch_service_class(UnslothService)
    service = UnslothService(str(run_dir))
    outcome = TrainerStage(config(runtime_dir)).run(context(run_dir))
    assert outcome.status == "ok", outcome
    [agent] = outcome.detail["agents"]
    assert agent["result"] == "load pending" and agent["state"] == "not built"
    statuses = agent_statuses(runtime_dir)
    assert statuses[0]["kinds"] == ["art"] and statuses[0]["recent"][-1]["fork_id"] == "fork-7"
    del service


def start_child_agents(
    assets: TinyAssets, run_dir: Path, runtime_dir: Path, count: int
) -> list[subprocess.Popen[bytes]]:
    """Trainer processes (a real peft model each) registered for `run_dir`, started and ready; the caller kills them."""
    code = f"""
import sys
from peft import PeftModel
from transformers import LlamaForCausalLM
from sidecar import preload
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained({str(assets.base)!r}), {str(assets.adapter_a)!r})
preload.register(model, {str(run_dir)!r})
print("ready", flush=True)
sys.stdin.read()
"""
    env = {**os.environ, "FORK_SIDECAR_RUNTIME_DIR": str(runtime_dir)}
    children = [
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO)
        for _ in range(count)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
    except BaseException:
        kill_all(children)
        raise
    return children


def kill_all(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_agents_in_other_processes_are_asked_in_parallel(runtime_dir: Path, run_dir: Path, assets: TinyAssets) -> None:
    children = start_child_agents(assets, run_dir, runtime_dir, 2)
    try:
        outcome = TrainerStage(config(runtime_dir)).run(context(run_dir))
        assert outcome.status == "ok", outcome
        assert sorted(a["pid"] for a in outcome.detail["agents"]) == sorted(c.pid for c in children)
        assert {a["result"] for a in outcome.detail["agents"]} == {"loaded"}
    finally:
        kill_all(children)
    # Killed trainers cannot remove their sockets; the next fork (or the daemon's start) does.
    assert len(list_agent_sockets(runtime_dir)) == 2
    TrainerStage(config(runtime_dir)).on_start([run_dir], local_run_files)
    assert list_agent_sockets(runtime_dir) == []


@pytest.mark.parametrize("offset", [-86400.0, 86400.0], ids=["a-day-behind", "a-day-ahead"])
def test_the_daemons_wall_clock_a_day_off_does_not_make_the_fork_late(
    runtime_dir: Path, run_dir: Path, assets: TinyAssets, monkeypatch: pytest.MonkeyPatch, offset: float
) -> None:
    """The request's `not_after` is compared in the agent's process: a wall-clock step on the daemon's side (here its
    `time.time` shifted; a host clock step would move every process on a shared machine) must change nothing. The
    old wall-clock `not_after` made a daemon a day behind answer every fork as given up."""
    [child] = start_child_agents(assets, run_dir, runtime_dir, 1)
    try:
        wall = time.time
        monkeypatch.setattr(time, "time", lambda: wall() + offset)
        outcome = TrainerStage(config(runtime_dir)).run(context(run_dir))
        monkeypatch.undo()
        assert outcome.status == "ok", outcome
        [agent] = outcome.detail["agents"]
        assert agent["pid"] == child.pid and agent["result"] == "loaded", agent
    finally:
        kill_all([child])


# --- sockets that must not be trusted or kept ---------------------------------------------------------------------
def test_stale_sockets_are_cleaned(runtime_dir: Path, run_dir: Path) -> None:
    mine = agent_dir(runtime_dir, os.geteuid())
    mine.mkdir(mode=0o700)
    dead = mine / f"agent-{dead_pid()}.sock"
    leave_socket(dead)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        reused = mine / f"agent-{sleeper.pid}.sock"
        leave_socket(reused)
        old = time.time() - 3600
        os.utime(reused, (old, old))  # made an hour before the process now holding that pid started
        leftover = mine / ".agent-crashed"
        leftover.mkdir()
        os.utime(leftover, (old, old))
        assert {s["error"] for s in agent_statuses(runtime_dir)} == {"stale socket (process gone)"}
        removed = clean_stale_sockets(runtime_dir)
        assert set(removed) == {dead, reused, leftover}
    finally:
        sleeper.kill()
        sleeper.wait()
    outcome = TrainerStage(config(runtime_dir)).run(context(run_dir))
    assert outcome.status == "skipped"


def test_a_socket_owned_by_another_user_is_not_trusted(runtime_dir: Path, run_dir: Path, model: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    preload.register(model, run_dir)
    os.chown(agent_socket_path(runtime_dir, os.geteuid(), os.getpid()), 65534, 65534)
    outcome = TrainerStage(config(runtime_dir)).run(context(run_dir))
    assert outcome.status == "skipped"
    [unreachable] = outcome.detail["unreachable"]
    assert unreachable["pid"] == os.getpid() and "owned by uid 65534" in unreachable["error"]


def test_the_daemon_side_never_imports_torch() -> None:
    heavy = "('torch', 'peft', 'sidecar.preload.agent')"
    code = f"import sys, sidecar.trainers; print([m for m in {heavy} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"


def test_a_trainer_dying_just_after_its_connection_dropped_counts_as_gone() -> None:
    """A killed process closes its sockets a moment before it shows as dead: the daemon, reading "reset" at once,
    found it still running and reported the trainer unreachable (CI, Python 3.12). Here a real process that is
    still running when asked and exits 0.1 s later stands for that moment; its parent does not reap it (a zombie)."""
    from sidecar import trainers

    dying = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.1)"])
    try:
        time.sleep(0.02)  # started, still running
        assert trainers._process_gone(dying.pid)
        living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            started = time.monotonic()
            assert not trainers._process_gone(living.pid, grace=0.2)
            assert time.monotonic() - started >= 0.2  # looked again for the whole grace before saying alive
        finally:
            living.kill()
            living.wait()
    finally:
        dying.wait()
