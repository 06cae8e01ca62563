"""fork-sidecar: makes a `.fork` marker in an ART run take effect on disk, in trainers and in vLLM."""

import sys as _sys

__all__ = ["__version__"]
__version__ = "0.1.0"

if _sys.argv[1:2] == ["run"]:  # the daemon: a SIGHUP while it still imports must not end it (early_signals.py)
    from sidecar.early_signals import hold_sighup as _hold_sighup

    _hold_sighup()
