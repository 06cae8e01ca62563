"""Starting and stopping a real vLLM (CPU build) OpenAI server from `.venv-vllm` for tests, the demo and benchmarks.

Started the way ART starts it (`python -m vllm.entrypoints.openai.api_server --enable-lora --lora-modules
name=path ...`, with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), in its own process group so that stopping it also stops
the EngineCore/Worker children it forks. Startup takes about a minute on 2 cores; `/v1/models` answering is "ready".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.ports import free_port

__all__ = ["VLLM_VENV", "VllmServer", "VllmStartError", "start_vllm_server", "vllm_python"]

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = REPO / ".venv-vllm"


class VllmStartError(RuntimeError):
    pass


def vllm_python() -> Path | None:
    """`.venv-vllm/bin/python` once `make vllm-venv` has finished (its stamp exists), else None."""
    python = VLLM_VENV / "bin" / "python"
    return python if python.exists() and (VLLM_VENV / ".installed").exists() else None


@dataclass
class VllmServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]
    api_key: str | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after `timeout`."""
        if self.alive():
            self._signal(signal.SIGCONT)  # a paused server cannot shut down
            self._signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as a crash or the OOM killer would."""
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)  # start_new_session made the server its group's leader

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 30.0) -> Any:
        return self._request("GET", path, None, timeout)

    def post(self, path: str, body: Mapping[str, Any], timeout: float = 120.0) -> Any:
        return self._request("POST", path, body, timeout)

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None, timeout: float) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode()
        try:
            return json.loads(raw)
        except ValueError:
            return raw


def start_vllm_server(
    base: Path,
    *,
    lora_modules: Sequence[tuple[str, Path]],
    log_path: Path,
    api_key: str | None = None,
    max_lora_rank: int = 16,
    max_loras: int = 4,
    max_model_len: int = 2048,
    port: int | None = None,
    runtime_lora_updating: bool = True,
    extra_args: Sequence[str] = (),
    cwd: Path | None = None,
    startup_timeout: float = 300.0,
) -> VllmServer:
    """Start a server for `base` with `--lora-modules name=path ...`; returns once `/v1/models` answers."""
    python = vllm_python()
    if python is None:
        raise VllmStartError(f"{VLLM_VENV} is not installed; run `make vllm-venv` first.")
    port = port or free_port()
    argv = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--enable-lora",
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-loras",
        str(max_loras),
        "--enable-prefix-caching",
        "--lora-modules",
        *(f"{name}={path}" for name, path in lora_modules),
        *(["--api-key", api_key] if api_key else []),
        *extra_args,
    ]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the CPU build needs a size that fits a small machine
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("VLLM_API_KEY", None)
    if runtime_lora_updating:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    else:
        env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    server = VllmServer(f"http://127.0.0.1:{port}", port, process, log_path, argv, api_key)
    try:
        _wait_ready(server, startup_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: VllmServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise VllmStartError(f"vLLM exited with {server.process.returncode}; log tail:\n{server.log_tail()}")
        try:
            server.get("/v1/models", timeout=5)
            return
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.5)
    raise VllmStartError(f"vLLM did not answer within {timeout:.0f}s; log tail:\n{server.log_tail()}")
