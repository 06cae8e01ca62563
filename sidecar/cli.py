"""`fork-sidecar`: parse the command line and hand off; each command's work lives in its own module.

Exit codes: 0 success, 1 the operation failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from sidecar import __version__
from sidecar.config import Config, ConfigError, load_config
from sidecar.doctor import add_parser as add_doctor_parser
from sidecar.journal import read_history
from sidecar.marker import DONE, FAILED, INPROGRESS, MARKER, read_json_object
from sidecar.preload.preload_cli import add_parser as add_preload_parser
from sidecar.protocol.atomic_write import write_atomic
from sidecar.protocol.run_layout import CHECKPOINTS

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_MAIN_HELP = """\
Make a checkpoint fork of a LoRA training run take effect everywhere at once: checkpoints/0000 on disk
(atomically), the trainer processes (through the preload agent) and the vLLM servers serving the run.

A fork is requested by a marker file in an ART run directory, {art_path}/{project}/models/{model}/.fork;
the daemon (`fork-sidecar run`, usually the systemd unit) notices it, carries the fork out and writes
.fork.done or .fork.failed (JSON) beside it.

examples:
  fork-sidecar run --config /etc/fork-sidecar/config.yaml     the daemon, in the foreground
  touch .art/proj/models/m/.fork                              fork m from its newest checkpoint
  fork-sidecar fork .art/proj/models/m --step 40 --wait       fork from step 40 and wait for the outcome
  fork-sidecar status                                         what the daemon is doing, last outcomes
  fork-sidecar preload install --python /opt/venv/bin/python  put the agent into a trainer's environment

exit codes: 0 success, 1 operation failed, 2 usage or configuration error.
"""

_CONFIG_HELP = "YAML config (default: $FORK_SIDECAR_CONFIG, else built-in defaults watching ./.art)"


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep its message to one line plus the usage."""


def _config_path(args: argparse.Namespace) -> Path | None:
    value = getattr(args, "config", None) or os.environ.get("FORK_SIDECAR_CONFIG")
    return Path(value) if value else None


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


# --- run ---------------------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from sidecar.daemon import Daemon
    from sidecar.journal import JournalError
    from sidecar.logs import setup_logging

    config = _load(args)
    setup_logging(config.log.level, config.log.format)
    try:
        return Daemon(config).run()
    except JournalError as e:
        print(f"fork-sidecar: {e}", file=sys.stderr)
        return EXIT_USAGE


# --- check-config ------------------------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    where = config.source_file or "built-in defaults"
    print(f"{where}: OK")
    print(f"  watch roots:   {', '.join(str(r) for r in config.watch.roots)} ({config.watch.mode})")
    print(f"  sources from:  {', '.join(str(r) for r in config.allowed_source_roots)}")
    print(f"  state dir:     {config.state_dir}")
    print(f"  runtime dir:   {config.runtime_dir}")
    print(f"  copy mode:     {config.swap.copy_mode}")
    missing = [r for r in config.watch.roots if not r.is_dir()]
    for root in missing:
        print(f"  note: {root} does not exist yet; the daemon starts watching it when it appears")
    return EXIT_OK


# --- fork --------------------------------------------------------------------------------------------------------
def _marker_text(args: argparse.Namespace, request_id: str) -> str:
    lines = []
    if args.source is not None:
        lines.append(f"source: {json.dumps(str(Path(args.source).absolute()))}")
    elif args.step is not None:
        lines.append(f"step: {args.step}")
    elif args.from_model is not None:
        lines.append(f"from_model: {json.dumps(args.from_model)}")
        if args.from_project:
            lines.append(f"from_project: {json.dumps(args.from_project)}")
        if args.not_after_step is not None:
            lines.append(f"not_after_step: {args.not_after_step}")
    lines.append(f"request_id: {request_id}")
    return "\n".join(lines) + "\n"


def cmd_fork(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir).absolute()
    if not (model_dir / CHECKPOINTS).is_dir():
        print(
            f"fork-sidecar: {model_dir} is not an ART run directory (it has no checkpoints/); "
            "pass {art_path}/{project}/models/{model}.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if (args.from_project or args.not_after_step is not None) and args.from_model is None:
        print("fork-sidecar: --from-project and --not-after-step go with --from-model.", file=sys.stderr)
        return EXIT_USAGE
    request_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)
    try:
        write_atomic(model_dir / MARKER, _marker_text(args, request_id).encode())  # appears whole, by rename
    except OSError as e:
        print(f"fork-sidecar: cannot write {model_dir / MARKER}: {e.strerror}; check permissions.", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {model_dir / MARKER} (request {request_id})")
    if not args.wait:
        return EXIT_OK
    return _wait_for_outcome(model_dir, request_id, args.timeout)


def _wait_for_outcome(model_dir: Path, request_id: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    said_claimed = False
    while time.monotonic() < deadline:
        for name in (DONE, FAILED):
            outcome = read_json_object(model_dir / name)
            if outcome and outcome.get("request_id") == request_id:
                _print_outcome(outcome)
                return EXIT_OK if outcome.get("status") == "done" else EXIT_FAILED
        claim = read_json_object(model_dir / INPROGRESS)
        if not said_claimed and claim and claim.get("request", {}).get("request_id") == request_id:
            by = claim.get("claimed_by", {})
            print(f"claimed by {by.get('host')} pid {by.get('pid')} as fork {claim.get('fork_id')}; working...")
            said_claimed = True
        time.sleep(0.05)
    state = "claimed but not finished" if said_claimed else "not claimed (is the daemon running? `fork-sidecar status`)"
    print(f"fork-sidecar: no outcome for request {request_id} after {timeout:g}s: {state}.", file=sys.stderr)
    return EXIT_FAILED


def _print_outcome(outcome: dict[str, Any]) -> None:
    status = outcome.get("status")
    print(f"fork {outcome.get('fork_id')}: {status}")
    print(f"  source:   {outcome.get('source')}")
    print(f"  digest:   {outcome.get('digest')}")
    for stage in ("swap", "trainers", "vllm", "verify"):
        s = outcome.get(stage) or {}
        detail = f" ({s['error']})" if s.get("error") else ""
        secs = f" {s['seconds']:.3f}s" if isinstance(s.get("seconds"), int | float) else ""
        print(f"  {stage + ':':9} {s.get('status', '-')}{secs}{detail}")
    if outcome.get("error"):
        print(f"  error:    {outcome['error']}")


# --- status ------------------------------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    state = config.state_dir
    daemon = read_json_object(state / "status.json") or {}
    pid = daemon.get("pid")
    running = bool(daemon.get("running")) and isinstance(pid, int) and psutil.pid_exists(pid)
    in_flight = [d for p in sorted((state / "forks").glob("*.json")) if (d := read_json_object(p))]
    report: dict[str, Any] = {
        "daemon": {**daemon, "running": running},
        "in_flight": in_flight,
        "recent": read_history(state, args.limit),
        "agents": _agent_statuses(config),
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return EXIT_OK
    if running:
        print(f"daemon: running, pid {daemon.get('pid')}, {daemon.get('watched_runs')} runs ({daemon.get('backend')})")
    else:
        print(f"daemon: not running (state dir {state})")
    for run in daemon.get("queued_runs", []) if running else []:
        print(f"  queued: {run}")
    for rec in in_flight:
        print(f"  in flight: {rec.get('model_dir')} fork {rec.get('fork_id')} state {rec.get('state')}")
    print("recent forks:" if report["recent"] else "recent forks: none")
    for rec in reversed(report["recent"]):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("finished_at") or rec.get("started_at", 0)))
        error = f" — {rec['error']}" if rec.get("error") else ""
        print(f"  {when} {rec.get('state'):6} {rec.get('model_dir')} {rec.get('fork_id')}{error}")
    for agent in report["agents"]:
        print(f"  agent pid {agent.get('pid')}: {json.dumps(agent, default=str)}")
    return EXIT_OK


def _agent_statuses(config: Config) -> list[dict[str, Any]]:
    from sidecar.trainers import agent_statuses

    try:
        return list(agent_statuses(config.runtime_dir))
    except OSError:
        return []


# --- parser ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="fork-sidecar", description=_MAIN_HELP, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"fork-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run the daemon in the foreground (systemd: Type=notify)",
        formatter_class=fmt,
        description="Watch the configured art paths for .fork markers and carry the forks out.\n\n"
        "Under systemd it reports READY=1 after the first scan, pings the watchdog and logs to journald\n"
        "with FORK_RUN/FORK_ID/FORK_STAGE fields. SIGHUP reloads the config; SIGTERM stops after the\n"
        "running forks reach a journaled state (an interrupted fork resumes at the next start).\n\n"
        "examples:\n  fork-sidecar run                      watch ./.art with built-in defaults\n"
        "  fork-sidecar run --config config.yaml",
    )
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "fork",
        help="request a fork of a run by writing its .fork marker",
        formatter_class=fmt,
        description="Write MODEL_DIR/.fork atomically. With no source option the fork takes the newest\n"
        "checkpoint of the run other than 0000. A marker that is not yet claimed is replaced (the last\n"
        "request wins); one written while a fork runs is taken after it.\n\n"
        "examples:\n  fork-sidecar fork .art/proj/models/m\n"
        "  fork-sidecar fork .art/proj/models/m --step 40 --wait\n"
        "  fork-sidecar fork .art/proj/models/m --from-model base-run --not-after-step 100 --wait\n"
        "  fork-sidecar fork .art/proj/models/m --source /data/ckpts/good-0042 --wait --timeout 600",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the run: {art_path}/{project}/models/{model}")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source", metavar="PATH", help="a checkpoint directory (inside the allowed source roots)")
    src.add_argument("--step", type=int, metavar="N", help="a step of this run (checkpoints/NNNN)")
    src.add_argument("--from-model", metavar="NAME", help="the newest checkpoint of a sibling model")
    p.add_argument("--from-project", metavar="NAME", help="with --from-model: the model's project")
    p.add_argument("--not-after-step", type=int, metavar="N", help="with --from-model: newest step <= N")
    p.add_argument("--wait", action="store_true", help="wait for the outcome; exit 0 done, 1 failed")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="with --wait: give up after S seconds")
    p.set_defaults(func=cmd_fork)

    p = sub.add_parser(
        "status",
        help="what the daemon is doing, forks in flight and recent outcomes",
        formatter_class=fmt,
        description="Read the daemon's state dir (and ask trainer agents) and print a summary.\n\n"
        "examples:\n  fork-sidecar status\n  fork-sidecar status --json | jq .recent",
    )
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=10, metavar="N", help="recent outcomes to show (default 10)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "check-config",
        help="validate a config file and print what it means",
        formatter_class=fmt,
        description="Exit 0 when the config is valid, 2 with one sentence naming the key otherwise.\n\n"
        "examples:\n  fork-sidecar check-config --config /etc/fork-sidecar/config.yaml",
    )
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.set_defaults(func=cmd_check_config)

    add_doctor_parser(sub)

    add_preload_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"fork-sidecar: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
