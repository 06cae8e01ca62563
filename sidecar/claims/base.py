"""The claim interface every coordination backend implements, and what all of them share.

The uvicorn-reloader pattern: `Claims` does the whole job as the shared filesystem alone allows it (the marker taken
by one atomic rename, a claim record beside it naming its claimer, adoption once that claimer is gone), and a backend
overrides only the few methods where it knows better: how a claim is taken (`take`), kept alive (`renew`), let go
(`release`) and how a dead claimer is told from a live one (`claimer_gone`).
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.config import Config
from sidecar.marker import MARKER_SETTLE_S

if TYPE_CHECKING:
    from sidecar.fanout import Gathered
    from sidecar.journal import ForkRecord

__all__ = [
    "ClaimFiles",
    "ClaimInDoubt",
    "ClaimLost",
    "ClaimRegistry",
    "Claims",
    "claim_info",
    "wait_until_settled",
]


class ClaimLost(Exception):
    """Another daemon holds this fork's claim now: the fork stops at once, with no outcome (the other's counts)."""


class ClaimInDoubt(ClaimLost):
    """The daemon stops while it cannot tell whether the claim is still its own: the fork stops acting, and its
    journal record stays for the next start (which resumes it, or drops it if another daemon took it over)."""


class ClaimFiles(Protocol):
    """The run-side operations a claim needs (run_io.RunIO has them, done as the run's owner)."""

    def claim(self) -> bool: ...
    def claim_state(self) -> dict[str, Any] | None: ...
    def write_claim(self, info: dict[str, Any]) -> None: ...
    def heartbeat(self, info: dict[str, Any]) -> None: ...


class ClaimRegistry:
    """The `.fork.inprogress` files this daemon holds, the RunIO that writes them and their content (heartbeats)."""

    def __init__(self) -> None:
        self._claims: dict[Path, tuple[ClaimFiles, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def hold(self, path: Path, io: ClaimFiles, info: dict[str, Any]) -> None:
        with self._lock:
            self._claims[path] = (io, info)

    def release(self, path: Path, io: ClaimFiles | None = None) -> dict[str, Any] | None:
        """Stop renewing `path`; with `io`, only if that RunIO registered it (another hold of the same run, such as
        start-up leftover collection beside a running fork, must not stop the fork's heartbeats). Returns the
        claim's record when it was released."""
        with self._lock:
            held = self._claims.get(path)
            if held is not None and (io is None or held[0] is io):
                del self._claims[path]
                return held[1]
            return None

    def items(self) -> list[tuple[Path, ClaimFiles, dict[str, Any]]]:
        with self._lock:
            return [(path, io, info) for path, (io, info) in self._claims.items()]

    def fork_ids(self) -> set[str]:
        return {str(info.get("fork_id")) for _, _, info in self.items()}


class Claims:
    """Claims as the shared filesystem makes them; see the module docstring for what a backend overrides."""

    backend = "filesystem"

    def __init__(self, config: Config) -> None:
        self.config = config
        # Runs this node's stages for a fork another node published, returning their outcomes (set by the daemon).
        self.on_published: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.host = socket.gethostname()
        self.registry = ClaimRegistry()

    def reconfigure(self, config: Config) -> None:
        """A SIGHUP's new configuration; claims held go on under it."""
        self.config = config

    # --- what a backend may override ----------------------------------------------------------------------------
    def take(self, path: Path, io: ClaimFiles) -> bool:
        """Claim the marker whose claim is `path` (a run's `.fork.inprogress`, as every path here); False when
        there is no marker or it is claimed already."""
        return io.claim()

    def renew(self) -> None:
        """Keep every claim held alive (called periodically by the daemon's main loop; never blocks on a copy)."""
        for _path, io, info in self.registry.items():
            info["heartbeat_at"] = time.time()
            io.heartbeat(info)

    def release(self, path: Path, io: ClaimFiles | None = None) -> None:
        """The fork of `path` has ended or given its claim back (see ClaimRegistry.release for `io`)."""
        self.registry.release(path, io)

    def claimer_gone(self, info: dict[str, Any], path: Path | None = None) -> bool:
        """Whether the claimer named by the claim record `info` (of the claim at `path`) is dead."""
        raise NotImplementedError

    def adopt(self, path: Path, info: dict[str, Any] | None) -> bool:
        """Take over the claim at `path` whose claimer is gone; False when another daemon was first."""
        return True  # on the filesystem alone, the adopter rewrites the claim record: nothing more to take

    def publish(self, path: Path, record: ForkRecord, budget: float) -> None:
        """After the swap of the fork claimed at `path`: tell the other nodes serving the run (etcd backend)."""

    def gather(self, path: Path, record: ForkRecord, budget: float) -> Gathered | None:
        """The other nodes' reports on a published fork, waiting at most `budget` seconds; None: a single node."""
        return None

    def reclaim(self, path: Path) -> bool:
        """A restarted daemon resumes its fork of `path`: take its claim again; False when another daemon holds it."""
        return True  # on the filesystem alone, the claim record names this host and the daemon rewrites it

    def give_back(self, path: Path) -> None:
        """Undo an `adopt` that turned out to be too late (the claim at `path` ended meanwhile)."""

    def recorded(self, path: Path, fork_id: str) -> dict[str, Any] | None:
        """The journal record the dead claimer of `fork_id` left for an adopter, if the backend keeps one."""
        return None

    def progress(self, path: Path, record: dict[str, Any]) -> None:
        """A fork of `path` reached a new state (its journal record): keep it for an adopter if the backend can."""

    def check(self, path: Path) -> None:
        """Raises ClaimLost when the claim at `path` is known to be another daemon's now."""

    def confirm(self, path: Path) -> None:
        """Before the outcome is written: raises ClaimLost unless the claim at `path` is still ours."""

    def stopping(self) -> None:
        """The daemon stops: a fork waiting on the backend gives up now (ClaimInDoubt), leaving its journal record."""

    def usable(self) -> bool:
        """Whether claims can be taken now (a backend with a server says no while it cannot reach it)."""
        return True

    def wait_for_coordination(self, run: Path) -> None:
        """Remember a run whose marker was left unclaimed because claims cannot be taken now."""

    def take_waiting(self) -> list[Path]:
        """The runs left waiting, once claims can be taken again (each returned once)."""
        return []

    def waiting_count(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        """What `status` and `doctor` say about coordination."""
        return {"backend": self.backend, "up": self.usable()}

    def close(self) -> None:
        """The daemon stops: whatever the backend holds open is let go (claims held stay on record for resumes)."""

    # --- shared by every backend ---------------------------------------------------------------------------------
    def claimer(self) -> dict[str, Any]:
        return {"host": self.host, "pid": os.getpid(), "state_dir": str(self.config.state_dir)}

    def record(self, path: Path, io: ClaimFiles, fork_id: str, request: dict[str, Any], raw: str) -> None:
        """Replace the claimed marker with the claim's record and hold it (renewed until released)."""
        # Host, pid and a heartbeat let another daemon on a shared filesystem tell a live claim from a dead one.
        info = {
            "fork_id": fork_id,
            "claimed_by": self.claimer(),
            "heartbeat_at": time.time(),
            "request": request,
            "marker": raw,
        }
        io.write_claim(info)
        self.registry.hold(path, io, info)

    def holds(self, fork_id: str) -> bool:
        return fork_id in self.registry.fork_ids()

    def adoptable(self, path: Path, state: dict[str, Any] | None, journaled: bool) -> bool:
        """Whether the `.fork.inprogress` at `path` described by `state` (RunIO.claim_state) has lost its claimer;
        `journaled`: its fork is in this daemon's journal (ours, being resumed)."""
        if state is None:
            return False
        info = claim_info(state)
        if info is not None:
            return not journaled and self.claimer_gone(info, path)
        # Its claimer may be another host's daemon between its claim (which set the ctime) and its record.
        return time.time() - float(state["ctime"]) >= self.config.timeouts.orphan_claim


def claim_info(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The claim record in a RunIO.claim_state, if the claim is a regular file holding one."""
    data = state.get("info") if state is not None and state.get("regular") else None
    return data if isinstance(data, dict) and "claimed_by" in data else None


def wait_until_settled(marker: Path) -> None:
    """Until the regular file `marker` has been left alone for MARKER_SETTLE_S (bounded: about 10 s)."""
    for _ in range(40):  # a marker rewritten forever is taken after about 10 s anyway
        try:
            st = os.lstat(marker)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
        age = time.time() - st.st_mtime
        if age >= MARKER_SETTLE_S or age < -1.0:  # a clock step backwards must not stall the run
            return
        time.sleep(MARKER_SETTLE_S - age)
