"""Orphaned streams on a worker (docs/fault-tolerance.md, "Frontend failover"): a streamed request
whose frontend connection ends is kept running for --orphan-grace seconds, and a REQUEST with
`adopt` re-attaches to it from another connection with no prefill. Driven at the level of frames
(tests/lib/rpclib.py) so that each case closes the first connection at an exact point.

Scenarios, each against an uninterrupted reference run of the same payload:
  * re-attach: the first connection reads 30 batches and dies (a reset, as kill -9 leaves it); the
    adopter says it has only the first 10 batches (a journal that lags what the dead frontend
    received): the worker sends everything after batch 10 — what it had sent the dead frontend
    and what it produced since — then the rest live; ids, text and usage equal the reference, and
    the engine got no new sequence (baton_worker_engine_submits_total did not move);
  * finished while orphaned: the adopter gets the missing batches and FINISH at once;
  * mismatch: an adopter whose carried tokens differ is not given the orphan: the orphan is killed
    and the payload runs as an ordinary continuation (a new engine sequence);
  * expiry: after the grace the orphan is gone and the adopt payload runs as a continuation, still
    exact (the continuation guarantee);
  * non-streaming requests are never orphaned, even with a stream_key;
  * preemption: with --max-num-seqs 2 and two orphans, a new request would have to wait: the
    oldest orphan is killed for it; the newer one is still adoptable;
  * --orphan-grace 0: the stream is killed with its connection, as before;
  * the bounded history: an orphan whose history outgrows 1 MiB is ended at once (event
    "overflow"), long before its grace, and leaves the engine;
  * reclaimed: a frontend that connects again (same instance id) lived on and continued its
    streams elsewhere: the orphans its earlier connection left are ended at once.
"""

import time

import batonlib as bl
import rpclib

bl.deadline(180, "test_orphan")

KEYS = iter(f"{i:032x}" for i in range(0xabc000, 0xabd000))


def payload(prompt, max_tokens, key=None, stream=True, **extra):
    body = bl.completion_body(prompt, max_tokens=max_tokens, stream=stream)
    p = {"request_id": f"rq-{prompt}", "api": "completion", "body": body, "max_tokens": max_tokens}
    if key:
        p["stream_key"] = key
    p.update(extra)
    return p


def adopt_payload(base, ref, nbatches):
    """The adopter's payload: the reference's first nbatches batches carried."""
    have = rpclib.Result()
    have.batches = ref.batches[:nbatches]
    p = dict(base, carried=have.ids, carried_text=have.text.decode(), adopt=True,
             max_tokens=base["max_tokens"] - len(have.ids))
    return p, have


def run_whole(port, p):
    c = rpclib.Conn(port)
    r = rpclib.read_stream(c, c.request(p))
    c.close()
    assert r.finish and not r.error, f"reference run: {r.error}"
    return r


def start_stream(port, p, nbatches, instance_id=None):
    """Starts p on a new connection, reads nbatches batches, then kills the connection."""
    c = rpclib.Conn(port, instance_id=instance_id)
    r = rpclib.read_stream(c, c.request(p), until_batches=nbatches)
    assert len(r.batches) == nbatches and r.finish is None, f"the stream ended after {len(r.batches)} batches"
    c.close_abruptly()
    return r


def adopt(port, p, have):
    c = rpclib.Conn(port)
    r = rpclib.read_stream(c, c.request(p))
    c.close()
    joined = rpclib.Result()
    joined.batches = have.batches + r.batches
    joined.finish, joined.error = r.finish, r.error
    return joined


def assert_exact(got, ref, what):
    assert got.error is None, f"{what}: error {got.error}"
    assert got.ids == ref.ids, f"{what}: {len(got.ids)} ids vs {len(ref.ids)}; first difference at " \
        f"{next((i for i, (a, b) in enumerate(zip(got.ids, ref.ids)) if a != b), min(len(got.ids), len(ref.ids)))}"
    assert got.text == ref.text, f"{what}: text differs"
    assert got.finish == ref.finish, f"{what}: finish {got.finish} vs {ref.finish}"


def m(w):
    return bl.metrics(w.system_url)


def ev(w, event):
    return bl.metric_sum(m(w), "baton_worker_orphan_events_total", event=event)


def submits(w):
    return bl.metric_sum(m(w), "baton_worker_engine_submits_total")


def orphans(w):
    return bl.metric_sum(m(w), "baton_worker_orphans")


with bl.Cluster() as cl:
    w = cl.start_worker(system_port=True, wait=True, speedup_ratio=0.5, orphan_grace=20)
    port = w.rpc_port

    # -- re-attach after the dead frontend got more than the adopter has -------------------------
    base = payload("orphan one", 300, key=next(KEYS))
    ref = run_whole(port, dict(base, stream_key=next(KEYS)))
    assert len(ref.ids) == 300
    s0 = submits(w)
    first = start_stream(port, base, 30)
    assert first.ids == ref.ids[:len(first.ids)], "the first connection's tokens differ from the reference"
    bl.wait_for(lambda: ev(w, "orphaned") == 1, 5, what="the stream kept as an orphan")
    assert orphans(w) == 1
    time.sleep(0.5)  # it keeps generating meanwhile
    p, have = adopt_payload(base, ref, 10)
    got = adopt(port, p, have)
    assert_exact(got, ref, "re-attached stream")
    assert ev(w, "adopted") == 1, m(w)
    assert submits(w) == s0 + 1, f"the adopter's REQUEST reached the engine: submits {s0} -> {submits(w)}"
    assert orphans(w) == 0
    assert w.proc.wait_log(r"re-attached to orphaned stream [0-9a-f]{32} at position \d+; sending the \d+ tokens "
                           r"produced after it \(no prefill\)", timeout=5)

    # -- finished while orphaned ----------------------------------------------------------------
    base = payload("orphan two", 40, key=next(KEYS))
    ref = run_whole(port, dict(base, stream_key=next(KEYS)))
    s0 = submits(w)
    start_stream(port, base, 5)
    w.proc.wait_log(r"orphaned stream finished \(\w+\) after 40 new tokens", timeout=10)
    p, have = adopt_payload(base, ref, 5)
    got = adopt(port, p, have)
    assert_exact(got, ref, "finished orphan")
    assert ev(w, "adopted") == 2 and submits(w) == s0 + 1

    # -- mismatch: an adopter with other tokens runs as a continuation ----------------------------
    base = payload("orphan three", 200, key=next(KEYS))
    ref = run_whole(port, dict(base, stream_key=next(KEYS)))
    s0 = submits(w)
    start_stream(port, base, 10)
    bl.wait_for(lambda: orphans(w) == 1, 5, what="orphan three kept")
    p, have = adopt_payload(base, ref, 8)
    p["carried"] = list(p["carried"])
    p["carried"][3] ^= 1
    c = rpclib.Conn(port)
    r = rpclib.read_stream(c, c.request(p))
    c.close()
    assert r.finish and not r.error, r.error
    assert ev(w, "mismatch") == 1 and ev(w, "adopted") == 2
    assert submits(w) == s0 + 2, "the mismatched adopter did not run as a new sequence"
    assert orphans(w) == 0

    # -- non-streaming requests are never orphaned ----------------------------------------------
    before = ev(w, "orphaned")
    lost0 = bl.metric_sum(m(w), "dynamo_component_cancellation_total", kind="frontend_lost")
    c = rpclib.Conn(port)
    sid = c.request(payload("orphan four", 300, key=next(KEYS), stream=False))
    rpclib.read_stream(c, sid, until_batches=3)
    c.close_abruptly()
    bl.wait_for(lambda: bl.metric_sum(m(w), "dynamo_component_cancellation_total", kind="frontend_lost") == lost0 + 1,
                5, what="the non-streaming request killed with its connection")
    assert ev(w, "orphaned") == before and orphans(w) == 0

with bl.Cluster() as cl:
    # -- expiry, preemption and grace 0 ---------------------------------------------------------
    w = cl.start_worker(system_port=True, wait=True, speedup_ratio=0.5, orphan_grace=1.5, max_num_seqs=2)
    port = w.rpc_port
    base = payload("orphan five", 120, key=next(KEYS))
    ref = run_whole(port, dict(base, stream_key=next(KEYS)))
    start_stream(port, base, 10)
    bl.wait_for(lambda: ev(w, "expired") == 1, 6, what="the orphan expired")
    assert orphans(w) == 0
    s0 = submits(w)
    p, have = adopt_payload(base, ref, 10)
    got = adopt(port, p, have)
    assert_exact(got, ref, "continuation after expiry")
    assert submits(w) == s0 + 1 and ev(w, "adopted") == 0

    w2 = cl.start_worker(system_port=True, wait=True, speedup_ratio=0.5, orphan_grace=30, max_num_seqs=2)
    a = payload("orphan six", 400, key=next(KEYS))
    b = payload("orphan seven", 400, key=next(KEYS))
    start_stream(w2.rpc_port, a, 5)
    bl.wait_for(lambda: orphans(w2) == 1, 5, what="first orphan")
    start_stream(w2.rpc_port, b, 5)
    bl.wait_for(lambda: orphans(w2) == 2, 5, what="second orphan")
    c = rpclib.Conn(w2.rpc_port)
    sid = c.request(payload("orphan eight", 20, key=next(KEYS)))
    r = rpclib.read_stream(c, sid)
    c.close()
    assert r.finish and len(r.ids) == 20
    assert ev(w2, "preempted") == 1 and orphans(w2) == 1, m(w2)
    assert w2.proc.wait_log(r"request rq-orphan six: orphaned stream ended \(preempted\)", timeout=5)
    # the newer orphan survived and is adoptable
    refb = run_whole(w.rpc_port, dict(b, stream_key=next(KEYS)))
    p, have = adopt_payload(b, refb, 5)
    s0 = submits(w2)
    got = adopt(w2.rpc_port, p, have)
    assert_exact(got, refb, "the surviving orphan")
    assert ev(w2, "adopted") == 1 and submits(w2) == s0

    w3 = cl.start_worker(system_port=True, wait=True, speedup_ratio=0.5, orphan_grace=0)
    start_stream(w3.rpc_port, payload("orphan nine", 300, key=next(KEYS)), 5)
    bl.wait_for(lambda: bl.metric_sum(m(w3), "dynamo_component_cancellation_total", kind="frontend_lost") == 1, 5,
                what="grace 0 kills with the connection")
    assert ev(w3, "orphaned") == 0

    # -- the bounded history: an orphan that outgrows it is ended ----------------------------------
    w4 = cl.start_worker(system_port=True, wait=True, speedup_ratio=1000, orphan_grace=60)
    big = payload("orphan eleven", 200000, key=next(KEYS))
    start_stream(w4.rpc_port, big, 3)
    bl.wait_for(lambda: ev(w4, "orphaned") == 1, 5, what="orphan eleven kept")
    bl.wait_for(lambda: ev(w4, "overflow") == 1, 30, what="orphan eleven ended when its history outgrew its cap")
    assert orphans(w4) == 0 and ev(w4, "expired") == 0, m(w4)
    bl.wait_for(lambda: bl.metric_sum(m(w4), "baton_worker_active_sequences") == 0, 5,
                what="the overflowed orphan gone from the engine")
    assert w4.proc.wait_log(r"request rq-orphan eleven: its history outgrew 1048576 bytes", timeout=5)

    # -- reclaimed: the same frontend connects again ---------------------------------------------
    start_stream(w2.rpc_port, payload("orphan ten", 400, key=next(KEYS)), 5, instance_id=0x77)
    bl.wait_for(lambda: ev(w2, "orphaned") == 3, 5, what="orphan ten kept")
    n0 = orphans(w2)
    rpclib.Conn(w2.rpc_port, instance_id=0x77).close()
    bl.wait_for(lambda: ev(w2, "reclaimed") == 1, 5, what="orphan ten reclaimed by its frontend's new connection")
    assert orphans(w2) == n0 - 1

print("test_orphan: ok")
