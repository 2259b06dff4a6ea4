"""The outlier ejection cap and the outlier detector's runtime control (src/frontend/outlier.c,
POST /admission).

Of five workers, two are slow (the mocker's slow fault, 3x step time): each is an outlier against
the median of the others. The detector's limits are set at run time through POST /admission (bad
bodies are refused with 400 and change nothing): window 5 s, back-off 20 s, cap 0.2 of the fleet,
that is one worker, and a sample minimum of a million: for 4 s of load nothing is ejected; lowered
to 30 at run time, ejection begins. Under steady load:

- at most one worker is ejected at any time, sampled from /metrics and replayed from the
  frontend's log over the whole run (each "ejected" line opens an interval, each "readmitted"
  line closes it); the second slow worker is judged an outlier and kept in rotation by the cap
  (its log line says so), so the cap really refused something;
- the ejection's back-off is the one set at run time (20 s, not the 5 s default);
- raising the cap at run time to 0.4 (two workers) lets the second slow worker be ejected too,
  and still no healthy worker is ever ejected;
- every stream completes with all its tokens.
"""

import re
import threading
import time

import batonlib as bl

bl.deadline(200, "test_outlier_cap")

WORKER = dict(speedup_ratio=4)
TOKENS = 40


def worker_ids(fe):
    m = bl.metrics(fe.url)
    return {k.split('worker_id="')[1].split('"')[0] for k in m if k.startswith("baton_frontend_worker_routed_total")}


def ejected_now(fe):
    return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_ejected")


with bl.Cluster() as c:
    fe = c.start_frontend(router_mode="round-robin")
    st, _, b = bl.get_json(fe.url + "/admission")
    assert st == 200, b
    defaults = {"outlier_factor": 0, "outlier_window": 10, "outlier_min_samples": 50, "outlier_backoff": 5,
                "outlier_max_ejected": 0.5}
    for k, v in defaults.items():
        assert b[k] == v, (k, b)
    # refused bodies change nothing, not even the valid field beside the bad one
    for bad in ({"outlier_window": 31}, {"outlier_window": 0.5}, {"outlier_min_samples": 1.5},
                {"outlier_min_samples": 0}, {"outlier_backoff": 0.01}, {"outlier_backoff": 4000},
                {"outlier_max_ejected": 1.5}, {"outlier_max_ejected": -0.1},
                {"outlier_window": 5, "outlier_max_ejected": 2}):
        st, _, r = bl.post_json(fe.url + "/admission", bad)
        assert st == 400, (bad, st, r)
        assert next(iter(bad)) in r["error"] or "outlier_max_ejected" in r["error"], r
    st, _, r = bl.post_json(fe.url + "/admission", {"outlier_backoff": "5"})
    assert st == 422, r
    st, _, b = bl.get_json(fe.url + "/admission")
    for k, v in defaults.items():
        assert b[k] == v, f"a refused body changed {k}: {b}"
    # a sample minimum no worker reaches first: nobody can be judged (the effect of the field)
    limits = {"outlier_factor": 2, "outlier_window": 5, "outlier_min_samples": 10**6, "outlier_backoff": 20,
              "outlier_max_ejected": 0.2}
    st, _, b = bl.post_json(fe.url + "/admission", limits)
    assert st == 200, b
    for k, v in limits.items():
        assert b[k] == v, (k, b)

    for _ in range(3):
        c.start_worker(**WORKER)
    c.wait_workers(fe, 3)
    fast_ids = worker_ids(fe)
    for _ in range(2):
        c.start_worker(fault_slow_factor=3, **WORKER)
    c.wait_workers(fe, 5)
    slow_ids = worker_ids(fe) - fast_ids
    assert len(fast_ids) == 3 and len(slow_ids) == 2, (fast_ids, slow_ids)

    stop = threading.Event()
    results, lock = [], threading.Lock()

    def client(k):
        i = 0
        while not stop.is_set():
            s = bl.stream_chat(fe.url, bl.chat_body(f"cap {k} {i}", max_tokens=TOKENS, return_token_ids=True),
                               timeout=60)
            i += 1
            with lock:
                results.append(s)

    peak = {"cap1": 0, "cap2": 0}
    phase = ["cap1"]

    def sample():
        while not stop.is_set():
            peak[phase[0]] = max(peak[phase[0]], ejected_now(fe))
            time.sleep(0.02)

    clients = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    sampler = threading.Thread(target=sample)
    for t in clients + [sampler]:
        t.start()
    time.sleep(4)
    assert bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_ejections_total") == 0, \
        "a worker was ejected below the sample minimum"
    st, _, b = bl.post_json(fe.url + "/admission", {"outlier_min_samples": 30})
    assert st == 200 and b["outlier_min_samples"] == 30, b
    bl.wait_for(lambda: ejected_now(fe) == 1, 20, what="a slow worker to be ejected")
    # the other slow worker is an outlier too: the cap keeps it in rotation
    fe.proc.wait_log(r"are ejected already \(cap 1\): it stays in rotation", timeout=20)
    time.sleep(5)  # a window more under the cap of one
    phase[0] = "cap2"
    st, _, b = bl.post_json(fe.url + "/admission", {"outlier_max_ejected": 0.4})
    assert st == 200 and b["outlier_max_ejected"] == 0.4, b
    bl.wait_for(lambda: ejected_now(fe) == 2, 20, what="the second slow worker to be ejected (cap 2)")
    time.sleep(2)
    stop.set()
    for t in clients + [sampler]:
        t.join(120)

    m = bl.metrics(fe.url)
    for wid in fast_ids:
        assert bl.metric_sum(m, "baton_frontend_worker_ejections_total", worker_id=wid) == 0, \
            f"healthy worker {wid} was ejected"
    for wid in slow_ids:
        assert bl.metric_sum(m, "baton_frontend_worker_ejections_total", worker_id=wid) >= 1, \
            f"slow worker {wid} was never ejected"
    assert peak["cap1"] == 1, f"{peak['cap1']} workers ejected at once under a cap of one"
    assert peak["cap2"] <= 2, f"{peak['cap2']} workers ejected at once under a cap of two"

    # the log, replayed: never more ejected at once than the cap in force
    log = fe.proc.log_text()
    ej_re = re.compile(r"worker ([0-9a-f]+) \(.*?\) ejected from routing for ([0-9.]+) s")
    rd_re = re.compile(r"worker ([0-9a-f]+) \(.*?\) readmitted to routing")
    out, most, backoffs, cap_raised = set(), {1: 0, 2: 0}, [], False
    for line in log.splitlines():
        if "admission limits set" in line and "at most 0.4 " in line:
            cap_raised = True
        mo = ej_re.search(line)
        if mo:
            assert mo.group(1) in slow_ids, f"a healthy worker was ejected: {line}"
            out.add(mo.group(1))
            backoffs.append(float(mo.group(2)))
            cap = 2 if cap_raised else 1
            most[cap] = max(most[cap], len(out))
        mo = rd_re.search(line)
        if mo:
            out.discard(mo.group(1))
    assert cap_raised, "the log does not show the raised cap"
    assert most[1] == 1 and most[2] == 2, f"ejected at once, from the log: {most}"
    assert backoffs and all(x >= 20 for x in backoffs), f"back-offs {backoffs}: not the 20 s set at run time"
    for s in results:
        s.assert_ok("a stream under the ejection cap")
        assert len(s.token_ids) == TOKENS, s.summary()
    print(f"outlier cap: {len(results)} streams, none failed; at most {most[1]} ejected at once under a cap of "
          f"one (sampled peak {peak['cap1']:.0f}), {most[2]} after raising it to two; back-offs {backoffs}")
print("test_outlier_cap: ok")
