"""The Unsloth mixed-dtype patch against the CPU stand-in (tests/support/fake_unsloth), with real torch errors.

DESIGN.md: under `torch.autocast("cpu", dtype=torch.float16)` a bf16 LoRA layer fails in the in-place `addmm_`
exactly as Unsloth's kernels fail on the GPU, so the patch's rule, its aliasing and its autograd coverage are all
checked here; tests/gpu/ repeats the essentials against the real Unsloth 2026.3.3 kernels.
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
# dtype c10::Half and output tensor dtype c10::BFloat16 should match".
MISMATCH_IN_PLACE = re.compile(
    r"Bad in-place call: input tensor dtype (c10::)?Half and output tensor dtype (c10::)?BFloat16"
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


def test_kv_cache_decode_at_every_batch_size_writes_the_callers_buffers(fake: Any) -> None:
    """Before issue 11's fix, batch 2 and 4 raised OUT_MISMATCH here (the wrapper saw X == autocast's dtype)."""
    patch_now()
    decode = fake.check_decode((1, 2, 4))
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
