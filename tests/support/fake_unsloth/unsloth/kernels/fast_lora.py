"""LoRA autograd functions whose backward updates gradients in place; they take matmul_lora by name."""

import torch

from .utils import get_lora_parameters, matmul_lora, torch_amp_custom_bwd, torch_amp_custom_fwd


def _flat(t):
    return t.reshape(-1, t.shape[-1])


def _lora_grads(X, dY, A, B, S):
    """dA = S (dY B)^T X and dB = S dY^T (X A^T), written in place like Unsloth's kernels."""
    dA = torch.empty_like(A)
    dB = torch.empty_like(B)
    dA.addmm_((dY @ B).t(), X, alpha=S, beta=0)
    dB.addmm_(dY.t(), X @ A.t(), alpha=S, beta=0)
    return dA, dB


def _add_input_grad(dX, dY, W, A, B, S):
    """dX += dY W + S (dY B) A, in place."""
    dX.addmm_(dY, W)
    dX.addmm_(dY @ B, A, alpha=S)


class LoRA_W(torch.autograd.Function):
    @staticmethod
    @torch_amp_custom_fwd
    def forward(ctx, X, W, W_quant, A, B, S):
        ctx.save_for_backward(X, A, B)
        ctx.W, ctx.S = W, S
        return matmul_lora(X, W, W_quant, A, B, S)

    @staticmethod
    @torch_amp_custom_bwd
    def backward(ctx, dY):
        X, A, B = ctx.saved_tensors
        dtype = X.dtype
        X2, dY2 = _flat(X), _flat(dY)
        A, B = A.to(dtype), B.to(dtype)
        dA, dB = _lora_grads(X2, dY2, A, B, ctx.S)
        dX = torch.zeros_like(X2)
        _add_input_grad(dX, dY2, ctx.W, A, B, ctx.S)
        return dX.view_as(X), None, None, dA, dB, None


class LoRA_QKV(torch.autograd.Function):
    @staticmethod
    @torch_amp_custom_fwd
    def forward(ctx, X, QW, QW_quant, QA, QB, QS, KW, KW_quant, KA, KB, KS, VW, VW_quant, VA, VB, VS):
        ctx.save_for_backward(X, QA, QB, KA, KB, VA, VB)
        ctx.W, ctx.S = (QW, KW, VW), (QS, KS, VS)
        Q = matmul_lora(X, QW, QW_quant, QA, QB, QS)
        K = matmul_lora(X, KW, KW_quant, KA, KB, KS)
        V = matmul_lora(X, VW, VW_quant, VA, VB, VS)
        return Q, K, V

    @staticmethod
    @torch_amp_custom_bwd
    def backward(ctx, dQ, dK, dV):
        X, *lora = ctx.saved_tensors
        dtype = X.dtype
        X2 = _flat(X)
        dX = torch.zeros_like(X2)
        grads = []
        for i, dY in enumerate((dQ, dK, dV)):
            A, B = lora[2 * i].to(dtype), lora[2 * i + 1].to(dtype)
            dA, dB = _lora_grads(X2, _flat(dY), A, B, ctx.S[i])
            _add_input_grad(dX, _flat(dY), ctx.W[i], A, B, ctx.S[i])
            grads += [None, None, dA, dB, None]
        return (dX.view_as(X), *grads)


class LoRA_MLP(torch.autograd.Function):
    """SwiGLU MLP: i = down(silu(gate(X)) * up(X)), each projection with LoRA."""

    @staticmethod
    @torch_amp_custom_fwd
    def forward(
        ctx, X, gateW, gateW_quant, gateA, gateB, gateS, upW, upW_quant, upA, upB, upS,
        downW, downW_quant, downA, downB, downS,
    ):  # fmt: skip
        e = matmul_lora(X, gateW, gateW_quant, gateA, gateB, gateS)
        g = matmul_lora(X, upW, upW_quant, upA, upB, upS)
        h = torch.nn.functional.silu(e) * g
        i = matmul_lora(h, downW, downW_quant, downA, downB, downS)
        ctx.save_for_backward(X, e, g, gateA, gateB, upA, upB, downA, downB)
        ctx.W, ctx.S = (gateW, upW, downW), (gateS, upS, downS)
        return i

    @staticmethod
    @torch_amp_custom_bwd
    def backward(ctx, dY):
        X, e, g, *lora = ctx.saved_tensors
        gateW, upW, downW = ctx.W
        gateS, upS, downS = ctx.S
        dtype = X.dtype
        gateA, gateB, upA, upB, downA, downB = (t.to(dtype) for t in lora)
        X2, e, g, dY2 = _flat(X), _flat(e), _flat(g), _flat(dY)
        # dh = dY @ (downW + downS * downB @ downA), through matmul_lora with transposed roles
        dh = matmul_lora(dY2, downW.t(), None, downB.t(), downA.t(), downS)
        sig = torch.sigmoid(e)
        silu = e * sig
        h = silu * g
        dg = dh * silu
        de = dh * g * sig * (1 + e * (1 - sig))
        d_downA, d_downB = _lora_grads(h, dY2, downA, downB, downS)
        d_upA, d_upB = _lora_grads(X2, dg, upA, upB, upS)
        d_gateA, d_gateB = _lora_grads(X2, de, gateA, gateB, gateS)
        dX = torch.zeros_like(X2)
        _add_input_grad(dX, dg, upW, upA, upB, upS)
        _add_input_grad(dX, de, gateW, gateA, gateB, gateS)
        return (
            dX.view_as(X), None, None, d_gateA, d_gateB, None,
            None, None, d_upA, d_upB, None,
            None, None, d_downA, d_downB, None,
        )  # fmt: skip


def apply_lora_mlp_swiglu(mlp, X):
    return LoRA_MLP.apply(
        X, *get_lora_parameters(mlp.gate_proj), *get_lora_parameters(mlp.up_proj), *get_lora_parameters(mlp.down_proj)
    )


def apply_lora_qkv(attn, X):
    return LoRA_QKV.apply(
        X, *get_lora_parameters(attn.q_proj), *get_lora_parameters(attn.k_proj), *get_lora_parameters(attn.v_proj)
    )


def apply_lora_o(attn, X):
    return LoRA_W.apply(X, *get_lora_parameters(attn.o_proj))
