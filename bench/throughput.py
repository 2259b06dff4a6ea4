#!/usr/bin/env python3
"""Tokens per second streamed through one frontend, and the frontend's CPU time for it.

Starts one frontend and two mocker workers (speedup 1000 by default, so the engines are not the
limit), runs N concurrent streaming chat requests of T tokens each, and reports wall time,
tokens/s delivered to clients, and the CPU seconds (user + system, from /proc) that the frontend
and each worker used during the run. The client is Python: at high rates it, not baton, may be
the bottleneck, which is why CPU per token of the frontend is the figure to compare.

usage: BATON_BIN=build/baton python3 bench/throughput.py [--streams 200] [--tokens 1000]
       [--speedup 1000] [--workers 2]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tck


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--speedup", type=float, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    bl.deadline(600, "throughput bench")
    with bl.Cluster() as c:
        fe = c.start_frontend()
        ws = [c.start_worker(speedup_ratio=a.speedup) for _ in range(a.workers)]
        c.wait_workers(fe, a.workers)
        bl.stream_chat(fe.url, bl.chat_body("warm up", max_tokens=8)).assert_ok()
        jobs = [(fe.url, bl.chat_body(f"bench {i}", max_tokens=a.tokens)) for i in range(a.streams)]
        cpu0 = {p.pid: cpu_seconds(p.pid) for p in [fe.proc] + [w.proc for w in ws]}
        t0 = time.monotonic()
        res = bl.run_concurrently(lambda u, b: bl.stream_chat(u, b, timeout=300), jobs, max_workers=a.streams)
        wall = time.monotonic() - t0
        cpu1 = {p.pid: cpu_seconds(p.pid) for p in [fe.proc] + [w.proc for w in ws]}
        bad = [s for s in res if not s.ok]
        tokens = sum(s.usage["completion_tokens"] if s.usage else 0 for s in res)
        m = bl.metrics(fe.url)
        tokens = int(bl.metric_sum(m, "dynamo_frontend_output_tokens_total")) - 8
        fe_cpu = cpu1[fe.proc.pid] - cpu0[fe.proc.pid]
        w_cpu = [cpu1[w.proc.pid] - cpu0[w.proc.pid] for w in ws]
        print(f"streams={a.streams} tokens/stream={a.tokens} speedup={a.speedup} workers={a.workers}")
        print(f"failed streams: {len(bad)}")
        print(f"wall: {wall:.2f} s; tokens delivered: {tokens}; tokens/s: {tokens / wall:,.0f}")
        print(f"frontend CPU: {fe_cpu:.2f} s ({fe_cpu / wall * 100:.0f}% of a core); "
              f"{fe_cpu / tokens * 1e6:.2f} CPU-s per million tokens")
        print("worker CPU: " + ", ".join(f"{x:.2f} s" for x in w_cpu))
        if bad:
            print(bad[0].summary())
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
