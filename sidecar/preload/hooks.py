"""Post-import hooks: run a callback right after a named module has executed (stdlib only).

A `sys.meta_path` finder watches the registered module names. When one is imported it lets the other finders find
the module, wraps the loader only for the duration of `exec_module`, and calls the callbacks with the fresh module;
a module that is already imported gets its callbacks at once. The registry lives on the finder object in
`sys.meta_path`, so a second copy of this module (another install, a reload) shares it instead of arming twice.

Callbacks must not break the import they observe: an exception is logged once per callback and swallowed.
"""

from __future__ import annotations

import _thread
import sys

# This module is imported at every interpreter start where the preload is installed: keep its imports to what
# the interpreter has already loaded (typing, threading and logging are not, and cost milliseconds).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    Callback = Callable[[ModuleType], None]

__all__ = ["LOGGER_NAME", "log_once", "watched_modules", "when_imported"]

LOGGER_NAME = "sidecar.preload"

_FINDER_MARK = "fork_sidecar_post_import_finder"
_logged: set[str] = set()
_log_lock = _thread.allocate_lock()


def log_once(key: str, level: int, message: str, *args: object, exc_info: bool = False) -> None:
    """Log `message` to logger `sidecar.preload` the first time `key` is seen in this process; never raise.

    The host application owns logging: when it configured any handler we go through it (its levels and formats
    win). When nothing is configured, records of INFO and above go to stderr directly instead of being dropped
    by logging's last-resort handler (which shows WARNING only); we never install a handler of our own.
    """
    with _log_lock:
        if key in _logged:
            return
        _logged.add(key)
    try:
        import logging

        logger = logging.getLogger(LOGGER_NAME)
        if logger.hasHandlers():
            logger.log(level, message, *args, exc_info=exc_info)
        elif level >= logging.INFO:
            record = logger.makeRecord(LOGGER_NAME, level, __file__, 0, message, args, None)
            text = record.getMessage()
            if exc_info:
                import traceback

                text += "\n" + traceback.format_exc().rstrip()
            sys.stderr.write(f"fork-sidecar preload: {text}\n")
    except Exception:  # logging must never be what breaks a trainer
        pass


class _Registry:
    """Callbacks per module name, each with a key so that arming the same hook twice registers it once."""

    def __init__(self) -> None:
        self.lock = _thread.RLock()
        self.callbacks: dict[str, dict[str, Callback]] = {}
        # Callbacks registered while their module was still executing (e.g. from a hook that runs inside that
        # module's import chain): run as soon as an import notices the module has finished.
        self.pending: list[tuple[str, str, Callback, ModuleType]] = []
        self.executing: set[str] = set()  # modules running under our loader wrapper: their callbacks come after

    def add(self, module_name: str, key: str, callback: Callback) -> bool:
        with self.lock:
            per_module = self.callbacks.setdefault(module_name, {})
            if key in per_module:
                return False
            per_module[key] = callback
            return True

    def for_module(self, module_name: str) -> list[tuple[str, Callback]]:
        with self.lock:
            return list(self.callbacks.get(module_name, {}).items())

    def take_finished(self) -> list[tuple[str, str, Callback, ModuleType]]:
        """Remove and return the pending callbacks whose module has finished executing."""
        with self.lock:
            finished = [entry for entry in self.pending if not _is_initializing(entry[3])]
            self.pending = [entry for entry in self.pending if _is_initializing(entry[3])]
            return finished


class _HookedLoader:
    """Delegates to the real loader and runs the callbacks once `exec_module` has returned."""

    def __init__(self, loader: Any, registry: _Registry) -> None:
        self._loader = loader
        self._registry = registry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back before the module runs: importlib.resources, inspect, reload() and anything
        # else that looks at __loader__ / __spec__.loader must never see this wrapper.
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        name = module.__name__
        self._registry.executing.add(name)
        try:
            self._loader.exec_module(module)
        finally:
            self._registry.executing.discard(name)
        _run_callbacks(self._registry, name, module)
        _run_pending(self._registry)


class _PostImportFinder:
    """A meta path finder that never finds anything itself; it only wraps the loader of watched modules."""

    def __init__(self) -> None:
        setattr(self, _FINDER_MARK, True)
        self.registry = _Registry()
        self._busy = _thread._local()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if self.registry.pending:
            _run_pending(self.registry)
        if fullname not in self.registry.callbacks:
            return None
        busy: set[str] = self._busy.__dict__.setdefault("names", set())
        if fullname in busy:
            return None
        busy.add(fullname)
        try:
            spec = self._find_with_others(fullname, path, target)
        finally:
            busy.discard(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec  # namespace packages and legacy loaders: imported normally, callbacks not run
        spec.loader = _HookedLoader(loader, self.registry)
        return spec

    def _find_with_others(self, fullname: str, path: Any, target: Any) -> Any:
        for finder in list(sys.meta_path):
            if getattr(finder, _FINDER_MARK, False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def invalidate_caches(self) -> None:
        """Nothing cached here; present because importlib.invalidate_caches() calls it on every finder."""


_install_lock = _thread.allocate_lock()


def _finder() -> _PostImportFinder:
    """The process's one post-import finder, installed first in sys.meta_path on first use."""
    with _install_lock:
        for finder in sys.meta_path:
            if getattr(finder, _FINDER_MARK, False):
                return finder  # type: ignore[return-value]
        finder = _PostImportFinder()
        sys.meta_path.insert(0, finder)  # type: ignore[arg-type]
        return finder


def _run_callbacks(registry: _Registry, module_name: str, module: ModuleType) -> None:
    for key, callback in registry.for_module(module_name):
        _run_one(key, module_name, callback, module)


def _run_pending(registry: _Registry) -> None:
    for module_name, key, callback, module in registry.take_finished():
        if sys.modules.get(module_name) is module:  # not if the import failed and the module was dropped
            _run_one(key, module_name, callback, module)


def _run_one(key: str, module_name: str, callback: Callback, module: ModuleType) -> None:
    import logging

    try:
        callback(module)
    except Exception:
        log_once(
            f"hook-failed:{module_name}:{key}",
            logging.WARNING,
            "post-import hook %s for %s failed; the import went on without it",
            key,
            module_name,
            exc_info=True,
        )


def _is_initializing(module: ModuleType) -> bool:
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def when_imported(module_name: str, callback: Callback, *, key: str | None = None) -> None:
    """Call `callback(module)` right after `module_name` executes, and at once if it is already imported.

    The callback stays registered: if the module is removed from sys.modules and imported again, it runs again on
    the new module object (callbacks should be idempotent). Registered while the module is still executing (from
    inside its own import chain), it runs at the first import anywhere after the module has finished.
    `key` (default: the callback's qualified name) makes registration idempotent: a second registration with the
    same key for the same module is ignored.
    A callback that raises is logged once and never breaks the import.
    """
    if key is None:
        key = f"{getattr(callback, '__module__', '?')}:{getattr(callback, '__qualname__', repr(callback))}"
    finder = _finder()
    if not finder.registry.add(module_name, key, callback):
        return
    module = sys.modules.get(module_name)
    if module is None:
        return
    if not _is_initializing(module):
        _run_one(key, module_name, callback, module)
    elif module_name not in finder.registry.executing:
        # Still executing (we were called from inside its import chain) and not loaded through our wrapper:
        # the first import after it finishes runs the callback.
        with finder.registry.lock:
            finder.registry.pending.append((module_name, key, callback, module))


def watched_modules() -> dict[str, list[str]]:
    """Module name -> keys of the callbacks registered for it (for status output and tests)."""
    registry = _finder().registry
    with registry.lock:
        return {name: list(callbacks) for name, callbacks in registry.callbacks.items()}
