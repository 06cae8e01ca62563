"""Makes Unsloth's fused LoRA kernels work when an autocast of one half-precision dtype wraps a model of the other.

The crash (issue 5): under `torch.autocast(dtype=float16)` around a bf16 model, Unsloth's `matmul_lora` computes
`out = X @ W.t()` and `XA = X @ A` through autocast (fp16) but `B.to(X.dtype)` stays bf16, and the in-place
`out.addmm_(XA, B)` is not autocast-eligible: "self and mat2 must have the same dtype, but got Half and BFloat16".
`fast_linear_forward` (decode, `addmv_`/`addmm_`) and the backward passes of `LoRA_MLP`/`LoRA_QKV`/`LoRA_W`
(`d_A.addmm_(X.t(), dY @ B.t())`, whose `dY @ B.t()` is fp16 under the autocast replayed by `custom_bwd`) do the same.

Issue 11: Unsloth's KV-cache decode (`LlamaAttention_fast_forward_inference`, `fast_swiglu_inference`) passes
buffers preallocated in the model's dtype as `out=` (temp_QA, temp_KV, temp_O, temp_mlp), and `torch.matmul(...,
out=)` takes no autocast: activation, weight and buffer must share one dtype. At batch > 1 the attention output
comes from scaled_dot_product_attention, fp16 under the autocast, and meets o_proj's bf16 `temp_O`: "Expected out
tensor to have dtype c10::Half, but got c10::BFloat16 instead". bitsandbytes' 4-bit gemv (decode at batch 1) reads
raw pointers and needs the activation in the dequantized dtype.

What the wrappers do, per call:
- no autocast on, or every tensor that meets in the kernel already in autocast's dtype (activation, `out=` and
  `temp_lora` buffers, and the weight whenever a buffer is given or the weight is quantized): call the original,
  nothing else (no cast, no allocation, no Python side effect: torch.compile traces straight through).
- otherwise pick one common dtype: the dequantized dtype for a quantized weight, else bf16 if autocast's or the
  weight's dtype is bf16, else autocast's (the dtype the matmuls would produce). When it is the weight's dtype (a
  bf16 model: the reported cases) the kernel runs with autocast off and the activation cast to it, so every operand
  of every in-place op arrives in it, exactly as Unsloth computes without autocast. Otherwise (an fp32 model) only
  the activation is cast to autocast's dtype and autocast stays on, which again makes all operands agree.
- buffers: one already in the common dtype (and, for `out`, a weight in it too) is passed through, so the kernel
  writes it as it would without autocast. Any other is withheld from the kernel, which allocates its own; the
  caller's `out` then gets the result copied in, in the buffer's own dtype, and is what the call returns (viewed
  in the result's shape, as the kernel returns `out.view(...)`); `temp_lora` is scratch no caller reads and is left
  unwritten. The result's dtype is therefore the caller's buffer's, or the common dtype without a buffer.
- the autograd functions are wrapped at `forward`: `custom_fwd` then records the autocast state the forward really
  ran under and `custom_bwd` replays it, so the backward sees consistent dtypes without a wrapper of its own. Their
  backward also adds `dK @ KW.t()` into `dX` in place with the frozen weight, so for them "agree" means activation,
  autocast and weight dtypes all equal, and the common dtype is the weight's (bf16 for the bf16 models at issue;
  casting the weight on every call is not an option).
- newer Unsloth routes in-place updates through a module-level `addmm_(out, A, B, alpha, beta)` helper: on
  mismatched operands it casts them to one dtype (bf16 if any is bf16, else `out`'s) and keeps `out`'s dtype.

torch is imported only inside the hooks: they run when Unsloth is being imported, which has already imported it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

from sidecar.preload.hooks import log_once, when_imported

__all__ = [
    "AUTOGRAD_FUNCTIONS",
    "DISABLE_ENV",
    "INPLACE_HELPERS",
    "KERNEL_FUNCTIONS",
    "ORIGINAL_ATTR",
    "TESTED_UNSLOTH_VERSIONS",
    "common_dtype",
    "is_disabled",
    "is_patched",
    "on_unsloth_fast_lora",
    "on_unsloth_kernels_utils",
    "suspended",
    "unpatch_all",
    "unsloth_version",
]

DISABLE_ENV = "FORK_SIDECAR_DTYPE_PATCH"
TESTED_UNSLOTH_VERSIONS = ("2026.3.3",)
# unsloth.kernels.utils functions taking an activation `X`; other Unsloth modules import them by name.
KERNEL_FUNCTIONS = ("matmul_lora", "fast_linear_forward")
# unsloth.kernels.utils in-place helpers `helper(out, A, B, ...)` (not in 2026.3.3; newer releases have `addmm_`).
INPLACE_HELPERS = ("addmm_",)
# unsloth.kernels.fast_lora autograd functions whose forward takes (ctx, X, W, W_quant, ...).
AUTOGRAD_FUNCTIONS = ("LoRA_MLP", "LoRA_QKV", "LoRA_W")
ORIGINAL_ATTR = "__fork_sidecar_original__"
UTILS_MODULE = "unsloth.kernels.utils"
FAST_LORA_MODULE = "unsloth.kernels.fast_lora"
# Unsloth 2026.3.3 (probed on a GPU, tests/gpu/): the kernel functions are imported by name into unsloth.kernels,
# .fast_lora, .models.llama and, via `import *`, most model modules; unsloth_zoo and Unsloth's compiled cache modules
# share the prefix.
ALIAS_MODULE_PREFIX = "unsloth"

_LOG = logging.INFO


@dataclass(frozen=True)
class _Change:
    """One attribute this module replaced: `owner.name` was `before` and is now `after`."""

    owner: Any
    name: str
    before: Any
    after: Any


_changes: list[_Change] = []


def is_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when FORK_SIDECAR_DTYPE_PATCH=0 in `environ` (default: this process's environment)."""
    env = os.environ if environ is None else environ
    return env.get(DISABLE_ENV, "").strip() == "0"


def unsloth_version() -> str:
    """The installed Unsloth version from its distribution metadata (no import), or "unknown"."""
    import importlib.metadata

    try:
        return importlib.metadata.version("unsloth")
    except Exception:
        return str(getattr(sys.modules.get("unsloth"), "__version__", "unknown"))


def common_dtype(output_dtype: Any, *other_dtypes: Any) -> Any:
    """The one dtype mismatched operands are brought to: bf16 if any of them is bf16, else the output's."""
    import torch

    return _common(torch.bfloat16, output_dtype, other_dtypes)


def _common(bfloat16: Any, output_dtype: Any, other_dtypes: tuple[Any, ...]) -> Any:
    return bfloat16 if output_dtype == bfloat16 or bfloat16 in other_dtypes else output_dtype


def is_patched(function: Any) -> bool:
    """True for a wrapper made here (functions and staticmethods alike)."""
    return getattr(getattr(function, "__func__", function), ORIGINAL_ATTR, None) is not None


def on_unsloth_kernels_utils(module: ModuleType) -> None:
    """Post-import hook for `unsloth.kernels.utils` (hook_table): wrap its kernels, rebind every alias."""
    version = unsloth_version()
    if is_disabled():
        log_once("dtype-disabled", _LOG, "Unsloth %s: mixed-dtype patch off (%s=0)", version, DISABLE_ENV)
        return
    import torch

    wrapped = _patch_kernel_functions(torch, module) + _patch_inplace_helpers(torch, module)
    if not wrapped and any(is_patched(getattr(module, name, None)) for name in KERNEL_FUNCTIONS + INPLACE_HELPERS):
        return  # patched already (a second copy of the preload, a re-import): nothing more to do
    if not wrapped:
        log_once(
            "dtype-nothing",
            _LOG,
            "Unsloth %s: none of %s found in %s; mixed-dtype patch not applied",
            version,
            ", ".join(KERNEL_FUNCTIONS + INPLACE_HELPERS),
            module.__name__,
        )
        return
    rebound = _rebind_aliases([(change.before, change.after) for change in wrapped])
    note = "" if version in TESTED_UNSLOTH_VERSIONS else " (untested version: patched because the functions exist)"
    late = f"; Unsloth was imported before the preload armed: {rebound} by-name aliases rebound" if rebound else ""
    log_once(
        "dtype-active",
        _LOG,
        "Unsloth %s%s: mixed-dtype patch active for %s%s",
        version,
        note,
        ", ".join(change.name for change in wrapped),
        late,
    )
    when_imported(FAST_LORA_MODULE, on_unsloth_fast_lora, key=f"{__name__}:on_unsloth_fast_lora")
    fast_lora = sys.modules.get(FAST_LORA_MODULE)
    if fast_lora is not None:
        on_unsloth_fast_lora(fast_lora)  # idempotent; covers a re-patch after unpatch_all()


def on_unsloth_fast_lora(module: ModuleType) -> None:
    """Armed by `on_unsloth_kernels_utils`: wrap the forward of Unsloth's LoRA autograd functions."""
    utils = sys.modules.get(UTILS_MODULE)
    if is_disabled() or not any(is_patched(getattr(utils, name, None)) for name in KERNEL_FUNCTIONS + INPLACE_HELPERS):
        return  # the autograd functions are patched together with the kernels, never alone
    import torch

    names = []
    for class_name in AUTOGRAD_FUNCTIONS:
        cls = getattr(module, class_name, None)
        forward = getattr(cls, "__dict__", {}).get("forward")
        if not isinstance(forward, staticmethod) or is_patched(forward):
            continue
        x_index = _parameter_index(forward.__func__, "X")
        if x_index is None:
            continue
        weight_dtype = _positional_weight_dtype(torch, x_index + 1, x_index + 2)
        wrapper = _activation_wrapper(torch, forward.__func__, x_index, weight_dtype, buffers=(), weight_bound=True)
        _replace(cls, "forward", forward, staticmethod(wrapper))
        names.append(class_name)
    if names:
        log_once("dtype-autograd", _LOG, "mixed-dtype patch also covers %s (forward and backward)", ", ".join(names))


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Put Unsloth's originals back for the duration of the block (benchmarks and the unpatched baseline).

    Besides the attributes this module set, that includes every alias a module bound to a wrapper by importing it
    after the patch (the usual case: the hook patches `utils` before `fast_lora` and the models import it).
    """
    swaps = [(change.owner, change.name, change.after, change.before) for change in reversed(_changes)]
    replaced = {(id(owner), name) for owner, name, _, _ in swaps}
    original_of = {id(change.after): change for change in _changes}
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith(ALIAS_MODULE_PREFIX) or module is None:
            continue
        for attribute, value in list(getattr(module, "__dict__", {}).items()):
            change = original_of.get(id(value))
            if change is not None and value is change.after and (id(module), attribute) not in replaced:
                swaps.append((module, attribute, value, change.before))
    for owner, name, _, before in swaps:
        setattr(owner, name, before)
    try:
        yield
    finally:
        for owner, name, after, _ in reversed(swaps):
            setattr(owner, name, after)


def unpatch_all() -> None:
    """Undo every change made in this process (tests)."""
    while _changes:
        change = _changes.pop()
        setattr(change.owner, change.name, change.before)


def _replace(owner: Any, name: str, before: Any, after: Any) -> _Change:
    setattr(owner, name, after)
    change = _Change(owner, name, before, after)
    _changes.append(change)
    return change


def _patch_kernel_functions(torch: Any, module: ModuleType) -> list[_Change]:
    weight_dtype_by_name = {
        "matmul_lora": lambda original: _named_weight_dtype(torch, original, "W", "W_quant"),
        "fast_linear_forward": lambda original: _projection_weight_dtype(torch, original, "proj"),
    }
    changes = []
    for name in KERNEL_FUNCTIONS:
        original = getattr(module, name, None)
        if not callable(original) or is_patched(original):
            continue
        x_index = _parameter_index(original, "X")
        weight_dtype = weight_dtype_by_name[name](original)
        if x_index is None or weight_dtype is None:
            continue
        buffers = tuple(
            (index, buffer)
            for buffer in ("out", "temp_lora")
            if (index := _parameter_index(original, buffer)) is not None
        )
        wrapper = _activation_wrapper(torch, original, x_index, weight_dtype, buffers)
        changes.append(_replace(module, name, original, wrapper))
    return changes


def _patch_inplace_helpers(torch: Any, module: ModuleType) -> list[_Change]:
    changes = []
    for name in INPLACE_HELPERS:
        original = getattr(module, name, None)
        if not callable(original) or is_patched(original):
            continue
        changes.append(_replace(module, name, original, _inplace_wrapper(torch, original)))
    return changes


def _rebind_aliases(pairs: list[tuple[Any, Any]]) -> int:
    """Point every `unsloth*` module attribute that is (by identity) an original at its wrapper."""
    wrapper_of = {id(original): (original, wrapper) for original, wrapper in pairs}
    rebound = 0
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith(ALIAS_MODULE_PREFIX) or module is None:
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attribute, value in list(namespace.items()):
            pair = wrapper_of.get(id(value))
            if pair is not None and value is pair[0]:
                _replace(module, attribute, value, pair[1])
                rebound += 1
    return rebound


def _parameter_index(function: Any, name: str) -> int | None:
    """Position of parameter `name` in `function`'s signature (following functools.wraps), or None."""
    import inspect

    try:
        parameters = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None
    return parameters.index(name) if name in parameters else None


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if index < len(args) else kwargs.get(name)


def _with_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if index < len(args):
        return (*args[:index], value, *args[index + 1 :]), kwargs
    return args, {**kwargs, name: value}


class Weight(NamedTuple):
    """How a call's frozen weight is multiplied: in `dtype` (None: cannot be told); `packed` for quantized storage,
    whose kernels (bitsandbytes' gemv on raw pointers) need the activation in exactly that dtype."""

    dtype: Any
    packed: bool


def _weight_compute_dtype(torch: Any, weight: Any, quant_state: Any) -> Weight:
    dtype = getattr(weight, "dtype", None)
    if dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        return Weight(dtype, False)
    if quant_state is not None and not isinstance(quant_state, torch.Tensor):
        dtype = getattr(quant_state, "dtype", None)  # bitsandbytes QuantState: the dequantized dtype
        if isinstance(dtype, torch.dtype):
            return Weight(dtype, True)
    return Weight(None, quant_state is not None)


WeightOf = Callable[[tuple[Any, ...], dict[str, Any]], Weight]


def _named_weight_dtype(torch: Any, function: Any, weight: str, quant: str) -> WeightOf | None:
    weight_index, quant_index = _parameter_index(function, weight), _parameter_index(function, quant)
    if weight_index is None or quant_index is None:
        return None
    return _positional_weight_dtype(torch, weight_index, quant_index, weight, quant)


def _positional_weight_dtype(
    torch: Any, weight_index: int, quant_index: int, weight: str = "W", quant: str = "W_quant"
) -> WeightOf:
    def weight_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Weight:
        return _weight_compute_dtype(
            torch, _argument(args, kwargs, weight_index, weight), _argument(args, kwargs, quant_index, quant)
        )

    return weight_of


def _projection_weight_dtype(torch: Any, function: Any, name: str) -> WeightOf | None:
    index = _parameter_index(function, name)
    if index is None:
        return None
    floating = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

    def weight_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Weight:
        # A PEFT LoRA layer keeps the frozen weight on `base_layer` (Unsloth's get_lora_parameters does the same).
        projection = _argument(args, kwargs, index, name)
        weight = getattr(getattr(projection, "base_layer", projection), "weight", None)
        dtype = getattr(weight, "dtype", None)
        if dtype in floating:
            return Weight(dtype, False)  # skip the quant_state lookup: an attribute miss on a Parameter is slow
        return _weight_compute_dtype(torch, weight, getattr(weight, "quant_state", None))

    return weight_of


def _always_on() -> bool:
    return True


def _activation_wrapper(
    torch: Any,
    original: Any,
    x_index: int,
    weight_of: WeightOf,
    buffers: tuple[tuple[int, str], ...],
    weight_bound: bool = False,
) -> Any:
    """Wrap a kernel taking activation `X` and optional preallocated `buffers`: see the module docstring for the rule.

    `weight_bound`: the function's backward updates the input gradient in place with the frozen weight
    (`dX.addmm_(dK, KW.t())` in LoRA_QKV/LoRA_MLP), so it only works when activation, autocast and weight dtypes
    all agree, and the one dtype that can serve is the weight's (casting the weight on every call is what we avoid).
    """
    any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or _always_on
    autocast_enabled = torch.is_autocast_enabled
    autocast_dtype = torch.get_autocast_dtype
    set_autocast_enabled = torch.set_autocast_enabled
    is_compiling = torch.compiler.is_compiling
    autocast = torch.autocast
    bfloat16 = torch.bfloat16

    def patched(*args: Any, **kwargs: Any) -> Any:
        if not any_autocast():
            return original(*args, **kwargs)
        x = _argument(args, kwargs, x_index, "X")
        device_type = "cuda" if x.is_cuda else x.device.type  # is_cuda is cheaper than building a torch.device
        if not autocast_enabled(device_type):
            return original(*args, **kwargs)
        given = [
            (index, name, buffer)
            for index, name in buffers
            if (buffer := _argument(args, kwargs, index, name)) is not None
        ]
        plan = _plan(
            bfloat16,
            weight_bound,
            autocast_dtype(device_type),
            x.dtype,
            tuple(buffer.dtype for _, _, buffer in given),
            lambda: weight_of(args, kwargs),
        )
        if plan is None:
            return original(*args, **kwargs)
        common, weight = plan
        if x.dtype != common:
            args, kwargs = _with_argument(args, kwargs, x_index, "X", x.to(common))
        caller_out = None
        for index, name, buffer in given:
            # `out=` kernels (torch.matmul/mm/mv with out, bitsandbytes' gemv) take no autocast: activation, weight
            # and buffer must share one dtype. A buffer that cannot is left to the kernel to allocate; the caller's
            # `out` then receives the result below, `temp_lora` (scratch the caller never reads) stays unwritten.
            if buffer.dtype != common or (name == "out" and weight != common):
                args, kwargs = _with_argument(args, kwargs, index, name, None)
                caller_out = buffer if name == "out" else caller_out
        if common != weight:
            # common is autocast's dtype: with X in it, every matmul and every `.to(X.dtype)` agree under autocast.
            result = original(*args, **kwargs)
        elif is_compiling():
            with autocast(device_type, enabled=False):
                result = original(*args, **kwargs)
        else:
            # torch.autocast(enabled=False) costs ~7 us per call in eager mode; the raw switch costs well under 1 us.
            set_autocast_enabled(device_type, False)
            try:
                result = original(*args, **kwargs)
            finally:
                set_autocast_enabled(device_type, True)
        return result if caller_out is None else _into(caller_out, result)

    return _mark(patched, original)


def _into(buffer: Any, result: Any) -> Any:
    """What the kernel returns when it writes `buffer` itself: the buffer, holding the result in its own dtype,
    viewed in the result's shape (Unsloth's kernels return `out.view(...)`; the callers alias their scratch).
    A buffer of another size is one the kernel ignores (fast_linear_forward's prefill): the result goes back as is."""
    if buffer.numel() != result.numel():
        return result
    buffer.copy_(result.reshape(buffer.shape))
    return buffer.view(result.shape)


def _plan(
    bfloat16: Any,
    weight_bound: bool,
    output_dtype: Any,
    x_dtype: Any,
    buffer_dtypes: tuple[Any, ...],
    weight_of: Callable[[], Weight],
) -> tuple[Any, Any] | None:
    """(common dtype, weight dtype) for a call under autocast, or None when its dtypes agree already."""
    if weight_bound:
        weight = weight_of().dtype or x_dtype
        return None if output_dtype == x_dtype == weight else (weight, weight)
    weight = weight_of()
    weight_dtype = weight.dtype or x_dtype
    agree = x_dtype == output_dtype and all(dtype == output_dtype for dtype in buffer_dtypes)
    # Autocast brings the weight to X's dtype in the out-of-place matmuls; `out=` and quantized kernels do not.
    if agree and (weight_dtype == output_dtype or not (buffer_dtypes or weight.packed)):
        return None
    if weight.packed:
        return weight_dtype, weight_dtype  # the dequantized or raw-pointer kernels compute in it and nothing else
    return _common(bfloat16, output_dtype, (weight_dtype,)), weight_dtype


def _inplace_wrapper(torch: Any, original: Any) -> Any:
    """Wrap `helper(out, A, B, ...)`: operands of one dtype pass straight through."""
    bfloat16 = torch.bfloat16

    def patched(*args: Any, **kwargs: Any) -> Any:
        out, a, b = (_argument(args, kwargs, index, name) for index, name in ((0, "out"), (1, "A"), (2, "B")))
        if a.dtype == out.dtype and b.dtype == out.dtype:
            return original(*args, **kwargs)
        common = _common(bfloat16, out.dtype, (a.dtype, b.dtype))
        args, kwargs = _with_argument(args, kwargs, 1, "A", a.to(common))
        args, kwargs = _with_argument(args, kwargs, 2, "B", b.to(common))
        if common == out.dtype:
            return original(*args, **kwargs)
        scratch = out.to(common)
        args, kwargs = _with_argument(args, kwargs, 0, "out", scratch)
        original(*args, **kwargs)
        out.copy_(scratch)
        return out

    return _mark(patched, original)


def _mark(wrapper: Any, original: Any) -> Any:
    for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
        with contextlib.suppress(AttributeError):
            setattr(wrapper, attribute, getattr(original, attribute))
    wrapper.__wrapped__ = original  # inspect.signature and torch's custom_fwd users see the real parameters
    setattr(wrapper, ORIGINAL_ATTR, original)
    return wrapper
