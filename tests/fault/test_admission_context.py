"""The admission queue and workers of different context lengths, through the real binaries.

The queue lets a request leave when a worker is free for it. It asked whether any worker was free,
while routing then asks for one whose context (the model card's context_length) holds the request:
with only a worker too small for it free, the request left the queue, found the worker that could
hold it busy, was queued again at the head and left again, 256 times per 10 ms tick, until its
queue timeout (baton_frontend_admission_total{decision="admitted"} grew by ~25,000 a second for one
request, and the loop's other queued models got no dispatches). Now the queue asks what routing
asks: the request waits until the larger worker has room, then runs, admitted once.
"""

import threading
import time

import batonlib as bl

bl.deadline(90, "test_admission_context")

PROMPT = [(i * 7919) % 997 + 3 for i in range(1000)]


def body():
    return {"model": "mock-model", "prompt": PROMPT, "carried_token_ids": [5] * 200, "max_tokens": 200,
            "stream": True, "temperature": 0}


with bl.Cluster() as c:
    fe = c.start_frontend(queue_max_requests=10, queue_timeout=30, active_decode_blocks_threshold=0.0)
    c.start_worker(context_length=1280, speedup_ratio=1)  # free, but 1,400 tokens do not fit it
    c.start_worker(context_length=1536, speedup_ratio=0.5)
    c.wait_workers(fe, 2)
    res = {}

    def run(k):
        res[k] = bl.stream_completion(fe.url, body(), timeout=60)

    def admissions(decision):
        return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_admission_total", decision=decision)

    t1 = threading.Thread(target=run, args=(1,))
    t1.start()
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_inflight_requests") >= 1, 10,
                what="the first stream to run")
    time.sleep(0.5)
    t2 = threading.Thread(target=run, args=(2,))
    t2.start()
    bl.wait_for(lambda: admissions("queued") >= 1, 10, what="the second request to queue behind the busy worker")
    time.sleep(2)
    admitted = admissions("admitted")
    assert admitted <= 2, f"{admitted:.0f} admissions for 2 requests while one waited for the larger worker"
    t1.join(60)
    t2.join(60)
    for k in (1, 2):
        assert res.get(k) is not None, f"request {k} did not return"
        res[k].assert_ok(f"request {k}")
    assert res[1].text == res[2].text, "the same request, the same text"
    assert admissions("admitted") <= 2
    print(f"test_admission_context: ok ({admitted:.0f} admissions while the second waited)")
