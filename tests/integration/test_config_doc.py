"""docs/configuration.md is the binary's own flag reference: `scripts/config-doc --check` must find
it identical to what `baton run|frontend|worker --help` print now (every flag, its environment
twin, its default and its meaning), and the help must say what the code does: a few defaults
are checked against the behaviour of a started frontend."""

import os
import subprocess
import sys

import batonlib as bl

bl.deadline(60, "test_config_doc")
root = bl.repo_root()
r = subprocess.run([sys.executable, os.path.join(root, "scripts", "config-doc"), "--check", bl.baton_bin()],
                   capture_output=True, text=True, timeout=30)
assert r.returncode == 0, f"{r.stdout}{r.stderr}"

with open(os.path.join(root, "docs", "configuration.md")) as f:
    doc = f.read()
for line in ("| `--threads` | `DYN_HTTP_THREADS` | `1` |", "| `--migration-limit` | `DYN_MIGRATION_LIMIT` | `3` |",
             "| `--system-port` | `DYN_SYSTEM_PORT` | `9090` |", "| `--max-concurrent-requests` | "
             "`DYN_MAX_CONCURRENT_REQUESTS` | `20000` |"):
    assert line in doc, f"{line!r} missing from docs/configuration.md"

# the defaults the page states are the ones a started frontend uses
with bl.Cluster() as c:
    fe = c.start_frontend()
    fe.proc.wait_log(r"Request migration enabled \(limit: 3\)", 5)
    fe.proc.wait_log(r"frontend listening on .*, 1 thread\)", 5)
print("test_config_doc: ok")
