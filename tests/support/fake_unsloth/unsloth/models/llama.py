"""Model module that takes the kernels by `import *`, as Unsloth's llama.py does."""

import torch

from ..kernels import *  # noqa: F403


class FastLlamaModel:
    pass


def mlp_decode(mlp, X):
    """Decode-time MLP through this module's by-name alias of fast_linear_forward."""
    gate = fast_linear_forward(mlp.gate_proj, X)  # noqa: F405
    up = fast_linear_forward(mlp.up_proj, X)  # noqa: F405
    return fast_linear_forward(mlp.down_proj, torch.nn.functional.silu(gate) * up)  # noqa: F405
