"""End to end with a real trainer process: a venv with the preload installed by `fork-sidecar preload install`.

The trainer venv chains to the dev venv's site-packages (torch, peft, transformers) through a `.pth`, and the
preload goes in the way a user installs it. `tests/support/trainer_script.py` trains a tiny Llama LoRA on CPU and
calls `sidecar.preload.register`. The trainers stage is driven directly (`TrainerStage(config).run(ctx)`), and the
whole daemon through the CLI: touch `.fork`, wait for `.fork.done`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from sidecar.adapter import adapter_digest  # noqa: E402
from sidecar.config import Config, load_config  # noqa: E402
from sidecar.protocol.paths import agent_socket_path  # noqa: E402
from sidecar.stages import ForkContext, StageOutcome  # noqa: E402
from sidecar.trainers import TrainerStage, agent_statuses  # noqa: E402
from tests.support.tiny_model import TinyAssets, tiny_assets  # noqa: E402
from tests.support.trainer_script import lora_fingerprint, stop_trainer  # noqa: E402
from tests.support.venvs import preloaded_venv  # noqa: E402

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "support" / "trainer_script.py"
SYSTEM_PYTHON = "/usr/bin/python3.11"
WAIT_S = 120.0


def wait_for(condition: Any, what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def assets() -> TinyAssets:
    return tiny_assets()


@pytest.fixture(scope="module")
def trainer_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real venv whose site-packages chain to .venv's, with the preload installed by the CLI."""
    return preloaded_venv(tmp_path_factory.mktemp("trainer-venv"))


@pytest.fixture(scope="module")
def runtime_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fs-e2e-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class Run:
    art: Path
    model_dir: Path
    assets: TinyAssets

    @property
    def served(self) -> Path:
        return self.model_dir / "checkpoints" / "0000"

    def serve(self, adapter: Path) -> None:
        """What the daemon's swap leaves behind: `checkpoints/0000` holding `adapter`."""
        shutil.rmtree(self.served, ignore_errors=True)
        shutil.copytree(adapter, self.served)


def make_run(root: Path, assets: TinyAssets) -> Run:
    model_dir = root / "art" / "proj" / "models" / "m"
    shutil.copytree(assets.adapter_a, model_dir / "checkpoints" / "0000")
    shutil.copytree(assets.adapter_b, model_dir / "checkpoints" / "0003")
    return Run(root / "art", model_dir, assets)


class Trainer:
    """One trainer_script.py process and its control directory."""

    def __init__(self, python: Path, run: Run, runtime_dir: Path, control: Path, *extra: str, **env: str) -> None:
        control.mkdir(parents=True)
        self.control = control
        self.log = open(control / "stderr.log", "wb")  # noqa: SIM115 - closed in stop()
        args = ["--base", str(run.assets.base), "--adapter", str(run.served), "--run-dir", str(run.model_dir)]
        self.proc = subprocess.Popen(
            [str(python), str(SCRIPT), *args, "--control", str(control), *extra],
            env={**os.environ, "FORK_SIDECAR_RUNTIME_DIR": str(runtime_dir), **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd="/",
        )
        self.ready: dict[str, Any] = wait_for(self._ready, "the trainer to register")

    def _ready(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"trainer exited with {self.proc.returncode}:\n{self.stderr()}")
        try:
            return dict(json.loads((self.control / "ready.json").read_text()))
        except (FileNotFoundError, ValueError):
            return None

    @property
    def pid(self) -> int:
        return int(self.ready["pid"])

    def stderr(self) -> str:
        return (self.control / "stderr.log").read_text(errors="replace")[-4000:]

    def steps(self) -> list[dict[str, Any]]:
        try:
            lines = (self.control / "steps.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def wait_steps(self, n: int) -> list[dict[str, Any]]:
        return list(wait_for(lambda: (s := self.steps()) and len(s) >= n and s, f"{n} training steps"))

    def pause(self) -> None:
        (self.control / "pause").touch()
        wait_for(lambda: (self.control / "paused").exists(), "the trainer to pause")

    def resume(self) -> None:
        (self.control / "pause").unlink()
        wait_for(lambda: not (self.control / "paused").exists(), "the trainer to resume")

    def dump(self) -> dict[str, Any]:
        (self.control / "dump.safetensors").unlink(missing_ok=True)
        (self.control / "dump").touch()
        wait_for(lambda: not (self.control / "dump").exists(), "the trainer to dump its LoRA tensors")
        return dict(load_file(str(self.control / "dump.safetensors")))

    def stop(self) -> None:
        stop_trainer(self.proc, self.control, 30)
        self.log.close()


def adapter_tensors(checkpoint: Path) -> dict[str, Any]:
    return dict(load_file(str(checkpoint / "adapter_model.safetensors")))


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stage(runtime_dir: Path, **trainer: Any) -> TrainerStage:
    config: Config = load_config(None)
    fields = dataclasses.replace(config.trainer, **trainer)
    return TrainerStage(dataclasses.replace(config, runtime_dir=runtime_dir, trainer=fields))


def context(run: Run, fork_id: str) -> ForkContext:
    return ForkContext(fork_id, run.model_dir, run.served, adapter_digest(run.served), time.monotonic() + 60)


@pytest.fixture(scope="module")
def shared(
    trainer_python: Path, runtime_dir: Path, assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Run, Trainer]]:
    """One trainer for the tests below (each starts it ~6 s): it starts from adapter A and trains on."""
    root = tmp_path_factory.mktemp("shared")
    run = make_run(root, assets)
    trainer = Trainer(trainer_python, run, runtime_dir, root / "control")
    try:
        yield run, trainer
    finally:
        trainer.stop()


def test_the_trainer_runs_with_the_installed_preload(shared: tuple[Run, Trainer], runtime_dir: Path) -> None:
    _, trainer = shared
    assert trainer.ready["preload_armed"] is True
    assert Path(trainer.ready["socket"]) == agent_socket_path(runtime_dir, os.geteuid(), trainer.pid)
    trainer.wait_steps(2)


def test_a_fork_reaches_a_training_process_and_training_goes_on_from_it(
    shared: tuple[Run, Trainer], runtime_dir: Path
) -> None:
    run, trainer = shared
    run.serve(run.assets.adapter_b)
    forked = adapter_tensors(run.served)
    # While it trains: the fork lands between two steps, and a later step starts from exactly the forked weights.
    seen = len(trainer.steps())
    outcome = stage(runtime_dir).run(context(run, "e2e-running"))
    assert outcome.status == "ok", outcome
    [agent] = outcome.detail["agents"]
    assert agent["pid"] == trainer.pid and agent["result"] == "loaded"
    assert agent["digest"] == adapter_digest(run.served)
    later = trainer.wait_steps(seen + 4)[seen:]
    assert lora_fingerprint(forked) in {s["start"] for s in later}
    # While it is paused (idle): loaded at once; the trainer holds the forked tensors bit for bit.
    trainer.pause()
    outcome = stage(runtime_dir).run(context(run, "e2e-paused"))
    assert outcome.status == "ok" and outcome.detail["agents"][0]["applied"] == "between steps"
    assert same(trainer.dump(), forked)
    seen = len(trainer.steps())
    trainer.resume()
    after = trainer.wait_steps(seen + 2)[seen:]
    assert after[0]["start"] == lora_fingerprint(forked)  # the next step starts from the fork ...
    assert after[1]["start"] != after[0]["start"]  # ... and trains on from it
    assert all(math.isfinite(s["loss"]) for s in after)


def test_a_fork_sent_mid_step_waits_for_the_boundary(shared: tuple[Run, Trainer], runtime_dir: Path) -> None:
    run, trainer = shared
    run.serve(run.assets.adapter_a)
    (trainer.control / "hold").touch()
    wait_for(lambda: (trainer.control / "holding").exists(), "a step to be running")
    result: list[StageOutcome] = []
    call = threading.Thread(target=lambda: result.append(stage(runtime_dir).run(context(run, "e2e-mid-step"))))
    call.start()

    def waiting() -> bool:
        status = agent_statuses(runtime_dir)
        return any(t["gate"]["fork_waiting"] for s in status if s["pid"] == trainer.pid for t in s.get("targets", []))

    wait_for(waiting, "the agent to hold the fork until the step ends")
    assert call.is_alive() and not result
    # The held step writes its line only after its optimizer step, which may come after the stage returns:
    # count the lines now, so the held step is line `held` and the first step after the fork line `held + 1`.
    held = len(trainer.steps())
    (trainer.control / "hold").unlink()
    call.join(WAIT_S)
    [outcome] = result
    assert outcome.status == "ok", outcome
    assert outcome.detail["agents"][0]["applied"] == "step boundary"
    assert trainer.wait_steps(held + 2)[held + 1]["start"] == lora_fingerprint(adapter_tensors(run.served))


def test_a_malformed_checkpoint_is_refused_without_touching_the_trainer(
    shared: tuple[Run, Trainer], runtime_dir: Path
) -> None:
    run, trainer = shared
    trainer.pause()
    try:
        before = trainer.dump()
        run.serve(run.assets.adapter_b)
        ctx = context(run, "e2e-broken")
        data = run.served / "adapter_model.safetensors"
        data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 2])
        outcome = stage(runtime_dir).run(ctx)
        assert outcome.status == "failed" and "damaged" in (outcome.error or "")
        assert same(trainer.dump(), before)
    finally:
        trainer.resume()


def become_nobody() -> None:
    # preexec_fn: the test process runs no other threads at this point.
    os.setgid(65534)
    os.setuid(65534)


CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
try:
    s.sendall(b'{"op": "hello"}\\n')
except BrokenPipeError:
    pass
print(s.recv(65536).decode().strip())
"""


def test_a_client_of_another_user_is_refused_by_the_trainer(shared: tuple[Run, Trainer], runtime_dir: Path) -> None:
    if os.geteuid() != 0 or not Path(SYSTEM_PYTHON).exists():
        pytest.skip("needs root and /usr/bin/python3.11 to run a client as nobody")
    _, trainer = shared
    sock = Path(trainer.ready["socket"])

    def as_nobody() -> str:
        return str(
            subprocess.run(
                [SYSTEM_PYTHON, "-I", "-c", CLIENT, str(sock)],
                preexec_fn=become_nobody,
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
            ).stdout
        ).strip()

    modes = {d: d.stat().st_mode for d in (runtime_dir, sock.parent)}
    try:
        for d in modes:  # loosened (the user's directory is 0700) to reach the socket's own mode
            d.chmod(0o755)
        assert as_nobody() == "EACCES"  # 0600 socket: the kernel says no
        sock.chmod(0o666)  # a loosened socket reaches the agent's own check
        reply = json.loads(as_nobody())
        assert reply["ok"] is False and reply["error"]["code"] == "forbidden"
    finally:
        sock.chmod(0o600)
        for d, mode in modes.items():
            d.chmod(mode)


def test_a_spawn_child_holding_the_model_gets_the_fork(
    trainer_python: Path, runtime_dir: Path, assets: TinyAssets, tmp_path: Path
) -> None:
    run = make_run(tmp_path, assets)
    trainer = Trainer(trainer_python, run, runtime_dir, tmp_path / "control", "--spawn-child")
    try:
        parent = json.loads((trainer.control / "parent.json").read_text())
        assert trainer.pid == parent["child"] != parent["pid"]
        assert not agent_socket_path(runtime_dir, os.geteuid(), parent["pid"]).exists()  # the parent holds no model
        run.serve(assets.adapter_b)
        outcome = stage(runtime_dir).run(context(run, "e2e-spawn"))
        assert outcome.status == "ok", outcome
        assert [a["pid"] for a in outcome.detail["agents"]] == [parent["child"]]
    finally:
        trainer.stop()


def test_preload_off_in_one_process(
    trainer_python: Path, runtime_dir: Path, assets: TinyAssets, tmp_path: Path
) -> None:
    run = make_run(tmp_path, assets)
    trainer = Trainer(trainer_python, run, runtime_dir, tmp_path / "control", FORK_SIDECAR_PRELOAD="0")
    try:
        assert trainer.ready["preload_armed"] is False
        assert not Path(trainer.ready["socket"]).exists()  # register() did nothing
        assert stage(runtime_dir).run(context(run, "e2e-off")).status == "skipped"
    finally:
        trainer.stop()


def test_preload_without_torch_loads_nothing_heavy(trainer_python: Path, runtime_dir: Path) -> None:
    code = (
        "import json, sys; "
        "heavy = ['torch', 'peft', 'transformers', 'sidecar.preload.agent', 'sidecar.preload.art', "
        "'sidecar.protocol.server']; "
        "armed = any(getattr(f, 'fork_sidecar_post_import_finder', False) for f in sys.meta_path); "
        "print(json.dumps({'armed': armed, 'loaded': [m for m in heavy if m in sys.modules]}))"
    )
    env = {**os.environ, "FORK_SIDECAR_RUNTIME_DIR": str(runtime_dir)}
    before = set(runtime_dir.iterdir())
    out = subprocess.run([str(trainer_python), "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == {"armed": True, "loaded": []}
    assert set(runtime_dir.iterdir()) == before  # and no agent socket


@pytest.mark.skipif(importlib.util.find_spec("sidecar.daemon") is None, reason="sidecar.daemon is not there yet")
def test_the_daemon_carries_a_fork_into_the_trainer(
    shared: tuple[Run, Trainer], runtime_dir: Path, tmp_path: Path
) -> None:
    from tests.support.daemon import DaemonProcess, wait_outcome, write_config

    run, trainer = shared
    run.serve(run.assets.adapter_a)  # 0000 = A as ART left it; the marker forks from the newest step, 0003 = B
    config = write_config(tmp_path / "config.yaml", [run.art], tmp_path / "state", runtime_dir)
    trainer.pause()
    try:
        with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
            started = time.time()
            (run.model_dir / ".fork").touch()
            outcome = wait_outcome(run.model_dir, timeout=WAIT_S, after=started - 1)
            assert outcome["status"] == "done", (outcome, daemon.log())
            stage_outcome = outcome["trainers"]
            assert stage_outcome["status"] == "ok", stage_outcome
            [agent] = stage_outcome["agents"]
            assert agent["pid"] == trainer.pid and agent["result"] == "loaded"
            assert agent["digest"] == outcome["digest"] == adapter_digest(run.assets.adapter_b)
        forked = adapter_tensors(run.assets.adapter_b)
        assert same(trainer.dump(), forked)
    finally:
        seen = len(trainer.steps())
        trainer.resume()
    after = trainer.wait_steps(seen + 2)[seen:]
    assert after[0]["start"] == lora_fingerprint(forked) != after[1]["start"]
