#!/usr/bin/env python3
"""Load shedding figures: time to decide a rejection, TTFT of admitted requests at 3x overload
versus unloaded, and the share of requests rejected.

Two small workers (64 KV blocks of 16 tokens, speedup 4) behind a frontend with
--active-decode-blocks-threshold 0.5. "Unloaded" runs requests one at a time; "overload" keeps
3x as many streams in flight as the workers hold comfortably, for a fixed number of requests.
The rejection time is the client-side latency of a 503 answer, next to that of GET /live on the
same frontend (a request that does no routing) as the anchor.

usage: BATON_BIN=build/baton python3 bench/shedding.py [--requests 300] [--concurrency 30]
"""

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perf import pct  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=30)
    a = ap.parse_args()
    bl.deadline(900, "shedding bench")
    worker = dict(speedup_ratio=4, num_gpu_blocks_override=64, block_size=16)
    with bl.Cluster() as c:
        fe = c.start_frontend(active_decode_blocks_threshold=0.5)
        c.start_worker(**worker)
        c.start_worker(**worker)
        c.wait_workers(fe, 2)
        body = lambda i: bl.chat_body(f"bench {i}", max_tokens=120)
        unloaded = []
        for i in range(20):
            s = bl.stream_chat(fe.url, body(i)).assert_ok()
            unloaded.append(s.t_first - s.t_start)
        live = []
        for _ in range(200):
            t = time.monotonic()
            bl.request("GET", fe.url + "/live")
            live.append(time.monotonic() - t)
        lock = threading.Lock()
        ttft, rejected_lat, counts = [], [], {"ok": 0, "rejected": 0, "other": 0}
        next_i = [0]

        def client():
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                if i >= a.requests:
                    return
                s = bl.stream_chat(fe.url, body(i), timeout=120)
                with lock:
                    if s.status == 503:
                        counts["rejected"] += 1
                        rejected_lat.append(s.t_end - s.t_start)
                    elif s.ok:
                        counts["ok"] += 1
                        ttft.append(s.t_first - s.t_start)
                    else:
                        counts["other"] += 1

        ts = [threading.Thread(target=client) for _ in range(a.concurrency)]
        t0 = time.monotonic()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.monotonic() - t0
        ms = lambda x: f"{x * 1000:.2f} ms"
        print(f"requests={a.requests} concurrency={a.concurrency} wall={wall:.1f}s")
        print(f"admitted {counts['ok']}, rejected {counts['rejected']} "
              f"({counts['rejected'] / a.requests * 100:.0f}%), other failures {counts['other']}")
        print(f"rejection latency (client): p50 {ms(pct(rejected_lat, 50))} p99 {ms(pct(rejected_lat, 99))}; "
              f"GET /live anchor p50 {ms(pct(live, 50))} p99 {ms(pct(live, 99))}")
        print(f"TTFT unloaded: p50 {ms(pct(unloaded, 50))} p99 {ms(pct(unloaded, 99))}")
        print(f"TTFT admitted at overload: p50 {ms(pct(ttft, 50))} p99 {ms(pct(ttft, 99))}")
        return 1 if counts["other"] else 0


if __name__ == "__main__":
    sys.exit(main())
