"""The safe point: when a job may touch a model's weights, between two training steps (sidecar/preload/agent.py's
docstring says how a step is told from what torch shows)."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["StepGate", "StepTimeout", "forget_gates_in_child"]


@dataclass
class _Job:
    fn: Callable[[], Any]
    taken: bool = False
    done: bool = False
    where: str = ""
    result: Any = None
    error: BaseException | None = None


class StepTimeout(Exception):
    """No step boundary came in time; nothing was changed."""


_gates: weakref.WeakSet[StepGate] = weakref.WeakSet()


class StepGate:
    """Lets a job touch a model's weights only between training steps (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_step = False
        self._step_since = 0.0
        self._explicit_mode = False
        self._explicit_depth = 0
        self._forwards = 0
        self._applying = False
        self._job: _Job | None = None
        self.steps = 0
        self.disabled = False
        # Called on the training thread at the end of every training step, after the step count moved (the ranks'
        # agreement).
        self.on_boundary: Callable[[], None] | None = None
        _gates.add(self)

    # training-thread side (hooks and training_step) ------------------------------------------------------------
    def forward_started(self, training: bool) -> None:
        with self._cond:
            while self._applying:
                self._cond.wait()
            self._forwards += 1
            if training and not self._explicit_mode and not self._in_step:
                self._in_step, self._step_since = True, time.monotonic()

    def forward_finished(self) -> None:
        with self._cond:
            self._forwards = max(0, self._forwards - 1)
            if not self._forwards:
                self._cond.notify_all()

    def optimizer_stepped(self) -> None:
        if not self._explicit_mode:
            self._boundary()

    def explicit_enter(self) -> None:
        with self._cond:
            while self._applying:
                self._cond.wait()
            self._explicit_mode = True
            self._explicit_depth += 1
            if not self._in_step:
                self._in_step, self._step_since = True, time.monotonic()

    def explicit_exit(self) -> None:
        with self._cond:
            self._explicit_depth = max(0, self._explicit_depth - 1)
            if self._explicit_depth:
                return
        self._boundary()

    def _boundary(self) -> None:
        with self._cond:
            stepped, self._in_step = self._in_step, False
            if stepped:
                self.steps += 1
        # Only a training step's end: an optimizer.step() outside one (torch.distributed.checkpoint's
        # get_optimizer_state_dict steps on empty state, a second optimizer) may happen on some ranks only, and the
        # ranks' agreement issues one collective per boundary.
        if stepped and self.on_boundary is not None:
            self.on_boundary()
        with self._cond:
            job = self._job
            if job is None or job.taken:
                self._cond.notify_all()
                return
            job.taken, job.where, self._applying = True, "step boundary", True
        self._run(job)

    @contextlib.contextmanager
    def forwards_held(self) -> Iterator[None]:
        """Hold forwards of other threads back (and wait for running ones) while the weights change."""
        with self._cond:
            while self._forwards or self._applying:
                self._cond.wait()
            self._applying = True
        try:
            yield
        finally:
            with self._cond:
                self._applying = False
                self._cond.notify_all()

    # agent side -------------------------------------------------------------------------------------------------
    def run_between_steps(self, fn: Callable[[], Any], timeout: float) -> tuple[Any, str]:
        """Run `fn` while no step or forward runs; returns (its result, where it ran). Raises StepTimeout."""
        job = _Job(fn)
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._job is not None:
                raise StepTimeout("another fork is waiting for this model's step boundary")
            self._job = job
            try:
                while not job.taken:
                    if not (self._in_step or self._forwards or self._applying):
                        job.taken, job.where, self._applying = True, "between steps", True
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise StepTimeout(self._busy_sentence(timeout))
                    self._cond.wait(remaining)
            finally:
                if not job.taken:
                    self._job = None
        if job.where == "between steps":
            self._run(job)
        with self._cond:
            while not job.done:  # the training thread runs it; a load takes about as long as reading the file
                self._cond.wait()
            self._job = None
        if job.error is not None:
            raise job.error
        return job.result, job.where

    def _busy_sentence(self, timeout: float) -> str:
        if self._in_step:
            running = time.monotonic() - self._step_since
            return (
                f"a training step was still running after {timeout:.1f}s (in step for {running:.1f}s, no optimizer "
                "step seen); nothing was changed"
            )
        return f"the model was still busy (forward in progress) after {timeout:.1f}s; nothing was changed"

    def _run(self, job: _Job) -> None:
        try:
            job.result = job.fn()
        except BaseException as e:  # never into the training loop; the agent thread re-raises it
            job.error = e
        finally:
            with self._cond:
                self._applying = False
                job.done = True
                self._cond.notify_all()

    def describe(self) -> dict[str, Any]:
        with self._cond:
            out: dict[str, Any] = {
                "in_step": self._in_step,
                "steps_seen": self.steps,
                "forwards": self._forwards,
                "fork_waiting": self._job is not None and not self._job.taken,
            }
            if self._in_step:
                out["in_step_seconds"] = round(time.monotonic() - self._step_since, 3)
            out["marks"] = "training_step()" if self._explicit_mode else "hooks"
            return out

    def forget_in_child(self) -> None:
        # A lock held by another thread at fork() time stays held in the child: start clean and stand aside.
        self._cond = threading.Condition()
        self._job, self._applying, self._forwards = None, False, 0
        self.disabled = True


def forget_gates_in_child() -> None:
    """After fork(): every gate of this process stands aside (their locks may be held by threads the child lacks)."""
    for gate in list(_gates):
        gate.forget_in_child()
