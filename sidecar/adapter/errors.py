"""What a checkpoint that is not a usable LoRA adapter is told: the error type and the advice its sentences end with."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CONFIG_ADVICE", "LORA_ADVICE", "SAFETENSORS_ADVICE", "AdapterError", "human_size", "length_text"]

SAFETENSORS_ADVICE = "the file is damaged or not a safetensors file — re-save the checkpoint"
CONFIG_ADVICE = "fix adapter_config.json or re-save the checkpoint"
LORA_ADVICE = "the file is not a peft LoRA adapter — point the fork at a LoRA checkpoint"


class AdapterError(Exception):
    """A checkpoint is not a usable LoRA adapter; the message is one sentence naming the file."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = Path(path)
        super().__init__(message)


def human_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def length_text(n: int) -> str:
    # 2^40 reads better than 1099511627776 for the absurd lengths a damaged file declares.
    return f"2^{n.bit_length() - 1}" if n > (1 << 32) and n & (n - 1) == 0 else str(n)
