# fast_lora first: it imports .utils from inside its own import, so the preload's hook on utils runs while fast_lora is
# half-executed (the harder case; in Unsloth 2026.3.3 cross_entropy_loss happens to import utils before fast_lora).
from .fast_lora import (  # noqa: F401
    LoRA_MLP,
    LoRA_QKV,
    LoRA_W,
    apply_lora_mlp_swiglu,
    apply_lora_o,
    apply_lora_qkv,
)
from .utils import addmm_, fast_linear_forward, get_lora_parameters, matmul_lora  # noqa: F401
