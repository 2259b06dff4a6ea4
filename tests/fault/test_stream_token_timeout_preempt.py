"""--stream-token-timeout and priority preemption: a stream its worker preempted for a more urgent
request is not a lost stream.

One mocker worker (--max-num-seqs 1, real-time steps) runs a low-priority stream; an urgent
request (priority 0, 600 tokens: several times the bound) arrives mid-stream and preempts it, so
the low-priority stream hears nothing until the urgent one ends. The frontend runs at
--stream-token-timeout 1. The worker's engine tells it the sequence was preempted, the worker
sends a WAITING frame for the stream (docs/protocol.md), and the sweep does not judge a stream
whose worker keeps it waiting (src/frontend/migrate.c, on_token_sweep); the worker announces
BT_HELLO_WAITING, so its LOAD's waiting count no longer shields its streams:

  * the fault happened: the worker counted a priority preemption, and the low-priority stream's
    longest gap between two events is at least the bound;
  * the low-priority stream completes byte for byte as the same request run alone (text, token
    ids, finish reason), the urgent one completes, and no stream was given up
    (baton_frontend_stream_token_timeouts_total and the migration counters unchanged, no
    "no frame from worker" line);
  * the frontend counted the WAITING frame (baton_frontend_stream_waits_total{reason="preempted"});
  * the worker was not quarantined: a request right after both succeeds.
  * the same with a frontend at --threads 2, three times: the two streams may come through different
    shards, whose connections to the worker are their own; the worker is seen running the urgent
    stream all the same (before, the preempted stream was given up after the bound when the urgent
    one ran on the other shard).

With the mocker telling no preemption, the stream was given up after the bound (its worker
announces BT_HELLO_WAITING, so the LOAD's waiting count no longer covers it). Without any waiting
rule, the sweep KILLed the preempted stream after 1 s, quarantined the only
worker, and the client got a 503 "no worker left to continue the request" after 137 of its 300
tokens; the next request got a 503 "no worker available" too."""

import threading
import time

import batonlib as bl
import faultlib as fl

bl.deadline(150, "test_stream_token_timeout_preempt")

TIMEOUT = 1.0
MODEL = "mock-model"


def low_body():
    b = bl.chat_body("bulk work that an urgent request preempts", max_tokens=300, return_token_ids=True,
                     priority=10, seed=77, temperature=0.7)
    b["stream"] = True
    return b


def urgent_body():
    b = bl.chat_body("vip", max_tokens=600, return_token_ids=True, priority=0)
    b["stream"] = True
    return b


def counters(fe):
    m = bl.metrics(fe.url)
    return {"timeouts": bl.metric_sum(m, "baton_frontend_stream_token_timeouts_total", model=MODEL),
            "migrations": bl.metric_sum(m, "dynamo_frontend_model_migration_total"),
            "preempted_waits": bl.metric_sum(m, "baton_frontend_stream_waits_total", model=MODEL, reason="preempted")}


def preempted_kept(fe, w, ref, rid):
    """The low-priority stream rid is preempted by an urgent one on fe and still completes exactly,
    with nothing given up."""
    before, pre_before = counters(fe), fl.preemptions(w, "priority")
    out = {}
    t = threading.Thread(target=lambda: out.__setitem__(
        "low", bl.stream_chat(fe.url, low_body(), timeout=60, headers={"X-Request-Id": rid})))
    t.start()
    time.sleep(0.8)  # the low-priority stream is running (300 real-time steps take seconds)
    urgent = bl.stream_chat(fe.url, urgent_body(), timeout=60, headers={"X-Request-Id": rid + "-urgent"})
    t.join(70)
    assert not t.is_alive(), "the low-priority stream did not end"
    low = out["low"]

    urgent.assert_ok("the urgent stream")
    assert urgent.finish_reason == "length" and len(urgent.token_ids) == 600, (urgent.finish_reason,
                                                                              len(urgent.token_ids))
    pre = fl.preemptions(w, "priority") - pre_before
    gaps = [b - a for a, b in zip(low.t_tokens, low.t_tokens[1:])]
    gap = max(gaps) if gaps else 0.0
    print(f"{rid}: priority preemptions {pre}; the low-priority stream's longest gap {gap:.2f} s (bound {TIMEOUT} s)")
    assert pre >= 1, f"the urgent request preempted nothing ({pre}): the fault did not happen"
    low.assert_ok("the preempted low-priority stream")
    assert gap >= TIMEOUT, f"the preempted stream's longest gap {gap:.2f} s is under the bound: nothing to judge"
    assert (low.text, list(low.token_ids), low.finish_reason) == (ref.text, list(ref.token_ids), ref.finish_reason), \
        "the preempted stream differs from its reference"
    d = {k: counters(fe)[k] - before[k] for k in before}
    assert d["timeouts"] == 0 and d["migrations"] == 0 and d["preempted_waits"] >= 1, d
    log = fe.proc.log_text()
    assert "no frame from worker" not in log and "quarantined" not in log, \
        [ln for ln in log.splitlines() if "no frame" in ln or "quarantined" in ln]
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("after", max_tokens=5), timeout=30)
    assert st == 200, (st, b)


with bl.Cluster() as c:
    fe = c.start_frontend(stream_token_timeout=TIMEOUT)
    w = c.start_worker(max_num_seqs=1, speedup_ratio=1, system_port=True, wait=True)
    c.wait_workers(fe, 1)
    ref = bl.stream_chat(fe.url, low_body(), timeout=60).assert_ok("the low-priority reference, alone")
    assert ref.finish_reason == "length" and len(ref.token_ids) == 300, (ref.finish_reason, len(ref.token_ids))
    preempted_kept(fe, w, ref, "pre-low")
    # --threads 2: each shard has its own connection to the worker, and the urgent stream may run on
    # the other one's (each new client connection lands on either); the preempted stream's worker
    # is seen running all the same. Three rounds: at least one with the two apart, but for 1 in 8.
    fe2 = c.start_frontend(stream_token_timeout=TIMEOUT, threads=2)
    c.wait_workers(fe2, 1)
    for i in range(3):
        preempted_kept(fe2, w, ref, f"pre-low-t{i}")
    print("preempted stream kept: completed exactly, nothing given up, the worker still routable (also with "
          "--threads 2)")
