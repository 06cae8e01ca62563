"""Which openpipe-art the preload was tested with, and whether another version still has what the preload relies on.

The preload patches ART from outside (sidecar/preload/art.py, art_fork.py), so it depends on a handful of ART
internals. `probe_art(python)` reads them from ART's source in that interpreter's environment, with `ast` and without
importing ART (which takes seconds and pulls in torch): the fork method and its signature, where ART stores a run
(`_storage_name`, `get_output_dir_from_model_properties`), `UnslothService._state` as a `functools.cached_property`,
`output_dir`, and the training entries the preload wraps (sidecar/preload/art_probe.py). `verdict` turns that into one
line and a problem or not.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sidecar.preload.probe import run_python_probe

__all__ = ["TESTED_ART_VERSIONS", "ArtCheck", "ArtInfo", "probe_art"]

# Each of these runs in `make test` against the real package (tests/test_art.py, tests/test_art_fork.py).
TESTED_ART_VERSIONS = ("0.5.18", "0.5.23")

# The probe runs in the target interpreter as a file, through runpy so that sys.path stays as that environment has it.
_PROBE = Path(__file__).with_name("art_probe.py")
_RUN_PROBE = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


@dataclass(frozen=True)
class ArtCheck:
    name: str  # the ART internal, e.g. "UnslothService._state"
    found: bool  # present in the shape the preload relies on
    detail: str  # what is there


@dataclass(frozen=True)
class ArtInfo:
    version: str | None  # openpipe-art's distribution version, None when ART is not installed there
    checks: tuple[ArtCheck, ...]

    @property
    def installed(self) -> bool:
        return self.version is not None

    @property
    def tested(self) -> bool:
        return self.version in TESTED_ART_VERSIONS

    @property
    def missing(self) -> list[ArtCheck]:
        return [c for c in self.checks if not c.found and c.name != "Model._storage_name"]

    def verdict(self) -> tuple[bool, str]:
        """(a problem?, one line): ART absent or a version with everything the preload relies on is no problem."""
        if not self.installed:
            return False, "openpipe-art is not installed there"
        tested = ", ".join(TESTED_ART_VERSIONS)
        if not self.checks:
            return True, f"openpipe-art {self.version} is installed but its source could not be read"
        if self.missing:
            gone = "; ".join(f"{c.name}: {c.detail}" for c in self.missing)
            return True, f"openpipe-art {self.version} lacks what the preload relies on ({gone})"
        if self.tested:
            return False, f"openpipe-art {self.version}: a tested version"
        return (
            False,
            f"openpipe-art {self.version}: untested (tested: {tested}); every ART internal the preload uses is there",
        )

    def to_json(self) -> dict[str, Any]:
        problem, line = self.verdict()
        return {
            "version": self.version,
            "tested": self.tested,
            "problem": problem,
            "note": line,
            "checks": [asdict(c) for c in self.checks],
        }

    def lines(self) -> list[str]:
        """For `preload status`: the verdict, and for an untested or changed ART each internal and what is there."""
        _, line = self.verdict()
        out = [f"ART:           {line}"]
        if self.installed and (not self.tested or self.missing):
            out += [f"  {'ok     ' if c.found else 'MISSING'} {c.name}: {c.detail}" for c in self.checks]
        return out


def probe_art(executable: str) -> ArtInfo:
    """Read ART's version and internals in `executable`'s environment; ART counts as absent if the probe fails."""
    try:
        done = run_python_probe(executable, _RUN_PROBE, str(_PROBE))
        info = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        info = {}
    checks = tuple(
        ArtCheck(str(c.get("name")), bool(c.get("found")), str(c.get("detail")))
        for c in info.get("checks") or []
        if isinstance(c, dict)
    )
    version = info.get("version")
    return ArtInfo(version if isinstance(version, str) else None, checks)
