"""Who forks a marker when several daemons could: the claim interface (base) and its backends.

`filesystem` is the embedded default (the claim is a file beside the marker, renewed by heartbeats); `etcd` puts the
claim in an etcd transaction bound to the daemon's lease. The pipeline talks to `base.Claims` only.
"""
