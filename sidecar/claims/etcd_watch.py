"""Wake-ups on etcd changes (etcd backend): one watch stream per daemon on the keys the fan-out waits on, so a member
starts its stages for a published fork, and a claimer sees a report or a member's lease go, as soon as etcd has it
instead of at its next poll.

Each waiter names the topics it waits on (the first key component under the prefix and whether the key was put or
deleted: `forks put`, `reports put`, `members deleted`), and a change wakes only the waiters of its topic: a
claimer's progress writes, streamed too (they lie between forks/ and reports/), woke every daemon's listener, and each
then read etcd again (most of the reads during a 3-node fork).
A key put is also handed, with its value as streamed, to `on_put` (before its waiters wake), so a member starts its
stages for a published fork and a claimer takes a report without reading etcd (fanout: _heard). That is only the
fast path: every waiter still reads etcd itself when the stream is (re)opened and on a slow timer, so a watch that is
lost, stalls or misses changes (etcd restarted, an endpoint switched) slows a fork to that slow poll and never loses
one. The stream is reopened whenever it ends, and each time it is (re)opened every waiter is woken, since what
changed while no stream was open was streamed to nobody (every topic, then). A stream quiet for IDLE_S is reopened
too (a connection whose peer vanished without a word would otherwise be read from forever): one reopen and one read
per waiter a minute or so while nothing happens, no polling.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Collection

import requests

from sidecar.claims.etcd_client import EtcdAuthError, EtcdDown, EtcdSession, KeyValue, WatchStream, event_keys

__all__ = ["GATHER_POLL_S", "GATHER_READ_TOPICS", "GATHER_TOPICS", "LISTEN_POLL_S", "LISTEN_TOPICS", "Changes"]

log = logging.getLogger("sidecar.claims.etcd")
# How often the fan-out reads etcd with no wake-up: the bound a lost watch puts on a member hearing of a fork, and on
# a claimer seeing a report or a member gone (each read before was every 0.1 s and 0.05 s).
LISTEN_POLL_S = 1.0
GATHER_POLL_S = 0.5
IDLE_S = 60.0
# What wakes each waiter: a claimer gathering reports, a report put or a member's key deleted (its lease gone). A
# member's listener is woken by nothing streamed: a fork put reaches it as the event's value (on_put), and it reads
# etcd itself only when the stream is (re)opened and every LISTEN_POLL_S. Likewise a gathering claimer takes each
# report from its event and reads etcd again only for GATHER_READ_TOPICS (a member gone: alive again since?), a
# (re)opened stream, or its own slow poll. A fork's keys deleted once it ended woke every listener for nothing.
LISTEN_TOPICS: tuple[str, ...] = ()
GATHER_TOPICS = ("reports put", "members deleted")
GATHER_READ_TOPICS = ("members deleted",)
RETRY_S = 1.0  # between attempts to open a watch while etcd does not take one


class Changes:
    """Counts of the changes streamed for the keys from `start` to the end of the prefix `prefix_end`, per topic (the
    key's first component under `root`); waiters read etcd, then wait for their topics' count to move past what it was
    before they read (no change is missed between)."""

    def __init__(
        self,
        session: EtcdSession,
        root: str,
        start: str,
        prefix_end: str,
        node: str = "",
        on_put: Callable[[str, KeyValue], None] | None = None,
    ) -> None:
        self._session, self._root, self._start, self._end = session, root.rstrip("/") + "/", start, prefix_end
        # Called in the watch's thread with each key put (its topic, the key and value as streamed), before its
        # waiters wake: a waiter that finds what it waits for there need not read etcd.
        self._on_put = on_put
        self._own_report = f"/{node}" if node else None  # this node's own reports wake none of its waiters
        self._changed = threading.Condition()
        self._everything = 0  # wake-ups of every topic: a (re)opened stream, wake()
        self._counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._stream: WatchStream | None = None
        self._thread = threading.Thread(target=self._follow, name="etcd-watch", daemon=True)
        self._thread.start()

    def _count(self, topics: Collection[str]) -> int:
        return self._everything + sum(self._counts[t] for t in topics)

    def seen(self, topics: Collection[str]) -> int:
        """The count of `topics` now: take it before reading etcd, and pass it to wait() after."""
        with self._changed:
            return self._count(topics)

    def wait(self, topics: Collection[str], seen: int, timeout: float) -> bool:
        """Until a change of `topics` past `seen` is streamed (or wake() is called), or `timeout` seconds pass;
        whether one was."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count(topics) != seen, timeout)

    def wake(self) -> None:
        """Every waiter reads again."""
        with self._changed:
            self._everything += 1
            self._changed.notify_all()

    def _streamed(self, events: list[tuple[KeyValue, bool]]) -> None:
        topics = []
        for kv, gone in events:
            topic = kv.key.removeprefix(self._root).split("/", 1)[0]
            if topic == "reports" and self._is_own(kv.key):
                continue
            topics.append(f"{topic} {'deleted' if gone else 'put'}")
            if self._on_put is not None and not gone:
                try:
                    self._on_put(topics[-1], kv)
                except Exception:  # a bug there must not end the stream: the waiters read etcd themselves
                    log.exception("handling the etcd change of %s failed; the slow poll reads it instead", kv.key)
        with self._changed:
            self._counts.update(topics)
            self._changed.notify_all()

    def _is_own(self, key: str) -> bool:
        return self._own_report is not None and key.endswith(self._own_report)

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self._stream = stream = self._session.open_watch(self._start, self._end, IDLE_S)
            except (EtcdDown, EtcdAuthError):
                self._stop.wait(RETRY_S)  # the waiters' slow reads carry on meanwhile
                continue
            except Exception:  # as below: a bug must not end the wake-ups for the daemon's lifetime
                log.exception("opening the etcd watch failed; trying again (forks wait for the slow poll meanwhile)")
                self._stop.wait(RETRY_S)
                continue
            try:
                for result in stream.results():
                    if result.get("canceled"):  # compacted past, or ended by etcd: reopen
                        break
                    if result.get("created"):
                        self.wake()
                    elif result.get("events"):
                        self._streamed(event_keys(result))
            except (requests.RequestException, OSError, ValueError, AttributeError) as e:
                # etcd gone, quiet past IDLE_S, or closed by close() under the read (http.client then reads from None)
                if not self._stop.is_set():
                    log.debug("etcd watch ended (%s); reopening it", e)
            except Exception:  # a bug reading a result must not end the wake-ups for the daemon's lifetime
                log.exception("etcd watch failed on a result; reopening it (forks wait for the slow poll meanwhile)")
                self.wake()
                self._stop.wait(RETRY_S)
            finally:
                stream.close()
            self._stop.wait(0.05)  # a stream that ends at once must not spin

    def close(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.close()
        self.wake()
