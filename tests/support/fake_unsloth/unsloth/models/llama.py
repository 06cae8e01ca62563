"""Model module that takes the kernels by `import *`, as Unsloth's llama.py does, with its KV-cache decode path.

The decode functions keep the real one's dtype-relevant structure (no RoPE, no paged cache growth): buffers
preallocated in the hidden states' dtype at the first decode step and handed to every projection as `out=`, the
attention output written into `temp_QA[1]`'s storage through `temp_O`, batch 1 attending with out= matmuls (no
autocast) and batch > 1 through scaled_dot_product_attention (autocast-eligible: fp16 under an fp16 autocast).
"""

import math

import torch

from ..kernels import *  # noqa: F403

torch_matmul = torch.matmul


class FastLlamaModel:
    pass


def mlp_decode(mlp, X):
    """Decode-time MLP through this module's by-name alias of fast_linear_forward."""
    gate = fast_linear_forward(mlp.gate_proj, X)  # noqa: F405
    up = fast_linear_forward(mlp.up_proj, X)  # noqa: F405
    return fast_linear_forward(mlp.down_proj, torch.nn.functional.silu(gate) * up)  # noqa: F405


def LlamaAttention_fast_forward_inference(self, hidden_states, past_key_value, do_prefill=False):
    """One decode step of `self` (q_proj/k_proj/v_proj/o_proj plus n_heads, n_kv_heads, head_dim, hidden_size)
    against the cache `past_key_value` = (K, V), each (bsz, n_kv_heads, seq, head_dim); returns (A, (K, V))."""
    X = hidden_states
    bsz = X.shape[0]
    K1, V1 = past_key_value
    seq_len = K1.shape[2]
    attention_size = self.n_heads * self.head_dim
    kv_size = self.n_kv_heads * self.head_dim
    if do_prefill:
        self.paged_attention = torch.empty((2, bsz, self.n_kv_heads, seq_len + 8, self.head_dim), dtype=X.dtype)
        self.paged_attention[0, :, :, :seq_len] = K1
        self.paged_attention[1, :, :, :seq_len] = V1
        self.temp_QA = torch.empty((2, bsz, 1, attention_size), dtype=X.dtype, device=X.device)
        self.temp_KV = torch.empty((2, bsz, 1, kv_size), dtype=X.dtype, device=X.device)
        self.attention = torch.empty((bsz, self.n_heads, 1, seq_len + 8), dtype=X.dtype, device=X.device)
        if attention_size != self.hidden_size:
            self.temp_O = torch.empty((bsz, 1, self.hidden_size), dtype=X.dtype, device=X.device)
        else:
            self.temp_O = self.temp_QA[1][:, :, : self.hidden_size]
    Q = fast_linear_forward(self.q_proj, X, out=self.temp_QA[0])  # noqa: F405
    K = fast_linear_forward(self.k_proj, X, out=self.temp_KV[0])  # noqa: F405
    V = fast_linear_forward(self.v_proj, X, out=self.temp_KV[1])  # noqa: F405
    Q = Q.view(bsz, 1, self.n_heads, self.head_dim).transpose(1, 2)
    # The new token's K and V are copied into the cache (no autocast there), which the step then reads from.
    self.paged_attention[0, :, :, seq_len] = K.view(bsz, self.n_kv_heads, self.head_dim)
    self.paged_attention[1, :, :, seq_len] = V.view(bsz, self.n_kv_heads, self.head_dim)
    K, V = self.paged_attention[:, :, :, : seq_len + 1]
    groups = self.n_heads // self.n_kv_heads
    Kx, Vx = K.repeat_interleave(groups, dim=1), V.repeat_interleave(groups, dim=1)
    if bsz == 1:
        Q *= 1.0 / math.sqrt(self.head_dim)
        A = torch_matmul(Q, Kx.transpose(2, 3), out=self.attention[:, :, :, : Kx.shape[2]])
        A[:] = torch.nn.functional.softmax(A, dim=-1, dtype=torch.float32)
        A = torch_matmul(A, Vx, out=Q)
    else:
        A = torch.nn.functional.scaled_dot_product_attention(Q, Kx, Vx)
    A = A.transpose(1, 2).reshape(bsz, 1, attention_size)
    A = fast_linear_forward(self.o_proj, A, out=self.temp_O)  # noqa: F405
    return A, (K, V)


def fast_swiglu_inference(self, X, temp_gate=None, temp_up=None):
    """The decode MLP: gate and up into the caller's buffers, down into the first `hidden` columns of `up`'s."""
    hidden = X.shape[-1]
    gate = fast_linear_forward(self.gate_proj, X, out=temp_gate)  # noqa: F405
    up = fast_linear_forward(self.up_proj, X, out=temp_up)  # noqa: F405
    gate = torch.nn.functional.silu(gate, inplace=True)
    gate *= up
    return fast_linear_forward(self.down_proj, gate, out=up[:, :, :hidden])  # noqa: F405
