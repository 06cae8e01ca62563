"""Where the etcd backend keeps what, under `coordination.etcd.prefix` (P):

P/members/NODE        this daemon and the runs its node serves, under its lease (gone when the daemon is: dead,
                      frozen past the TTL, cut off, stopped)
P/serves/NODE         the runs its node serves, under no lease: trainers outlive their daemon (etcd_serves.py)
P/claims/RUN          the claim of the run at path RUN, under the claimer's lease: exactly one daemon creates it
P/progress/RUN        the claimed fork's journal record, without a lease: what an adopter resumes from
P/forks/FORK          a published fork and the nodes that must report on it, until its claimer releases it
P/reports/FORK/NODE   what NODE's stages did for FORK, under no lease, kept while P/forks/FORK exists
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["EtcdKeys"]


@dataclass(frozen=True)
class EtcdKeys:
    prefix: str  # without a trailing slash

    def claim(self, path: Path) -> str:
        """The claim of the run whose `.fork.inprogress` is `path`."""
        return f"{self.prefix}/claims{path.parent}"

    def progress(self, path: Path) -> str:
        return f"{self.prefix}/progress{path.parent}"

    def fork(self, fork_id: str = "") -> str:
        """A published fork's key; with no id, the prefix of them all."""
        return f"{self.prefix}/forks/{fork_id}"

    def report(self, fork_id: str, node: str = "") -> str:
        """NODE's report on a fork; with no node, the prefix of the fork's reports."""
        return f"{self.prefix}/reports/{fork_id}/{node}"

    def reports(self) -> str:
        """The prefix of every fork's reports (where the keys a watch of the fan-out covers end)."""
        return f"{self.prefix}/reports/"

    def member(self, node: str = "") -> str:
        """A daemon's membership; with no node, the prefix of them all."""
        return f"{self.prefix}/members/{node}"

    def serves(self, node: str = "") -> str:
        return f"{self.prefix}/serves/{node}"
