"""Finding the vLLM servers that may serve a run: from the config, and from the process table.

Command lines recognised (options as `--opt value` or `--opt=value`, underscores or dashes, as vLLM accepts):
- `vllm serve MODEL ...` and `python -m vllm.entrypoints.openai.api_server ...`: `--host` (default: all interfaces,
  so we connect to loopback), `--port` (default 8000), `--api-key`, `--lora-modules` (`name=path` items or the JSON
  form `{"name": ..., "path": ...}`), `--ssl-certfile` (then https);
- ART's `python -m art.vllm.dedicated_server` and `art-vllm-runtime-server` (also under `uv run`): `--host` (default
  127.0.0.1), `--port`, `--lora-path`, and `--server-args-json` which may carry `api_key` and `lora_modules`.
The API key may also come from the process's `VLLM_API_KEY`; that environment and the working directory (against which
relative `--lora-modules` paths resolve) are readable only when the daemon runs as the server's user or root. Not
understood: `--uds` (a unix socket) and options given in a `--config FILE`; list such servers under `vllm.servers`.
`parse_server_command` is pure; `discover_servers` reads /proc (psutil where it is more than one file).

A discovered server is bound to its process: it is trusted for a run only when that process runs as the run's owner
or root (`trusted_for_run`), and its key (or anything else) goes to its port only while that process is the one
listening there (`listener_check`, right before each exchange). Configured servers are explicit, so trusted as given.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from sidecar.config import Config, VllmServerConfig
from sidecar.listeners import listener_problem

__all__ = [
    "ServerCommand",
    "ServerTarget",
    "configured_servers",
    "discover_servers",
    "listener_check",
    "parse_server_command",
    "server_url",
    "trusted_for_run",
]


VLLM_DEFAULT_PORT = 8000
_VLLM_MODULE = "vllm.entrypoints.openai.api_server"
_ART_MODULE = "art.vllm.dedicated_server"
_ART_RUNTIME_SCRIPT = "art-vllm-runtime-server"
# Options that take several values (vLLM: nargs="+").
_MULTI_VALUE = {"--lora-modules", "--api-key"}


@dataclass(frozen=True)
class ServerCommand:
    """What a server's command line says about how to reach it and which adapters it started with."""

    host: str | None
    port: int
    tls: bool = False
    api_key: str | None = field(default=None, repr=False)
    lora_paths: tuple[str, ...] = ()
    art: bool = False  # started by ART (art-vllm-runtime-server, art.vllm.dedicated_server): ART names its adapters


@dataclass(frozen=True)
class ServerTarget:
    """A server to talk to. `claimed` means it must answer for this run (configured for it, or started with one of
    its checkpoints); an unclaimed discovered server is only asked whether it happens to serve the run."""

    url: str
    origin: str  # "vllm.servers[0]" or "pid 1234": for messages
    api_key: str | None = field(default=None, repr=False)
    cwd: Path | None = None  # relative adapter roots are relative to the server's working directory
    lora_paths: tuple[Path, ...] = ()
    claimed: bool = False
    problem: str | None = None  # a reason it cannot be asked at all (unreadable key file)
    pid: int | None = None  # the discovered process (or the one whose key a configured server borrowed)
    uid: int | None = None  # the uid that process runs as
    configured: bool = False  # listed under vllm.servers: explicit, so trusted for the runs it names
    art: bool = False  # ART's own server: the names ART's client requests serve the fork too (vllm/art_names.py)


def server_url(host: str | None, port: int, tls: bool = False) -> str:
    """A URL to reach a server bound to `host`: wildcard binds are reached on loopback."""
    if host in (None, "", "0.0.0.0", "localhost"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def parse_server_command(argv: Sequence[str]) -> ServerCommand | None:
    """The ServerCommand of a vLLM OpenAI server's argv, or None when it is not one."""
    kind, rest = _server_kind(argv)
    if kind is None:
        return None
    opts = _options(rest)
    host = opts.get("--host", [None])[-1]
    port_text = opts.get("--port", [None])[-1]
    try:
        port = int(port_text) if port_text else VLLM_DEFAULT_PORT
    except ValueError:
        return None
    api_keys = opts.get("--api-key", [])
    lora_paths = [p for item in opts.get("--lora-modules", []) if (p := _lora_module_path(item))]
    if kind == "art":
        host = host or "127.0.0.1"
        lora_paths += opts.get("--lora-path", [])
        server_args = _json_object(opts.get("--server-args-json", ["{}"])[-1])
        api_keys += _strings(server_args.get("api_key"))
        for item in _items(server_args.get("lora_modules")):
            if p := _lora_module_path(item if isinstance(item, str) else json.dumps(item)):
                lora_paths.append(p)
    return ServerCommand(
        host=host,
        port=port,
        tls="--ssl-certfile" in opts,
        api_key=api_keys[0] if api_keys else None,
        lora_paths=tuple(lora_paths),
        art=kind == "art",
    )


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _items(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


def _server_kind(argv: Sequence[str]) -> tuple[str | None, Sequence[str]]:
    for i, arg in enumerate(argv):
        base = arg.rsplit("/", 1)[-1]
        if base == "vllm" and i + 1 < len(argv) and argv[i + 1] == "serve":
            return "vllm", argv[i + 2 :]
        if arg == "-m" and i + 1 < len(argv):
            if argv[i + 1] == _VLLM_MODULE:
                return "vllm", argv[i + 2 :]
            if argv[i + 1] == _ART_MODULE:
                return "art", argv[i + 2 :]
        if base == _ART_RUNTIME_SCRIPT:
            return "art", argv[i + 1 :]
        if arg.endswith("vllm/entrypoints/openai/api_server.py"):
            return "vllm", argv[i + 1 :]
    return None, ()


def _options(args: Sequence[str]) -> dict[str, list[str]]:
    """`--opt value`, `--opt=value` and multi-value `--lora-modules a=b c=d` -> {"--opt": [values...]}."""
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        name = "--" + name[2:].replace("_", "-")
        values = out.setdefault(name, [])
        if eq:
            values.append(value)
            continue
        while i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
            if name not in _MULTI_VALUE:
                break
    return out


def _lora_module_path(item: str) -> str | None:
    item = item.strip()
    if item.startswith("{"):
        obj = _json_object(item)
        path = obj.get("path")
        return path if isinstance(path, str) and path else None
    _, eq, path = item.partition("=")
    return path if eq and path else None


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def discover_servers() -> list[ServerTarget]:
    """Every vLLM OpenAI server in the process table, one per URL (the lowest pid wins, e.g. over `uv run`'s)."""
    found: dict[str, ServerTarget] = {}
    for pid, argv in _command_lines_mentioning(b"vllm"):
        command = parse_server_command(argv)
        if command is None:
            continue
        try:
            target = _target_of(psutil.Process(pid), command)
        except psutil.Error:
            continue  # exited meanwhile
        if target.url not in found:
            found[target.url] = target
    return list(found.values())


def _command_lines_mentioning(needle: bytes) -> list[tuple[int, list[str]]]:
    """(pid, argv) of processes whose command line contains `needle`, by pid.

    Reads /proc/<pid>/cmdline directly: psutil.process_iter builds a Process (reading its stat) for every pid, which
    is five times slower here (8 ms against 1.5 ms for 120 processes), and this runs on every fork.
    """
    out = []
    for pid in sorted(psutil.pids()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if needle in raw:
            out.append((pid, [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]))
    return out


def _target_of(proc: psutil.Process, command: ServerCommand) -> ServerTarget:
    cwd: Path | None = None
    with contextlib.suppress(psutil.Error, OSError):
        cwd = Path(proc.cwd())
    api_key = command.api_key
    if api_key is None:
        # Another user's environment is unreadable unless we run as root; then we go without a key.
        with contextlib.suppress(psutil.Error, OSError):
            api_key = proc.environ().get("VLLM_API_KEY") or None
    paths = tuple(_absolute(p, cwd) for p in command.lora_paths)
    url = server_url(command.host, command.port, command.tls)
    found = tuple(p for p in paths if p is not None)
    return ServerTarget(
        url, f"pid {proc.pid}", api_key, cwd, found, pid=proc.pid, uid=proc.uids().effective, art=command.art
    )


def _absolute(path: str, cwd: Path | None) -> Path | None:
    p = Path(path)
    if p.is_absolute():
        return p
    return cwd / p if cwd is not None else None


def configured_servers(config: Config, model_dir: Path, environ: Mapping[str, str] = os.environ) -> list[ServerTarget]:
    """The `vllm.servers` entries whose `runs` globs match this run (its path, or `project/model`)."""
    out = []
    for i, server in enumerate(config.vllm.servers):
        if not run_matches(server.runs, model_dir):
            continue
        origin = f"vllm.servers[{i}]"
        key, problem = _configured_key(server, origin, environ)
        url = server.url.rstrip("/").replace("://localhost", "://127.0.0.1")
        out.append(ServerTarget(url, origin, key, claimed=True, problem=problem, configured=True))
    return out


def run_matches(globs: Iterable[str], model_dir: Path) -> bool:
    short = "/".join(model_dir.parts[-3::2])  # project/model
    return any(fnmatch.fnmatchcase(str(model_dir), g) or fnmatch.fnmatchcase(short, g) for g in globs)


def _configured_key(server: VllmServerConfig, origin: str, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    if server.api_key_file is not None:
        try:
            key = server.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or type(e).__name__
            return None, f"cannot read {origin}.api_key_file {server.api_key_file} ({reason}); fix its path or mode."
        return key or None, None if key else f"{origin}.api_key_file {server.api_key_file} is empty; put the key in it."
    if server.api_key_env is not None:
        key = environ.get(server.api_key_env, "").strip()
        if not key:
            return (
                None,
                f"{origin}.api_key_env names {server.api_key_env}, which is not set in the daemon's environment.",
            )
        return key, None
    return None, None


def merge_targets(configured: Sequence[ServerTarget], discovered: Sequence[ServerTarget]) -> list[ServerTarget]:
    """Configured servers first; a discovered one at the same URL lends its key (if configured has none) and cwd.

    A borrowed key stays bound to the process it came from (`pid`), like the discovered server's own."""
    by_url = {t.url: t for t in discovered}
    out = []
    for t in configured:
        seen = by_url.pop(t.url, None)
        if seen is not None:
            t = replace(t, cwd=seen.cwd, lora_paths=seen.lora_paths, art=seen.art)
            if t.api_key is None and seen.api_key is not None:
                t = replace(t, api_key=seen.api_key, pid=seen.pid, uid=seen.uid)
        out.append(t)
    return out + list(by_url.values())


def trusted_for_run(target: ServerTarget, owner_uid: int | None) -> bool:
    """Whether `target` may serve a run owned by `owner_uid`: configured ones always, discovered ones when their
    process runs as that owner or as root (anyone else's server could claim any run and fake its answers)."""
    if target.configured:
        return True
    return target.uid is not None and target.uid in (0, owner_uid)


def listener_check(target: ServerTarget) -> str | None:
    """None when requests to a discovered target reach its own process, else a sentence (nothing may be sent)."""
    if target.pid is None:
        return None
    parts = urlsplit(target.url)
    if parts.hostname is None or parts.port is None:
        return f"cannot tell which port {target.url} is"
    problem = listener_problem(target.pid, parts.hostname, parts.port)
    return None if problem is None else f"{problem}; nothing was sent to it, not its key either"
