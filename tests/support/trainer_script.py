"""A real (tiny) generic-PEFT trainer for the end-to-end tests: trains on CPU and calls `sidecar.preload.register`.

Run it with the trainer venv's python, by path (not -m), so that `sidecar` comes from that environment:

    python tests/support/trainer_script.py --base DIR --adapter DIR --run-dir DIR --control DIR [options]

It loads the base model with the adapter as trainable LoRA, registers it for the run and trains forever on random
tokens (AdamW), one JSON line per step in `{control}/steps.jsonl`: the step, the loss, the pid and a fingerprint of
the LoRA tensors as that step's forward found them. The fingerprint is taken in a forward pre-hook registered after
`register()`'s, so after the agent's step gate has marked the step begun: taken in the loop before the forward, it
could predate a fork the agent loads "between steps" in that gap (the gate sees no step until the forward starts),
and the step would be logged as starting from the old weights while it trained from the fork.

Between steps it obeys files in the control dir:

- `pause`    : stop stepping (the model is idle) and create `paused`; removing `pause` resumes.
- `dump`     : write the LoRA tensors as they are now to `dump.safetensors`, then remove `dump`.
- `hold`     : (checked inside a step, after backward, before the optimizer step) wait while it exists, having
               created `holding`; lets a test send a fork while a step is provably running.
- `exit`     : exit 0.
`ready.json` appears once the model is registered: pid, socket path, where `sidecar` was imported from.
With `--spawn-child` the model lives in a `multiprocessing` spawn child; the parent only waits for it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["lora_fingerprint", "main"]


def lora_fingerprint(tensors: Mapping[str, Any]) -> str:
    """sha256 over (name, raw bytes) in name order; `tensors` are numpy arrays or CPU torch tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        if hasattr(value, "detach"):
            value = value.detach().cpu().contiguous().numpy()
        h.update(name.encode() + b"\0")
        h.update(value.tobytes())
    return "sha256:" + h.hexdigest()


def stop_trainer(proc: subprocess.Popen[Any], control: Path, timeout: float) -> None:
    """Ask a trainer run from this script (or from ddp_script.py) to exit through its control dir; kill it if it
    has not exited within `timeout`."""
    (control / "exit").touch()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def train(args: argparse.Namespace) -> int:
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    import sidecar
    from sidecar.preload import register

    control = Path(args.control)
    torch.set_num_threads(1)  # tests run several processes on two cores
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if not args.no_register:
        register(model, args.run_dir, optimizer=None if args.auto_optimizer else optimizer)
    starts: list[str] = []  # the LoRA as the current step's first forward saw it

    def record_start(module: Any, inputs: Any) -> None:
        if not starts:
            starts.append(lora_fingerprint(get_peft_model_state_dict(model)))

    model.register_forward_pre_hook(record_start)  # after register(): runs once the gate has let the step begin
    runtime = os.environ.get("FORK_SIDECAR_RUNTIME_DIR", "/run/fork-sidecar")
    _write_json(
        control / "ready.json",
        {
            "pid": os.getpid(),
            # Where the contract puts this process's agent socket (whether or not the preload made one).
            "socket": str(Path(runtime) / str(os.geteuid()) / f"agent-{os.getpid()}.sock"),
            "sidecar": sidecar.__file__,
            "preload_armed": any(getattr(f, "fork_sidecar_post_import_finder", False) for f in sys.meta_path),
        },
    )
    gen = torch.Generator().manual_seed(args.seed)
    vocab = base.config.vocab_size
    step = 0
    with open(control / "steps.jsonl", "a", buffering=1) as log:
        while True:
            if (control / "exit").exists():
                return 0
            if (control / "dump").exists():
                tensors = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
                save_file(tensors, str(control / "dump.safetensors.tmp"))
                (control / "dump.safetensors.tmp").replace(control / "dump.safetensors")
                (control / "dump").unlink()
            if (control / "pause").exists():
                (control / "paused").touch()
                time.sleep(0.02)
                continue
            (control / "paused").unlink(missing_ok=True)
            if args.max_steps and step >= args.max_steps:
                time.sleep(0.02)
                continue
            starts.clear()
            tokens = torch.randint(3, vocab, (2, 16), generator=gen)
            loss = model(input_ids=tokens, labels=tokens).loss
            fingerprint = starts[0]
            loss.backward()
            while (control / "hold").exists():
                (control / "holding").touch()
                time.sleep(0.01)
            (control / "holding").unlink(missing_ok=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "pid": os.getpid(), "loss": loss.item(), "start": fingerprint}
            log.write(json.dumps(record) + "\n")
            time.sleep(args.step_pause)


def _child(args: argparse.Namespace) -> None:
    sys.exit(train(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=0, help="stop stepping (but keep serving) after N steps")
    parser.add_argument("--step-pause", type=float, default=0.05, help="seconds between steps (leave CPU to others)")
    parser.add_argument("--no-register", action="store_true")
    parser.add_argument("--auto-optimizer", action="store_true", help="do not pass the optimizer to register()")
    parser.add_argument("--spawn-child", action="store_true")
    args = parser.parse_args(argv)
    if not args.spawn_child:
        return train(args)
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_child, args=(args,))
    child.start()
    _write_json(Path(args.control) / "parent.json", {"pid": os.getpid(), "child": child.pid})
    child.join()
    return child.exitcode or 0


if __name__ == "__main__":
    sys.exit(main())
