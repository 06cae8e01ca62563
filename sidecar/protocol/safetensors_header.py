"""The safetensors header parser: one for the daemon (sidecar/adapter/) and the preload inside trainers
(sidecar/preload/peft_load.py), pure (bytes in, tensors out) and standard library only.

Why our own parser rather than `safetensors.safe_open`: `safe_open(..., framework="numpy")` imports numpy as soon as
it opens a file (measured with safetensors 0.8.0), takes a path string (so a symlink swapped in after our checks would
be followed), and its Rust validation checks nothing this parser does not: UTF-8 JSON, known dtypes, shapes that fit
`usize`, sizes that match the dtype, and byte ranges that tile the data section exactly. This parser is stricter in
three places (duplicate keys, unknown fields in a tensor entry, `-0`), and the tests check over generated headers that
whatever it accepts `safe_open` accepts too (tests/test_safetensors_header.py). So neither side needs safetensors or
numpy to read an adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "DTYPE_BITS",
    "LORA_DTYPES",
    "MAX_HEADER_BYTES",
    "HeaderProblem",
    "TensorEntry",
    "parse_header",
    "printable",
    "strict_json_object",
]

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
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
# The dtypes a LoRA weight may have, on both sides: floating point that every trainer and vLLM can load.
LORA_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


class HeaderProblem(ValueError):
    """A reason a safetensors header (or a JSON file read as strictly) is invalid, without the file name."""


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


def printable(value: str | os.PathLike[str]) -> str:
    """A path or name as it can go into a one-line message: repr() when it holds newlines or undecodable bytes."""
    text = os.fspath(value)
    return text if text and text.isprintable() else repr(text)


def _reject_constant(name: str) -> object:
    raise HeaderProblem(f"header is not JSON ({name} is not a JSON value)")


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
            raise HeaderProblem(f"header names {printable(key)} twice")
        result[key] = value
    return result


def strict_json_object(raw: bytes, what: str, *, safetensors_ints: bool = False) -> dict[str, object]:
    """UTF-8 JSON object, no duplicate keys, no NaN/Infinity; `safetensors_ints`: integers as serde reads them."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderProblem(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        loaded = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_int=_strict_int if safetensors_ints else int,
            parse_constant=_reject_constant,
        )
    except HeaderProblem:
        raise
    except RecursionError:
        raise HeaderProblem(f"{what} nests JSON too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() of absurd digit strings
        raise HeaderProblem(f"{what} is not JSON ({exc})") from None
    if not isinstance(loaded, dict):
        raise HeaderProblem(f"{what} is a JSON {type(loaded).__name__}, not an object")
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
        raise HeaderProblem("__metadata__ is not a mapping of strings to strings")
    return dict(value)


def _is_u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64_MAX


def _declared_nbytes(name: str, dtype: str, shape: list[int]) -> int:
    elements = 1
    for dim in shape:
        elements *= dim
        if elements > _U64_MAX:  # safetensors computes this in u64 and fails on overflow
            raise HeaderProblem(f"tensor {printable(name)} declares more than 2^64 elements")
    bits = elements * DTYPE_BITS[dtype]
    if bits > _U64_MAX:
        raise HeaderProblem(f"tensor {printable(name)} declares more than 2^64 bits")
    if bits % 8:
        raise HeaderProblem(f"tensor {printable(name)} ({dtype} {shape}) does not end on a byte boundary")
    return bits // 8


def _parse_entry(name: str, value: object, data_start: int) -> TensorEntry:
    shown = printable(name)
    if not _valid_unicode(name):
        raise HeaderProblem(f"tensor name {shown} is not valid Unicode")
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise HeaderProblem(f"entry {shown} is not an object with exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderProblem(f"tensor {shown} has unknown dtype {printable(str(dtype))}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise HeaderProblem(f"tensor {shown} has shape {shape!r:.80}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise HeaderProblem(f"tensor {shown} has data_offsets {offsets!r:.80}, not two non-negative integers")
    begin, end = offsets
    need = _declared_nbytes(name, dtype, shape)
    if end < begin or end - begin != need:
        raise HeaderProblem(
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
            raise HeaderProblem(f"tensor {printable(entry.name)} overlaps {other}")
        if entry.begin > position:
            raise HeaderProblem(
                f"data bytes {position - data_start}..{entry.begin - data_start} belong to no tensor "
                f"(a gap before {printable(entry.name)})"
            )
        position, previous = entry.end, entry
    if position - data_start > data_size:
        raise HeaderProblem(
            f"tensor {printable(previous.name if previous else '')} ends at data byte {position - data_start}, "
            f"past the {data_size}-byte data section (the file is truncated)"
        )
    if position - data_start < data_size:
        raise HeaderProblem(f"the last {data_start + data_size - position} bytes of the file belong to no tensor")


def parse_header(header_json: bytes, data_size: int) -> tuple[tuple[TensorEntry, ...], Mapping[str, str] | None]:
    """Validates a safetensors JSON header against a data section of `data_size` bytes.

    Pure: returns (tensors sorted by name, with offsets relative to the start of the file, metadata)
    or raises ValueError naming what is wrong.
    """
    data_start = 8 + len(header_json)
    obj = strict_json_object(header_json, "header", safetensors_ints=True)
    metadata = _parse_metadata(obj.pop("__metadata__", None))
    tensors = [_parse_entry(name, value, data_start) for name, value in obj.items()]
    _check_tiling(tensors, data_start, data_size)
    tensors.sort(key=lambda t: t.name)
    return tuple(tensors), metadata
