"""The mixed-dtype patch through Unsloth's own model paths on a GPU (issue 11), unpatched vs patched, in one process:

    python3 -m bench.gpu_dtype_model [--json PATH]        (from the repo root; needs CUDA and Unsloth)

A Llama (tests/support/tiny_model, hidden 256, 2 layers) loaded with `FastLanguageModel.from_pretrained` in bf16,
`get_peft_model` r16 on all seven projections, LoRA A and B randomised so that they matter. Teacher-forced token ids
(prompt of PROMPT tokens, then STEPS decode steps) make every run compute the same logits, which are compared with
an fp32 reference: plain transformers + PEFT, same weights, in a child process that never imports Unsloth.

1. paths: prefill and KV-cache decode (`model(...)` with `past_key_values`, which runs Unsloth's
   LlamaModel_fast_forward_inference: temp_QA/temp_KV/temp_O and temp_mlp buffers) at batch 1, 2, 4, and one
   training step (forward + backward), each without autocast (bf16, the baseline) and under an fp16 autocast,
   unpatched (`dtype_patch.suspended()`) and patched: outcome and relative error of logits / loss against fp32;
2. crashes: which situations fail without the patch: LoRA weights in bf16 / fp16 / fp32 on the bf16 model, no
   autocast / fp16 / bf16 autocast, for a training step and decode at batch 1 and 2 (unpatched and patched);
3. timing: decode step, prefill and training step, patched vs unpatched on the same dtype (no autocast) and
   patched under the fp16 autocast vs unpatched same dtype; medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# hidden 256: tiny_model's intermediate size is 256, and Unsloth's decode MLP writes down_proj into `up`'s buffer.
HIDDEN, RANK, PROMPT, STEPS, BATCH = 256, 16, 32, 8, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids(torch: Any, vocab: int) -> Any:
    return torch.randint(3, vocab - 1, (BATCH, PROMPT + STEPS), generator=torch.Generator().manual_seed(5))


def reference_child(model_dir: str, lora_path: str, out_path: str) -> None:
    """fp32 logits of the whole teacher-forced sequence and the training loss, without Unsloth in the process."""
    import peft
    import torch
    from transformers import LlamaForCausalLM

    model: Any = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    config = peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    model = peft.get_peft_model(model, config)
    lora = torch.load(lora_path)
    missing = set(lora) - {name for name, _ in model.named_parameters()}
    if missing:
        raise SystemExit(f"reference: LoRA keys not in the PEFT model: {sorted(missing)[:3]}")
    state = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in lora.items():
            state[name].copy_(value)
    ids = _ids(torch, model.config.vocab_size).cuda()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().cpu()
        loss = float(model(input_ids=ids[:, :PROMPT], labels=ids[:, :PROMPT]).loss)
    torch.save({"logits": logits, "loss": loss}, out_path)


class Bench:
    """The Unsloth model and what every measurement needs."""

    def __init__(self) -> None:
        sys.path.insert(0, str(REPO))
        from bench import gpu_dtype

        self.ctx = gpu_dtype.setup()
        torch = self.torch = self.ctx.torch
        from unsloth import FastLanguageModel

        from tests.support.tiny_model import build_base_model

        self.flm = FastLanguageModel
        self.model_dir = build_base_model(Path(tempfile.mkdtemp(prefix="gpu-dtype-model-")) / "base", hidden=HIDDEN)
        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(self.model_dir), max_seq_length=256, dtype=torch.bfloat16, load_in_4bit=False,
            local_files_only=True,
        )  # fmt: skip
        self.model = FastLanguageModel.get_peft_model(
            model, r=RANK, lora_alpha=RANK, lora_dropout=0, bias="none", target_modules=TARGETS,
            use_gradient_checkpointing=False,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(11)
        self.lora = {n: p for n, p in self.model.named_parameters() if "lora_" in n}
        self.lora_dtype = str(next(iter(self.lora.values())).dtype).replace("torch.", "")
        with torch.no_grad():
            for parameter in self.lora.values():
                values = torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5
                parameter.copy_(values.to(parameter.device, parameter.dtype))
        self.ids = _ids(torch, self.model.config.vocab_size).cuda()
        self.reference = self._reference()

    def _reference(self) -> dict[str, Any]:
        folder = Path(tempfile.mkdtemp(prefix="gpu-dtype-ref-"))
        lora_path, out_path = folder / "lora.pt", folder / "ref.pt"
        self.torch.save({n: p.detach().float().cpu() for n, p in self.lora.items()}, lora_path)
        command = [sys.executable, "-m", "bench.gpu_dtype_model", "--child-reference", str(self.model_dir)]
        done = subprocess.run(
            [*command, str(lora_path), str(out_path)], capture_output=True, text=True, cwd=REPO, timeout=300,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError("fp32 reference failed: " + " | ".join(done.stderr.strip().splitlines()[-6:]))
        result: dict[str, Any] = self.torch.load(out_path)
        return result

    def set_lora_dtype(self, dtype: Any) -> None:
        for parameter in self.lora.values():
            parameter.data = parameter.data.to(dtype)
            if hasattr(parameter, "_fast_lora"):
                delattr(parameter, "_fast_lora")  # Unsloth's decode copy, cast at the first decode step

    @contextlib.contextmanager
    def state(self, autocast: Any, patched: bool) -> Iterator[None]:
        torch = self.torch
        with contextlib.ExitStack() as stack:
            if not patched:
                stack.enter_context(self.ctx.dtype_patch.suspended())
            if autocast is not None:
                stack.enter_context(torch.autocast("cuda", dtype=autocast))
            yield

    # --- the paths ------------------------------------------------------------------------------------------------

    def decode(self, bsz: int, steps: int = STEPS, plain_prefill: bool = False) -> tuple[Any, list[Any]]:
        """Prefill PROMPT tokens (`plain_prefill`: with autocast off), then `steps` KV-cache decode steps of the
        teacher-forced ids."""
        torch = self.torch
        self.flm.for_inference(self.model)
        ids = self.ids[:bsz]
        with torch.inference_mode():
            with torch.autocast("cuda", enabled=False) if plain_prefill else contextlib.nullcontext():
                out = self.model(input_ids=ids[:, :PROMPT], use_cache=True, return_dict=True)
            prefill, past, logits = out.logits, out.past_key_values, []
            for step in range(steps):
                position = torch.full((bsz, 1), PROMPT + step, device=ids.device, dtype=torch.long)
                out = self.model(
                    input_ids=ids[:, PROMPT + step : PROMPT + step + 1], past_key_values=past,
                    position_ids=position, use_cache=True, return_dict=True,
                )  # fmt: skip
                past = out.past_key_values
                logits.append(out.logits[:, -1])
        return prefill, logits

    def train_step(self) -> float:
        self.flm.for_training(self.model, use_gradient_checkpointing=False)
        ids = self.ids[:, :PROMPT]
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.model.zero_grad(set_to_none=True)
        return float(loss.detach())

    def decode_errors(self, bsz: int) -> dict[str, Any]:
        prefill, steps = self.decode(bsz)
        want = self.reference["logits"][:bsz]
        got_prefill = prefill.float().cpu()
        positions = got_prefill.shape[1]  # Unsloth may return only the last positions' logits in inference mode
        return {
            "prefill rel_err": rel_err(got_prefill, want[:, PROMPT - positions : PROMPT]),
            "decode rel_err (max over steps)": max(
                rel_err(step.float().cpu(), want[:, PROMPT + i]) for i, step in enumerate(steps)
            ),
            "logits dtype": str(steps[0].dtype).replace("torch.", ""),
        }


def rel_err(value: Any, expected: Any) -> float:
    return float((value.float() - expected.float()).norm() / expected.float().norm())


def attempt(run: Callable[[], Any]) -> tuple[Any, str]:
    try:
        return run(), "ok"
    except Exception as error:
        where = traceback.extract_tb(error.__traceback__)[-3:]
        trail = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(where))
        return None, f"raises {type(error).__name__}: {str(error).splitlines()[0][:110]} [{trail}]"


AUTOCASTS = {"none": None, "fp16": "float16", "bf16": "bfloat16"}


def check_paths(bench: Bench) -> list[dict[str, Any]]:
    torch = bench.torch
    rows = []
    for autocast_name in ("none", "fp16"):
        autocast = None if AUTOCASTS[autocast_name] is None else getattr(torch, AUTOCASTS[autocast_name])
        for patched in (False, True):
            for bsz in (1, 2, 4):
                with bench.state(autocast, patched):
                    result, outcome = attempt(lambda bsz=bsz: bench.decode_errors(bsz))
                rows.append({"path": f"prefill+decode bsz={bsz}", "autocast": autocast_name, "patched": patched,
                             "outcome": outcome, **(result or {})})  # fmt: skip
            with bench.state(autocast, patched):
                loss, outcome = attempt(bench.train_step)
            row = {"path": "training fwd+bwd [4x32]", "autocast": autocast_name, "patched": patched, "outcome": outcome}
            if loss is not None:
                row["loss rel_err"] = abs(loss - bench.reference["loss"]) / abs(bench.reference["loss"])
            rows.append(row)
    return rows


def check_crashes(bench: Bench) -> list[dict[str, Any]]:
    torch = bench.torch
    original = next(iter(bench.lora.values())).dtype
    rows = []
    paths: dict[str, Callable[[], Any]] = {
        "training fwd+bwd": bench.train_step,
        "decode bsz=1": lambda: bench.decode(1, steps=2),
        "decode bsz=2": lambda: bench.decode(2, steps=2),
        "decode only bsz=1 (prefill without autocast)": lambda: bench.decode(1, steps=2, plain_prefill=True),
        "decode only bsz=2 (prefill without autocast)": lambda: bench.decode(2, steps=2, plain_prefill=True),
    }
    try:
        for lora_dtype in ("bfloat16", "float16", "float32"):
            bench.set_lora_dtype(getattr(torch, lora_dtype))
            for autocast_name, autocast in AUTOCASTS.items():
                for path, run in paths.items():
                    row: dict[str, Any] = {"LoRA dtype": lora_dtype, "autocast": autocast_name, "path": path}
                    for patched in (False, True):
                        with bench.state(None if autocast is None else getattr(torch, autocast), patched):
                            _, outcome = attempt(run)
                        row["patched" if patched else "unpatched"] = outcome
                    rows.append(row)
    finally:
        bench.set_lora_dtype(original)
    return rows


def timing(bench: Bench, rounds: int = 9, repeats: int = 3) -> list[dict[str, Any]]:
    torch = bench.torch

    def timed(run: Callable[[], Any]) -> float:
        run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000 / repeats

    cases: dict[str, Callable[[], Any]] = {
        f"decode bsz={bsz}, {STEPS} steps + prefill": (lambda bsz=bsz: bench.decode(bsz)) for bsz in (1, 4)
    }
    cases["training step fwd+bwd [4x32]"] = bench.train_step
    variants = {"unpatched same": (None, False), "patched same": (None, True), "patched mixed": (torch.float16, True)}
    rows = []
    for case, run in cases.items():
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (autocast, patched) in variants.items():
                with bench.state(autocast, patched):
                    samples[name].append(timed(run))
        med = {name: statistics.median(values) for name, values in samples.items()}
        rows.append({
            "case": case, **{f"{name} ms": value for name, value in med.items()},
            "same ratio": med["patched same"] / med["unpatched same"],
            "mixed ratio": med["patched mixed"] / med["unpatched same"],
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument("--child-reference", nargs=3, metavar=("MODEL", "LORA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_reference:
        reference_child(*args.child_reference)
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from bench.gpu_dtype import environment, print_table

    bench = Bench()
    results: dict[str, Any] = {
        "environment": environment(bench.ctx),
        "lora dtype from get_peft_model": bench.lora_dtype,
    }
    print(results["environment"], "| LoRA dtype from get_peft_model:", bench.lora_dtype)
    sections: list[tuple[str, str, Callable[[Bench], list[dict[str, Any]]]]] = [
        ("paths", "1. Unsloth model paths vs fp32 reference (rel err)", check_paths),
        ("crashes", "2. which situations crash without the patch (bf16 model)", check_crashes),
        ("timing", "3. timing, medians of 9 interleaved rounds, each the mean of 3 runs (ms)", timing),
    ]
    for key, title, run in sections:
        rows, outcome = attempt(lambda run=run: run(bench))
        results[key] = rows if rows is not None else [{"error": outcome}]
        print_table(title, results[key])
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    paths = results["paths"]
    fixed = all(r["outcome"] == "ok" for r in paths if r.get("patched"))
    return 0 if fixed else 1


if __name__ == "__main__":
    sys.exit(main())
