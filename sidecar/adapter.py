"""LoRA adapter checks and the adapter digest, from safetensors headers and byte ranges.

Nothing here loads tensors: a check reads `adapter_config.json` and the safetensors header, the
digest reads each tensor's byte range in `CHUNK_BYTES` pieces, one bounded buffer per hashing thread.

Why our own header parser rather than `safetensors.safe_open`: `safe_open(..., framework="numpy")`
imports numpy as soon as it opens a file (measured with safetensors 0.8.0), takes a path string (so a
symlink swapped in after our checks would be followed), and its Rust validation checks nothing this
parser does not: UTF-8 JSON, known dtypes, shapes that fit `usize`, sizes that match the dtype, and
byte ranges that tile the data section exactly. This parser is stricter in three places (duplicate
keys, unknown fields in a tensor entry, `-0`) and the tests check, over generated headers, that
whatever it accepts `safe_open` accepts too. So the daemon needs neither safetensors nor numpy.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sidecar.protocol.digest import CHUNK_BYTES, TensorRecord, digest_tensors

__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "DTYPE_BITS",
    "AdapterError",
    "AdapterInfo",
    "CheckpointEntry",
    "SafetensorsHeader",
    "TensorEntry",
    "TreeLimits",
    "adapter_digest",
    "check_adapter",
    "digest_open_file",
    "open_checkpoint_dir",
    "parse_header",
    "printable",
    "read_header",
    "walk_checkpoint",
]

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
MAX_CONFIG_BYTES = 16 << 20
MAX_TREE_DEPTH = 8
_U64_MAX = (1 << 64) - 1

# Every dtype safetensors 0.8 knows, with its size in bits (sub-byte types must end on a byte boundary).
DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
LORA_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# peft saves LoRA weights as `base_model.model.<module path>.<suffix>` (the adapter name stripped).
PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES: Mapping[str, str] = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "B_bias",  # LoraConfig(lora_bias=True)
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude",  # DoRA
}
_KIND_NAMES = {"A": "lora_A", "B": "lora_B", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B"}
# Full (non-LoRA) tensors peft may save beside LoRA weights: `modules_to_save` and embedding layers
# (peft's EMBEDDING_LAYER_NAMES, saved with save_embedding_layers).
_EMBEDDING_LAYERS = ("embed_tokens", "lm_head")

_SAFETENSORS_ADVICE = "the file is damaged or not a safetensors file — re-save the checkpoint"
_CONFIG_ADVICE = "fix adapter_config.json or re-save the checkpoint"
_LORA_ADVICE = "the file is not a peft LoRA adapter — point the fork at a LoRA checkpoint"


class AdapterError(Exception):
    """A checkpoint is not a usable LoRA adapter; the message is one sentence naming the file."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = Path(path)
        super().__init__(message)


class _HeaderProblem(ValueError):
    """A reason a safetensors header is invalid, without the file name (parse_header is pure)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; begin/end are absolute offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    header_len: int
    data_start: int  # 8 + header_len
    file_size: int
    tensors: tuple[TensorEntry, ...]  # sorted by name, the digest's order
    metadata: Mapping[str, str] | None


@dataclass(frozen=True)
class AdapterInfo:
    dir: Path
    rank: int  # `r` from adapter_config.json
    max_rank: int  # the largest rank of any module (rank_pattern may raise it): vLLM's --max-lora-rank must cover it
    alpha: float | None
    target_modules: tuple[str, ...]  # as configured; a regex string is a 1-tuple
    modules: tuple[str, ...]  # module paths carrying LoRA weights, without `base_model.model.`
    tensors: tuple[TensorEntry, ...]  # sorted by name
    tensor_bytes: int
    total_bytes: int  # all regular files of the checkpoint
    files: tuple[str, ...]  # relative paths ("/"-separated), sorted


@dataclass(frozen=True)
class TreeLimits:
    """How big a checkpoint tree may be (config `sources.max_*`); sizes are apparent sizes, so a sparse file
    counts as the bytes a copy of it writes."""

    max_files: int = 10_000
    max_bytes: int = 256 << 30
    max_depth: int = MAX_TREE_DEPTH


@dataclass(frozen=True)
class CheckpointEntry:
    relpath: str  # "/"-separated, relative to the checkpoint dir
    is_dir: bool
    stat: os.stat_result


def printable(value: str | os.PathLike[str]) -> str:
    """A path or name as it can go into a one-line message: repr() when it holds newlines or undecodable bytes."""
    text = os.fspath(value)
    return text if text and text.isprintable() else repr(text)


def _human_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _length_text(n: int) -> str:
    # 2^40 reads better than 1099511627776 for the absurd lengths a damaged file declares.
    return f"2^{n.bit_length() - 1}" if n > (1 << 32) and n & (n - 1) == 0 else str(n)


# ---------------------------------------------------------------------------------------------- header


def _reject_constant(name: str) -> object:
    raise _HeaderProblem(f"header is not JSON ({name} is not a JSON value)")


def _strict_int(text: str) -> int:
    # serde (safetensors) reads `-0` as a float and every negative number as out of range for usize;
    # mapping them all to -1 makes us reject them too. Long digit strings cannot fit u64 anyway.
    if text.startswith("-"):
        return -1
    return int(text) if len(text) <= 20 else _U64_MAX + 1


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _HeaderProblem(f"header names {printable(key)} twice")
        result[key] = value
    return result


def _load_json_object(raw: bytes, what: str, *, safetensors_ints: bool = False) -> dict[str, object]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _HeaderProblem(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        loaded = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_int=_strict_int if safetensors_ints else int,
            parse_constant=_reject_constant,
        )
    except _HeaderProblem:
        raise
    except RecursionError:
        raise _HeaderProblem(f"{what} nests JSON too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() of absurd digit strings
        raise _HeaderProblem(f"{what} is not JSON ({exc})") from None
    if not isinstance(loaded, dict):
        raise _HeaderProblem(f"{what} is a JSON {type(loaded).__name__}, not an object")
    return loaded


def _valid_unicode(text: str) -> bool:
    # json.loads turns "\ud800" escapes into lone surrogates; safetensors rejects them, and so must we.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_metadata(value: object) -> Mapping[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(v, str) and _valid_unicode(k) and _valid_unicode(v) for k, v in value.items()
    ):
        raise _HeaderProblem("__metadata__ is not a mapping of strings to strings")
    return dict(value)


def _is_u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64_MAX


def _declared_nbytes(name: str, dtype: str, shape: list[int]) -> int:
    elements = 1
    for dim in shape:
        elements *= dim
        if elements > _U64_MAX:  # safetensors computes this in u64 and fails on overflow
            raise _HeaderProblem(f"tensor {printable(name)} declares more than 2^64 elements")
    bits = elements * DTYPE_BITS[dtype]
    if bits > _U64_MAX:
        raise _HeaderProblem(f"tensor {printable(name)} declares more than 2^64 bits")
    if bits % 8:
        raise _HeaderProblem(f"tensor {printable(name)} ({dtype} {shape}) does not end on a byte boundary")
    return bits // 8


def _parse_entry(name: str, value: object, data_start: int) -> TensorEntry:
    shown = printable(name)
    if not _valid_unicode(name):
        raise _HeaderProblem(f"tensor name {shown} is not valid Unicode")
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise _HeaderProblem(f"entry {shown} is not an object with exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _HeaderProblem(f"tensor {shown} has unknown dtype {printable(str(dtype))}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise _HeaderProblem(f"tensor {shown} has shape {shape!r:.80}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise _HeaderProblem(f"tensor {shown} has data_offsets {offsets!r:.80}, not two non-negative integers")
    begin, end = offsets
    need = _declared_nbytes(name, dtype, shape)
    if end < begin or end - begin != need:
        raise _HeaderProblem(
            f"tensor {shown} is {dtype} {shape} ({need} bytes) but its data_offsets [{begin}, {end}] "
            f"span {end - begin} bytes"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_tiling(tensors: list[TensorEntry], data_start: int, data_size: int) -> None:
    """safetensors requires the tensors' byte ranges to tile the data section exactly."""
    position = data_start
    previous: TensorEntry | None = None
    for entry in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if entry.begin < position:
            other = printable(previous.name) if previous else "the header"
            raise _HeaderProblem(f"tensor {printable(entry.name)} overlaps {other}")
        if entry.begin > position:
            raise _HeaderProblem(
                f"data bytes {position - data_start}..{entry.begin - data_start} belong to no tensor "
                f"(a gap before {printable(entry.name)})"
            )
        position, previous = entry.end, entry
    if position - data_start > data_size:
        raise _HeaderProblem(
            f"tensor {printable(previous.name if previous else '')} ends at data byte {position - data_start}, "
            f"past the {data_size}-byte data section (the file is truncated)"
        )
    if position - data_start < data_size:
        raise _HeaderProblem(f"the last {data_start + data_size - position} bytes of the file belong to no tensor")


def parse_header(header_json: bytes, data_size: int) -> tuple[tuple[TensorEntry, ...], Mapping[str, str] | None]:
    """Validates a safetensors JSON header against a data section of `data_size` bytes.

    Pure: returns (tensors sorted by name, with offsets relative to the start of the file, metadata)
    or raises ValueError naming what is wrong.
    """
    data_start = 8 + len(header_json)
    obj = _load_json_object(header_json, "header", safetensors_ints=True)
    metadata = _parse_metadata(obj.pop("__metadata__", None))
    tensors = [_parse_entry(name, value, data_start) for name, value in obj.items()]
    _check_tiling(tensors, data_start, data_size)
    tensors.sort(key=lambda t: t.name)
    return tuple(tensors), metadata


# ---------------------------------------------------------------------------------------------- file I/O


def _pread_exact(fd: int, size: int, offset: int, display: str) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise AdapterError(display, f"{display}: the file ended early while reading it; {_SAFETENSORS_ADVICE}.")
        data += more
    return data


def read_header(fd: int, display: str | os.PathLike[str]) -> SafetensorsHeader:
    """Reads and validates the header of the safetensors file open as `fd`."""
    shown = printable(display)
    size = os.fstat(fd).st_size
    if size < 8:
        raise AdapterError(
            display, f"{shown}: the file is {size} bytes, too short for a safetensors header; {_SAFETENSORS_ADVICE}."
        )
    header_len = int.from_bytes(_pread_exact(fd, 8, 0, shown), "little")
    if header_len > MAX_HEADER_BYTES:
        raise AdapterError(
            display,
            f"{shown}: header length {_length_text(header_len)} exceeds the 100 MB safetensors limit "
            f"(file size {_human_size(size)}); {_SAFETENSORS_ADVICE}.",
        )
    if header_len > size - 8:
        raise AdapterError(
            display,
            f"{shown}: header length {_length_text(header_len)} exceeds the file size ({_human_size(size)}); "
            f"{_SAFETENSORS_ADVICE}.",
        )
    raw = _pread_exact(fd, header_len, 8, shown)
    try:
        tensors, metadata = parse_header(raw, size - 8 - header_len)
    except ValueError as exc:
        raise AdapterError(display, f"{shown}: {exc}; {_SAFETENSORS_ADVICE}.") from None
    return SafetensorsHeader(header_len, 8 + header_len, size, tensors, metadata)


def _read_piece(fd: int, begin: int, length: int, buffer: bytearray, display: str) -> memoryview:
    """Bytes [begin, begin + length) of the file, read into `buffer` (short reads are retried)."""
    view = memoryview(buffer)[:length]
    done = 0
    while done < length:
        got = os.preadv(fd, [view[done:]], begin + done)
        if got == 0:
            raise AdapterError(
                display, f"{display}: the file shrank while its digest was computed; retry once it is written."
            )
        done += got
    return view


def digest_open_file(
    fd: int, display: str | os.PathLike[str], header: SafetensorsHeader | None = None, *, threads: int | None = None
) -> str:
    """The adapter digest of the safetensors file open as `fd`, its pieces read and hashed by a pool of threads."""
    shown = printable(display)
    if header is None:
        header = read_header(fd, display)
    # The pieces are handed out in file order, so reads stay nearly sequential: ask for more readahead (cold reads
    # of a 1 GiB adapter took half the time with it on ext4).
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    entries = header.tensors  # already in name order
    records = [TensorRecord(t.name, t.dtype, t.shape, t.nbytes, t.begin) for t in entries]
    buffers = threading.local()  # one piece-sized buffer per hashing thread, reused for its every piece

    def read(index: int, offset: int, length: int) -> memoryview:
        buffer = getattr(buffers, "buffer", None)
        if buffer is None:
            buffer = buffers.buffer = bytearray(CHUNK_BYTES)
        return _read_piece(fd, entries[index].begin + offset, length, buffer, shown)

    return digest_tensors(records, read, threads=threads)


def _open_regular(name: str, dir_fd: int, display: str) -> int:
    """Opens a regular file without following a symlink (and without blocking on a FIFO)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AdapterError(
                display, f"{display}: is a symlink; put the real file in the checkpoint directory."
            ) from None
        raise AdapterError(display, f"{display}: cannot open ({exc.strerror}); check its permissions.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterError(display, f"{display}: is not a regular file; the checkpoint must hold plain files.")
    return fd


def open_checkpoint_dir(path: Path) -> int:
    """Opens a checkpoint directory without following a symlink in its last component."""
    shown = printable(path)
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AdapterError(path, f"{shown}: no such directory; name an existing checkpoint directory.") from None
    except OSError as exc:
        # O_NOFOLLOW|O_DIRECTORY on a symlink gives ELOOP or ENOTDIR depending on the kernel path taken.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink():
            raise AdapterError(
                path, f"{shown}: is a symlink; name the checkpoint directory itself, not a link to it."
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise AdapterError(path, f"{shown}: is not a directory; name a checkpoint directory.") from None
        raise AdapterError(path, f"{shown}: cannot open ({exc.strerror}); check its permissions.") from None


def adapter_digest(target: Path, *, dir_fd: int | None = None) -> str:
    """The adapter digest of a checkpoint directory or of an `adapter_model.safetensors` file.

    With `dir_fd`, digests the checkpoint directory already open as `dir_fd` (`target` only names it in
    messages), so a caller that holds a directory open digests exactly what it holds.
    """
    if dir_fd is not None:
        return _digest_entry(dir_fd, ADAPTER_FILE, target / ADAPTER_FILE)
    if target.is_dir():
        own_fd = open_checkpoint_dir(target)
        name, display = ADAPTER_FILE, target / ADAPTER_FILE
    else:
        try:
            own_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise AdapterError(target, f"{printable(target)}: cannot open ({exc.strerror}); check the path.") from None
        name, display = target.name, target
    try:
        return _digest_entry(own_fd, name, display)
    finally:
        os.close(own_fd)


def _digest_entry(dir_fd: int, name: str, display: Path) -> str:
    shown = printable(display)
    try:
        fd = _open_regular(name, dir_fd, shown)
    except FileNotFoundError:
        raise AdapterError(display, f"{shown}: no such file; point at a LoRA checkpoint directory.") from None
    try:
        return digest_open_file(fd, display)
    finally:
        os.close(fd)


def walk_checkpoint(
    dir_fd: int, display: str | os.PathLike[str], limits: TreeLimits | None = None
) -> list[CheckpointEntry]:
    """Every entry below the checkpoint directory open as `dir_fd`, parents before children, sorted.

    Refuses symlinks and special files (a checkpoint must be plain files to be copied as it is) and
    trees over `limits` (default TreeLimits()): the walk stops at the first entry past a bound, so a huge
    tree costs no more than the bound to refuse.
    """
    entries: list[CheckpointEntry] = []
    _walk_into(dir_fd, Path(display), "", 0, entries, _TreeBudget(limits or TreeLimits()))
    return entries


class _TreeBudget:
    def __init__(self, limits: TreeLimits) -> None:
        self.limits = limits
        self.entries = 0
        self.bytes = 0

    def take(self, root: Path, info: os.stat_result, is_dir: bool) -> None:
        self.entries += 1
        if not is_dir:
            self.bytes += info.st_size
        shown = printable(root)
        if self.entries > self.limits.max_files:
            raise AdapterError(
                root,
                f"{shown}: holds more than {self.limits.max_files} files and directories (sources.max_files); "
                f"a LoRA checkpoint is a handful of files — point the fork at one.",
            )
        if self.bytes > self.limits.max_bytes:
            raise AdapterError(
                root,
                f"{shown}: holds more than {_human_size(self.limits.max_bytes)} (sources.max_bytes, sparse files "
                f"counted at their full size); point the fork at a LoRA checkpoint or raise the limit.",
            )


def _list_dir(dir_fd: int) -> list[str]:
    # List through a fresh open file description: btrfs (since 6.6) lists only the entries that existed
    # when a directory was opened, so listing a long-held fd would miss files created since.
    fresh = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return sorted(os.listdir(fresh))
    finally:
        os.close(fresh)


def _walk_into(
    dir_fd: int, root: Path, prefix: str, depth: int, out: list[CheckpointEntry], budget: _TreeBudget
) -> None:
    for name in _list_dir(dir_fd):
        relpath = prefix + name
        shown = printable(root / relpath)
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise AdapterError(root, f"{shown}: vanished while the checkpoint was read; retry the fork.") from None
        if stat.S_ISREG(info.st_mode):
            budget.take(root, info, False)
            out.append(CheckpointEntry(relpath, False, info))
        elif stat.S_ISDIR(info.st_mode):
            if depth + 1 > budget.limits.max_depth:
                raise AdapterError(root, f"{shown}: nests directories too deeply; a checkpoint is a flat directory.")
            budget.take(root, info, True)
            out.append(CheckpointEntry(relpath, True, info))
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                _walk_into(sub, root, relpath + "/", depth + 1, out, budget)
            finally:
                os.close(sub)
        elif stat.S_ISLNK(info.st_mode):
            raise AdapterError(
                root, f"{shown}: is a symlink; a checkpoint must hold real files — copy the target in its place."
            )
        else:
            raise AdapterError(root, f"{shown}: is not a regular file or directory; remove it from the checkpoint.")


# ---------------------------------------------------------------------------------------------- LoRA rules


@dataclass(frozen=True)
class _LoraConfig:
    rank: int
    alpha: float | None
    rank_pattern: Mapping[str, int]
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]

    def rank_for(self, module: str) -> int:
        # peft's get_pattern_key: the first pattern key that matches the module path as a dotted suffix.
        for key, rank in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return rank
        return self.rank


def _parse_config(raw: bytes) -> _LoraConfig:
    """Pure: adapter_config.json bytes -> the parts the checks need (ValueError on a problem)."""
    obj = _load_json_object(raw, "adapter_config.json")
    peft_type = obj.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _HeaderProblem(f"peft_type is {peft_type!r:.40}, and only LoRA adapters can be forked")
    rank = obj.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise _HeaderProblem(f"r is {rank!r:.40}, not a positive integer")
    alpha = obj.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float)):
        raise _HeaderProblem(f"lora_alpha is {alpha!r:.40}, not a number")
    pattern = obj.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pattern.values()
    ):
        raise _HeaderProblem("rank_pattern is not a mapping of module patterns to positive integers")
    for key in pattern:
        try:
            re.compile(key)
        except re.error as exc:
            raise _HeaderProblem(f"rank_pattern key {key!r:.60} is not a regular expression ({exc})") from None
    return _LoraConfig(
        rank=rank,
        alpha=float(alpha) if alpha is not None else None,
        rank_pattern=dict(pattern),
        target_modules=_string_tuple(obj.get("target_modules"), "target_modules"),
        modules_to_save=_string_tuple(obj.get("modules_to_save"), "modules_to_save"),
    )


def _string_tuple(value: object, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _HeaderProblem(f"{key} is not a string or a list of strings")


def _split_lora_name(name: str) -> tuple[str, str] | None:
    """(module path, kind) for a peft LoRA tensor name, else None."""
    if not name.startswith(PEFT_PREFIX):
        return None
    for suffix, kind in _LORA_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(PEFT_PREFIX) + len(suffix):
            return name[len(PEFT_PREFIX) : -len(suffix)], kind
    return None


def _is_saved_module_tensor(name: str, config: _LoraConfig) -> bool:
    if not name.startswith(PEFT_PREFIX) or "." not in name[len(PEFT_PREFIX) :]:
        return False
    path = "." + name[len(PEFT_PREFIX) :].rsplit(".", 1)[0] + "."
    return any(f".{module}." in path for module in (*config.modules_to_save, *_EMBEDDING_LAYERS))


def _check_module(module: str, parts: Mapping[str, TensorEntry], config: _LoraConfig, display: str) -> int:
    """Checks one module's LoRA tensors against each other and the config; returns its rank."""
    expected = config.rank_for(module)
    rank = -1
    for a_kind, b_kind, exact_ndim in (("A", "B", None), ("emb_A", "emb_B", 2)):
        a, b = parts.get(a_kind), parts.get(b_kind)
        if a is None and b is None:
            continue
        if a is None or b is None:
            present = a or b
            assert present is not None
            raise AdapterError(
                display,
                f"{display}: tensor {printable(present.name)} has no partner "
                f"({_KIND_NAMES[a_kind]} and {_KIND_NAMES[b_kind]} come in pairs); "
                f"{_LORA_ADVICE}.",
            )
        for entry, rank_axis in ((a, 0), (b, 1)):
            ndim_ok = len(entry.shape) == exact_ndim if exact_ndim else len(entry.shape) >= 2
            if not ndim_ok:
                raise AdapterError(
                    display,
                    f"{display}: tensor {printable(entry.name)} has shape {list(entry.shape)}, not a LoRA matrix; "
                    f"{_LORA_ADVICE}.",
                )
            if entry.shape[rank_axis] != expected:
                raise AdapterError(
                    display,
                    f"{display}: tensor {printable(entry.name)} has shape {list(entry.shape)}, rank "
                    f"{entry.shape[rank_axis]}, but adapter_config.json gives r={expected} for module "
                    f"{printable(module)}; the config and the weights disagree — re-save the checkpoint.",
                )
        rank = expected
    if rank < 0:
        extra = next(iter(parts.values()))
        raise AdapterError(
            display, f"{display}: tensor {printable(extra.name)} belongs to no lora_A/lora_B pair; {_LORA_ADVICE}."
        )
    bias = parts.get("B_bias")
    if bias is not None and (len(bias.shape) != 1 or "B" not in parts or bias.shape[0] != parts["B"].shape[0]):
        raise AdapterError(
            display,
            f"{display}: tensor {printable(bias.name)} has shape {list(bias.shape)}, which does not fit its "
            f"lora_B; {_LORA_ADVICE}.",
        )
    return rank


def _check_lora_tensors(tensors: tuple[TensorEntry, ...], config: _LoraConfig, display: str) -> dict[str, int]:
    """Returns {module path: rank}; raises AdapterError for the first tensor that breaks a rule."""
    modules: dict[str, dict[str, TensorEntry]] = {}
    for entry in tensors:
        split = _split_lora_name(entry.name)
        if split is None:
            if _is_saved_module_tensor(entry.name, config):
                continue
            raise AdapterError(
                display,
                f"{display}: tensor {printable(entry.name)} is not a LoRA tensor (expected names like "
                f"base_model.model.<module>.lora_A.weight); {_LORA_ADVICE}.",
            )
        if entry.dtype not in LORA_DTYPES:
            raise AdapterError(
                display,
                f"{display}: tensor {printable(entry.name)} has dtype {entry.dtype}; LoRA weights are F16, BF16, "
                "F32 or F64 — re-save the checkpoint.",
            )
        module, kind = split
        modules.setdefault(module, {})[kind] = entry
    if not modules:
        raise AdapterError(display, f"{display}: holds no LoRA tensors; {_LORA_ADVICE}.")
    return {module: _check_module(module, parts, config, display) for module, parts in modules.items()}


def _read_small_file(name: str, dir_fd: int, display: str, limit: int) -> bytes:
    fd = _open_regular(name, dir_fd, display)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise AdapterError(
                display, f"{display}: is {_human_size(size)}, too big for an adapter config; {_CONFIG_ADVICE}."
            )
        return _pread_exact(fd, size, 0, display)
    finally:
        os.close(fd)


def check_adapter(checkpoint_dir: Path, *, dir_fd: int | None = None, limits: TreeLimits | None = None) -> AdapterInfo:
    """Checks that `checkpoint_dir` holds a well-formed peft LoRA adapter, reading headers only.

    With `dir_fd`, checks the directory already open as `dir_fd` (`checkpoint_dir` only names it).
    Raises AdapterError with one sentence naming the file and what to do.
    """
    fd = dir_fd if dir_fd is not None else open_checkpoint_dir(checkpoint_dir)
    try:
        return _check_open_dir(checkpoint_dir, fd, limits)
    finally:
        if dir_fd is None:
            os.close(fd)


def _check_open_dir(checkpoint_dir: Path, dir_fd: int, limits: TreeLimits | None) -> AdapterInfo:
    config_path = printable(checkpoint_dir / CONFIG_FILE)
    model_path = printable(checkpoint_dir / ADAPTER_FILE)
    entries = walk_checkpoint(dir_fd, checkpoint_dir, limits)
    top_level = {e.relpath for e in entries if "/" not in e.relpath and not e.is_dir}
    if ADAPTER_FILE not in top_level:
        hint = (
            "only safetensors adapters are supported — re-save with safe_serialization=True"
            if "adapter_model.bin" in top_level
            else "the directory is not a LoRA checkpoint — point the fork at one"
        )
        raise AdapterError(checkpoint_dir, f"{model_path}: missing; {hint}.")
    if CONFIG_FILE not in top_level:
        raise AdapterError(
            checkpoint_dir, f"{config_path}: missing; a peft checkpoint has one — re-save the checkpoint."
        )
    try:
        config = _parse_config(_read_small_file(CONFIG_FILE, dir_fd, config_path, MAX_CONFIG_BYTES))
    except ValueError as exc:
        raise AdapterError(checkpoint_dir / CONFIG_FILE, f"{config_path}: {exc}; {_CONFIG_ADVICE}.") from None
    fd = _open_regular(ADAPTER_FILE, dir_fd, model_path)
    try:
        header = read_header(fd, checkpoint_dir / ADAPTER_FILE)
    finally:
        os.close(fd)
    ranks = _check_lora_tensors(header.tensors, config, model_path)
    files = [e for e in entries if not e.is_dir]
    return AdapterInfo(
        dir=checkpoint_dir,
        rank=config.rank,
        max_rank=max(ranks.values()),
        alpha=config.alpha,
        target_modules=config.target_modules,
        modules=tuple(sorted(ranks)),
        tensors=header.tensors,
        tensor_bytes=sum(t.nbytes for t in header.tensors),
        total_bytes=sum(e.stat.st_size for e in files),
        files=tuple(e.relpath for e in files),
    )
