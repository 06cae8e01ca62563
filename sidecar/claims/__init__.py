"""Who forks a marker when several daemons could: the claim interface (base) and its backends.

`filesystem` is the embedded default (the claim is a file beside the marker, renewed by heartbeats); `etcd` puts the
claim in an etcd transaction bound to the daemon's lease. The pipeline talks to `base.Claims` only.
"""

from __future__ import annotations

from sidecar.claims.base import Claims
from sidecar.config import Config, ConfigError

__all__ = ["claims_for"]


def claims_for(config: Config) -> Claims:
    """The backend `coordination.backend` names; etcd's client library is imported only when it is etcd."""
    if config.coordination.backend == "etcd":
        try:
            from sidecar.claims.etcd import EtcdClaims  # an optional extra: imported only here
        except ImportError as e:
            raise ConfigError(
                f"{config.source_file}: coordination.backend: etcd needs the etcd3gw client ({e}); "
                "pip install 'fork-sidecar[etcd]' into the daemon's environment."
            ) from None
        return EtcdClaims(config)
    from sidecar.claims.filesystem import FilesystemClaims

    return FilesystemClaims(config)
