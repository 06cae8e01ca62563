"""The real openpipe-art environments the ART tests run in, one per supported version.

`make test` links them into the clone (tests/support/cached_venv.py builds each once per machine): `.venv-art` is
openpipe-art 0.5.18 on Python 3.11 (its last release for 3.11), `.venv-art-0.5.23` is 0.5.23 on Python 3.12. A
missing one skips its tests with the command that builds it, except under `make test`, which sets
FORK_SIDECAR_REQUIRE_ART=1 so that the version matrix cannot quietly shrink.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

__all__ = ["ART_VERSIONS", "art_python"]

_VENVS = {
    "0.5.18": os.environ.get("FORK_SIDECAR_ART_VENV") or str(REPO / ".venv-art"),
    "0.5.23": os.environ.get("FORK_SIDECAR_ART_VENV_0_5_23") or str(REPO / ".venv-art-0.5.23"),
}
ART_VERSIONS = tuple(_VENVS)


def art_python(version: str) -> Path:
    """The interpreter of the venv holding openpipe-art `version`; skips (or fails, under `make test`) without it."""
    venv = Path(_VENVS[version])
    if not (venv / ".installed").exists():
        message = f"{venv} (openpipe-art {version}) is not built; run `make art-venvs`"
        if os.environ.get("FORK_SIDECAR_REQUIRE_ART") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return venv / "bin" / "python"
