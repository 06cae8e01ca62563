"""The fan-out of the etcd backend: a claimer publishes its fork to every node serving the run and gathers their
reports; every other member runs its own stages for the forks others publish and reports on them.

Keys: P/forks/FORK (the published fork and the nodes that must report on it) and P/reports/FORK/NODE (etcd_keys.py).
Its own module beside etcd.py, which keeps the lease and the claims: EtcdClaims inherits this part, and the state
both share (the session, the keys, the watch) is EtcdClaims'.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sidecar.claims.base import ClaimInDoubt, ClaimLost, Claims
from sidecar.claims.etcd_client import (
    EtcdAuthError,
    EtcdDown,
    EtcdSession,
    KeyValue,
    Snapshot,
    absent,
    lease_is,
    none_changed_after,
    none_created_after,
    put_op,
    range_op,
    range_ops,
    still_there,
)
from sidecar.claims.etcd_keys import EtcdKeys
from sidecar.claims.etcd_serves import Serving
from sidecar.claims.etcd_watch import (
    GATHER_POLL_S,
    GATHER_READ_TOPICS,
    GATHER_TOPICS,
    LISTEN_POLL_S,
    LISTEN_TOPICS,
    Changes,
)
from sidecar.config import Config
from sidecar.fanout import STAGE_NAMES, Gathered, lease_gone, raised_report, recorded_members, recorded_nodes

__all__ = ["EtcdFanOut"]

if TYPE_CHECKING:
    from sidecar.journal import ForkRecord

log = logging.getLogger("sidecar.claims.etcd")  # the backend's one logger, as before the split
T = TypeVar("T")
# Publishing with the swap's record: how many fresh looks at who must report it tries before the record goes alone
# (and publish() publishes, as for a fork resumed without a look), while members keep joining or changing.
SURVEY_TRIES = 4
MAX_COMPARES = 128  # etcd's default --max-txn-ops: no more compares in one transaction


class EtcdFanOut(Claims):
    """Publish, gather, and this node's part in the forks other nodes publish (EtcdClaims' base)."""

    # Set up by EtcdClaims, which owns them: the session, the keys, this node's name, the watch, its events.
    node: str
    keys: EtcdKeys
    session: EtcdSession
    _changes: Changes
    _changed: threading.Event
    _stop: threading.Event
    _stopping: threading.Event
    _known_others: list[str]

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        # Fan-out: what this node runs for forks other nodes publish (set by the daemon), and those it has run.
        self._handled: set[str] = set()
        self._fanout = threading.Lock()  # _handled and _inbox: the watch's thread changes them too (_heard)
        # fork id -> the other nodes' reports streamed since this daemon published it (node -> report), and the count
        # of GATHER_READ_TOPICS just before: while it has not moved, the stream missed nothing a read would find
        self._inbox: dict[str, dict[str, dict[str, Any]]] = {}
        self._since: dict[str, int] = {}
        # claim key -> the put of this node's own report, sent while the claimer gathers (joined before its outcome)
        self._own_reports: dict[str, threading.Thread] = {}
        # fork id -> (monotonic publish time, the other nodes to report, why it could not be published or None)
        self._published: dict[str, tuple[float, list[str] | None, str | None]] = {}
        self._live_at_publish: dict[str, set[str] | None] = {}  # fork id -> the members alive when it was published
        # claim key -> the members and serves records as the take that created the claim read them (who must
        # report on the fork is fixed from these once it is published, if none of them changed meanwhile)
        self._surveys: dict[str, Snapshot] = {}

    if TYPE_CHECKING:

        def _call(self, action: Callable[[], T], failed: T) -> T: ...

    def _publish_swapped(self, path: Path, record: dict[str, Any], lease: int) -> None:
        """The swap's record (what an adopter resumes from) and the fork's publication, in one transaction guarded by
        the claim: the other nodes hear of the fork one round trip sooner. Who must report is fixed from the look at
        the members and serves records that the take made (or one read now); the transaction commits only while none
        of those records has changed since that look, so the list is exactly who served the run when the fork was
        published (else the look is read again, in the same round trip). A fork published before (resumed after a
        restart) keeps its list, and the record goes alone. Raises ClaimLost, EtcdDown."""
        fork_id = str(record["fork_id"])
        model_dir = str(record.get("model_dir") or path.parent)  # the claim is the run's .fork.inprogress
        claim, progress, fork = self.keys.claim(path), self.keys.progress(path), self.keys.fork(fork_id)
        prefixes = (self.keys.member(), self.keys.serves())
        survey = self._surveys.pop(claim, None)
        found: list[KeyValue] = []
        self._expect_reports(fork_id)
        for _ in range(SURVEY_TRIES):
            if survey is None:  # no look from a take: an adoption's, a resumed fork's, a take retried
                read = self.session.txn([], range_ops(prefixes), [])
                survey = Snapshot(read.revision, read.ranges)
            live, serves = survey.ranges
            if len(live) + 4 > MAX_COMPARES:
                break  # too many members to compare in one transaction: publish() reads and publishes
            nodes, members = self._must_report(model_dir, live, serves)
            value = _published_value({**record, "model_dir": model_dir}, self.node, nodes, members)
            unchanged = [
                none_created_after(prefixes[0], survey.revision),  # no member joined (or came back)
                *(still_there(kv) for kv in live),  # and none left
                none_changed_after(prefixes[1], survey.revision),  # no node's serves record changed
            ]
            reply = self.session.txn(
                [lease_is(claim, lease), absent(fork), *unchanged],
                [put_op(progress, record), put_op(fork, value)],
                [range_op(claim), range_op(fork), *range_ops(prefixes)],
            )
            if reply.succeeded:
                self._published[fork_id] = (time.monotonic(), [n for n in nodes if n != self.node], None)
                self._live_at_publish[fork_id] = set(members)
                return
            held, found, live, serves = reply.ranges
            if not held or held[0].lease != lease:
                raise ClaimLost(f"the claim of {path.parent} is no longer this daemon's (its lease expired)")
            if found:
                break
            survey = Snapshot(reply.revision, [live, serves])  # a record changed since the look: this is the new one
        ours = self.session.put_if_key_lease(progress, record, claim, lease)
        if not ours:
            raise ClaimLost(f"the claim of {path.parent} is no longer this daemon's (its lease expired)")
        if found:  # published before, by this daemon before a restart: its list stands
            self._since.pop(fork_id, None)  # and reports put before now were streamed to no inbox: gather reads
            nodes = recorded_nodes(found[0].value)
            self._published[fork_id] = (time.monotonic(), [n for n in nodes if n != self.node], None)
            self._live_at_publish[fork_id] = recorded_members(found[0].value)

    def publish(self, path: Path, record: ForkRecord, budget: float) -> None:
        """Publish the fork with the nodes that must report on it (this one included, fixed now: an adopter that
        publishes again finds the dead claimer's list and keeps it); while etcd cannot be reached, retry for at most
        `budget` (the fork's other nodes must hear of it when etcd is back, not be skipped), then name them as not
        told."""
        if record.fork_id in self._published:  # with the swap's record (_publish_swapped)
            return
        deadline = time.monotonic() + budget
        problem = ""
        while True:
            self.check(path)
            try:
                live, serves = self.session.get_prefixes(self.keys.member(), self.keys.serves())
                nodes, members = self._must_report(record.model_dir, live, serves)
                value = _published_value(record.to_json(), self.node, nodes, members)
                key = self.keys.fork(record.fork_id)
                self._expect_reports(record.fork_id)
                if not self.session.create(key, value, None):  # published before: by us, or by a claimer now dead
                    self._since.pop(record.fork_id, None)  # its reports so far were streamed to no inbox
                    found = self.session.get(key)
                    value = found.value if found else value
                    nodes = recorded_nodes(value)
            except (EtcdDown, EtcdAuthError) as e:
                problem = str(e)
                if time.monotonic() >= deadline:
                    break
                self._changed.wait(1.0)
                self._changed.clear()
                continue
            self._published[record.fork_id] = (time.monotonic(), [n for n in nodes if n != self.node], None)
            self._live_at_publish[record.fork_id] = recorded_members(value)
            return
        log.error("%s: fork %s not published to the other nodes: %s", path.parent, record.fork_id, problem)
        self._published[record.fork_id] = (
            time.monotonic(),
            self._known_others,
            f"etcd could not be reached ({problem})",
        )

    def _must_report(self, model_dir: str, live: list[KeyValue], serves: list[KeyValue]) -> tuple[list[str], list[str]]:
        """The nodes that must report on a fork of `model_dir`, and the live members among them: this node, every live
        member (told always: a trainer started since its daemon's last survey serves the run too), and every node
        whose serves record names the run (its daemon may be down while its trainers keep running)."""
        members = sorted(kv.name for kv in live)
        serving = [kv.name for kv in serves if Serving.from_json(kv.value).serves(model_dir)]
        return sorted({self.node, *members, *serving}), members

    def _expect_reports(self, fork_id: str) -> None:
        """Before the fork is published: from now on the other nodes' reports on it are kept as streamed."""
        with self._fanout:
            self._inbox.setdefault(fork_id, {})
        self._since.setdefault(fork_id, self._changes.seen(GATHER_READ_TOPICS))

    def gather(self, path: Path, record: ForkRecord, budget: float) -> Gathered:
        try:
            return self._gather(path, record, budget)
        finally:
            self._stop_expecting(record.fork_id)

    def _stop_expecting(self, fork_id: str) -> None:
        with self._fanout:
            self._inbox.pop(fork_id, None)
        self._since.pop(fork_id, None)

    def _forget(self, path: Path, fork_id: str | None) -> None:
        """Drop what the fan-out keeps for the fork of `path` once it ended, before its publish or its gather too
        (the put of its own report, if any, is guarded by the fork's key)."""
        claim = self.keys.claim(path)
        self._surveys.pop(claim, None)
        self._own_reports.pop(claim, None)
        if fork_id is not None:
            self._published.pop(fork_id, None)
            self._live_at_publish.pop(fork_id, None)
            self._stop_expecting(fork_id)

    def _gather(self, path: Path, record: ForkRecord, budget: float) -> Gathered:
        published_at, members, unpublished = self._published.pop(record.fork_id, (time.monotonic(), None, None))
        if unpublished is not None:  # never published: every other member is missing, for that reason
            return Gathered(members=list(members or []), missing={m: unpublished for m in members or []})
        live_then = self._live_at_publish.pop(record.fork_id, None)
        if members is None:  # resumed by an adopter after the dead claimer had published: its list stands
            members, live_then = self._recorded_list(record.fork_id)
        # This node's own stages, for an adopter if this daemon dies before the outcome (it then counts this node
        # as reported, with what its stages did, instead of as one whose daemon died before telling its trainers).
        own = {name: record.sections.get(name, {"status": "skipped"}) for name in STAGE_NAMES}
        reads = (self.keys.report(record.fork_id), self.keys.member())
        with self._fanout:
            inbox = self._inbox.get(record.fork_id)
        read = self._first_look_reads(record.fork_id, inbox is not None, members, live_then)
        seen = self._changes.seen(GATHER_TOPICS)  # before the reads: a report put while they run wakes the wait
        seen_read = self._changes.seen(GATHER_READ_TOPICS)
        found, read = self._first_look(path, record.fork_id, own, reads if read else None)
        read_at = time.monotonic()
        gathered = Gathered(members=list(members))
        deadline = time.monotonic() + budget
        pending = set(members)
        while pending:
            self.check(path)  # a claimer frozen while it waited finds its claim gone: stop, the adopter reports
            if read:
                seen, seen_read = self._changes.seen(GATHER_TOPICS), self._changes.seen(GATHER_READ_TOPICS)
                read_at = time.monotonic()
                with contextlib.suppress(EtcdDown, EtcdAuthError):
                    found = self.session.get_prefixes(*reads)
            with self._fanout:
                reports = dict(inbox or {})
            alive = pending
            if found is not None:
                reports.update({kv.name: kv.value for kv in found[0]})
                alive = {kv.name for kv in found[1]}
            for node in sorted(pending):
                if node in reports:
                    gathered.reports[node] = reports[node]
                    gathered.seconds = time.monotonic() - published_at
                    pending.discard(node)
                elif node not in alive:
                    gathered.missing[node] = lease_gone(node, live_then)
                    pending.discard(node)
            found = None
            now = time.monotonic()
            if not pending or now >= deadline:
                break
            poll = max(0.0, min(read_at + GATHER_POLL_S, deadline) - now)
            self._changes.wait(GATHER_TOPICS, seen, poll)
            if self._stopping.is_set():
                raise ClaimInDoubt("the daemon stops while the fork waits for the other nodes' reports")
            seen = self._changes.seen(GATHER_TOPICS)  # before the inbox is looked at again
            read = time.monotonic() >= read_at + GATHER_POLL_S or self._changes.seen(GATHER_READ_TOPICS) != seen_read
        for node in pending:
            gathered.missing[node] = f"it did not report within {budget:g}s (timeouts.trainers + timeouts.vllm)"
        return gathered

    def _recorded_list(self, fork_id: str) -> tuple[list[str], set[str] | None]:
        """The other nodes that must report on a fork published before, and the members alive then, as recorded."""
        fork = self._call(lambda: self.session.get(self.keys.fork(fork_id)), None)
        value = fork.value if fork else {}
        return [m for m in recorded_nodes(value) if m != self.node], recorded_members(value)

    def _first_look_reads(self, fork_id: str, inbox: bool, members: list[str], live_then: set[str] | None) -> bool:
        """Whether gather's first look reads etcd: the reports streamed since the publish are all there are unless
        the stream may have missed one (reopened since), a member left (alive again since?), or a node had no live
        daemon at the publish (started since?)."""
        since = self._since.get(fork_id)
        return (
            not inbox
            or since is None
            or self._changes.seen(GATHER_READ_TOPICS) != since
            or live_then is None
            or not live_then.issuperset(members)
        )

    def _first_look(
        self, path: Path, fork_id: str, own: dict[str, Any], reads: tuple[str, ...] | None
    ) -> tuple[list[list[KeyValue]] | None, bool]:
        """Its own report, and the first look at the others' (`reads`, if any) in the same round trip: what that
        read, and whether to read again (etcd did not answer). Without reads, the report goes while the others'
        come in; the outcome waits for it (own_report_sent)."""
        if reads is None:
            self._send_own_report(path, fork_id, own)
            return None, False
        answer = self._call(lambda: self._put_report(fork_id, own, reads), None)
        return (answer[1], False) if answer is not None else (None, True)

    def _send_own_report(self, path: Path, fork_id: str, own: dict[str, Any]) -> None:
        def send() -> None:
            self._call(lambda: self._put_report(fork_id, own, ()), None)

        sender = threading.Thread(target=send, name=f"report-{fork_id}", daemon=True)
        self._own_reports[self.keys.claim(path)] = sender
        sender.start()

    def own_report_sent(self, path: Path) -> None:
        """Before the outcome of `path`'s fork: its own report, if gather sent it, has reached etcd (or etcd did not
        answer it): an adopter of a claimer that dies before its outcome finds this node's report, as before."""
        sender = self._own_reports.pop(self.keys.claim(path), None)
        if sender is not None:
            sender.join(self.session.timeout * (len(self.session.endpoints) + 1) * 2)  # each call is bounded

    def _listen(self) -> None:
        """Run this node's stages for every fork another node publishes: as its put is streamed (_heard), and from
        a read of every published fork whenever the stream is (re)opened and every LISTEN_POLL_S (a lost or stalled
        watch slows a fork to that poll, never loses one)."""
        while not self._stop.is_set():
            seen = self._changes.seen(LISTEN_TOPICS)
            with contextlib.suppress(EtcdDown, EtcdAuthError):
                if self.usable() and self.on_published is not None:
                    with self._fanout:
                        before = set(self._handled)
                    published = self.session.get_prefix(self.keys.fork())
                    with self._fanout:  # forgets the forks gone, not those heard of during the read
                        self._handled -= before - {str(kv.value.get("fork_id")) for kv in published}
                    for kv in published:
                        self._tell(kv.value)
            self._changes.wait(LISTEN_TOPICS, seen, LISTEN_POLL_S)

    def _heard(self, topic: str, kv: KeyValue) -> None:
        """A key put, as the watch streamed it (in its thread): a fork published is told here at once, a report
        goes to the inbox of the fork this daemon gathers."""
        if topic == "forks put":
            if self.usable() and self.on_published is not None:
                self._tell(kv.value)
        elif topic == "reports put":
            fork_id, _, node = kv.key.removeprefix(self.keys.reports()).partition("/")
            with self._fanout:
                inbox = self._inbox.get(fork_id)
                if inbox is not None and node:
                    inbox[node] = kv.value

    def _tell(self, published: dict[str, Any]) -> None:
        """Start this node's stages for a fork published by another node and not yet told here."""
        fork_id = str(published.get("fork_id") or "")
        if not fork_id or published.get("node") == self.node or self.holds(fork_id):
            return
        with self._fanout:
            if fork_id in self._handled:
                return
            self._handled.add(fork_id)
        threading.Thread(target=self._report, args=(published,), name=f"fanout-{fork_id}", daemon=True).start()

    def _report(self, published: dict[str, Any]) -> None:
        assert self.on_published is not None
        fork_id = str(published["fork_id"])
        try:
            report = self.on_published(published)
        except Exception as e:  # a bug here must still be reported, or the claimer waits out its whole budget
            log.exception("fork %s published by %s: this node's stages raised", fork_id, published.get("node"))
            report = raised_report(f"internal error on node {self.node} ({e!r}); see journalctl there.")
        try:
            self._put_report(fork_id, report, ())
        except (EtcdDown, EtcdAuthError) as e:
            log.error("fork %s: this node's report did not reach etcd: %s", fork_id, e)

    def _put_report(
        self, fork_id: str, report: dict[str, Any], reads: tuple[str, ...]
    ) -> tuple[bool, list[list[KeyValue]]]:
        """This node's report, under no lease: it must outlive this daemon (the trainers it told keep the new weights
        whether or not the daemon lives on); it goes with the fork's key. Then every key under `reads`."""
        key, guard = self.keys.report(fork_id, self.node), self.keys.fork(fork_id)
        return self.session.put_if_exists(key, report, guard, reads)


def _published_value(record: dict[str, Any], node: str, nodes: list[str], members: list[str]) -> dict[str, Any]:
    """P/forks/FORK: what the other nodes' stages need of the fork, and who must report on it."""
    fields = ("fork_id", "model_dir", "source", "digest")
    return {**{k: record.get(k) for k in fields}, "node": node, "nodes": nodes, "members": members}
