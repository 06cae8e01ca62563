"""A small stdlib HTTP client for the few vLLM routes the sidecar uses, with a retry policy bounded by a deadline.

vLLM answers errors as `{"error": {"message": ..., "code": N}}` (older versions: `{"message": ...}`) and FastAPI's own
404/405 for a route that does not exist as `{"detail": "Not Found"}`; `HttpError.route_missing` tells the two apart,
because vLLM also answers 404 for an adapter path that does not exist. Successful adapter loads answer plain text.
The API key goes only into the Authorization header: no message built here contains it.

Every exchange ends by its deadline whatever the peer does: the socket's reads and writes each get only the time
left (`_DeadlineReader`), so a server that drip-feeds its status line, headers or body one byte a second is cut off
at the deadline, not after one per-read timeout per byte. Bodies are read up to MAX_BODY_BYTES and no further. An
answer that is not what the route returns (a 200 with truncated JSON or an HTML page) is a `BadAnswer` naming what
came back, never read as "no adapters".
"""

from __future__ import annotations

import http.client
import io
import json
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

__all__ = [
    "MAX_BODY_BYTES",
    "BadAnswer",
    "ConnectFailed",
    "HttpError",
    "ModelCard",
    "RequestFailed",
    "RetryPolicy",
    "VllmClient",
    "call_with_retries",
]

T = TypeVar("T")

# /v1/models of a server with a thousand adapters is about 300 KB; anything this large is not an answer to read.
MAX_BODY_BYTES = 8 * 1024 * 1024


class RequestFailed(Exception):
    """A request that did not get a usable answer; `str()` is a short reason without secrets."""

    attempts = 1  # set by call_with_retries to how many tries it took


class ConnectFailed(RequestFailed):
    """No HTTP answer at all: refused, reset, timed out, DNS. Worth retrying, unless `maybe_applied`."""

    def __init__(self, reason: str, *, sent: bool = False, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.sent = sent  # the whole request reached the server's socket
        self.timed_out = timed_out

    @property
    def maybe_applied(self) -> bool:
        """The server got the request and was still at it when we stopped waiting: it may act on it later."""
        return self.sent and self.timed_out


class BadAnswer(RequestFailed):
    """An HTTP answer that is not what the route returns (not JSON, the wrong shape, too large); not retried."""


class HttpError(RequestFailed):
    def __init__(self, status: int, message: str, *, route_missing: bool = False) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.route_missing = route_missing

    @property
    def retryable(self) -> bool:
        return self.status >= 500


@dataclass(frozen=True)
class ModelCard:
    """One entry of `GET /v1/models`; `parent` is None for base models and set for LoRA adapters."""

    id: str
    root: str | None
    parent: str | None


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter; `attempts` counts the first try."""

    attempts: int = 5
    initial: float = 0.25
    cap: float = 4.0

    def delay(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        return float(rng() * min(self.cap, self.initial * 2 ** (retry - 1)))


def call_with_retries(
    fn: Callable[[], T],
    *,
    deadline: float,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    idempotent: bool = True,
) -> tuple[T, int]:
    """Run `fn` until it succeeds, returns a non-retryable error, runs out of attempts or of time before `deadline`.

    `idempotent=False`: a request that reached the server and timed out (ConnectFailed.maybe_applied) is not retried.

    Returns (result, attempts). Raises the last RequestFailed with `.attempts` set on it.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn(), attempt
        except RequestFailed as e:
            e.attempts = attempt
            # A load the server may still be applying is not sent again: the caller looks before it leaps.
            unanswered = isinstance(e, ConnectFailed) and not (e.maybe_applied and not idempotent)
            retryable = unanswered or (isinstance(e, HttpError) and e.retryable)
            if not retryable or attempt >= policy.attempts:
                raise
            pause = policy.delay(attempt)
            # Leave time for the next attempt itself; giving up early beats overrunning the stage deadline.
            if time.monotonic() + pause + 0.05 >= deadline:
                raise
            sleep(pause)


@dataclass
class VllmClient:
    url: str  # scheme://host:port, no trailing slash
    api_key: str | None = field(default=None, repr=False)
    request_timeout: float = 30.0

    def models(self, deadline: float) -> list[ModelCard]:
        data = self.request("GET", "/v1/models", None, deadline)
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in cards):
            raise BadAnswer(f"HTTP 200 with {_describe_body(data)}, not a model list")
        return [ModelCard(c["id"], _opt_str(c.get("root")), _opt_str(c.get("parent"))) for c in cards]

    def load_adapter(self, name: str, path: str, *, inplace: bool, deadline: float) -> None:
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        self.request("POST", "/v1/load_lora_adapter", body, deadline)

    def unload_adapter(self, name: str, deadline: float) -> None:
        self.request("POST", "/v1/unload_lora_adapter", {"lora_name": name}, deadline)

    def complete(self, model: str, prompt: str, deadline: float, **params: Any) -> dict[str, Any]:
        data = self.request("POST", "/v1/completions", {"model": model, "prompt": prompt, **params}, deadline)
        if not isinstance(data, dict):
            raise RequestFailed("completion answer is not a JSON object")
        return data

    def request(self, method: str, path: str, body: Any, deadline: float) -> Any:
        """One HTTP exchange, over by min(request_timeout, deadline) whatever the server does; returns parsed JSON
        (or the text for non-JSON 2xx); raises RequestFailed."""
        ends = min(time.monotonic() + self.request_timeout, deadline)
        parts = urlsplit(self.url)
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        conn = _connection(parts.scheme, parts.hostname or "127.0.0.1", parts.port, ends)
        sent = False
        response: http.client.HTTPResponse | None = None
        try:
            conn.request(method, (parts.path.rstrip("/") or "") + path, body=payload, headers=headers)
            sent = True
            response = conn.getresponse()
            status, raw = response.status, response.read(MAX_BODY_BYTES + 1)
        except (OSError, http.client.HTTPException) as e:
            timed_out = isinstance(e, socket.timeout | TimeoutError)
            raise ConnectFailed(_describe_connect_error(e), sent=sent, timed_out=timed_out) from None
        finally:
            if response is not None:
                response.close()
            conn.close()
        if len(raw) > MAX_BODY_BYTES:
            raise BadAnswer(f"HTTP {status} with a body over {MAX_BODY_BYTES // (1024 * 1024)} MiB, not read further")
        return _parse_answer(status, raw)


class _DeadlineReader(io.RawIOBase):
    """The socket's read side for http.client: each read waits only for what is left until the deadline."""

    def __init__(self, owner: _DeadlineSocket) -> None:
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        sock = self._owner.sock
        sock.settimeout(self._owner.left())
        return sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._owner.reader_closed()
        super().close()


class _DeadlineSocket:
    """Wraps a connected socket so that sends and http.client's reads end by `ends` (the exchange's deadline).

    Like socket.makefile, an open reader keeps the socket open after close(): http.client closes the connection
    of a `Connection: close` answer before its body has been read."""

    def __init__(self, sock: socket.socket, ends: float) -> None:
        self.sock = sock
        self._ends = ends
        self._readers = 0
        self._closed = False

    def left(self) -> float:
        left = self._ends - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(self.left())  # since Python 3.5 a sendall's timeout covers the whole call
        self.sock.sendall(data)

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(_DeadlineReader(self))

    def reader_closed(self) -> None:
        self._readers -= 1
        if self._closed and self._readers <= 0:
            self.sock.close()

    def close(self) -> None:
        self._closed = True
        if self._readers <= 0:
            self.sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class _BoundedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int | None, ends: float) -> None:
        super().__init__(host, port, timeout=max(0.01, ends - time.monotonic()))
        self.ends = ends

    def connect(self) -> None:
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self.ends)


class _BoundedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int | None, ends: float) -> None:
        super().__init__(host, port, timeout=max(0.01, ends - time.monotonic()), context=ssl.create_default_context())
        self.ends = ends

    def connect(self) -> None:
        super().connect()  # TCP and the TLS handshake, bounded by the timeout given above
        self.sock = _DeadlineSocket(self.sock, self.ends)


def _connection(scheme: str, host: str, port: int | None, ends: float) -> http.client.HTTPConnection:
    if scheme == "https":
        return _BoundedHTTPSConnection(host, port, ends)
    return _BoundedHTTPConnection(host, port, ends)


def _describe_body(data: Any) -> str:
    if isinstance(data, str):
        short = " ".join(data.split())[:80]
        kind = "an HTML page" if short.lstrip().startswith("<") else "a body that is not JSON (truncated?)"
        return f"{kind}: {short!r}"
    if data is None:
        return "an empty body"
    return f"JSON of another shape: {json.dumps(data)[:80]!r}"


def _parse_answer(status: int, raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    try:
        data: Any = json.loads(text) if text.strip() else None
    except ValueError:
        data = text
    if 200 <= status < 300:
        return data
    message, route_missing = _error_message(status, data, text)
    raise HttpError(status, message, route_missing=route_missing)


def _error_message(status: int, data: Any, text: str) -> tuple[str, bool]:
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"]), False
        if isinstance(err, str) and err:  # vLLM's auth middleware: {"error": "Unauthorized"}
            return err, False
        if data.get("message"):
            return str(data["message"]), False
        if "detail" in data:
            # FastAPI's own answer: the route (or the method on it) does not exist on this server.
            return str(data["detail"]), status in (404, 405)
    reason = http.client.responses.get(status, "error")
    short = " ".join(text.split())[:300]
    if not short or short.startswith("<"):  # an HTML error page says no more than its status line
        short = reason
    return short, status == 405


def _describe_connect_error(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError | http.client.RemoteDisconnected | BrokenPipeError):
        return "connection closed by the server"
    if isinstance(e, socket.gaierror):
        return f"host not found ({e.strerror})"
    return getattr(e, "strerror", None) or type(e).__name__


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)
