"""The daemon's configuration: YAML in, frozen dataclasses out, every error naming the file and the key path.

The schema is the dataclasses below; `load_config` walks them, so a key that has no field is an error, a value of the
wrong type is an error, and nothing here touches the filesystem beyond reading the one file. Relative paths in a file
are taken relative to that file's directory (so a config can travel with its runs); with no file, relative to the
working directory, and the daemon watches `./.art` (ART's default art path).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from sidecar.watch.inotify import WatchMode

log = logging.getLogger("sidecar.config")

# Keys that once were part of the schema and do nothing now: accepted with a warning, so an old config still loads.
_RETIRED_KEYS = {
    "timeouts.verify": "it never limited anything: nothing read it",
}

__all__ = [
    "Config",
    "ConfigError",
    "CoordinationConfig",
    "Duration",
    "EtcdConfig",
    "LogConfig",
    "MetricsConfig",
    "NodeConfig",
    "SourcesConfig",
    "SwapConfig",
    "TimeoutsConfig",
    "TrainerConfig",
    "VllmConfig",
    "VllmServerConfig",
    "WatchConfig",
    "default_runtime_dir",
    "load_config",
    "parse_duration",
]


class ConfigError(Exception):
    """A configuration problem, as one sentence that names the file, the key and the fix."""


class Duration(float):
    """Seconds; written in YAML as a number of seconds or as `500ms`, `30s`, `2m`, `1h`."""


CopyMode = Literal["auto", "reflink", "hardlink", "copy"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "text", "journal"]


def default_state_dir() -> Path:
    # systemd's StateDirectory= exports STATE_DIRECTORY; a user running it by hand gets an XDG location.
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "fork-sidecar"


def default_runtime_dir() -> Path:
    # Agents inside trainers read FORK_SIDECAR_RUNTIME_DIR with the same default, so both ends meet.
    return Path(os.environ.get("FORK_SIDECAR_RUNTIME_DIR") or "/run/fork-sidecar")


@dataclass(frozen=True)
class WatchConfig:
    roots: tuple[Path, ...] = (Path(".art"),)
    mode: WatchMode = "auto"
    poll_interval: Duration = Duration(2.0)
    rescan_interval: Duration = Duration(60.0)


@dataclass(frozen=True)
class SourcesConfig:
    # Where a marker may take a checkpoint from; empty means "the watch roots".
    allowed_roots: tuple[Path, ...] = ()
    # Bounds on a source tree, checked before anything is copied (sizes are apparent: a sparse file counts whole).
    max_files: int = 10_000
    max_bytes: int = 256 << 30
    max_depth: int = 8


@dataclass(frozen=True)
class ForksConfig:
    # A fixed pool of fork workers (no thread per marker), and how many of them one run owner (uid) may hold:
    # one user's stuck forks never delay another's while per_owner < workers.
    workers: int = 8
    per_owner: int = 2


@dataclass(frozen=True)
class SwapConfig:
    copy_mode: CopyMode = "auto"


@dataclass(frozen=True)
class TimeoutsConfig:
    # Each call into the run made as its owner (the owner worker: staging copy, exchange, digests, outcome write).
    swap: Duration = Duration(600.0)
    trainers: Duration = Duration(120.0)
    vllm: Duration = Duration(120.0)
    # A `.fork.inprogress` without a live claimer (a daemon killed right after claiming) is adopted after this.
    orphan_claim: Duration = Duration(10.0)
    # A claim by a daemon on another host whose heartbeat is older than this is taken over (shared filesystems).
    claim_lease: Duration = Duration(120.0)


@dataclass(frozen=True)
class TrainerConfig:
    required: bool = False
    agent_timeout: Duration = Duration(60.0)
    retries: int = 1


@dataclass(frozen=True)
class VllmServerConfig:
    url: str
    api_key_file: Path | None = None
    api_key_env: str | None = None
    runs: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class VllmConfig:
    discover: bool = True
    servers: tuple[VllmServerConfig, ...] = ()
    required: bool = False
    probe: bool = False
    request_timeout: Duration = Duration(30.0)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None
    textfile: Path | None = None


@dataclass(frozen=True)
class LogConfig:
    level: LogLevel = "info"
    format: LogFormat = "auto"


@dataclass(frozen=True)
class NodeConfig:
    # This daemon's name among the daemons coordinating through etcd (their keys, outcomes' `nodes`).
    name: str = field(default_factory=socket.gethostname)


CoordinationBackend = Literal["filesystem", "etcd"]


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = ()
    prefix: str = "/fork-sidecar"
    lease_ttl: Duration = Duration(10.0)
    # TLS and auth, as etcdctl takes them (--cacert, --cert, --key, --user with the password read from a file).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    user: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class CoordinationConfig:
    backend: CoordinationBackend = "filesystem"
    etcd: EtcdConfig = field(default_factory=EtcdConfig)


@dataclass(frozen=True)
class Config:
    watch: WatchConfig = field(default_factory=WatchConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    state_dir: Path = field(default_factory=default_state_dir)
    runtime_dir: Path = field(default_factory=default_runtime_dir)
    swap: SwapConfig = field(default_factory=SwapConfig)
    forks: ForksConfig = field(default_factory=ForksConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    # Not a key: where this config came from (None = built-in defaults).
    source_file: Path | None = field(default=None, compare=False)

    @property
    def allowed_source_roots(self) -> tuple[Path, ...]:
        return self.sources.allowed_roots or self.watch.roots


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> Duration:
    """`30`, `30s`, `500ms`, `2m`, `1h` -> seconds; raises ValueError with what is accepted."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 2m or 500ms, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 30s, 2m or 500ms, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"expected a positive duration, got {value!r}")
    return Duration(seconds)


class _Reader:
    """Converts parsed YAML into the dataclasses, keeping the key path for errors."""

    def __init__(self, origin: Path | None, base_dir: Path) -> None:
        self.origin = origin
        self.base_dir = base_dir

    def fail(self, path: str, problem: str) -> ConfigError:
        where = str(self.origin) if self.origin else "built-in config"
        return ConfigError(f"{where}: {path}: {problem}; fix that key and run `fork-sidecar check-config` again.")

    def dataclass(self, cls: type[Any], data: object, path: str) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.fail(path or "(top level)", f"expected a mapping, got {type(data).__name__}")
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}
        for key in [str(k) for k in data if _join(path, str(k)) in _RETIRED_KEYS]:
            where = self.origin or "built-in config"
            log.warning("%s: %s is ignored (%s); remove it", where, _join(path, key), _RETIRED_KEYS[_join(path, key)])
            data = {k: v for k, v in data.items() if k != key}
        unknown = sorted(str(k) for k in data if k not in fields)
        if unknown:
            raise self.fail(_join(path, unknown[0]), f"unknown key (known here: {', '.join(sorted(fields))})")
        values = {name: self.value(hints[name], data[name], _join(path, name)) for name in fields if name in data}
        missing = [f.name for f in fields.values() if f.name not in values and _is_required(f)]
        if missing:
            raise self.fail(_join(path, missing[0]), "required key is missing")
        return cls(**values)

    def value(self, hint: Any, data: object, path: str) -> Any:  # noqa: C901 - one branch per supported type
        origin = get_origin(hint)
        if origin in (Union, types.UnionType):
            options = [a for a in get_args(hint) if a is not type(None)]
            return None if data is None else self.value(options[0], data, path)
        if origin is Literal:
            allowed = get_args(hint)
            if data not in allowed:
                raise self.fail(path, f"expected one of {', '.join(map(str, allowed))}, got {data!r}")
            return data
        if origin is tuple:
            if not isinstance(data, list):
                raise self.fail(path, f"expected a list, got {type(data).__name__}")
            item = get_args(hint)[0]
            return tuple(self.value(item, x, f"{path}[{i}]") for i, x in enumerate(data))
        if dataclasses.is_dataclass(hint):
            return self.dataclass(hint, data, path)  # type: ignore[arg-type]
        if hint is Duration:
            try:
                return parse_duration(data)
            except ValueError as e:
                raise self.fail(path, str(e)) from None
        if hint is Path:
            if not isinstance(data, str) or not data:
                raise self.fail(path, f"expected a path, got {data!r}")
            p = Path(data).expanduser()
            return p if p.is_absolute() else self.base_dir / p
        if hint is bool:
            if not isinstance(data, bool):
                raise self.fail(path, f"expected true or false, got {data!r}")
            return data
        if hint is int:
            if isinstance(data, bool) or not isinstance(data, int) or data < 0:
                raise self.fail(path, f"expected a non-negative integer, got {data!r}")
            return data
        if hint is str:
            if not isinstance(data, str):
                raise self.fail(path, f"expected a string, got {data!r}")
            return data
        raise TypeError(f"config schema uses an unsupported type at {path}: {hint!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def load_config(path: Path | None) -> Config:
    """Read and validate `path`; with None, the built-in defaults (roots = ./.art)."""
    if path is None:
        config: Config = _Reader(None, Path.cwd()).dataclass(Config, {}, "")
        return _absolute_roots(config, Path.cwd())
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; pass an existing file with --config (see config.example.yaml)."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e}); check the path and its permissions.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax (see config.example.yaml).") from None
    base = path.resolve().parent
    config = _Reader(path, base).dataclass(Config, data, "")
    _check_semantics(config, _Reader(path, base))
    return dataclasses.replace(_absolute_roots(config, base), source_file=path)


def _absolute_roots(config: Config, base: Path) -> Config:
    # Roots from the built-in default are relative to where the daemon was started.
    roots = tuple(r if r.is_absolute() else base / r for r in config.watch.roots)
    return dataclasses.replace(config, watch=dataclasses.replace(config.watch, roots=roots))


def _check_semantics(config: Config, reader: _Reader) -> None:
    if not config.watch.roots:
        raise reader.fail("watch.roots", "needs at least one art path")
    for key in ("max_files", "max_bytes", "max_depth"):
        if getattr(config.sources, key) < 1:
            raise reader.fail(f"sources.{key}", "must be at least 1")
    if config.forks.workers < 1 or config.forks.per_owner < 1:
        raise reader.fail("forks", "workers and per_owner must be at least 1")
    if config.metrics.listen is not None and not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", config.metrics.listen):
        raise reader.fail("metrics.listen", f"expected HOST:PORT such as 127.0.0.1:9464, got {config.metrics.listen!r}")
    for i, server in enumerate(config.vllm.servers):
        if not re.match(r"^https?://", server.url):
            raise reader.fail(f"vllm.servers[{i}].url", f"expected an http:// or https:// URL, got {server.url!r}")
        if server.api_key_file is not None and server.api_key_env is not None:
            raise reader.fail(f"vllm.servers[{i}]", "give api_key_file or api_key_env, not both")
    _check_coordination(config, reader)


_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _check_coordination(config: Config, reader: _Reader) -> None:
    if not _NODE_NAME.match(config.node.name):
        raise reader.fail(
            "node.name", f"expected 1-63 letters, digits, '.', '_' or '-' (a host name), got {config.node.name!r}"
        )
    etcd = config.coordination.etcd
    if config.coordination.backend == "etcd" and not etcd.endpoints:
        raise reader.fail("coordination.etcd.endpoints", "needs at least one URL such as http://10.0.0.1:2379")
    for i, url in enumerate(etcd.endpoints):
        if not re.fullmatch(r"https?://[\w.\-\[\]:]+:\d{1,5}/?", url):
            raise reader.fail(f"coordination.etcd.endpoints[{i}]", f"expected http(s)://HOST:PORT, got {url!r}")
    if not re.fullmatch(r"(/[\w.\-]+)+", etcd.prefix):
        raise reader.fail(
            "coordination.etcd.prefix", f"expected a key prefix such as /fork-sidecar, got {etcd.prefix!r}"
        )
    if etcd.lease_ttl < 2:
        raise reader.fail(
            "coordination.etcd.lease_ttl", f"must be at least 2s (etcd counts whole seconds), got {etcd.lease_ttl}s"
        )
    if (etcd.cert_file is None) != (etcd.key_file is None):
        raise reader.fail(
            "coordination.etcd", "give cert_file and key_file together (the client certificate and its key)"
        )
    if (etcd.user is None) != (etcd.password_file is None):
        raise reader.fail("coordination.etcd", "give user and password_file together")
