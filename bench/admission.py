#!/usr/bin/env python3
"""Admission figures: admitted TTFT per priority at 1x, 2x and 3x overload with the frontend's
admission queue, and the fairness ratio of two tenants of which one sends 10x more requests.

One worker (64 KV blocks of 16 tokens, speedup 4) behind a frontend with
--active-decode-blocks-threshold 0.5 (the worker holds about 3 streams of 120 tokens before it
counts as busy) and --queue-max-requests 64 --queue-timeout 30. Its 64 blocks hold 8 whole requests of 120 tokens;
the threshold is crossed with about 4 to 6 running (blocks grow as they decode): "1x" is 8 streams
in flight, the KV cache's capacity.

Overload: closed-loop clients, each sending its next request as soon as the last one ends:
8k - 1 "bulk" clients at priority 10 and one "vip" client at priority 0, for k = 1, 2, 3, for
--seconds each. Reported: p50 and p99 TTFT of admitted requests per priority, refusals.

Fairness: 40 clients of tenant A and 4 of tenant B (X-Tenant, --trust-tenant-header), same
priority and request size, for --seconds: tokens received per tenant, and their ratio (1.0 is
fair; request-count fairness, as FIFO gives, would be about 10). B's 4 clients can fill half of
what the worker runs at once, so a fair share is within its reach. Run twice: with the threshold
at 0.5 (the worker runs several streams at once and most requests find it not busy and bypass
the queue: the in-flight share check is what keeps the tenants fair there) and at 0 (the worker
runs one stream at a time: every other request waits in the frontend's queue).

After each level the worker's preemption counters (priority, kv) and the frontend's
baton_frontend_preempt_routed_total (requests routed past the busy verdict to a worker that
preempts for them) are printed, cumulative.

--worker-queue: the overload table only, with no busy threshold at the frontend (every request
goes straight to the worker) and the worker at --max-num-seqs 8: the worker's own (priority,
arrival) queue and its priority preemption decide who runs.

usage: BATON_BIN=build/baton python3 bench/admission.py [--seconds 20] [--fairness-only | --overload-only |
       --worker-queue]
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


def closed_loop(fe, groups, seconds):
    """groups: [(name, n_clients, body_extra, headers)]; returns {name: [Stream]} of requests
    started before the end."""
    out = {g[0]: [] for g in groups}
    lock = threading.Lock()
    t_end = time.monotonic() + seconds

    def client(name, extra, headers, k):
        i = 0
        while time.monotonic() < t_end:
            s = bl.stream_chat(fe.url, bl.chat_body(f"{name} {k} {i}", max_tokens=120, return_token_ids=True,
                                                    **extra), timeout=120, headers=headers)
            i += 1
            with lock:
                out[name].append(s)
            if s.status != 200:
                time.sleep(0.2)  # a refused client waits a little, as a real one would

    ts = []
    for name, n, extra, headers in groups:
        for k in range(n):
            ts.append(threading.Thread(target=client, args=(name, extra, headers, k)))
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 150)
    return out, t_end


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--fairness-only", action="store_true")
    ap.add_argument("--worker-queue", action="store_true")
    ap.add_argument("--overload-only", action="store_true", help="the overload table alone (no fairness runs)")
    a = ap.parse_args()
    bl.deadline(int(a.seconds * 5 + 600), "admission bench")
    worker = dict(speedup_ratio=4, num_gpu_blocks_override=64, block_size=16)
    with bl.Cluster() as c:
        if a.worker_queue:
            fe = c.start_frontend()
            w = c.start_worker(max_num_seqs=8, system_port=True, wait=True, **worker)
        else:
            fe = c.start_frontend(active_decode_blocks_threshold=0.5, queue_max_requests=64, queue_timeout=30,
                                  trust_tenant_header=True)
            w = c.start_worker(system_port=True, wait=True, **worker)
        c.wait_workers(fe, 1)
        print("| load | bulk clients (prio 10) | vip clients (prio 0) | bulk admitted | bulk TTFT p50 / p99 | "
              "vip admitted | vip TTFT p50 / p99 | refused (429/503) |")
        print("|---|---|---|---|---|---|---|---|")
        for k in (() if a.fairness_only else (1, 2, 3)):
            res, _ = closed_loop(fe, [("bulk", 8 * k - 1, {"priority": 10}, None),
                                      ("vip", 1, {"priority": 0}, None)], a.seconds)
            row = [f"{k}x", str(8 * k - 1), "1"]
            refused = 0
            for name in ("bulk", "vip"):
                ok = [s for s in res[name] if s.status == 200]
                for s in ok:
                    s.assert_ok(f"{name} stream")
                refused += sum(1 for s in res[name] if s.status in (429, 503))
                tt = [s.t_first - s.t_start for s in ok]
                row += [str(len(ok)), f"{pct(tt, 50):.2f} s / {pct(tt, 99):.2f} s"]
            row.append(str(refused))
            print("| " + " | ".join(row) + " |", flush=True)
            m = bl.metrics(w.system_url)
            print("  worker preemptions so far: " + ", ".join(
                f"{r} {bl.metric_sum(m, 'baton_worker_preemptions_total', reason=r):.0f}" for r in ("priority", "kv"))
                + "; requests the frontend routed past its busy verdict so far: "
                f"{bl.metric_sum(bl.metrics(fe.url), 'baton_frontend_preempt_routed_total'):.0f}", flush=True)
            bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_queue_requests") == 0, 60)
        print()
        for thr in (() if a.worker_queue or a.overload_only else (0.5, 0.0)):
            # 0.5: the worker runs several streams at once (its KV blocks grow after admission); 0.0:
            # it runs one at a time and every other request waits in the frontend's queue
            st, _, b = bl.post_json(fe.url + "/busy_threshold",
                                    {"model": "mock-model", "active_decode_blocks_threshold": thr})
            assert st == 200, b
            res, t_end = closed_loop(fe, [("A", 40, {}, {"X-Tenant": "A"}), ("B", 4, {}, {"X-Tenant": "B"})],
                                     a.seconds)
            tokens = {}
            for name in ("A", "B"):
                n = 0
                for s in res[name]:
                    if s.status != 200:
                        continue
                    # tokens that arrived while both tenants were sending (until the clients' end)
                    for ev, t in zip(s.events, s.t_events):
                        if t <= t_end:
                            n += len(((ev.get("choices") or [{}])[0]).get("token_ids") or [])
                tokens[name] = n
            reqs = {n: len(res[n]) for n in ("A", "B")}
            print(f"fairness, threshold {thr}: A {reqs['A']} requests (40 clients), {tokens['A']} tokens; "
                  f"B {reqs['B']} requests (4 clients), {tokens['B']} tokens; token ratio A/B "
                  f"{tokens['A'] / max(1, tokens['B']):.2f}", flush=True)
            bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_queue_requests") == 0, 60)


if __name__ == "__main__":
    main()
