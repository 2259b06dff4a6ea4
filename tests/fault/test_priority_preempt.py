"""Priority preemption on the mocker (src/engine/mocker/mocker.c; docs/load-shedding.md): a waiting
sequence that cannot be admitted (no slot under --max-num-seqs, or not enough KV) preempts the least
urgent running sequence when that one is strictly less urgent; the victim is recomputed later from
its tokens, so its client sees only a pause.

1. Reference: the 12 low-priority requests (half greedy, half seeded at temperature 0.8) on an idle,
   fast worker, and the idle TTFT of an urgent request on the worker under test.
2. One worker (--max-num-seqs 4, real-time steps) kept busy by the 12 low-priority streams
   (priority 10: three times its capacity). Once its queue holds the rest, urgent requests
   (priority 0) are sent one at a time. Each urgent TTFT stays within 3x the idle TTFT plus 0.25 s
   (a step is ~10 ms; the slack is for a loaded machine) and under a quarter of the low-priority
   median TTFT. Without preemption an urgent request waits for a running low-priority stream of
   ~600 steps to finish (seconds).
3. Every low-priority stream completes with the same token ids and text as its reference, the
   worker's baton_worker_preemptions_total{reason="priority"} counted at least one preemption per
   urgent request, and none for KV.
"""

import statistics

import batonlib as bl
import faultlib as fl

bl.deadline(90, "test_priority_preempt")

N_LOW, LOW_TOKENS, N_URGENT, URGENT_TOKENS = 12, 600, 6, 8


def low_body(i):
    extra = {"temperature": 0.8, "seed": 1000 + i} if i % 2 else {"temperature": 0}
    return bl.chat_body(f"bulk {i}", max_tokens=LOW_TOKENS, return_token_ids=True, **extra)


def urgent_body(i):
    return bl.chat_body(f"vip {i}", max_tokens=URGENT_TOKENS, return_token_ids=True, priority=0)


preemptions = fl.preemptions


# --- 1. references on an idle, fast worker
with bl.Cluster() as c:
    fe = c.start_frontend()
    c.start_worker(max_num_seqs=16, speedup_ratio=100)
    c.wait_workers(fe, 1)

    def full_length(s):
        assert len(s.token_ids) == LOW_TOKENS and s.finish_reason == "length", s.summary()

    ref = fl.run_all(bl.stream_chat, fe.url, [low_body(i) for i in range(N_LOW)], check=full_length)

with bl.Cluster() as c:
    fe = c.start_frontend()
    w = c.start_worker(max_num_seqs=4, speedup_ratio=1, system_port=True, wait=True)
    c.wait_workers(fe, 1)
    idle = []
    for i in range(3):
        s = bl.stream_chat(fe.url, urgent_body(100 + i), timeout=30)
        s.assert_ok("an urgent request on the idle worker")
        idle.append(s.t_first - s.t_start)
    idle_ttft = min(idle)
    assert preemptions(w, "priority") == 0, "an idle worker preempted"

    # --- 2. three times the worker's capacity of low-priority streams, then urgent ones one at a time
    def queue_full(started):
        return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_waiting_requests") >= N_LOW - 4

    def urgent_length(s):
        assert len(s.token_ids) == URGENT_TOKENS, s.summary()

    low, urgent = fl.preemption_overload(bl.stream_chat, fe.url, [low_body(i) for i in range(N_LOW)],
                                         [urgent_body(i) for i in range(N_URGENT)], queue_full, timeout=60,
                                         urgent_timeout=30,
                                         check_urgent=urgent_length)

    # --- 3. the low-priority streams are byte-exact; the preemptions were counted
    fl.assert_same_as_refs(low, ref)
    for s in low:
        assert s.finish_reason == "length", s.summary()
    low_med = statistics.median(s.t_first - s.t_start for s in low)
    urg = [s.t_first - s.t_start for s in urgent]
    n_prio, n_kv = preemptions(w, "priority"), preemptions(w, "kv")
    print(f"priority preemption: idle TTFT {idle_ttft:.3f}s, urgent TTFTs {[round(x, 3) for x in urg]}, "
          f"low-priority median TTFT {low_med:.2f}s, preemptions priority={n_prio:.0f} kv={n_kv:.0f}", flush=True)
    assert low_med > 2.0, f"the worker was not overloaded (low-priority median TTFT {low_med:.2f}s)"
    bound = 3 * idle_ttft + 0.25
    assert max(urg) <= bound, f"an urgent TTFT ({max(urg):.3f}s) is over 3x the idle one + 0.25 s ({bound:.3f}s)"
    assert max(urg) <= low_med / 4, f"an urgent TTFT ({max(urg):.3f}s) is over a quarter of the low median"
    assert n_prio >= N_URGENT, f"only {n_prio:.0f} priority preemptions for {N_URGENT} urgent requests"
    assert n_kv == 0, f"{n_kv:.0f} KV preemptions: the test meant to exercise priority alone"
print("test_priority_preempt: ok")
