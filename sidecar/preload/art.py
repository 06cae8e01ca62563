"""OpenPipe ART glue: make a fork reach `UnslothService` without any change to ART or to the training script.

`UnslothService._state` (openpipe-art 0.5.17-0.5.23) is a `functools.cached_property` that builds the Unsloth
model, the PEFT model and the trainer once, from the newest step checkpoint, and keeps them: after a fork the
trainer would go on from the weights it started with. When `art.unsloth.service` is imported, the post-import hook
calls `on_art_service`, which patches the class in place:

- `__init__` and `__setstate__` record each live instance (weakly). `__setstate__` matters because in ART's
  shared mode the service is pickled into a spawned child process, where `__init__` never runs; the agent then
  lives in that child, next to the real `_state`.
- a `fork` for the instance's `output_dir` drops `_state` from the instance `__dict__` (never `hasattr`, which
  would build it), stops its background training task, frees the memory and records the forked checkpoint as
  pending. If a training call is running at that moment, the drop waits until that call returns. The agent
  answers at once: "state dropped, load pending".
- `_state` is wrapped so that right after ART rebuilds it (at the point where ART itself first needs it, e.g.
  after putting vLLM to sleep in shared mode) the pending checkpoint is loaded with `load_adapter_from_checkpoint`,
  before any optimizer step. The result (digest or error) is logged with the fork id and kept for the agent's
  `status`, which `fork-sidecar status` shows.
- the training entries (`train`, `_train_dedicated`, `_train_shared`, `train_sft`; async generators in ART) are
  wrapped to know when training runs and, should a subclass build `_state` its own way, to load a pending
  checkpoint on entry.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from sidecar.preload import enabled
from sidecar.preload.agent import RESULT_PENDING, current_agent
from sidecar.protocol.messages import ForkRequest, error_reply, ok_reply

__all__ = ["ArtServices", "on_art_service", "patch_service_class", "tracked_services"]

SERVICE_CLASS = "UnslothService"
STATE_ATTR = "_state"
TRAINING_ENTRIES = ("train", "_train_dedicated", "_train_shared", "train_sft")
_PATCHED = "__fork_sidecar_patched__"
_STOP_TIMEOUT_S = 10.0


def _log(key: str, level: int, message: str, *args: object) -> None:
    from sidecar.preload.hooks import log_once

    log_once(key, level, message, *args)


# --- the post-import hook ----------------------------------------------------------------------------------------
def on_art_service(module: ModuleType) -> None:
    """Post-import hook for `art.unsloth.service` (see sidecar/preload/hook_table.py)."""
    if not enabled():
        return
    cls = getattr(module, SERVICE_CLASS, None)
    if not isinstance(cls, type):
        _log(
            "art-layout", logging.WARNING, "%s has no %s; forks will not reach ART here", module.__name__, SERVICE_CLASS
        )
        return
    patch_service_class(cls)


def patch_service_class(cls: type) -> bool:
    """Patch an UnslothService-like class in place (idempotent); False when its layout is not one we know."""
    if cls.__dict__.get(_PATCHED):
        return True
    state = cls.__dict__.get(STATE_ATTR)
    if not isinstance(state, functools.cached_property):
        _log(
            "art-layout",
            logging.WARNING,
            "%s.%s is not a cached_property (unsupported openpipe-art version); forks will not reach ART here",
            cls.__qualname__,
            STATE_ATTR,
        )
        return False
    _wrap_init(cls)
    _wrap_setstate(cls)
    setattr(cls, STATE_ATTR, _StateThenPendingLoad(state))
    for name in TRAINING_ENTRIES:
        fn = cls.__dict__.get(name)
        if callable(fn):
            setattr(cls, name, _wrap_training_entry(fn))
    setattr(cls, _PATCHED, True)
    return True


def _wrap_init(cls: type) -> None:
    original = cls.__dict__.get("__init__") or cls.__init__  # type: ignore[misc]

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _quietly(tracker().track, self)

    cls.__init__ = __init__  # type: ignore[misc]


def _wrap_setstate(cls: type) -> None:
    original = getattr(cls, "__setstate__", None)

    def __setstate__(self: Any, state: Any) -> None:
        if original is not None:
            original(self, state)
        else:  # what pickle does for a plain object without __setstate__
            attrs, slots = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
            if attrs:
                self.__dict__.update(attrs)
            for key, value in (slots or {}).items():
                setattr(self, key, value)
        _quietly(tracker().track, self)

    cls.__setstate__ = __setstate__  # type: ignore[attr-defined]


class _StateThenPendingLoad:
    """Wraps the `_state` cached_property: after ART builds the state, a pending fork is loaded into it.

    A non-data descriptor like cached_property itself, so once the value sits in the instance `__dict__` this is
    not even called; dropping the value from `__dict__` makes the next access build it again through here.
    """

    def __init__(self, inner: functools.cached_property[Any]) -> None:
        self.inner = inner
        self.attrname = inner.attrname
        self.func = inner.func
        self.__doc__ = inner.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.attrname = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        services = tracker()
        _quietly(services.before_build, instance)
        value = self.inner.__get__(instance, owner)
        _quietly(services.state_built, instance, value)
        return value


def _wrap_training_entry(fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def agen(self: Any, *args: Any, **kwargs: Any) -> Any:
            tracker().training_entered(self)
            try:
                async with contextlib.aclosing(fn(self, *args, **kwargs)) as inner:
                    async for item in inner:
                        yield item
            finally:
                tracker().training_exited(self)

        return agen
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def coro(self: Any, *args: Any, **kwargs: Any) -> Any:
            tracker().training_entered(self)
            try:
                return await fn(self, *args, **kwargs)
            finally:
                tracker().training_exited(self)

        return coro

    @functools.wraps(fn)
    def plain(self: Any, *args: Any, **kwargs: Any) -> Any:
        tracker().training_entered(self)
        try:
            return fn(self, *args, **kwargs)
        finally:
            tracker().training_exited(self)

    return plain


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    """The ART side of the patch must never break ART: problems are logged once and swallowed."""
    try:
        fn(*args)
    except Exception:
        _log(f"art-hook:{getattr(fn, '__name__', fn)}", logging.WARNING, "fork-sidecar ART hook %s failed", fn)


# --- the target: live services -----------------------------------------------------------------------------------
@dataclass
class _Pending:
    fork_id: str
    checkpoint_dir: Path
    expected_digest: str | None
    since: float


@dataclass
class _Tracked:
    ref: weakref.ref[Any]
    run_dir: str
    training: int = 0  # training calls in progress (nested entries count)
    drop_after_training: bool = False
    dropped_since_build: bool = False
    pending: _Pending | None = None
    last: dict[str, Any] | None = None


class ArtServices:
    """The agent target for every live UnslothService of this process."""

    kind = "art"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._by_id: dict[int, _Tracked] = {}

    # tracking ---------------------------------------------------------------------------------------------------
    def track(self, service: Any) -> _Tracked:
        key = id(service)
        with self._lock:
            entry = self._by_id.get(key)
            if entry is not None and entry.ref() is service:
                return entry
            output_dir = service.__dict__.get("output_dir")
            run = os.path.realpath(os.fspath(output_dir)) if output_dir else ""
            entry = _Tracked(weakref.ref(service, functools.partial(self._forget, key)), run)
            self._by_id[key] = entry
        agent = current_agent()
        if agent is not None:
            agent.add(self)
        return entry

    def _forget(self, key: int, ref: weakref.ref[Any]) -> None:
        with self._lock:
            entry = self._by_id.get(key)
            if entry is not None and entry.ref is ref:
                del self._by_id[key]

    def _live(self) -> list[tuple[Any, _Tracked]]:
        with self._lock:
            pairs = [(e.ref(), e) for e in self._by_id.values()]
        return [(s, e) for s, e in pairs if s is not None]

    # Target -----------------------------------------------------------------------------------------------------
    def alive(self) -> bool:
        return bool(self._live())

    def serves(self) -> list[str]:
        return sorted({e.run_dir for _, e in self._live() if e.run_dir})

    def fork(self, request: ForkRequest, checkpoint_dir: Path) -> dict[str, Any]:
        run = os.path.realpath(request.run_dir)
        matched = [(s, e) for s, e in self._live() if e.run_dir == run]
        if not matched:
            return error_reply("not_serving", f"no ART service of pid {os.getpid()} trains {run}")
        pending = _Pending(request.fork_id, checkpoint_dir, request.digest, time.time())
        states = [self._drop(service, entry, pending) for service, entry in matched]
        dropped = "dropped" in states
        return ok_reply(
            result=RESULT_PENDING,
            message="state dropped, load pending" if dropped else "load pending",
            state=states[0] if len(set(states)) == 1 else states,
            services=len(matched),
        )

    def _drop(self, service: Any, entry: _Tracked, pending: _Pending) -> str:
        with self._lock:
            entry.pending = pending  # a newer fork replaces an older one that was not loaded yet
            if entry.training:
                entry.drop_after_training = True
                return "drop deferred until the running training call returns"
            state = service.__dict__.pop(STATE_ATTR, None)
            if state is None:
                return "not built"
            entry.dropped_since_build = True
        _release(state)
        return "dropped"

    def describe(self) -> dict[str, Any]:
        services = []
        for service, e in self._live():
            services.append(
                {
                    "model_name": service.__dict__.get("model_name"),
                    "run_dir": e.run_dir,
                    "state_built": STATE_ATTR in service.__dict__,
                    "training": e.training > 0,
                    "pending": None if e.pending is None else {"fork_id": e.pending.fork_id, "since": e.pending.since},
                    "last_load": e.last,
                }
            )
        return {"kind": self.kind, "services": services}

    # hooks ------------------------------------------------------------------------------------------------------
    def before_build(self, service: Any) -> None:
        entry = self.track(service)
        if entry.dropped_since_build:
            # The old state may have lingered until its training task stopped: give its memory back first.
            entry.dropped_since_build = False
            _free_memory()

    def state_built(self, service: Any, state: Any) -> None:
        entry = self.track(service)
        with self._lock:
            pending, entry.pending = entry.pending, None
        if pending is not None:
            self._load(service, entry, state, pending)

    def training_entered(self, service: Any) -> None:
        entry = self.track(service)
        with self._lock:
            entry.training += 1
            outermost = entry.training == 1
            built = service.__dict__.get(STATE_ATTR)
            pending = entry.pending if outermost and built is not None and not entry.drop_after_training else None
            if pending is not None:
                entry.pending = None
        if pending is not None:  # the state was built some other way (a subclass): load before training starts
            self._load(service, entry, built, pending)

    def training_exited(self, service: Any) -> None:
        entry = self.track(service)
        state = None
        with self._lock:
            entry.training = max(0, entry.training - 1)
            if not entry.training and entry.drop_after_training:
                entry.drop_after_training = False
                state = service.__dict__.pop(STATE_ATTR, None)
                entry.dropped_since_build = state is not None
        if state is not None:
            _release(state)

    def _load(self, service: Any, entry: _Tracked, state: Any, pending: _Pending) -> None:
        from sidecar.preload.peft_load import AdapterLoadError, load_adapter_from_checkpoint

        started = time.monotonic()
        result: dict[str, Any] = {"fork_id": pending.fork_id, "run_dir": entry.run_dir, "deferred": True}
        optimizer = getattr(getattr(state, "trainer", None), "optimizer", None)
        try:
            digest = load_adapter_from_checkpoint(
                state.peft_model, pending.checkpoint_dir, optimizers=[optimizer] if optimizer is not None else []
            )
        except AdapterLoadError as e:
            result.update(ok=False, result="load failed", error=str(e))
        except Exception as e:  # a load bug must not take ART down; it is reported instead
            result.update(ok=False, result="load failed", error=f"{e!r}")
        else:
            result.update(ok=True, result="loaded", digest=digest)
            if pending.expected_digest and digest != pending.expected_digest:
                result["error"] = (
                    f"loaded {digest}, but fork {pending.fork_id} announced {pending.expected_digest}: "
                    f"{pending.checkpoint_dir} changed in between"
                )
        result["seconds"] = round(time.monotonic() - started, 4)
        entry.last = result
        agent = current_agent()
        if agent is not None:
            agent.record(result)
        ok = result.get("ok") and "error" not in result
        _log(
            f"art-load:{pending.fork_id}:{id(service)}",
            logging.INFO if ok else logging.ERROR,
            "fork %s: %s into ART service %s from %s (%s)",
            pending.fork_id,
            result["result"],
            service.__dict__.get("model_name"),
            pending.checkpoint_dir,
            result.get("error") or result.get("digest"),
        )


def _release(state: Any) -> None:
    """Stop what keeps a dropped training state alive and hand its memory back."""
    task = getattr(state, "train_task", None)
    if task is not None and not task.done():
        _stop_training_task(state, task)
    del state
    _free_memory()


def _stop_training_task(state: Any, task: Any) -> None:
    # ART 0.5.18 runs `trainer.train()` as a background asyncio task fed through a queue; left running it would
    # pin the old model and optimizer. Stop it on its own loop, the way ART's `aclose` does.
    import asyncio

    loop = task.get_loop()
    stop = getattr(state, "stop_background_training", None)
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None and running is loop:  # on ART's own loop (a drop deferred to a training call's end)
        if stop is not None:
            running.create_task(stop())
        else:
            task.cancel()
        return
    if loop.is_closed():
        return
    if stop is None:
        loop.call_soon_threadsafe(task.cancel)
        return
    future = asyncio.run_coroutine_threadsafe(stop(), loop)
    try:
        future.result(timeout=_STOP_TIMEOUT_S)
    except Exception:
        loop.call_soon_threadsafe(task.cancel)


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()


# --- the process's tracker ---------------------------------------------------------------------------------------
_tracker = ArtServices()


def tracker() -> ArtServices:
    return _tracker


def tracked_services() -> list[Any]:
    """The live UnslothService instances of this process (for tests and status)."""
    return [s for s, _ in _tracker._live()]


def _forget_in_child() -> None:
    global _tracker
    _tracker = ArtServices()


os.register_at_fork(after_in_child=_forget_in_child)
