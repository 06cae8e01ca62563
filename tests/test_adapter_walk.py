"""peft's walk of the adapter's tensors, kept per model (sidecar/preload/adapter_walk.py), against a real tiny Llama
with real peft LoRA adapters (CPU): the kept answer is used only while it is still the walk's answer."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sidecar.preload import adapter_walk  # noqa: E402
from sidecar.preload.peft_load import load_adapter_from_checkpoint  # noqa: E402
from tests.support.spies import spy  # noqa: E402
from tests.support.tiny_model import TinyAssets, tiny_assets  # noqa: E402

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def assets() -> TinyAssets:
    """For the shared `model` fixture (tests/conftest.py): the tiny Llama with adapter A."""
    return tiny_assets()


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """peft's walks, by adapter name (a spy around the real function: the walk itself still runs)."""
    return spy(
        monkeypatch, peft, "get_peft_model_state_dict", lambda *args, **kwargs: kwargs.get("adapter_name", "default")
    )


def same_storage(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].data_ptr() == b[k].data_ptr() and a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a
    )


def assert_holds_file(model: Any, adapter: Any) -> None:
    expected = load_file(str(adapter / "adapter_model.safetensors"))
    live = get_peft_model_state_dict(model)
    assert live.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(live[key], tensor.to(live[key].dtype)), key


def test_the_kept_answer_is_the_walks_and_is_used_while_nothing_changed(model: Any, walks: list[str]) -> None:
    first = adapter_walk.live_adapter_tensors(model, "default")
    again = adapter_walk.live_adapter_tensors(model, "default")
    assert walks == ["default"]  # the second call did not walk
    assert same_storage(again, dict(get_peft_model_state_dict(model, adapter_name="default")))
    assert same_storage(first, again)


def test_a_replaced_parameter_is_walked_again_and_loaded_into(model: Any, assets: TinyAssets, walks: list[str]) -> None:
    load_adapter_from_checkpoint(model, assets.adapter_a)
    module = next(m for n, m in model.named_modules() if n.endswith("lora_A"))
    old = module["default"].weight
    module["default"].weight = torch.nn.Parameter(torch.zeros_like(old))  # a new parameter where the old one was
    load_adapter_from_checkpoint(model, assets.adapter_b)
    assert len(walks) == 2
    assert_holds_file(model, assets.adapter_b)
    assert not torch.equal(module["default"].weight.detach(), torch.zeros_like(old))


def test_a_model_moved_to_another_dtype_is_walked_again(model: Any, assets: TinyAssets, walks: list[str]) -> None:
    load_adapter_from_checkpoint(model, assets.adapter_a)
    model.to(torch.bfloat16)  # new storage for every parameter
    load_adapter_from_checkpoint(model, assets.adapter_b)
    assert len(walks) == 2
    assert_holds_file(model, assets.adapter_b)


def test_each_adapter_of_a_model_is_kept_on_its_own(model: Any, assets: TinyAssets, walks: list[str]) -> None:
    load_adapter_from_checkpoint(model, assets.adapter_a)
    model.load_adapter(str(assets.adapter_b), adapter_name="other", is_trainable=True)  # new parameters
    load_adapter_from_checkpoint(model, assets.adapter_a, adapter_name="other")
    load_adapter_from_checkpoint(model, assets.adapter_b)
    assert walks == ["default", "other", "default"]  # adding "other" changed the model: "default" walked again
    load_adapter_from_checkpoint(model, assets.adapter_a, adapter_name="other")
    assert walks == ["default", "other", "default"]
    other = {k: v for k, v in get_peft_model_state_dict(model, adapter_name="other").items()}
    expected = load_file(str(assets.adapter_a / "adapter_model.safetensors"))
    assert all(torch.equal(other[k], expected[k]) for k in expected)
    assert_holds_file(model, assets.adapter_b)


def test_an_answer_that_is_not_whole_parameters_is_not_kept(
    model: Any, walks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A state dict peft computes (prompt learning) rather than the parameters themselves: nothing is kept, every
    # call walks. Copies of the parameters stand in for a computed state dict here.
    real = adapter_walk.walk_adapter_tensors
    monkeypatch.setattr(
        adapter_walk, "walk_adapter_tensors", lambda m, n: {k: v.clone() for k, v in real(m, n).items()}
    )
    adapter_walk.live_adapter_tensors(model, "default")
    adapter_walk.live_adapter_tensors(model, "default")
    assert walks == ["default", "default"]
