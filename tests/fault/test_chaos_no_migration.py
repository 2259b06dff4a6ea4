"""The self-check of `baton chaos`: a run that should fail is failed, and its report tells the truth.

The worker kill -9 scenario with migration turned off (`--set topology.migration_limit=0`) must
FAIL: the streams the killed worker carried end early, which the scenario does not allow, and no
migration happens. The report must say what happened: the summary table's lost tokens are every
reference token the failed streams never delivered (recomputed here from run.json's outputs and
references), and the migrations check names migration being off, not a fault that hit nothing.
"""

import json
import os
import re
import subprocess

import batonlib as bl

bl.deadline(90, "test_chaos_no_migration")

BIN = bl.baton_bin()
SCEN = os.path.join(bl.repo_root(), "tools", "chaos", "scenarios")

out = bl.tmpdir()
env = dict(os.environ, BATON_CHAOS_DIR=os.path.join(bl.repo_root(), "tools", "chaos"))
p = subprocess.run([BIN, "chaos", "run", os.path.join(SCEN, "worker-kill9.toml"), "--set",
                    "topology.migration_limit=0", "--out", out, "--quiet"], capture_output=True, text=True,
                   timeout=75, env=env)
assert p.returncode == 1, f"a run with migration off was not failed (exit {p.returncode})\n{p.stdout}\n{p.stderr[-3000:]}"
with open(os.path.join(out, "worker-kill9", "run.json")) as f:
    r = json.load(f)
by = {c["name"]: c for c in r["checks"]}
assert r["verdict"] == "FAIL", r["verdict"]
assert by["all_ended"]["ok"] is False and by["migrations"]["ok"] is False, (by["all_ended"], by["migrations"])
assert by["evidence"]["ok"] is True, by["evidence"]  # the fault did happen: the failure is the system's
print(f"ok - with migration off the run fails: {by['all_ended']['detail'][:160]}")

# The lost tokens, from the raw record: each output that ended early (a load request, or a probe
# the kill caught too) misses the tail of its reference; its output must be a prefix of it, or
# byte_exact says otherwise. A refused connection with no output never reached a server.
run = r["run"]
failed = [q for q in run["requests"] if q["outcome"] != "ok"]
assert failed, "migration off, yet no load request failed: the fault hit nothing"
expected = 0
for q in (q for k in ("requests", "probes", "fresh") for q in run[k]):
    if q["outcome"] == "ok" or (q["outcome"] == "refused" and not q["token_ids"]):
        continue
    ref = run["references"][str(q["shape"])]["token_ids"]
    assert q["token_ids"] == ref[:len(q["token_ids"])], q
    expected += len(ref) - len(q["token_ids"])
assert expected > 0, failed
row = next(line for line in p.stdout.splitlines() if line.startswith("| worker-kill9 |"))
cells = [c.strip() for c in row.strip("|").split("|")]
assert cells[3] == str(len(failed)) and cells[4] == f"{expected} / 0", (row, len(failed), expected)
with open(os.path.join(out, "report.md")) as f:
    assert row in f.read()
print(f"ok - the table counts {len(failed)} errors and the {expected} reference tokens they never delivered")

detail = by["migrations"]["detail"]
assert "migration is off" in detail and "hit no stream" not in detail, detail
assert re.search(rf"\b{len(failed)} load requests? failed at the fault", detail), detail
print(f"ok - the migrations check says why: {detail}")
print("test_chaos_no_migration: all passed")
