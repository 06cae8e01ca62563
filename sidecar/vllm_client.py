"""A small stdlib HTTP client for the few vLLM routes the sidecar uses, with a retry policy bounded by a deadline.

vLLM answers errors as `{"error": {"message": ..., "code": N}}` (older versions: `{"message": ...}`) and FastAPI's own
404/405 for a route that does not exist as `{"detail": "Not Found"}`; `HttpError.route_missing` tells the two apart,
because vLLM also answers 404 for an adapter path that does not exist. Successful adapter loads answer plain text.
The API key goes only into the Authorization header: no message built here contains it.
"""

from __future__ import annotations

import http.client
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
    "ConnectFailed",
    "HttpError",
    "ModelCard",
    "RequestFailed",
    "RetryPolicy",
    "VllmClient",
    "call_with_retries",
]

T = TypeVar("T")


class RequestFailed(Exception):
    """A request that did not get a usable answer; `str()` is a short reason without secrets."""

    attempts = 1  # set by call_with_retries to how many tries it took


class ConnectFailed(RequestFailed):
    """No HTTP answer at all: refused, reset, timed out, DNS. Worth retrying."""


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
) -> tuple[T, int]:
    """Run `fn` until it succeeds, returns a non-retryable error, runs out of attempts or of time before `deadline`.

    Returns (result, attempts). Raises the last RequestFailed with `.attempts` set on it.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn(), attempt
        except RequestFailed as e:
            e.attempts = attempt
            retryable = isinstance(e, ConnectFailed) or (isinstance(e, HttpError) and e.retryable)
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
        cards = data.get("data", []) if isinstance(data, dict) else []
        return [
            ModelCard(str(c.get("id")), _opt_str(c.get("root")), _opt_str(c.get("parent")))
            for c in cards
            if isinstance(c, dict)
        ]

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
        """One HTTP exchange; returns parsed JSON (or the text for non-JSON 2xx); raises RequestFailed."""
        timeout = max(0.05, min(self.request_timeout, deadline - time.monotonic()))
        parts = urlsplit(self.url)
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        conn = _connection(parts.scheme, parts.hostname or "127.0.0.1", parts.port, timeout)
        try:
            conn.request(method, (parts.path.rstrip("/") or "") + path, body=payload, headers=headers)
            response = conn.getresponse()
            status, raw = response.status, response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ConnectFailed(_describe_connect_error(e)) from None
        finally:
            conn.close()
        return _parse_answer(status, raw)


def _connection(scheme: str, host: str, port: int | None, timeout: float) -> http.client.HTTPConnection:
    if scheme == "https":
        return http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
    return http.client.HTTPConnection(host, port, timeout=timeout)


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
