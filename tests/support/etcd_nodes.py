"""Daemons on several simulated nodes of one host, coordinated through a real etcd (tests/support/etcd_server.py):
each with its own node.name, state dir, runtime dir and log, all watching one shared art root."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.daemon import DaemonProcess, wait_for, write_config

if TYPE_CHECKING:
    from sidecar.claims.etcd import EtcdClaims

__all__ = ["LEASE_TTL", "Node", "all_history", "etcd_claims", "prom", "settled_history", "start_all"]

LEASE_TTL = "2s"


class Node:
    """One node: its daemon, its state and runtime dirs, its config (written by `configure`)."""

    def __init__(self, base: Path, name: str, art: Path) -> None:
        self.name = name
        self.dir = base / name
        self.dir.mkdir(parents=True)
        self.art = art
        self.state = self.dir / "state"
        self.runtime = Path(tempfile.mkdtemp(prefix=f"fs-{name}-", dir="/tmp"))  # short: agent socket paths
        # Outside tmp_path, so pytest does not remove it: gone with the Node, or at exit (1,900 were left behind).
        weakref.finalize(self, shutil.rmtree, self.runtime, True)
        self.config = self.dir / "config.yaml"
        self.daemon = DaemonProcess(self.config, self.dir / "daemon.log")

    def configure(self, endpoints: list[str], sections: dict[str, Any] | None = None, **etcd: Any) -> None:
        """Its config: etcd at `endpoints` (with the `etcd` keys given), plus top-level `sections` merged in."""
        write_config(
            self.config,
            [self.art],
            self.state,
            self.runtime,
            node={"name": self.name},
            coordination={"backend": "etcd", "etcd": {"endpoints": endpoints, "lease_ttl": LEASE_TTL, **etcd}},
            metrics={"textfile": str(self.dir / "metrics.prom")},
            **(sections or {}),
        )

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state / "status.json").read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def history(self) -> list[dict[str, Any]]:
        try:
            lines = (self.state / "history.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def journaled(self) -> list[Path]:
        return sorted((self.state / "forks").glob("*.json")) if (self.state / "forks").is_dir() else []


def all_history(nodes: list[Node]) -> list[dict[str, Any]]:
    return [line for node in nodes for line in node.history()]


def start_all(nodes: list[Node]) -> None:
    """Start every node's daemon and wait until each sees all of them as members."""
    for node in nodes:
        node.daemon.start()
    count = len(nodes)
    wait_for(lambda: all(n.status().get("coordination", {}).get("members") == count for n in nodes), 20, "all members")


def prom(nodes: list[Node]) -> str:
    """Every node's metrics textfile, one after the other."""
    return "\n".join((n.dir / "metrics.prom").read_text() for n in nodes if (n.dir / "metrics.prom").exists())


def settled_history(nodes: list[Node], count: int) -> list[dict[str, Any]]:
    """The nodes' history lines once `count` are filed (they follow the outcome files) and a moment more, in which
    a duplicate fork, if any node made one, would be filed too."""
    wait_for(lambda: len(all_history(nodes)) >= count, 20, f"{count} history line(s)")
    time.sleep(0.5)
    return all_history(nodes)


@contextlib.contextmanager
def etcd_claims(base: Path, art: Path, endpoints: list[str], name: str = "node-0") -> Iterator[EtcdClaims]:
    """Node `name`'s claims backend in this process (no daemon), its lease granted."""
    # Imported here: the etcd client is an optional extra, and the modules importing this one drive daemons too.
    from sidecar.claims.etcd import EtcdClaims
    from sidecar.config import load_config

    node = Node(base, name, art)
    node.configure(endpoints)
    claims = EtcdClaims(load_config(node.config))
    try:
        wait_for(claims.usable, 20, "the etcd lease")
        yield claims
    finally:
        claims.close()
        shutil.rmtree(node.runtime, ignore_errors=True)  # made under /tmp (short socket paths), not tmp_path
