"""SIGHUP in the first moments of `fork-sidecar run` (issue 17, item 7): held, then acted on, never fatal.

systemd's `ExecReload` may send SIGHUP at any time after the start; SIGHUP's default action ends a process, and the
daemon spends a few hundred milliseconds importing before its own handlers exist. The test sends SIGHUP from 0.15 s
after the start (the interpreter's own start-up, before any code of ours runs, cannot be covered) every 50 ms until
READY, and expects a ready daemon that then re-reads its configuration and forks.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.reliability.support import Fleet, make_run, wait_settled
from tests.support.daemon import wait_for

pytestmark = pytest.mark.timeout(60)


def test_sighup_while_starting_is_held_and_acted_on(tmp_path: Path) -> None:
    art = tmp_path / "art"
    model_dir = make_run(art, steps=(3,))
    with Fleet(tmp_path, [art]) as fleet:
        daemon = fleet.start(0, wait_ready=False)
        assert daemon.proc is not None
        time.sleep(0.15)
        sent = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and daemon.proc.poll() is None:
            daemon.signal(signal.SIGHUP)
            sent += 1
            try:
                daemon.wait_notify(lambda m: "READY=1" in m, timeout=0.05)
                break
            except AssertionError:
                if daemon.proc.poll() is not None:
                    raise
        assert daemon.proc.poll() is None, f"died of SIGHUP {daemon.proc.returncode}:\n{daemon.log()}"
        assert sent >= 2
        wait_for(lambda: "configuration reloaded" in daemon.log(), 10, "the held SIGHUP acted on")
        (model_dir / ".fork").write_text("step: 3\n")
        view = wait_settled(model_dir, [fleet.state_dir(0)], 20)
    assert view.ok and view.outcome is not None and view.outcome["status"] == "done", view
