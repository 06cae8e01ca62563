"""Running the real daemon in tests: `fork-sidecar run --config X` as a subprocess, readiness over sd_notify.

The test plays systemd: it binds a datagram socket, passes it as NOTIFY_SOCKET and waits for READY=1, so the
notify protocol is exercised for real and no test sleeps for a guessed start-up time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, roots: list[Path], state_dir: Path, runtime_dir: Path, **overrides: Any) -> Path:
    """A config file for a test daemon; `overrides` are top-level sections merged over the defaults below."""
    data: dict[str, Any] = {
        "watch": {"roots": [str(r) for r in roots], "mode": "inotify", "rescan_interval": "5s"},
        "state_dir": str(state_dir),
        "runtime_dir": str(runtime_dir),
        "vllm": {"discover": False},
        "log": {"level": "debug", "format": "text"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


class DaemonProcess:
    """One `fork-sidecar run` subprocess; use as a context manager or call start()/stop()."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = log_path.with_suffix(".notify")
        self.notify: socket.socket | None = None
        self.messages: list[str] = []

    def start(self, timeout: float = 30.0, wait_ready: bool = True) -> DaemonProcess:
        self.notify_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("JOURNAL_STREAM", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed by it at exit
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        log.close()
        if wait_ready:
            self.wait_notify(lambda m: "READY=1" in m, timeout)
        return self

    def wait_notify(self, predicate: Callable[[str], bool], timeout: float = 30.0) -> str:
        assert self.notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            self.notify.settimeout(0.2)
            try:
                message = self.notify.recv(65536).decode()
            except TimeoutError:
                continue
            self.messages.append(message)
            if predicate(message):
                return message
        raise AssertionError(f"no matching sd_notify message in {timeout}s; got {self.messages}:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: what a crash or the OOM killer does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"daemon ignored SIGTERM for {timeout}s:\n{self.log()}") from None
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None
            self.notify_path.unlink(missing_ok=True)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_outcome(model_dir: Path) -> dict[str, Any] | None:
    for name in (".fork.done", ".fork.failed"):
        try:
            return dict(json.loads((model_dir / name).read_text()))
        except (FileNotFoundError, ValueError):
            continue
    return None


def wait_outcome(model_dir: Path, timeout: float = 30.0, after: float = 0.0) -> dict[str, Any]:
    """The outcome file of `model_dir` once one exists (and was finished after `after`, a time.time())."""

    def ready() -> dict[str, Any] | None:
        out = read_outcome(model_dir)
        if out and not (model_dir / ".fork.inprogress").exists() and _finished_ts(out) >= after:
            return out
        return None

    result: dict[str, Any] = wait_for(ready, timeout, f"an outcome in {model_dir}")
    return result


def _finished_ts(outcome: dict[str, Any]) -> float:
    from datetime import datetime

    value = outcome.get("finished_at")
    return datetime.fromisoformat(value).timestamp() if isinstance(value, str) else 0.0
