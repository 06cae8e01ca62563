"""The agent inside a trainer process: serves `{runtime_dir}/{uid}/agent-<pid>.sock` (sidecar/protocol/ says who
makes that directory) and applies forks to what it was given to serve.

Two kinds of target:
- a generic PEFT model handed to `sidecar.preload.register(model, run_dir)` (this module: `PeftTarget`);
- OpenPipe ART's `UnslothService` instances, found by the post-import hook (`sidecar.preload.art`).

Generic PEFT models get the fork between training steps, without any change to the training loop beyond
`register()`. `StepGate` tells "a step is running" from what torch shows anyway:
- a forward of the model in train mode with grad enabled starts a step;
- an optimizer step that updates the model's parameters ends it (torch's global optimizer step hook, so any
  `torch.optim` optimizer counts, wrapped by accelerate or not; gradient accumulation stays one step);
- any forward in progress (also no-grad generation) makes the model busy until it returns.
A fork that arrives while the model is idle is loaded at once on the agent's thread, with new forwards held back
until it is done. A fork that arrives mid-step is handed to the training thread, which loads it right after the
optimizer step, before the next forward; if no boundary comes within the request's timeout the fork is withdrawn
and answered with an error, so weights never change under a running backward pass. A loop that wants to mark steps
itself wraps each in `sidecar.preload.training_step()`; from then on the hooks defer to it.

Nothing here imports torch unless a model is registered (torch is loaded then anyway).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from sidecar import __version__
from sidecar.preload.agent_replies import combine_replies, reply_summary
from sidecar.preload.late_forks import LateFork
from sidecar.preload.rank_agreement import LATE_REQUEST, LoadHooks, RankAgreement, expects_ranks, rank_info
from sidecar.preload.rank_join import install_join_support
from sidecar.preload.step_gate import StepGate, StepTimeout, forget_gates_in_child
from sidecar.protocol.messages import (
    PROTOCOL_VERSION,
    RESULT_LOADED,
    RESULT_PENDING,
    ForkRequest,
    HelloRequest,
    Request,
    StatusRequest,
    error_reply,
    ok_reply,
)
from sidecar.protocol.paths import agent_socket_path
from sidecar.protocol.peercred import PeerCred
from sidecar.protocol.server import ControlServer

__all__ = [
    "RESULT_LOADED",
    "RESULT_PENDING",
    "Agent",
    "PeftTarget",
    "Target",
    "current_agent",
    "register_peft_model",
    "runtime_dir",
    "shutdown_agent",
    "training_step",
]

DEFAULT_RUNTIME_DIR = "/run/fork-sidecar"
_RECENT = 16


def runtime_dir() -> Path:
    return Path(os.environ.get("FORK_SIDECAR_RUNTIME_DIR") or DEFAULT_RUNTIME_DIR)


def _log(key: str, level: int, message: str, *args: object) -> None:
    from sidecar.preload.hooks import log_once

    log_once(key, level, message, *args)


# --- targets -----------------------------------------------------------------------------------------------------
class Target(Protocol):
    kind: str

    def alive(self) -> bool: ...

    def serves(self) -> list[str]:
        """Real paths of the run dirs this target trains."""
        ...

    def fork(self, request: ForkRequest, checkpoint_dir: Path) -> dict[str, Any]:
        """Apply the fork; returns a reply (ok_reply / error_reply)."""
        ...

    def describe(self) -> dict[str, Any]: ...


# --- generic PEFT ------------------------------------------------------------------------------------------------
class PeftTarget:
    """A PEFT model registered with `register()`; forks load into it at the next safe point."""

    kind = "peft"

    def __init__(self, model: Any, run_dir: str, optimizer: Any | None, index: int = 0) -> None:
        self._model = weakref.ref(model)
        self.run_dir = run_dir
        self.gate = StepGate()
        self._fork_lock = threading.Lock()
        self._optimizers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._matches: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._param_ids = {id(p) for p in model.parameters() if p.requires_grad}
        self._handles: list[Any] = []
        self._closed = False
        self.last: dict[str, Any] | None = None
        if optimizer is not None:
            self.add_optimizer(optimizer)
        self._install_hooks(model)
        self.ranks = self._rank_agreement(index)

    def _rank_agreement(self, index: int) -> RankAgreement:
        from sidecar.preload.peft_load import prepare_adapter_load

        def prepare(checkpoint: Path) -> Any:
            model = self._model()
            if model is None:
                raise RuntimeError("the registered model has been garbage-collected")
            return prepare_adapter_load(model, checkpoint, digest_first=True)  # the ranks compare digests first

        agreement = RankAgreement(
            LoadHooks(
                prepare=prepare,
                apply=lambda prepared: str(prepared.apply(list(self._optimizers), undoable=True)),
                steps=lambda: self.gate.steps,
                hold_forwards=self.gate.forwards_held,
                index=index,
                device=self._lora_device,
                settled_late=self._settled_late,
            )
        )
        self.gate.on_boundary = agreement.at_boundary
        return agreement

    def _settled_late(self, request: ForkRequest, reply: dict[str, Any]) -> None:
        agent = current_agent(create=False)
        if agent is not None:
            agent.settled_late(request, self, reply)

    def _lora_device(self) -> Any:
        """The device of the registered model's LoRA (peft_load.lora_device), or None once it is gone."""
        from sidecar.preload.peft_load import lora_device

        model = self._model()
        return lora_device(model) if model is not None else None

    def add_optimizer(self, optimizer: Any) -> None:
        self._optimizers.add(optimizer)
        self._matches[optimizer] = True

    def _install_hooks(self, model: Any) -> None:
        gate = self.gate

        def pre(module: Any, args: Any) -> None:
            if not gate.disabled:
                import torch

                gate.forward_started(module.training and torch.is_grad_enabled())

        def post(module: Any, args: Any, output: Any) -> None:
            if not gate.disabled:
                gate.forward_finished()

        modules = [model]
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base) and get_base() is not model:
            modules.append(get_base())  # a loop may call the wrapped transformers model directly
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(pre))
            self._handles.append(m.register_forward_hook(post, always_call=True))

    def owns_optimizer(self, optimizer: Any) -> bool:
        """True when `optimizer` updates this model's trainable parameters (answer cached per optimizer)."""
        known = self._matches.get(optimizer)
        if known is None:
            groups = getattr(optimizer, "param_groups", [])
            known = any(id(p) in self._param_ids for g in groups for p in g.get("params", ()))
            with contextlib.suppress(TypeError):
                self._matches[optimizer] = known
            if known:
                self._optimizers.add(optimizer)
        return known

    def alive(self) -> bool:
        return not self._closed and self._model() is not None

    def serves(self) -> list[str]:
        return [self.run_dir]

    def fork(self, request: ForkRequest, checkpoint_dir: Path) -> dict[str, Any]:
        from sidecar.preload.peft_load import AdapterLoadError, prepare_adapter_load

        model = self._model()
        if model is None:
            return error_reply("gone", "the registered model has been garbage-collected")
        started = time.monotonic()
        wait = request.wait_s()  # its daemon gives up then: a request read late (a stopped process) waits less
        if expects_ranks():
            # One rank of a torch.distributed job: loaded only at the optimizer step all ranks agree on.
            del model
            return self._remember(request, self.ranks.request(request, checkpoint_dir, wait), started)
        if wait <= 0:
            return self._remember(request, error_reply("step_timeout", LATE_REQUEST, **rank_info()), started)
        if not self._fork_lock.acquire(timeout=wait):
            return error_reply("busy", "another fork of this model is still being applied")
        done = self.last
        if (
            done is not None
            and (done.get("fork_id"), done.get("digest")) == (request.fork_id, request.digest)
            and done.get("result") == RESULT_LOADED
        ):
            # A retry of a fork loaded meanwhile (its first attempt outlasted the daemon's call): never load twice.
            self._fork_lock.release()
            return {k: v for k, v in done.items() if k not in ("fork_id", "at")}

        applying = False

        def load() -> tuple[str, int]:
            nonlocal applying
            prepared = prepare_adapter_load(model, checkpoint_dir)  # the model is untouched until apply
            applying = True
            return prepared.apply(list(self._optimizers)), self.gate.steps

        try:
            (digest, steps), where = self.gate.run_between_steps(load, wait)
            reply = ok_reply(result=RESULT_LOADED, digest=digest, applied=where, loaded_at_step=steps, **rank_info())
        except StepTimeout as e:
            reply = error_reply("step_timeout", str(e), **rank_info())
        except AdapterLoadError as e:
            reply = error_reply("load_failed", str(e), **rank_info())
        except Exception as e:  # torch's own (a cast out of memory, say): a failed load, and the lock still goes
            reply = error_reply("load_failed", _raised(checkpoint_dir, e, applying), **rank_info())
        try:
            return self._remember(request, reply, started)  # before the lock goes: a retry waiting on it reads `last`
        finally:
            self._fork_lock.release()

    def _remember(self, request: ForkRequest, reply: dict[str, Any], started: float) -> dict[str, Any]:
        reply["seconds"] = round(time.monotonic() - started, 4)
        self.last = {"fork_id": request.fork_id, "at": time.time(), **reply}
        return reply

    def describe(self) -> dict[str, Any]:
        model = self._model()
        return {
            "kind": self.kind,
            "run_dir": self.run_dir,
            "model": type(model).__name__ if model is not None else None,
            "optimizers": len(self._optimizers),
            "gate": self.gate.describe(),
            "ranks": self.ranks.describe(),
            "last_fork": self.last,
        }

    def close(self) -> None:
        self._closed = True
        self.gate.disabled = True
        for handle in self._handles:
            with contextlib.suppress(Exception):
                handle.remove()
        self._handles.clear()


# --- the agent ---------------------------------------------------------------------------------------------------
class Agent:
    """One per process: the socket, the targets, and the last fork results (also the deferred ones)."""

    def __init__(self, directory: Path) -> None:
        self.pid = os.getpid()
        self.socket_path = agent_socket_path(directory, os.geteuid(), self.pid)
        self._targets: list[Target] = []
        self._lock = threading.Lock()
        self._server: ControlServer | None = None
        self._started = time.time()
        self.recent: deque[dict[str, Any]] = deque(maxlen=_RECENT)
        # Forks told to this process's targets, by (fork id, not_after: one per attempt), until every reply is final.
        self._late: dict[tuple[str, float | None], LateFork] = {}

    # targets ----------------------------------------------------------------------------------------------------
    def add(self, target: Target) -> None:
        with self._lock:
            if target not in self._targets:
                self._targets.append(target)
        self.ensure_serving()

    def targets(self) -> list[Target]:
        with self._lock:
            self._targets = [t for t in self._targets if t.alive()]
            return list(self._targets)

    def ensure_serving(self) -> bool:
        """Start the socket if it is not running; False (logged once) when it cannot be created."""
        with self._lock:
            if self._server is not None and self._server.running:
                return True
            server = ControlServer(self.socket_path, self.handle)
            try:
                server.start()
            except OSError as e:
                _log(f"agent-socket:{self.socket_path}", logging.WARNING, "fork-sidecar agent not started: %s", e)
                return False
            self._server = server
        if server.waiting is not None:
            _log(f"agent-wait:{self.socket_path}", logging.INFO, "fork-sidecar agent waiting: %s", server.waiting)
            return True
        _log(f"agent-up:{self.socket_path}", logging.INFO, "fork-sidecar agent listening on %s", self.socket_path)
        return True

    def record(self, result: Mapping[str, Any]) -> None:
        """Keep a fork result for `status` (deferred ART loads report here too)."""
        self.recent.append({"at": round(time.time(), 3), **result})

    def close(self, *, wait: bool = False) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close(wait=wait)

    # requests ---------------------------------------------------------------------------------------------------
    def handle(self, request: Request, peer: PeerCred) -> dict[str, Any]:
        if isinstance(request, HelloRequest):
            return self.hello()
        if isinstance(request, StatusRequest):
            return self.status()
        if isinstance(request, ForkRequest):
            return self.fork(request)
        return error_reply("unknown_op", f"unsupported request {request!r}")

    def hello(self) -> dict[str, Any]:
        targets = self.targets()
        runs = sorted({run for t in targets for run in t.serves()})
        return ok_reply(
            protocol=PROTOCOL_VERSION,
            pid=self.pid,
            host=socket.gethostname(),
            python=sys.version.split()[0],
            executable=sys.executable,
            runs=runs,
            kinds=sorted({t.kind for t in targets}),
            versions=_versions(),
            **rank_info(),
        )

    def status(self) -> dict[str, Any]:
        reply = self.hello()
        reply["started_at"] = round(self._started, 3)
        reply["targets"] = [t.describe() for t in self.targets()]
        reply["recent"] = list(self.recent)
        return reply

    def fork(self, request: ForkRequest) -> dict[str, Any]:
        run = os.path.realpath(request.run_dir)
        targets = [t for t in self.targets() if run in t.serves()]
        if not targets:
            served = sorted({r for t in self.targets() for r in t.serves()}) or ["nothing"]
            return error_reply("not_serving", f"pid {self.pid} does not train {run} (it serves {', '.join(served)})")
        checkpoint = checkpoint_within(run, request.checkpoint_dir)
        if checkpoint is None:
            return error_reply(
                "forbidden_path", f"checkpoint {request.checkpoint_dir} is not inside the run {run}; refused"
            )
        # Each attempt is its own entry (a retry of the fork has another `not_after`): the daemon asks `status` for
        # the result of the attempt it sent, never an earlier one's.
        key = (request.fork_id, request.not_after)
        late = LateFork(run, targets)
        with self._lock:  # before the targets are told: a late result may come before their replies are combined
            self._late[key] = late
        replies = _fork_all(targets, request, checkpoint)
        with self._lock:  # and recorded under the lock, so a late result can only come after this entry
            late.replies = replies
            merged = late.merged()
            if merged is not None and self._late.get(key) is late:
                del self._late[key]
            # A target whose late result came meanwhile answers with it; else `status` gets the result once it comes.
            reply = combine_replies(merged or replies)
            self._record_fork(request, run, reply)
        return reply

    def _record_fork(self, request: ForkRequest, run: str, reply: Mapping[str, Any]) -> None:
        """Keep what became of this attempt of the fork for `status`, under its `not_after`."""
        attempt = {"fork_id": request.fork_id, "not_after": request.not_after, "run_dir": run}
        self.record({**attempt, **reply_summary(reply)})

    def settled_late(self, request: ForkRequest, target: Target, reply: dict[str, Any]) -> None:
        """A target's result for a fork it had answered `load_in_progress`: once no target of it is still in
        progress, the combined result goes into `recent`, where the daemon, asking `status`, reads it."""
        key = (request.fork_id, request.not_after)
        with self._lock:
            late = self._late.get(key)
            if late is None or target not in late.targets:
                return
            late.results[late.targets.index(target)] = reply
            merged = late.merged()
            if merged is None:
                return
            del self._late[key]
            self._record_fork(request, late.run, combine_replies(merged))


def _raised(checkpoint: Path, error: Exception, applying: bool) -> str:
    what = f"loading {checkpoint} raised {error!r}"
    if applying:  # part of the tensors may be in: say so, the daemon fails the fork with it
        return f"{what} while its tensors were being copied in: the model may hold part of the fork; fork again"
    return f"{what} before the model was changed (nothing was loaded)"


def checkpoint_within(run: str, checkpoint: str) -> Path | None:
    """The real path of `checkpoint` if it lies strictly inside the run dir `run` (a real path), else None."""
    real = os.path.realpath(checkpoint)
    try:
        inside = os.path.commonpath([real, run]) == run and real != run
    except ValueError:
        return None
    return Path(real) if inside else None


def _fork_all(targets: list[Target], request: ForkRequest, checkpoint: Path) -> list[dict[str, Any]]:
    """Every target's reply, the targets told at once: one after the other, the second would hear of the fork only
    once the first had loaded it (two boundaries later in a distributed job), out of what is left of the timeout."""
    if len(targets) == 1:
        return [targets[0].fork(request, checkpoint)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(targets), thread_name_prefix="fork-sidecar-fork") as pool:
        return list(pool.map(lambda t: t.fork(request, checkpoint), targets))


_VERSIONED = (
    ("torch", "torch"),
    ("peft", "peft"),
    ("transformers", "transformers"),
    ("art", "openpipe-art"),
    ("unsloth", "unsloth"),
)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"sidecar": __version__}
    for module, dist in _VERSIONED:
        if module not in sys.modules:
            continue
        version = getattr(sys.modules[module], "__version__", None)
        if not isinstance(version, str):
            try:
                from importlib.metadata import version as dist_version

                version = dist_version(dist)
            except Exception:
                version = None
        out[module] = version
    return out


# --- the process's agent ------------------------------------------------------------------------------------------
_agent: Agent | None = None
_agent_lock = threading.Lock()


def current_agent(*, create: bool = True) -> Agent | None:
    """This process's agent (a forked child gets its own, serving nothing until told)."""
    global _agent
    with _agent_lock:
        if _agent is None and create:
            _agent = Agent(runtime_dir())
            atexit.register(_agent.close)
        return _agent


def shutdown_agent() -> None:
    """Close this process's socket and forget every target (hooks removed); the next register() starts afresh."""
    global _agent
    with _agent_lock:
        agent, _agent = _agent, None
    if agent is not None:
        agent.close(wait=True)
    for target in _peft_targets:
        target.close()
    _peft_targets.clear()


def _forget_in_child() -> None:
    global _agent, _agent_lock
    _agent, _agent_lock = None, threading.Lock()
    forget_gates_in_child()


os.register_at_fork(after_in_child=_forget_in_child)


_peft_targets: list[PeftTarget] = []
_step_hook: Any = None
# Names a model's handshake keys in the job's store: the n-th registration of this process, on every rank the same
# when the ranks register alike. Never reused: a count of the models still alive would give a new model the keys of
# one collected at different moments on different ranks.
_registrations = itertools.count()


def register_peft_model(model: Any, run_dir: str | os.PathLike[str], *, optimizer: Any | None = None) -> PeftTarget:
    """The work behind `sidecar.preload.register`; returns the target (tests use it to look inside)."""
    run = os.path.realpath(os.fspath(run_dir))
    agent = current_agent()
    assert agent is not None
    for target in agent.targets():
        if isinstance(target, PeftTarget) and target._model() is model and target.run_dir == run:
            if optimizer is not None:
                target.add_optimizer(optimizer)
            return target
    target = PeftTarget(model, run, optimizer, index=next(_registrations))
    _install_step_hook()
    if expects_ranks():
        install_join_support(lambda: [t.ranks for t in _peft_targets if t.alive() and not t.gate.disabled])
    _peft_targets[:] = [t for t in _peft_targets if t.alive()] + [target]
    agent.add(target)
    return target


def _install_step_hook() -> None:
    """One global torch optimizer hook per process: every optimizer step is a boundary for the models it updates."""
    global _step_hook
    if _step_hook is not None:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            for target in list(_peft_targets):
                if not target.gate.disabled and target.alive() and target.owns_optimizer(optimizer):
                    target.gate.optimizer_stepped()
        except Exception:  # a hook must never break the training step it follows
            _log("step-hook", logging.WARNING, "fork-sidecar optimizer hook failed; forks may wait for their timeout")

    _step_hook = register_optimizer_step_post_hook(after_step)


@contextlib.contextmanager
def training_step() -> Iterator[None]:
    """Marks one training step of every registered model; forks wait until it ends (see the module docstring)."""
    gates = [t.gate for t in _peft_targets if t.alive() and not t.gate.disabled]
    for gate in gates:
        gate.explicit_enter()
    try:
        yield
    finally:
        for gate in gates:
            gate.explicit_exit()
