"""alice squats names: regular files `agent-<pid>.sock` for the next pids, wherever she can write them.

argv: RUNTIME_DIR COUNT UID_DIR... : the runtime dir itself and each `RUNTIME_DIR/<uid>` she can create or write.
"""

import json
import os
import sys

runtime_dir, count = sys.argv[1], int(sys.argv[2])
dirs = [runtime_dir] + [os.path.join(runtime_dir, uid) for uid in sys.argv[3:]]
first = os.getpid()
made = {}
for d in dirs:
    try:
        os.makedirs(d, exist_ok=True)
    except OSError:
        continue
    n = 0
    for pid in range(first, first + count):
        try:
            with open(os.path.join(d, f"agent-{pid}.sock"), "x"):
                n += 1
        except OSError:
            break
    made[d] = n
print(json.dumps(made), flush=True)
