"""Exactness fingerprints on the llama engine: a stream continues after a migration only on a
worker that computes the same logits (docs/engines.md §3.4), with real processes.

1. The worker's own check (defence in depth, over the request plane with tests/lib/rpclib.py):
   a continuation naming another fingerprint (here: another thread count) is refused with
   BT_ERR_NO_WORKER and a message saying why; the same continuation naming the worker's own
   fingerprint continues byte-exact with the tail of a fault-free run; one naming none (an engine
   without fingerprints began it) is served.
2. Mismatched fleet: two llama workers with different --llama-threads. kill -9 of the worker
   serving a long stream mid-way: the stream does NOT continue on the other worker; it ends with
   the documented error event (code no_worker_available, the fingerprint named), the frontend logs
   why, and the other worker never saw a continuation.
   The same for a resumed stream (its client cut, its worker killed with SIGKILL, then a re-POST
   with Last-Event-ID): the fingerprint comes back from the stream journal, and the resume ends
   with the error event instead of continuing on the other worker.
3. Matching fleet: llama workers with the same --llama-threads (1: a 2-thread decode crawls when
   the machine is oversubscribed, as test machines are). kill -9 of the serving worker
   mid-stream: a greedy and a seeded (temperature 0.8) stream continue on the other and equal their
   fault-free runs byte for byte (text, token ids, finish_reason, usage).
"""

import re
import sys

import batonlib as bl
import faultlib as fl
import rpclib

MODEL = "mock-model"
NO_WORKER = 14  # BT_ERR_NO_WORKER (src/common/status.h)
KILL_AT = 300


def fingerprint(w):
    return w.proc.wait_log(r'exactness fingerprint "([^"]+)"', timeout=20).group(1)


def worker_check(w):
    fp = fingerprint(w)
    assert "threads=1" in fp and "cpu=" in fp and "model=" in fp, fp
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 80, "temperature": 0}
    c = rpclib.Conn(w.rpc_port)
    ref = rpclib.read_stream(c, c.request({"request_id": "ref", "api": "completion", "body": body, "max_tokens": 80}))
    assert ref.finish and ref.finish[0] == "length" and len(ref.ids) == 80, (ref.finish, ref.error)
    carried = ref.ids[:30]
    base = {"request_id": "cont", "api": "completion", "body": body, "carried": carried, "max_tokens": 50}

    other = fp.replace("threads=1", "threads=2")
    r = rpclib.read_stream(c, c.request(dict(base, exactness=other)))
    assert r.error and r.error[0] == NO_WORKER, f"a continuation of another fingerprint was not refused: {r.error}"
    assert "refusing to continue" in r.error[1] and other in r.error[1] and fp in r.error[1], r.error
    assert not r.ids, "a refused continuation produced tokens"

    r = rpclib.read_stream(c, c.request(dict(base, exactness=fp)))
    assert r.finish and r.ids == ref.ids[30:], f"the continuation differs from the fault-free run: {r.error}"
    r = rpclib.read_stream(c, c.request(base))  # no fingerprint: no constraint
    assert r.finish and r.ids == ref.ids[30:], r.error
    c.close()
    print("worker: refuses another fingerprint, continues its own and an unnamed one byte-exact")


def serving(workers):
    """The worker whose engine holds KV cells (the one streaming), or None."""
    for w in workers:
        if w.proc.alive() and bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_active_blocks") > 0:
            return w
    return None


def stream_with_kill(fe, body, rid, workers, killed, kill_at=KILL_AT):
    def on_event(st, obj):
        if len(st.token_ids) >= kill_at and not killed:
            w = serving(workers)
            if w:
                killed.append(w)
                w.proc.kill(9)
        return False
    return bl.stream_completion(fe.url, body, timeout=40, on_event=on_event, headers={"X-Request-Id": rid})


def long_body(seeded=False):
    extra = {"return_token_ids": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if seeded:
        extra.update(temperature=0.8, seed=4242)
    return bl.completion_body("Once upon a time, a little fox", max_tokens=1200, model=MODEL, **extra)


def mismatched(c, fe):
    w1 = c.start_worker(engine="llama", system_port=True, wait=True, llama_threads=1)
    w2 = c.start_worker(engine="llama", system_port=True, wait=True, llama_threads=2)
    c.wait_workers(fe, 2)
    assert fingerprint(w1) != fingerprint(w2)
    killed = []
    s = stream_with_kill(fe, long_body(), "mismatch-0", [w1, w2], killed, kill_at=100)
    assert killed, "no worker was serving the stream"
    survivor = w2 if killed[0] is w1 else w1
    assert s.error is not None and not s.done, f"the stream went on after its worker died: {s.summary()}"
    err = s.error.get("error", s.error) if isinstance(s.error, dict) else {}
    msg = err.get("message", "")
    assert err.get("code") == "no_worker_available", s.error
    assert "no worker can continue this stream exactly" in msg and fingerprint(killed[0]) in msg, s.error
    assert 100 <= len(s.token_ids) < 1200, s.summary()
    log = fe.proc.log_text()
    assert re.search(r"request mismatch-0: no worker can continue this stream exactly .*exactness fingerprint", log)
    assert "request mismatch-0 migrated" not in log, "the frontend sent a continuation to the mismatched worker"
    assert "refusing to continue" not in survivor.proc.log_text(), "the mismatched worker was sent the continuation"
    print(f"mismatched: stream ended with the error event after {len(s.token_ids)} tokens; not continued")
    survivor.proc.stop()
    c.wait_workers(fe, 0)
    resumed(c, fe)


def requests_total(w):
    return bl.metric_sum(bl.metrics(w.system_url), "dynamo_component_requests_total")


def resumed(c, fe):
    w1 = c.start_worker(engine="llama", system_port=True, wait=True, llama_threads=1)
    w2 = c.start_worker(engine="llama", system_port=True, wait=True, llama_threads=2)
    c.wait_workers(fe, 2)
    n0 = [requests_total(w) for w in (w1, w2)]
    cut = bl.stream_completion(fe.url, long_body(), abort_after=8)
    assert cut.aborted and cut.last_event_id and cut.token_ids, cut.summary()
    ran = [w for w, n in zip((w1, w2), n0) if requests_total(w) > n]
    assert len(ran) == 1, f"the cut stream ran on {len(ran)} workers"
    victim, other = ran[0], (w2 if ran[0] is w1 else w1)
    victim.proc.kill(9)
    c.wait_workers(fe, 1)
    n_other = requests_total(other)
    rest = bl.stream_completion(fe.url, long_body(), timeout=30, headers={"Last-Event-ID": cut.last_event_id})
    err = rest.error or {}
    assert err.get("code") == "no_worker_available" and fingerprint(victim) in err.get("message", ""), \
        f"the resumed stream was not refused: {rest.summary()}"
    assert not rest.done, rest.summary()
    assert requests_total(other) == n_other, "the mismatched worker was sent the resumed stream"
    print(f"resumed: ended with the error event after the journal's {len(cut.token_ids)} tokens; not continued")
    other.proc.stop()
    c.wait_workers(fe, 0)


def matching(c, fe):
    w3 = c.start_worker(engine="llama", system_port=True, wait=True, llama_threads=1)
    w4 = c.start_worker(engine="llama", system_port=True, wait=True, llama_threads=1)
    c.wait_workers(fe, 2)
    assert fingerprint(w3) == fingerprint(w4)
    for seeded in (False, True):
        ref = bl.stream_completion(fe.url, long_body(seeded), timeout=40)
        ref.assert_ok("reference")
        assert len(ref.token_ids) == 1200, ref.summary()
        killed = []
        rid = f"match-{int(seeded)}"
        s = stream_with_kill(fe, long_body(seeded), rid, [w3, w4], killed)
        assert killed, "no worker was serving the stream"
        assert s.ok and fl.outcome(s) == fl.outcome(ref), f"{rid}: differs from the fault-free run: {s.summary()}"
        assert f"request {rid} migrated" in fe.proc.log_text(), f"{rid} was not migrated"
        # the next round needs two workers again
        w_new = c.start_worker(engine="llama", system_port=True, wait=True, llama_threads=1)
        alive = [w for w in (w3, w4) if w is not killed[0]]
        w3, w4 = alive[0], w_new
        c.wait_workers(fe, 2)
        print(f"matching: {'seeded' if seeded else 'greedy'} stream migrated after {KILL_AT}+ tokens, byte-exact")


def main():
    if fl.skip("llama") is not None:
        return 77
    with bl.deadline(60, "test_llama_exactness"):
        with bl.Cluster() as c:
            w = c.start_worker(engine="llama", system_port=True, wait=True, llama_threads=1)
            worker_check(w)
            w.proc.stop()
            fe = c.start_frontend()
            mismatched(c, fe)
            matching(c, fe)
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
