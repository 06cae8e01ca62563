"""Claims through etcd: a claim is a key created by a transaction bound to this daemon's lease.

Keys under `coordination.etcd.prefix` (P): see etcd_keys.py. A claimer that dies stops renewing its lease; etcd
deletes its keys when the TTL runs out (etcd's clock alone, no comparison between hosts' clocks), and the next daemon
to offer the run creates the claim and resumes the fork from P/progress/RUN. The marker files are taken as in
filesystem mode too, so `.fork.inprogress` still shows the claim.

While etcd cannot be reached, nothing is claimed or adopted: `usable()` is false, markers stay `.fork` and their
runs wait here until a keepalive passes again. A lease that expired meanwhile is replaced, and every claim held is
lost (etcd renews every lease when it restarts, so an expired one means etcd ran on while this daemon was frozen or
cut off, and another may have adopted): those forks stop without an outcome, the adopter's is the one that counts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sidecar.claims.base import ClaimFiles, ClaimInDoubt, ClaimLost
from sidecar.claims.etcd_client import EtcdAuthError, EtcdDown, EtcdSession, KeyValue
from sidecar.claims.etcd_fanout import EtcdFanOut
from sidecar.claims.etcd_keys import EtcdKeys
from sidecar.claims.etcd_serves import Serving, ServingSurvey
from sidecar.claims.etcd_watch import Changes
from sidecar.config import Config
from sidecar.states import ForkState

__all__ = ["EtcdClaims"]

log = logging.getLogger("sidecar.claims.etcd")
T = TypeVar("T")


class EtcdClaims(EtcdFanOut):
    backend = "etcd"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        etcd = config.coordination.etcd
        self.node = config.node.name
        self.keys = EtcdKeys(etcd.prefix.rstrip("/"))
        self.ttl = max(2, math.ceil(etcd.lease_ttl))
        self.session = EtcdSession(etcd, request_timeout=max(0.5, self.ttl / 4))
        self.lease: int | None = None
        self.problem: str | None = "connecting to etcd"
        self.keepalive_failures = 0
        self._renewed_at: float | None = None  # monotonic send time of the last keepalive (or grant) that passed
        self._lease_margin = max(0.5, self.ttl / 4)  # more than a keepalive's round trip, less than a TTL/3 period
        self.members = 0
        self._lost: set[Path] = set()
        # Writes etcd has not taken yet, each guarded by the claim it belongs to (its key and the lease it was under):
        # progress key -> (record, claim key, lease); claim key -> (lease, keys to delete with it, prefixes too).
        self._pending: dict[str, tuple[dict[str, Any], str, int]] = {}
        self._releases: dict[str, tuple[int, list[str], list[str]]] = {}
        self._unclaims: set[str] = set()  # our claim keys to delete once etcd answers
        self._fresh: dict[Path, int] = {}  # claims take() just created, with their lease, until their record
        self._waiting: set[Path] = set()
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._stopping = threading.Event()  # the daemon stops: forks waiting on etcd give up at once (stopping())
        self._changed = threading.Event()  # set whenever coordination comes up or goes down
        self._logged_down = False
        self._known_others: list[str] = []  # the other members at the keeper's last look
        self._survey = ServingSurvey(config)
        self._serving: Serving | None = None  # what this node serves, as the last survey found (None: not yet)
        self._serving_written: tuple[Serving, int] | None = None  # what etcd has, and under which lease
        # Published forks, members, progress and reports (the keys from forks/ to the end of reports/, in etcd's
        # order). Up to the end of `P/reports/`, not of `P/reports//` (an empty fork id's): that range ended before
        # every report key, so no report woke a gathering claimer, which waited out GATHER_POLL_S instead.
        self._changes = Changes(
            self.session, self.keys.prefix, self.keys.fork(), self.keys.reports(), self.node, self._heard
        )
        self._keeper = threading.Thread(target=self._keep, name="etcd-lease", daemon=True)
        self._keeper.start()
        self._listener = threading.Thread(target=self._listen, name="etcd-fanout", daemon=True)
        self._listener.start()
        self._surveyor = threading.Thread(target=self._keep_serving, name="etcd-serves", daemon=True)
        self._surveyor.start()

    # --- the lease -------------------------------------------------------------------------------------------
    def _keep(self) -> None:
        while not self._stop.is_set():
            try:
                self._renew_lease()
                self._flush_pending()
                names = sorted(kv.name for kv in self.session.get_prefix(self.keys.member()))
                self.members, self._known_others = len(names), [n for n in names if n != self.node]
                self._up()
            except (EtcdDown, EtcdAuthError) as e:
                self._down(str(e))
            self._stop.wait(self.ttl / 3 if self.problem is None else min(1.0, self.ttl / 3))

    def _renew_lease(self) -> None:
        sent = time.monotonic()  # etcd's TTL runs from no earlier than this: the lease is good until sent + TTL
        if self.lease is not None:
            try:
                ttl = self.session.keepalive(self.lease)
            except (EtcdDown, EtcdAuthError):
                self.keepalive_failures += 1
                raise
            if ttl > 0:
                self._renewed_at = sent
                return
            log.warning(
                "etcd lease %x expired (this daemon was cut off or frozen past %ss); taking a new one",
                self.lease,
                self.ttl,
            )
        lease = self.session.grant(self.ttl)
        self.session.put(self.keys.member(self.node), self._member(), lease)
        if self.lease is not None:
            self._lose_all()  # before the new lease counts as healthy: no fork may act on a claim of the old one
        self.lease, self._renewed_at = lease, sent

    def lease_healthy(self) -> bool:
        """Whether etcd surely still holds our lease, by this host's monotonic clock alone: the last keepalive that
        passed was sent less than the TTL minus a margin ago (a claimer cut off from etcd must stop acting before
        its lease can have expired and another daemon adopted its fork)."""
        renewed = self._renewed_at
        return renewed is not None and time.monotonic() - renewed < self.ttl - self._lease_margin

    def _lose_all(self) -> None:
        """Our lease expired while etcd kept running (etcd renews every lease when it restarts itself): another
        daemon may have adopted any claim we held, so every fork we were running stops without an outcome."""
        for path, _io, _info in self.registry.items():
            log.error("%s: claim lost with the expired lease; another daemon adopts the fork", path.parent)
            with self._state:
                self._lost.add(path)

    def _member(self) -> dict[str, Any]:
        serving = (self._serving or Serving()).to_json()
        return {"node": self.node, **self.claimer(), **serving}

    # --- what this node serves ---------------------------------------------------------------------------------
    def _keep_serving(self) -> None:
        """Survey what this node serves and keep etcd's two copies of it current (its own thread: an agent that is
        slow to answer must not hold up the lease's keepalives)."""
        while not self._stop.is_set():
            try:
                self._serving = self._survey.survey()
                self._write_serving()
            except (EtcdDown, EtcdAuthError):
                pass  # written once etcd answers: the record changes only with what the next survey finds
            except Exception:  # a bug here must not end the survey for the daemon's lifetime: the last record stays
                log.exception("surveying which runs this node serves failed; keeping the last record")
            self._stop.wait(max(1.0, self.ttl / 3))

    def _write_serving(self) -> None:
        serving, lease = self._serving, self.lease
        if serving is None or lease is None or self._serving_written == (serving, lease):
            return
        self.session.put(self.keys.serves(self.node), {"node": self.node, **serving.to_json()})
        self.session.put(self.keys.member(self.node), self._member(), lease)
        self._serving_written = (serving, lease)

    def _up(self) -> None:
        if self.problem is not None:
            if self._logged_down:
                log.warning("etcd answers again at %s; claiming resumes", ", ".join(self.session.endpoints))
            else:
                log.info("coordinating through etcd at %s as node %s", ", ".join(self.session.endpoints), self.node)
            self.problem = None
            self._logged_down = False
            self._changed.set()

    def _down(self, problem: str) -> None:
        if not self._logged_down:
            log.error("etcd unreachable, no marker is claimed until it answers: %s", problem)
            self._logged_down = True
        self.problem = problem
        self._changed.set()

    def _flush_pending(self) -> None:
        with self._state:
            pending, releases, unclaims = dict(self._pending), dict(self._releases), set(self._unclaims)
        for key, entry in pending.items():
            value, claim, under = entry
            self.session.put_if_key_lease(key, value, claim, under)  # not taken: the claim is an adopter's now
            with self._state:
                if self._pending.get(key) is entry:
                    del self._pending[key]
        for claim, (held, keys, prefixes) in releases.items():
            # One transaction under the claim's lease: an adopter's record, fork and reports are never deleted.
            self.session.delete_if_key_lease(claim, held, [*keys, claim], prefixes)
            with self._state:
                self._releases.pop(claim, None)
        lease = self.lease
        for key in unclaims:
            if lease is not None:
                self.session.delete_if_lease(key, lease)  # under an older lease it expired with that lease
            with self._state:
                self._unclaims.discard(key)

    def _later(self, key: str, value: dict[str, Any], claim: str, lease: int) -> None:
        """A write etcd did not take now: the keeper retries it once etcd answers (the newest one per key)."""
        with self._state:
            self._pending[key] = (value, claim, lease)

    # --- Claims ----------------------------------------------------------------------------------------------
    def usable(self) -> bool:
        return self.problem is None and self.lease is not None

    def wait_for_coordination(self, run: Path) -> None:
        with self._state:
            self._waiting.add(run)

    def take_waiting(self) -> list[Path]:
        if not self.usable():
            return []
        with self._state:
            waiting, self._waiting = sorted(self._waiting), set()
        return waiting

    def waiting_count(self) -> int:
        with self._state:
            return len(self._waiting)

    def take(self, path: Path, io: ClaimFiles) -> bool:
        lease = self.lease
        if lease is None or not self.usable():
            return False
        key = self.keys.claim(path)
        if self._deletes_queued(key):
            return False  # the keeper's queued delete of an earlier claim key would delete the new one: later
        value = {"node": self.node, "state": "claiming"}
        # (created, the key found instead), or None while etcd has not answered (the create may have committed).
        # The look at who must report on the fork, if it is taken, rides in this round trip (_publish_swapped).
        reads = (self.keys.member(), self.keys.serves())
        created = self._call(lambda: self.session.create_or_get_reading(key, value, lease, reads), None)
        answer, survey = (None, None) if created is None else (created[:2], created[2])
        if answer is not None and self._own_leftover(path, answer[1], lease):
            # A create that committed with its reply lost, or an io.claim() that raised: the key under our own
            # live lease would block the marker for as long as this daemon lives.
            deleted = self._call(lambda: self.session.delete_if_lease(key, lease), False)
            answer = self._call(lambda: self.session.create_or_get(key, value, lease), None) if deleted else None
            survey = None  # that create read nothing
        taken = False
        try:
            taken = answer is not None and answer[0] and io.claim()
            if taken:
                self._fresh[path] = lease
                if survey is not None:
                    self._surveys[key] = survey
        finally:
            if not taken and (answer is None or answer[0] or _under(answer[1], lease)):
                # Ours, or perhaps ours (unanswered, or answered "exists" for our own create retried on another
                # endpoint), with no claim to go with it: the keeper deletes it until etcd takes that. A create
                # refused for another daemon's claim leaves nothing to delete.
                with self._state:
                    self._unclaims.add(key)
                with contextlib.suppress(EtcdDown, EtcdAuthError):
                    self._flush_pending()
        return taken

    def _deletes_queued(self, key: str) -> bool:
        """Whether a delete of claim `key` waits for etcd (a release or an unclaim that did not get through): sent
        after a new claim of the same key under the same lease, it would delete that one (guarded by the lease only,
        and the record skip relies on nothing but the lease's expiry freeing the key). Tried once more here first."""
        with self._state:
            queued = key in self._releases or key in self._unclaims
        if queued:
            with contextlib.suppress(EtcdDown, EtcdAuthError):
                self._flush_pending()
            with self._state:
                queued = key in self._releases or key in self._unclaims
        return queued

    def _own_leftover(self, path: Path, found: KeyValue | None, lease: int) -> bool:
        """Whether `found`, the claim key of `path`, is under our lease while no fork of ours holds it."""
        return _under(found, lease) and all(p != path for p, _, _ in self.registry.items())

    def adopt(self, path: Path, info: dict[str, Any] | None) -> bool:
        lease = self.lease
        if lease is None:
            return False
        key = self.keys.claim(path)
        value = {"node": self.node, "state": "adopting", "from": (info or {}).get("claimed_by")}
        answer = self._call(lambda: self.session.create_or_get(key, value, lease), None)
        if answer is None:  # it may have committed: left under our live lease, it would block the adoption for good
            with self._state:
                self._unclaims.add(key)
            return False
        # Found under our own lease with no fork of ours: our create, whose reply was lost and which the session
        # sent again to another endpoint.
        return answer[0] or self._own_leftover(path, answer[1], lease)

    def renew(self) -> None:
        """Nothing to write: the lease is the heartbeat (the keeper renews it), and a claim file rewritten by a
        daemon that has just thawed could bring back a claim its adopter has already ended."""

    def give_back(self, path: Path) -> None:
        lease = self.lease
        if lease is not None:
            self._call(lambda: self.session.delete_if_lease(self.keys.claim(path), lease), False)

    def claimer_gone(self, info: dict[str, Any], path: Path | None = None) -> bool:
        if path is None or not self.usable():
            return False
        return self._call(lambda: self.session.get(self.keys.claim(path)) is None, False)

    def recorded(self, path: Path, fork_id: str) -> dict[str, Any] | None:
        """The journal record the claimer of `fork_id` left for `path`, if any (what an adopter resumes)."""
        found = self._call(lambda: self.session.get(self.keys.progress(path)), None)
        if found is None or found.value.get("fork_id") != fork_id:
            return None
        return found.value

    def record(self, path: Path, io: ClaimFiles, fork_id: str, request: dict[str, Any], raw: str) -> None:
        lease = self.lease
        # A claim this daemon's take created under the lease it still holds and renews is its own (only that lease's
        # expiry frees the key): the guard's round trip below is for when that is not known.
        fresh = self._fresh.pop(path, None) == lease
        # (The lease read again after the health check: the keeper may have replaced it between the two.)
        if lease is not None and not (fresh and self.lease_healthy() and self.lease == lease):
            value = {"fork_id": fork_id, "node": self.node, "claimed_by": self.claimer()}
            try:  # before the claim file: a claim that is another's now must not have its record overwritten
                ours = self.session.put_if_lease(self.keys.claim(path), value, lease)
            except (EtcdDown, EtcdAuthError):  # the key exists already; this only names the fork
                ours = True
            if not ours:
                raise ClaimLost(f"the claim of {path.parent} is no longer this daemon's (its lease expired)")
        super().record(path, io, fork_id, request, raw)

    def reclaim(self, path: Path) -> bool:
        """The claim key went with the previous daemon's lease: take it under ours, once that lease has expired if
        the key is still under it (this node's own); False when another node's live lease holds it."""
        key = self.keys.claim(path)
        value = {"node": self.node, "state": "resuming"}
        deadline = None
        while not self._stop.is_set():
            lease = self.lease
            if lease is not None and self.usable():
                deadline = deadline or time.monotonic() + 2 * self.ttl
                if self._call(functools.partial(self.session.create, key, value, lease), False):
                    return True
                found = self._call(lambda: self.session.get(key), None)
                if found is not None and (found.lease == lease or found.value.get("node") != self.node):
                    return found.lease == lease
                if time.monotonic() > deadline:
                    return False
            self._changed.wait(min(1.0, self.ttl / 4))
            self._changed.clear()
        return False

    def progress(self, path: Path, record: dict[str, Any]) -> None:
        key, claim, lease = self.keys.progress(path), self.keys.claim(path), self.lease
        if lease is None:
            return
        try:
            if record.get("state") == ForkState.SWAPPED.value:  # the swap recorded, and the fork published with it
                self._publish_swapped(path, record, lease)
                return
            ours = self.session.put_if_key_lease(key, record, claim, lease)
        except (EtcdDown, EtcdAuthError):  # publish() publishes it once etcd answers, if this did not
            self._later(key, record, claim, lease)
            return
        if not ours:
            raise ClaimLost(f"the claim of {path.parent} is no longer this daemon's (its lease expired)")

    def check(self, path: Path) -> None:
        """Before every step of a claimed fork: raises ClaimLost once the claim is known to be another's, and waits,
        acting on nothing, while the lease is not known to be healthy (it resumes once a keepalive passes again)."""
        paused = False
        while True:
            with self._state:
                lost = path in self._lost
            if lost:
                raise ClaimLost(f"the claim of {path.parent} passed to another daemon while this one was cut off")
            if self.lease_healthy():
                if paused:
                    log.warning("%s: etcd lease renewed again; the fork goes on", path.parent)
                return
            if self._stop.is_set() or self._stopping.is_set():
                raise ClaimInDoubt(f"the daemon stops while etcd has not renewed its lease ({self.problem})")
            if not paused:
                log.warning(
                    "%s: etcd lease not renewed for %.1fs (lease_ttl %ss): fork paused, acting on nothing until a "
                    "keepalive passes or the lease is known lost (another daemon then adopts the fork)",
                    path.parent,
                    time.monotonic() - (self._renewed_at or 0.0),
                    self.ttl,
                )
                paused = True
            self._stopping.wait(0.05)

    def confirm(self, path: Path) -> None:
        """Before the outcome: the claim must still be ours, as etcd says (waits while etcd cannot be reached, and
        gives up at once when the daemon stops: the next start resumes the fork)."""
        self.own_report_sent(path)
        while True:
            self.check(path)
            lease = self.lease
            if lease is not None and self.usable():
                try:
                    found = self.session.get(self.keys.claim(path))
                except (EtcdDown, EtcdAuthError):
                    found = None
                else:
                    if found is None or found.lease != lease:
                        raise ClaimLost(f"the claim of {path.parent} is no longer this daemon's (its lease expired)")
                    return
            if self._stopping.wait(0.25) or self._stop.is_set():
                raise ClaimInDoubt(f"the daemon stops before etcd confirmed the claim of {path.parent}")

    def stopping(self) -> None:
        self._stopping.set()
        self._changes.wake()  # a gather waiting for reports gives up now

    def release(self, path: Path, io: ClaimFiles | None = None) -> None:
        info = self.registry.release(path, io)
        self._fresh.pop(path, None)  # a fork that ended before its record
        self._forget(path, None if info is None else str(info.get("fork_id")))
        if info is None:
            return
        progress, claim, lease = self.keys.progress(path), self.keys.claim(path), self.lease
        fork_id = info.get("fork_id")
        with self._state:
            self._pending.pop(progress, None)  # a progress write still waiting must not come back
            if path in self._lost or lease is None:  # the keys are the adopter's now
                self._lost.discard(path)
                return
            forks = [self.keys.fork(str(fork_id))] if fork_id else []
            self._releases[claim] = (lease, [progress, *forks], [self.keys.report(str(fork_id))] if fork_id else [])
        with contextlib.suppress(EtcdDown, EtcdAuthError):  # else the keeper deletes them once etcd answers
            self._flush_pending()

    def _call(self, action: Callable[[], T], failed: T) -> T:
        """`action`'s result, or `failed` when etcd cannot answer (which also marks coordination down)."""
        try:
            return action()
        except (EtcdDown, EtcdAuthError) as e:
            self._down(str(e))
            return failed

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "up": self.usable(),
            "node": self.node,
            "endpoints": list(self.session.endpoints),
            "problem": self.problem,
            "members": self.members,
            "waiting": self.waiting_count(),
            "lease_keepalive_failures": self.keepalive_failures,
        }

    def close(self) -> None:
        self._stopping.set()
        self._stop.set()
        self._changes.close()
        self._keeper.join(timeout=5)
        self._surveyor.join(timeout=5)
        # Claims held stay under the lease until it runs out, so a fork journaled now is resumed by the next start
        # or adopted elsewhere; only the membership goes at once. What the node still serves is surveyed once more
        # and stays (P/serves/NODE): its trainers outlive this daemon, and a fork published while it is down must
        # name this node, not leave it out.
        with contextlib.suppress(EtcdDown, EtcdAuthError):
            if self.lease is not None:
                self._serving = self._survey.survey()
                self._write_serving()
            if self.lease is not None and not self.registry.items():
                self.session.revoke(self.lease)


def _under(found: KeyValue | None, lease: int) -> bool:
    return found is not None and found.lease == lease
