"""The mixed-dtype cases the dtype-patch tests run against the stand-in: bf16 LoRA layers under an fp16 CPU autocast,
through every by-name alias of the kernels and through the autograd functions, each compared with an fp32 reference.

Used in-process by tests/test_dtype_patch.py and inside the throwaway venv of tests/test_preload_install.py (this
directory is on that venv's path, beside the stand-in `unsloth`). Each check returns plain data (JSON-able).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

# Where Unsloth's layout puts a by-name copy of each kernel (Unsloth 2026.3.3, see sidecar/preload/dtype_patch.py); the
# stand-in mirrors it.
ALIASES = {
    "matmul_lora": (
        "unsloth.kernels.utils",
        "unsloth.kernels",
        "unsloth.kernels.fast_lora",
        "unsloth.models.llama",
        "unsloth.models.mistral",
    ),
    "fast_linear_forward": (
        "unsloth.kernels.utils",
        "unsloth.kernels",
        "unsloth.models.llama",
        "unsloth.models.mistral",
    ),
}
HIDDEN, INTER, RANK, SCALE = 32, 48, 4, 2.0
MISMATCH = "must have the same dtype"


def get_lora_parameters(proj: Any) -> tuple[Any, ...]:
    from unsloth.kernels.utils import get_lora_parameters

    return tuple(get_lora_parameters(proj))


def projection(
    in_features: int, out_features: int, seed: int, dtype: torch.dtype = torch.bfloat16, quantized: bool = False
) -> Any:
    """A LoRA layer in `dtype`; `quantized`: its frozen weight 4-bit with a quant_state of `dtype` (a QLoRA layer)."""
    from unsloth.kernels.utils import LoraProjection

    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) / shape[-1] ** 0.5).to(dtype)

    weight = rand(out_features, in_features)
    proj = LoraProjection(weight, rand(RANK, in_features), rand(out_features, RANK), SCALE)
    if quantized:
        packed, proj.dequantized = quantize_4bit(weight)
        proj.base_layer.weight = torch.nn.Parameter(packed, requires_grad=False)
        proj.base_layer.weight.quant_state = packed.quant_state
    return proj


class QuantState:
    """The fields of bitsandbytes' QuantState the kernels read: per-block absmax, the 16-entry code, the block size,
    the original shape and `dtype`, the dtype the weight dequantizes to (the model's, not autocast's)."""

    def __init__(self, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape: torch.Size, dtype: Any):
        self.absmax, self.code, self.blocksize, self.shape, self.dtype = absmax, code, blocksize, shape, dtype


def quantize_4bit(weight: torch.Tensor, blocksize: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, fp32 dequantized values): blockwise absmax 4-bit codes, two per uint8 in a `(numel / 2, 1)` tensor as
    bitsandbytes' Params4bit stores them, `packed.quant_state` in the weight's dtype."""
    code = (torch.arange(16, dtype=torch.float32) - 7.5) / 7.5
    blocks = weight.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(1)
    codes = (blocks / absmax[:, None] * 7.5 + 7.5).round().clamp(0, 15).to(torch.uint8).reshape(-1, 2)
    packed = (codes[:, 0] << 4 | codes[:, 1]).reshape(-1, 1)
    packed.quant_state = QuantState(absmax, code, blocksize, weight.shape, weight.dtype)  # type: ignore[attr-defined]
    dequantized = (code[codes.reshape(-1, blocksize).long()] * absmax[:, None]).reshape(weight.shape)
    return packed, dequantized


def reference(proj: Any, x: torch.Tensor) -> torch.Tensor:
    """fp32 X W^T + s (X A^T) B^T from the layer's own tensors (a quantized layer's weight as it dequantizes)."""
    weight, _, a, b, scaling = get_lora_parameters(proj)
    weight = getattr(proj, "dequantized", weight)
    return x @ weight.float().t() + scaling * (x @ a.float().t()) @ b.float().t()


def rel_err(value: torch.Tensor, expected: torch.Tensor) -> float:
    value, expected = value.detach(), expected.detach()
    return float((value.float() - expected).norm() / expected.norm())


def activation(shape: tuple[int, ...], seed: int = 7) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _attempt(run: Any) -> dict[str, Any]:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return {"error": None, **run()}
    except RuntimeError as error:
        return {"error": str(error)}


def check_aliases() -> dict[str, dict[str, Any]]:
    """Every alias of matmul_lora (prefill) and fast_linear_forward (decode bsz 1 and 4, prefill)."""
    proj = projection(HIDDEN, INTER, seed=1)
    results = {}
    for name, modules in ALIASES.items():
        for module_name in modules:
            function = getattr(importlib.import_module(module_name), name)
            shapes = [(2, 5, HIDDEN)] if name == "matmul_lora" else [(1, 1, HIDDEN), (4, 1, HIDDEN), (2, 5, HIDDEN)]
            for shape in shapes:
                x = activation(shape)

                def run(function: Any = function, x: torch.Tensor = x, name: str = name) -> dict[str, Any]:
                    prefill = name == "matmul_lora"
                    out = function(x, *get_lora_parameters(proj)) if prefill else function(proj, x)
                    return {"dtype": str(out.dtype), "rel_err": rel_err(out, reference(proj, x.float()))}

                results[f"{module_name}.{name}{list(shape)}"] = _attempt(run)
    return results


class _Holder(torch.nn.Module):
    pass


def _mlp(quantized: bool = False) -> Any:
    mlp = _Holder()
    mlp.gate_proj = projection(HIDDEN, INTER, seed=11, quantized=quantized)
    mlp.up_proj = projection(HIDDEN, INTER, seed=12, quantized=quantized)
    mlp.down_proj = projection(INTER, HIDDEN, seed=13, quantized=quantized)
    return mlp


def _attention() -> Any:
    attention = _Holder()
    for index, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
        setattr(attention, name, projection(HIDDEN, HIDDEN, seed=21 + index))
    return attention


def _concatenate(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    # Outside autocast: its `cat` rule rejects bf16 inputs under an fp16 autocast (a torch quirk, not the kernels').
    with torch.autocast("cpu", enabled=False):
        return torch.cat(parts, -1)


def _mlp_reference(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = reference(mlp.gate_proj, x), reference(mlp.up_proj, x)
    return reference(mlp.down_proj, torch.nn.functional.silu(gate) * up)


def check_autograd() -> dict[str, dict[str, Any]]:
    """LoRA_W, LoRA_QKV and LoRA_MLP forward and backward against fp32 autograd of the same math."""
    from unsloth.kernels import fast_lora

    mlp, attention = _mlp(), _attention()
    cases = {
        "LoRA_W": (attention, lambda x: fast_lora.apply_lora_o(attention, x), lambda x: reference(attention.o_proj, x)),
        "LoRA_QKV": (
            attention,
            lambda x: _concatenate(fast_lora.apply_lora_qkv(attention, x)),
            lambda x: torch.cat([reference(getattr(attention, p), x) for p in ("q_proj", "k_proj", "v_proj")], -1),
        ),
        "LoRA_MLP": (mlp, lambda x: fast_lora.apply_lora_mlp_swiglu(mlp, x), lambda x: _mlp_reference(mlp, x)),
    }
    results = {}
    for name, (module, fused, expected) in cases.items():
        for phase_shape in ((2, 5, HIDDEN), (3, 1, HIDDEN)):
            module.zero_grad(set_to_none=True)
            x = activation(phase_shape).requires_grad_()
            x32 = x.detach().float().requires_grad_()
            upstream = activation((*phase_shape[:-1], expected(x32).shape[-1]), seed=3).float()
            (expected(x32) * upstream).sum().backward()
            lora = [p for n, p in module.named_parameters() if "lora" in n and p.grad is not None]
            reference_grads = [x32.grad] + [p.grad.float().clone() for p in lora]
            module.zero_grad(set_to_none=True)

            def run(
                fused: Any = fused, expected: Any = expected, x: torch.Tensor = x, x32: torch.Tensor = x32
            ) -> dict[str, Any]:
                out = fused(x)
                return {"dtype": str(out.dtype), "rel_err": rel_err(out, expected(x32).detach()), "out": out}

            attempt = _attempt(run)
            if attempt["error"] is None:
                out = attempt.pop("out")
                try:
                    (out.float() * upstream).sum().backward()
                    grads = [x.grad] + [p.grad for p in lora]
                    attempt["grad_rel_err"] = max(rel_err(g, r) for g, r in zip(grads, reference_grads, strict=True))
                    attempt["grad_dtype"] = str(x.grad.dtype)
                except RuntimeError as error:
                    attempt["backward_error"] = str(error)
            results[f"{name}[q_len={phase_shape[1]}]"] = attempt
    return results


HEADS, KV_HEADS, CACHED = 4, 2, 6


def _decoder(bsz: int, quantized: bool = False) -> tuple[Any, Any, tuple[torch.Tensor, torch.Tensor]]:
    """An attention holder with Llama's decode attributes, an MLP and a bf16 KV cache of `CACHED` tokens."""
    attention = _Holder()
    head_dim = HIDDEN // HEADS
    attention.n_heads, attention.n_kv_heads, attention.head_dim, attention.hidden_size = (
        HEADS, KV_HEADS, head_dim, HIDDEN
    )  # fmt: skip
    attention.q_proj = projection(HIDDEN, HIDDEN, seed=31, quantized=quantized)
    attention.k_proj = projection(HIDDEN, KV_HEADS * head_dim, seed=32, quantized=quantized)
    attention.v_proj = projection(HIDDEN, KV_HEADS * head_dim, seed=33, quantized=quantized)
    attention.o_proj = projection(HIDDEN, HIDDEN, seed=34, quantized=quantized)
    cache = (activation((bsz, KV_HEADS, CACHED, head_dim), seed=35), activation((bsz, KV_HEADS, CACHED, head_dim), 36))
    return attention, _mlp(quantized), cache


def _attention_reference(attention: Any, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    bsz, groups, head_dim = x.shape[0], HEADS // KV_HEADS, attention.head_dim

    def heads(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.view(bsz, 1, n, head_dim).transpose(1, 2)

    q = heads(reference(attention.q_proj, x), HEADS)
    k = torch.cat([cache[0].float(), heads(reference(attention.k_proj, x), KV_HEADS)], 2)
    v = torch.cat([cache[1].float(), heads(reference(attention.v_proj, x), KV_HEADS)], 2)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    weights = torch.softmax(q @ k.transpose(2, 3) / head_dim**0.5, dim=-1)
    return reference(attention.o_proj, (weights @ v).transpose(1, 2).reshape(bsz, 1, HIDDEN))


def check_decode(batch_sizes: tuple[int, ...] = (1, 2, 4), quantized: bool = False) -> dict[str, dict[str, Any]]:
    """Unsloth's KV-cache decode step (attention, then the MLP with its temp_mlp buffers) on bf16 layers under the
    fp16 autocast, two steps per batch size (the first allocates the buffers), against fp32 references. Also
    whether each projection's result is the caller's buffer (its storage), as without autocast. `quantized`: every
    projection 4-bit (fast_gemv at batch 1, fast_dequantize above)."""
    results = {}
    for bsz in batch_sizes:
        attention, mlp, cache = _decoder(bsz, quantized)
        temp_mlp = torch.empty((2, bsz, 1, INTER), dtype=torch.bfloat16)
        for step in range(2):
            decode = _DecodeStep(attention, mlp, temp_mlp, activation((bsz, 1, HIDDEN), seed=40 + step), cache, step)
            results[f"decode bsz={bsz} step={step}"] = result = _attempt(decode.run)
            if result["error"] is not None:
                break  # a failed first step allocated no buffers: the next one cannot run
            cache = decode.cache
    return results


class _DecodeStep:
    def __init__(self, attention: Any, mlp: Any, temp_mlp: torch.Tensor, x: torch.Tensor, cache: Any, step: int):
        self.attention, self.mlp, self.temp_mlp, self.x, self.cache, self.step = (
            attention,
            mlp,
            temp_mlp,
            x,
            cache,
            step,
        )

    @torch.no_grad()  # as in generate(): the out= kernels refuse tensors that require grad
    def run(self) -> dict[str, Any]:
        from unsloth.models import llama

        past, attention, mlp, temp_mlp = self.cache, self.attention, self.mlp, self.temp_mlp
        out, self.cache = llama.LlamaAttention_fast_forward_inference(attention, self.x, past, self.step == 0)
        down = llama.fast_swiglu_inference(mlp, out, temp_gate=temp_mlp[0], temp_up=temp_mlp[1])
        want = _attention_reference(attention, self.x.float(), past)
        return {
            "dtype": str(out.dtype),
            "mlp_dtype": str(down.dtype),
            "rel_err": max(rel_err(out, want), rel_err(down, _mlp_reference(mlp, out.float()))),
            "in_caller_buffers": out.data_ptr() == attention.temp_O.data_ptr()
            and down.data_ptr() == temp_mlp[1].data_ptr(),
        }
