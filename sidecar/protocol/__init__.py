"""What both ends of the control socket share, and all the trainer side needs besides the preload itself.


Each agent listens on `{runtime_dir}/{uid}/agent-{pid}.sock`: one directory per user, 0700 and owned by that user,
so nobody can put a socket or a squatting file where another user's agents go. The daemon (root) makes these
directories for the owners of the runs it watches; an agent creates a missing one itself only inside a directory its
own user alone controls (single-user setups and tests), and otherwise waits for the daemon.

One request per connection: the client writes one JSON object and a newline, reads one JSON object and a newline
back, and both sides close. Messages are bounded
(`MAX_MESSAGE_BYTES`) and every read and write has a timeout, so a stuck or hostile peer costs a thread for a few
seconds, never the trainer. Replies are `{"ok": true, ...}` or `{"ok": false, "error": {"code", "message"}}`.

Trust runs both ways and is checked with the kernel's word for it (`SO_PEERCRED`), never the peer's:
- the agent answers only its own uid and root;
- the daemon talks to `{uid}/agent-<pid>.sock` only if the directory and the socket file belong to <uid>, <pid> runs
  as <uid>, and the process listening on it is <pid> itself, so one user cannot pose as another user's trainer;
- which runs an agent is told about is the trainers stage's rule: only runs its uid owns (or any, for root).
Nothing a peer sends is executed; a `fork` names directories that the agent checks against the runs it serves.

The modules: `paths` (socket and directory names), `framing` (one bounded JSON line each way), `messages` (the
requests and replies), `peercred` (the kernel's word on the peer), `server` (the agent end), `client` (the daemon
end), `digest` (the adapter digest both ends compute), `safetensors_header` (the one safetensors header parser),
`reasons` (failure reasons as data), `fdwait`, `atomic_write`, `hasher` (finds `blake3` for the digest). Stdlib only
but for `blake3`: `fork-sidecar preload install` copies this package and `sidecar/preload/` into trainer environments,
nothing else of the daemon, and provides `blake3` where one lacks it (sidecar/digest_library.py).
"""
