"""`load_adapter_from_checkpoint` against a real tiny Llama with real peft LoRA adapters (CPU)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from sidecar.adapter import adapter_digest  # noqa: E402
from sidecar.preload.peft_load import AdapterLoadError, load_adapter_from_checkpoint, prepare_adapter_load  # noqa: E402
from tests.support.tiny_model import TinyAssets, build_lora_adapter, tiny_assets  # noqa: E402

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def assets() -> TinyAssets:
    return tiny_assets()


def load_model(assets: TinyAssets, adapter: Path | None = None, dtype: Any = None) -> Any:
    base = LlamaForCausalLM.from_pretrained(assets.base, dtype=dtype or torch.float32)
    model = PeftModel.from_pretrained(base, adapter or assets.adapter_a, is_trainable=True)
    model.train()
    return model


@pytest.fixture
def model(assets: TinyAssets) -> Any:
    return load_model(assets)


def snapshot(model: Any) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_untouched(model: Any, before: dict[str, Any]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{name} changed"


def lora_of(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(adapter: Path, change: Any) -> None:
    """Rewrite adapter_model.safetensors with `change(dict of tensors)` applied (tests' own damaged adapters)."""
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


# --- the good path -----------------------------------------------------------------------------------------------
def test_loads_exactly_and_returns_the_disk_digest(model: Any, assets: TinyAssets) -> None:
    digest = load_adapter_from_checkpoint(model, assets.adapter_b)
    assert digest == adapter_digest(assets.adapter_b)  # the daemon's digest, computed from disk without torch
    expected = load_file(str(assets.adapter_b / "adapter_model.safetensors"))
    live = lora_of(model)
    assert set(live) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(live[key], tensor), key


def test_forward_pass_matches_a_fresh_load_of_the_forked_adapter(model: Any, assets: TinyAssets) -> None:
    load_adapter_from_checkpoint(model, assets.adapter_b)
    fresh = load_model(assets, assets.adapter_b)
    tokens = torch.arange(3, 19).reshape(1, 16)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, fresh(input_ids=tokens).logits)


def test_bf16_file_is_cast_to_the_parameter_dtype(model: Any, assets: TinyAssets, workdir: Path) -> None:
    bf16 = copy_adapter(assets.adapter_b, workdir / "bf16")
    rewrite_tensors(bf16, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    digest = load_adapter_from_checkpoint(model, bf16)
    assert digest == adapter_digest(bf16)
    assert digest != adapter_digest(assets.adapter_b)  # the digest is of what was read, before the cast
    expected = load_file(str(bf16 / "adapter_model.safetensors"))
    for key, value in lora_of(model).items():
        assert value.dtype == torch.float32
        assert torch.equal(value, expected[key].to(torch.float32)), key


def test_fp32_file_into_a_bf16_model(assets: TinyAssets) -> None:
    model = load_model(assets, dtype=torch.bfloat16)
    model.to(torch.bfloat16)
    load_adapter_from_checkpoint(model, assets.adapter_b)
    expected = load_file(str(assets.adapter_b / "adapter_model.safetensors"))
    for key, value in lora_of(model).items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, expected[key].to(torch.bfloat16)), key


def test_nan_weights_still_verify_bit_for_bit(model: Any, assets: TinyAssets, workdir: Path) -> None:
    nan = copy_adapter(assets.adapter_b, workdir / "nan")

    def poison(t: dict[str, Any]) -> None:
        key = sorted(t)[0]
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")

    rewrite_tensors(nan, poison)
    assert load_adapter_from_checkpoint(model, nan) == adapter_digest(nan)


def test_grads_and_optimizer_state_are_reset(model: Any, assets: TinyAssets) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tokens = torch.arange(3, 19).reshape(1, 16)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    model(input_ids=tokens, labels=tokens).loss.backward()  # grads pending for the next step
    assert all(p in optimizer.state for p in params)
    load_adapter_from_checkpoint(model, assets.adapter_b, optimizers=[optimizer])
    assert all(p.grad is None for p in params)
    assert not any(p in optimizer.state for p in params)
    # Training goes on from the loaded weights with a fresh Adam state.
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    assert all(int(optimizer.state[p]["step"]) == 1 for p in params)


def test_an_undoable_apply_is_rolled_back_to_the_weights_grads_and_optimizer_state_before_it(
    model: Any, assets: TinyAssets
) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tokens = torch.arange(3, 19).reshape(1, 16)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    before, grads, states = snapshot(model), [p.grad for p in params], [optimizer.state[p] for p in params]
    prepared = prepare_adapter_load(model, assets.adapter_b)
    prepared.apply([optimizer], undoable=True)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())  # adapter B is in
    assert not any(p in optimizer.state for p in params)
    prepared.roll_back()
    assert_untouched(model, before)
    assert all(p.grad is g for p, g in zip(params, grads, strict=True))
    assert all(optimizer.state[p] is s for p, s in zip(params, states, strict=True))


# --- refusals leave the model untouched -----------------------------------------------------------------------
def refuses(model: Any, checkpoint: Path, *fragments: str) -> str:
    before = snapshot(model)
    with pytest.raises(AdapterLoadError) as e:
        load_adapter_from_checkpoint(model, checkpoint)
    assert_untouched(model, before)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    return str(e.value)


def test_shape_mismatch_is_refused_with_names(model: Any, assets: TinyAssets, workdir: Path) -> None:
    rank4 = build_lora_adapter(assets.base, workdir / "rank4", seed=3, rank=4)
    message = refuses(model, rank4, "shape mismatch", "lora_A.weight (file [4, 128], model [8, 128])")
    assert "nothing was loaded" in message


def test_missing_lora_keys_are_refused(model: Any, assets: TinyAssets, workdir: Path) -> None:
    qv = build_lora_adapter(assets.base, workdir / "qv", seed=3, target_modules=("q_proj", "v_proj"))
    refuses(model, qv, "missing 8 LoRA tensor(s)", "k_proj")


def test_unexpected_keys_are_refused(assets: TinyAssets, workdir: Path) -> None:
    qv = build_lora_adapter(assets.base, workdir / "qv", seed=3, target_modules=("q_proj", "v_proj"))
    model = load_model(assets, qv)
    refuses(model, assets.adapter_b, "8 tensor(s) the model does not have", "o_proj")


def test_extra_tensor_in_the_file_is_refused(model: Any, assets: TinyAssets, workdir: Path) -> None:
    extra = copy_adapter(assets.adapter_b, workdir / "extra")
    rewrite_tensors(extra, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(4, 4)}))
    refuses(model, extra, "lm_head.weight")


def test_different_lora_alpha_is_refused(model: Any, assets: TinyAssets, workdir: Path) -> None:
    alpha = copy_adapter(assets.adapter_b, workdir / "alpha")
    config = json.loads((alpha / "adapter_config.json").read_text())
    config["lora_alpha"] = 64
    (alpha / "adapter_config.json").write_text(json.dumps(config))
    refuses(model, alpha, "lora_alpha=64", "lora_alpha=16")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda b: b[:4], "shorter than a safetensors header"),
        (lambda b: b[:-10], "the file is truncated"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header"),
        (lambda b: b[:8] + b"}" + b[9:], "not JSON"),
        (lambda b: b.replace(b'"F32"', b'"I32"', 1), "dtype 'I32'"),  # same size: only the dtype is wrong
    ],
    ids=["truncated-header", "truncated-data", "huge-header", "bad-json", "int-dtype"],
)
def test_damaged_files_are_refused(model: Any, assets: TinyAssets, workdir: Path, damage: Any, fragment: str) -> None:
    broken = copy_adapter(assets.adapter_b, workdir / "broken")
    path = broken / "adapter_model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    refuses(model, broken, fragment)


def test_pickle_files_are_never_read(model: Any, assets: TinyAssets, workdir: Path) -> None:
    pickled = workdir / "pickled"
    pickled.mkdir()
    shutil.copy(assets.adapter_b / "adapter_config.json", pickled)
    # Were this unpickled it would run code; it must not even be opened.
    (pickled / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    refuses(model, pickled, "adapter_model.safetensors does not exist")


def test_not_a_peft_model_is_refused(assets: TinyAssets) -> None:
    base = LlamaForCausalLM.from_pretrained(assets.base, dtype=torch.float32)
    with pytest.raises(AdapterLoadError, match="not a PEFT model"):
        load_adapter_from_checkpoint(base, assets.adapter_b)


def test_named_adapter_must_exist(model: Any, assets: TinyAssets) -> None:
    with pytest.raises(AdapterLoadError, match="no adapter 'other'"):
        load_adapter_from_checkpoint(model, assets.adapter_b, adapter_name="other")


def test_unsloth_decode_cache_is_dropped(model: Any, assets: TinyAssets) -> None:
    """Unsloth caches a cast copy of each LoRA weight as `weight._fast_lora` and never refreshes it."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p._fast_lora = p.detach().clone()
    load_adapter_from_checkpoint(model, assets.adapter_b)
    assert not any(hasattr(p, "_fast_lora") for p in params)


# --- the in-place load and its check -----------------------------------------------------------------------------
def test_an_adapter_whose_state_dict_is_computed_is_never_copied_into_that_copy(
    assets: TinyAssets, workdir: Path
) -> None:
    # Prompt tuning saves `prompt_embeddings` computed from its encoder, not a parameter: copying into that tensor
    # would change nothing in the model, and checking the same tensor afterwards would pass. Such adapters go
    # through peft's set_peft_model_state_dict, which (peft 0.x) does not place it: refused, never a false success.
    from peft import PromptTuningConfig, get_peft_model

    def prompt_model(seed: int) -> Any:
        torch.manual_seed(seed)
        base = LlamaForCausalLM.from_pretrained(assets.base, dtype=torch.float32)
        return get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))

    prompt_model(1).save_pretrained(workdir / "prompt", safe_serialization=True)
    model = prompt_model(2)
    with pytest.raises(AdapterLoadError, match="did not place 1 tensor"):
        load_adapter_from_checkpoint(model, workdir / "prompt")


def test_a_zero_element_shard_is_loaded_in_place_like_the_others() -> None:
    # FSDP2 shards a dim smaller than the world size to zero elements on some ranks; taking peft's path on those
    # ranks only would load differently there (and peft's path is the one that may refuse).
    from sidecar.preload.peft_load import _params_of, _shares_parameter_storage

    whole, empty = torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(0, 2))
    live = {"a": whole, "b": empty}
    params = _params_of(torch.nn.ParameterList([whole, empty]), live.values())
    assert _shares_parameter_storage(live, params)
    assert not _shares_parameter_storage({"a": whole.detach().clone(), "b": empty}, params)  # a copy is no parameter


@pytest.mark.parametrize("readers", [1, 3, 8])
def test_a_file_of_many_pieces_is_read_exactly_by_the_parallel_readers(workdir: Path, readers: int) -> None:
    # Several kept threads read 4 MiB pieces at once and the digest follows the prefix read so far: the bytes in
    # memory and the digest must be the file's (an odd-sized last piece, and more pieces than readers).
    from sidecar.preload.checkpoint_read import _PIECE
    from sidecar.preload.peft_load import ADAPTER_FILE, digest_of, read_checkpoint

    adapter = workdir / "big"
    adapter.mkdir()
    floats = 3 * readers * _PIECE // 4 + 3_087
    tensors = {"a": torch.randn(floats // 2), "b": torch.randn(floats - floats // 2)}
    save_file(tensors, str(adapter / ADAPTER_FILE))
    raw = (adapter / ADAPTER_FILE).read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for _ in range(2):  # the second read takes the threads the first one left
        read = read_checkpoint(adapter, readers=readers)
        assert len(read.data) > readers * _PIECE and len(read.data) % _PIECE
        assert bytes(read.data) == raw[header_end:]
        assert digest_of(read) == adapter_digest(adapter)


def test_large_data_is_read_into_a_page_aligned_mapping_of_its_own(workdir: Path) -> None:
    # The copy to a GPU page-locks the read buffer (sidecar/preload/host_pin.py): it must own whole pages, or the
    # lock would take in the neighbouring allocations' pages too. Small files keep a bytearray.
    import ctypes
    import mmap

    from sidecar.preload.checkpoint_read import _MAPPED_FROM
    from sidecar.preload.peft_load import ADAPTER_FILE, digest_of, read_checkpoint

    for floats, mapped in ((_MAPPED_FROM // 4 + 1_001, True), (1_000, False)):
        adapter = workdir / f"f{floats}"
        adapter.mkdir()
        save_file({"a": torch.randn(floats)}, str(adapter / ADAPTER_FILE))
        read = read_checkpoint(adapter)
        assert isinstance(read.data.obj, mmap.mmap) is mapped, floats
        if mapped:
            assert ctypes.addressof(ctypes.c_char.from_buffer(read.data)) % mmap.PAGESIZE == 0
            assert len(read.data.obj) == len(read.data)  # the mapping holds this data and nothing else
        assert digest_of(read) == adapter_digest(adapter)
        tensor = torch.frombuffer(read.raw("a"), dtype=torch.float32)
        del read  # the tensor keeps the mapping alive
        assert torch.equal(tensor, load_file(str(adapter / ADAPTER_FILE))["a"])


def test_a_check_that_fails_while_the_data_is_read_stops_the_read_and_is_raised(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CPU model's checks run while the kept readers read (read_checkpoint's `meanwhile`): a refusal must come out
    # as itself (an OSError too, not as "cannot be read"), the readers stop at their next piece and have all ended
    # when it does, and the next read is whole. Each preadv is slowed (the real call, after a pause) so that the
    # stop can be seen.
    import os

    from sidecar.preload.checkpoint_read import _PIECE, ALL_READERS
    from sidecar.preload.peft_load import ADAPTER_FILE, digest_of, read_checkpoint

    pieces = 40
    adapter = workdir / "big"
    adapter.mkdir()
    save_file({"a": torch.randn(pieces * _PIECE // 4 - 64)}, str(adapter / ADAPTER_FILE))
    real, calls = os.preadv, []

    def slow_preadv(*args: Any) -> int:
        calls.append(1)
        time.sleep(0.02)
        return real(*args)

    monkeypatch.setattr(os, "preadv", slow_preadv)

    def refuse(tensors: Any) -> None:
        assert tensors.wait_for(_PIECE)  # one piece is in
        raise PermissionError("refused by the check")

    with pytest.raises(PermissionError, match="refused by the check"):
        read_checkpoint(adapter, meanwhile=refuse, readers=ALL_READERS)
    made = len(calls)
    time.sleep(0.2)
    assert 1 <= made < pieces and len(calls) == made  # stopped early, and nothing read after it was raised
    read = read_checkpoint(adapter, meanwhile=lambda tensors: None, readers=ALL_READERS)
    assert digest_of(read) == adapter_digest(adapter)


def test_a_digest_following_the_read_on_kept_threads_is_the_files(workdir: Path) -> None:
    # The GPU path and a rank's CPU path: hashing threads wait for the readers' prefix while the read goes on.
    from sidecar.preload.checkpoint_read import _PIECE, DigestThread
    from sidecar.preload.peft_load import ADAPTER_FILE, read_checkpoint

    adapter = workdir / "big"
    adapter.mkdir()
    save_file({f"t{i}": torch.randn(_PIECE // 4 + 17 * i) for i in range(6)}, str(adapter / ADAPTER_FILE))
    for readers in (1, 2):
        threads: list[DigestThread] = []

        def follow(tensors: Any, threads: list[DigestThread] = threads) -> None:
            threads.append(DigestThread(tensors))
            threads[0].start()

        read_checkpoint(adapter, follow=follow, readers=readers)
        assert threads[0].value() == adapter_digest(adapter)
