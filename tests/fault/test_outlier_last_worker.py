"""Outlier ejection never leaves a model unable to serve (src/frontend/outlier.c,
fe_outlier_fleet_changed): the cap on ejected workers is over the routable ones and holds at every
moment, not only when a worker is ejected.

Three mocker workers, the third slow (4x step time); the frontend ejects at twice the median over
20 samples. Under load (12 streams of 100 tokens) the slow worker is ejected. While it is ejected
both fast workers are killed with SIGKILL: the slow worker is then the model's only routable
worker, and an ejected last worker must be readmitted at once (with a log line saying why), not
after its back-off. The back-off is 10 s here (3 s would do the same) so that the back-off running
out cannot pass for the readmission. Checked:

- as soon as the frontend has seen both deaths (one routable worker), the slow worker is no longer
  ejected and a completion sent then is served by it (200, not 503 "no worker available");
- one completion every 0.5 s for 4 s after that: every one is served;
- the frontend's log says the worker was readmitted before the end of its back-off, and why.
"""

import threading
import time

import batonlib as bl

bl.deadline(150, "test_outlier_last_worker")

WORKER = dict(speedup_ratio=5)
BACKOFF = 10


def worker_ids(fe):
    m = bl.metrics(fe.url)
    return {k.split('worker_id="')[1].split('"')[0] for k in m if k.startswith("baton_frontend_worker_routed_total")}


def gauge(fe, name, **labels):
    return bl.metric_sum(bl.metrics(fe.url), name, **labels)


with bl.Cluster() as c:
    fe = c.start_frontend(outlier_factor=2, outlier_min_samples=20, outlier_backoff=BACKOFF,
                          router_mode="round-robin")
    fast = [c.start_worker(**WORKER), c.start_worker(**WORKER)]
    c.wait_workers(fe, 2)
    fast_ids = worker_ids(fe)
    c.start_worker(fault_slow_factor=4, **WORKER)
    c.wait_workers(fe, 3)
    slow_id = (worker_ids(fe) - fast_ids).pop()

    stop = threading.Event()

    def client(k):
        i = 0
        while not stop.is_set():
            bl.stream_chat(fe.url, bl.chat_body(f"last {k} {i}", max_tokens=100), timeout=60)
            i += 1

    clients = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in clients:
        t.start()
    bl.wait_for(lambda: gauge(fe, "baton_frontend_worker_ejected", worker_id=slow_id) == 1, 30,
                interval=0.02, what="the slow worker to be ejected")
    t_kill = time.monotonic()
    for w in fast:
        w.proc.kill()
    stop.set()
    bl.wait_for(lambda: gauge(fe, "baton_frontend_workers", state="routable") == 1, 10, interval=0.02,
                what="the frontend to see both fast workers gone")
    t_seen = time.monotonic() - t_kill
    assert t_seen < BACKOFF / 2, f"the deaths took {t_seen:.1f} s to see: the back-off may have run out"

    codes = []
    for i in range(9):
        st, _, body = bl.request("POST", fe.url + "/v1/completions",
                                 bl.completion_body(f"after {i}", max_tokens=5), timeout=30)
        codes.append(st)
        assert st == 200, f"completion {i} ({time.monotonic() - t_kill:.1f} s after the kill): {st} {body[:200]!r}"
        if i == 0:
            assert gauge(fe, "baton_frontend_worker_ejected", worker_id=slow_id) == 0, \
                "the last routable worker is still ejected"
        time.sleep(0.5)
    assert time.monotonic() - t_kill < BACKOFF, "the checks outlasted the back-off: they prove nothing"
    routed = gauge(fe, "baton_frontend_worker_routed_total", worker_id=slow_id)
    assert routed > 0, "the slow worker served nothing"
    fe.proc.wait_log(r"worker " + slow_id + r" \(.*?\) readmitted to routing [0-9.]+ s before the end of its "
                     r"back-off: worker [0-9a-f]+ of 'mock-model' is down", timeout=5)
    for t in clients:
        t.join(90)
    print(f"outlier last worker: deaths seen {t_seen:.2f} s after the kill; {len(codes)} completions, all 200, "
          f"served by the readmitted slow worker")
print("test_outlier_last_worker: ok")
