"""Proof and cost of the Unsloth mixed-dtype patch (issue 5) on a GPU, in one run:

    python3 -m bench.gpu_dtype [--json PATH] [--quick]        (from the repo root)

1. kernels: `matmul_lora` (prefill) and `fast_linear_forward` (decode bsz 1 and 4, prefill) on a bf16 LoRA layer
   under `torch.autocast(dtype=float16)`: Unsloth's originals raise (column "crash reproduced"; newer releases fixed
   some paths), the patched ones match an fp32 reference (column "pass"); plus issue 11's call, o_proj in
   Unsloth's decode attention: an fp16 activation with a bf16 `out=` buffer (patched: the result is in that buffer);
2. autograd: `LoRA_MLP`, `LoRA_QKV`, `LoRA_W` forward and backward, prefill (q_len > 1) and q_len == 1, with the
   originals, with only the kernels patched (does the backward still fail?) and fully patched, against fp32 autograd;
3. training: a tiny Llama trained a few steps under the fp16 autocast, (a) through FastLanguageModel
   (Unsloth's own fast path: from_pretrained on a locally built model, get_peft_model) in a child process and
   (b) directly: a transformers Llama + PEFT whose MLPs run `apply_lora_mlp_swiglu` and whose q/k/v/o run `LoRA_W`;
4. benchmark (hidden 4096, r 16, tokens 4096 and 1): unpatched vs patched on same-dtype inputs, and patched mixed
   (fp16 autocast around bf16) vs unpatched same-dtype; `triton.testing.do_bench` medians, plus host time per call.

The patch comes from the installed preload (`fork-sidecar preload install`; its `.pth` arms it at interpreter
start); without it this script imports the bootstrap itself before Unsloth, which arms the same hooks. Unpatched
baselines run inside `dtype_patch.suspended()`, in the same process. Without CUDA it runs on CPU against whatever
`unsloth` is importable (tests put the stand-in from tests/support/fake_unsloth there), at small sizes, no benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-2
TARGET_SAME, TARGET_MIXED = 1.02, 1.10


@dataclass
class Context:
    torch: Any
    device: str
    utils: Any
    fast_lora: Any
    dtype_patch: Any
    unsloth_version: str
    armed_by: str


def setup() -> Context:
    """Arm the preload (unless its .pth already did), import Unsloth, check the patch is in place."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    armed = any(getattr(f, "fork_sidecar_post_import_finder", False) for f in sys.meta_path)
    if not armed:
        sys.path.insert(0, str(REPO))
        import sidecar.preload.bootstrap  # same hooks the .pth line arms
    import unsloth  # noqa: F401
    from unsloth.kernels import fast_lora, utils

    import sidecar
    from sidecar.preload import dtype_patch

    how = f".pth preload ({Path(sidecar.__file__).parent.parent})" if armed else "bootstrap imported by this script"
    return Context(
        torch=torch,
        device="cuda" if torch.cuda.is_available() else "cpu",
        utils=utils,
        fast_lora=fast_lora,
        dtype_patch=dtype_patch,
        unsloth_version=dtype_patch.unsloth_version(),
        armed_by=how,
    )


def alias_report(ctx: Context) -> dict[str, Any]:
    """Which `unsloth*` modules hold which kernel, and whether each is the patched one."""
    holders: dict[str, list[str]] = {}
    for module_name, module in sorted(sys.modules.items()):
        if not module_name.startswith("unsloth") or module is None:
            continue
        for name in ctx.dtype_patch.KERNEL_FUNCTIONS:
            value = getattr(module, name, None)
            if value is not None:
                state = "patched" if ctx.dtype_patch.is_patched(value) else "ORIGINAL"
                holders.setdefault(f"{name} ({state})", []).append(module_name)
    forwards = {
        name: ctx.dtype_patch.is_patched(getattr(ctx.fast_lora, name).__dict__["forward"])
        for name in ctx.dtype_patch.AUTOGRAD_FUNCTIONS
    }
    rebound = [c.name for c in ctx.dtype_patch._changes if getattr(c.owner, "__name__", "") != ctx.utils.__name__]
    return {"holders": holders, "autograd_forward_patched": forwards, "changes_outside_utils": rebound}


# --- LoRA layers (PEFT) and fp32 references ---------------------------------------------------------------------


class _Holder:
    pass


def lora_layers(ctx: Context, shapes: dict[str, tuple[int, int]], rank: int, seed: int, lora_dtype: Any) -> Any:
    """A module whose children are PEFT lora.Linear layers: bf16 base weights, random A and B in `lora_dtype`."""
    import peft

    torch = ctx.torch
    generator = torch.Generator().manual_seed(seed)
    module = torch.nn.Module()
    for name, (in_features, out_features) in shapes.items():
        linear = torch.nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
        setattr(module, name, linear)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(shapes), lora_dropout=0.0, bias="none")
    module = peft.inject_adapter_in_model(config, module)
    module.to(device=ctx.device, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_" in name:
                fan_in = parameter.shape[1]
                values = torch.randn(parameter.shape, generator=generator) / fan_in**0.5
                parameter.data = values.to(device=ctx.device, dtype=lora_dtype)
    return module


def reference(ctx: Context, proj: Any, x: Any) -> Any:
    weight, _, a, b, scaling = ctx.utils.get_lora_parameters(proj)
    return x @ weight.float().t() + scaling * (x @ a.float().t()) @ b.float().t()


def rel_err(value: Any, expected: Any) -> float:
    value, expected = value.detach().float(), expected.detach().float()
    return float((value - expected).norm() / expected.norm())


def activation(ctx: Context, shape: tuple[int, ...], seed: int) -> Any:
    torch = ctx.torch
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(ctx.device, torch.bfloat16)


@contextmanager
def fp16_autocast(ctx: Context) -> Iterator[None]:
    with ctx.torch.autocast(ctx.device, dtype=ctx.torch.float16):
        yield


def outcome(run: Callable[[], Any]) -> tuple[Any, str]:
    try:
        return run(), "ok"
    except RuntimeError as error:
        return None, "raises: " + str(error).splitlines()[0][:70]


# --- 1. kernels --------------------------------------------------------------------------------------------------


def check_kernels(ctx: Context, hidden: int, rank: int) -> list[dict[str, Any]]:
    layers = lora_layers(ctx, {"proj": (hidden, hidden + 256)}, rank, seed=1, lora_dtype=ctx.torch.float32)
    proj = layers.proj
    cases = [
        ("matmul_lora prefill [2x128]", "matmul_lora", (2, 128, hidden)),
        ("fast_linear_forward decode bsz=1", "fast_linear_forward", (1, 1, hidden)),
        ("fast_linear_forward decode bsz=4", "fast_linear_forward", (4, 1, hidden)),
        ("fast_linear_forward prefill [2x64]", "fast_linear_forward", (2, 64, hidden)),
    ]
    # The call issue 11 found failing: Unsloth's decode attention hands o_proj the fp16 output of SDPA (batch > 1)
    # together with `out=self.temp_O`, preallocated in the model's dtype.
    cases += [
        (f"o_proj-like decode bsz={n}: fp16 X, bf16 out=", "fast_linear_forward", (n, 1, hidden)) for n in (1, 2, 4)
    ]
    rows = []
    for label, name, shape in cases:
        x = activation(ctx, shape, seed=2)
        buffer = None
        if "out=" in label:
            x = x.half()
            buffer = ctx.torch.empty((shape[0], 1, hidden + 256), dtype=ctx.torch.bfloat16, device=ctx.device)

        def run(name: str = name, x: Any = x, buffer: Any = buffer) -> Any:
            function = getattr(ctx.utils, name)
            with fp16_autocast(ctx), ctx.torch.inference_mode():
                if name == "matmul_lora":
                    return function(x, *ctx.utils.get_lora_parameters(proj))
                return function(proj, x) if buffer is None else function(proj, x, out=buffer)

        with ctx.dtype_patch.suspended():
            _, unpatched = outcome(run)
        out, patched = outcome(run)
        row: dict[str, Any] = {"case": label, "unpatched": unpatched, "patched": patched}
        if out is not None:
            row.update(
                dtype=str(out.dtype).replace("torch.", ""), rel_err=rel_err(out, reference(ctx, proj, x.float()))
            )
        row["crash reproduced"] = unpatched.startswith("raises")
        row["pass"] = patched == "ok" and row.get("rel_err", 1.0) <= TOLERANCE
        if buffer is not None and out is not None:
            row["result in out="] = out.data_ptr() == buffer.data_ptr() and out.dtype == buffer.dtype
            row["pass"] = row["pass"] and row["result in out="]
        rows.append(row)
    return rows


# --- 2. autograd functions ---------------------------------------------------------------------------------------


def _concatenate(ctx: Context, parts: Any) -> Any:
    if isinstance(parts, tuple):
        with ctx.torch.autocast(ctx.device, enabled=False):
            return ctx.torch.cat(parts, -1)
    return parts


def _autograd_cases(
    ctx: Context, hidden: int, inter: int, rank: int
) -> dict[str, tuple[Any, Callable[[Any], Any], Callable[[Any], Any]]]:
    torch, fast_lora = ctx.torch, ctx.fast_lora
    fp32 = torch.float32
    mlp = lora_layers(
        ctx, {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}, rank, 11, fp32
    )
    mlp.act_fn = torch.nn.SiLU()  # Unsloth 2026.10 falls back to the module's own forward under a mixed autocast
    shapes = {name: (hidden, hidden) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    attention = lora_layers(ctx, shapes, rank, 21, fp32)

    def mlp_reference(x: Any) -> Any:
        gate, up = reference(ctx, mlp.gate_proj, x), reference(ctx, mlp.up_proj, x)
        return reference(ctx, mlp.down_proj, torch.nn.functional.silu(gate) * up)

    return {
        "LoRA_MLP": (mlp, lambda x: fast_lora.apply_lora_mlp_swiglu(mlp, x), mlp_reference),
        "LoRA_QKV": (
            attention,
            lambda x: fast_lora.apply_lora_qkv(attention, x),
            lambda x: torch.cat([reference(ctx, getattr(attention, p), x) for p in ("q_proj", "k_proj", "v_proj")], -1),
        ),
        "LoRA_W": (
            attention,
            lambda x: fast_lora.apply_lora_o(attention, x),
            lambda x: reference(ctx, attention.o_proj, x),
        ),
    }


@contextmanager
def kernels_only(ctx: Context) -> Iterator[None]:
    """The kernels patched but the autograd functions' forward original: does the backward still fail?"""
    saved = {}
    for name in ctx.dtype_patch.AUTOGRAD_FUNCTIONS:
        cls = getattr(ctx.fast_lora, name)
        saved[name] = cls.__dict__["forward"]
        cls.forward = staticmethod(getattr(saved[name].__func__, ctx.dtype_patch.ORIGINAL_ATTR))
    try:
        yield
    finally:
        for name, forward in saved.items():
            getattr(ctx.fast_lora, name).forward = forward


def _forward_backward(
    ctx: Context, module: Any, fused: Callable[[Any], Any], x: Any, upstream: Any
) -> tuple[Any, str, str]:
    module.zero_grad(set_to_none=True)
    x.grad = None
    out, forward = outcome(lambda: _concatenate(ctx, _run_fp16(ctx, fused, x)))
    if out is None:
        return None, forward, "-"
    _, backward = outcome(lambda: (out.float() * upstream).sum().backward())
    return out, forward, backward


def _run_fp16(ctx: Context, fused: Callable[[Any], Any], x: Any) -> Any:
    with fp16_autocast(ctx):
        return fused(x)


def check_autograd(ctx: Context, hidden: int, inter: int, rank: int) -> list[dict[str, Any]]:
    rows = []
    for name, (module, fused, expected) in _autograd_cases(ctx, hidden, inter, rank).items():
        for phase, shape in (("prefill 2x128", (2, 128, hidden)), ("q_len=1 bsz=4", (4, 1, hidden))):
            x = activation(ctx, shape, seed=3).requires_grad_()
            x32 = x.detach().float().requires_grad_()
            module.zero_grad(set_to_none=True)
            want = expected(x32)
            upstream = ctx.torch.randn(want.shape, generator=ctx.torch.Generator().manual_seed(4)).to(ctx.device)
            (want * upstream).sum().backward()
            lora = [p for n, p in module.named_parameters() if "lora_" in n and p.grad is not None]
            want_grads = [x32.grad] + [p.grad.clone() for p in lora]

            with ctx.dtype_patch.suspended():
                _, unpatched_fwd, _ = _forward_backward(ctx, module, fused, x, upstream)
            with kernels_only(ctx):
                _, kernels_fwd, kernels_bwd = _forward_backward(ctx, module, fused, x, upstream)
            out, patched_fwd, patched_bwd = _forward_backward(ctx, module, fused, x, upstream)
            row: dict[str, Any] = {
                "case": f"{name} {phase}",
                "unpatched": unpatched_fwd,
                "kernels only": f"fwd {kernels_fwd}; bwd {kernels_bwd}",
                "patched": f"fwd {patched_fwd}; bwd {patched_bwd}",
            }
            if out is not None and patched_bwd == "ok":
                grads = [x.grad] + [p.grad for p in lora]
                row.update(
                    dtype=str(out.dtype).replace("torch.", ""),
                    rel_err=rel_err(out, want),
                    grad_rel_err=max(rel_err(g, w) for g, w in zip(grads, want_grads, strict=True)),
                )
            row["crash reproduced"] = unpatched_fwd.startswith("raises")
            row["pass"] = (
                patched_fwd == patched_bwd == "ok"
                and max(row.get("rel_err", 1.0), row.get("grad_rel_err", 1.0)) <= TOLERANCE
            )
            rows.append(row)
    return rows


# --- 3. training -------------------------------------------------------------------------------------------------


def _lora_w_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    from unsloth.kernels import fast_lora, utils

    return fast_lora.LoRA_W.apply(x, *utils.get_lora_parameters(self))


def tiny_llama(ctx: Context, hidden: int = 256, layers: int = 2) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    ctx.torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
    )
    model: Any = LlamaForCausalLM(config)
    return model.to(device=ctx.device, dtype=ctx.torch.bfloat16)


@contextmanager
def rope_outside_autocast(ctx: Context) -> Iterator[None]:
    """transformers' Llama RoPE (`rotate_half`) uses torch.cat, which an fp16 autocast rejects for bf16 inputs
    ("Unexpected floating ScalarType in at::autocast::prioritize") whatever Unsloth does; Unsloth's own path uses its
    Triton RoPE instead. Run that one function without autocast so the direct path gets to the LoRA kernels."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb

    def apply_rotary_pos_emb(*args: Any, **kwargs: Any) -> Any:
        with ctx.torch.autocast(ctx.device, enabled=False):
            return original(*args, **kwargs)

    modeling_llama.apply_rotary_pos_emb = apply_rotary_pos_emb
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = original


def train_direct(ctx: Context, steps: int) -> dict[str, Any]:
    """transformers Llama + PEFT, its LoRA layers run through Unsloth's autograd functions, fp16 autocast."""
    import peft

    torch = ctx.torch
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model: Any = peft.get_peft_model(
        tiny_llama(ctx), peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    )
    n_mlp = n_w = 0
    for layer in model.base_model.model.model.layers:
        layer.mlp.forward = types.MethodType(ctx.fast_lora.apply_lora_mlp_swiglu, layer.mlp)
        n_mlp += 1
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(layer.self_attn, name)
            proj.forward = types.MethodType(_lora_w_forward, proj)
            n_w += 1
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(5)).to(ctx.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def step() -> float:
        with fp16_autocast(ctx):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    with rope_outside_autocast(ctx):
        result = train_unpatched_then_patched(ctx, step, optimizer, steps)
    lora_dtype = str(next(p for n, p in model.named_parameters() if "lora_A" in n).dtype).replace("torch.", "")
    return {
        "what": f"transformers Llama (2 layers, hidden 256) bf16 + PEFT LoRA ({lora_dtype}) r16; "
        f"{n_mlp} MLPs via apply_lora_mlp_swiglu (LoRA_MLP), {n_w} q/k/v/o via LoRA_W; HF RoPE run outside autocast",
        **result,
    }


def train_unpatched_then_patched(ctx: Context, step: Callable[[], float], optimizer: Any, steps: int) -> dict[str, Any]:
    """One step with Unsloth's originals (expected to raise), then `steps` steps with the patch; the table's columns."""
    with ctx.dtype_patch.suspended():
        _, unpatched = outcome(step)
    optimizer.zero_grad(set_to_none=True)
    losses, patched = [], "ok"
    try:
        losses = [step() for _ in range(steps)]
    except RuntimeError as error:
        patched = "raises: " + str(error).splitlines()[0][:70]
    return {
        "unpatched": unpatched,
        "patched": patched,
        "losses": losses,
        "crash reproduced": unpatched.startswith("raises"),
        "pass": patched == "ok" and len(losses) == steps and losses[-1] < losses[0],
    }


def train_fast_language_model(steps: int) -> dict[str, Any]:
    """Runs in a child process: Unsloth's own training path on a locally built tiny Llama."""
    ctx = setup()
    torch = ctx.torch
    sys.path.insert(0, str(REPO))
    from unsloth import FastLanguageModel

    from tests.support.tiny_model import build_base_model

    model_dir = build_base_model(Path(tempfile.mkdtemp(prefix="gpu-dtype-")) / "tiny-llama")
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=256, dtype=torch.bfloat16, load_in_4bit=False, local_files_only=True
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        target_modules=targets,
        use_gradient_checkpointing=False,
    )
    layers = model.base_model.model.model.layers
    fast = {
        "mlp": sum(
            getattr(layer.mlp.forward, "__func__", None) is ctx.fast_lora.apply_lora_mlp_swiglu for layer in layers
        ),
        "qkv": sum(getattr(layer.self_attn, "apply_qkv", None) is ctx.fast_lora.apply_lora_qkv for layer in layers),
        "o": sum(getattr(layer.self_attn, "apply_o", None) is ctx.fast_lora.apply_lora_o for layer in layers),
    }
    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(5)).to(ctx.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()

    def step() -> float:
        with fp16_autocast(ctx):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return {
        "what": f"FastLanguageModel.from_pretrained(local tiny Llama, bf16) + get_peft_model r16; fast layers {fast}",
        **train_unpatched_then_patched(ctx, step, optimizer, steps),
    }


def train_fast_language_model_in_child(steps: int, timeout_s: int = 300) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.gpu_dtype", "--child-fast-language-model", str(steps)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=REPO, timeout=timeout_s, check=False,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"what": "FastLanguageModel", "error": f"timed out after {timeout_s} s", "pass": False}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
    return {"what": "FastLanguageModel", "error": " | ".join(tail)[-600:], "pass": False}


# --- 4. benchmark ------------------------------------------------------------------------------------------------


def _timers(ctx: Context) -> tuple[Callable[[Callable[[], Any]], float], Callable[[Callable[[], Any]], float]]:
    torch = ctx.torch

    def sync() -> None:
        if ctx.device == "cuda":
            torch.cuda.synchronize()

    def host_us(fn: Callable[[], Any], calls: int = 200) -> float:
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - start) / calls * 1e6

    if ctx.device == "cuda":
        from triton.testing import do_bench

        def device_ms(fn: Callable[[], Any]) -> float:
            return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    else:

        def device_ms(fn: Callable[[], Any]) -> float:
            return host_us(fn, calls=20) / 1000

    return device_ms, host_us


def _caller(module: Any, name: str, *args: Any) -> Callable[[], Any]:
    def call() -> Any:
        return getattr(module, name)(*args)

    return call


def benchmark(ctx: Context, hidden: int, rank: int, tokens: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    torch = ctx.torch
    device_ms, host_us = _timers(ctx)
    layers = lora_layers(ctx, {"proj": (hidden, hidden)}, rank, seed=9, lora_dtype=torch.bfloat16)
    proj = layers.proj
    params = ctx.utils.get_lora_parameters(proj)
    rows = []
    for count in tokens:
        # Looked up at every call, so that suspended() really measures Unsloth's originals.
        if count == 1:
            label, x = "fast_linear_forward decode, 1 token", activation(ctx, (1, 1, hidden), seed=6)
            call = _caller(ctx.utils, "fast_linear_forward", proj, x)
        else:
            label, x = f"matmul_lora prefill, {count} tokens", activation(ctx, (1, count, hidden), seed=6)
            call = _caller(ctx.utils, "matmul_lora", x, *params)

        # Each variant's state spans its whole measurement, as in a model where autocast is entered once per
        # forward pass, not around every kernel call.
        variants: dict[str, Callable[[], Any]] = {
            "unpatched same": ctx.dtype_patch.suspended,
            "patched same": contextlib.nullcontext,
            "patched mixed": lambda: torch.autocast(ctx.device, dtype=torch.float16),
        }
        device: dict[str, list[float]] = {name: [] for name in variants}
        host: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):  # interleaved so that clock drift hits every variant alike
            for name, state in variants.items():
                with state():
                    device[name].append(device_ms(call))
                    host[name].append(host_us(call))
        med = {name: statistics.median(values) for name, values in device.items()}
        host_med = {name: statistics.median(values) for name, values in host.items()}
        same, mixed_ratio = med["patched same"] / med["unpatched same"], med["patched mixed"] / med["unpatched same"]
        rows.append(
            {
                "case": label,
                "unpatched same ms": med["unpatched same"],
                "patched same ms": med["patched same"],
                "patched mixed ms": med["patched mixed"],
                "same ratio": same,
                "mixed ratio": mixed_ratio,
                "host us/call (unp/same/mixed)": "/".join(f"{host_med[n]:.1f}" for n in variants),
                "pass": same <= TARGET_SAME and mixed_ratio <= TARGET_MIXED,
            }
        )
    return rows


# --- output --------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.2e}" if value < 0.01 else f"{value:.3f}"
    return str(value)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    print(f"\n{title}")
    print(" | ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)))
    print("-+-".join("-" * width for width in widths))
    for line in cells:
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


def environment(ctx: Context) -> str:
    torch = ctx.torch
    card = torch.cuda.get_device_name(0) if ctx.device == "cuda" else "cpu"
    import transformers

    return (
        f"device {card}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"unsloth {ctx.unsloth_version}; patch armed by {ctx.armed_by}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (CPU dry runs)")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--child-fast-language-model", type=int, metavar="STEPS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_fast_language_model:
        try:
            print(json.dumps(train_fast_language_model(args.child_fast_language_model)))
        except Exception as error:
            traceback.print_exc()
            print(
                json.dumps(
                    {"what": "FastLanguageModel", "error": f"{type(error).__name__}: {error}"[:600], "pass": False}
                )
            )
        return 0

    ctx = setup()
    quick = args.quick or ctx.device != "cuda"
    hidden, inter, rank = (64, 96, 8) if quick else (1024, 2816, 16)
    print(environment(ctx))
    results: dict[str, Any] = {"environment": environment(ctx), "aliases": alias_report(ctx)}
    print(json.dumps(results["aliases"], indent=1))
    results["kernels"] = check_kernels(ctx, hidden, rank)
    print_table(f"1. kernels under fp16 autocast, bf16 layer (hidden {hidden}, r {rank})", results["kernels"])
    results["autograd"] = check_autograd(ctx, hidden, inter, rank)
    print_table(f"2. autograd functions, forward and backward (hidden {hidden}, inter {inter})", results["autograd"])
    training = [train_direct(ctx, args.steps)]
    if ctx.device == "cuda":
        training.insert(0, train_fast_language_model_in_child(args.steps))
    for row in training:
        losses = row.pop("losses", [])
        row["loss first->last"] = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "-"
    results["training"] = training
    print_table(f"3. LoRA training, {args.steps} steps under fp16 autocast", training)
    if ctx.device == "cuda" or args.quick:
        bench_hidden, tokens = (4096, (4096, 1)) if not quick else (256, (64, 1))
        results["benchmark"] = benchmark(ctx, bench_hidden, 16, tokens, rounds=3 if not quick else 1)
        print_table(
            f"4. benchmark, hidden {bench_hidden}, r 16 (do_bench median ms; targets same <= {TARGET_SAME}x, "
            f"mixed <= {TARGET_MIXED}x)",
            results["benchmark"],
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    checks = results["kernels"] + results["autograd"] + [r for r in training if r.get("what") != "FastLanguageModel"]
    return 0 if all(row["pass"] for row in checks) else 1


def crash_expected(ctx: Context) -> bool:
    """The versions whose originals must fail under the mixed autocast (newer ones may have fixed some paths)."""
    return ctx.unsloth_version in ctx.dtype_patch.TESTED_UNSLOTH_VERSIONS


if __name__ == "__main__":
    sys.exit(main())
