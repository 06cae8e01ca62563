"""The doctor's checks of the trainer side: the preload in each interpreter, openpipe-art there, live agents."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.preload.art_compat import ArtInfo
from sidecar.checks.findings import Context, Finding, Level

__all__ = ["check_agents", "check_art", "check_preload"]


# --- preload ----------------------------------------------------------------------------------------------------------
def check_preload(ctx: Context) -> list[Finding]:
    from sidecar.preload import install

    if not ctx.pythons:
        return [
            Finding(
                "preload",
                "info",
                "no trainer interpreter given; pass --python PATH for each trainer environment to check its preload",
            )
        ]
    out = []
    for python in ctx.pythons:
        try:
            status = install.status(os.path.abspath(python) if os.sep in python else python)
        except install.PreloadError as e:
            out.append(Finding("preload", "problem", str(e), "pass the trainer environment's bin/python."))
            continue
        again = f"`fork-sidecar preload install --python {python}`"
        if status.installed and status.digest_library.startswith("no "):
            out.append(Finding("preload", "problem", f"{python}: {status.digest_library}", f"run {again}."))
        elif status.installed and status.up_to_date is not False and not status.disabled_here:
            note = f" ({status.version_note})" if status.version_note else ""
            out.append(Finding("preload", "ok", f"{python}: preload {status.installed_version} installed{note}"))
        elif status.installed and status.up_to_date is False:
            out.append(Finding("preload", "problem", f"{python}: {status.version_note}", f"run {again}."))
        elif status.installed:
            out.append(
                Finding(
                    "preload",
                    "problem",
                    f"{python}: installed, but FORK_SIDECAR_PRELOAD=0 in this environment turns it off",
                    "unset FORK_SIDECAR_PRELOAD where trainers start.",
                )
            )
        else:
            what = "partly installed" if status.partial else "not installed"
            out.append(Finding("preload", "problem", f"{python}: preload {what}", f"run {again}."))
    return out


# --- openpipe-art in trainer environments -----------------------------------------------------------------------------
def check_art(ctx: Context) -> list[Finding]:
    """openpipe-art in each trainer environment: a version without what the preload relies on is a problem."""
    from sidecar.preload import install
    from sidecar.preload.art_compat import probe_art

    out = []
    for python in ctx.pythons:
        try:
            interpreter = install.probe_interpreter(os.path.abspath(python) if os.sep in python else python)
        except install.PreloadError:
            continue  # the preload check already says this interpreter is unusable
        out.append(_art_finding(python, probe_art(interpreter.executable)))
    return out


def _art_finding(python: str, art: ArtInfo) -> Finding:
    from sidecar.preload.art_compat import TESTED_ART_VERSIONS

    problem, line = art.verdict()
    if problem:
        newest = TESTED_ART_VERSIONS[-1]
        return Finding(
            "art",
            "problem",
            f"{python}: {line}",
            f"pin a tested openpipe-art there (0.5.18 on Python 3.11, {newest} on Python 3.12), e.g. "
            f"`{python} -m pip install openpipe-art=={newest}`; until then forks do not reach that trainer "
            "(restart it after each fork) and ART's own forks get no marker (use `fork-sidecar fork`).",
        )
    level: Level = "ok" if art.tested or not art.installed else "info"
    return Finding("art", level, f"{python}: {line}")


# --- agents -----------------------------------------------------------------------------------------------------------
def check_agents(ctx: Context) -> list[Finding]:
    from sidecar.protocol.reasons import Reason
    from sidecar.trainers import agent_statuses

    agents = agent_statuses(ctx.config.runtime_dir)
    if not agents:
        return [Finding("agents", "info", f"no trainer agent in {ctx.config.runtime_dir} (no trainer running here?)")]
    out = []
    for agent in agents:
        pid, error = agent.get("pid"), agent.get("error")
        if error and agent.get("reason") == Reason.TRAINER_GONE:
            out.append(Finding("agents", "info", f"pid {pid}: {error}; the daemon removes it"))
        elif error:
            out.append(
                Finding(
                    "agents",
                    "problem",
                    f"agent of pid {pid} ({agent.get('socket')}) did not answer: {error}",
                    "run the doctor (and the daemon) as root or as the trainer's user; check the trainer is not hung.",
                )
            )
        else:
            runs = agent.get("runs") or []
            who = f"agent of pid {pid} (uid {agent.get('uid')})"
            out.append(Finding("agents", "ok", f"{who} answers; serves {len(runs)} run(s) (forks of its uid's runs)"))
    return out
