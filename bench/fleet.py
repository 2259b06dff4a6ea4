#!/usr/bin/env python3
"""Fleet scale on one machine: many worker processes on etcd discovery and the NATS event plane,
two frontends, streams that must stay byte-exact while workers are killed.

Everything runs on loopback: one etcd member, one nats-server, two frontends (`--discovery etcd
--event-plane nats`), and the workers (mocker) started in stages, so that the per-request routing
cost can be read at several fleet sizes in one run. Phases, in order:

  A. stages: the fleet grows to each size in --stages (default 10,100,N). At each size: the time
     from the first spawn of the stage until every worker is routable on both frontends (their
     GET /health lists it); then the frontends' CPU per request for short requests (max_tokens 1,
     --route-requests of them spread over both frontends), which is routing plus one round trip
     and must stay flat as the fleet grows; the frontends' RSS and idle CPU (heartbeats, load
     reports, discovery) per known worker; NATS message rate (load reports) and etcd's CPU.
  B. churn: --churn-rounds times, one more worker is started and the time until both frontends
     list it is taken; then it is killed with SIGKILL and the time until both have dropped it.
  C. storm: --streams streams (--tokens each) over both frontends, once without faults (the
     reference digest) and once with --kill workers SIGKILLed one second in; every request must
     complete and the digest (the text of every request) must equal the reference: byte-exact.

Benches report, they do not assert; the run fails only when a request fails or the text differs.
usage: BATON_BIN=build/baton python3 bench/fleet.py [--workers 500] [--stages 10,100] [--streams 1000]
           [--kill 50] [--tokens 40] [--speedup 1] [--churn-rounds 20]
"""

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402
import natslib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perf  # noqa: E402
from perf import load_bin, pctl  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / HZ


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def health_ids(fe):
    try:
        with urllib.request.urlopen(fe + "/health", timeout=5) as r:
            return {i["instance_id"] for i in json.loads(r.read()).get("instances") or []}
    except OSError:
        return None


class Fleet:
    def __init__(self, a, d):
        self.a, self.dir = a, d
        os.makedirs(os.path.join(d, "etcd"), exist_ok=True)
        self.etcd = bl.Etcd(n=1, dir=os.path.join(d, "etcd"))
        self.etcd.start()
        self.nats = natslib.NatsServer(d).start()
        self.common = ["--discovery", "etcd", "--etcd-endpoints", self.etcd.endpoints, "--event-plane", "nats",
                       "--nats-server", self.nats.url]
        self.frontends = []
        for i in range(2):
            port = bl.free_port()
            p = bl.Proc([bl.baton_bin(), "frontend", "--http-host", "127.0.0.1", "--http-port", port,
                         "--max-connections", 30000, "--max-concurrent-requests", 100000,
                         "--shutdown-accept-window-ms", 0] + self.common,
                        log=os.path.join(d, f"frontend-{i}.log"), name=f"frontend-{i}")
            url = f"http://127.0.0.1:{port}"
            bl.wait_http(url + "/live", p, timeout=20)
            self.frontends.append((url, p))
        self.workers = []  # (Proc, instance id or None)

    def spawn_worker(self):
        n = len(self.workers)
        p = bl.Proc([bl.baton_bin(), "worker", "--rpc-host", "127.0.0.1", "--rpc-port", 0, "--speedup-ratio",
                     self.a.speedup, "--discovery-ttl", 10] + self.common,
                    env={"DYN_SYSTEM_PORT": "-1", "DYN_LOG": "info"}, log=os.path.join(self.dir, f"worker-{n}.log"),
                    name=f"worker-{n}")
        self.workers.append([p, None])
        return p

    def live_workers(self):
        return [w for w in self.workers if w[0].alive()]

    def wait_routable(self, n, timeout):
        """Waits until both frontends list exactly n workers; returns the seconds it took."""
        t0 = time.monotonic()
        bl.wait_for(lambda: all(len(health_ids(u) or ()) == n for u, _ in self.frontends), timeout, interval=0.2,
                    what=f"{n} workers routable on both frontends")
        return time.monotonic() - t0

    def fe_cpu(self):
        return sum(cpu_s(p.pid) for _, p in self.frontends)


def run_load(urls, streams, tokens, requests=None):
    """baton-sse-load spread over every frontend of urls (perf.run_load)."""
    return perf.run_load(",".join(urls), streams, tokens, requests=requests, rate=2000)


def stage(f, size, a):
    have = len(f.live_workers())
    t0 = time.monotonic()
    for _ in range(size - have):
        f.spawn_worker()
    spawned = time.monotonic() - t0
    took = f.wait_routable(size, timeout=max(60, size * 0.5)) + spawned
    time.sleep(2)  # let the connections and first load reports settle
    urls = [u for u, _ in f.frontends]
    # idle cost first: heartbeats, load reports, discovery, over a quiet window
    nats0 = varz(f.nats)
    e0 = etcd_cpu(f.etcd)
    c0 = f.fe_cpu()
    time.sleep(a.idle_window)
    c1 = f.fe_cpu()
    e1 = etcd_cpu(f.etcd)
    nats1 = varz(f.nats)
    idle_rate = (c1 - c0) / a.idle_window  # CPU-seconds per second, both frontends
    msgs = (nats1["in_msgs"] - nats0["in_msgs"]) / a.idle_window
    byts = (nats1["in_bytes"] - nats0["in_bytes"]) / a.idle_window
    # routing cost: short requests (max_tokens 1); the frontends' CPU over the load less what they
    # spend idle over the same time, per request
    t0, c0 = time.monotonic(), f.fe_cpu()
    r = run_load(urls, 50, 1, requests=a.route_requests)
    t1, c1 = time.monotonic(), f.fe_cpu()
    if r["exit"] != 0:
        raise SystemExit(f"routing load at {size} workers failed: {r}")
    per_req_us = max(0.0, (c1 - c0) - idle_rate * (t1 - t0)) / a.route_requests * 1e6
    rss = [rss_mib(p.pid) for _, p in f.frontends]
    sample = [w[0] for w in f.live_workers()[:20]]
    wrss = statistics.mean(rss_mib(p.pid) for p in sample) if sample else 0.0
    return {"worker_rss_mib": wrss, "size": size, "routable_s": took, "spawn_s": spawned, "route_cpu_us_per_req": per_req_us,
            "idle_fe_cpu_pct": idle_rate * 100 / 2, "fe_rss_mib": sum(rss) / 2,
            "nats_msgs_s": msgs, "nats_bytes_s": byts, "etcd_cpu_pct": (e1 - e0) / a.idle_window * 100}


def etcd_cpu(etcd):
    return sum(cpu_s(p.pid) for p in etcd.procs if p is not None and p.alive())


def varz(nats):
    with urllib.request.urlopen(f"http://127.0.0.1:{nats.http_port}/varz", timeout=5) as r:
        return json.loads(r.read())


def until_all(f, t0, seen_by, failure):
    """Seconds from t0 until every frontend's /health satisfied seen_by(frontend index, its instance
    ids), polled every 5 ms: the time of the slowest one. Exits with failure after 30 s."""
    times = {}
    while time.monotonic() < t0 + 30 and len(times) < len(f.frontends):
        for i, (u, _) in enumerate(f.frontends):
            if i not in times and seen_by(i, health_ids(u) or set()):
                times[i] = time.monotonic() - t0
        time.sleep(0.005)
    if len(times) < len(f.frontends):
        raise SystemExit(failure)
    return max(times.values())


def churn(f, rounds):
    seen, gone = [], []
    for _ in range(rounds):
        before = [health_ids(u) for u, _ in f.frontends]
        t0 = time.monotonic()
        p = f.spawn_worker()
        new = set()

        def appeared(i, ids):
            new.update(ids - before[i])
            return bool(ids - before[i])

        seen.append(until_all(f, t0, appeared, "a new worker was not seen by both frontends within 30 s"))
        new_id = next(iter(new))
        time.sleep(0.5)
        t0 = time.monotonic()
        p.kill(signal.SIGKILL)
        gone.append(until_all(f, t0, lambda i, ids: new_id not in ids, "a killed worker was still listed after 30 s"))
        p.wait(10)
    return seen, gone


def storm(f, a):
    urls = [u for u, _ in f.frontends]
    ref = run_load(urls, a.streams, a.tokens, requests=a.streams)
    if ref["exit"] != 0:
        raise SystemExit(f"reference load failed: {json.dumps(ref)[:500]}")
    live = f.live_workers()
    victims = random.Random(7).sample(live, min(a.kill, len(live)))
    args = [load_bin(), "--url", ",".join(urls), "--streams", str(a.streams), "--max-tokens", str(a.tokens),
            "--rate", "2000", "--timeout", "600", "--requests", str(a.streams)]
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(a.kill_after)
        for w in victims:
            w[0].kill(signal.SIGKILL)
        out, err = p.communicate(timeout=660)
    finally:  # the load generator is no bl.Proc: nothing else would stop it
        if p.poll() is None:
            p.kill()
            p.wait()
    wall = time.monotonic() - t0
    res = json.loads(out)
    res["exit"] = p.returncode
    mig = 0
    for u, _ in f.frontends:
        samples = bl.metrics(u)
        mig += bl.metric_sum(samples, "dynamo_frontend_model_migration_total")
    return ref, res, wall, mig


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=500)
    ap.add_argument("--stages", default="10,100", help="fleet sizes measured on the way to --workers")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("--kill", type=int, default=50)
    ap.add_argument("--kill-after", type=float, default=1.0)
    ap.add_argument("--speedup", type=float, default=0.2,
                    help="mocker --speedup-ratio: 0.2 is about 50 ms a token, so streams are mid-way at the kill")
    ap.add_argument("--route-requests", type=int, default=5000)
    ap.add_argument("--idle-window", type=float, default=10.0)
    ap.add_argument("--churn-rounds", type=int, default=20)
    a = ap.parse_args()
    bl.deadline(3600, "fleet bench")
    d = bl.tmpdir("fleet")
    sizes = [int(x) for x in a.stages.split(",") if x] + [a.workers]
    f = Fleet(a, d)
    rows = []
    try:
        for size in sizes:
            rows.append(stage(f, size, a))
            print(json.dumps(rows[-1]), flush=True)
        seen, gone = churn(f, a.churn_rounds)
        ref, res, wall, mig = storm(f, a)
    finally:
        procs = [w[0] for w in f.workers] + [p for _, p in f.frontends]
        for p in procs:
            p.kill(signal.SIGTERM)
        for p in procs:
            if p.wait(10) is None:
                p.kill(signal.SIGKILL)
        f.nats.kill()
        f.etcd.stop()
    print()
    print(f"etcd 1 member, nats-server, 2 frontends (etcd discovery, NATS event plane), mocker workers "
          f"--speedup-ratio {a.speedup}; {os.cpu_count()} CPUs")
    print("| workers | all routable on both frontends (from the first spawn) | frontend CPU per request "
          "(routing, max_tokens 1) | frontend RSS | frontend idle CPU (per frontend) | per known worker: RSS / idle CPU "
          "| load reports on NATS | etcd CPU | worker RSS (mean of 20) |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows[0]
    for r in rows:
        n = r["size"]
        if n == base["size"]:
            per = "(the base)"
        else:  # what the workers added since the smallest fleet, per worker added
            dn = n - base["size"]
            per = (f"{(r['fe_rss_mib'] - base['fe_rss_mib']) / dn * 1024:.1f} KiB / "
                   f"{(r['idle_fe_cpu_pct'] - base['idle_fe_cpu_pct']) / dn * 1000:.2f} m%")
        print(f"| {n} | {r['routable_s']:.1f} s (spawning {r['spawn_s']:.1f} s) | {r['route_cpu_us_per_req']:.0f} µs "
              f"| {r['fe_rss_mib']:.1f} MiB | {r['idle_fe_cpu_pct']:.2f} % | {per} "
              f"| {r['nats_msgs_s']:.0f} msg/s, {r['nats_bytes_s'] / 1024:.0f} KiB/s | {r['etcd_cpu_pct']:.1f} % "
              f"| {r['worker_rss_mib']:.1f} MiB |")
    print()
    print(f"churn at {a.workers} workers, {a.churn_rounds} rounds: a new worker listed by both frontends "
          f"p50 {pctl(seen, 0.5) * 1000:.0f} ms / p99 {pctl(seen, 0.99) * 1000:.0f} ms; a SIGKILLed one dropped "
          f"by both p50 {pctl(gone, 0.5) * 1000:.0f} ms / p99 {pctl(gone, 0.99) * 1000:.0f} ms")
    ok = res["exit"] == 0 and res.get("digest") == ref.get("digest") and res.get("failed", 0) == 0
    print(f"storm: {a.streams} streams x {a.tokens} tokens over both frontends, {a.kill} of {a.workers} workers "
          f"SIGKILLed {a.kill_after} s in; {res.get('ok', '?')} ok, {res.get('failed', '?')} failed; digest "
          f"{'equal to' if res.get('digest') == ref.get('digest') else 'DIFFERENT from'} the fault-free run; "
          f"{mig:.0f} migrations; wall {wall:.1f} s (fault-free {ref.get('wall_s', 0):.1f} s)")
    print("summary: " + json.dumps({"workers": a.workers, "streams": a.streams, "ok": res.get("ok"),
                                     "failed": res.get("failed"), "digest_equal": res.get("digest") == ref.get("digest"),
                                     "migrations": mig, "killed": a.kill, "seen_max_s": max(seen), "gone_max_s": max(gone),
                                     "routable_s": [r["routable_s"] for r in rows]}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
