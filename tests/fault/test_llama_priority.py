"""Priority on the llama engine (src/engine/llama/llama.c; docs/engines.md, "Priority"): its
waiting queue admits by (priority, arrival), as the mocker's does.

One llama worker (the bundled stories260K model) with --max-num-seqs 1, so that one sequence runs
and the rest wait in the engine's queue. Low-priority completions (X-Priority 10) are sent one
after another until the worker reports several waiting; then one urgent completion (priority 0).
Checked: every request completes; at most one low-priority request that was still waiting when
the urgent one was sent (it got its first token after that) is served before it — the one the
engine may have admitted before the urgent request reached it — while at least three of them are
served after it. In arrival order (before this change the engine ignored the priority) the
urgent one came after every waiting one.
"""

import threading

import batonlib as bl
import faultlib as fl

if fl.skip("llama") is not None:  # scripts/setup was told not to fetch llama.cpp
    raise SystemExit(77)

bl.deadline(150, "test_llama_priority")

N_LOW, TOKENS = 8, 256


def body(tag, **extra):
    return bl.completion_body(f"Once upon a time, {tag}", max_tokens=TOKENS, model="mock-model", temperature=0,
                              **extra)


with bl.Cluster() as c:
    fe = c.start_frontend()
    c.start_worker(engine="llama", max_num_seqs=1, system_port=True, wait=True)
    c.wait_workers(fe, 1)
    low = [None] * N_LOW

    def low_one(i):
        low[i] = bl.stream_completion(fe.url, body(f"low {i}"), timeout=120, headers={"X-Priority": "10"})

    ts = [threading.Thread(target=low_one, args=(i,)) for i in range(N_LOW)]
    for t in ts:
        t.start()
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_waiting_requests") >= 4, 30,
                interval=0.01, what="the llama worker's waiting queue to hold 4 requests")
    urgent = bl.stream_completion(fe.url, body("urgent", priority=0), timeout=120)
    for t in ts:
        t.join(120)
    for s in low + [urgent]:
        assert s is not None, "a request thread did not finish"
        s.assert_ok("a llama request")
        assert s.done and s.t_first is not None, s.summary()
    waiting = [s for s in low if s.t_first > urgent.t_start]
    before = [s for s in waiting if s.t_first < urgent.t_first]
    after = [s for s in waiting if s.t_first > urgent.t_first]
    print(f"llama priority: {len(waiting)} low-priority requests waiting when the urgent one was sent; "
          f"{len(before)} served before it, {len(after)} after", flush=True)
    assert len(before) <= 1, f"{len(before)} waiting low-priority requests were served before the urgent one"
    assert len(after) >= 3, f"only {len(after)} low-priority requests were still waiting after the urgent one"
print("test_llama_priority: ok")
