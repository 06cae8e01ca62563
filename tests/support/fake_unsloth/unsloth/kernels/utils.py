"""Where the LoRA kernels are defined (the module the sidecar's post-import hook watches)."""

import torch

torch_matmul = torch.matmul
torch_mm = torch.mm
torch_mv = torch.mv
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
    return base.weight, None, proj.lora_A[adapter].weight, proj.lora_B[adapter].weight, proj.scaling[adapter]


def get_lora_parameters_bias(proj):
    return (*get_lora_parameters(proj), getattr(proj, "base_layer", proj).bias)


def matmul_lora(X, W, W_quant, A, B, s, out=None):
    """X @ W.t() + s * (X @ A.t()) @ B.t(), the LoRA term added in place."""
    dtype = X.dtype
    shape = X.shape
    X = X.reshape(-1, shape[-1])
    out = torch_matmul(X, W.t(), out=out)
    if A is not None:
        XA = torch_matmul(X, A.t().to(dtype))
        out.addmm_(XA, B.t().to(dtype), alpha=s)  # in place: autocast does not reconcile its operands
    return out.view(*shape[:-1], -1)


def fast_linear_forward(proj, X, temp_lora=None, out=None):
    """Decode path (q_len == 1): the base product into the caller's `out` (torch.matmul with out=, which autocast
    does not touch), then the LoRA term with addmv_ (bsz 1) / addmm_ (bsz > 1); prefill goes through matmul_lora."""
    W, W_quant, A, B, s, bias = get_lora_parameters_bias(proj)
    bsz, q_len, in_dim = X.shape
    if q_len != 1:
        return matmul_lora(X, W, W_quant, A, B, s)
    out = torch_matmul(X, W.t(), out=out)
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
