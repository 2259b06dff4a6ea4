#!/usr/bin/env python3
"""etcd discovery figures on a 3-member etcd cluster on loopback.

A. SIGTERM → deletion seen by a frontend. One frontend watches; a worker (lease TTL 10 s) is
   started, listed by the frontend, then sent SIGTERM. The figure is the time from the signal (the
   bench's wall clock right before kill(2)) to the frontend's log line saying the worker "left
   discovery" — the watch event of the key's deletion, not the request plane's GOAWAY, which the
   frontend logs separately. Log timestamps have millisecond resolution.
B. The leader's death. Each round starts a frontend and two workers with the endpoint list leader
   first (so all of them talk to the member about to die), runs streaming load, starts one more
   worker and SIGKILLs the leader at the same moment. Reported, from the kill: a new leader agreed
   (etcdctl polled every 100 ms, so coarse), the frontend's watch resumed on another member, each
   old worker's first successful keep-alive (and the gap between its first failed keep-alive and
   the next answered one), the new worker's key seen by the frontend; whether every old worker kept
   its lease; and the streams that failed during the round (the request plane does not need etcd).

usage: BATON_BIN=build/baton python3 bench/etcd_discovery.py [--sigterm-rounds 20] [--leader-rounds 5]
"""

import argparse
import datetime
import os
import re
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402
import etcdlib as el  # noqa: E402

TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z")


def log_time(proc, pattern, timeout=20.0):
    """Wall-clock time (epoch seconds) of the first log line matching pattern."""
    rx = re.compile(pattern)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in proc.log_text().splitlines():
            if rx.search(line):
                m = TS.match(line)
                return datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(
                    tzinfo=datetime.timezone.utc).timestamp()
        time.sleep(0.05)
    raise AssertionError(f"{proc.name}: no log line matching {pattern!r} within {timeout} s")


def stats(xs, unit="ms", scale=1000.0):
    xs = sorted(x * scale for x in xs)
    p = lambda q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]  # noqa: E731
    return f"{p(0.5):.0f} / {p(0.9):.0f} / {xs[-1]:.0f} {unit} (n={len(xs)})"


def sigterm_rounds(c, etcd, rounds):
    fe = c.start_frontend(discovery="etcd", etcd_endpoints=etcd.endpoints)
    lat = []
    for _ in range(rounds):
        w = c.start_worker(discovery="etcd", etcd_endpoints=etcd.endpoints, speedup_ratio=100)
        wid = el.worker_id(w)
        el.wait_health(fe, [wid], 20)
        time.sleep(0.2)
        t0 = time.time()
        w.proc.kill(signal.SIGTERM)
        t1 = log_time(fe.proc, rf"worker {wid} \(.*\) left discovery")
        assert w.proc.wait(10) == 0
        lat.append(t1 - t0)
    fe.proc.stop()
    return lat


def leader_round(c, etcd):
    (leader,) = bl.wait_for(lambda: (etcd.leader(),), 15, what="an agreed leader")
    eps = etcd.endpoints_from(leader)
    worker = dict(discovery="etcd", etcd_endpoints=eps, discovery_ttl=10, speedup_ratio=20)
    fe = c.start_frontend(discovery="etcd", etcd_endpoints=eps)
    ws = [c.start_worker(**worker) for _ in range(2)]
    ids = [el.worker_id(w) for w in ws]
    el.wait_health(fe, ids, 20)
    refs = el.references(fe)
    before = etcd.get_prefix(el.PREFIX)
    load = el.Load(fe, concurrency=4)
    time.sleep(1.0)
    t0 = time.time()
    etcd.kill_member(leader)
    newcomer = c.start_worker(**worker)
    t_kill_mono = time.monotonic()
    (new_leader,) = bl.wait_for(lambda: (etcd.leader(),), 15, interval=0.1, what="a new leader")
    t_elected = time.monotonic() - t_kill_mono
    nid = el.worker_id(newcomer)
    t_resume = log_time(fe.proc, r"etcd: watch on v1/instances/dynamo/ resumed") - t0
    t_ka = [log_time(w.proc, r"etcd: reachable again via") - t0 for w in ws]
    t_ka_gap = [log_time(w.proc, r"etcd: reachable again via")
                - log_time(w.proc, r"etcd: lease keep-alive via .* failed") for w in ws]
    t_new = log_time(fe.proc, rf"discovered worker {nid}") - t0
    time.sleep(2)
    after = etcd.get_prefix(el.PREFIX)
    leases_kept = all(after.get(k) == v for k, v in before.items())
    results = load.stop()
    failed = sum(1 for p, s in results if not s.ok or s.token_ids != refs[p])
    for p in [fe.proc] + [w.proc for w in ws] + [newcomer.proc]:
        p.stop()
    etcd.start_member(leader)
    etcd.wait_healthy()
    return dict(elected=t_elected, resume=t_resume, keepalive=t_ka, ka_gap=t_ka_gap, newkey=t_new,
                leases_kept=leases_kept, streams=len(results),
                failed=failed, leader=leader, new_leader=new_leader)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sigterm-rounds", type=int, default=20)
    ap.add_argument("--leader-rounds", type=int, default=5)
    a = ap.parse_args()
    bl.deadline(120 + 6 * a.sigterm_rounds + 40 * a.leader_rounds, "etcd discovery bench")
    with bl.Cluster() as c:
        etcd = bl.Etcd(3).start()
        lat = sigterm_rounds(c, etcd, a.sigterm_rounds)
        print(f"A. SIGTERM -> key deletion seen by the frontend (p50 / p90 / max): {stats(lat)}")
        print(f"   in round order (ms): {[round(x * 1000) for x in lat]}")
        rounds = [leader_round(c, etcd) for _ in range(a.leader_rounds)]
        if not rounds:
            etcd.stop()
            return
        for r in rounds:
            print(f"   round: leader {r['leader']} killed, {r['new_leader']} elected; {r['streams']} streams, "
                  f"{r['failed']} failed")
        print("B. leader SIGKILLed under load (p50 / p90 / max over rounds):")
        print(f"   new leader agreed (etcdctl poll):          {stats([r['elected'] for r in rounds])}")
        print(f"   frontend watch resumed on another member:  {stats([r['resume'] for r in rounds])}")
        print(f"   first keep-alive answered after the kill:  "
              f"{stats([x for r in rounds for x in r['keepalive']])}  (keep-alives are due every TTL/3 = 3.3 s)")
        print(f"   failed keep-alive -> answered elsewhere:   {stats([x for r in rounds for x in r['ka_gap']])}")
        print(f"   leases kept through the round: {sum(r['leases_kept'] for r in rounds)} of {len(rounds)} rounds")
        print(f"   worker started at the kill seen by the FE: {stats([r['newkey'] for r in rounds])}")
        print(f"   streams during the rounds: {sum(r['streams'] for r in rounds)}, "
              f"failed or different: {sum(r['failed'] for r in rounds)}")
        etcd.stop()


if __name__ == "__main__":
    main()
