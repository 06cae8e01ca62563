"""`fork-sidecar doctor`'s coordination check: each etcd endpoint, the credentials, and the lease machinery.

Lease health is judged by etcd's clock alone (a lease granted, its time-to-live read back, refreshed, revoked),
never by comparing this host's clock with another's. etcd3gw is imported only when the backend is etcd.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from sidecar.config import Config

Level = Literal["ok", "info", "problem"]
Finding = tuple[Level, str, str | None]

__all__ = ["coordination_findings"]

_FIX_ENDPOINT = "start etcd there or fix coordination.etcd.endpoints; until it answers no marker is claimed."


def coordination_findings(config: Config) -> list[Finding]:
    """(level, message, fix) for the configured coordination backend (doctor.Finding's fields)."""
    if config.coordination.backend != "etcd":
        return [("ok", "filesystem claims (no coordination server; one node, or nodes sharing a root)", None)]
    try:
        from sidecar.claims.etcd_client import EtcdAuthError, EtcdDown, EtcdSession  # the optional extra
    except ImportError:
        return [
            (
                "problem",
                "coordination.backend is etcd but etcd3gw is not installed",
                "pip install 'fork-sidecar[etcd]' into the daemon's environment.",
            )
        ]
    etcd = config.coordination.etcd
    out: list[Finding] = []
    answering = []
    for url in etcd.endpoints:
        session = EtcdSession(dataclasses.replace(etcd, endpoints=(url,)), request_timeout=3.0)
        try:
            status: dict[str, Any] = session.call("maintenance/status", {})
        except EtcdAuthError as e:
            out.append(("problem", str(e), "fix coordination.etcd.user / password_file, or grant the user a role."))
            continue
        except EtcdDown as e:
            out.append(("problem", f"{url} does not answer ({e})", _FIX_ENDPOINT))
            continue
        answering.append(session)
        out.append(("ok", f"{url} answers (etcd {status.get('version', '?')})", None))
    if not answering:
        return out
    out += _lease_and_keys(answering[0], config, EtcdDown, EtcdAuthError)
    return out


def _lease_and_keys(session: Any, config: Config, down: type[Exception], auth: type[Exception]) -> list[Finding]:
    etcd = config.coordination.etcd
    prefix = etcd.prefix.rstrip("/")
    probe = f"{prefix}/doctor/{config.node.name}"
    ttl = max(2, round(etcd.lease_ttl))
    try:
        lease = session.grant(ttl)
        try:
            left = session.time_to_live(lease)
            refreshed = session.keepalive(lease)
            session.put(probe, {"doctor": config.node.name}, lease)
            session.delete(probe)
        finally:
            session.revoke(lease)
        member = session.get(f"{prefix}/members/{config.node.name}")
        member_left = session.time_to_live(member.lease) if member is not None else None
    except auth as e:
        return [
            (
                "problem",
                f"etcd refuses the daemon's keys under {prefix}: {e}",
                f"grant the user read-write on {prefix} (etcdctl role grant-permission --prefix).",
            )
        ]
    except down as e:
        return [("problem", f"etcd stopped answering during the lease check ({e})", _FIX_ENDPOINT)]
    out: list[Finding] = []
    if 0 < left <= ttl and refreshed == ttl:
        out.append(
            (
                "ok",
                f"leases work: granted {ttl}s, etcd counted {left}s left and refreshed it to {refreshed}s; "
                f"keys under {prefix} can be written",
                None,
            )
        )
    else:
        out.append(
            (
                "problem",
                f"a {ttl}s lease read back as {left}s and refreshed to {refreshed}s",
                "check the etcd cluster's health (etcdctl endpoint status); leases there do not behave.",
            )
        )
    if member_left is None:
        out.append(
            ("info", f"no daemon is registered as node {config.node.name} (not running, or another node.name)", None)
        )
    elif member_left > 0:
        out.append(
            ("ok", f"the daemon of node {config.node.name} holds a live lease ({member_left}s of {ttl}s left)", None)
        )
    else:
        out.append(
            (
                "problem",
                f"node {config.node.name}'s lease has expired",
                "check the daemon's log for etcd keepalive failures (journalctl -u fork-sidecar).",
            )
        )
    return out
