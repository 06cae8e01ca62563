"""The adapter digest: one value that says two holders have the same LoRA tensors.

The daemon computes it from `adapter_model.safetensors` on disk (header plus byte ranges); a trainer
agent computes it over the tensors it read, before any cast. Equal digests mean the same adapter.
This module is stdlib only because both sides import it.

Framing (binding; change it only together with every producer):

    h = sha256()
    for each tensor, in sorted(name) order (Python `str` ordering, i.e. by code point):
        h.update(name.encode("utf-8") + b"\\0")
        h.update(dtype.encode("ascii") + b"\\0")        # safetensors dtype as in the header: "F32", "BF16", ...
        h.update(",".join(map(str, shape)).encode("ascii") + b"\\0")   # "" for a scalar
        h.update(nbytes.to_bytes(8, "little"))          # length of the raw bytes that follow
        h.update(raw)                                   # the bytes as stored (little-endian), any chunking
    digest = "sha256:" + h.hexdigest()

The length prefix keeps the encoding unambiguous, so no two different tensor sets share a digest
short of a sha256 collision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["DIGEST_PREFIX", "AdapterDigest", "digest_of_tensors", "is_digest"]

DIGEST_PREFIX = "sha256:"

BytesLike = bytes | bytearray | memoryview


class AdapterDigest:
    """Builds the adapter digest tensor by tensor; tensors must come in sorted name order."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._last_name: str | None = None
        self._tensors = 0
        self._broken = False

    @property
    def tensors(self) -> int:
        """How many tensors went in so far."""
        return self._tensors

    def add_tensor(
        self,
        name: str,
        dtype: str,
        shape: Sequence[int],
        data: BytesLike | Iterable[BytesLike],
        *,
        nbytes: int | None = None,
    ) -> None:
        """Feeds one tensor: `data` is its raw bytes, whole or as an iterable of chunks.

        With chunks, `nbytes` (their total length) is required because the framing puts the length
        before the bytes; a mismatch raises ValueError rather than producing a wrong digest.
        After a ValueError raised while bytes were being fed, the builder refuses further use.
        """
        if self._broken:
            raise ValueError("this digest was left incomplete by an earlier error; start a new AdapterDigest")
        if self._last_name is not None and name <= self._last_name:
            raise ValueError(f"tensor {name!r} comes after {self._last_name!r}; feed tensors in sorted name order")
        if not dtype or not dtype.isascii() or "\0" in dtype:
            raise ValueError(f"dtype {dtype!r} of tensor {name!r} is not a safetensors dtype name")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise ValueError(f"shape {list(shape)!r} of tensor {name!r} is not a list of non-negative ints")
        chunks: Iterable[BytesLike]
        if isinstance(data, bytes | bytearray | memoryview):
            whole = memoryview(data).cast("B")
            chunks = (whole,)
            if nbytes is None:
                nbytes = whole.nbytes
        else:
            if nbytes is None:
                raise ValueError(f"tensor {name!r} is given in chunks; pass nbytes, its total length")
            chunks = data
        encoded_name = name.encode("utf-8")  # lone surrogates raise UnicodeEncodeError, a ValueError
        h = self._hash
        self._broken = True  # until the tensor is complete
        h.update(encoded_name + b"\0")
        h.update(dtype.encode("ascii") + b"\0")
        h.update(",".join(str(d) for d in shape).encode("ascii") + b"\0")
        h.update(nbytes.to_bytes(8, "little"))
        fed = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            fed += view.nbytes
            h.update(view)
        if fed != nbytes:
            raise ValueError(f"tensor {name!r} was declared as {nbytes} bytes but {fed} bytes were fed")
        self._last_name = name
        self._tensors += 1
        self._broken = False

    def hexdigest(self) -> str:
        """The digest so far, `sha256:<64 hex>`; further tensors may still be added."""
        if self._broken:
            raise ValueError("this digest was left incomplete by an earlier error; start a new AdapterDigest")
        return DIGEST_PREFIX + self._hash.hexdigest()

    @property
    def value(self) -> str:
        return self.hexdigest()


def digest_of_tensors(tensors: Mapping[str, tuple[str, Sequence[int], BytesLike]]) -> str:
    """The digest of `{name: (dtype, shape, raw bytes)}`, sorting names itself (handy on the trainer side)."""
    builder = AdapterDigest()
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        builder.add_tensor(name, dtype, shape, raw)
    return builder.hexdigest()


def is_digest(value: object) -> bool:
    """True for a well-formed digest string (`sha256:` and 64 lowercase hex digits)."""
    if not isinstance(value, str) or not value.startswith(DIGEST_PREFIX):
        return False
    hex_part = value[len(DIGEST_PREFIX) :]
    return len(hex_part) == 64 and all(c in "0123456789abcdef" for c in hex_part)
