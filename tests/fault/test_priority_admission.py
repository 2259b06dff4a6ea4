"""An urgent request is not held in the frontend's admission queue behind a busy verdict that its
worker could lift by preempting (docs/load-shedding.md, "Urgent requests and busy workers").

The worker reports in its LOAD frames the running sequences a more urgent arrival would preempt
and their priority (BT_LOAD_PREEMPT); with every worker busy, the frontend routes a request whose
priority is strictly more urgent to such a worker instead of queueing it, at most one per victim
until it has its first token. Equal or less urgent requests queue as before.

Setup: a frontend with its busy threshold on (--active-decode-blocks-threshold 0: the worker is
busy while it holds any KV block) and its admission queue on (--queue-max-requests 64), a key
whose ceiling is 10 (--priority-ceiling batch-key=10), and one worker that runs one sequence at a
time (--max-num-seqs 1), so that an urgent request gets in only by preemption.

1. Reference: the bulk requests on an idle, fast worker.
2. Three bulk requests (priority 10, ~500 tokens, about 3 s each): one runs, two wait in the
   frontend's queue. While the first runs, urgent requests (priority 0) are sent one at a time:
   each gets its first token before the running bulk stream ends (queued, it would wait for that
   end: the queue lets requests out only when the worker is not busy) and before either queued
   bulk request that arrived earlier; the frontend counted them in
   baton_frontend_preempt_routed_total, and the worker's priority preemptions rose as much.
3. A request of the bulk's own priority, and one under batch-key asking for 0 (clamped to 10), sent
   while a bulk stream runs: neither passes the busy verdict (the counter does not move) and each
   gets its first token only after that stream has ended.
4. Every stream completes; the preempted bulk stream is byte-exact against its reference.
5. The queue off (POST /admission): with the worker busy an urgent request is still served (routed
   past the verdict) while one of the bulk's priority is refused with 503 at once.

6. The same with the NATS event plane (the frontend then uses the worker's NATS messages, not its
   LOAD frames): an urgent request is routed past the verdict and preempts.

7. Two busy workers, one running a priority-5 stream and one a priority-10 stream: an urgent
   request goes to the second (the least urgent victim) and only that worker preempts.

Without the routing past the busy verdict (fe_route_preempt returning NULL) step 2 fails: the
urgent request waits for the running bulk stream to end.
"""

import threading
import time

import batonlib as bl
import faultlib as fl
import natslib

bl.deadline(180 * fl.SLOW, "test_priority_admission")

N_BULK, BULK_TOKENS, N_URGENT, URGENT_TOKENS = 3, 500, 4, 8


def bulk_body(i):
    extra = {"temperature": 0.8, "seed": 700 + i} if i % 2 else {"temperature": 0}
    return bl.chat_body(f"bulk {i}", max_tokens=BULK_TOKENS, return_token_ids=True, priority=10, **extra)


def urgent_body(i, priority=0):
    return bl.chat_body(f"vip {i}", max_tokens=URGENT_TOKENS, return_token_ids=True, priority=priority)


def preempt_routed(fe):
    return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_preempt_routed_total")


def running_bulk(bulk, t):
    """The bulk stream that had its first token before t and had not ended at t (None if none)."""
    for s in bulk:
        if s is not None and s.t_first is not None and s.t_first < t and (s.t_end is None or s.t_end > t):
            return s
    return None


# --- 1. references on an idle, fast worker
with bl.Cluster() as c:
    fe = c.start_frontend()
    c.start_worker(max_num_seqs=8, speedup_ratio=100)
    c.wait_workers(fe, 1)
    ref, ts = fl.start_all(bl.stream_chat, fe.url, [bulk_body(i) for i in range(N_BULK)])
    for t in ts:
        t.join(60)
    for s in ref:
        assert s is not None, "a reference request did not finish"
        s.assert_ok("a reference stream")
        assert len(s.token_ids) == BULK_TOKENS, s.summary()

with bl.Cluster() as c:
    fe = c.start_frontend(active_decode_blocks_threshold=0.0, queue_max_requests=64, queue_timeout=60,
                          priority_ceiling="batch-key=10")
    w = c.start_worker(max_num_seqs=1, speedup_ratio=1, system_port=True, wait=True)
    c.wait_workers(fe, 1)

    # --- 2. one bulk stream runs, the others queue at the frontend; urgent requests one at a time
    bulk = [None] * N_BULK
    threads = []
    for i in range(N_BULK):
        def one(i=i):
            bulk[i] = bl.stream_chat(fe.url, bulk_body(i), timeout=90 * fl.SLOW)
        threads.append(threading.Thread(target=one))
        threads[-1].start()
        time.sleep(0.05)  # in order: the first runs, the others queue behind it
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_queue_requests") >= N_BULK - 1, 20,
                interval=0.02, what="the frontend's queue to hold the bulk surplus")
    assert preempt_routed(fe) == 0, "a bulk request was routed past the busy verdict"

    urgent = []
    for i in range(N_URGENT):
        time.sleep(0.2)  # the preempted bulk stream runs again between two urgent requests
        s = bl.stream_chat(fe.url, urgent_body(i), timeout=30 * fl.SLOW)
        s.assert_ok("an urgent request while every worker is busy")
        assert len(s.token_ids) == URGENT_TOKENS, s.summary()
        urgent.append(s)
    n_routed = preempt_routed(fe)
    n_prio = fl.preemptions(w, "priority")

    # --- 3. equal priority, and a key clamped to the bulk's priority, still queue
    equal = {}

    def send(name, body, headers=None):
        equal[name] = bl.stream_chat(fe.url, body, timeout=90 * fl.SLOW, headers=headers)

    eq_threads = [threading.Thread(target=send, args=("priority 10", urgent_body(100, priority=10))),
                  threading.Thread(target=send, args=("batch-key asking 0", urgent_body(101),
                                                      {"Authorization": "Bearer batch-key"}))]
    t_eq = time.monotonic()
    for t in eq_threads:
        t.start()
    time.sleep(0.5)
    n_routed_eq = preempt_routed(fe)
    for t in threads + eq_threads:
        t.join(120 * fl.SLOW)

    # --- 4. everything completed; the preempted stream is exact
    for i, s in enumerate(bulk):
        assert s is not None, f"bulk request {i} did not finish"
        s.assert_ok(f"bulk stream {i}")
        assert s.token_ids == ref[i].token_ids, f"bulk stream {i} differs from its reference: {s.summary()}"
        assert s.text == ref[i].text, f"bulk stream {i}: text differs from its reference"
    for name, s in equal.items():
        s.assert_ok(f"the {name} request")

    ttft = [round(s.t_first - s.t_start, 3) for s in urgent]
    print(f"urgent TTFTs {ttft}; bulk TTFTs {[round(s.t_first - s.t_start, 2) for s in bulk]}; routed past the "
          f"busy verdict {n_routed:.0f}, worker priority preemptions {n_prio:.0f}; equal-priority TTFTs "
          f"{ {k: round(s.t_first - s.t_start, 2) for k, s in equal.items()} }", flush=True)
    for i, s in enumerate(urgent):
        run = running_bulk(bulk, s.t_start)
        assert run is not None, (f"setup: no bulk stream was running when urgent request {i} was sent (the "
                                 "worker was not saturated)")
        assert s.t_first < run.t_end, (f"urgent request {i} waited for the running bulk stream to end (first token "
                                       f"{s.t_first - run.t_end:+.3f} s after it): it was held in the queue")
        queued = [b for b in bulk if b.t_start < s.t_start and b.t_first > s.t_start]
        assert queued or i > 0, "setup: no bulk request was queued when the first urgent one was sent"
        for b in queued:
            assert s.t_first < b.t_first, f"urgent request {i} was admitted after a queued bulk request"
    bulk_med = sorted(b.t_first - b.t_start for b in bulk)[N_BULK // 2]
    assert max(ttft) < bulk_med / 4, f"an urgent TTFT ({max(ttft):.3f}s) is over a quarter of the bulk median"
    assert n_routed >= N_URGENT, f"only {n_routed:.0f} of {N_URGENT} urgent requests were routed past the verdict"
    assert n_prio >= n_routed, f"{n_routed:.0f} routed past the verdict but only {n_prio:.0f} priority preemptions"
    assert n_routed_eq == n_routed, (f"a request of the bulk's priority was routed past the busy verdict "
                                     f"({n_routed_eq - n_routed:.0f})")
    for name, s in equal.items():
        run = running_bulk(bulk, t_eq)
        assert run is not None, "setup: no bulk stream was running when the equal-priority requests were sent"
        assert s.t_first > run.t_end, (f"the {name} request got its first token before the running bulk stream "
                                       "ended: it passed the busy verdict")
    assert preempt_routed(fe) == n_routed, "a request of the bulk's priority was routed past the busy verdict"

    # --- 5. the queue off: an urgent request is served past the verdict, an equal one refused
    st, _, b = bl.post_json(fe.url + "/admission", {"queue_max_requests": 0})
    assert st == 200, b
    hold = [None]
    ht = threading.Thread(target=lambda: hold.__setitem__(0, bl.stream_chat(fe.url, bulk_body(0), timeout=60)))
    ht.start()
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_busy") >= 1, 10, interval=0.02,
                what="the worker to be busy")
    refused = bl.stream_chat(fe.url, urgent_body(200, priority=10), timeout=30)
    served = bl.stream_chat(fe.url, urgent_body(201), timeout=30)
    ht.join(60)
    assert refused.status == 503, f"equal priority with the queue off: {refused.summary()}"
    served.assert_ok("an urgent request with the queue off")
    hold[0].assert_ok("the bulk stream of step 5")
    assert served.t_first < hold[0].t_end, "the urgent request waited for the bulk stream with the queue off"
    assert preempt_routed(fe) == n_routed + 1, "the urgent request with the queue off was not counted"

# --- 6. the same through the NATS event plane: the frontend takes the worker's reports from there
# (and ignores its LOAD frames), so the victims must travel in the event-plane message too
with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir).start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    fe = c.start_frontend(active_decode_blocks_threshold=0.0, queue_max_requests=64, queue_timeout=60, **plane)
    w = c.start_worker(max_num_seqs=1, speedup_ratio=1, system_port=True, wait=True, **plane)
    c.wait_workers(fe, 1)
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_load_reports_total",
                                      source="event_plane") > 0, 20, what="event-plane load reports")
    bulk = [None] * 2
    threads = []
    for i in range(2):
        def one(i=i):
            bulk[i] = bl.stream_chat(fe.url, bulk_body(i), timeout=90 * fl.SLOW)
        threads.append(threading.Thread(target=one))
        threads[-1].start()
        time.sleep(0.05)
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_queue_requests") >= 1, 20, interval=0.02,
                what="the frontend's queue to hold the second bulk request")
    m0 = bl.metrics(fe.url)
    time.sleep(0.2)
    s = bl.stream_chat(fe.url, urgent_body(300), timeout=30 * fl.SLOW)
    m1 = bl.metrics(fe.url)
    for t in threads:
        t.join(120 * fl.SLOW)
    s.assert_ok("an urgent request with the event plane")
    for i, b in enumerate(bulk):
        b.assert_ok(f"bulk stream {i} with the event plane")
        assert b.token_ids == ref[i].token_ids, f"bulk stream {i} differs from its reference: {b.summary()}"
    ev = (bl.metric_sum(m1, "baton_frontend_worker_load_reports_total", source="event_plane")
          - bl.metric_sum(m0, "baton_frontend_worker_load_reports_total", source="event_plane"))
    frames = (bl.metric_sum(m1, "baton_frontend_worker_load_reports_total", source="request_plane")
              - bl.metric_sum(m0, "baton_frontend_worker_load_reports_total", source="request_plane"))
    print(f"event plane: urgent TTFT {s.t_first - s.t_start:.3f}s, reports used meanwhile: {ev:.0f} from NATS, "
          f"{frames:.0f} LOAD frames", flush=True)
    assert ev > 0 and frames == 0, f"the reports did not come from the event plane ({ev:.0f} NATS, {frames:.0f} LOAD)"
    assert s.t_first < bulk[0].t_end, "with the event plane, the urgent request waited for the running bulk stream"
    assert bl.metric_sum(m1, "baton_frontend_preempt_routed_total") == 1, "not routed past the busy verdict"
    assert fl.preemptions(w, "priority") >= 1, "the worker did not preempt for the urgent request"

# --- 7. two busy workers, one running priority 5 and one priority 10: the urgent request goes to
# the one whose victim is the least urgent (10), and the priority-5 stream is left alone
def requests_total(w):
    return bl.metric_sum(bl.metrics(w.system_url), "dynamo_component_requests_total")


with bl.Cluster() as c:
    fe = c.start_frontend(active_decode_blocks_threshold=0.0, queue_max_requests=64, queue_timeout=60)
    ws = [c.start_worker(max_num_seqs=1, speedup_ratio=1, system_port=True, wait=True) for _ in range(2)]
    c.wait_workers(fe, 2)
    started = {}
    threads = []

    def start(name, body):
        ev = threading.Event()
        started[name] = [None, ev]

        def run():
            started[name][0] = bl.stream_chat(fe.url, body, timeout=90 * fl.SLOW,
                                              on_event=lambda st, e: (st.t_first is not None and ev.set()) or False)
        threads.append(threading.Thread(target=run))
        threads[-1].start()
        assert ev.wait(20), f"the {name} request got no first token"

    mid_body = bl.chat_body("mid 0", max_tokens=BULK_TOKENS, return_token_ids=True, priority=5)
    start("mid", mid_body)
    w_mid = [w for w in ws if requests_total(w) == 1]
    assert len(w_mid) == 1, "the priority-5 request is not on exactly one worker"
    w_mid = w_mid[0]
    start("bulk", bulk_body(0))
    w_bulk = [w for w in ws if w is not w_mid][0]
    assert requests_total(w_bulk) == 1, "the bulk request did not go to the free worker"
    time.sleep(0.2)  # both decoding: each worker's report offers its running sequence as a victim
    s = bl.stream_chat(fe.url, urgent_body(400), timeout=30 * fl.SLOW)
    for t in threads:
        t.join(120 * fl.SLOW)
    s.assert_ok("the urgent request with two busy workers")
    mid, bk = started["mid"][0], started["bulk"][0]
    mid.assert_ok("the priority-5 stream")
    bk.assert_ok("the bulk stream")
    assert bk.token_ids == ref[0].token_ids, "the preempted bulk stream differs from its reference"
    p_mid, p_bulk = fl.preemptions(w_mid, "priority"), fl.preemptions(w_bulk, "priority")
    print(f"two workers: urgent TTFT {s.t_first - s.t_start:.3f}s; priority preemptions: worker running priority 5 "
          f"{p_mid:.0f}, worker running priority 10 {p_bulk:.0f}", flush=True)
    assert s.t_first < min(mid.t_end, bk.t_end), "the urgent request waited for a running stream to end"
    assert requests_total(w_bulk) == 2 and requests_total(w_mid) == 1, \
        "the urgent request did not go to the worker running the least urgent sequence"
    assert p_bulk == 1 and p_mid == 0, f"preemptions: priority-10 worker {p_bulk:.0f}, priority-5 worker {p_mid:.0f}"
print("test_priority_admission: ok")
