"""The `.fork` marker: its format, reading it, and the outcome files that end it.

Lifecycle in a model dir: `.fork` (a request) -> renamed to `.fork.inprogress` (claimed: see sidecar/claims/)
-> `.fork.done` or `.fork.failed` (a JSON outcome). A `.fork` written while another is in progress stays where it is
and is taken after it: one file is exactly one queued request, and re-touching it does not queue more (the last
content written before the claim wins).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from sidecar.protocol.atomic_write import write_json_atomic

__all__ = [
    "DONE",
    "FAILED",
    "INPROGRESS",
    "MARKER",
    "MARKER_SETTLE_S",
    "MAX_MARKER_BYTES",
    "MarkerError",
    "MarkerRequest",
    "bounded_outcome",
    "parse_marker",
    "read_json_object",
    "read_marker_file",
    "remove_quietly",
    "write_outcome",
]

MARKER = ".fork"
INPROGRESS = ".fork.inprogress"
DONE = ".fork.done"
FAILED = ".fork.failed"
MAX_MARKER_BYTES = 64 * 1024
MAX_RECORD_BYTES = 1024 * 1024

# A regular-file marker that a scan finds younger than this is reported only once it has stopped changing for this
# long: a scan can land between `open(O_CREAT)` and `write()` of `echo step: 3 > .fork` (the mkdir -p + write race
# does exactly that), and an empty marker is a different request. Events need no such wait: IN_CLOSE_WRITE and
# IN_MOVED_TO come after the content.
# A worker that was not told of a marker's close() waits as long before it takes the marker (sidecar/claims/).
MARKER_SETTLE_S = 0.25

RequestKind = Literal["latest", "source", "step", "from_model"]
_SOURCE_KEYS = ("source", "step", "from_model")
_OPTIONAL_KEYS = ("from_project", "not_after_step", "request_id")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class MarkerError(Exception):
    """A marker that cannot be acted on, as one sentence naming the file and the fix."""


@dataclass(frozen=True)
class MarkerRequest:
    kind: RequestKind
    source: str | None = None
    step: int | None = None
    from_model: str | None = None
    from_project: str | None = None
    not_after_step: int | None = None
    # Optional extension: lets `fork-sidecar fork --wait` find the outcome of its own request.
    request_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        if self.kind == "source":
            return f"source {self.source}"
        if self.kind == "step":
            return f"step {self.step}"
        if self.kind == "from_model":
            where = f"{self.from_project}/" if self.from_project else ""
            limit = f" (not after step {self.not_after_step})" if self.not_after_step is not None else ""
            return f"model {where}{self.from_model}{limit}"
        return "the newest checkpoint"


def parse_marker(content: bytes, where: Path) -> MarkerRequest:
    """Parse marker bytes; empty or whitespace means "fork from the newest checkpoint of this run"."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(where, "is not UTF-8 text") from None
    if not text.strip():
        return MarkerRequest("latest")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise _bad(where, "is not valid YAML") from None
    if not isinstance(data, dict):
        raise _bad(where, f"must be empty or a YAML mapping, not {_type_name(data)}")
    return _request_from_mapping(data, where)


def _request_from_mapping(data: dict[Any, Any], where: Path) -> MarkerRequest:
    unknown = sorted(str(k) for k in data if k not in _SOURCE_KEYS + _OPTIONAL_KEYS)
    if unknown:
        raise _bad(where, f"has unknown key {unknown[0]!r}")
    given = [k for k in _SOURCE_KEYS if k in data]
    if len(given) > 1:
        raise _bad(where, f"names both {given[0]!r} and {given[1]!r}; give exactly one source")
    request_id = _optional_str(data, "request_id", where)
    if request_id is not None and not _REQUEST_ID.match(request_id):
        raise _bad(where, "has a request_id that is not 1-64 characters of letters, digits, '.', '_' or '-'")
    not_after = _optional_step(data, "not_after_step", where)
    from_project = _optional_str(data, "from_project", where)
    if (not_after is not None or from_project is not None) and given != ["from_model"]:
        raise _bad(where, "uses from_project/not_after_step without from_model")
    if not given:
        return MarkerRequest("latest", request_id=request_id)
    if given[0] == "step":
        return MarkerRequest("step", step=_optional_step(data, "step", where), request_id=request_id)
    value = _optional_str(data, given[0], where)
    if not value:
        raise _bad(where, f"has an empty {given[0]!r}")
    if given[0] == "source":
        return MarkerRequest("source", source=value, request_id=request_id)
    if "/" in value or value in (".", ".."):
        raise _bad(where, f"has from_model {value!r}, which must be a model name, not a path")
    return MarkerRequest(
        "from_model", from_model=value, from_project=from_project, not_after_step=not_after, request_id=request_id
    )


def _optional_step(data: dict[Any, Any], key: str, where: Path) -> int | None:
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(where, f"has {key} {value!r}; it must be a non-negative whole number")
    return value


def _optional_str(data: dict[Any, Any], key: str, where: Path) -> str | None:
    if key not in data or data[key] is None:
        return None
    value = data[key]
    if not isinstance(value, str):
        raise _bad(where, f"has {key} of type {_type_name(value)}; it must be a string")
    if "\0" in value:
        raise _bad(where, f"has a NUL byte in {key}")
    return value


def _type_name(value: object) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _bad(where: Path, problem: str) -> MarkerError:
    return MarkerError(f"{where} {problem}; write an empty file or one of source:, step:, from_model: (see README).")


def read_marker_file(path: Path, *, dir_fd: int | None = None) -> bytes:
    """Read a (claimed) marker without following a symlink or blocking on a FIFO, at most 64 KiB.

    With `dir_fd`, the marker is `path.name` in the directory open as `dir_fd` (`path` names it in messages)."""
    try:
        fd = os.open(_at(path, dir_fd), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MarkerError(
                f"{path} is a symlink; write the marker as a regular file in the run directory."
            ) from None
        raise MarkerError(f"{path} cannot be opened ({os.strerror(e.errno or 0)}); check its permissions.") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise MarkerError(f"{path} is {kind}; remove it and write the marker as a regular file.")
        if st.st_size > MAX_MARKER_BYTES:
            raise MarkerError(f"{path} is larger than 64 KiB; a marker is a few lines of YAML, rewrite it.")
        data = os.read(fd, MAX_MARKER_BYTES + 1)
        if len(data) > MAX_MARKER_BYTES:
            raise MarkerError(f"{path} is larger than 64 KiB; a marker is a few lines of YAML, rewrite it.")
        return data
    finally:
        os.close(fd)


def _at(path: Path, dir_fd: int | None) -> Path | str:
    return path if dir_fd is None else path.name


def read_json_object(path: Path, limit: int = MAX_RECORD_BYTES, *, dir_fd: int | None = None) -> dict[str, Any] | None:
    """A JSON object the sidecar wrote (a claim, an outcome, a status), read like a marker: no symlink followed,
    no blocking on a FIFO; None when it is absent, not a regular file, over `limit` bytes or not a JSON object.

    The limit is well above a claim's, which embeds a marker of up to 64 KiB beside its own fields.
    """
    try:
        fd = os.open(_at(path, dir_fd), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > limit:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            os.rmdir(path)
        else:
            os.unlink(path)


# Beyond these, an outcome's fields are trimmed so that the record stays well under MAX_RECORD_BYTES.
_MAX_OUTCOME_TEXT = 4096


def bounded_outcome(outcome: dict[str, Any], limit: int = MAX_RECORD_BYTES // 2) -> dict[str, Any]:
    """`outcome`, or a copy small enough to be read back (read_json_object refuses records over 1 MiB): long
    strings are cut and long lists shortened, saying so. Nothing a fork writes can make its outcome unreadable."""
    if len(json.dumps(outcome)) <= limit:
        return outcome
    trimmed = _trim(outcome)
    assert isinstance(trimmed, dict)
    trimmed["trimmed"] = True
    return trimmed


def _trim(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_OUTCOME_TEXT:
        return value[:_MAX_OUTCOME_TEXT] + f"... ({len(value)} characters)"
    if isinstance(value, list):
        kept = [_trim(v) for v in value[:20]]
        return [*kept, f"... {len(value) - 20} more"] if len(value) > 20 else kept
    if isinstance(value, dict):
        return {str(k)[:200]: _trim(v) for k, v in list(value.items())[:50]}
    return value


def write_outcome(model_dir: Path, outcome: dict[str, Any]) -> Path:
    """Record the outcome beside the marker, leaving exactly one outcome file (the latest) in the run dir."""
    done = outcome.get("status") == "done"
    path = model_dir / (DONE if done else FAILED)
    write_json_atomic(path, bounded_outcome(outcome))
    remove_quietly(model_dir / (FAILED if done else DONE))
    return path
