"""`fork-sidecar doctor`: check a node's setup for the daemon and say, for each problem, how to fix it.

Each check is a function `(Context) -> list[Finding]` that only reads, except the RENAME_EXCHANGE probe, which
creates two directories under a hidden temporary name inside each watch root and removes them. Nothing here takes
the daemon's lock (a lock taken by the doctor could make a starting daemon refuse to run): who holds it is read from
/proc/locks. The vLLM probe sends `POST /v1/load_lora_adapter` with an empty JSON object, which no vLLM acts on:
without VLLM_ALLOW_RUNTIME_LORA_UPDATING the route does not exist (FastAPI's 404 `{"detail": "Not Found"}`), with it
the request fails validation (vLLM 0.32 answers 400; older FastAPI defaults 422).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.config import ConfigError, load_config

if TYPE_CHECKING:
    pass
from sidecar.checks.dirs import check_runtime_dir, check_state_dir, lock_holder
from sidecar.checks.findings import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, Context, Finding
from sidecar.checks.host import check_exchange, check_filesystems, check_inotify, inotify_in_use, watches_needed
from sidecar.checks.trainers import check_agents, check_art, check_preload
from sidecar.checks.vllm import check_vllm

__all__ = [
    "CHECKS",
    "Context",
    "Finding",
    "add_parser",
    "check_agents",
    "check_art",
    "check_exchange",
    "check_filesystems",
    "check_inotify",
    "check_preload",
    "check_runtime_dir",
    "check_state_dir",
    "check_vllm",
    "inotify_in_use",
    "lock_holder",
    "main",
    "run",
    "run_checks",
    "watches_needed",
]


# --- coordination -----------------------------------------------------------------------------------------------------
def check_coordination(ctx: Context) -> list[Finding]:
    from sidecar.claims.etcd_health import coordination_findings

    return [Finding("coordination", level, message, fix) for level, message, fix in coordination_findings(ctx.config)]


CHECKS: tuple[tuple[str, Callable[[Context], list[Finding]]], ...] = (
    ("inotify", check_inotify),
    ("filesystem", check_filesystems),
    ("runtime_dir", check_runtime_dir),
    ("rename_exchange", check_exchange),
    ("state_dir", check_state_dir),
    ("preload", check_preload),
    ("art", check_art),
    ("agents", check_agents),
    ("vllm", check_vllm),
    ("coordination", check_coordination),
)


def run_checks(ctx: Context) -> list[Finding]:
    """Every check in order; a check that crashes is itself a finding (the doctor must always finish its list)."""
    out: list[Finding] = []
    for name, check in CHECKS:
        try:
            out += check(ctx)
        except Exception as e:  # a bug in one check must not hide the others' findings
            out.append(Finding(name, "problem", f"the check itself failed ({e!r})", "report this as a bug."))
    return out


# --- command line -----------------------------------------------------------------------------------------------------
_DESCRIPTION = """\
Check this node's setup for fork-sidecar and say how to fix each problem found:

  inotify          fs.inotify.max_user_watches / max_user_instances against the runs under the roots
  filesystem       roots on NFS, Lustre, FUSE... where inotify misses other hosts' markers (watch.mode)
  runtime_dir      exists, not writable by other users; each <uid>/ in it is that user's 0700 agent directory
  rename_exchange  renameat2(RENAME_EXCHANGE) in each root (tried on two scratch directories, then removed)
  state_dir        writable, lock held only by a live daemon, journal files readable
  preload          installed and current in each trainer interpreter given with --python
  art              openpipe-art there: a tested version, or one with every ART internal the preload relies on
  agents           every trainer agent socket in runtime_dir/<uid>/ answers
  vllm             every configured or discovered vLLM server answers GET /v1/models with its key and has
                   runtime LoRA loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)
  coordination     with coordination.backend etcd: each endpoint answers, the credentials are accepted, a lease
                   granted reads back and refreshes (etcd's clock only), and this node's daemon holds a live lease

Run it as the daemon's user (usually root) to see what the daemon sees.

examples:
  fork-sidecar doctor --config /etc/fork-sidecar/config.yaml
  fork-sidecar doctor --python /opt/trainer-venv/bin/python --python /opt/other/bin/python
  fork-sidecar doctor --json | jq '.findings[] | select(.level == "problem")'

exit codes: 0 no problem found, 1 problems found (listed with their fixes), 2 configuration error.
"""


def add_parser(subparsers: Any) -> None:
    """Register `doctor` on the CLI's subparsers; the parsed namespace's `func(args)` returns the exit code."""
    parser = subparsers.add_parser(
        "doctor",
        help="check this node's setup and say how to fix each problem",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="PATH", help="YAML config (default: $FORK_SIDECAR_CONFIG, else built-in defaults)"
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        action="append",
        default=[],
        help="a trainer environment's interpreter whose preload to check (repeat for several)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    value = args.config or os.environ.get("FORK_SIDECAR_CONFIG")
    try:
        config = load_config(Path(value) if value else None)
    except ConfigError as e:
        print(f"fork-sidecar doctor: {e}", file=sys.stderr)
        return EXIT_USAGE
    findings = run_checks(Context(config, pythons=list(args.python)))
    problems = [f for f in findings if f.level == "problem"]
    if args.json:
        where = str(config.source_file) if config.source_file else None
        print(json.dumps({"config": where, "ok": not problems, "findings": [f.to_json() for f in findings]}, indent=1))
    else:
        print(f"fork-sidecar doctor: {config.source_file or 'built-in defaults'}")
        for f in findings:
            print(f"  {f.level.upper() if f.level == 'problem' else f.level:8} {f.check}: {f.message}")
            if f.fix:
                print(f"  {'':8} fix: {f.fix}")
        print(f"{len(problems)} problem(s) found." if problems else "no problems found.")
    return EXIT_PROBLEMS if problems else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m sidecar.doctor [--config PATH] [--python PATH]... [--json]`."""
    parser = argparse.ArgumentParser(
        prog="fork-sidecar doctor", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
