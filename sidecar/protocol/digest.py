"""The adapter digest: one value that says two holders have the same LoRA tensors.

The daemon computes it from `adapter_model.safetensors` on disk (header plus byte ranges); a trainer
agent computes it over the tensors it read, before any cast. Equal digests mean the same adapter.
Both sides import this module (the preload's private copy of the package runs it inside trainer
processes): the standard library, and `blake3` found when the first digest is made (the daemon
depends on it; `fork-sidecar preload install` provides it to a trainer environment that lacks it:
sidecar/protocol/hasher.py).

Framing (binding; change it only together with every producer, and then under a new prefix):

    CHUNK = 4 MiB (4,194,304 bytes)
    leaf(bytes) = blake3(bytes).digest()                  # 32 bytes (BLAKE3's default output length)
    h = blake3()
    for each tensor, in sorted(name) order (Python `str` ordering, i.e. by code point):
        h.update(name.encode("utf-8") + b"\\0")
        h.update(dtype.encode("ascii") + b"\\0")          # safetensors dtype as in the header: "F32", "BF16", ...
        h.update(",".join(map(str, shape)).encode("ascii") + b"\\0")   # "" for a scalar
        h.update(nbytes.to_bytes(8, "little"))            # length of the tensor's raw bytes (as stored, little-endian)
        for each CHUNK-sized piece of the raw bytes, in order (the last one shorter; none when nbytes is 0):
            h.update(leaf(piece))
    digest = "blake3-tree:" + h.hexdigest()               # 64 lowercase hex digits

The length prefix fixes how many leaves follow, so the encoding is unambiguous and no two different
tensor sets share a digest short of a BLAKE3 collision. Why leaves: every piece hashes independently,
so a thread pool spreads the work over every core (blake3 releases the GIL on large buffers, as hashlib
does), and a piece is hashed as soon as it is read. Why BLAKE3: per core it hashes 2-4x faster than
SHA-256 with the CPU's SHA instructions (README: "The adapter digest"), and the trainer's reload is
bounded by hashing. Values under the earlier prefixes (`sha256-tree:`, the same tree over SHA-256, and
`sha256:`, one stream) are never compared with a new one: `digest_problem` names them and says what to
upgrade.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from sidecar.protocol.hasher import DigestUnavailable, require_hasher
from sidecar.protocol.pool_work import run_beside

__all__ = [
    "CHUNK_BYTES",
    "DIGEST_PREFIX",
    "LEGACY_PREFIXES",
    "DigestUnavailable",
    "TensorRecord",
    "digest_of_tensors",
    "digest_problem",
    "digest_tensors",
    "is_digest",
    "require_hasher",
    "usable_cores",
]

DIGEST_PREFIX = "blake3-tree:"
# Framings of earlier fork-sidecar releases, newest first: never computed now, named when met.
LEGACY_PREFIXES = (
    "sha256-tree:",  # the same tree, SHA-256 leaves and root
    "sha256:",  # one SHA-256 stream over every tensor's bytes
)
CHUNK_BYTES = 4 << 20
# A worker thread costs about 0.1 ms to start; below this much data per thread it does not pay for itself.
_BYTES_PER_THREAD = 2 * CHUNK_BYTES

BytesLike = bytes | bytearray | memoryview
# (index of the tensor in the sequence given, offset inside its raw bytes, length) -> exactly those bytes.
# Called from several threads at once; each call may block until the bytes are there.
ChunkSource = Callable[[int, int, int], BytesLike]


@dataclass(frozen=True)
class TensorRecord:
    """What the digest covers of one tensor besides its bytes; `position` only orders the reading (file order)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    position: int = 0


def digest_tensors(
    tensors: Sequence[TensorRecord],
    source: ChunkSource,
    *,
    threads: int | None = None,
    executor: Executor | None = None,
) -> str:
    """The digest of `tensors` (in sorted name order), their bytes read through `source` by a pool of threads.

    The pieces are handed out in `position` order, so a source that reads a file (or waits for a reader) moves
    through it front to back. The first exception a source raises stops the other threads and is re-raised here.
    The helper threads are started for the call, or taken from `executor` (threads kept by the caller).
    """
    _check_records(tensors)
    blake3 = require_hasher()
    pieces = [
        (index, offset, min(CHUNK_BYTES, record.nbytes - offset))
        for index, record in sorted(enumerate(tensors), key=lambda item: item[1].position)
        for offset in range(0, record.nbytes, CHUNK_BYTES)
    ]
    threads = _thread_count(tensors, pieces, threads, kept=executor is not None)
    leaves = _hash_pieces(pieces, source, blake3, threads, executor)
    h = blake3()
    for index, record in enumerate(tensors):
        h.update(record.name.encode("utf-8") + b"\0")  # lone surrogates raise UnicodeEncodeError, a ValueError
        h.update(record.dtype.encode("ascii") + b"\0")
        h.update(",".join(str(d) for d in record.shape).encode("ascii") + b"\0")
        h.update(record.nbytes.to_bytes(8, "little"))
        for offset in range(0, record.nbytes, CHUNK_BYTES):
            h.update(leaves[(index, offset)])
    return DIGEST_PREFIX + str(h.hexdigest())


def digest_of_tensors(tensors: Mapping[str, tuple[str, Sequence[int], BytesLike]]) -> str:
    """The digest of `{name: (dtype, shape, raw bytes)}` held in memory, sorting names itself."""
    names = sorted(tensors)
    views = [memoryview(tensors[name][2]).cast("B") for name in names]
    records = [
        TensorRecord(name, tensors[name][0], tuple(tensors[name][1]), view.nbytes)
        for name, view in zip(names, views, strict=True)
    ]
    return digest_tensors(records, lambda index, offset, length: views[index][offset : offset + length])


def is_digest(value: object) -> bool:
    """True for a well-formed digest string (`blake3-tree:` and 64 lowercase hex digits)."""
    return isinstance(value, str) and value.startswith(DIGEST_PREFIX) and _is_hex64(value[len(DIGEST_PREFIX) :])


def digest_problem(value: object) -> str | None:
    """Why `value` cannot be compared with this version's digests (a phrase to put after its holder), or None."""
    if is_digest(value):
        return None
    for prefix in LEGACY_PREFIXES:
        if isinstance(value, str) and value.startswith(prefix) and _is_hex64(value[len(prefix) :]):
            return (
                f"uses an old adapter digest (`{prefix}`), which this fork-sidecar no longer computes; upgrade that "
                "side (`fork-sidecar preload install --python PYTHON` for a trainer, then restart it)"
            )
    return f"is not an adapter digest ({str(value)[:80]!r})"


def _is_hex64(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_records(tensors: Sequence[TensorRecord]) -> None:
    for i, record in enumerate(tensors):
        if i and record.name <= tensors[i - 1].name:
            raise ValueError(
                f"tensor {record.name!r} comes after {tensors[i - 1].name!r}; give tensors in sorted name order"
            )
        if not record.dtype or not record.dtype.isascii() or "\0" in record.dtype:
            raise ValueError(f"dtype {record.dtype!r} of tensor {record.name!r} is not a safetensors dtype name")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in record.shape):
            shape = list(record.shape)
            raise ValueError(f"shape {shape!r} of tensor {record.name!r} is not a list of non-negative ints")
        if record.nbytes < 0:
            raise ValueError(f"tensor {record.name!r} has a negative length")


def _thread_count(
    tensors: Sequence[TensorRecord], pieces: list[tuple[int, int, int]], wanted: int | None, *, kept: bool
) -> int:
    if wanted is not None:
        return max(1, min(wanted, len(pieces)))
    cores = usable_cores()
    if kept:  # threads that are already there cost nothing to start: one per core (96 MiB: 8.6 ms on 16, 9.3 on 13)
        return max(1, min(cores, len(pieces)))
    by_size = sum(t.nbytes for t in tensors) // _BYTES_PER_THREAD + 1
    return max(1, min(cores, len(pieces), by_size))


def _hash_pieces(
    pieces: list[tuple[int, int, int]], source: ChunkSource, blake3: Any, threads: int, executor: Executor | None
) -> dict[tuple[int, int], bytes]:
    leaves: dict[tuple[int, int], bytes] = {}
    errors: list[BaseException] = []
    # list_iterator.__next__ is atomic under the GIL: each piece goes to exactly one thread, with no lock or queue.
    work = iter(pieces)

    def hash_some() -> None:
        try:
            for index, offset, length in work:
                if errors:
                    return
                data = memoryview(source(index, offset, length)).cast("B")
                if data.nbytes != length:
                    raise ValueError(f"asked for {length} bytes of tensor #{index} at {offset}, got {data.nbytes}")
                leaves[(index, offset)] = blake3(data).digest()
        except BaseException as exc:  # re-raised by the calling thread below
            errors.append(exc)

    if executor is not None:
        # The calling thread is one of the pool; it hashes until every piece is taken, so a helper that had not
        # started by then (the executor busy with another digest) is cancelled, not waited for.
        run_beside(executor, hash_some, threads - 1, hash_some, lambda: errors.append(_Stopped()))
    else:
        helpers = [
            threading.Thread(target=hash_some, name="fork-sidecar-digest", daemon=True) for _ in range(threads - 1)
        ]
        for helper in helpers:
            helper.start()
        hash_some()
        for helper in helpers:
            helper.join()
    if errors:
        raise errors[0]
    return leaves


class _Stopped(Exception):
    """Put in the errors when handing pieces to the helpers failed (that failure is what propagates): they stop."""
