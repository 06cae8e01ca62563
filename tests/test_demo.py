"""`make demo` end to end: the demo module run as a user runs it, in its own directory, against the real vLLM.

The first test is the whole demo (about 75 s on 2 cores, most of it vLLM starting): exit 0, the lines that prove the
fork reached vLLM and the trainer, and no process left running afterwards. The second stops a demo with SIGTERM while
vLLM is still starting and checks that it still cleans up everything (the Ctrl-C path).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def start_demo(demo_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "FORK_SIDECAR_DEMO_DIR": str(demo_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.demo"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def processes_using(path: Path) -> list[str]:
    """Processes whose command line names `path` (the demo's vLLM, trainer and daemon all do)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(path) in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline}")
    return found


def test_the_demo_forks_and_proves_it(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    demo = start_demo(demo_dir)
    try:
        out, _ = demo.communicate(timeout=540)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, out
    for line in (
        "[3/9] vLLM (CPU) serving the run",
        "m@0 (adapter A) and adapter B answer differently",
        ": done",  # fork-sidecar fork --wait
        "status done, digest blake3-tree:",
        "vllm     ok",
        "m@0 inplace",
        "m@0 now serves the forked adapter: identical tokens and logprobs",
        "= the disk digest",
        "the trainer's live LoRA weights equal adapter B's bit for bit",
        "stopped daemon (exit 0), trainer (exit 0), vLLM",
        "Demo passed in",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "FAILED" not in out and "skipped" not in out, out
    assert processes_using(demo_dir) == []


def test_sigterm_while_vllm_starts_cleans_up(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    demo = start_demo(demo_dir)
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("[3/9]"):
                break
        # vLLM is now a child of the demo (in its own session); wait until it shows up in the process table.
        deadline = time.monotonic() + 60
        while not processes_using(demo_dir / "art") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_using(demo_dir / "art"), "".join(lines)
        demo.send_signal(signal.SIGTERM)
        rest, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    out = "".join(lines) + rest
    assert demo.returncode == 1, out
    assert "[9/9] Cleaning up" in out and "FAILED" in out and "interrupted" in out, out
    assert processes_using(demo_dir) == []
