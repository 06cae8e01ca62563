"""A CPU model's copies made inside the digest's pass (sidecar/preload/hashed_copy.py), against a real tiny Llama
with real peft LoRA adapters and real safetensors files: the model ends holding exactly the file, the digest is the
daemon's, autograd sees the change, and every case the raw copy cannot take goes through torch instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sidecar.adapter import adapter_digest  # noqa: E402
from sidecar.preload import hashed_copy, peft_load  # noqa: E402
from sidecar.preload.checkpoint_read import read_checkpoint  # noqa: E402
from sidecar.preload.peft_load import load_adapter_from_checkpoint, prepare_adapter_load  # noqa: E402
from tests.support.spies import spy  # noqa: E402
from tests.support.tiny_model import TinyAssets, tiny_assets  # noqa: E402

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def assets() -> TinyAssets:
    """For the shared `model` fixture (tests/conftest.py): the tiny Llama with adapter A."""
    return tiny_assets()


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The copies made inside the digest's pass (a spy: the real function runs)."""
    return spy(monkeypatch, peft_load, "copy_while_hashing", lambda *args: 1)


def assert_holds(model: Any, adapter: Path) -> None:
    expected = load_file(str(adapter / "adapter_model.safetensors"))
    live = get_peft_model_state_dict(model)
    assert live.keys() == expected.keys()
    for key, tensor in expected.items():
        assert live[key].dtype == tensor.dtype
        assert torch.equal(live[key].view(torch.int32), tensor.view(torch.int32)), key  # bit for bit


def test_a_cpu_model_is_loaded_by_the_digests_pass_and_holds_the_file(
    model: Any, assets: TinyAssets, hashed: list[int]
) -> None:
    assert load_adapter_from_checkpoint(model, assets.adapter_b) == adapter_digest(assets.adapter_b)
    assert hashed == [1]
    assert_holds(model, assets.adapter_b)
    assert load_adapter_from_checkpoint(model, assets.adapter_a) == adapter_digest(assets.adapter_a)
    assert_holds(model, assets.adapter_a)


def test_a_graph_saved_before_the_load_cannot_be_run_over_the_new_weights(
    model: Any, assets: TinyAssets, hashed: list[int]
) -> None:
    # copy_ moves each tensor's version counter, and autograd refuses a backward over a changed saved tensor; the
    # raw copy must do the same, or the backward would silently mix old activations with new weights.
    tokens = torch.tensor([[1, 2, 3, 4]])
    loss = model(input_ids=tokens, labels=tokens).loss
    load_adapter_from_checkpoint(model, assets.adapter_b)
    assert hashed == [1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_file_of_another_dtype_is_cast_and_copied_by_torch(
    model: Any, assets: TinyAssets, hashed: list[int], tmp_path: Path
) -> None:
    tensors = load_file(str(assets.adapter_b / "adapter_model.safetensors"))
    adapter = tmp_path / "bf16"
    adapter.mkdir()
    save_file({k: t.to(torch.bfloat16) for k, t in tensors.items()}, str(adapter / "adapter_model.safetensors"))
    assert load_adapter_from_checkpoint(model, adapter) == adapter_digest(adapter)
    assert hashed == []  # the cast is a copy of its own: not the bytes the digest covers
    for key, live in get_peft_model_state_dict(model).items():
        assert torch.equal(live, tensors[key].to(torch.bfloat16).to(torch.float32)), key


def test_a_digest_asked_for_before_the_apply_is_the_same_and_the_copy_goes_through_torch(
    model: Any, assets: TinyAssets, hashed: list[int]
) -> None:
    # The ranks of a job compare digests before any of them applies (rank_agreement.py).
    prepared = prepare_adapter_load(model, assets.adapter_b)
    assert prepared.digest() == adapter_digest(assets.adapter_b)
    assert prepared.apply() == adapter_digest(assets.adapter_b)
    assert hashed == []
    assert_holds(model, assets.adapter_b)


def test_only_plain_distinct_cpu_tensors_that_are_the_read_bytes_qualify(assets: TinyAssets) -> None:
    read = read_checkpoint(assets.adapter_b)
    cast = {key: peft_load._as_tensor(read, key) for key in read.entries}
    live = {key: torch.empty_like(t) for key, t in cast.items()}
    assert hashed_copy.hashable_copies(read, live, cast)
    first, second = sorted(live)[:2]
    assert not hashed_copy.hashable_copies(read, {**live, first: live[second]}, cast)  # two keys, one memory
    assert not hashed_copy.hashable_copies(read, {**live, first: live[first].t()}, cast)  # not contiguous
    assert not hashed_copy.hashable_copies(read, {**live, first: live[first].double()}, cast)  # another dtype
    assert not hashed_copy.hashable_copies(read, live, {**cast, first: cast[first].clone()})  # not the read bytes
    assert not hashed_copy.hashable_copies(read, {k: v for k, v in live.items() if k != first}, cast)


def test_the_raw_copies_hold_the_bytes_read_and_the_digest_is_the_files(assets: TinyAssets) -> None:
    read = read_checkpoint(assets.adapter_b)
    cast = {key: peft_load._as_tensor(read, key) for key in read.entries}
    live = {key: torch.full_like(t, float("nan")) for key, t in cast.items()}
    before = {key: t._version for key, t in live.items()}
    digest, bad = hashed_copy.copy_while_hashing(read, live, cast)
    assert (digest, bad) == (adapter_digest(assets.adapter_b), [])
    for key, t in live.items():
        assert torch.equal(t, cast[key]) and t.data_ptr() != cast[key].data_ptr(), key
        assert t._version > before[key], key


def test_a_copy_that_does_not_land_is_named_and_the_load_refused(
    model: Any, assets: TinyAssets, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mock: a memmove that writes one wrong byte (memory that changes under the copy), which real memory does not
    # do on demand. The check after each piece must catch it and the load must say so.
    import ctypes

    real = ctypes.memmove

    def wrong_memmove(target: int, source: int, length: int) -> int:
        real(target, source, length)
        ctypes.c_ubyte.from_address(target).value ^= 0xFF
        return target

    monkeypatch.setattr(ctypes, "memmove", wrong_memmove)
    with pytest.raises(peft_load.AdapterLoadError, match="differ from the file"):
        load_adapter_from_checkpoint(model, assets.adapter_b)
    read = read_checkpoint(assets.adapter_b)
    cast = {key: peft_load._as_tensor(read, key) for key in read.entries}
    live = {key: torch.empty_like(t) for key, t in cast.items()}
    digest, bad = hashed_copy.copy_while_hashing(read, live, cast)
    assert digest == adapter_digest(assets.adapter_b) and bad == sorted(live)


def test_a_rank_that_compares_digests_first_hashes_beside_the_read(
    model: Any, assets: TinyAssets, hashed: list[int]
) -> None:
    prepared = prepare_adapter_load(model, assets.adapter_b, digest_first=True)
    assert prepared._digest is not None  # following the read already
    assert prepared.digest() == adapter_digest(assets.adapter_b)
    assert prepared.apply() == adapter_digest(assets.adapter_b) and hashed == []
    assert_holds(model, assets.adapter_b)
