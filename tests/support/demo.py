"""`make demo`: the whole product on CPU, in a few minutes, with real parts only.

One ART-shaped run (`{art}/demo/models/m`, checkpoints 0000 = adapter A and 0005 = adapter B) is served by a real
vLLM CPU server started as ART starts it (`m@0` = checkpoints/0000) and trained by a real trainer process with the
preload installed by `fork-sidecar preload install`. The daemon is started, `fork-sidecar fork --step 5 --wait`
forks the run, and the demo checks what a user would: `m@0` now answers exactly as adapter B served directly (same
greedy tokens, same logprobs) and the trainer holds B's weights.

Run it as `.venv/bin/python -m tests.support.demo` (the Makefile's `demo` target builds .venv and .venv-vllm first).
It works in `.demo/` (git-ignored; `$FORK_SIDECAR_DEMO_DIR` names another), emptied at start and kept afterwards for
its logs. Every process it starts is stopped before it exits, Ctrl-C and SIGTERM included. Exit 0 when the fork was
proven, 1 with a sentence otherwise.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from tests.support.daemon import DaemonProcess, write_config
from tests.support.venvs import chained_venv, install_preload
from tests.support.vllm_server import VllmServer, start_vllm_server, vllm_python

REPO = Path(__file__).resolve().parents[2]
TRAINER_SCRIPT = REPO / "tests" / "support" / "trainer_script.py"
STAMP = ".fork-sidecar-demo"  # marks a directory this demo may empty
PROJECT, MODEL = "demo", "m"
SERVED = f"{MODEL}@0"  # the name ART serves checkpoints/0000 under
REFERENCE = "ref-b"  # adapter B loaded directly, to compare m@0 with
SOURCE_STEP = 5
PROMPT = "Once upon a time there was a small model that"
TOKENS = 8
TRAINER_STEPS = 3  # the trainer trains this many steps, then idles (2 cores are shared with vLLM)
STEPS = 9
PAD = "      "
SUCCESS = "m@0 now serves the forked adapter: identical tokens and logprobs"


class DemoFailed(Exception):
    """What went wrong, as one sentence for the person running the demo."""


def say(text: str = "") -> None:
    print(f"{PAD}{text}" if text else "", flush=True)


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[str]  # "token_id:N", so equal lists mean the same token ids
    logprobs: list[float]

    def line(self, label: str) -> str:
        ids = " ".join(t.removeprefix("token_id:") for t in self.tokens)
        text = self.text.replace("\ufffd", "?")  # byte-level pieces of a random model's output
        first, total = self.logprobs[0], sum(self.logprobs)
        return f"{label:<6} tokens {ids:<32} {text!r:<18} logprob first {first:.5f}, sum {total:.5f}"


def complete(server: VllmServer, model: str) -> Completion:
    answer = server.post(
        "/v1/completions",
        {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": TOKENS,
            "temperature": 0,
            "logprobs": 1,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
        },
    )
    choice = answer["choices"][0]
    return Completion(choice["text"], list(choice["logprobs"]["tokens"]), list(choice["logprobs"]["token_logprobs"]))


def differences(a: Completion, b: Completion) -> str:
    if a.tokens != b.tokens:
        return f"tokens {a.tokens} vs {b.tokens}"
    if a.logprobs != b.logprobs:
        return f"logprobs {a.logprobs} vs {b.logprobs}"
    return ""


# --- the trainer ------------------------------------------------------------------------------------------------
def make_trainer_python(venv: Path) -> tuple[Path, str]:
    """A fresh venv whose site-packages chain to .venv's (torch, peft), with the preload installed by the CLI."""
    python = chained_venv(venv)
    install = install_preload(python)
    if install.returncode != 0:
        raise DemoFailed(f"`fork-sidecar preload install` failed: {install.stderr.strip()}")
    return python, install.stdout.strip()


class Trainer:
    """tests/support/trainer_script.py: trains a LoRA on CPU and registers it with the preload for the run."""

    def __init__(self, python: Path, base: Path, model_dir: Path, control: Path, runtime: Path) -> None:
        control.mkdir(parents=True)
        self.control = control
        self.log_path = control / "trainer.log"
        args = ["--base", str(base), "--adapter", str(model_dir / "checkpoints" / "0000"), "--run-dir", str(model_dir)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(python), str(TRAINER_SCRIPT), *args, "--control", str(control), "--max-steps", str(TRAINER_STEPS)],
                env={**os.environ, "FORK_SIDECAR_RUNTIME_DIR": str(runtime)},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd="/",
                start_new_session=True,  # Ctrl-C reaches the demo, which stops the trainer itself
            )

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoFailed(f"the trainer exited with {self.proc.returncode} (see {rel(self.log_path)})")
            if value := check():
                return value
            time.sleep(0.05)
        raise DemoFailed(f"the trainer did not {what} within {timeout:.0f}s (see {rel(self.log_path)})")

    def ready(self) -> dict[str, Any]:
        return dict(self.wait("register its model", lambda: _read_json(self.control / "ready.json")))

    def steps(self) -> int:
        try:
            return len((self.control / "steps.jsonl").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def dump_fingerprint(self) -> str:
        """Fingerprint of the LoRA tensors the trainer holds right now (it writes them out on request)."""
        from tests.support.trainer_script import lora_fingerprint

        (self.control / "dump").touch()
        self.wait("dump its weights", lambda: not (self.control / "dump").exists(), timeout=30)
        return lora_fingerprint(_load_tensors(self.control / "dump.safetensors"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            (self.control / "exit").touch()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file  # numpy, not torch: the demo process itself needs no torch

    return dict(load_file(str(path)))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return None


# --- the demo ---------------------------------------------------------------------------------------------------
class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.art = root / "art"
        self.model_dir = self.art / PROJECT / "models" / MODEL
        self.checkpoints = self.model_dir / "checkpoints"
        self.logs = root / "logs"
        self.runtime = Path(tempfile.mkdtemp(prefix="fs-demo-", dir="/tmp"))  # short: agent socket paths
        self.server: VllmServer | None = None
        self.trainer: Trainer | None = None
        self.trainer_skipped: str | None = None
        self.daemon: DaemonProcess | None = None
        self.step_started = 0.0

    def step(self, n: int, title: str) -> None:
        self.step_started = time.monotonic()
        print(f"\n[{n}/{STEPS}] {title}", flush=True)

    def took(self) -> str:
        return f"{time.monotonic() - self.step_started:.1f}s"

    def run(self) -> None:
        self.step(1, "Tiny Llama base model and two LoRA adapters (A, B)")
        from tests.support.tiny_model import default_cache_dir, tiny_assets

        assets = tiny_assets()
        say(f"base {rel(assets.base)} (hidden 128, 2 layers), adapters A and B (rank 8, different seeds)")
        say(f"built or reused from {rel(default_cache_dir())} in {self.took()}")

        self.step(2, "An ART run on disk")
        shutil.copytree(assets.adapter_a, self.checkpoints / "0000")
        shutil.copytree(assets.adapter_b, self.checkpoints / f"{SOURCE_STEP:04d}")
        say(f"{rel(self.model_dir)}/checkpoints/")
        say("  0000  adapter A  (what ART serves as m@0 and trains from)")
        say(f"  {SOURCE_STEP:04d}  adapter B  (the checkpoint we will fork from)")

        self.step(3, "vLLM (CPU) serving the run, started as ART starts it")
        self.server = self.start_vllm(assets.base)
        say(f"python -m vllm.entrypoints.openai.api_server --model {rel(assets.base)} --enable-lora")
        say(f"  --lora-modules {SERVED}={rel(self.checkpoints)}/0000   (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
        say(f"{self.server.url}, pid {self.server.pid}, ready after {self.took()} (log {rel(self.server.log_path)})")

        self.step(4, "A trainer process with the preload")
        try:
            self.start_trainer(assets.base)
        except (DemoFailed, OSError, subprocess.CalledProcessError) as e:
            self.trainer_skipped = str(e)
            say(f"skipped: {e}")
            say("the demo goes on without a trainer (the fork's trainers stage will say none found)")
            if self.trainer is not None:
                self.trainer.stop()
                self.trainer = None

        self.step(5, "The fork-sidecar daemon")
        config = write_config(
            self.root / "config.yaml",
            [self.art],
            self.root / "state",
            self.runtime,
            vllm={"discover": True},
            log={"level": "info", "format": "text"},
        )
        self.daemon = DaemonProcess(config, self.logs / "daemon.log")
        self.daemon.start(timeout=60)
        assert self.daemon.proc is not None
        say(f"fork-sidecar run --config {rel(config)}: pid {self.daemon.proc.pid}, READY=1 after {self.took()}")
        say(f"watching {rel(self.art)}, vLLM discovery on, agent sockets in {self.runtime}")

        self.step(6, f"BEFORE: greedy completion of {PROMPT!r}")
        self.server.post("/v1/load_lora_adapter", {"lora_name": REFERENCE, "lora_path": str(assets.adapter_b)})
        say(f"loaded adapter B directly as {REFERENCE!r} (POST /v1/load_lora_adapter) to compare against")
        before, reference = complete(self.server, SERVED), complete(self.server, REFERENCE)
        say(before.line(SERVED))
        say(reference.line(REFERENCE))
        if not differences(before, reference):
            raise DemoFailed("adapters A and B answer the same, so the demo could not tell a fork from no fork.")
        say("m@0 (adapter A) and adapter B answer differently")

        self.step(7, f"Fork: checkpoint {SOURCE_STEP:04d} becomes what the run serves and trains")
        outcome = self.fork()

        self.step(8, "AFTER")
        self.check_after(outcome, before, reference)

    def start_vllm(self, base: Path) -> VllmServer:
        """Start the server on a thread and show progress here; a Ctrl-C meanwhile leaves it to `stop_all`."""
        result: list[VllmServer | BaseException] = []

        def start() -> None:
            try:
                result.append(
                    start_vllm_server(
                        base,
                        lora_modules=[(SERVED, self.checkpoints / "0000")],
                        log_path=self.logs / "vllm.log",
                        cwd=self.root,
                    )
                )
            except BaseException as e:  # handed to the main thread
                result.append(e)

        thread = threading.Thread(target=start, name="vllm-start", daemon=True)
        thread.start()
        tty = sys.stdout.isatty()
        last = 0.0
        while thread.is_alive():
            thread.join(1.0)
            waited = time.monotonic() - self.step_started
            if tty:
                print(f"\r{PAD}starting (about a minute on 2 cores)... {waited:.0f}s", end="", flush=True)
            elif waited - last >= 20:
                say(f"still starting... {waited:.0f}s")
                last = waited
        if tty:
            print("\r\033[K", end="", flush=True)
        [outcome] = result
        if isinstance(outcome, BaseException):
            first = str(outcome).splitlines()[0] if str(outcome) else type(outcome).__name__
            raise DemoFailed(f"vLLM did not start: {first} (see {rel(self.logs / 'vllm.log')})")
        return outcome

    def start_trainer(self, base: Path) -> None:
        python, installed = make_trainer_python(self.root / "trainer-venv")
        say(f"venv {rel(self.root / 'trainer-venv')} (site-packages chained to .venv's torch/peft)")
        say(f"`fork-sidecar preload install --python ...`: {installed.split(':')[0]}")
        trainer = self.trainer = Trainer(python, base, self.model_dir, self.root / "trainer", self.runtime)
        ready = trainer.ready()
        if not ready.get("preload_armed"):
            raise DemoFailed("the trainer started but the preload was not armed in it")
        trainer.wait(f"train {TRAINER_STEPS} steps", lambda: trainer.steps() >= TRAINER_STEPS)
        say(f"pid {ready['pid']}: peft LoRA on checkpoints/0000, registered with sidecar.preload.register()")
        say(f"trained {TRAINER_STEPS} steps (AdamW) and idles; control socket {ready['socket']} ({self.took()})")

    def fork(self) -> dict[str, Any]:
        cli = Path(sys.executable).with_name("fork-sidecar")
        command = [str(cli), "fork", rel(self.model_dir), "--step", str(SOURCE_STEP), "--wait", "--timeout", "180"]
        if not cli.exists():
            command[:1] = [sys.executable, "-m", "sidecar"]
        say(f"$ fork-sidecar fork {rel(self.model_dir)} --step {SOURCE_STEP} --wait")
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
        for line in (done.stdout + done.stderr).splitlines():
            say(f"  {line}")
        say(f"(exit {done.returncode}, {self.took()})")
        outcome = _read_json(self.model_dir / ".fork.done") or _read_json(self.model_dir / ".fork.failed")
        if done.returncode != 0 or outcome is None or outcome.get("status") != "done":
            error = (outcome or {}).get("error") or "no outcome file was written"
            raise DemoFailed(f"the fork did not succeed: {error}")
        say()
        say(f"{rel(self.model_dir)}/.fork.done:")
        say(f"  status {outcome['status']}, digest {outcome['digest']}")
        for name in ("swap", "trainers", "vllm", "verify"):
            stage = outcome.get(name) or {}
            seconds = stage.get("seconds")
            secs = f"{seconds:.3f}s" if isinstance(seconds, int | float) else "-"
            say(f"  {name:<9}{stage.get('status', '-'):<8}{secs:>8}  {_stage_detail(name, stage)}")
        return outcome

    def check_after(self, outcome: dict[str, Any], before: Completion, reference: Completion) -> None:
        from sidecar.adapter import adapter_digest

        assert self.server is not None
        source = self.checkpoints / f"{SOURCE_STEP:04d}"
        served = self.checkpoints / "0000"
        same_files = sorted(p.name for p in source.iterdir()) == sorted(p.name for p in served.iterdir())
        if not same_files or filecmp.dircmp(source, served).diff_files:
            raise DemoFailed(f"{rel(served)} does not hold exactly the files of {rel(source)} after the fork.")
        disk = adapter_digest(served)
        say(f"disk: checkpoints/0000 holds checkpoint {SOURCE_STEP:04d}'s files byte for byte, digest {_short(disk)}")

        after, reference_after = complete(self.server, SERVED), complete(self.server, REFERENCE)
        say(after.line(SERVED))
        say(reference_after.line(REFERENCE))
        diff = differences(after, reference_after) or differences(reference, reference_after)
        if diff:
            raise DemoFailed(f"after the fork {SERVED} does not answer as adapter B: {diff}.")
        if not differences(after, before):
            raise DemoFailed(f"{SERVED} answers as it did before the fork.")
        say(SUCCESS)
        roots = {m["id"]: m.get("root") for m in self.server.get("/v1/models")["data"]}
        root = Path(str(roots.get(SERVED))).name
        say(f"vLLM now reads {SERVED} from checkpoints/{root}, a path it never loaded (so no stale prefix cache)")

        if self.trainer is None:
            say(f"trainer: not run ({self.trainer_skipped})")
            return
        agents = (outcome.get("trainers") or {}).get("agents") or []
        mine = [a for a in agents if a.get("pid") == self.trainer.proc.pid]
        if not mine or mine[0].get("digest") != disk:
            raise DemoFailed(f"the trainer did not report the disk digest {disk}: {agents}")
        say(f"trainer pid {mine[0]['pid']} reports digest {_short(mine[0]['digest'])} = the disk digest")
        from tests.support.trainer_script import lora_fingerprint

        if self.trainer.dump_fingerprint() != lora_fingerprint(_load_tensors(source / "adapter_model.safetensors")):
            raise DemoFailed("the trainer's LoRA weights are not adapter B's after the fork.")
        say("the trainer's live LoRA weights equal adapter B's bit for bit (dumped from the process)")

    def stop_all(self) -> list[str]:
        """Stop everything this demo started; returns what was stopped, for the last step's line."""
        stopped = []
        if self.daemon is not None and self.daemon.proc is not None:
            with contextlib.suppress(AssertionError):  # it ignored SIGTERM and was killed
                self.daemon.stop()
            stopped.append(f"daemon (exit {self.daemon.proc.returncode})")
        if self.trainer is not None:
            self.trainer.stop()
            stopped.append(f"trainer (exit {self.trainer.proc.returncode})")
        if self.server is not None:
            self.server.stop()
            stopped.append("vLLM")
        # Whatever is left (a vLLM still starting when Ctrl-C came, its engine children): by pid, TERM then KILL.
        left = psutil.Process().children(recursive=True)
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(left, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        if left:
            stopped.append(f"{len(left)} leftover process(es) {', '.join(str(p.pid) for p in left)}")
        shutil.rmtree(self.runtime, ignore_errors=True)
        return stopped


def _stage_detail(name: str, stage: dict[str, Any]) -> str:
    if stage.get("error"):
        return str(stage["error"])
    if name == "swap":
        return f"{stage.get('method')}, {stage.get('bytes')} bytes, atomic exchange with checkpoints/0000"
    if name == "trainers":
        agents = stage.get("agents") or []
        if not agents:
            return str(stage.get("reason") or "no trainer agents")
        return "; ".join(
            f"pid {a.get('pid')} {a.get('result')} ({a.get('applied', '-')}), digest {_short(str(a.get('digest')))}"
            for a in agents
        )
    if name == "vllm":
        servers = stage.get("servers") or []
        if not servers:
            return str(stage.get("reason") or "no servers")
        return "; ".join(
            f"{s.get('url')} (found by {s.get('found_by')}) {','.join(s.get('adapters') or [])} {s.get('method')}"
            for s in servers
        )
    if name == "verify":
        return f"disk digest {_short(str(stage.get('disk_digest')))}"
    return ""


def _short(digest: str) -> str:
    return digest[:19] + "…" if len(digest) > 20 else digest


def prepare(root: Path) -> None:
    """Empty the demo dir from a previous run; refuse a non-empty dir this demo did not make."""
    if root.exists() and any(root.iterdir()) and not (root / STAMP).exists() and root != REPO / ".demo":
        raise DemoFailed(f"{root} is not empty and was not made by this demo; pick another FORK_SIDECAR_DEMO_DIR.")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / STAMP).touch()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main() -> int:
    started = time.monotonic()
    root = Path(os.environ.get("FORK_SIDECAR_DEMO_DIR") or REPO / ".demo").absolute()
    print("fork-sidecar demo: one ART run, served by a real vLLM (CPU) and trained by a real trainer process.")
    print(
        f"A fork to checkpoint {SOURCE_STEP:04d} must reach both, without restarting either. Working dir: {rel(root)}/"
    )
    if vllm_python() is None:
        print("FAILED: .venv-vllm is not installed; run `make demo` (or `make vllm-venv` first).")
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    demo: Demo | None = None
    failure: str | None = None
    try:
        prepare(root)
        demo = Demo(root)
        demo.run()
    except DemoFailed as e:
        failure = str(e)
    except KeyboardInterrupt:
        failure = "interrupted"
    except Exception as e:  # a part broke in a way the steps above do not name: say it in one line
        lines = str(e).strip().splitlines()
        failure = f"{type(e).__name__}: {lines[0] if lines else ''}"
    finally:
        if demo is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
            demo.step(STEPS, "Cleaning up")
            stopped = demo.stop_all()
            say(f"stopped {', '.join(stopped) if stopped else 'nothing (nothing was running)'} in {demo.took()}")
            say(f"logs kept in {rel(root / 'logs')}/ and {rel(root / 'trainer')}/")
    total = time.monotonic() - started
    if failure:
        print(f"\nFAILED after {total:.0f}s: {failure}")
        return 1
    print(f"\nDemo passed in {total:.0f}s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
