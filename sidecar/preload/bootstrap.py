"""What the preload's `.pth` line imports at interpreter start: arms the post-import hooks, nothing else (stdlib only).

Importing this module arms every entry of `hook_table.POST_IMPORT_HOOKS` lazily: the "package.module:function"
target is imported only when the watched module itself is imported, so a trainer that never imports Unsloth or
ART loads nothing more than this module, `hooks` and `hook_table`. `FORK_SIDECAR_PRELOAD=0` turns it off for one
process. Arming twice (a second copy, a reload) is a no-op; any failure is logged once and the process goes on.
"""

from __future__ import annotations

from sidecar.preload import is_disabled

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

__all__ = ["arm"]


def _lazy_target(target: str) -> Callable[[ModuleType], None]:
    """A callback that imports "package.module:function" only when it first runs, then calls it."""

    def run(module: ModuleType) -> None:
        import importlib

        module_name, _, function_name = target.partition(":")
        function = getattr(importlib.import_module(module_name), function_name)
        function(module)

    run.__qualname__ = f"lazy({target})"
    return run


def arm() -> bool:
    """Register every post-import hook of the table; False when disabled by the environment."""
    if is_disabled():
        return False
    from sidecar.preload import hooks
    from sidecar.preload.hook_table import POST_IMPORT_HOOKS

    for module_name, target in POST_IMPORT_HOOKS.items():
        hooks.when_imported(module_name, _lazy_target(target), key=target)
    return True


def _arm_quietly() -> None:
    try:
        arm()
    except Exception:
        try:
            import logging

            from sidecar.preload.hooks import log_once

            log_once("bootstrap-failed", logging.WARNING, "preload disabled: arming failed", exc_info=True)
        except Exception:  # never let the preload stop an interpreter from starting
            pass


_arm_quietly()
