"""Orphaned streams on the llama engine and prompts queued for its prompt thread (src/worker/orphan.c,
docs/engines.md §3.2): a prompt waiting for tokenization counts as waiting in the load, but an
orphan is not preempted for it while sequence slots are free: a freed slot would not let it in
any sooner. Driven by frames (tests/lib/rpclib.py), as tests/fault/test_llama_orphan.py.

One llama worker (stories260K), --max-num-seqs 4, --orphan-grace 30, --fault-signals,
--fault-prompt-delay-ms 1500 (every prompt takes 1.5 s on the prompt thread):
1. a long stream with a stream_key is started and its connection reset after 3 batches: an
   orphan, one slot of four. SIGUSR2 stalls the engine right after, so that the orphan keeps
   running whatever the machine's speed (a round whose orphan finished first is run again);
2. two live requests are sent back to back: when the second arrives, the first is on the prompt
   thread, counted as waiting (baton_worker_waiting_requests) and as preparing. The orphan is not
   preempted (baton_worker_orphan_events_total{event="preempted"} stays 0). Counting every waiting
   sequence as one that needs room killed the orphan here;
3. SIGUSR2 again: both live requests are answered in full.
"""

import os
import signal
import time

import batonlib as bl
import faultlib as fl
import rpclib

if fl.skip("llama") is not None:  # scripts/setup was told not to fetch llama.cpp
    raise SystemExit(77)

bl.deadline(120, "test_llama_orphan_prompts")

DELAY_MS = 1500


def payload(prompt, key=None, max_tokens=1900):
    body = bl.completion_body(prompt, max_tokens=max_tokens, model="mock-model", temperature=0, stream=True)
    p = {"request_id": f"rq-{prompt}", "api": "completion", "body": body, "max_tokens": max_tokens}
    if key:
        p["stream_key"] = key
    return p


def ev(w, event):
    return bl.worker_metric(w, "baton_worker_orphan_events_total", event=event)


def finished_orphans(w):
    return w.proc.log_text().count("orphaned stream finished")


with bl.Cluster() as cl:
    w = cl.start_worker(engine="llama", system_port=True, wait=True, max_num_seqs=4, orphan_grace=30,
                        fault_signals=True, fault_prompt_delay_ms=DELAY_MS, llama_threads=1)
    port = w.rpc_port
    for rnd in range(4):
        n0, f0 = ev(w, "orphaned"), finished_orphans(w)
        c = rpclib.Conn(port)
        r = rpclib.read_stream(c, c.request(payload(f"Once upon a time, orphan {rnd}", key=f"{0xa0 + rnd:032x}")),
                               until_batches=3)
        os.kill(w.proc.pid, signal.SIGUSR2)  # stalled: the orphan stays in its slot
        c.close_abruptly()
        assert len(r.batches) == 3 and r.finish is None, f"the stream ended after {len(r.batches)} batches"
        w.proc.wait_log(r"fault signal SIGUSR2: engine stall toggle", timeout=5)
        bl.wait_for(lambda: ev(w, "orphaned") == n0 + 1, 5, interval=0.005, what="the orphan")
        if finished_orphans(w) > f0:
            print(f"round {rnd}: the orphan finished before the stall; again")
            os.kill(w.proc.pid, signal.SIGUSR2)
            time.sleep(0.2)
            continue
        break
    else:
        raise AssertionError("every round's orphan finished before the engine stalled")

    live = []
    for i in range(2):
        lc = rpclib.Conn(port)
        live.append((lc, lc.request(payload(f"Once upon a time, live {i}", max_tokens=8))))
    # the first is on the prompt thread (1.5 s) when the second arrives; both count as waiting
    bl.wait_for(lambda: bl.worker_metric(w, "baton_worker_waiting_requests") == 2, DELAY_MS / 1000.0 * 0.8,
                interval=0.02, what="two prompts waiting in the load")
    time.sleep(0.2)
    preempted = ev(w, "preempted")
    assert preempted == 0, f"{preempted} orphan(s) preempted for prompts on their way, with slots free"

    os.kill(w.proc.pid, signal.SIGUSR2)  # resumed
    for i, (lc, sid) in enumerate(live):
        res = rpclib.read_stream(lc, sid, timeout=30)
        lc.close()
        assert res.finish and not res.error and len(res.ids) == 8, f"live request {i}: {res.finish} {res.error}"
    assert ev(w, "preempted") == 0

print("test_llama_orphan_prompts: ok")
