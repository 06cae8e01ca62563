"""alice's impostor agent: listens wherever she can write an `agent-<her pid>.sock` and claims a run of bob's.

argv: RUNTIME_DIR RUN_DIR LOG [UID_DIR_TO_SQUAT]. Every request is logged as one JSON line; hello answers that this
process trains RUN_DIR, fork answers "loaded" with the digest the daemon sent (so a trusting daemon calls it done).
"""

import contextlib
import json
import os
import select
import socket
import sys
import threading

runtime_dir, run_dir, log_path = sys.argv[1:4]
squat_uid = sys.argv[4] if len(sys.argv) > 4 else None
name = f"agent-{os.getpid()}.sock"
lock = threading.Lock()


def places():
    dirs = [runtime_dir, os.path.join(runtime_dir, str(os.getuid()))]
    if squat_uid:
        dirs.append(os.path.join(runtime_dir, squat_uid))
    for d in dirs:
        with contextlib.suppress(OSError):
            os.makedirs(d, exist_ok=True)
        yield os.path.join(d, name)


def answer(request):
    op = request.get("op")
    if op == "fork":
        return {"ok": True, "result": "loaded", "digest": request.get("digest")}
    return {"ok": True, "protocol": 1, "pid": os.getpid(), "host": "alice", "runs": [run_dir], "kinds": ["peft"]}


def serve(conn, where):
    with conn:
        conn.settimeout(5)
        data = b""
        while b"\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        request = json.loads(data.split(b"\n")[0])
        with lock, open(log_path, "a") as log:
            log.write(json.dumps({"where": where, **request}) + "\n")
        conn.sendall(json.dumps(answer(request)).encode() + b"\n")


listeners = {}
for path in places():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(path)
        s.listen(8)
    except OSError:
        s.close()
        continue
    listeners[s.fileno()] = (s, path)
print("bound", json.dumps([p for _, p in listeners.values()]), flush=True)
while True:
    ready, _, _ = select.select(list(listeners), [], [], 1.0)
    for fd in ready:
        s, path = listeners[fd]
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn, path), daemon=True).start()
