"""Refusals that last while clients keep sending do not fill the frontend's log, through the real
binaries.

Each refused request wrote its own line: WARN `request … failed after 0 tokens and 0 attempts: no
worker available for the model (BT_ERR_NO_WORKER)` with no worker left for the model, WARN
`rejecting request …: all workers are busy` with every worker busy and the queue off, INFO
`request …: rejected_queue_full …` with the admission queue full: a client sending 500 requests
made 500 lines. Now each kind is written at most 5 times a second per event loop, and the next one
written says how many were not; the counters in /metrics count every request. For each case the
test sends 500 requests (8 at a time), then one more a second later, and checks:

  * every answer is the refusal (503 with its code);
  * the log holds a bounded number of such lines (5 a second over the time the 500 took, plus the
    last), and the lines written plus the counts they give of those not written are exactly 501;
  * the metric counts all 501.
"""

import concurrent.futures
import re
import threading
import time

import batonlib as bl

bl.deadline(150, "test_refusal_log")

N = 500
BURST = 5
BODY = {"model": "mock-model", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
MORE = re.compile(r"\((\d+) more [^)]*not logged\)")


def post(fe):
    return bl.post_json(fe.url + "/v1/completions", BODY, timeout=30)


def flood(fe, code, marker, counter):
    """N refused requests, then one more a second later; checks the answers, the log and the
    counter (a function of the metrics, read before and after)."""
    base = counter()
    lines0 = len([ln for ln in fe.proc.log_text().splitlines() if marker in ln])
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda _: post(fe), range(N)))
    took = time.monotonic() - t0
    time.sleep(1.1)  # the next line written says how many were held back
    answers.append(post(fe))
    for st, _, b in answers:
        assert st == 503 and b["error"]["code"] == code, (st, b)
    bl.wait_for(lambda: counter() - base >= N + 1, 10, what=f"the counter to count {N + 1} {code}")
    assert counter() - base == N + 1, (counter() - base, N + 1)
    lines = [ln for ln in fe.proc.log_text().splitlines() if marker in ln][lines0:]
    bound = BURST * (int(took) + 2) + 1
    assert len(lines) <= bound, f"{len(lines)} lines of {code} for {N + 1} requests in {took:.1f} s (bound {bound})"
    unsaid = sum(int(m.group(1)) for ln in lines for m in [MORE.search(ln)] if m)
    assert unsaid > 0, f"no line says how many were not logged: {lines[-3:]}"
    assert len(lines) + unsaid == N + 1, f"{len(lines)} lines + {unsaid} not logged != {N + 1}: {lines[-3:]}"
    print(f"{code}: {N + 1} requests in {took:.1f} s, {len(lines)} lines, {unsaid} counted as not logged; "
          f"last: {lines[-1][lines[-1].find('request'):][:200]}")


def requests_failed(fe):
    return bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_requests_total", model="mock-model", status="error")


def requests_rejected(fe):
    return bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_requests_total", model="mock-model", status="rejected")


def admissions(fe, decision):
    return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_admission_total", decision=decision)


# no worker left for the model
with bl.Cluster() as c:
    fe = c.start_frontend(threads=1)
    w = c.start_worker()
    c.wait_workers(fe, 1)
    st, _, b = post(fe)
    assert st == 200, b
    w.proc.kill()
    bl.wait_for(lambda: post(fe)[0] == 503, 20, what="the frontend to see its only worker gone")
    flood(fe, "no_worker_available", "attempts: no worker available for the model", lambda: requests_failed(fe))

# every worker busy with the queue off, then the queue full
with bl.Cluster() as c:
    fe = c.start_frontend(threads=1, active_decode_blocks_threshold=0.0)
    c.start_worker(max_num_seqs=1, speedup_ratio=0.05)
    c.wait_workers(fe, 1)
    running = threading.Event()

    def on_event(st, e):
        if st.t_first is not None:
            running.set()
        return False

    threading.Thread(target=lambda: bl.stream_completion(fe.url, dict(BODY, max_tokens=2000, stream=True),
                                                         timeout=120, on_event=on_event), daemon=True).start()
    assert running.wait(20), "the long stream got no first token"
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_busy") == 1, 10,
                what="the worker's report to show it busy")
    flood(fe, "overloaded", "all workers are busy", lambda: requests_rejected(fe))

    st, _, b = bl.post_json(fe.url + "/admission", {"queue_max_requests": 1, "queue_timeout": 60})
    assert st == 200, b
    threading.Thread(target=post, args=(fe,), daemon=True).start()  # fills the queue
    bl.wait_for(lambda: admissions(fe, "queued") >= 1, 10, what="one request to fill the queue")
    flood(fe, "queue_full", "rejected_queue_full", lambda: admissions(fe, "rejected_queue_full"))

print("test_refusal_log: ok")
