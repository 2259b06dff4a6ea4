"""The tenant label of an API key (src/frontend/admit.c) gives nothing of the key away, through the
real binaries. /metrics is open by default, and it labels tenants: the label is "key-" and the
first 16 hex digits of HMAC-SHA256(secret, key), not an unkeyed hash that whoever scrapes /metrics
could test guessed keys against offline.

  1. With --tenant-label-secret-file, the label of each of two keys is exactly that HMAC (computed
     here) under the file's content (its trailing newline stripped, as --rpc-secret-file's is),
     never the FNV-1a 64 of the key the label used to be (standard offset basis, or the truncated
     one the frontend had), and the key itself appears nowhere in /metrics. A second frontend
     given the same file labels the keys identically (several frontends and restarts agree); the
     environment twin BATON_TENANT_LABEL_SECRET_FILE works the same. A frontend with --threads 2
     and the file labels a key the same on both loops (one series, the expected value) once each
     loop has served it, and labels 48 concurrent requests of 6 keys exactly.
  2. Without the file each frontend draws a random secret: two such frontends label the same key
     differently, with labels that are neither the FNV-1a nor the labels of the shared secret.
  3. A secret file that does not exist, or is empty (or holds only a newline), is a start-up error
     (exit 2, like every bad flag) naming the flag and the file, for `baton frontend` (flag and
     twin) and for `baton run`, which checks its frontend's flags before it starts anything.
"""

import hashlib
import hmac
import os
import re
import subprocess

import batonlib as bl

bl.deadline(150, "test_tenant_labels")
BIN = bl.baton_bin()
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "BATON_", "NATS_", "ETCD_"))}
KEYS = ("alpha-key-1", "sk-beta-0002")
SECRET = "label secret shared by the fleet"
LABEL_RX = re.compile(r'^key-[0-9a-f]{16}$')


def fnv1a64(s, basis):
    h = basis
    for b in s.encode():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"key-{h:016x}"


def unkeyed(s):
    """The labels an unkeyed FNV-1a 64 gives: with the standard offset basis, and with the one the
    frontend used (1469598103934665603, the standard 14695981039346656037 missing its last digit)."""
    return {fnv1a64(s, 14695981039346656037), fnv1a64(s, 1469598103934665603)}


def expected(secret, key):
    return "key-" + hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()[:16]


def call(fe, key, i=0):
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(f"tenant {i}", max_tokens=2),
                            headers={"Authorization": f"Bearer {key}"})
    assert st == 200, (fe, st, b)


def scrape(fe):
    st, _, data = bl.request("GET", fe.url + "/metrics")
    assert st == 200, (st, data[:200])
    return data.decode()


def tenant_labels(text):
    """tenant label values of baton_frontend_tenant_inflight_tokens (every known tenant)."""
    out = set()
    for line in text.splitlines():
        if line.startswith("baton_frontend_tenant_inflight_tokens{"):
            out.add(bl.parse_labels(line[line.index("{"):line.index("}") + 1])["tenant"])
    return out


def labels_of(fe):
    """{key: label} for KEYS, each sent alone on a fresh frontend so that the new label is its."""
    got = {}
    for i, k in enumerate(KEYS):
        before = tenant_labels(scrape(fe))
        call(fe, k, i)
        text = scrape(fe)
        assert k not in text, f"the key {k!r} itself is in /metrics"
        new = tenant_labels(text) - before
        assert len(new) == 1, f"{fe}: one new tenant label expected after a request with key {k!r}: {new}"
        got[k] = new.pop()
        assert LABEL_RX.match(got[k]), f"label {got[k]!r} is not key- and 16 hex digits"
        assert got[k] not in unkeyed(k), f"{fe}: the label of {k!r} is still its unkeyed FNV-1a 64 hash"
    return got


def refused(args, env=None, what=""):
    e = dict(CLEAN_ENV)
    e.update(env or {})
    p = subprocess.run([BIN] + args, env=e, capture_output=True, text=True, timeout=10)
    assert p.returncode == 2, f"{what}: exit {p.returncode}, expected 2\nstdout {p.stdout}\nstderr {p.stderr}"
    return p.stderr


work = bl.tmpdir("baton-tenant-labels-")
secret_file = os.path.join(work, "label-secret")
with open(secret_file, "w") as fp:
    fp.write(SECRET + "\n")
want = {k: expected(SECRET, k) for k in KEYS}
assert want[KEYS[0]] != want[KEYS[1]]

with bl.Cluster() as c:
    c.start_worker()
    shared = [c.start_frontend(tenant_label_secret_file=secret_file),
              c.start_frontend(env={"BATON_TENANT_LABEL_SECRET_FILE": secret_file})]
    random_ = [c.start_frontend(), c.start_frontend()]
    for fe in shared + random_:
        c.wait_workers(fe, 1)

    # 1. the shared secret: the exact HMAC, the same on every frontend given the file
    for fe in shared:
        got = labels_of(fe)
        assert got == want, f"{fe}: labels {got}, expected HMAC-SHA256 under the file's secret {want}"
    print(f"shared secret: both frontends label {KEYS} as {[want[k] for k in KEYS]}")

    # 2. no file: a random secret per process
    rand = [labels_of(fe) for fe in random_]
    for k in KEYS:
        assert rand[0][k] != rand[1][k], f"two frontends without a secret file label {k!r} the same: {rand[0][k]}"
        assert want[k] not in (rand[0][k], rand[1][k]), f"a random secret gave the shared secret's label for {k!r}"
    print(f"random secrets: {KEYS[0]!r} labelled {rand[0][KEYS[0]]} and {rand[1][KEYS[0]]}")

    # --threads 2: the secret is the process's, read once and shared by both loops
    fe = c.start_frontend(tenant_label_secret_file=secret_file, threads=2)
    c.wait_workers(fe, 1)
    served = lambda: {lbl["thread"] for lbl in (bl.parse_labels(k[k.index("{"):]) for k, v in
                      bl.metrics(fe.url).items() if k.startswith("baton_frontend_thread_requests_total{") and v > 0)}
    n = 0
    while len(served()) < 2:
        assert n < 60, f"60 requests on fresh connections all reached one loop of two: {served()}"
        call(fe, KEYS[0], n)
        n += 1
    text = scrape(fe)
    assert tenant_labels(text) == {want[KEYS[0]]}, f"--threads 2: labels {tenant_labels(text)}, want {want[KEYS[0]]}"
    # both loops labelling at once: 48 concurrent requests of 6 keys
    many = [f"concurrent-key-{j}" for j in range(6)]
    bl.run_concurrently(lambda i: call(fe, many[i % 6], i), [(i,) for i in range(48)], max_workers=16)
    got = tenant_labels(scrape(fe))
    need = {want[KEYS[0]]} | {expected(SECRET, k) for k in many}
    assert got == need, f"--threads 2, concurrent: labels {sorted(got)}, expected {sorted(need)}"
    print(f"--threads 2: {n} requests over both loops, one label {want[KEYS[0]]}; 48 concurrent requests of "
          f"6 keys labelled exactly")

# 3. bad secret files are usage errors
empty = os.path.join(work, "empty")
open(empty, "w").close()
newline = os.path.join(work, "newline")
with open(newline, "w") as fp:
    fp.write("\n")
missing = os.path.join(work, "no-such-file")
for path, why in ((missing, "No such file"), (empty, "is empty"), (newline, "is empty")):
    err = refused(["frontend", "--http-port", "0", "--tenant-label-secret-file", path], what=f"frontend {path}")
    assert "--tenant-label-secret-file" in err and path in err and why in err, err
    err = refused(["frontend", "--http-port", "0"], env={"BATON_TENANT_LABEL_SECRET_FILE": path},
                  what=f"frontend BATON_TENANT_LABEL_SECRET_FILE={path}")
    assert "BATON_TENANT_LABEL_SECRET_FILE" in err and path in err and why in err, err
err = refused(["run", "--http-port", str(bl.free_port()), "--tenant-label-secret-file", empty], what="baton run with an empty file")
assert "--tenant-label-secret-file" in err and empty in err, err
print("a missing or empty secret file: exit 2 naming the flag and the file (frontend, its twin, baton run)")
print("test_tenant_labels: OK")
