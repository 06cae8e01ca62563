"""Which integrations arm when which module is imported (stdlib only: the bootstrap reads it at interpreter start).

Maps an importable module name to "package.module:function"; the function is called with the module object
right after that module has executed (or at once, if it was already imported when the preload armed).
"""

POST_IMPORT_HOOKS: dict[str, str] = {
    # Unsloth's fused LoRA kernels crash on mixed bf16/fp16 operands; patch them where they are defined,
    # before `unsloth.kernels.fast_lora` and the model modules import them by name.
    "unsloth.kernels.utils": "sidecar.preload.dtype_patch:on_unsloth_kernels_utils",
    # ART's UnslothService caches its model in `_state`; the agent needs to find live services to drop it.
    "art.unsloth.service": "sidecar.preload.art:on_art_service",
    # ART's LocalBackend._experimental_fork_checkpoint only copies a checkpoint; a `.fork` marker makes it count.
    "art.local.backend": "sidecar.preload.art_fork:on_art_local_backend",
}
