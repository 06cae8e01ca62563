"""The adapter digest of a staged copy, hashed from the copy's own pages as the copy writes them.

In copy mode the staged adapter file is mapped read-only and each digest piece is hashed as soon as the copy has put
its bytes in place, while the copy goes on. The source is read once (by the copy) and the hash reads the copy's pages
where they are, in the page cache: no second read of the source into a buffer (a `preadv` of every byte costs about
0.16 s of CPU per GiB on the 2-core machine, a tenth of a copy-mode swap's CPU), and the digest is of exactly the bytes
that the fsync makes durable, not of the source's bytes shown unchanged afterwards.

Why a mapping is safe here: the file is created by the stage and sized to its final length before it is mapped, so
every mapped page lies inside the file (a read past the end of a mapping is a SIGBUS). Nothing else can shrink it
meanwhile: the stage directory is private (0700) to the process making it, which is either the root daemon or the
per-fork worker running as the run's owner, so at worst the owner kills their own fork's worker, and the fork fails.
"""

from __future__ import annotations

import mmap
import os
import threading

from sidecar.adapter import SafetensorsHeader
from sidecar.protocol.digest import TensorRecord, digest_tensors

__all__ = ["CopyDigest", "CopyStopped"]


class CopyStopped(Exception):
    """The copy stopped before the bytes a digest piece needs were written (its own error says why)."""


class CopyDigest:
    """Digests the file open as `fd` (read-write, created empty by the caller) while the caller copies into it.

    The caller reports each copied prefix with `copied`, then calls `stop` once the copy has ended (or failed), and
    `result` for the digest. The pieces are hashed by digest_tensors' pool on a thread of their own.
    """

    def __init__(self, fd: int, header: SafetensorsHeader) -> None:
        self._tensors = header.tensors
        self._landed = 0  # bytes from the start of the file that the copy has written
        self._stopped = False
        self._changed = threading.Condition()
        self._digest: str | None = None
        self._error: BaseException | None = None
        os.ftruncate(fd, header.file_size)
        self._mapping = mmap.mmap(fd, header.file_size, prot=mmap.PROT_READ)
        self._view = memoryview(self._mapping)
        self._thread = threading.Thread(target=self._run, name="fork-sidecar-copy-digest", daemon=True)
        self._thread.start()

    def copied(self, landed: int) -> None:
        with self._changed:
            self._landed = landed
            self._changed.notify_all()

    def stop(self) -> None:
        """Wakes any piece still waiting for bytes (they fail) and waits for the hashing to end."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        self._thread.join()
        try:
            self._view.release()
            self._mapping.close()
        except BufferError:  # a piece's view outlived its thread on an error path: the collector unmaps it
            pass

    def result(self) -> str:
        """The digest, once `stop` has returned; re-raises what stopped the hashing."""
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest

    def _piece(self, index: int, offset: int, length: int) -> memoryview:
        begin = self._tensors[index].begin + offset
        end = begin + length
        with self._changed:
            self._changed.wait_for(lambda: self._landed >= end or self._stopped)
            if self._landed < end:
                raise CopyStopped(f"the copy stopped before byte {end}")
        return self._view[begin:end]

    def _run(self) -> None:
        records = [TensorRecord(t.name, t.dtype, t.shape, t.nbytes, t.begin) for t in self._tensors]
        try:
            self._digest = digest_tensors(records, self._piece)
        except BaseException as exc:  # handed to the copying thread by result()
            self._error = exc
