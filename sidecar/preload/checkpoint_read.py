"""Reading a LoRA checkpoint's `adapter_model.safetensors` into the trainer's memory, and its digest.

The file is read once, by a few threads in parallel, into memory of the trainer's own (never mapped from the file: a
writer could change mapped bytes between the digest and the load). Its header is checked by the daemon's own parser
(sidecar/protocol/safetensors_header.py: the safetensors library's rules and no duplicate names) and its dtypes
against the LoRA ones, and the digest (`sidecar.protocol.digest`) is computed over exactly those bytes by a pool of
threads that follows the read, so hashing costs next to nothing on a multi-core trainer.

Standard library only, and `blake3` for the digest: torch is not needed to read or hash.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sidecar.preload.worker_threads import HASH, READ, pool
from sidecar.protocol.digest import TensorRecord, digest_tensors, usable_cores
from sidecar.protocol.pool_work import run_beside
from sidecar.protocol.run_layout import ADAPTER_FILE
from sidecar.protocol.safetensors_header import LORA_DTYPES, MAX_HEADER_BYTES, parse_header, printable

__all__ = [
    "ALL_READERS",
    "AdapterLoadError",
    "CheckpointTensors",
    "DigestThread",
    "TensorSpan",
    "digest_of",
    "read_checkpoint",
]


class AdapterLoadError(Exception):
    """The checkpoint cannot go into this model; the model was not changed."""


@dataclass(frozen=True)
class TensorSpan:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class CheckpointTensors:
    """The raw tensors of one `adapter_model.safetensors` (views into one buffer), filled in as the file is read.

    `wait_for(end)` lets a second thread (the digest) follow the reader: it blocks until the first `end` data bytes
    are in memory, so hashing runs alongside the read instead of after it.
    """

    def __init__(self, path: Path, entries: Mapping[str, TensorSpan], data: memoryview) -> None:
        self.path = path
        self.entries = entries
        self.data = data
        self._cond = threading.Condition()
        self._read = 0
        self._failed = False

    def raw(self, name: str) -> memoryview:
        e = self.entries[name]
        return self.data[e.begin : e.end]

    def wait_for(self, end: int) -> bool:
        """True once bytes [0, end) are read; False if reading failed."""
        with self._cond:
            while self._read < end and not self._failed:
                self._cond.wait()
            return not self._failed

    def _advance(self, read: int) -> None:
        with self._cond:
            self._read = read
            self._cond.notify_all()

    def _fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()


# The data is read in pieces of this size by a few threads at once (pread releases the GIL): one thread copying
# 96 MiB from the page cache into fresh memory took 29 ms on a 16-core host, eight took 5 ms. Eight leave cores to
# the digest following the read; a read that nothing follows (the CPU model's, hashed while it is copied into the
# model: sidecar/preload/hashed_copy.py) takes ALL_READERS (16: 4.4 ms against 5.7 ms for eight, 16 cores).
_PIECE = 4 * 1024 * 1024
_READERS_BESIDE_HASHING = 8
ALL_READERS = 16
# Data of this size and more is read into a mapping of its own (_buffer); less into a bytearray.
_MAPPED_FROM = 1024 * 1024


def read_checkpoint(
    checkpoint_dir: Path,
    *,
    follow: Callable[[CheckpointTensors], None] | None = None,
    meanwhile: Callable[[CheckpointTensors], None] | None = None,
    readers: int = _READERS_BESIDE_HASHING,
) -> CheckpointTensors:
    """Read and check `adapter_model.safetensors` of `checkpoint_dir` (stdlib only; one open, parallel preads by up
    to `readers` threads).

    The header is checked before any data is read. `follow(tensors)` is called once the buffer exists and before
    the data is read, to start a consumer that uses `wait_for`. `meanwhile(tensors)` runs on the calling thread
    while the readers read (checks that need only the header); what it raises stops the read and is raised here.
    """
    path = Path(checkpoint_dir) / ADAPTER_FILE
    if sys.byteorder != "little":
        raise AdapterLoadError("this trainer is big-endian; safetensors data is little-endian and is not converted")
    try:
        with open(path, "rb") as f:
            tensors = _read_header(path, f)
            if follow is not None:
                follow(tensors)
            try:
                _read_data(tensors, f, readers, meanwhile)
            except BaseException:
                tensors._fail()
                raise
    except _CheckFailed as e:  # the caller's own check, not the read: raised as it is
        raise e.raised from None
    except FileNotFoundError:
        raise AdapterLoadError(f"{path} does not exist; the checkpoint needs {ADAPTER_FILE}") from None
    except OSError as e:
        raise AdapterLoadError(f"{path} cannot be read ({e.strerror}); check its permissions") from None
    return tensors


def _read_header(path: Path, f: io.BufferedReader) -> CheckpointTensors:
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise AdapterLoadError(f"{path} is shorter than a safetensors header; the checkpoint is damaged")
    header_len = int.from_bytes(head, "little")
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise AdapterLoadError(f"{path} declares a {header_len}-byte header in a {size}-byte file; damaged")
    header_bytes = f.read(header_len)
    data_len = size - 8 - header_len
    entries = _parse_header(path, header_bytes, data_len)
    return CheckpointTensors(path, entries, _buffer(data_len))


def _read_data(
    tensors: CheckpointTensors,
    f: io.BufferedReader,
    readers: int,
    meanwhile: Callable[[CheckpointTensors], None] | None,
) -> None:
    """The data after the header, by up to `readers` kept threads (`meanwhile` on this one); `tensors` advances over
    the prefix read so far."""
    reading = _Pieces(tensors, f.fileno(), f.tell())
    workers = max(1, min(readers, ALL_READERS, usable_cores(), len(reading.offsets)))

    def checks_then_read() -> None:
        if meanwhile is not None:
            try:
                meanwhile(tensors)
            except BaseException as e:
                raise _CheckFailed(e) from e
        reading.read_some()  # what is left: a reader that never started has nothing to do

    # Never leave a reader writing into a buffer, or reading a file descriptor, that we are done with.
    run_beside(pool(READ, ALL_READERS), reading.read_some, workers - 1, checks_then_read, reading.stop)
    if reading.failed:
        raise reading.failed[0]
    if not reading.complete():  # cannot happen: every piece is taken once, and a failed one is in `failed`
        raise AdapterLoadError(f"{tensors.path} was not read completely; fork again")
    if os.pread(reading.fd, 1, reading.start + len(tensors.data)):
        raise AdapterLoadError(f"{tensors.path} got longer while it was read; fork again")


class _Pieces:
    """The file's data in _PIECE-sized pieces, each read by whichever reader takes it next."""

    def __init__(self, tensors: CheckpointTensors, fd: int, start: int) -> None:
        self.tensors, self.fd, self.start = tensors, fd, start
        self.offsets = list(range(0, len(tensors.data), _PIECE))
        self.failed: list[BaseException] = []
        self._done = [False] * len(self.offsets)
        self._prefix = 0  # pieces [0, prefix) are all in memory
        self._lock = threading.Lock()
        self._next = iter(range(len(self.offsets)))  # next() on a list iterator is atomic under the GIL

    def stop(self) -> None:
        self.failed.append(AdapterLoadError(f"reading {self.tensors.path} was stopped"))

    def complete(self) -> bool:
        with self._lock:
            return self._prefix == len(self.offsets)

    def read_some(self) -> None:
        try:
            for index in self._next:
                if self.failed:
                    return
                self._read(index)
        except BaseException as e:  # raised by the thread that waits for the readers
            self.failed.append(e)

    def _read(self, index: int) -> None:
        data = self.tensors.data
        at, end = self.offsets[index], min(self.offsets[index] + _PIECE, len(data))
        while at < end:
            got = os.preadv(self.fd, [data[at:end]], self.start + at)
            if not got:
                raise AdapterLoadError(f"{self.tensors.path} got shorter while it was read; fork again")
            at += got
        with self._lock:
            self._done[index] = True
            while self._prefix < len(self._done) and self._done[self._prefix]:
                self._prefix += 1
            self.tensors._advance(min(self._prefix * _PIECE, len(data)))


def _buffer(size: int) -> memoryview:
    """Writable memory for the file's data: large data gets a private anonymous mapping of its own.

    Its own pages, so page-locking it for the copy to a GPU (sidecar/preload/host_pin.py) locks nothing else and
    never meets a neighbour's registration; and transparent huge pages asked for, which makes reading 100 MB about 3x
    faster than into a bytearray (fewer page faults, no zero-fill pass). The memoryview keeps the mapping alive for as
    long as any tensor made from it."""
    if size < _MAPPED_FROM:
        return memoryview(bytearray(size))
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # a kernel without THP: ordinary pages
            region.madvise(mmap.MADV_HUGEPAGE)
    return memoryview(region)


def _parse_header(path: Path, header_bytes: bytes, data_len: int) -> dict[str, TensorSpan]:
    """The daemon's parser (sidecar/protocol/safetensors_header.py), then the LoRA dtypes: one set of rules for both."""
    try:
        parsed, _ = parse_header(header_bytes, data_len)
    except ValueError as e:
        raise AdapterLoadError(f"{path}: {e}; the checkpoint is damaged") from None
    data_start = 8 + len(header_bytes)
    entries: dict[str, TensorSpan] = {}
    for t in parsed:
        if t.dtype not in LORA_DTYPES:
            raise AdapterLoadError(
                f"{path}: tensor {printable(t.name)} has dtype {t.dtype!r}; LoRA weights must be F16, BF16, F32 or F64"
            )
        entries[t.name] = TensorSpan(t.dtype, t.shape, t.begin - data_start, t.end - data_start)
    return entries


class _CheckFailed(Exception):
    """What `meanwhile` raised, carried past read_checkpoint's own OSError handling."""

    def __init__(self, raised: BaseException) -> None:
        super().__init__(str(raised))
        self.raised = raised


class _ReadFailed(Exception):
    """The reader stopped before the bytes a hashing thread waits for were there."""


def digest_of(tensors: CheckpointTensors, *, before_hash: Callable[[str, int, int], None] | None = None) -> str | None:
    """The adapter digest of the tensors as read; None if reading failed before they were all there.

    Each piece is hashed as soon as the reader has it (views into the read buffer, no copy), by as many threads as
    there are cores. `before_hash(name, offset, length)` is called on the hashing thread for each piece of a tensor
    before it is hashed (to copy it while it is in that core's cache)."""
    names = sorted(tensors.entries)
    entries = [tensors.entries[name] for name in names]
    records = [TensorRecord(n, e.dtype, e.shape, e.end - e.begin, e.begin) for n, e in zip(names, entries, strict=True)]

    def read(index: int, offset: int, length: int) -> memoryview:
        begin = entries[index].begin + offset
        if not tensors.wait_for(begin + length):
            raise _ReadFailed
        if before_hash is not None:
            before_hash(names[index], offset, length)
        return tensors.data[begin : begin + length]

    try:
        return digest_tensors(records, read, executor=pool(HASH, usable_cores()))
    except _ReadFailed:
        return None


class DigestThread(threading.Thread):
    """Runs the digest's thread pool (blake3 releases the GIL on large buffers) beside the cast and the copy into
    the model."""

    def __init__(self, tensors: CheckpointTensors) -> None:
        super().__init__(name="fork-sidecar-digest", daemon=True)
        self.tensors = tensors
        self.result: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = digest_of(self.tensors)
        except BaseException as e:  # handed to the caller by value()
            self.error = e

    def value(self) -> str:
        self.join()
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise AdapterLoadError(f"{self.tensors.path} could not be read completely")
        return self.result
