"""The names in an ART run that both ends rely on: `checkpoints/`, the served step `0000`, and the adapter's files.

ART treats every all-digit name in `checkpoints/` as a training step; `0000` is the adapter vLLM serves as
`{model}@0` and the one a fork replaces. The trainer side needs these names too (the ART fork glue, the adapter
loader), so they live here and not in the daemon's `sidecar/layout.py`.
"""

from __future__ import annotations

__all__ = ["ADAPTER_FILE", "CHECKPOINTS", "CONFIG_FILE", "SERVED_STEP"]

CHECKPOINTS = "checkpoints"
SERVED_STEP = "0000"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
