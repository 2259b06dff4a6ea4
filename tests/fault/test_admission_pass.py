"""The admission queue past a head that waits for a larger worker, through the real binaries.

One model, two mocker workers each running one sequence at a time with the frontend's busy
threshold at 0 (busy while it holds any block): S advertises a context of 512 tokens, L one of
4,096. L runs a long stream; a request that only L can hold is queued at the head, then a small one
behind it. The pump blocked the whole model behind the head for the rest of each run, so the small
request waited for L's stream to end (and for the large request to leave) while S stood idle. Now
a request behind the head may leave for a worker that the head could not use (too small for it):

  * the small request is served by S at once, while L's first stream still runs and the large
    request still waits (it never could have used S);
  * the large one is served by L once L frees, admitted once (no spin between the queue and
    routing);
  * with S busy too, two small requests queued behind the large one leave in priority order when S
    frees (the more urgent, though it came later, first), and the large one still waits for L.
"""

import threading
import time

import batonlib as bl

bl.deadline(120, "test_admission_pass")

SMALL, LARGE = 512, 4096
IDS = [(i * 7919) % 997 + 3 for i in range(1000)]  # fits only L


def body(prompt, max_tokens, **kw):
    return dict({"model": "mock-model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                 "stream": True}, **kw)


def submits(w):
    return bl.metric_sum(bl.metrics(w.system_url, timeout=5), "baton_worker_engine_submits_total")


with bl.Cluster() as c:
    fe = c.start_frontend(queue_max_requests=16, queue_timeout=60, active_decode_blocks_threshold=0.0)
    s = c.start_worker(system_port=True, wait=True, context_length=SMALL, max_num_seqs=1, speedup_ratio=1)
    big = c.start_worker(system_port=True, wait=True, context_length=LARGE, max_num_seqs=1, speedup_ratio=1)
    c.wait_workers(fe, 2)
    res, ts = {}, []

    def admissions(decision):
        return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_admission_total", decision=decision)

    def start(name, b, first=None):
        def on_event(st, e):
            if first is not None and st.t_first is not None:
                first.set()
            return False

        def run():
            res[name] = bl.stream_completion(fe.url, b, timeout=90, on_event=on_event)
        ts.append(threading.Thread(target=run))
        ts[-1].start()

    # L busy with a long stream (only L holds it)
    running = threading.Event()
    start("long", body(IDS, 1000), running)
    assert running.wait(20), "the long stream got no first token"
    time.sleep(0.5)  # L's load report shows it busy
    start("large", body(IDS, 20))
    bl.wait_for(lambda: admissions("queued") >= 1, 10, what="the large request to queue for L")
    time.sleep(0.3)
    t0 = time.monotonic()
    small = bl.stream_completion(fe.url, body(IDS[:100], 20), timeout=60)
    took = time.monotonic() - t0
    small.assert_ok("the small request")
    assert "large" not in res and res.get("long") is None, \
        f"the small request was served only after L's stream ended ({took:.2f} s)"
    assert took < 3, f"the small request took {took:.2f} s with S free"
    assert submits(s) == 1 and submits(big) == 1, (submits(s), submits(big))
    for t in ts:
        t.join(90)
    res["long"].assert_ok("the long stream")
    res["large"].assert_ok("the large request")
    assert res["large"].t_first > res["long"].t_end - 0.5, "the large request ran before L freed"
    assert submits(big) == 2 and submits(s) == 1, (submits(s), submits(big))
    admitted = admissions("admitted")
    assert admitted == 2, f"{admitted:.0f} admissions for the 2 requests that queued"
    print(f"small request behind the head served by S in {took:.2f} s while L ran; the large one waited "
          f"for L ({admitted:.0f} admissions)")

    # both busy: the small ones behind the large one leave in priority order when S frees
    res.clear()
    ts.clear()
    order = []
    lock = threading.Lock()

    def start_ordered(name, b):
        def on_event(st, e):
            if st.t_first is not None and name not in order:
                with lock:
                    order.append(name)
            return False

        def run():
            res[name] = bl.stream_completion(fe.url, b, timeout=90, on_event=on_event)
        ts.append(threading.Thread(target=run))
        ts[-1].start()

    before, q0 = admissions("admitted"), admissions("queued")
    on_l, on_s = threading.Event(), threading.Event()
    start("long", body(IDS, 1200), on_l)
    assert on_l.wait(20), "the long stream got no first token"
    start("s-run", body(IDS[:100], 400), on_s)
    assert on_s.wait(20), "S's stream got no first token"
    time.sleep(0.5)  # both reports show their workers busy
    start_ordered("large", body(IDS, 20))
    bl.wait_for(lambda: admissions("queued") >= q0 + 1, 10, what="the large request to queue")
    start_ordered("bulk", body(IDS[:100], 10, priority=10))
    bl.wait_for(lambda: admissions("queued") >= q0 + 2, 10, what="the bulk request to queue")
    start_ordered("urgent", body(IDS[:100], 10, priority=5))
    bl.wait_for(lambda: admissions("queued") >= q0 + 3, 10, what="the urgent request to queue")
    assert "s-run" not in res and not order, f"S freed before both small requests queued: {order}"
    for t in ts:
        t.join(90)
    for name in ("long", "s-run", "large", "bulk", "urgent"):
        res[name].assert_ok(name)
    assert order.index("urgent") < order.index("bulk"), f"the small requests left out of priority order: {order}"
    assert res["urgent"].t_first < res["long"].t_end, "the urgent small request waited for L"
    assert res["large"].t_first > res["long"].t_end - 0.5, "the large request ran before L freed"
    admitted = admissions("admitted") - before
    assert admitted == 3, f"{admitted:.0f} admissions for the 3 requests that queued"
    print(f"both busy: first tokens in the order {order}; {admitted:.0f} admissions")

print("test_admission_pass: ok")
