"""The mixed-dtype patch against the real Unsloth kernels on a GPU (`pytest -m gpu`; skipped without CUDA or Unsloth).

The checks themselves live in bench/gpu_dtype.py (which also prints the table and benchmarks); here each one is an
assertion. Sizes are smaller than the benchmark's so the module runs in well under a minute after `import unsloth`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if importlib.util.find_spec("unsloth") is None:
    pytest.skip("needs Unsloth (see bench/gpu_dtype.py for the wheel set)", allow_module_level=True)

from bench import gpu_dtype  # noqa: E402

HIDDEN, INTER, RANK = 1024, 2816, 16


@pytest.fixture(scope="module")
def ctx() -> gpu_dtype.Context:
    return gpu_dtype.setup()


def failing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if not row["pass"]]


def test_every_by_name_alias_is_the_patched_kernel(ctx: gpu_dtype.Context) -> None:
    report = gpu_dtype.alias_report(ctx)
    assert report["holders"], report
    assert not [key for key in report["holders"] if "ORIGINAL" in key], report
    assert all(report["autograd_forward_patched"].values()), report
    # Armed before Unsloth's import: every alias got the wrapper by importing it, none needed rebinding.
    assert report["changes_outside_utils"] == ["forward"] * len(ctx.dtype_patch.AUTOGRAD_FUNCTIONS), report


def assert_crash_reproduced(ctx: gpu_dtype.Context, rows: list[dict[str, Any]]) -> None:
    """On the tested version (ART's pin) every original must fail; newer releases may have fixed some paths."""
    if gpu_dtype.crash_expected(ctx):
        assert all(row["crash reproduced"] for row in rows), rows


def test_kernels_raise_unpatched_and_match_fp32_patched(ctx: gpu_dtype.Context) -> None:
    rows = gpu_dtype.check_kernels(ctx, HIDDEN, RANK)
    assert not failing(rows), rows
    assert_crash_reproduced(ctx, rows)


def test_autograd_functions_forward_and_backward(ctx: gpu_dtype.Context) -> None:
    rows = gpu_dtype.check_autograd(ctx, HIDDEN, INTER, RANK)
    assert not failing(rows), rows
    assert_crash_reproduced(ctx, rows)


def test_a_lora_training_loop_runs_under_fp16_autocast(ctx: gpu_dtype.Context) -> None:
    result = gpu_dtype.train_direct(ctx, steps=8)
    assert result["pass"], result
    assert_crash_reproduced(ctx, [result])


def test_the_patched_kernel_compiles(ctx: gpu_dtype.Context) -> None:
    layers = gpu_dtype.lora_layers(ctx, {"proj": (HIDDEN, HIDDEN)}, RANK, seed=3, lora_dtype=torch.bfloat16)
    params = ctx.utils.get_lora_parameters(layers.proj)
    x = gpu_dtype.activation(ctx, (2, 64, HIDDEN), seed=4)

    def layer(x: Any) -> Any:
        return ctx.utils.matmul_lora(x, *params)

    compiled = torch.compile(layer, backend="aot_eager")
    with torch.autocast("cuda", dtype=torch.float16):
        got, expected = compiled(x), layer(x)
    assert got.dtype == torch.bfloat16
    assert gpu_dtype.rel_err(got, expected) <= 1e-2


def test_fast_language_model_decode_with_kv_cache_under_fp16_autocast(ctx: gpu_dtype.Context) -> None:
    """Issue 11: prefill + KV-cache decode at batch 1, 2, 4 and a training step through FastLanguageModel, patched,
    as close to fp32 as Unsloth's own bf16 path without autocast."""
    from bench import gpu_dtype_model

    rows = gpu_dtype_model.check_paths(gpu_dtype_model.Bench())
    patched = {(row["path"], row["autocast"]): row for row in rows if row["patched"]}
    assert all(row["outcome"] == "ok" for row in patched.values()), rows
    for (path, autocast), row in patched.items():
        if autocast == "fp16":
            baseline = patched[(path, "none")]
            for key in (k for k in row if "rel_err" in k):
                assert row[key] <= baseline[key] + 2e-2, (path, key, row, baseline)
