"""The Unsloth mixed-dtype patch against the CPU stand-in (tests/support/fake_unsloth), with real torch errors.

Found with torch 2.13 on CPU: under `torch.autocast("cpu", dtype=torch.float16)` a bf16 LoRA layer fails in the in-place
`addmm_` exactly as Unsloth's kernels fail on the GPU, so the patch's rule, its aliasing and its autograd coverage are
all checked here; tests/gpu/ repeats the essentials against the real Unsloth 2026.3.3 kernels.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from sidecar.preload import dtype_patch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "support" / "fake_unsloth"
MISMATCH = "must have the same dtype"
# How torch words the unpatched crash depends on the op and the torch version: 2.13's out-of-place matmul and addmm_ say
# MISMATCH; 2.11 (the cp312 build ART 0.5.23 brings) words an in-place addmv_/addmm_ "Bad in-place call: input tensor
# dtype c10::Half and output tensor dtype c10::BFloat16 should match" (either way round: the GPU run measured the
# other order at decode bsz 1) or, for addmv_ into an fp16 result, "expected scalar type BFloat16 but found Half".
_HALVES = r"(c10::)?(Half|BFloat16)"
MISMATCH_IN_PLACE = re.compile(
    rf"Bad in-place call: input tensor dtype {_HALVES} and output tensor dtype {_HALVES}"
    r"|expected scalar type (Half|BFloat16) but found (Half|BFloat16)"
)


def is_dtype_mismatch(error: str | None) -> bool:
    return MISMATCH in (error or "") or MISMATCH_IN_PLACE.search(error or "") is not None


pytestmark = pytest.mark.trainer


@pytest.fixture
def fake() -> Iterator[ModuleType]:
    """`fake_unsloth_cases` with a freshly imported, unpatched stand-in `unsloth`; everything undone afterwards."""
    sys.path.insert(0, str(FAKE))
    importlib.invalidate_caches()
    try:
        cases = importlib.import_module("fake_unsloth_cases")
        importlib.import_module("unsloth")
        yield cases
    finally:
        dtype_patch.unpatch_all()
        sys.path.remove(str(FAKE))
        for name in [name for name in sys.modules if name.startswith("unsloth") or name == "fake_unsloth_cases"]:
            del sys.modules[name]


def patch_now() -> ModuleType:
    utils = sys.modules["unsloth.kernels.utils"]
    dtype_patch.on_unsloth_kernels_utils(utils)
    return utils


def assert_all_match(results: dict[str, dict[str, Any]]) -> None:
    for case, result in results.items():
        assert result["error"] is None, (case, result)
        assert result.get("backward_error") is None, (case, result)
        assert result["dtype"] == "torch.bfloat16", (case, result)
        assert result["rel_err"] <= 1e-2, (case, result)
        assert result.get("grad_rel_err", 0.0) <= 1e-2, (case, result)


def test_common_dtype_prefers_bf16_then_the_output() -> None:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert dtype_patch.common_dtype(fp16, bf16) == bf16
    assert dtype_patch.common_dtype(bf16, fp16, fp16) == bf16
    assert dtype_patch.common_dtype(fp16, fp32) == fp16
    assert dtype_patch.common_dtype(fp32, fp16) == fp32


def test_the_stand_in_fails_like_unsloth_without_the_patch(fake: Any) -> None:
    for results in (fake.check_aliases(), fake.check_autograd()):
        for case, result in results.items():
            assert is_dtype_mismatch(result["error"]), (case, result)


def test_patching_after_import_rebinds_every_alias(fake: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sidecar.preload"):
        utils = patch_now()
    for name, modules in fake.ALIASES.items():
        wrapper = getattr(utils, name)
        assert dtype_patch.is_patched(wrapper)
        for module_name in modules:
            assert getattr(sys.modules[module_name], name) is wrapper, module_name
    assert_all_match(fake.check_aliases())
    active = [r.getMessage() for r in caplog.records if "mixed-dtype patch active" in r.getMessage()]
    assert len(active) <= 1  # once per process: an earlier test may already have logged it
    assert all("0+fake" in message and "by-name aliases rebound" in message for message in active)


def test_autograd_functions_forward_and_backward_match_fp32(fake: Any) -> None:
    patch_now()
    assert_all_match(fake.check_autograd())


def test_the_backward_needs_the_autograd_functions_patched_too(fake: Any) -> None:
    patch_now()
    fast_lora = sys.modules["unsloth.kernels.fast_lora"]
    for name in dtype_patch.AUTOGRAD_FUNCTIONS:
        cls = getattr(fast_lora, name)
        cls.forward = staticmethod(getattr(cls.forward, dtype_patch.ORIGINAL_ATTR))
    for case, result in fake.check_autograd().items():
        assert result["error"] is None, case  # the forward only needs the kernels patched...
        assert MISMATCH in result["backward_error"], case  # ...but custom_bwd replays the fp16 autocast


def test_matching_dtypes_reach_the_original_untouched() -> None:
    calls: list[tuple[Any, bool]] = []

    def matmul_lora(X: Any, W: Any, W_quant: Any, A: Any, B: Any, s: float, out: Any = None) -> Any:
        calls.append((X, torch.is_autocast_enabled("cpu")))
        return X

    utils = ModuleType("unsloth.kernels.utils")
    utils.matmul_lora = matmul_lora  # type: ignore[attr-defined]
    try:
        dtype_patch.on_unsloth_kernels_utils(utils)
        patched = utils.matmul_lora  # type: ignore[attr-defined]
        x, w = torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(3, 4, dtype=torch.bfloat16)
        patched(x, w, None, None, None, 1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            patched(x, w, None, None, None, 1.0)
        with torch.autocast("cpu", dtype=torch.float16):
            patched(X=x, W=w, W_quant=None, A=None, B=None, s=1.0)
            assert torch.is_autocast_enabled("cpu")  # switched back on after the call
        assert [(arg is x, autocast) for arg, autocast in calls] == [(True, False), (True, True), (True, False)]
    finally:
        dtype_patch.unpatch_all()


def test_an_fp32_model_keeps_autocast_and_gets_its_dtype(fake: Any) -> None:
    proj = fake.projection(fake.HIDDEN, fake.INTER, seed=5, dtype=torch.float32)
    x = fake.activation((2, 5, fake.HIDDEN)).float()
    utils = sys.modules["unsloth.kernels.utils"]
    args = fake.get_lora_parameters(proj)
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match="Half and Float"):
        utils.matmul_lora(x, *args)
    patch_now()
    with torch.autocast("cpu", dtype=torch.float16):
        out = utils.matmul_lora(x, *args)
    assert out.dtype == torch.float16  # what autocast gives any Linear of an fp32 model
    assert fake.rel_err(out, fake.reference(proj, x)) <= 1e-2


OUT_MISMATCH = "Expected out tensor to have dtype c10::Half, but got c10::BFloat16 instead"


def test_the_stand_in_decode_fails_like_unsloth_at_batch_above_one(fake: Any) -> None:
    """Issue 11's call: Unsloth's decode attention hands o_proj the fp16 SDPA output (batch > 1) with
    `out=self.temp_O`, preallocated in the model's dtype; `torch.matmul(..., out=)` takes no autocast."""
    decode = fake.check_decode()
    assert MISMATCH in decode["decode bsz=2 step=0"]["error"], decode  # q_proj's addmm_ fails first
    llama = sys.modules["unsloth.models.llama"]
    proj = fake.projection(fake.HIDDEN, fake.HIDDEN, seed=3)
    temp_o = torch.empty(2, 1, fake.HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError) as raised:
        llama.fast_linear_forward(proj, fake.activation((2, 1, fake.HIDDEN)).half(), out=temp_o)
    assert str(raised.value) == OUT_MISMATCH


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "4bit"])
def test_kv_cache_decode_at_every_batch_size_writes_the_callers_buffers(fake: Any, quantized: bool) -> None:
    """Before issue 11's fix, batch 2 and 4 raised OUT_MISMATCH here (the wrapper saw X == autocast's dtype).
    4bit: every projection quantized (fast_gemv at batch 1, fast_dequantize above)."""
    for case, result in fake.check_decode((1, 2), quantized=quantized).items():
        assert result["error"] is not None, (case, result)  # unpatched: the first step fails
    patch_now()
    decode = fake.check_decode((1, 2, 4), quantized=quantized)
    assert len(decode) == 6, decode
    for case, result in decode.items():
        assert result["error"] is None, (case, result)
        assert result["dtype"] == result["mlp_dtype"] == "torch.bfloat16", (case, result)
        assert result["rel_err"] <= 1e-2, (case, result)
        assert result["in_caller_buffers"], (case, result)


def test_decode_buffers_of_another_dtype_receive_the_result(fake: Any) -> None:
    utils = patch_now()
    proj = fake.projection(fake.HIDDEN, fake.INTER, seed=6)
    for bsz in (1, 3):
        x = fake.activation((bsz, 1, fake.HIDDEN))
        buffer = torch.zeros(bsz, 1, fake.INTER, dtype=torch.float16)
        scratch = torch.zeros(bsz, fake.RANK, dtype=torch.float16) if bsz > 1 else torch.zeros(fake.RANK)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            out = utils.fast_linear_forward(proj, x, temp_lora=scratch.half(), out=buffer)
        assert out.dtype == torch.float16 and out.data_ptr() == buffer.data_ptr() and out.shape == buffer.shape
        assert fake.rel_err(out, fake.reference(proj, x.float())) <= 1e-2


def test_out_buffers_of_matmul_lora_are_reconciled(fake: Any) -> None:
    utils = patch_now()
    proj = fake.projection(fake.HIDDEN, fake.INTER, seed=7)
    x = fake.activation((2, 5, fake.HIDDEN))
    for x_dtype, buffer_dtype in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)):
        buffer = torch.zeros(10, fake.INTER, dtype=buffer_dtype)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            out = utils.matmul_lora(x.to(x_dtype), *fake.get_lora_parameters(proj), out=buffer)
        assert out.dtype == buffer_dtype and out.data_ptr() == buffer.data_ptr() and out.shape == (2, 5, fake.INTER)
        assert fake.rel_err(out, fake.reference(proj, x.float())) <= 1e-2


def test_a_buffer_the_kernel_ignores_is_left_alone(fake: Any) -> None:
    """fast_linear_forward's prefill (q_len > 1) ignores `out`; the wrapper does not write it either."""
    utils = patch_now()
    proj = fake.projection(fake.HIDDEN, fake.INTER, seed=8)
    x = fake.activation((2, 5, fake.HIDDEN)).half()
    buffer = torch.zeros(2, 1, fake.INTER, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = utils.fast_linear_forward(proj, x, out=buffer)
    assert out.shape == (2, 5, fake.INTER) and out.dtype == torch.bfloat16 and not buffer.any()


def test_the_inplace_helper_reconciles_operands_and_keeps_out(fake: Any) -> None:
    utils = sys.modules["unsloth.kernels.utils"]
    a, b = fake.activation((4, 8), seed=1), fake.activation((8, 3), seed=2)
    out = torch.zeros(4, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=MISMATCH):
        utils.addmm_(out, a, b)
    patch_now()
    same = torch.zeros(4, 3, dtype=torch.bfloat16)
    assert utils.addmm_(same, a, b, alpha=2.0) is same
    assert utils.addmm_(out, a, b, alpha=2.0) is out and out.dtype == torch.float16
    expected = 2.0 * a.float() @ b.float()
    assert fake.rel_err(out, expected) <= 1e-2 and fake.rel_err(same, expected) <= 1e-2


def test_patching_twice_wraps_once(fake: Any) -> None:
    utils = patch_now()
    wrapper = utils.matmul_lora
    patch_now()
    assert utils.matmul_lora is wrapper
    assert not dtype_patch.is_patched(getattr(wrapper, dtype_patch.ORIGINAL_ATTR))
    forward = sys.modules["unsloth.kernels.fast_lora"].LoRA_W.__dict__["forward"]
    assert not dtype_patch.is_patched(getattr(forward.__func__, dtype_patch.ORIGINAL_ATTR))


def test_off_with_the_environment_variable(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dtype_patch.DISABLE_ENV, "0")
    utils = patch_now()
    assert not dtype_patch.is_patched(utils.matmul_lora)
    assert not dtype_patch.is_patched(sys.modules["unsloth.kernels.fast_lora"].LoRA_MLP.forward)


def test_a_version_without_the_functions_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    utils = ModuleType("unsloth.kernels.utils")
    with caplog.at_level(logging.INFO, logger="sidecar.preload"):
        dtype_patch.on_unsloth_kernels_utils(utils)
    assert vars(utils).keys() == {"__name__", "__doc__", "__package__", "__loader__", "__spec__"}
    assert any("mixed-dtype patch not applied" in record.getMessage() for record in caplog.records)


def test_suspended_puts_the_originals_back_for_the_block(fake: Any) -> None:
    utils = patch_now()
    wrapper = utils.matmul_lora
    with dtype_patch.suspended():
        assert not dtype_patch.is_patched(utils.matmul_lora)
        assert not dtype_patch.is_patched(sys.modules["unsloth.models.mistral"].fast_linear_forward)
        assert MISMATCH in fake.check_autograd()["LoRA_W[q_len=5]"]["error"]
    assert utils.matmul_lora is wrapper


def test_traceable_by_torch_compile(fake: Any) -> None:
    utils = patch_now()
    fast_lora = sys.modules["unsloth.kernels.fast_lora"]
    proj = fake.projection(fake.HIDDEN, fake.HIDDEN, seed=8)
    attention = fake._attention()

    def layer(x: Any) -> Any:
        y = utils.matmul_lora(x, *fake.get_lora_parameters(proj))
        return fast_lora.apply_lora_o(attention, y)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break fails
    x = fake.activation((2, 5, fake.HIDDEN)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        out = compiled(x)
        expected = layer(x.detach())
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad is not None and x.grad.dtype == torch.bfloat16
    assert fake.rel_err(out, expected) <= 1e-2
    assert compiled(x).dtype == torch.bfloat16  # and without autocast


def test_patch_before_import_through_the_bootstrap(tmp_path: Path) -> None:
    """A real child interpreter: the bootstrap arms the hook, then `import unsloth` gets patched kernels from the start
    (no alias needed rebinding), and FORK_SIDECAR_DTYPE_PATCH=0 leaves the stand-in failing."""
    code = (
        "import json, sys\n"
        "import sidecar.preload.bootstrap\n"
        "import unsloth, fake_unsloth_cases as cases\n"
        "from sidecar.preload import dtype_patch\n"
        "with dtype_patch.suspended():\n"
        "    originals = cases.check_aliases()\n"
        "patched = dtype_patch.is_patched(unsloth.models.llama.matmul_lora)\n"
        "print(json.dumps({'patched': patched, 'originals': originals,\n"
        "                  'aliases': cases.check_aliases(), 'autograd': cases.check_autograd()}))\n"
    )
    environ = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{FAKE}"}
    for disabled in (False, True):
        env = {**environ, dtype_patch.DISABLE_ENV: "0"} if disabled else environ
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if disabled:
            assert result["patched"] is False
            assert all(is_dtype_mismatch(case["error"]) for case in result["aliases"].values())
            assert done.stderr.count("mixed-dtype patch off (FORK_SIDECAR_DTYPE_PATCH=0)") == 1
        else:
            assert result["patched"] is True
            assert_all_match(result["aliases"])
            assert_all_match(result["autograd"])
            assert done.stderr.count("mixed-dtype patch active") == 1
            assert "rebound" not in done.stderr  # patched before any other module imported the names
            # suspended() also reaches the aliases that were bound to the wrappers by those imports
            assert all(is_dtype_mismatch(case["error"]) for case in result["originals"].values())


# The quantized path: a 4-bit weight with a bitsandbytes-style quant_state (tests/support/fake_unsloth). Unsloth
# 2026.3.3 dequantizes it to quant_state.dtype for prefill and decode at batch > 1 (`fast_dequantize`), and at batch 1
# hands X, the packed weight and `out` to bitsandbytes' gemv through raw pointers (`fast_gemv`).
OUT_MISMATCH_BF16 = "Expected out tensor to have dtype c10::BFloat16, but got c10::Half instead"
GEMV_MISMATCH = "expected m1 and m2 to have the same dtype, but got: c10::Half != c10::BFloat16"


def quantized_case(fake: Any, bsz: int, q_len: int, x_dtype: Any, buffer_dtype: Any = None) -> tuple[Any, ...]:
    proj = fake.projection(fake.HIDDEN, fake.INTER, seed=9, quantized=True)
    x = fake.activation((bsz, q_len, fake.HIDDEN), seed=bsz).to(x_dtype)
    buffer = None if buffer_dtype is None else torch.zeros(bsz, q_len, fake.INTER, dtype=buffer_dtype)
    return proj, x, buffer


def quantized_call(fake: Any, proj: Any, x: Any, buffer: Any) -> Any:
    utils = sys.modules["unsloth.kernels.utils"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        if x.shape[1] != 1:
            out = None if buffer is None else buffer.view(-1, buffer.shape[-1])
            return utils.matmul_lora(x, *fake.get_lora_parameters(proj), out=out)
        return utils.fast_linear_forward(proj, x, out=buffer)


QUANTIZED_CASES = [
    pytest.param(bsz, q_len, x_dtype, buffer_dtype, id=f"{phase}-x_{x_name}-out_{out_name}")
    for phase, bsz, q_len in (("prefill", 2, 5), ("decode_bsz1", 1, 1), ("decode_bsz3", 3, 1))
    for x_name, x_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))
    for out_name, buffer_dtype in (("none", None), ("bf16", torch.bfloat16), ("fp16", torch.float16))
]


def test_the_quantized_stand_in_dequantizes_to_the_quant_state_dtype(fake: Any) -> None:
    utils = sys.modules["unsloth.kernels.utils"]
    proj = fake.projection(fake.HIDDEN, fake.INTER, seed=9, quantized=True)
    packed, quant_state = fake.get_lora_parameters(proj)[:2]
    assert packed.dtype == torch.uint8 and packed.shape == (fake.HIDDEN * fake.INTER // 2, 1)
    with torch.autocast("cpu", dtype=torch.float16):
        weight = utils.fast_dequantize(packed, quant_state)
        transposed = utils.fast_dequantize(packed.t(), quant_state)
    assert weight.dtype == transposed.dtype == torch.bfloat16 and weight.shape == (fake.INTER, fake.HIDDEN)
    assert torch.equal(transposed, weight.t())
    assert fake.rel_err(weight, proj.dequantized) <= 1e-2
    # bitsandbytes' gemv takes no autocast and no cast: X, weight and out share the dequantized dtype or it fails
    x = fake.activation((1, 1, fake.HIDDEN))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert utils.fast_gemv(x, packed, quant_state).dtype == torch.bfloat16
        with pytest.raises(RuntimeError) as raised:
            utils.fast_gemv(x.half(), packed, quant_state)  # its own out is allocated in the dequantized dtype
        assert str(raised.value) == OUT_MISMATCH
        with pytest.raises(RuntimeError) as raised:
            utils.fast_gemv(x.half(), packed, quant_state, out=torch.empty(1, 1, fake.INTER, dtype=torch.float16))
        assert str(raised.value) == GEMV_MISMATCH
        with pytest.raises(RuntimeError) as raised:
            utils.fast_gemv(x, packed, quant_state, out=torch.empty(1, 1, fake.INTER, dtype=torch.float16))
        assert str(raised.value) == OUT_MISMATCH_BF16


@pytest.mark.parametrize(("bsz", "q_len", "x_dtype", "buffer_dtype"), QUANTIZED_CASES)
def test_quantized_calls_under_an_fp16_autocast(
    fake: Any, bsz: int, q_len: int, x_dtype: Any, buffer_dtype: Any
) -> None:
    """Unpatched, every mixed quantized call raises (in the LoRA addmm_/addmv_, the out= matmul or the gemv);
    patched it matches fp32, and a caller's buffer holds the result in its own dtype."""
    proj, x, buffer = quantized_case(fake, bsz, q_len, x_dtype, buffer_dtype)
    if x_dtype == torch.float16 and buffer is None and bsz * q_len > 1:
        # fp16 X, nothing preallocated, no gemv: every operand is autocast's fp16 and Unsloth computes in it
        assert quantized_call(fake, proj, x, buffer).dtype == torch.float16
    else:
        with pytest.raises(RuntimeError) as raised:
            quantized_call(fake, proj, x, buffer)
        error = str(raised.value)
        assert is_dtype_mismatch(error) or error in (OUT_MISMATCH, OUT_MISMATCH_BF16, GEMV_MISMATCH), error
    patch_now()
    proj, x, buffer = quantized_case(fake, bsz, q_len, x_dtype, buffer_dtype)  # fresh: no stale _fast_lora copy
    out = quantized_call(fake, proj, x, buffer)
    assert out.shape == (bsz, q_len, fake.INTER)
    assert fake.rel_err(out, fake.reference(proj, x.float())) <= 1e-2
    if buffer is None:
        assert out.dtype == torch.bfloat16  # the dequantized dtype, as Unsloth computes without autocast
    else:
        assert out.dtype == buffer.dtype and out.data_ptr() == buffer.data_ptr()
        assert fake.rel_err(buffer, fake.reference(proj, x.float())) <= 1e-2


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_same_dtype_quantized_calls_reach_the_original_untouched(fake: Any, autocast_dtype: Any) -> None:
    """No autocast, or a bf16 one on a bf16 QLoRA layer: the original gets the caller's very tensors, autocast as is."""
    utils = sys.modules["unsloth.kernels.utils"]
    seen: list[tuple[tuple[Any, ...], dict[str, Any], bool]] = []

    def spy_on(original: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            seen.append((args, kwargs, torch.is_autocast_enabled("cpu")))
            return original(*args, **kwargs)

        return spy

    for name in dtype_patch.KERNEL_FUNCTIONS:
        setattr(utils, name, spy_on(getattr(utils, name)))  # before patching: the wrapper's original is the spy
    patch_now()
    enabled = autocast_dtype is not None
    for bsz, q_len in ((2, 5), (1, 1), (3, 1)):
        proj, x, buffer = quantized_case(fake, bsz, q_len, torch.bfloat16, torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
            if q_len != 1:
                flat = buffer.view(-1, fake.INTER)
                out = utils.matmul_lora(x, *fake.get_lora_parameters(proj), out=flat)
                assert seen[-1][0][0] is x and seen[-1][1]["out"] is flat
            else:
                out = utils.fast_linear_forward(proj, x, out=buffer)
                args, kwargs, _ = seen[-1]
                assert args[0] is proj and args[1] is x and kwargs["out"] is buffer
        assert seen[-1][2] is enabled
        assert out.data_ptr() == buffer.data_ptr() and out.dtype == torch.bfloat16
        assert fake.rel_err(out, fake.reference(proj, x.float())) <= 1e-2
