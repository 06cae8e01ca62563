# fast_lora first: it imports .utils, so utils has executed before any module binds its names (as in Unsloth).
from .fast_lora import LoRA_MLP, LoRA_QKV, LoRA_W, apply_lora_mlp, apply_lora_o, apply_lora_qkv  # noqa: F401
from .utils import addmm_, fast_linear_forward, get_lora_parameters, matmul_lora  # noqa: F401
