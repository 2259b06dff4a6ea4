"""The quick subset of the fault matrix, through `baton chaos` as an operator runs it.

Runs the scenarios marked `quick = true` in tools/chaos/scenarios (worker kill -9, worker
SIGSTOP past the stall timeout, a client disconnect storm) with `baton chaos run --quick`, and
asserts that each passes every check of the oracle. The self-check, that the kill -9 scenario
with migration turned off FAILs, is test_chaos_no_migration.py.
"""

import json
import os
import subprocess

import batonlib as bl

bl.deadline(170, "test_chaos_quick")

BIN = bl.baton_bin()


def chaos(args, timeout):
    env = dict(os.environ, BATON_CHAOS_DIR=os.path.join(bl.repo_root(), "tools", "chaos"))
    p = subprocess.run([BIN, "chaos"] + args, capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


def read_run(out, name):
    with open(os.path.join(out, name, "run.json")) as f:
        return json.load(f)


out = bl.tmpdir()
rc, stdout, stderr = chaos(["run", "--quick", "--out", out], 120)
if rc != 0:
    bl.mark_failed()
    raise AssertionError(f"baton chaos run --quick exited {rc}\n{stdout}\n{stderr[-4000:]}")
names = sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
assert names == ["client-disconnect-storm", "worker-kill9", "worker-sigstop"], names
for name in names:
    r = read_run(out, name)
    assert r["verdict"] == "PASS", (name, r["checks"])
    by = {c["name"]: c for c in r["checks"]}
    for must in ("byte_exact", "all_ended", "baseline", "fresh_request", "evidence", "migrations", "processes"):
        assert by[must]["ok"] is True, (name, by[must])
    assert r["run"]["requests"], name
    assert os.path.getsize(os.path.join(out, name, "timeline.svg")) > 1000
    print(f"ok - {name}: PASS ({len(r['run']['requests'])} requests, {r['run']['migrations']} migrations; "
          f"{by['evidence']['detail'][:140]})")
with open(os.path.join(out, "report.md")) as f:
    md = f.read()
assert "| scenario | requests | completed | errors | lost / dup tokens | migrations | worst stall | recovery" in md
assert md.count("**PASS**") == 3, md

print("test_chaos_quick: all passed")
