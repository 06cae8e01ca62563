"""Adapter files read through descriptors: the safetensors header of an open file, the adapter digest (its pieces
read with `preadv` and hashed by a pool of threads), and small files of a checkpoint. Nothing here loads tensors.

Files are opened relative to a directory descriptor, never following a symlink, so what was checked is what is read.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sidecar.adapter.errors import SAFETENSORS_ADVICE, AdapterError, human_size, length_text
from sidecar.protocol.digest import CHUNK_BYTES, TensorRecord, digest_tensors
from sidecar.protocol.run_layout import ADAPTER_FILE
from sidecar.protocol.safetensors_header import MAX_HEADER_BYTES, TensorEntry, parse_header, printable

__all__ = [
    "ADAPTER_FILE",
    "SafetensorsHeader",
    "adapter_digest",
    "digest_open_file",
    "open_checkpoint_dir",
    "open_regular",
    "pread_exact",
    "read_header",
    "read_small_file",
]


@dataclass(frozen=True)
class SafetensorsHeader:
    header_len: int
    data_start: int  # 8 + header_len
    file_size: int
    tensors: tuple[TensorEntry, ...]  # sorted by name, the digest's order
    metadata: Mapping[str, str] | None


def pread_exact(fd: int, size: int, offset: int, display: str) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise AdapterError(display, f"{display}: the file ended early while reading it; {SAFETENSORS_ADVICE}.")
        data += more
    return data


def read_header(fd: int, display: str | os.PathLike[str]) -> SafetensorsHeader:
    """Reads and validates the header of the safetensors file open as `fd`."""
    shown = printable(display)
    size = os.fstat(fd).st_size
    if size < 8:
        raise AdapterError(
            display, f"{shown}: the file is {size} bytes, too short for a safetensors header; {SAFETENSORS_ADVICE}."
        )
    header_len = int.from_bytes(pread_exact(fd, 8, 0, shown), "little")
    if header_len > MAX_HEADER_BYTES:
        raise AdapterError(
            display,
            f"{shown}: header length {length_text(header_len)} exceeds the 100 MB safetensors limit "
            f"(file size {human_size(size)}); {SAFETENSORS_ADVICE}.",
        )
    if header_len > size - 8:
        raise AdapterError(
            display,
            f"{shown}: header length {length_text(header_len)} exceeds the file size ({human_size(size)}); "
            f"{SAFETENSORS_ADVICE}.",
        )
    raw = pread_exact(fd, header_len, 8, shown)
    try:
        tensors, metadata = parse_header(raw, size - 8 - header_len)
    except ValueError as exc:
        raise AdapterError(display, f"{shown}: {exc}; {SAFETENSORS_ADVICE}.") from None
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


def open_regular(name: str, dir_fd: int, display: str) -> int:
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
        fd = open_regular(name, dir_fd, shown)
    except FileNotFoundError:
        raise AdapterError(display, f"{shown}: no such file; point at a LoRA checkpoint directory.") from None
    try:
        return digest_open_file(fd, display)
    finally:
        os.close(fd)


def read_small_file(name: str, dir_fd: int, display: str, limit: int, advice: str) -> bytes:
    fd = open_regular(name, dir_fd, display)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise AdapterError(display, f"{display}: is {human_size(size)}, too big for an adapter config; {advice}.")
        return pread_exact(fd, size, 0, display)
    finally:
        os.close(fd)
