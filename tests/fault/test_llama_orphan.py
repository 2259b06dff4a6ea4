"""Orphaned streams on the llama engine (src/worker/orphan.c; docs/fault-tolerance.md, "Frontend
failover"): an orphan never holds capacity a live request needs. Driven by frames
(tests/lib/rpclib.py), as tests/fault/test_orphan.py does on the mocker.

One llama worker (the bundled stories260K model), --max-num-seqs 2, --orphan-grace 30.
1. Two long streams with a stream_key are started and their connections reset after 3 batches:
   both are kept as orphans and fill the engine's two sequence slots.
2. A live request arrives on a new connection: exactly one orphan, the oldest, is preempted for it
   (baton_worker_orphan_events_total{event="preempted"} = 1, its log line), and the live request is
   answered in full while the other orphan still runs. Before the fix the llama worker saw no full
   engine (the sequence cap was checked on the mocker only): nothing was preempted and the live
   request waited for an orphan to end; a worker reading the llama engine's load alone (a snapshot
   its thread updates later) would kill both orphans for the one request.
3. The surviving orphan is still adoptable: an adopter carrying its first 3 batches gets the rest,
   and the whole equals an uninterrupted run of the same payload (ids, text, finish reason), with
   no new engine sequence.

A round in which an orphan finished before the live request was sent (the engine is fast: a
finished orphan holds no capacity, so there is nothing to preempt) proves nothing and is run
again with new streams, up to 4 times. (Without the fix the live request waits until an orphan
finishes, so the round fails on the preemption count, with the orphans finished meanwhile.)
"""

import time

import batonlib as bl
import faultlib as fl
import rpclib

if fl.skip("llama") is not None:  # scripts/setup was told not to fetch llama.cpp
    raise SystemExit(77)

bl.deadline(150, "test_llama_orphan")

MAX_TOKENS = 1900


def payload(prompt, key=None, max_tokens=MAX_TOKENS):
    body = bl.completion_body(prompt, max_tokens=max_tokens, model="mock-model", temperature=0, stream=True)
    p = {"request_id": f"rq-{prompt}", "api": "completion", "body": body, "max_tokens": max_tokens}
    if key:
        p["stream_key"] = key
    return p


def m(w):
    return bl.metrics(w.system_url)


def ev(w, event):
    return bl.metric_sum(m(w), "baton_worker_orphan_events_total", event=event)


def orphan(port, p, nbatches=3):
    c = rpclib.Conn(port)
    r = rpclib.read_stream(c, c.request(p), until_batches=nbatches)
    assert len(r.batches) == nbatches and r.finish is None, f"the stream ended after {len(r.batches)} batches"
    c.close_abruptly()
    return r


def finished_orphans(w):
    return w.proc.log_text().count("orphaned stream finished")


with bl.Cluster() as cl:
    w = cl.start_worker(engine="llama", system_port=True, wait=True, max_num_seqs=2, orphan_grace=30,
                        llama_threads=1)
    port = w.rpc_port
    for rnd in range(4):
        a = payload(f"Once upon a time, orphan a{rnd}", key=f"{0xa0 + rnd:032x}")
        b = payload(f"Once upon a time, orphan b{rnd}", key=f"{0xb0 + rnd:032x}")
        n0, p0, f0 = ev(w, "orphaned"), ev(w, "preempted"), finished_orphans(w)
        orphan(port, a)
        bl.wait_for(lambda: ev(w, "orphaned") == n0 + 1, 5, interval=0.005, what="the first orphan")
        first_b = orphan(port, b)
        bl.wait_for(lambda: ev(w, "orphaned") == n0 + 2, 5, interval=0.005, what="the second orphan")
        if finished_orphans(w) > f0:
            print(f"round {rnd}: an orphan finished before the live request; again")
            continue
        t0 = time.monotonic()
        c = rpclib.Conn(port)
        live = rpclib.read_stream(c, c.request(payload(f"Once upon a time, live {rnd}", max_tokens=8)))
        c.close()
        took = time.monotonic() - t0
        assert live.finish and not live.error and len(live.ids) == 8, f"live request: {live.finish} {live.error}"
        preempted = ev(w, "preempted") - p0
        assert preempted == 1, f"{preempted} orphans preempted for one live request on two slots (it took " \
            f"{took:.3f} s, {finished_orphans(w) - f0} orphans finished meanwhile)"
        assert w.proc.wait_log(rf"request rq-Once upon a time, orphan a{rnd}: orphaned stream ended \(preempted\)",
                               timeout=5)
        break
    else:
        raise AssertionError("every round's orphans finished before the live request: the engine is too fast here")

    # the newer orphan is intact and adoptable (finished meanwhile or not)
    ref_c = rpclib.Conn(port)
    ref = rpclib.read_stream(ref_c, ref_c.request(dict(b, stream_key=f"{0xc0:032x}")), timeout=60)
    ref_c.close()
    assert ref.finish and not ref.error and len(ref.ids) > len(first_b.ids), f"reference: {ref.finish} {ref.error}"
    assert first_b.ids == ref.ids[:len(first_b.ids)], "the orphan's first batches differ from the reference"
    s0 = bl.metric_sum(m(w), "baton_worker_engine_submits_total")
    have = rpclib.Result()
    have.batches = first_b.batches
    p = dict(b, carried=have.ids, carried_text=have.text.decode(), adopt=True,
             max_tokens=b["max_tokens"] - len(have.ids))
    c = rpclib.Conn(port)
    rest = rpclib.read_stream(c, c.request(p), timeout=60)
    c.close()
    joined = rpclib.Result()
    joined.batches = have.batches + rest.batches
    assert rest.error is None, rest.error
    assert joined.ids == ref.ids, f"adopted orphan: {len(joined.ids)} ids vs {len(ref.ids)}"
    assert joined.text == ref.text and rest.finish == ref.finish, "adopted orphan: text or finish differs"
    assert ev(w, "adopted") == 1
    assert bl.metric_sum(m(w), "baton_worker_engine_submits_total") == s0, "the adopter's REQUEST reached the engine"

print("test_llama_orphan: ok")
