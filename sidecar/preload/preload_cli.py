"""`fork-sidecar preload install|uninstall|status [--python PATH]`: argument parsing only; the work is in install.py."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sidecar.preload import install as preload_install

__all__ = ["add_parser", "main", "run"]

_ACTIONS = {
    "install": "copy the preload into the interpreter's site-packages and add its .pth file",
    "uninstall": "remove exactly what install wrote",
    "status": "say whether the preload is installed there, its version, and what the dtype patch would do",
}


_DESCRIPTION = """\
Install, remove or inspect the preload that runs inside trainer processes: the control-socket agent that
lets the daemon hand a fork to a running trainer, and the Unsloth mixed-dtype patch.

install copies the sidecar package into {site-packages}/_fork_sidecar/ of that interpreter and writes
_fork_sidecar.pth, one line that can never stop the interpreter from starting. Every process of that
environment runs it (multiprocessing spawn children and torchrun workers too); it imports nothing heavy
and arms its integrations only when ART or Unsloth is imported. FORK_SIDECAR_PRELOAD=0 turns it off in
one process, FORK_SIDECAR_DTYPE_PATCH=0 only the dtype patch; agents put their sockets in
$FORK_SIDECAR_RUNTIME_DIR (default /run/fork-sidecar), which must match the daemon's runtime_dir.

The adapter digest needs the `blake3` package. An environment that cannot import it gets the daemon's
version written into _fork_sidecar/ too: copied when it runs the daemon's Python version, else fetched
by pip for its version (a node without an index: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR-OF-WHEELS).

examples:
  fork-sidecar preload install --python /opt/trainer-venv/bin/python
  fork-sidecar preload status --python /opt/trainer-venv/bin/python     installed? current? dtype patch?
  fork-sidecar preload status --json | jq .dtype_patch_applies
  fork-sidecar preload uninstall --python /opt/trainer-venv/bin/python

exit codes: 0 done, 2 bad input or an environment that cannot be written (one sentence on stderr).
"""


def _add_actions(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="preload_action", required=True, metavar="{install,uninstall,status}")
    for name, help_text in _ACTIONS.items():
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument(
            "--python",
            metavar="PATH",
            default=None,
            help="the trainer environment's interpreter (default: the one running this command)",
        )
        if name == "status":
            action.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def add_parser(subparsers: Any) -> None:
    """Register `preload` on the CLI's subparsers; the parsed namespace's `func(args)` returns the exit code."""
    parser = subparsers.add_parser(
        "preload",
        help="install the trainer-side preload into a Python environment",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION,
    )
    _add_actions(parser)


def run(args: argparse.Namespace) -> int:
    """Carry out the parsed action: 0 done, 2 bad input or an environment we cannot write (one sentence on stderr)."""
    try:
        if args.preload_action == "install":
            report = preload_install.install(args.python)
            again = f" (replaced {report.replaced_version})" if report.replaced_version else ""
            print(f"preload {report.version} installed for {report.python}{again}: {report.pth}, {report.private_dir}/")
            print(f"adapter digest: {report.digest_library}")
        elif args.preload_action == "uninstall":
            removed = preload_install.uninstall(args.python)
            print(f"preload removed ({len(removed)} paths)" if removed else "preload was not installed there")
        else:
            state = preload_install.status(args.python)
            print(json.dumps(state.to_json(), indent=1) if args.json else "\n".join(state.lines()))
    except preload_install.PreloadError as error:
        print(f"fork-sidecar preload: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m sidecar.preload.preload_cli install|uninstall|status [--python PATH]`."""
    parser = argparse.ArgumentParser(prog="fork-sidecar preload")
    _add_actions(parser)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
