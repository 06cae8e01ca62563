"""Where the LoRA kernels are defined (the module the sidecar's post-import hook watches)."""

import torch

torch_matmul = torch.matmul
torch_mm = torch.mm


def torch_mv(A, x, out=None):
    """Unsloth's `torch.mv`, with CUDA's autocast rule: CUDA's fp16 autocast list has mv, CPU's does not (it has
    matmul, which without `out=` autocasts the same matrix-vector product and with `out=` does not)."""
    return torch.matmul(A, x, out=out)


# Unsloth decorates for "cuda"; this stand-in runs on CPU, where the same autocast rules apply.
torch_amp_custom_fwd = torch.amp.custom_fwd(device_type="cpu")
torch_amp_custom_bwd = torch.amp.custom_bwd(device_type="cpu")


class LoraProjection(torch.nn.Module):
    """A frozen weight plus one LoRA adapter, laid out like PEFT's lora.Linear (so real PEFT layers work too):
    `base_layer.weight` (out x in), `lora_A[adapter].weight` (r x in), `lora_B[adapter].weight` (out x r)."""

    def __init__(self, weight, A, B, scaling, bias=None):
        super().__init__()
        self.base_layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        self.base_layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.base_layer.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(A.shape[1], A.shape[0], bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(B.shape[1], B.shape[0], bias=False)})
        self.lora_A["default"].weight = torch.nn.Parameter(A)
        self.lora_B["default"].weight = torch.nn.Parameter(B)
        self.scaling = {"default": scaling}
        self.active_adapters = ["default"]
        self.disable_adapters = False
        self.merged = False


def get_lora_parameters(proj):
    """(W, W_quant, A, B, s) of a PEFT-style LoRA layer."""
    base = getattr(proj, "base_layer", proj)
    adapter = proj.active_adapters[0]
    W = base.weight
    A, B = proj.lora_A[adapter].weight, proj.lora_B[adapter].weight
    return W, getattr(W, "quant_state", None), A, B, proj.scaling[adapter]


def get_lora_parameters_bias(proj):
    return (*get_lora_parameters(proj), getattr(proj, "base_layer", proj).bias)


@torch.inference_mode()
def fast_dequantize(W, quant_state=None):
    """A 4-bit weight (bitsandbytes' layout: two codes per uint8, `(numel / 2, 1)`) back to `quant_state.shape`,
    always in `quant_state.dtype`, whatever the autocast: bitsandbytes' kernel writes the buffer through a raw
    pointer. Called with the packed weight transposed (`(1, numel / 2)`), it returns the weight transposed too."""
    if quant_state is None:
        return W
    codes = torch.stack((W.reshape(-1) >> 4, W.reshape(-1) & 15), -1).reshape(-1, quant_state.blocksize)
    values = quant_state.code[codes.long()] * quant_state.absmax[:, None]
    weight = values.to(quant_state.dtype).reshape(quant_state.shape)
    return weight.t() if W.shape[0] == 1 else weight


def fast_gemv(X, W, quant_state, out=None):
    """bitsandbytes' 4-bit gemv (decode at batch 1): it reads X and W and writes `out` (allocated in the dequantized
    dtype when not given) through raw pointers, so autocast never applies and nothing is cast. The real kernel
    reinterprets an X or `out` of another dtype silently; this stand-in raises torch's own error instead."""
    if quant_state is None:
        return torch_matmul(X, W, out=out)
    if out is None:
        out = torch.empty((1, 1, quant_state.shape[0]), dtype=quant_state.dtype, device=W.device)
    with torch.autocast(X.device.type, enabled=False):
        return torch_matmul(X, fast_dequantize(W, quant_state).t(), out=out)


def matmul_lora(X, W, W_quant, A, B, s, out=None):
    """X @ W.t() + s * (X @ A.t()) @ B.t(), the LoRA term added in place; a quantized W is dequantized first."""
    dtype = X.dtype
    shape = X.shape
    X = X.reshape(-1, shape[-1])
    W = fast_dequantize(W, W_quant)
    out = torch_matmul(X, W.t(), out=out)
    if A is not None:
        XA = torch_matmul(X, A.t().to(dtype))
        out.addmm_(XA, B.t().to(dtype), alpha=s)  # in place: autocast does not reconcile its operands
    return out.view(*shape[:-1], -1)


def fast_linear_forward(proj, X, temp_lora=None, out=None):
    """Decode path (q_len == 1): the base product into the caller's `out` (torch.matmul with out=, which autocast
    does not touch; a quantized weight through fast_gemv at bsz 1, else dequantized, transposed), then the LoRA term
    with addmv_ (bsz 1) / addmm_ (bsz > 1); prefill goes through matmul_lora."""
    W, W_quant, A, B, s, bias = get_lora_parameters_bias(proj)
    bsz, q_len, in_dim = X.shape
    if q_len != 1:
        return matmul_lora(X, W, W_quant, A, B, s)
    if W_quant is None:
        out = torch_matmul(X, W.t(), out=out)
    elif bsz == 1:
        out = fast_gemv(X, W, W_quant, out=out)
    else:
        out = torch_matmul(X, fast_dequantize(W.t(), W_quant), out=out)
    dtype = X.dtype
    out_dim = out.shape[2]
    if not hasattr(A, "_fast_lora"):
        # Unsloth keeps a copy cast to the first decode's activation dtype, never refreshed.
        A._fast_lora = A.to(dtype)
        B._fast_lora = B.to(dtype)
    if bsz == 1:
        out = out.view(out_dim)
        temp_lora = torch_mv(A._fast_lora, X.ravel(), out=temp_lora)
        out.addmv_(B._fast_lora, temp_lora, alpha=s)
    else:
        out = out.view(bsz, out_dim)
        temp_lora = torch_mm(X.view(bsz, in_dim), A._fast_lora.t(), out=temp_lora)
        out.addmm_(temp_lora, B._fast_lora.t(), alpha=s)
    out = out.view(bsz, 1, out_dim)
    if bias is not None:
        out += bias
    return out


def addmm_(out, A, B, alpha=1.0, beta=1.0):
    """The module-level in-place helper newer Unsloth releases route their updates through."""
    return out.addmm_(A, B, alpha=alpha, beta=beta)
