#!/usr/bin/env python3
"""What the access log (--access-log, docs/operations.md "Access log") costs the frontend.

Two frontends on the same mocker worker, one with --access-log (a file in the run's directory),
one without, driven in turn by baton-sse-load with the same load: short streaming requests
(max_tokens 4), where a per-request cost weighs most against the tokens. CPU of each frontend is
read from /proc over each round (every thread, the access log's writer included); the rounds
alternate so that drift shows as a difference between them. Prints the CPU per request of each
path per round, the median of the per-round ratios, and checks that the log holds one whole JSON
line per request.

usage: BATON_BIN=build/baton python3 bench/access_log.py [--requests 20000] [--streams 100] [--rounds 5]
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402
import perf  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    bl.deadline(1800, "access_log bench")
    with bl.Cluster() as c:
        log = os.path.join(c.dir, "access.log")
        plain = c.start_frontend(max_connections=30000, max_concurrent_requests=100000)
        logged = c.start_frontend(max_connections=30000, max_concurrent_requests=100000, access_log=log)
        c.start_worker(speedup_ratio=50, max_num_seqs=perf.MAX_SEQS)
        for fe in (plain, logged):
            c.wait_workers(fe, 1)
            perf.check(perf.run_load(fe.url, 10, 4), "warm-up")
        expected = 10
        rows = []
        for rnd in range(a.rounds):
            cpu = {}
            order = [("plain", plain), ("logged", logged)]
            for name, fe in order if rnd % 2 == 0 else order[::-1]:
                m = perf.Meter({"fe": fe.proc.pid})
                r = perf.run_load(fe.url, a.streams, 4, requests=a.requests, rate=100000)
                perf.check(r, f"{name}, round {rnd + 1}")
                cpu[name] = m.stop()["fe"] / r["requests"] * 1e6
                if name == "logged":
                    expected += r["requests"]
            rows.append(cpu)
            print(f"round {rnd + 1}: CPU per request without {cpu['plain']:.2f} us, with the access log "
                  f"{cpu['logged']:.2f} us ({cpu['logged'] / cpu['plain']:.3f}x)", flush=True)
        bl.wait_for(lambda: sum(1 for _ in open(log)) == expected, 10, what="every line written")
        with open(log) as f:
            lines = [json.loads(ln) for ln in f]
        assert len(lines) == expected and all(ln["status"] == 200 for ln in lines)
        ratios = [r["logged"] / r["plain"] for r in rows]
        added = [r["logged"] - r["plain"] for r in rows]
        size = os.path.getsize(log) / len(lines)
        print(f"\n{a.rounds} rounds of {a.requests} streaming requests (max_tokens 4, {a.streams} at once): "
              f"CPU per request with the access log / without, median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}), added median {statistics.median(added):+.2f} us; "
              f"{len(lines)} lines of {size:.0f} bytes on average, every one whole")


if __name__ == "__main__":
    main()
