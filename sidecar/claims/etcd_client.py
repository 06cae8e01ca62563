"""The few etcd v3 calls the daemon makes, through etcd3gw (the v3 JSON gateway), with endpoint failover and auth.

Imported only when `coordination.backend` is etcd: the daemon runs without etcd3gw in filesystem mode. Every call
is bounded by a short request timeout and every failure is one of two exceptions with one sentence each:
`EtcdDown` (no endpoint answered) and `EtcdAuthError` (an endpoint answered, and refused our credentials).
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from etcd3gw import exceptions as etcd3gw_errors
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from sidecar.config import ConfigError, EtcdConfig

__all__ = ["EtcdAuthError", "EtcdDown", "EtcdSession", "KeyValue", "Snapshot", "TxnReply", "WatchStream"]


class EtcdDown(Exception):
    """No etcd endpoint answered; the sentence names them."""


class EtcdAuthError(Exception):
    """etcd refused the configured credentials; the sentence says which and what to fix."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: dict[str, Any]
    mod_revision: int
    create_revision: int
    lease: int

    @property
    def name(self) -> str:
        """The key's last component: the node of a members/, serves/ or reports/FORK/ key."""
        return self.key.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Snapshot:
    """Every key under some prefixes, as etcd held them at `revision` (one read, one revision for all)."""

    revision: int
    ranges: list[list[KeyValue]]


@dataclass(frozen=True)
class TxnReply:
    succeeded: bool
    revision: int  # etcd's revision once the transaction applied (its reads saw the keys as of then)
    ranges: list[list[KeyValue]]  # the keys each range op of the branch that ran read, in order


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(data: str) -> str:
    return base64.b64decode(data).decode()


def _range_end(prefix: str) -> str:
    """The key just past every key starting with `prefix` (etcd's prefix range)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


_AUTH_WORDS = (
    "authentication failed",
    "invalid auth token",
    "user name is empty",
    "permission denied",
    "unauthenticated",
)


class EtcdSession:
    """One client per endpoint, the last one that answered first; re-authenticates when a token expires."""

    def __init__(self, config: EtcdConfig, request_timeout: float) -> None:
        self.config = config
        self.timeout = request_timeout
        self._lock = threading.Lock()
        self._clients = [self._client(url) for url in config.endpoints]
        self._current = 0
        self._password = _read_password(config)

    def _client(self, url: str) -> Etcd3Client:
        parts = urlsplit(url)
        session = requests.Session()
        # The endpoints are reached as configured: no proxy, netrc or CA bundle (REQUESTS_CA_BUNDLE) from the daemon's
        # environment, whose lookup requests repeats on every call (0.3-0.6 ms of each etcd round trip here); a
        # private CA is coordination.etcd.ca_file.
        session.trust_env = False
        if self.config.ca_file is not None:
            session.verify = str(self.config.ca_file)
        if self.config.cert_file is not None and self.config.key_file is not None:
            session.cert = (str(self.config.cert_file), str(self.config.key_file))
        return _Client(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 2379,
            protocol=parts.scheme,
            timeout=self.timeout,
            api_path="/v3/",  # etcd >= 3.4; no discovery round trip per client
            session=session,
        )

    @property
    def endpoints(self) -> Sequence[str]:
        return self.config.endpoints

    # --- transport -------------------------------------------------------------------------------------------
    def call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST `payload` to /v3/`path` on the first endpoint that answers; EtcdDown when none does."""
        with self._lock:
            order = [(self._current + i) % len(self._clients) for i in range(len(self._clients))]
        failures = []
        for index in order:
            client = self._clients[index]
            try:
                result = self._post(client, path, payload)
            except EtcdDown as e:
                failures.append(str(e))
                continue
            with self._lock:
                self._current = index
            return dict(result)
        raise EtcdDown(f"no etcd endpoint answered ({'; '.join(failures)}); check coordination.etcd.endpoints")

    def _post(self, client: Etcd3Client, path: str, payload: dict[str, Any], *, retried: bool = False) -> Any:
        url = client.get_url(path)
        if self.config.user is not None and "Authorization" not in client.session.headers:
            self._authenticate(client)
        try:
            return client.post(url, json=payload)
        except Etcd3Exception as e:
            detail = f"{e.detail_text or ''} {e.args[0] if e.args else ''}".lower()
            if any(word in detail for word in _AUTH_WORDS):
                if self.config.user is not None and not retried:  # a token that expired: once more with a new one
                    client.session.headers.pop("Authorization", None)
                    return self._post(client, path, payload, retried=True)
                raise EtcdAuthError(
                    f"etcd at {client.base_url} refused the request ({_short(e)}); check coordination.etcd.user and "
                    "password_file, and that the user has a role on the prefix"
                ) from None
            if type(e).__name__ in ("ConnectionFailedError", "ConnectionTimeoutError"):
                raise EtcdDown(f"{client.base_url}: {_short(e)}") from None
            raise EtcdDown(f"{client.base_url} answered {_short(e)}") from None

    def _authenticate(self, client: Etcd3Client) -> None:
        try:
            reply = client.post(
                client.get_url("/auth/authenticate"), json={"name": self.config.user, "password": self._password}
            )
        except Etcd3Exception as e:
            if type(e).__name__ in ("ConnectionFailedError", "ConnectionTimeoutError"):
                raise EtcdDown(f"{client.base_url}: {_short(e)}") from None
            raise EtcdAuthError(
                f"etcd at {client.base_url} refused user {self.config.user!r} ({_short(e)}); check "
                f"coordination.etcd.user and the password in {self.config.password_file}"
            ) from None
        client.session.headers["Authorization"] = str(reply["token"])

    def open_watch(self, start: str, prefix_end: str, idle: float) -> WatchStream:
        """A watch of the keys from `start` to the end of the prefix `prefix_end`, on the first endpoint that answers;
        its read gives up after `idle` seconds without a line (a stalled connection is reopened, never waited on)."""
        with self._lock:
            order = [(self._current + i) % len(self._clients) for i in range(len(self._clients))]
        request = {"create_request": {"key": _b64(start), "range_end": _range_end(prefix_end)}}
        failures = []
        for index in order:
            client = self._clients[index]
            if self.config.user is not None and "Authorization" not in client.session.headers:
                self._authenticate(client)
            http = requests.Session()  # its own connection: the client's serves the other threads' calls meanwhile
            http.trust_env = False  # reached as configured, like every other call (EtcdSession._client)
            http.verify, http.cert = client.session.verify, client.session.cert
            http.headers.update(client.session.headers)
            try:
                reply = http.post(client.get_url("/watch"), json=request, stream=True, timeout=(self.timeout, idle))
                reply.raise_for_status()
            except requests.RequestException as e:
                http.close()
                failures.append(f"{client.base_url}: {_short(e)}")
                continue
            return WatchStream(http, reply)
        raise EtcdDown(f"no etcd endpoint took a watch ({'; '.join(failures)})")

    # --- leases ----------------------------------------------------------------------------------------------
    def grant(self, ttl: int) -> int:
        return int(self.call("lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's TTL after the refresh; <= 0 when it has expired (its keys are gone)."""
        result = self.call("lease/keepalive", {"ID": lease}).get("result", {})
        return int(result.get("TTL", -1))

    def time_to_live(self, lease: int) -> int:
        return int(self.call("kv/lease/timetolive", {"ID": lease}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self.call("kv/lease/revoke", {"ID": lease})

    # --- keys ------------------------------------------------------------------------------------------------
    def get(self, key: str) -> KeyValue | None:
        found = self.call("kv/range", {"key": _b64(key)}).get("kvs", [])
        return _kv(found[0]) if found else None

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        found = self.call("kv/range", {"key": _b64(prefix), "range_end": _range_end(prefix)}).get("kvs", [])
        return [_kv(item) for item in found]

    def get_prefixes(self, *prefixes: str) -> list[list[KeyValue]]:
        """Every key under each of `prefixes`, read in one round trip (a read-only transaction: one revision for
        all of them, served like a range read)."""
        reply = self.call("kv/txn", {"compare": [], "success": range_ops(prefixes), "failure": []})
        return _ranges(reply, len(prefixes))

    def put(self, key: str, value: dict[str, Any], lease: int | None = None) -> None:
        payload: dict[str, Any] = {"key": _b64(key), "value": _b64(json.dumps(value))}
        if lease:
            payload["lease"] = lease
        self.call("kv/put", payload)

    def delete(self, key: str) -> None:
        self.call("kv/deleterange", {"key": _b64(key)})

    def delete_prefix(self, prefix: str) -> None:
        self.call("kv/deleterange", {"key": _b64(prefix), "range_end": _range_end(prefix)})

    def create(self, key: str, value: dict[str, Any], lease: int | None) -> bool:
        """Put `key` only if it does not exist, bound to `lease` (None: to none); whether it was created."""
        return self._txn(*_create_ops(key, value, lease))

    def create_or_get(self, key: str, value: dict[str, Any], lease: int) -> tuple[bool, KeyValue | None]:
        """As create(), in the same round trip returning the key that is there when it already exists."""
        created, found, _ = self.create_or_get_reading(key, value, lease, ())
        return created, found

    def create_or_get_reading(
        self, key: str, value: dict[str, Any], lease: int, reads: Sequence[str]
    ) -> tuple[bool, KeyValue | None, Snapshot | None]:
        """As create_or_get(); when it created the key, also every key under each of `reads` as of that revision."""
        compare, success = _create_ops(key, value, lease)
        reply = self.txn(compare, [*success, *range_ops(reads)], [{"request_range": {"key": _b64(key)}}])
        if reply.succeeded:
            return True, None, Snapshot(reply.revision, reply.ranges)
        found = reply.ranges[0] if reply.ranges else []
        return False, found[0] if found else None, None

    def txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]], failure: list[dict[str, Any]]
    ) -> TxnReply:
        """One transaction of ops built by the functions below (lease_is, absent, put_op, ...)."""
        reply = self.call("kv/txn", {"compare": compare, "success": success, "failure": failure})
        branch = success if reply.get("succeeded") else failure
        count = sum("request_range" in op for op in branch)
        revision = int((reply.get("header") or {}).get("revision", 0))
        return TxnReply(bool(reply.get("succeeded")), revision, _ranges(reply, count))

    def put_if_exists(
        self, key: str, value: dict[str, Any], guard: str, reads: Sequence[str] = ()
    ) -> tuple[bool, list[list[KeyValue]]]:
        """Put `key` (no lease) only while the key `guard` exists (a report of a fork that ended meanwhile would
        otherwise stay in etcd forever); whether it did, and every key under each of `reads` after it, in the same
        round trip."""
        compare = [{"key": _b64(guard), "result": "GREATER", "target": "CREATE", "create_revision": 0}]
        put = {"request_put": {"key": _b64(key), "value": _b64(json.dumps(value))}}
        reads_ops = range_ops(reads)
        reply = self.call("kv/txn", {"compare": compare, "success": [put, *reads_ops], "failure": reads_ops})
        return bool(reply.get("succeeded")), _ranges(reply, len(reads))

    def put_if_lease(self, key: str, value: dict[str, Any], lease: int) -> bool:
        """Replace `key` only while it is bound to `lease` (still our claim); whether it was."""
        return self._txn(
            [lease_is(key, lease)],
            [{"request_put": {"key": _b64(key), "value": _b64(json.dumps(value)), "lease": lease}}],
        )

    def delete_if_lease(self, key: str, lease: int) -> bool:
        return self._txn(
            [lease_is(key, lease)],
            [{"request_delete_range": {"key": _b64(key)}}],
        )

    def put_if_key_lease(self, key: str, value: dict[str, Any], guard: str, lease: int) -> bool:
        """Put `key` (no lease) only while the key `guard` is bound to `lease` (our claim's record, say, only while
        the claim is still ours: an adopter's must never be overwritten); whether it was."""
        return self._txn(
            [lease_is(guard, lease)],
            [{"request_put": {"key": _b64(key), "value": _b64(json.dumps(value))}}],
        )

    def delete_if_key_lease(self, guard: str, lease: int, keys: Sequence[str], prefixes: Sequence[str] = ()) -> bool:
        """Delete `keys` and every key under `prefixes` in one transaction, only while `guard` is bound to `lease`."""
        ops = [{"request_delete_range": {"key": _b64(k)}} for k in keys]
        ops += [{"request_delete_range": {"key": _b64(p), "range_end": _range_end(p)}} for p in prefixes]
        return self._txn([lease_is(guard, lease)], ops)

    def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> bool:
        return bool(self.call("kv/txn", {"compare": compare, "success": success, "failure": []}).get("succeeded"))


class _Client(Etcd3Client):
    """etcd3gw's client, its calls POSTed through urllib3 itself (the pool requests would use, with the same TLS
    settings) rather than through requests: requests' own layers (preparing the request, its hooks, its adapter)
    cost about 0.3 ms of CPU on each etcd round trip here, and the daemon makes several on every fork's path. The
    session stays for the watch (EtcdSession.open_watch) and keeps the token (its Authorization header)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        verify, cert = self.session.verify, self.session.cert
        timeout = urllib3.Timeout(connect=self.timeout, read=self.timeout)
        self.pool: urllib3.HTTPConnectionPool
        if self.protocol == "https":
            ca = verify if isinstance(verify, str) else DEFAULT_CA_BUNDLE_PATH  # requests' default (certifi's)
            cert_file, key_file = cert if isinstance(cert, tuple) else (cert, None)
            self.pool = urllib3.HTTPSConnectionPool(
                self.host,
                self.port,
                timeout=timeout,
                maxsize=10,  # requests' pool size
                cert_reqs="CERT_REQUIRED",  # the session's verify is True or a CA file, never off
                ca_certs=ca,
                cert_file=cert_file,
                key_file=key_file,
            )
        else:
            self.pool = urllib3.HTTPConnectionPool(self.host, self.port, timeout=timeout, maxsize=10)

    def post(self, url: str, *args: Any, json: Any = None, **kwargs: Any) -> Any:
        """As Etcd3Client.post: the answer's JSON, or etcd3gw's exception for the failure (same classes, same
        statuses), so EtcdSession._post tells them apart as before."""
        headers = {"Content-Type": "application/json"}
        # One read: another thread's token refresh may drop the header between a look and a read (a KeyError here
        # would end the lease keeper's thread).
        token = self.session.headers.get("Authorization")
        if token is not None:
            headers["Authorization"] = str(token)
        body = _json_dumps(json).encode()
        try:
            reply = self.pool.urlopen(
                "POST", url.removeprefix(self.base_url), body=body, headers=headers, retries=_NO_RETRIES, redirect=False
            )
        except urllib3.exceptions.TimeoutError as e:
            raise etcd3gw_errors.ConnectionTimeoutError(str(e)) from None
        except urllib3.exceptions.MaxRetryError as e:  # as requests and etcd3gw map it: a timeout or a failure
            timed_out = isinstance(e.reason, urllib3.exceptions.TimeoutError)
            error = etcd3gw_errors.ConnectionTimeoutError if timed_out else etcd3gw_errors.ConnectionFailedError
            raise error(str(e)) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise etcd3gw_errors.ConnectionFailedError(str(e)) from None
        if reply.status != 200:
            failure = _ERRORS_BY_STATUS.get(reply.status, Etcd3Exception)
            raise failure(reply.data.decode("utf-8", errors="replace"), reply.reason)
        return _json_loads(reply.data)


_NO_RETRIES = urllib3.Retry(0, read=False)  # as requests sends: a failure is the caller's to handle
_ERRORS_BY_STATUS: dict[int, type[Etcd3Exception]] = {  # etcd3gw's own mapping (etcd3gw.client)
    500: etcd3gw_errors.InternalServerError,
    503: etcd3gw_errors.ConnectionFailedError,
    408: etcd3gw_errors.ConnectionTimeoutError,
    504: etcd3gw_errors.ConnectionTimeoutError,
    412: etcd3gw_errors.PreconditionFailedError,
}
_json_dumps, _json_loads = json.dumps, json.loads  # `json` is a parameter name in post()


class WatchStream:
    """One open watch: etcd's WatchResponse results as they come, until the stream ends (raises OSError or
    requests' errors, ValueError on a garbled line)."""

    def __init__(self, http: requests.Session, reply: requests.Response) -> None:
        self._http, self._reply = http, reply

    def results(self) -> Iterator[dict[str, Any]]:
        for line in self._reply.iter_lines():
            if line.strip():
                chunk = json.loads(line)
                if "result" not in chunk:  # {"error": ...}: the watch was refused or ended by etcd
                    return
                yield dict(chunk["result"])

    def close(self) -> None:
        """End the stream, also while another thread is blocked reading it."""
        # That read holds the response's buffered reader, so closing the response alone waited for it: for the
        # next change or the idle timeout (a stopping daemon took 7-60 s). Shutting the socket down ends it now.
        sock = getattr(getattr(self._reply.raw, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._reply.close()
        self._http.close()


def _read_password(config: EtcdConfig) -> str | None:
    if config.password_file is None:
        return None
    try:
        return config.password_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"coordination.etcd.password_file: {config.password_file} cannot be read ({e}); "
            "point it at a readable file holding the etcd user's password."
        ) from None


def _kv(item: dict[str, Any]) -> KeyValue:
    try:
        value = json.loads(_unb64(item.get("value", "")))
    except ValueError:
        value = {}
    return KeyValue(
        _unb64(item["key"]),
        value if isinstance(value, dict) else {},
        int(item.get("mod_revision", 0)),
        int(item.get("create_revision", 0)),
        int(item.get("lease", 0)),
    )


def _create_ops(
    key: str, value: dict[str, Any], lease: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The compare (the key does not exist) and the put of a create bound to `lease` (None: to none)."""
    put: dict[str, Any] = {"key": _b64(key), "value": _b64(json.dumps(value))}
    if lease:
        put["lease"] = lease
    return [absent(key)], [{"request_put": put}]


def lease_is(key: str, lease: int) -> dict[str, Any]:
    """Compare: `key` is bound to `lease` (a claim still ours)."""
    return {"key": _b64(key), "result": "EQUAL", "target": "LEASE", "lease": lease}


def absent(key: str) -> dict[str, Any]:
    """Compare: `key` does not exist."""
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}


def still_there(kv: KeyValue) -> dict[str, Any]:
    """Compare: the key of `kv` exists and was not deleted and created again since `kv` was read."""
    return {"key": _b64(kv.key), "result": "EQUAL", "target": "CREATE", "create_revision": kv.create_revision}


def none_created_after(prefix: str, revision: int) -> dict[str, Any]:
    """Compare: no key under `prefix` was created after `revision` (true of an empty prefix)."""
    return {
        "key": _b64(prefix),
        "range_end": _range_end(prefix),
        "result": "LESS",
        "target": "CREATE",
        "create_revision": revision + 1,
    }


def none_changed_after(prefix: str, revision: int) -> dict[str, Any]:
    """Compare: no key under `prefix` was put after `revision` (deletes are not seen: see still_there)."""
    return {
        "key": _b64(prefix),
        "range_end": _range_end(prefix),
        "result": "LESS",
        "target": "MOD",
        "mod_revision": revision + 1,
    }


def put_op(key: str, value: dict[str, Any], lease: int | None = None) -> dict[str, Any]:
    put: dict[str, Any] = {"key": _b64(key), "value": _b64(json.dumps(value))}
    if lease:
        put["lease"] = lease
    return {"request_put": put}


def range_op(key: str) -> dict[str, Any]:
    """Read `key` alone."""
    return {"request_range": {"key": _b64(key)}}


def range_ops(prefixes: Sequence[str]) -> list[dict[str, Any]]:
    """Read every key under each of `prefixes`."""
    return [{"request_range": {"key": _b64(p), "range_end": _range_end(p)}} for p in prefixes]


def _ranges(reply: dict[str, Any], count: int) -> list[list[KeyValue]]:
    """The keys of each range read in a transaction's reply, in order (its puts answer no keys)."""
    ranges = [r["response_range"] for r in reply.get("responses") or [] if "response_range" in r]
    if len(ranges) != count:
        raise EtcdDown(f"etcd answered {len(ranges)} range reads of {count} in one transaction")
    return [[_kv(item) for item in r.get("kvs", [])] for r in ranges]


def event_keys(result: dict[str, Any]) -> list[tuple[KeyValue, bool]]:
    """The keys a watch result's events changed, each as the event has it (a put's value, a delete's key alone) and
    with whether it was deleted (else put)."""
    return [
        (_kv(event["kv"]), event.get("type") == "DELETE")
        for event in result.get("events") or ()
        if "key" in event.get("kv", {})
    ]


def _short(e: Exception) -> str:
    text = str(getattr(e, "detail_text", None) or e).strip().replace("\n", " ")
    return text[:200] or type(e).__name__
