"""The adapter digest: its framing, that only tensor content (not file layout, piece order or thread count)
matters, that digests of the older framings (the SHA-256 tree, one SHA-256 stream) are recognised and refused, and
that a Python without `blake3` is told how to get it."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.adapter import AdapterError, adapter_digest, digest_open_file
from sidecar.protocol.digest import (
    CHUNK_BYTES,
    DIGEST_PREFIX,
    DigestUnavailable,
    TensorRecord,
    digest_of_tensors,
    digest_problem,
    digest_tensors,
    is_digest,
)
from tests.support.adapters import RawTensor, write_adapter, write_raw_safetensors


def framing_by_hand(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    """The digest as the README and sidecar/protocol/digest.py define it, computed from the file with struct + json."""
    blob = path.read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    header.pop("__metadata__", None)
    data = blob[8 + header_len :]
    h = blake3.blake3()
    for name in sorted(header):
        entry = header[name]
        begin, end = entry["data_offsets"]
        raw = data[begin:end]
        h.update(name.encode("utf-8") + b"\0")
        h.update(entry["dtype"].encode("ascii") + b"\0")
        h.update(",".join(str(d) for d in entry["shape"]).encode("ascii") + b"\0")
        h.update(len(raw).to_bytes(8, "little"))
        for at in range(0, len(raw), chunk):
            h.update(blake3.blake3(raw[at : at + chunk]).digest())
    return "blake3-tree:" + h.hexdigest()


def sha256_tree_framing(tensors: dict[str, RawTensor], chunk: int = 4 * 1024 * 1024) -> str:
    """The framing of the previous release: the same tree with SHA-256 leaves and root."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        h.update(name.encode() + b"\0" + dtype.encode() + b"\0" + ",".join(map(str, shape)).encode() + b"\0")
        h.update(len(raw).to_bytes(8, "little"))
        for at in range(0, len(raw), chunk):
            h.update(hashlib.sha256(raw[at : at + chunk]).digest())
    return "sha256-tree:" + h.hexdigest()


def old_framing(tensors: dict[str, RawTensor]) -> str:
    """The previous contract: `sha256:` over one stream of every tensor's framing and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        h.update(name.encode() + b"\0" + dtype.encode() + b"\0" + ",".join(map(str, shape)).encode() + b"\0")
        h.update(len(raw).to_bytes(8, "little") + bytes(raw))
    return "sha256:" + h.hexdigest()


def test_the_chunk_size_is_the_documented_one() -> None:
    assert CHUNK_BYTES == 4 * 1024 * 1024


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64"])
def test_digest_follows_the_documented_framing(tmp_path: Path, dtype: str) -> None:
    written = write_adapter(tmp_path / "ckpt", dtype=dtype, modules=("q_proj", "k_proj", "v_proj"), layers=3)

    expected = framing_by_hand(written.model_file)

    assert adapter_digest(tmp_path / "ckpt") == expected
    assert adapter_digest(written.model_file) == expected
    assert digest_of_tensors(written.tensors) == expected


def test_tensors_larger_than_a_chunk_are_split_as_documented(tmp_path: Path) -> None:
    # 2.5 chunks, a chunk exactly, one byte over, and an empty tensor: the cases of the piece arithmetic.
    rng = np.random.default_rng(0)
    sizes = {"a": CHUNK_BYTES * 5 // 2, "b": CHUNK_BYTES, "c": CHUNK_BYTES + 1, "d": 0}
    blobs = {name: rng.integers(0, 256, size, dtype=np.uint8).tobytes() for name, size in sizes.items()}
    header, offset = {}, 0
    for name, blob in blobs.items():
        header[name] = {"dtype": "U8", "shape": [len(blob)], "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    path = tmp_path / "big.safetensors"
    write_raw_safetensors(path, header, b"".join(blobs.values()))

    expected = framing_by_hand(path)

    assert expected != framing_by_hand(path, chunk=CHUNK_BYTES // 2)  # the chunk size is part of the value
    for threads in (1, 2, 7):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert digest_open_file(fd, path, threads=threads) == expected, threads
        finally:
            os.close(fd)
    assert digest_of_tensors({n: ("U8", (len(b),), b) for n, b in blobs.items()}) == expected


def test_a_new_digest_is_never_equal_to_the_old_one_of_the_same_tensors() -> None:
    tensors: dict[str, RawTensor] = {"w": ("BF16", (2, 2), b"\1" * 8)}
    new, old = digest_of_tensors(tensors), old_framing(tensors)

    assert new.startswith(DIGEST_PREFIX) and old.startswith("sha256:") and new != old
    assert new.split(":", 1)[1] != old.split(":", 1)[1]  # not only the prefix: the framing differs
    tree = sha256_tree_framing(tensors)
    assert tree.startswith("sha256-tree:") and tree.split(":", 1)[1] != new.split(":", 1)[1]


def test_digest_ignores_file_layout_and_metadata(tmp_path: Path) -> None:
    # The same tensors stored in opposite orders, with different metadata, are the same adapter.
    a = np.arange(6, dtype="<f4").tobytes()
    b = np.arange(4, dtype="<f2").tobytes()
    forward = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
    }
    backward = {
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 32]},
    }
    write_raw_safetensors(tmp_path / "forward.safetensors", forward, a + b)
    write_raw_safetensors(tmp_path / "backward.safetensors", backward, b + a)

    digest = adapter_digest(tmp_path / "forward.safetensors")

    assert digest == adapter_digest(tmp_path / "backward.safetensors")
    assert digest == digest_of_tensors({"a": ("F32", (2, 3), a), "b": ("F16", (4,), b)})


@pytest.mark.parametrize(
    "changed",
    [
        {"w": ("F16", (2, 2), b"\1" * 8)},  # dtype differs, same bytes
        {"w": ("BF16", (4,), b"\1" * 8)},  # shape differs, same bytes
        {"v": ("BF16", (2, 2), b"\1" * 8)},  # name differs
        {"w": ("BF16", (2, 2), b"\1" * 7 + b"\2")},  # one byte differs
        {"w": ("BF16", (2, 2), b"\1" * 8), "x": ("BF16", (0,), b"")},  # an extra empty tensor
    ],
)
def test_digest_covers_name_dtype_shape_and_bytes(changed: dict[str, RawTensor]) -> None:
    base = digest_of_tensors({"w": ("BF16", (2, 2), b"\1" * 8)})

    assert digest_of_tensors(changed) != base


def test_scalar_and_empty_shapes_are_framed_distinctly() -> None:
    # shape [] frames as "" and shape [0] as "0": they must not collide.
    assert digest_of_tensors({"s": ("F32", (), b"")}) != digest_of_tensors({"s": ("F32", (0,), b"")})


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 * 64), min_size=1, max_size=6),
    chunk=st.sampled_from([1, 7, 64]),
    threads=st.integers(1, 5),
)
def test_piece_order_and_thread_count_do_not_change_the_digest(sizes: list[int], chunk: int, threads: int) -> None:
    # Small chunks make many pieces per tensor; positions in reverse make the pool read them back to front.
    blobs = [bytes((i * 31 + j) % 256 for j in range(size)) for i, size in enumerate(sizes)]
    records = [TensorRecord(f"t{i}", "U8", (len(b),), len(b), -i) for i, b in enumerate(blobs)]
    by_hand = blake3.blake3()
    for record, blob in zip(records, blobs, strict=True):
        by_hand.update(f"{record.name}\0U8\0{len(blob)}\0".encode() + len(blob).to_bytes(8, "little"))
        for at in range(0, len(blob), chunk):
            by_hand.update(blake3.blake3(blob[at : at + chunk]).digest())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sidecar.protocol.digest.CHUNK_BYTES", chunk)
        digest = digest_tensors(records, lambda i, at, n: blobs[i][at : at + n], threads=threads)

    assert digest == DIGEST_PREFIX + by_hand.hexdigest()


def test_pieces_are_hashed_on_several_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sidecar.protocol.digest.CHUNK_BYTES", 1024)
    seen: set[int] = set()
    barrier = threading.Barrier(3, timeout=10)

    def source(index: int, offset: int, length: int) -> bytes:
        if offset == 0:
            barrier.wait()  # returns only once three threads are reading at the same time
        seen.add(threading.get_ident())
        return b"\0" * length

    records = [TensorRecord(f"t{i}", "U8", (4096,), 4096, i) for i in range(3)]
    digest_tensors(records, source, threads=3)

    assert len(seen) == 3


def test_a_failing_source_stops_the_pool_and_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sidecar.protocol.digest.CHUNK_BYTES", 16)
    calls: list[int] = []

    def source(index: int, offset: int, length: int) -> bytes:
        calls.append(offset)
        if offset == 32:
            raise OSError("disk went away")
        return b"\0" * length

    with pytest.raises(OSError, match="disk went away"):
        digest_tensors([TensorRecord("t", "U8", (1600,), 1600)], source, threads=2)
    assert len(calls) < 100  # the other thread stopped rather than reading all 100 pieces


def test_a_source_returning_the_wrong_length_is_an_error() -> None:
    with pytest.raises(ValueError, match="asked for 4 bytes"):
        digest_tensors([TensorRecord("a", "F32", (1,), 4)], lambda i, at, n: b"\0" * 3)


def test_a_file_that_shrinks_while_digested_fails_naming_it(tmp_path: Path) -> None:
    written = write_adapter(tmp_path / "ckpt", dtype="F32")
    from sidecar.adapter import read_header

    fd = os.open(written.model_file, os.O_RDWR)
    try:
        header = read_header(fd, written.model_file)
        os.truncate(fd, header.data_start + 4)
        with pytest.raises(AdapterError, match="shrank while its digest was computed"):
            digest_open_file(fd, written.model_file, header)
    finally:
        os.close(fd)


def test_tensors_must_come_in_sorted_order() -> None:
    def records(*names: str) -> list[TensorRecord]:
        return [TensorRecord(n, "F32", (1,), 4) for n in names]

    with pytest.raises(ValueError, match="sorted name order"):
        digest_tensors(records("b", "a"), lambda i, at, n: b"\0" * n)
    with pytest.raises(ValueError, match="sorted name order"):
        digest_tensors(records("b", "b"), lambda i, at, n: b"\0" * n)  # a duplicate is out of order too


@pytest.mark.parametrize(
    ("name", "dtype", "shape"),
    [("a", "", [1]), ("a", "F\u00e932", [1]), ("a", "F32", [-1]), ("a", "F32", [True]), ("\ud800", "F32", [1])],
)
def test_bad_tensor_descriptions_are_refused(name: str, dtype: str, shape: list[int]) -> None:
    with pytest.raises(ValueError):
        digest_tensors([TensorRecord(name, dtype, tuple(shape), 4)], lambda i, at, n: b"\0" * n)


def test_is_digest() -> None:
    good = digest_of_tensors({"a": ("F32", (1,), b"\0" * 4)})

    assert is_digest(good)
    assert not is_digest(good.upper())
    assert not is_digest(good[:-1])
    assert not is_digest("md5:" + good[len(DIGEST_PREFIX) :])
    assert not is_digest("sha256:" + good[len(DIGEST_PREFIX) :])  # the one-stream framing's prefix
    assert not is_digest("sha256-tree:" + good[len(DIGEST_PREFIX) :])  # the SHA-256 tree's
    assert not is_digest(None)


def test_digest_problem_names_the_old_framing_and_the_fix() -> None:
    tensors: dict[str, RawTensor] = {"a": ("F32", (1,), b"\0" * 4)}

    assert digest_problem(digest_of_tensors(tensors)) is None
    for old in (old_framing(tensors), sha256_tree_framing(tensors)):
        problem = digest_problem(old)
        assert problem is not None and "old adapter digest" in problem and "preload install" in problem, old
        assert f"`{old.split(':')[0]}:`" in problem
    assert "not an adapter digest" in (digest_problem("nonsense") or "")
    assert "not an adapter digest" in (digest_problem(None) or "")


def test_a_python_without_blake3_is_told_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Uninstalling blake3 from the test environment is not possible here: the import is made to fail (a stand-in).
    import importlib

    real = importlib.import_module

    def without_blake3(name: str, *args: object) -> object:
        if name == "blake3":
            raise ModuleNotFoundError("No module named 'blake3'")
        return real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib, "import_module", without_blake3)
    monkeypatch.setattr("sidecar.protocol.hasher._found", [])  # found once per process: forget this one's
    with pytest.raises(DigestUnavailable) as raised:
        digest_of_tensors({"a": ("F32", (1,), b"\0" * 4)})

    message = str(raised.value)
    assert "blake3" in message and "fork-sidecar preload install --python" in message
    assert isinstance(raised.value, ImportError)
