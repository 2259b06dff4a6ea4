"""Priority preemption on the llama engine (src/engine/llama/llama.c; docs/engines.md, "Priority"):
a waiting sequence that cannot be admitted preempts the least urgent running one when it is strictly
more urgent; the victim's KV is dropped and it is recomputed later from prompt + generated tokens,
keeping its sampler position, so its client sees only a pause and the same bytes.

One llama worker (the bundled stories260K model), --max-num-seqs 2.
1. Reference: four low-priority completions, two greedy and two seeded at temperature 0.8, run two
   at a time (the engine is exact under any batch at --llama-ubatch 1, docs/engines.md).
2. The same four at X-Priority 10: two run, two wait. Once both running ones have released tokens,
   three urgent completions (priority 0) are sent one at a time; each preempts a running
   low-priority stream, and is served before any low-priority stream ends (without preemption it
   waits until one of them ends).
3. Every low-priority stream reproduces its reference exactly (text, token ids, finish reason,
   usage), and baton_worker_preemptions_total{reason="priority"} counted a preemption per urgent
   request; the worker told the frontend of the waits (WAITING frames, docs/protocol.md): the
   streams queued behind the first two and a preempted one at least
   (baton_frontend_stream_waits_total).
"""

import batonlib as bl
import faultlib as fl

if fl.skip("llama") is not None:  # scripts/setup was told not to fetch llama.cpp
    raise SystemExit(77)

bl.deadline(120, "test_llama_priority_preempt")

N_LOW, LOW_TOKENS, N_URGENT, URGENT_TOKENS = 4, 300, 3, 4


def low_body(i):
    extra = {"temperature": 0.8, "seed": 7 + i} if i % 2 else {"temperature": 0}
    return bl.completion_body(f"Once upon a time, bulk {i}", max_tokens=LOW_TOKENS, model="mock-model",
                              return_token_ids=True, **extra)


def urgent_body(i):
    return bl.completion_body(f"Once upon a time, vip {i}", max_tokens=URGENT_TOKENS, model="mock-model",
                              temperature=0, priority=0)


preemptions = fl.preemptions


with bl.Cluster() as c:
    fe = c.start_frontend()
    w = c.start_worker(engine="llama", max_num_seqs=2, system_port=True, wait=True)
    c.wait_workers(fe, 1)

    # --- 1. references, two at a time
    def long_enough(s):
        assert len(s.token_ids) > 20, f"a reference stream is too short to be preempted mid-way: {s.summary()}"

    ref = []
    for k in range(0, N_LOW, 2):
        ref += fl.run_all(bl.stream_completion, fe.url, [low_body(i) for i in range(k, k + 2)], timeout=90,
                          check=long_enough)
    assert preemptions(w, "priority") == 0, "a worker without urgent requests preempted for priority"

    # --- 2. the worker full of low-priority streams, then urgent ones one at a time
    low, urgent = fl.preemption_overload(bl.stream_completion, fe.url, [low_body(i) for i in range(N_LOW)],
                                         [urgent_body(i) for i in range(N_URGENT)],
                                         lambda started: sum(e.is_set() for e in started) >= 2, timeout=90,
                                         urgent_timeout=60)

    # --- 3. exact low-priority streams, counted preemptions
    fl.assert_same_as_refs(low, ref)
    first_low_end = min(s.t_end for s in low)
    n_prio = preemptions(w, "priority")
    print(f"llama priority preemption: urgent TTFTs {[round(s.t_first - s.t_start, 3) for s in urgent]}, "
          f"first low-priority end {first_low_end - min(s.t_start for s in low):.2f}s after the start, "
          f"low lengths {[len(s.token_ids) for s in low]} ({[s.finish_reason for s in low]}), "
          f"preemptions priority={n_prio:.0f} kv={preemptions(w, 'kv'):.0f}", flush=True)
    for s in urgent:
        assert s.t_end < first_low_end, \
            f"an urgent request ended ({s.t_end:.2f}) after a low-priority stream ({first_low_end:.2f}): it waited for it"
    assert n_prio >= N_URGENT, f"only {n_prio:.0f} priority preemptions for {N_URGENT} urgent requests"
    m = bl.metrics(fe.url)
    waits = {r: bl.metric_sum(m, "baton_frontend_stream_waits_total", reason=r) for r in ("queued", "preempted")}
    print(f"WAITING frames: {waits}", flush=True)
    # a wait over before the engine's events reach the loop is not told (engine.h): at least one of each
    assert waits["queued"] >= 1 and waits["preempted"] >= 1, waits
print("test_llama_priority_preempt: ok")
