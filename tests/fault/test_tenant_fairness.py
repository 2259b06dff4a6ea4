"""Tenant fairness when requests bypass the queue (src/frontend/admit.c, "in-flight shares").

One worker (64 KV blocks of 16 tokens) behind a frontend with a busy threshold of half of its
blocks and an admission queue. With the threshold at 0.5 most requests find the worker not busy
and go straight to it, so the queue's weighted-fair order alone does not share the worker: the
worker runs whatever it was sent, and tenant A, with ten times B's requests in flight, got 2.3
times B's tokens (bench/admission.py). The frontend now holds a request in the queue, even with a
worker free, while its tenant holds more than its share of the estimated tokens in flight and the
total has reached what the workers take before they are busy.

Tenant A runs 20 closed-loop clients, tenant B 2 (X-Tenant, trusted), same priority and size, for
10 s. Checked: every request completes; tokens received while both were sending are within a
factor of 2.5 of each other (fair is 1; measured 1.16-1.77 over 6 runs; with the share check
disabled in admit.c this test measured A/B 5.7 and 8.1 and fails); the frontend really
held requests for their share (baton_frontend_admission_held_total); the in-flight token gauges
and the queue go back to zero. Run twice on the same worker: with --threads 1, then with a new
frontend of --threads 2, whose connections the kernel spreads over both loops: the shares are the
whole frontend's (before, each thread counted only its own requests, held a tenant only against
its own part of the traffic and the whole capacity, and this run measured A/B 5.05 and failed).
"""

import threading
import time

import batonlib as bl

bl.deadline(200, "test_tenant_fairness")

SECONDS, TOKENS = 10, 120

def measure(c, threads):
    """One 10 s run of 20 clients of A against 2 of B on a new frontend with --threads `threads`;
    checks it and stops the frontend."""
    fe = c.start_frontend(active_decode_blocks_threshold=0.5, queue_max_requests=64, queue_timeout=60,
                          trust_tenant_header=True, threads=threads)
    c.wait_workers(fe, 1)
    out = {"A": [], "B": []}
    lock = threading.Lock()
    t_end = time.monotonic() + SECONDS

    def client(name, k):
        i = 0
        while time.monotonic() < t_end:
            s = bl.stream_chat(fe.url, bl.chat_body(f"{name} {k} {i}", max_tokens=TOKENS, return_token_ids=True),
                               timeout=120, headers={"X-Tenant": name})
            i += 1
            with lock:
                out[name].append(s)

    ts = [threading.Thread(target=client, args=("A", k)) for k in range(20)]
    ts += [threading.Thread(target=client, args=("B", k)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(SECONDS + 120)
    tokens = {}
    for name, res in out.items():
        n = 0
        for s in res:
            s.assert_ok(f"a stream of tenant {name}")
            assert len(s.token_ids) == TOKENS, s.summary()
            n += sum(len(((ev.get("choices") or [{}])[0]).get("token_ids") or [])
                     for ev, t in zip(s.events, s.t_events) if t <= t_end)
        tokens[name] = n
    m = bl.metrics(fe.url)
    held = bl.metric_sum(m, "baton_frontend_admission_held_total")
    ratio = tokens["A"] / max(1, tokens["B"])
    print(f"tenant fairness (bypass regime, --threads {threads}): A {len(out['A'])} requests, {tokens['A']} tokens; "
          f"B {len(out['B'])} requests, {tokens['B']} tokens; ratio A/B {ratio:.2f}; {held:.0f} requests held for "
          f"their share", flush=True)
    assert held > 0, "no request was held for its tenant's share: the gate never acted"
    assert ratio <= 2.5, f"--threads {threads}: tenant A got {ratio:.2f}x tenant B's tokens with 10x its requests in flight"
    assert ratio >= 1 / 2.5, f"--threads {threads}: tenant B got more than its share: ratio {ratio:.2f}"
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_tenant_inflight_tokens") == 0, 10,
                what="the in-flight token gauges to return to zero")
    assert bl.metric_sum(bl.metrics(fe.url), "baton_frontend_queue_requests") == 0
    fe.proc.stop()
    c.frontends.remove(fe)


with bl.Cluster() as c:
    c.start_worker(speedup_ratio=4, num_gpu_blocks_override=64, block_size=16)
    measure(c, 1)
    measure(c, 2)
print("test_tenant_fairness: ok")
