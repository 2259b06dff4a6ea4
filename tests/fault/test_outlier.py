"""Outlier ejection through the real binaries (src/frontend/outlier.c): of three workers, one whose
steps take 3x longer (the mocker's slow fault) is ejected from routing within its window, streams
already on it finish untouched, it receives nothing new while ejected, and once healed (SIGWINCH
switches the fault off) it is readmitted after its back-off and stays in rotation. The factor is
switched on through POST /admission.
"""

import signal
import threading
import time

import batonlib as bl

bl.deadline(200, "test_outlier")

WORKER = dict(speedup_ratio=4)


def gauge(fe, name, wid):
    return bl.metric_sum(bl.metrics(fe.url), name, worker_id=wid)


def worker_ids(fe):
    m = bl.metrics(fe.url)
    return sorted({k.split('worker_id="')[1].split('"')[0] for k in m if k.startswith("baton_frontend_worker_routed_total")})


with bl.Cluster() as c:
    # the factor is switched on at run time (POST /admission), the rest are start-up flags
    fe = c.start_frontend(outlier_window=5, outlier_min_samples=30, outlier_backoff=4, router_mode="round-robin")
    st, _, b = bl.get_json(fe.url + "/admission")
    assert st == 200 and b["outlier_factor"] == 0, b
    st, _, b = bl.post_json(fe.url + "/admission", {"outlier_factor": 2000})
    assert st == 400, b
    st, _, b = bl.post_json(fe.url + "/admission", {"outlier_factor": 2})
    assert st == 200 and b["outlier_factor"] == 2, b
    c.start_worker(**WORKER)
    c.start_worker(**WORKER)
    c.wait_workers(fe, 2)
    fast_ids = set(worker_ids(fe))
    slow = c.start_worker(fault_slow_factor=3, fault_signals=True, **WORKER)
    c.wait_workers(fe, 3)
    slow_id = (set(worker_ids(fe)) - fast_ids).pop()

    stop = threading.Event()
    results, lock = [], threading.Lock()

    def client(k):
        i = 0
        while not stop.is_set():
            s = bl.stream_chat(fe.url, bl.chat_body(f"outlier {k} {i}", max_tokens=40, return_token_ids=True),
                               timeout=60)
            i += 1
            with lock:
                results.append(s)

    # a long stream that lands on the slow worker before it is judged: it must finish untouched
    long_res = []
    t0 = time.monotonic()
    clients = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in clients:
        t.start()
    longs = [threading.Thread(target=lambda i=i: long_res.append(bl.stream_chat(
        fe.url, bl.chat_body(f"long {i}", max_tokens=400, return_token_ids=True), timeout=120))) for i in range(3)]
    for t in longs:
        t.start()
    bl.wait_for(lambda: gauge(fe, "baton_frontend_worker_ejected", slow_id) == 1, 15,
                what="the slow worker to be ejected")
    t_eject = time.monotonic() - t0
    for wid in fast_ids:
        assert gauge(fe, "baton_frontend_worker_ejected", wid) == 0, f"a healthy worker {wid} was ejected"
    # nothing new reaches it while ejected (its back-off is 4 s)
    routed0 = gauge(fe, "baton_frontend_worker_routed_total", slow_id)
    time.sleep(2)
    assert gauge(fe, "baton_frontend_worker_ejected", slow_id) == 1
    assert gauge(fe, "baton_frontend_worker_routed_total", slow_id) == routed0, "an ejected worker got new work"
    # healed: readmitted after its back-off, and it stays in rotation
    t_heal = time.monotonic()
    slow.proc.kill(signal.SIGWINCH)
    bl.wait_for(lambda: gauge(fe, "baton_frontend_worker_readmissions_total", slow_id) >= 1 and
                gauge(fe, "baton_frontend_worker_ejected", slow_id) == 0, 40, what="the healed worker's readmission")
    t_readmit = time.monotonic() - t_heal
    r1 = gauge(fe, "baton_frontend_worker_routed_total", slow_id)
    time.sleep(6)  # a window and more: judged on fresh samples, and not ejected again
    assert gauge(fe, "baton_frontend_worker_ejected", slow_id) == 0, "the healed worker was ejected again"
    assert gauge(fe, "baton_frontend_worker_routed_total", slow_id) > r1, "the readmitted worker gets no work"
    stop.set()
    for t in clients + longs:
        t.join(120)
    for s in results:
        s.assert_ok("a stream during the ejection")
        assert len(s.token_ids) == 40
    for s in long_res:
        s.assert_ok("a long stream")
        assert len(s.token_ids) == 400
    m = bl.metrics(fe.url)
    assert bl.metric_sum(m, "dynamo_frontend_model_migration_total") == 0, "ejection moved streams"
    ej = bl.metric_sum(m, "baton_frontend_worker_ejections_total", worker_id=slow_id)
    print(f"outlier: slow worker ejected {t_eject:.1f}s after load began ({ej:.0f} ejections); readmitted "
          f"{t_readmit:.1f}s after it was healed; {len(results)} streams, none failed")
print("test_outlier: ok")
