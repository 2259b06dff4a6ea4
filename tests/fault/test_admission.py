"""The frontend's admission queue through the real binaries (src/frontend/admit.c): requests wait
for a worker that is not busy instead of being refused, leave in priority order and fairly across
tenants (by tokens), and are refused with 429 (a tenant over its share) or 503 (a full queue, a
wait past --queue-timeout) with Retry-After and an OpenAI error body; a queued request whose
client leaves is dropped at once.

One worker with a small KV cache (64 blocks of 16 tokens) and a busy threshold of half of it, so
that three requests of 160 tokens make it busy.
"""

import json
import socket
import statistics
import threading
import time

import batonlib as bl

bl.deadline(280, "test_admission")

WORKER = dict(num_gpu_blocks_override=64, block_size=16, speedup_ratio=2)
MAX_TOKENS = 160


def body(tag, **extra):
    return bl.chat_body(f"admission {tag}", max_tokens=MAX_TOKENS, return_token_ids=True, **extra)


def key(name):
    return {"Authorization": f"Bearer {name}"}


def send_all(fe, jobs):
    """jobs: [(body, headers)]; returns the streams in order."""
    return bl.run_concurrently(lambda b, h: bl.stream_chat(fe.url, b, timeout=150, headers=h), jobs,
                               max_workers=len(jobs))


def queued(fe):
    return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_queue_requests")


def decisions(fe, decision, tenant=None):
    m = bl.metrics(fe.url)
    f = {"decision": decision}
    if tenant:
        f["tenant"] = tenant
    return bl.metric_sum(m, "baton_frontend_admission_total", **f)


def check_refusal(s, status, code):
    assert s.status == status, s.summary()
    ra = s.headers.get("retry-after")
    assert ra is not None and ra.isdigit() and 1 <= int(ra) <= 60, f"bad Retry-After {ra!r}"
    err = json.loads(s.body)["error"]
    want_type = "invalid_request_error" if status == 429 else "server_error"
    assert err["code"] == code and err["type"] == want_type and err["message"], err
    return int(ra)


with bl.Cluster() as c:
    fe = c.start_frontend(active_decode_blocks_threshold=0.5, queue_max_requests=100, queue_timeout=60,
                          trust_tenant_header=True)
    c.start_worker(**WORKER)
    c.wait_workers(fe, 1)

    # --- 1. 3x overload with a queue: nothing refused, every stream complete and exact
    refs = {}
    for i in range(3):
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(i % 3))
        assert st == 200, b
        refs[i] = b["choices"][0]["token_ids"]
    res = send_all(fe, [(body(i % 3), None) for i in range(15)])
    for i, s in enumerate(res):
        s.assert_ok("a queued stream")
        assert s.token_ids == refs[i % 3], "a queued stream differs from its reference"
    assert decisions(fe, "queued") > 0, "3x overload queued nothing"
    assert decisions(fe, "admitted") == decisions(fe, "queued"), "queued requests did not all leave the queue"
    assert bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_model_rejection_total") == 0
    print(f"queue: 15 streams at 3x overload, {decisions(fe, 'queued'):.0f} queued, none refused")

    # --- 2. priority at the frontend: urgent requests sent after a flood overtake it. From here a
    # threshold of 0: the worker is busy while it holds any KV block, so it runs one stream at a
    # time and the rest wait in the frontend's queue (the order under test is the queue's alone)
    st, _, b = bl.post_json(fe.url + "/busy_threshold", {"model": "mock-model", "active_decode_blocks_threshold": 0})
    assert st == 200, b
    short = dict(max_tokens=40)
    low, high = [None] * 24, [None] * 4

    def low_one(i):
        low[i] = bl.stream_chat(fe.url, bl.chat_body(f"low {i}", priority=5, **short), timeout=150, headers=key("bulk"))

    def high_one(i):
        high[i] = bl.stream_chat(fe.url, bl.chat_body(f"high {i}", priority=-1, **short), timeout=150, headers=key("vip"))

    ts = [threading.Thread(target=low_one, args=(i,)) for i in range(24)]
    for t in ts:
        t.start()
    bl.wait_for(lambda: queued(fe) >= 20, 20, what="the flood to queue")
    hs = [threading.Thread(target=high_one, args=(i,)) for i in range(4)]
    for t in hs:
        t.start()
    for t in ts + hs:
        t.join(150)
    for s in low + high:
        s.assert_ok("a prioritised stream")
    lt = [s.t_first - s.t_start for s in low]
    ht = [s.t_first - s.t_start for s in high]
    print(f"frontend priority: low median TTFT {statistics.median(lt):.2f}s, urgent {[round(x, 2) for x in ht]}")
    assert max(ht) < statistics.median(lt) / 3, (ht, statistics.median(lt))

    # --- 3. fairness by tokens: tenant A queues 40 requests, then B queues 4 of the same size; while
    # B has requests waiting, the queue lets out about as many of A's as of B's (in FIFO order all of
    # A's would leave first). Sampled from the per-tenant admission counters (X-Tenant, trusted).
    adm = lambda m, t: bl.metric_sum(m, "baton_frontend_admission_total", tenant=t, decision="admitted")
    a_res, b_res = [None] * 40, [None] * 4

    def a_one(i):
        a_res[i] = bl.stream_chat(fe.url, bl.chat_body(f"a {i}", **short), timeout=150, headers={"X-Tenant": "tenant-a"})

    def b_one(i):
        b_res[i] = bl.stream_chat(fe.url, bl.chat_body(f"b {i}", **short), timeout=150, headers={"X-Tenant": "tenant-b"})

    ta = [threading.Thread(target=a_one, args=(i,)) for i in range(40)]
    for t in ta:
        t.start()
    bl.wait_for(lambda: queued(fe) >= 30, 20, what="tenant A's requests to queue")
    m = bl.metrics(fe.url)
    a0, b0 = adm(m, "tenant-a"), adm(m, "tenant-b")
    tb = [threading.Thread(target=b_one, args=(i,)) for i in range(4)]
    for t in tb:
        t.start()
    a_at_b_done = None
    t_end = time.monotonic() + 60
    while time.monotonic() < t_end:
        m = bl.metrics(fe.url)
        if adm(m, "tenant-b") - b0 >= 4:
            a_at_b_done = adm(m, "tenant-a") - a0
            break
        time.sleep(0.01)
    for t in ta + tb:
        t.join(150)
    for s in a_res + b_res:
        s.assert_ok("a fairly queued stream")
    assert a_at_b_done is not None, "tenant B's requests never all left the queue"
    print(f"fairness: while B's 4 requests waited, A's queue let out {a_at_b_done:.0f}")
    # B's 4 alternate with A's (one sample of slack: the counters are polled)
    assert a_at_b_done <= 4 + 2, f"tenant A got {a_at_b_done} admissions while B got 4: not fair"

with bl.Cluster() as c:
    # --- 4. a small queue: 503 for a full queue of one tenant, 429 for the tenant over its share
    # a threshold of 0: one stream at a time on the worker, the rest in the queue
    fe = c.start_frontend(active_decode_blocks_threshold=0, queue_max_requests=6, queue_timeout=60)
    c.start_worker(**WORKER)
    c.wait_workers(fe, 1)
    routed = lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_routed_total")
    a_jobs = [(body(f"fill {i}"), key("tenant-a")) for i in range(14)]
    a_streams = [None] * len(a_jobs)

    def a_send(i):
        a_streams[i] = bl.stream_chat(fe.url, a_jobs[i][0], timeout=150, headers=a_jobs[i][1])

    ta = [threading.Thread(target=a_send, args=(i,)) for i in range(len(a_jobs))]
    for t in ta:
        t.start()
    # every one of A's requests decided (routed, queued or refused) before B comes: a request of A
    # still on its way (a slow, sanitized build) would otherwise meet B's share and get a 429
    bl.wait_for(lambda: queued(fe) == 6 and decisions(fe, "rejected_queue_full") >= 1 and
                routed() + queued(fe) + decisions(fe, "rejected_queue_full") == len(a_jobs), 20,
                what="tenant A to fill the queue, every one of its requests decided")
    # B arrives at a full queue within its share: A's newest queued request makes room (429)
    b_stream = [None]
    tb = threading.Thread(target=lambda: b_stream.__setitem__(0, bl.stream_chat(fe.url, body("b0"), timeout=150,
                                                                                 headers=key("tenant-b"))))
    tb.start()
    bl.wait_for(lambda: decisions(fe, "rejected_over_share") >= 1, 10, what="an eviction for tenant B")
    # A, now over its share (6 slots for 2 tenants), is refused with 429 at once
    s = bl.stream_chat(fe.url, body("a-more"), timeout=30, headers=key("tenant-a"))
    check_refusal(s, 429, "rate_limit_exceeded")
    for t in ta + [tb]:
        t.join(150)
    b_stream[0].assert_ok("tenant B's request")
    full = [x for x in a_streams if x.status == 503]
    evicted = [x for x in a_streams if x.status == 429]
    served = [x for x in a_streams if x.status == 200]
    assert full and len(evicted) == 1, [x.status for x in a_streams]
    for x in full:
        check_refusal(x, 503, "queue_full")
    for x in evicted:
        check_refusal(x, 429, "rate_limit_exceeded")
    for x in served:
        x.assert_ok("an admitted stream")
    assert len(full) + len(evicted) + len(served) == len(a_streams)
    print(f"limits: A {len(served)} served, {len(full)} got 503 (queue full), {len(evicted)} evicted with 429")

    # --- 5. a queued request whose client leaves is dropped at once and never reaches a worker
    bl.wait_for(lambda: queued(fe) == 0, 30, what="the queue to empty")
    # one long stream keeps whatever comes next in the queue
    routed_start = routed()
    blk = [None]
    blocker = threading.Thread(target=lambda: blk.__setitem__(0, bl.stream_chat(
        fe.url, bl.chat_body("blocker", max_tokens=300), timeout=150)))
    blocker.start()
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_busy") == 1, 20,
                what="the blocker to make the worker busy")
    gone0, qd0 = decisions(fe, "dropped_client_gone"), decisions(fe, "queued")
    raw = json.dumps(body("leaver")).encode()
    sk = socket.create_connection(("127.0.0.1", fe.port))
    sk.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    bl.wait_for(lambda: decisions(fe, "queued") == qd0 + 1, 5, what="the leaver to queue")
    assert queued(fe) == 1
    sk.close()
    bl.wait_for(lambda: decisions(fe, "dropped_client_gone") == gone0 + 1, 2, what="the leaver to be dropped")
    assert queued(fe) == 0
    blocker.join(150)
    blk[0].assert_ok("the blocker")
    # the only request routed since is the blocker: the leaver never reached the worker
    assert routed() - routed_start == 1, (routed() - routed_start)

    # --- 6. a wait past --queue-timeout is a 503; runtime control of the limits
    st, _, b = bl.post_json(fe.url + "/admission", {"queue_timeout": 0.5})
    assert st == 200 and b["queue_timeout"] == 0.5 and b["queue_max_requests"] == 6, b
    res = send_all(fe, [(body(f"to {i}"), None) for i in range(10)])
    codes = [json.loads(x.body)["error"]["code"] if x.status == 503 else x.status for x in res]
    timed_out = [x for x, cd in zip(res, codes) if cd == "queue_timeout"]
    assert timed_out, codes
    for x, cd in zip(res, codes):
        if x.status == 503:
            check_refusal(x, 503, cd)
            assert cd in ("queue_timeout", "queue_full"), cd
    for x in timed_out:
        assert 0.4 < x.t_end - x.t_start < 10, x.t_end - x.t_start
    for x in res:
        if x.status == 200:
            x.assert_ok("an admitted stream")
    for payload, code in (({"queue_timeout": -1}, 400), ({"queue_max_requests": 1.5}, 400),
                          ({"queue_max_tokens": "x"}, 422), (b"{bad", 422)):
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        st, _, data = bl.request("POST", fe.url + "/admission", raw, {"Content-Type": "application/json"})
        assert st == code and "error" in json.loads(data), (payload, st, data)
    st, _, b = bl.get_json(fe.url + "/admission")
    assert st == 200 and b["queue_timeout"] == 0.5, b
    # --- 7. Retry-After against what happened: a flood on a full queue is refused with the time
    # the queued requests ahead need to leave at the observed drain rate; the queue then really
    # empties within a factor of two of it
    st, _, b = bl.post_json(fe.url + "/admission", {"queue_timeout": 60})
    assert st == 200, b
    res = [None] * 12

    def flood(i):
        res[i] = bl.stream_chat(fe.url, body(f"ra {i}"), timeout=150)

    ts = [threading.Thread(target=flood, args=(i,)) for i in range(12)]
    for t in ts:
        t.start()
    bl.wait_for(lambda: sum(1 for x in res if x is not None and x.status == 503) >= 3, 20,
                what="refusals from the full queue")
    refused = [x for x in res if x is not None and x.status == 503]
    last = max(refused, key=lambda x: x.t_end)
    ra = check_refusal(last, 503, "queue_full")
    bl.wait_for(lambda: queued(fe) == 0, 60, interval=0.02, what="the queue to empty")
    actual = time.monotonic() - last.t_end
    for t in ts:
        t.join(150)
    print(f"Retry-After {ra}s; the queue emptied {actual:.1f}s after the refusal")
    assert actual / 2 - 1 <= ra <= 2 * actual + 1, (ra, actual)

    # the queue switched off at run time: refusals are the busy 503 again
    st, _, b = bl.post_json(fe.url + "/admission", {"queue_max_requests": 0})
    assert st == 200 and b["queue_max_requests"] == 0, b
    res = send_all(fe, [(body(f"off {i}"), None) for i in range(10)])
    off = [x for x in res if x.status == 503]
    assert off and all(json.loads(x.body)["error"]["code"] == "overloaded" for x in off), [x.status for x in res]
print("test_admission: ok")
