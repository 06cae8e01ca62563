"""Adapter checks from safetensors headers and adapter_config.json, on real files."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open

from sidecar.adapter import (
    AdapterError,
    adapter_digest,
    check_adapter,
    parse_header,
    read_header,
)
from sidecar.preload import peft_load
from sidecar.protocol.safetensors_header import LORA_DTYPES
from tests.support.adapters import (
    lora_tensor_name,
    lora_tensors,
    write_adapter,
    write_adapter_config,
    write_raw_safetensors,
    write_safetensors,
)

A0 = lora_tensor_name(0, "q_proj", "A")
B0 = lora_tensor_name(0, "q_proj", "B")
MODEL = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def lora_header(rank: int = 4, hidden: int = 8, **changes: Any) -> tuple[dict[str, Any], bytes]:
    """A valid one-module LoRA header (F32) and its data, with entries of `changes` merged over it."""
    size = rank * hidden * 4
    header: dict[str, Any] = {
        A0: {"dtype": "F32", "shape": [rank, hidden], "data_offsets": [0, size]},
        B0: {"dtype": "F32", "shape": [hidden, rank], "data_offsets": [size, 2 * size]},
    }
    header.update(changes)
    return header, b"\1" * (2 * size)


def raw_checkpoint(directory: Path, header: dict[str, Any] | bytes, data: bytes, **kw: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_raw_safetensors(directory / MODEL, header, data, **kw)
    write_adapter_config(directory, target_modules=("q_proj",))
    return directory


def expect_error(directory: Path, filename: str, *fragments: str) -> AdapterError:
    with pytest.raises(AdapterError) as caught:
        check_adapter(directory)
    message = str(caught.value)
    assert filename in message, message
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


# --------------------------------------------------------------------------------- valid adapters


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64"])
def test_valid_adapter_is_described(tmp_path: Path, dtype: str) -> None:
    written = write_adapter(tmp_path / "0005", dtype=dtype, rank=8, layers=3, alpha=16, extra_files={"sub/a.txt": "x"})

    info = check_adapter(tmp_path / "0005")

    assert info.dir == tmp_path / "0005"
    assert (info.rank, info.max_rank, info.alpha) == (8, 8, 16.0)
    assert info.target_modules == ("q_proj", "v_proj")
    assert [t.name for t in info.tensors] == sorted(written.tensors)
    assert all(t.dtype == dtype for t in info.tensors)
    assert {t.name: t.shape for t in info.tensors} == {n: s for n, (_, s, _) in written.tensors.items()}
    assert info.files == written.files == ("README.md", CONFIG, MODEL, "sub/a.txt")
    assert info.total_bytes == sum((tmp_path / "0005" / f).stat().st_size for f in info.files)
    assert info.tensor_bytes == sum(len(raw) for _, _, raw in written.tensors.values())
    assert len(info.modules) == 6


def test_tensor_offsets_point_at_the_bytes(tmp_path: Path) -> None:
    written = write_adapter(tmp_path / "c", dtype="BF16")
    blob = written.model_file.read_bytes()

    for entry in check_adapter(tmp_path / "c").tensors:
        assert blob[entry.begin : entry.end] == written.tensors[entry.name][2]


def test_rank_pattern_overrides_r(tmp_path: Path) -> None:
    write_adapter(tmp_path / "c", rank=4, rank_pattern={"v_proj": 16})

    info = check_adapter(tmp_path / "c")

    assert (info.rank, info.max_rank) == (4, 16)


def test_rank_pattern_must_match_the_weights(tmp_path: Path) -> None:
    write_adapter(tmp_path / "c", rank=4, rank_pattern={"v_proj": 16})
    write_adapter_config(tmp_path / "c", rank=4)  # the pattern is lost: v_proj now disagrees

    expect_error(tmp_path / "c", MODEL, "v_proj", "r=4")


@pytest.mark.trainer
def test_real_peft_adapter_passes_and_digests_like_the_trainer_side(tmp_path: Path) -> None:
    """peft's own save_pretrained output (Linear, Embedding, Conv2d, DoRA, lora_bias, modules_to_save)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from sidecar.protocol.digest import digest_of_tensors

    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(50, 16)
            self.q_proj = torch.nn.Linear(16, 24)
            self.conv = torch.nn.Conv2d(3, 6, 3)
            self.lm_head = torch.nn.Linear(16, 50)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()

    configs = {
        "mixed": peft.LoraConfig(
            r=4,
            target_modules=["q_proj", "embed_tokens", "conv"],
            modules_to_save=["lm_head"],
            rank_pattern={"q_proj": 2},
        ),
        "dora": peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
        "bias": peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True),
    }
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    for label, config in configs.items():
        model = peft.get_peft_model(Model(), config)
        model.to(torch.bfloat16)
        model.save_pretrained(tmp_path / label)

        info = check_adapter(tmp_path / label)

        tensors = load_file(tmp_path / label / MODEL)
        trainer_side = {
            name: (names[t.dtype], tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
            for name, t in tensors.items()
        }
        assert adapter_digest(tmp_path / label) == digest_of_tensors(trainer_side), label
        assert info.max_rank == 4


# --------------------------------------------------------------------------------- bad checkpoints


def test_missing_model_file(tmp_path: Path) -> None:
    write_adapter(tmp_path / "c")
    (tmp_path / "c" / MODEL).unlink()

    expect_error(tmp_path / "c", MODEL, "missing")


def test_pickled_adapter_gets_a_hint(tmp_path: Path) -> None:
    write_adapter(tmp_path / "c")
    (tmp_path / "c" / MODEL).rename(tmp_path / "c" / "adapter_model.bin")

    expect_error(tmp_path / "c", MODEL, "safe_serialization")


def test_missing_config(tmp_path: Path) -> None:
    write_adapter(tmp_path / "c")
    (tmp_path / "c" / CONFIG).unlink()

    expect_error(tmp_path / "c", CONFIG, "missing")


def test_missing_directory(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope", "nope", "no such directory")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "not an object"),
        (json.dumps({"peft_type": "LORA", "lora_alpha": 8}).encode(), "r is None"),
        (json.dumps({"r": 0}).encode(), "r is 0"),
        (json.dumps({"r": -4}).encode(), "r is -4"),
        (json.dumps({"r": True}).encode(), "r is True"),
        (json.dumps({"r": "4"}).encode(), "r is '4'"),
        (json.dumps({"r": 4, "peft_type": "IA3"}).encode(), "only LoRA"),
        (json.dumps({"r": 4, "lora_alpha": "8"}).encode(), "lora_alpha"),
        (json.dumps({"r": 4, "rank_pattern": {"q_proj": 0}}).encode(), "rank_pattern"),
        (json.dumps({"r": 4, "rank_pattern": {"(": 8}}).encode(), "regular expression"),
        (json.dumps({"r": 4, "target_modules": [1]}).encode(), "target_modules"),
        (b'{"r": 4, "r": 8}', "twice"),
    ],
)
def test_bad_config(tmp_path: Path, content: bytes, fragment: str) -> None:
    write_adapter(tmp_path / "c")
    (tmp_path / "c" / CONFIG).write_bytes(content)

    expect_error(tmp_path / "c", CONFIG, fragment)


def test_truncated_model_file(tmp_path: Path) -> None:
    written = write_adapter(tmp_path / "c")
    size = written.model_file.stat().st_size
    os.truncate(written.model_file, size - 10)

    expect_error(tmp_path / "c", MODEL, "truncated", "re-save")


def test_file_shorter_than_the_length_field(tmp_path: Path) -> None:
    written = write_adapter(tmp_path / "c")
    written.model_file.write_bytes(b"\1\2\3")

    expect_error(tmp_path / "c", MODEL, "3 bytes")


@pytest.mark.parametrize(
    ("length", "fragment"), [(1 << 40, "2^40 exceeds the 100 MB"), (5000, "exceeds the file size")]
)
def test_header_length_too_large(tmp_path: Path, length: int, fragment: str) -> None:
    header, data = lora_header()
    raw_checkpoint(tmp_path / "c", header, data, header_len=length)

    expect_error(tmp_path / "c", MODEL, fragment)


def entry(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape if shape is not None else [4, 8], "data_offsets": offsets or [0, 128]}


BAD_HEADERS: dict[str, tuple[Callable[[], tuple[dict[str, Any] | bytes, bytes]], str]] = {
    "not json": (lambda: (b"{oops", b""), "not JSON"),
    "not utf-8": (lambda: (b'{"\xff": 1}', b""), "not UTF-8"),
    "a list": (lambda: (b"[]", b""), "not an object"),
    "a string": (lambda: (b'"x"', b""), "not an object"),
    "deeply nested": (lambda: (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""), "JSON"),
    "huge integer": (
        lambda: (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', b""),
        "shape",
    ),
    "NaN": (lambda: (b'{"a": NaN}', b""), "not JSON"),
    "duplicate tensor": (
        lambda: (
            f'{{"{A0}": {json.dumps(entry())}, "{A0}": {json.dumps(entry())}}}'.encode(),
            b"\0" * 128,
        ),
        "twice",
    ),
    "entry not a mapping": (lambda: lora_header(**{A0: [1, 2]}), "not an object with exactly"),
    "unknown field": (lambda: lora_header(**{A0: {**entry(), "extra": 1}}), "not an object with exactly"),
    "unknown dtype": (lambda: lora_header(**{A0: entry(dtype="F31")}), "unknown dtype F31"),
    "negative dim": (lambda: lora_header(**{A0: entry(shape=[-4, 8])}), "non-negative"),
    "float dim": (lambda: lora_header(**{A0: entry(shape=[4.0, 8])}), "non-negative"),  # type: ignore[list-item]
    "bool dim": (lambda: lora_header(**{A0: entry(shape=[True, 8])}), "non-negative"),
    "huge declared size": (lambda: lora_header(**{A0: entry(shape=[1 << 40, 1 << 40])}), "more than 2^64"),
    "dim past u64": (lambda: lora_header(**{A0: entry(shape=[0, 1 << 70])}), "non-negative"),
    "size mismatch": (lambda: lora_header(**{A0: entry(shape=[4, 7])}), "span 128 bytes"),
    "three offsets": (lambda: lora_header(**{A0: entry(offsets=[0, 64, 128])}), "two non-negative"),
    "end before begin": (lambda: lora_header(**{A0: entry(offsets=[128, 0])}), "data_offsets"),
    "overlap": (lambda: lora_header(**{B0: entry(shape=[8, 4], offsets=[64, 192])}), "overlaps"),
    "gap": (
        lambda: (lora_header(**{B0: entry(shape=[8, 4], offsets=[132, 260])})[0], b"\0" * 260),
        "belong to no tensor",
    ),
    "trailing bytes": (lambda: (lora_header()[0], lora_header()[1] + b"\0" * 3), "belong to no tensor"),
    "past the end": (lambda: (lora_header()[0], lora_header()[1][:-4]), "past the"),
    "metadata not strings": (lambda: lora_header(__metadata__={"a": 1}), "__metadata__"),
    "metadata a list": (lambda: lora_header(__metadata__=["a"]), "__metadata__"),
    "lone surrogate": (
        lambda: (b'{"\\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}', b""),
        "not valid Unicode",
    ),
    "sub-byte misaligned": (
        lambda: lora_header(x={"dtype": "F4", "shape": [3], "data_offsets": [256, 258]}),
        "byte boundary",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_safetensors_header(tmp_path: Path, case: str) -> None:
    make, fragment = BAD_HEADERS[case]
    header, data = make()
    raw_checkpoint(tmp_path / "c", header, data)

    expect_error(tmp_path / "c", MODEL, fragment, "re-save the checkpoint")


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ({"base_model.model.layers.0.mlp.weight": entry()}, "not a LoRA tensor"),
        ({"model.layers.0.q_proj.lora_A.weight": entry()}, "not a LoRA tensor"),  # peft's prefix is missing
        ({A0: entry()}, "no partner"),
        ({A0: entry(shape=[3, 8], offsets=[0, 96]), B0: entry(shape=[8, 3], offsets=[96, 192])}, "rank 3"),
        ({A0: entry(shape=[4, 8]), B0: entry(shape=[8, 3], offsets=[128, 224])}, "rank 3"),
        ({A0: entry(shape=[32]), B0: entry(shape=[8, 4], offsets=[128, 256])}, "not a LoRA matrix"),
        ({A0: entry(dtype="I32"), B0: entry(shape=[8, 4], offsets=[128, 256])}, "dtype I32"),
        ({"base_model.model.x.lora_magnitude_vector": entry(shape=[32])}, "no lora_A/lora_B pair"),
        ({}, "holds no LoRA tensors"),
    ],
)
def test_not_a_lora_adapter(tmp_path: Path, header: dict[str, Any], fragment: str) -> None:
    data_size = max((v["data_offsets"][1] for v in header.values()), default=0)
    raw_checkpoint(tmp_path / "c", header, b"\0" * data_size)

    expect_error(tmp_path / "c", MODEL, fragment)


def test_odd_tensor_names_are_quoted_on_one_line(tmp_path: Path) -> None:
    header = {"evil\nname": entry()}
    raw_checkpoint(tmp_path / "c", header, b"\0" * 128)

    error = expect_error(tmp_path / "c", MODEL, "'evil\\nname'")

    assert error.path == tmp_path / "c" / MODEL


def test_odd_directory_names_are_quoted(tmp_path: Path) -> None:
    odd = tmp_path / "bad\nname\udcff"
    write_adapter(odd)
    (odd / MODEL).unlink()

    expect_error(odd, "bad\\nname\\udcff", "missing")


def test_symlinked_files_and_directories_are_refused(tmp_path: Path) -> None:
    write_adapter(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    expect_error(tmp_path / "link", "link", "link: is a symlink")

    write_adapter(tmp_path / "c")
    (tmp_path / "c" / MODEL).rename(tmp_path / "elsewhere.safetensors")
    (tmp_path / "c" / MODEL).symlink_to(tmp_path / "elsewhere.safetensors")
    expect_error(tmp_path / "c", MODEL, f"{MODEL}: is a symlink")


def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    write_adapter(tmp_path / "c")
    os.mkfifo(tmp_path / "c" / "pipe")

    expect_error(tmp_path / "c", "pipe", "not a regular file")


def test_digest_refuses_a_damaged_file(tmp_path: Path) -> None:
    written = write_adapter(tmp_path / "c")
    os.truncate(written.model_file, 100)

    with pytest.raises(AdapterError, match=MODEL):
        adapter_digest(tmp_path / "c")


# --------------------------------------------------------------------------------- properties


def safetensors_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
        return True
    except (SafetensorError, ValueError, OSError):
        return False


def check_file(path: Path) -> bool:
    """True if read_header accepts the file; any exception other than AdapterError fails the test."""
    fd = os.open(path, os.O_RDONLY)
    try:
        read_header(fd, path)
        return True
    except AdapterError:
        return False
    finally:
        os.close(fd)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200))
def test_any_bytes_give_a_header_or_an_adapter_error(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)

    if check_file(path):
        assert safetensors_accepts(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(max_size=120), data=st.binary(max_size=40))
def test_any_header_bytes_give_a_header_or_an_adapter_error(tmp_path: Path, header: bytes, data: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)

    if check_file(path):
        assert safetensors_accepts(path)


DTYPE_BITS_SAMPLE = {"F32": 32, "BF16": 16, "F16": 16, "U8": 8, "F4": 4, "F6_E2M3": 6, "BOOL": 8, "C64": 64}
odd_values = st.sampled_from([-1, 1 << 63, 1 << 64, 2.0, True, None, "F32", "x", [], {}])


@st.composite
def near_valid_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A consistent header (tensors tiling the data section), then at most one random mutation."""
    names = draw(st.lists(st.text(min_size=0, max_size=5), max_size=4, unique=True))
    header: dict[str, Any] = {}
    position = 0
    layout = draw(st.permutations(names))
    for name in layout:
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS_SAMPLE)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        count = 1
        for dim in shape:
            count *= dim
        nbytes = (count * DTYPE_BITS_SAMPLE[dtype] + 7) // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + nbytes]}
        position += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
    data_size = position
    mutation = draw(st.sampled_from(["none", "none", "size", "dim", "offset", "dtype", "extra", "meta", "entry"]))
    tensors = [n for n in header if n != "__metadata__"]
    if mutation == "size":
        data_size = max(0, data_size + draw(st.integers(-3, 3)))
    elif tensors and mutation in ("dim", "offset", "dtype", "extra", "entry"):
        target = header[draw(st.sampled_from(tensors))]
        if mutation == "dim":
            target["shape"] = [*target["shape"], draw(st.integers(0, 3) | odd_values)]
        elif mutation == "offset":
            target["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-2, 2))
        elif mutation == "dtype":
            target["dtype"] = draw(st.sampled_from(["f32", "F8", "F8_E4M3", "I64", "BF16", ""]))
        elif mutation == "extra":
            target[draw(st.sampled_from(["x", "dtype"]))] = draw(odd_values)
        else:
            header[draw(st.sampled_from(tensors))] = draw(odd_values)
    elif mutation == "meta":
        header["__metadata__"] = draw(odd_values | st.dictionaries(st.text(max_size=2), odd_values, max_size=2))
    raw = json.dumps(header).encode() + draw(st.sampled_from([b"", b"  ", b"\n", b"\0"]))
    return raw, data_size


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=near_valid_headers())
def test_generated_headers_agree_with_safetensors(tmp_path: Path, case: tuple[bytes, int]) -> None:
    raw, data_size = case
    path = tmp_path / "gen.safetensors"
    write_raw_safetensors(path, raw, b"\7" * data_size)

    ours = check_file(path)

    if ours:
        assert safetensors_accepts(path)
        tensors, _ = parse_header(raw, data_size)
        with safe_open(str(path), framework="numpy") as f:
            theirs = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
        assert {t.name: (t.dtype, list(t.shape)) for t in tensors} == theirs
    elif safetensors_accepts(path):
        # We are stricter than safetensors only where adapter.py says so: unknown fields in a tensor
        # entry (duplicate keys and -0 cannot come out of json.dumps).
        entries = [v for k, v in json.loads(raw).items() if k != "__metadata__"]
        assert any(isinstance(v, dict) and set(v) - {"dtype", "shape", "data_offsets"} for v in entries)


def preload_accepts(checkpoint_dir: Path) -> bool:
    """True if the trainer side's reader (sidecar/preload/peft_load.py) takes the file; any other exception fails."""
    try:
        peft_load.read_checkpoint(checkpoint_dir)
        return True
    except peft_load.AdapterLoadError:
        return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=near_valid_headers())
def test_the_preload_reads_headers_by_the_same_rules(tmp_path: Path, case: tuple[bytes, int]) -> None:
    """One parser for both sides: the preload takes exactly what the daemon's header check takes with LoRA dtypes
    only, and all of that safetensors takes too."""
    raw, data_size = case
    path = tmp_path / "adapter_model.safetensors"
    write_raw_safetensors(path, raw, b"\7" * data_size)
    daemon = check_file(path)
    lora_dtypes_only = daemon and all(t.dtype in LORA_DTYPES for t in parse_header(raw, data_size)[0])
    assert preload_accepts(tmp_path) == lora_dtypes_only
    if lora_dtypes_only:
        assert safetensors_accepts(path)


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b'{"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}', "dtype 'F8_E4M3'"),
        (
            b'{"w":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"w":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}',
            "names w twice",
        ),
        (b'{"w":{"dtype":"F16","shape":[1],"data_offsets":[0,2],"x":1}}', "exactly dtype, shape and data_offsets"),
    ],
    ids=["f8-weights", "duplicate-name", "unknown-field"],
)
def test_the_preload_refuses_what_the_daemon_refuses(tmp_path: Path, header: bytes, fragment: str) -> None:
    """The preload's old parser took F8 LoRA weights, a tensor named twice (the last one won) and unknown fields."""
    path = tmp_path / "adapter_model.safetensors"
    write_raw_safetensors(path, header, b"\0" * 2)
    with pytest.raises(peft_load.AdapterLoadError) as e:
        peft_load.read_checkpoint(tmp_path)
    assert fragment in str(e.value) and str(path) in str(e.value), str(e.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    modules=st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]), min_size=1, unique=True),
    rank=st.integers(1, 8),
    layers=st.integers(1, 3),
    dtype=st.sampled_from(["F32", "BF16", "F16"]),
)
def test_files_written_by_safetensors_are_accepted(
    tmp_path: Path, modules: list[str], rank: int, layers: int, dtype: str
) -> None:
    directory = tmp_path / f"c-{'-'.join(modules)}-{rank}-{layers}-{dtype}"
    directory.mkdir()
    tensors = lora_tensors(rank=rank, modules=modules, layers=layers, hidden=16, dtype=dtype)
    write_safetensors(directory / MODEL, tensors, {"format": "pt"})
    write_adapter_config(directory, rank=rank, target_modules=modules)

    info = check_adapter(directory)

    assert len(info.tensors) == 2 * len(modules) * layers
