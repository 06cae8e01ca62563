"""The adapter digest: its framing, and that only tensor content (not file layout or chunking) matters."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import adapter
from sidecar.adapter import adapter_digest
from sidecar.digest import AdapterDigest, digest_of_tensors, is_digest
from tests.support.adapters import RawTensor, write_adapter, write_raw_safetensors


def framing_by_hand(path: Path) -> str:
    """The digest as DESIGN.md defines it, computed straight from the file with struct + json."""
    blob = path.read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    header.pop("__metadata__", None)
    data = blob[8 + header_len :]
    h = hashlib.sha256()
    for name in sorted(header):
        entry = header[name]
        begin, end = entry["data_offsets"]
        raw = data[begin:end]
        h.update(name.encode("utf-8") + b"\0")
        h.update(entry["dtype"].encode("ascii") + b"\0")
        h.update(",".join(str(d) for d in entry["shape"]).encode("ascii") + b"\0")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return "sha256:" + h.hexdigest()


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64"])
def test_digest_follows_the_documented_framing(tmp_path: Path, dtype: str) -> None:
    written = write_adapter(tmp_path / "ckpt", dtype=dtype, modules=("q_proj", "k_proj", "v_proj"), layers=3)

    expected = framing_by_hand(written.model_file)

    assert adapter_digest(tmp_path / "ckpt") == expected
    assert adapter_digest(written.model_file) == expected
    assert digest_of_tensors(written.tensors) == expected


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


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=0, max_size=300), cuts=st.lists(st.integers(0, 300), max_size=8))
def test_chunking_does_not_change_the_digest(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[i:j] for i, j in itertools.pairwise(points)]
    whole, chunked = AdapterDigest(), AdapterDigest()

    whole.add_tensor("t", "U8", [len(data)], data)
    chunked.add_tensor("t", "U8", [len(data)], iter(chunks), nbytes=len(data))

    assert whole.hexdigest() == chunked.hexdigest()


def test_reading_the_file_in_tiny_chunks_gives_the_same_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_adapter(tmp_path / "ckpt", dtype="BF16")
    expected = adapter_digest(tmp_path / "ckpt")

    monkeypatch.setattr(adapter, "READ_CHUNK", 7)

    assert adapter_digest(tmp_path / "ckpt") == expected == framing_by_hand(written.model_file)


def test_tensors_must_come_in_sorted_order() -> None:
    builder = AdapterDigest()
    builder.add_tensor("b", "F32", [1], b"\0" * 4)

    with pytest.raises(ValueError, match="sorted name order"):
        builder.add_tensor("a", "F32", [1], b"\0" * 4)
    with pytest.raises(ValueError, match="sorted name order"):
        builder.add_tensor("b", "F32", [1], b"\0" * 4)  # a duplicate is out of order too


def test_a_wrong_length_is_an_error_and_spoils_the_builder() -> None:
    builder = AdapterDigest()

    with pytest.raises(ValueError, match="declared as 5 bytes"):
        builder.add_tensor("a", "F32", [1], iter([b"\0" * 4]), nbytes=5)
    with pytest.raises(ValueError, match="incomplete"):
        builder.hexdigest()


@pytest.mark.parametrize(
    ("name", "dtype", "shape"),
    [("a", "", [1]), ("a", "F\u00e932", [1]), ("a", "F32", [-1]), ("a", "F32", [True]), ("\ud800", "F32", [1])],
)
def test_bad_tensor_descriptions_are_refused(name: str, dtype: str, shape: list[int]) -> None:
    with pytest.raises(ValueError):
        AdapterDigest().add_tensor(name, dtype, shape, b"\0" * 4)


def test_chunks_need_their_total_length() -> None:
    with pytest.raises(ValueError, match="nbytes"):
        AdapterDigest().add_tensor("a", "F32", [1], iter([b"\0" * 4]))


def test_is_digest() -> None:
    good = digest_of_tensors({"a": ("F32", (1,), b"\0" * 4)})

    assert is_digest(good)
    assert not is_digest(good.upper())
    assert not is_digest(good[:-1])
    assert not is_digest("md5:" + good[7:])
    assert not is_digest(None)
