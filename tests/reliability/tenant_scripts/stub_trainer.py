"""A trainer: the real preload agent (sidecar.preload.agent) serving runs through stub targets.

argv: RUN_DIRS LOG [hang]. RUN_DIRS is one run directory or several joined by ':'. Each target answers a fork as
loaded with the digest the daemon sent and logs the request; what is under test is who the daemon tells, not loading
weights (tests/test_trainers.py loads real ones). With `hang`, a fork is logged and then never answered: a trainer
stuck in its step, holding every fork sent to it until the daemon gives up.
"""

import json
import os
import sys
import time

from sidecar.preload.agent import current_agent
from sidecar.protocol.messages import ok_reply

run_dirs, log_path = sys.argv[1:3]
hang = sys.argv[3:4] == ["hang"]


class StubTarget:
    kind = "stub"

    def __init__(self, run):
        self.run = os.path.realpath(run)

    def alive(self):
        return True

    def serves(self):
        return [self.run]

    def fork(self, request, checkpoint_dir):
        with open(log_path, "a") as log:
            log.write(json.dumps({"op": "fork", "fork_id": request.fork_id, "digest": request.digest}) + "\n")
        while hang:
            time.sleep(1)
        return ok_reply(result="loaded", digest=request.digest)

    def describe(self):
        return {"kind": self.kind, "run_dir": self.run}


agent = current_agent()
for run_dir in run_dirs.split(":"):
    agent.add(StubTarget(run_dir))
print("registered", agent.socket_path, flush=True)
while True:
    time.sleep(1)
