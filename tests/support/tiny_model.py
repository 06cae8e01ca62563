"""A tiny Llama, its tokenizer and LoRA adapters, built locally (no hub access) for tests, the demo and benchmarks.

The shapes are the smallest vLLM's CPU build serves: head_dim 64 (its attention kernels reject 16), so hidden 128 with
2 heads. The tokenizer is a byte-level BPE trained here on a built-in text, so any prompt tokenizes and detokenizes.
Adapters get a random, non-zero `lora_B` (peft initialises it to zero) so two seeds give different greedy outputs.

Everything is cached under a directory keyed by `VERSION`: change the version when the recipe changes.
Building goes into a temporary sibling and is renamed into place, so concurrent test sessions share one cache safely.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "VERSION",
    "TinyAssets",
    "build_base_model",
    "build_lora_adapter",
    "default_cache_dir",
    "tiny_assets",
]

VERSION = "tiny-llama-v1"

HIDDEN = 128
HEADS = 2  # head_dim 64
LAYERS = 2
INTERMEDIATE = 256
VOCAB = 512
MAX_POSITIONS = 2048

_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_SPECIALS = ("<unk>", "<s>", "</s>")
_CORPUS = """
The quick brown fox jumps over the lazy dog. A fork of a training run copies a checkpoint and carries on from it.
Every server that serves the adapter must load the new weights, and every trainer must drop its cached state.
Numbers one two three four five six seven eight nine ten eleven twelve. Colours red green blue yellow purple.
Once upon a time there was a small model that learned to count, to spell and to tell short stories about cats.
""".strip()


def default_cache_dir() -> Path:
    """`<repo>/.cache/tiny-model` (ignored by git), or `$FORK_SIDECAR_TINY_CACHE` when set."""
    if env := os.environ.get("FORK_SIDECAR_TINY_CACHE"):
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "tiny-model"


def build_base_model(out_dir: Path, *, seed: int = 0, hidden: int = HIDDEN) -> Path:
    """A random-init tiny Llama + tokenizer saved (safetensors) in `out_dir`; reused if already built there.

    `hidden` (a multiple of 64; heads = hidden / 64) makes wider models, whose adapters are bigger (for benchmarks).
    """
    if hidden % 64:
        raise ValueError(f"hidden must be a multiple of 64 (vLLM's CPU attention needs head_dim 64), got {hidden}")
    stamp: dict[str, object] = {"version": VERSION, "kind": "base", "seed": seed}
    if hidden != HIDDEN:
        stamp["hidden"] = hidden
    return _build_once(out_dir, stamp, lambda tmp: _write_base(tmp, seed, hidden))


def build_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    rank: int = 8,
    target_modules: Sequence[str] = _TARGETS,
) -> Path:
    """A peft LoRA for the base in `base_dir` with random non-zero weights; reused if already built there."""
    stamp = {
        "version": VERSION,
        "kind": "lora",
        "base": str(Path(base_dir).resolve()),
        "seed": seed,
        "rank": rank,
        "targets": list(target_modules),
    }
    return _build_once(out_dir, stamp, lambda tmp: _write_adapter(base_dir, tmp, seed, rank, target_modules))


@dataclass(frozen=True)
class TinyAssets:
    base: Path
    adapter_a: Path
    adapter_b: Path


def tiny_assets(cache_dir: Path | None = None, *, hidden: int = HIDDEN, rank: int = 8) -> TinyAssets:
    """The base model and two distinct adapters (seeds 1 and 2), built once per cache dir, version and shape.

    The defaults are the tiny model everyone uses; benchmarks pass a larger `hidden`/`rank` for bigger adapters.
    """
    root = (cache_dir or default_cache_dir()) / VERSION
    suffix = "" if (hidden, rank) == (HIDDEN, 8) else f"-h{hidden}-r{rank}"
    base = build_base_model(root / ("base" if hidden == HIDDEN else f"base-h{hidden}"), seed=0, hidden=hidden)
    return TinyAssets(
        base=base,
        adapter_a=build_lora_adapter(base, root / f"lora-a{suffix}", seed=1, rank=rank),
        adapter_b=build_lora_adapter(base, root / f"lora-b{suffix}", seed=2, rank=rank),
    )


_STAMP = ".tiny-model.json"


def _build_once(out_dir: Path, stamp: dict[str, object], write: Callable[[Path], None]) -> Path:
    out_dir = Path(out_dir)
    if _stamp_matches(out_dir, stamp):
        return out_dir
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists but was not built by this recipe; remove it or pick another dir.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a server run by another user may need to read it
        (tmp / _STAMP).write_text(json.dumps(stamp, sort_keys=True))
        try:
            tmp.rename(out_dir)
        except OSError:
            # Another process built the same thing first; theirs is as good as ours.
            if not _stamp_matches(out_dir, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _stamp_matches(out_dir: Path, stamp: dict[str, object]) -> bool:
    try:
        return bool(json.loads((out_dir / _STAMP).read_text()) == stamp)
    except (OSError, ValueError):
        return False


def _write_base(out: Path, seed: int, hidden: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _write_tokenizer(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        # A wider init than Llama's 0.02 so the random model has peaked logits and greedy outputs are stable.
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config)  # float32, the default
    model.save_pretrained(str(out), safe_serialization=True)


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    # Written by hand (not save_pretrained) so the file reads the same in the transformers of both venvs.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def _write_adapter(base_dir: Path, out: Path, seed: int, rank: int, targets: Sequence[str]) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0, bias="none")
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.save_pretrained(str(out), safe_serialization=True)
