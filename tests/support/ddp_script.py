"""A real (tiny) torch.distributed LoRA trainer for the rank tests and the benchmark: one process per rank.

Launch it with torchrun from a venv with the preload installed (gloo on CPU, or nccl on GPUs):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/support/ddp_script.py \\
        --base DIR --adapter DIR --run-dir DIR --control DIR [--fsdp] [--no-broadcast-buffers] ...

Every rank loads the tiny Llama with the adapter as trainable LoRA, wraps it in DistributedDataParallel (or shards
it with FSDP2's `fully_shard`, or FSDP1 with `--fsdp1 LAYOUT`), calls `sidecar.preload.register` on its PEFT model
(the one call a single-process trainer makes too) and trains on random tokens of its own. Rank 0 pauses
`--rank0-pause` between steps, the others `--pause` (rank 0 does more between steps in real jobs: logging,
evaluation). Per rank, `{control}/steps-{rank}.jsonl`
gets one line per optimizer step: `step` (optimizer steps completed), `start` (a fingerprint of the LoRA tensors as
that step's forward found them, DDP only) and `after` (as they are once `optimizer.step()` has returned, which is
where a fork agreed at that step has been loaded). With FSDP the fingerprints are over full tensors
(`DTensor.full_tensor()`, a collective every rank makes at the same point).

Control files (checked between steps):
- `exit`: every rank stops after the step in which any rank saw it (agreed with an all_reduce of the job's own);
- `hold-{rank}`: that rank waits after backward, before its optimizer step, while the file exists (`holding-{rank}`);
- `hold-after-{rank}`: the same right after its optimizer step (after the step boundary: `holding-after-{rank}`);
- with `--save-every K`, rank 0 writes its LoRA tensors to `saves/{step}.safetensors` every K steps, one tensor at a
  time over `--save-seconds` (a slow checkpoint save; `saving` exists meanwhile), and logs `saved` with the
  fingerprint of what it wrote.
With `--second-model` every rank trains a second copy of the model by the same optimizer and registers it for the
same run (two targets in one agent; `after` is then the fingerprint both hold, or both fingerprints while they
differ). With `--fail-apply-rank R`, rank R's first
apply of a fork copies one tensor and then raises (`_fail_first_apply`); with `--hold-apply-rank R`, rank R's applies
wait while `hold-apply-{R}` exists (`holding-apply-{R}` meanwhile: `_held_apply`), and with `--hold-read-rank R` its
reads of a fork's file while `hold-read-{R}` does (`_held_read`).
With `--uneven-rank R --uneven-steps K --steps N` the loop runs under DDP's `Join`: rank R stops after K steps,
the others after N or once `exit` exists (seen by each rank alone: an all_reduce would have no partner on a
joined rank).
`ready-{rank}.json` appears once the model is registered. `--steps N` stops after N steps (the benchmark);
`timing-{rank}.json` then holds the steady-state seconds per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path, or imported as tests.support.ddp_script
from trainer_script import lora_fingerprint as fingerprint

__all__ = ["fingerprint", "main"]


def _full(tensors: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in tensors.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _build(args: argparse.Namespace, device: Any) -> tuple[Any, Any]:
    """(the PEFT model, what the loop calls: DDP around it, or the FSDP2-sharded model itself)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True).to(device)
    peft_model.train()
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in peft_model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(peft_model)
        return peft_model, peft_model
    if args.fsdp1:
        return peft_model, _fsdp1(args.fsdp1, peft_model, device)
    from torch.nn.parallel import DistributedDataParallel

    return peft_model, DistributedDataParallel(peft_model, broadcast_buffers=args.broadcast_buffers)


def _fsdp1(layout: str, peft_model: Any, device: Any) -> Any:
    """FSDP1 around the PEFT model: `root` one unit over everything (use_orig_params, LoRA and frozen weights in one
    FlatParameter); `root-all-trainable` the same without use_orig_params and every weight trained; `layers` a unit
    per decoder layer and the root (use_orig_params); `lora-units` peft's fsdp_auto_wrap_policy without
    use_orig_params (each LoRA layer its own unit, the optimizer over FlatParameters)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if layout == "root":
        return FullyShardedDataParallel(peft_model, use_orig_params=True, device_id=device)
    if layout == "root-all-trainable":  # one FlatParameter of LoRA and base weights, all trained
        for p in peft_model.parameters():
            p.requires_grad_(True)
        return FullyShardedDataParallel(peft_model, use_orig_params=False, device_id=device)
    if layout == "layers":
        policy = ModuleWrapPolicy({LlamaDecoderLayer})
        return FullyShardedDataParallel(peft_model, use_orig_params=True, device_id=device, auto_wrap_policy=policy)
    from peft.utils.other import fsdp_auto_wrap_policy

    policy = fsdp_auto_wrap_policy(peft_model)
    return FullyShardedDataParallel(peft_model, use_orig_params=False, device_id=device, auto_wrap_policy=policy)


def _fsdp1_lora(peft_model: Any) -> dict[str, Any]:
    """The full LoRA tensors by their checkpoint names, inside summon_full_params: from the LoRA Linear modules
    themselves (without use_orig_params their weights are plain tensors then, not parameters)."""
    import torch

    tensors = {}
    for name, module in peft_model.named_modules():
        clean = name.replace("._fsdp_wrapped_module", "")
        if isinstance(module, torch.nn.Linear) and clean.endswith((".lora_A.default", ".lora_B.default")):
            tensors[clean.removesuffix(".default") + ".weight"] = module.weight.detach().clone()
    return tensors


def _models(args: argparse.Namespace, device: Any, rank: int) -> tuple[list[tuple[Any, Any]], Any]:
    """The (PEFT model, what the loop calls) pairs, registered, and one optimizer over all their LoRA parameters."""
    import torch

    from sidecar.preload import register

    models = [_build(args, device) for _ in range(2 if args.second_model else 1)]
    trainable = [p for peft, _ in models for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    if not args.no_register and args.no_register_rank != rank:
        for peft, wrapped in models:
            register(wrapped if args.register_wrapped else peft, args.run_dir)
    return models, optimizer


def train(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    cuda = args.backend == "nccl"
    dist.init_process_group(args.backend, timeout=timedelta(seconds=args.pg_timeout) if args.pg_timeout else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    control = Path(args.control)
    models, optimizer = _models(args, device, rank)
    peft_model = models[0][0]
    if args.fail_apply_rank == rank:
        _fail_first_apply()
    if args.hold_apply_rank == rank:
        _held_apply(Path(args.control), rank)
    if args.hold_read_rank == rank:
        _held_read(Path(args.control), rank)

    lora = _lora_reader(args, models)

    starts: list[str] = []
    if not (args.fsdp or args.fsdp1):  # a forward pre-hook after register()'s: the weights this step trains from

        def record_start(module: Any, inputs: Any) -> None:
            if args.record and not starts:
                starts.append(fingerprint(lora()))

        peft_model.register_forward_pre_hook(record_start)
    _write_json(control / f"ready-{rank}.json", {"pid": os.getpid(), "rank": rank, "world_size": world})
    gen = torch.Generator().manual_seed(1000 + rank)
    vocab = peft_model.get_base_model().config.vocab_size
    pause = args.rank0_pause if rank == 0 else args.pause
    stop = torch.zeros(1, device=device)
    step, timed_from = 0, time.perf_counter()
    joined = args.uneven_rank >= 0  # under DDP's Join: each rank stops after its own number of steps
    limit = args.uneven_steps if rank == args.uneven_rank else args.steps
    with open(control / f"steps-{rank}.jsonl", "a", buffering=1) as log, _join(args, models):
        while True:
            if step == args.warmup:
                timed_from = time.perf_counter()
            starts.clear()
            _forwards_and_backwards(args, models, lambda: torch.randint(3, vocab, (2, 16), generator=gen).to(device))
            _hold(control, rank)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _hold(control, rank, "hold-after")
            step += 1
            _after_step(args, step, rank, lora, lambda: _fingerprints(models, lora), starts, log)
            if (limit and step >= limit) or _should_stop(control, stop, joined):
                break
            time.sleep(pause)
    if args.steps:
        timed = {"steps": step - args.warmup, "seconds": time.perf_counter() - timed_from}
        _write_json(control / f"timing-{rank}.json", timed)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _forwards_and_backwards(args: argparse.Namespace, models: list[tuple[Any, Any]], batch: Any) -> None:
    """One optimizer step's work: `--accumulate` micro-batches, DDP's gradient all-reduce on the last one only (its
    `no_sync()` before), as gradient accumulation is usually written."""
    for micro in range(args.accumulate):
        tokens = batch()
        last = micro == args.accumulate - 1
        for _, wrapped in models:
            no_sync = getattr(wrapped, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                wrapped(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()


def _lora_reader(args: argparse.Namespace, models: list[tuple[Any, Any]]) -> Any:
    """`lora(of=the first PEFT model)`: its LoRA tensors, full size (FSDP shards gathered)."""
    from peft import get_peft_model_state_dict

    def lora(of: Any = models[0][0]) -> dict[str, Any]:
        if args.fsdp1:  # each rank holds a flat slice: the full tensors are gathered (every rank calls this)
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(models[0][1]):
                return _fsdp1_lora(of)
        tensors = dict(get_peft_model_state_dict(of))
        return _full(tensors) if args.fsdp else tensors

    return lora


def _join(args: argparse.Namespace, models: list[tuple[Any, Any]]) -> Any:
    """DDP's Join around the loop with `--uneven-rank` (the ranks that ran out of inputs shadow the others)."""
    if args.uneven_rank < 0:
        return contextlib.nullcontext()
    from torch.distributed.algorithms.join import Join

    return Join([wrapped for _, wrapped in models])


def _fingerprints(models: list[tuple[Any, Any]], lora: Any) -> str:
    """The fingerprint of the LoRA tensors; of two models, theirs while they hold the same, else both."""
    prints = [fingerprint(lora(peft)) for peft, _ in models]
    return prints[0] if len(set(prints)) == 1 else " / ".join(prints)


def _after_step(
    args: argparse.Namespace, step: int, rank: int, lora: Any, after: Any, starts: list[str], log: Any
) -> None:
    if args.record:
        log.write(json.dumps({"step": step, "rank": rank, "after": after(), "start": starts}) + "\n")
    if args.save_every and step % args.save_every == 0 and rank == 0:
        _save_slowly(Path(args.control), step, lora(), args.save_seconds, log)


def _fail_first_apply() -> None:
    """The one mock of the rank tests: this rank's first apply of a fork copies one LoRA tensor into the model, then
    raises the way a CUDA out-of-memory error half-way through the copy would. A CPU job has no real fault between a
    read that passed every check and the copy into the model (the file is in memory by then), so one is made here;
    everything around it (the votes, the roll-back, the daemon's outcome) is real."""
    from sidecar.preload import peft_load

    real = peft_load._copy_and_verify
    calls: list[int] = []

    def copy_one_then_fail(live: dict[str, Any], cast: dict[str, Any], path: Path) -> None:
        calls.append(1)
        if len(calls) > 1:
            return real(live, cast, path)
        first = sorted(live)[0]
        live[first].copy_(cast[first])
        raise RuntimeError("CUDA out of memory (made by the test on this rank, after one tensor was copied)")

    peft_load._copy_and_verify = copy_one_then_fail  # type: ignore[assignment]


def _held_apply(control: Path, rank: int) -> None:
    """A mock too: this rank's apply of a fork waits while `hold-apply-{rank}` exists, as copying a large adapter onto
    a busy GPU takes long. A real part is that slow only with adapters far larger than CI can hold (every rank waits
    for the slowest one inside the agreed step), so the test holds it; the load, the votes and the daemon are real."""
    from sidecar.preload import peft_load

    real = peft_load._copy_and_verify

    def held(*args: Any) -> str | None:
        _hold(control, rank, "hold-apply")
        return real(*args)

    peft_load._copy_and_verify = held  # type: ignore[assignment]


def _held_read(control: Path, rank: int) -> None:
    """A mock like `_held_apply`: this rank's read of a fork's file waits while `hold-read-{rank}` exists, as reading
    a large adapter from a slow filesystem does (every rank reads it in the agreed step, before the first vote)."""
    from sidecar.preload import peft_load

    real = peft_load.read_checkpoint

    def held(*args: Any, **kwargs: Any) -> Any:
        _hold(control, rank, "hold-read")
        return real(*args, **kwargs)

    peft_load.read_checkpoint = held  # type: ignore[assignment]


def _should_stop(control: Path, flag: Any, joined: bool) -> bool:
    # Under Join each rank looks alone (a joined rank has no partner for an all_reduce of ours).
    return (control / "exit").exists() if joined else _told_to_stop(control, flag)


def _told_to_stop(control: Path, flag: Any) -> bool:
    """Whether any rank saw `exit` (every rank must stop after the same step, or the others hang in DDP)."""
    import torch.distributed as dist

    flag.fill_(1.0 if (control / "exit").exists() else 0.0)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _hold(control: Path, rank: int, name: str = "hold") -> None:
    while (control / f"{name}-{rank}").exists():
        (control / f"{name.replace('hold', 'holding')}-{rank}").touch()
        time.sleep(0.01)


def _save_slowly(control: Path, step: int, tensors: dict[str, Any], seconds: float, log: Any) -> None:
    from safetensors.torch import save_file

    saved: dict[str, Any] = {}
    (control / "saving").touch()
    for name in sorted(tensors):  # one tensor at a time: a fork arriving now must not change the rest
        saved[name] = tensors[name].detach().clone().contiguous()
        time.sleep(seconds / len(tensors))
    (control / "saving").unlink()
    (control / "saves").mkdir(exist_ok=True)
    save_file(saved, str(control / "saves" / f"{step}.safetensors"))
    log.write(json.dumps({"saved": step, "fingerprint": fingerprint(saved)}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    layouts = ["root", "root-all-trainable", "layers", "lora-units"]
    parser.add_argument("--fsdp1", choices=layouts, help="FSDP1 FullyShardedDataParallel instead of DDP")
    parser.add_argument("--register-wrapped", action="store_true", help="register the wrapper, not the PEFT model")
    parser.add_argument("--no-broadcast-buffers", dest="broadcast_buffers", action="store_false")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pause", type=float, default=0.02)
    parser.add_argument("--rank0-pause", type=float, default=0.08)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--save-seconds", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=0, help="stop after N steps (benchmark)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the timing starts (with --steps)")
    parser.add_argument("--no-record", dest="record", action="store_false", help="no per-step fingerprints")
    parser.add_argument("--no-register", action="store_true")
    parser.add_argument("--no-register-rank", type=int, default=-1, help="this rank never calls register()")
    parser.add_argument("--pg-timeout", type=float, default=0, help="init_process_group's timeout, seconds")
    parser.add_argument("--uneven-rank", type=int, default=-1, help="under DDP's Join, this rank stops early")
    parser.add_argument("--uneven-steps", type=int, default=0, help="after this many steps (with --uneven-rank)")
    parser.add_argument("--second-model", action="store_true", help="train and register a second model too")
    parser.add_argument("--fail-apply-rank", type=int, default=-1, help="this rank's first apply fails half-way")
    parser.add_argument("--hold-apply-rank", type=int, default=-1, help="this rank's applies wait for a file")
    parser.add_argument("--hold-read-rank", type=int, default=-1, help="this rank's reads of a fork wait for a file")
    return train(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
