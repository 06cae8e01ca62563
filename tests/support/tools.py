"""External programs a test needs (etcd, promtool): found on PATH or named by an environment variable; missing, the
test is skipped with the install command, or failed where `make test` requires the program (FORK_SIDECAR_REQUIRE_*),
so CI cannot quietly lose those tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

__all__ = ["required_tool"]


def required_tool(name: str, *, override_env: str, require_env: str, install_hint: str) -> Path:
    """`override_env`'s value, else `name` on PATH; skips the calling test without it, fails it if `require_env`=1."""
    found = os.environ.get(override_env) or shutil.which(name)
    if found and os.access(found, os.X_OK):
        return Path(found)
    message = f"needs `{name}`: {install_hint} or point {override_env} at it"
    if os.environ.get(require_env) == "1":
        pytest.fail(f"{message} ({require_env}=1 is set, as `make test` does)", pytrace=False)
    pytest.skip(message)
