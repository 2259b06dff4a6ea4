"""A small fleet through bench/fleet.py: the scale path kept in the suite at a size that runs fast.

40 mocker workers on a real etcd (discovery) and a real nats-server (event plane), two frontends,
grown in two stages (10, then 40). Checked: both frontends list every worker; a worker started
later is listed by both, and one killed with SIGKILL is dropped by both (each within a generous
10 s: the bench reports the real times); 200 streams over both frontends complete and their text
equals the fault-free run's byte for byte although 5 workers are SIGKILLed while they stream; and
the fault really happened (the frontends counted migrations).
"""

import json
import os
import subprocess
import sys

import batonlib as bl

bl.deadline(300, "test_fleet")

root = bl.repo_root()
args = [sys.executable, os.path.join(root, "bench", "fleet.py"), "--workers", "40", "--stages", "10", "--streams",
        "200", "--tokens", "60", "--kill", "5", "--churn-rounds", "2", "--idle-window", "1", "--route-requests", "200"]
p = subprocess.run(args, capture_output=True, text=True, timeout=280, env=dict(os.environ, BATON_BIN=bl.baton_bin()))
print(p.stdout[-4000:])
if p.returncode != 0:
    print(p.stderr[-4000:])
lines = [line for line in p.stdout.splitlines() if line.startswith("summary: ")]
assert lines, f"bench/fleet.py printed no summary (exit {p.returncode})"
s = json.loads(lines[-1][len("summary: "):])
assert p.returncode == 0, f"bench/fleet.py failed (exit {p.returncode}): {s}"
assert s["ok"] == 200 and s["failed"] == 0, f"streams lost: {s}"
assert s["digest_equal"], f"the streamed text differs from the fault-free run: {s}"
assert s["migrations"] >= 1, f"no stream migrated: the SIGKILLs did not hit a serving worker ({s})"
assert s["seen_max_s"] < 10 and s["gone_max_s"] < 10, f"a fleet change took too long to be seen: {s}"
assert len(s["routable_s"]) == 2, s
print("test_fleet: ok", s)
