"""etcd paused (SIGSTOP) for longer than the workers' lease TTL, through the real binaries: no
request may fail, and the frontend must not drop a worker whose request-plane connection is
healthy just because its discovery key went with the lease.

One etcd member, three mocker workers (lease TTL 2 s), one frontend with --discovery-grace 5,
steady streaming load checked byte for byte against fault-free references:

  pause     etcd is stopped for 6.5 s (past the TTL and past the frontend's watch probe, so its
            baton_frontend_discovery_up must read 0 meanwhile). During the pause one worker is
            killed with -9: its connection breaks, so the frontend stops routing to it at once
            (it leaves /health while etcd is still stopped) and drops it for good when its key
            expires, without a grace. On SIGCONT etcd expires every lease and deletes every key:
            the two live workers are kept routable (log and metric), find their leases gone on the
            first keep-alive answer, register again under new leases, and are kept. /health lists
            exactly those two throughout, and no stream fails (before the discovery grace, every
            frontend dropped every worker at once and answered 503 until they came back).
  drain     a worker is SIGTERMed under load: its GOAWAY stops routing to it at once, and the
            deletion of its key that follows is not mistaken for a lost lease (no grace).
  expiry    a key deleted by hand while its worker lives (the worker does not rewrite it: its
            lease is live) is kept for the grace, then dropped: the grace is bounded.
"""

import re
import signal
import time

import batonlib as bl
import etcdlib as el

bl.deadline(90, "test_etcd_pause")
el.self_check()

TTL = 2
GRACE = 5
PAUSE = 6.5
WORKER = dict(discovery="etcd", discovery_ttl=TTL, speedup_ratio=50)


def metric(fe, name, **labels):
    return bl.metric_sum(bl.metrics(fe.url), name, **labels)


def proc_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


with bl.Cluster() as c:
    etcd = bl.Etcd(1).start()
    fe = c.start_frontend(discovery="etcd", etcd_endpoints=etcd.endpoints, discovery_grace=GRACE)
    ws = [c.start_worker(etcd_endpoints=etcd.endpoints, system_port=i == 0, **WORKER) for i in range(3)]
    ids = [el.worker_id(w) for w in ws]
    el.wait_health(fe, ids, 20)
    bl.wait_for(lambda: metric(fe, "baton_frontend_discovery_up") == 1, 10, what="discovery_up to read 1")
    refs = el.references(fe)
    keys0 = etcd.get_prefix(el.PREFIX)
    live, victim = ids[:2], ids[2]

    # ---- pause -------------------------------------------------------------------------------
    load = el.Load(fe, concurrency=4)
    bl.wait_for(lambda: load.count() >= 10, 20, what="load to run")
    ep = etcd.procs[0]
    ep.kill(signal.SIGSTOP)
    t_stop = time.monotonic()
    seen_down = False
    try:
        bl.wait_for(lambda: proc_state(ep.pid) == "T", 5, 0.005, "etcd to be stopped")
        time.sleep(1.0)
        ws[2].proc.kill(signal.SIGKILL)
        assert ws[2].proc.wait(5) == -signal.SIGKILL
        # the request plane tells: out of routing while etcd, which holds its key, is stopped
        el.wait_health(fe, live, 3, "the killed worker to leave /health during the pause")
        routed_dead = el.routed(fe, victim)
        while time.monotonic() - t_stop < PAUSE:
            seen_down = seen_down or metric(fe, "baton_frontend_discovery_up") == 0
            assert el.health_ids(fe) == sorted(live), "a live worker left /health while etcd was stopped"
            time.sleep(0.2)
        assert proc_state(ep.pid) == "T", "etcd was resumed early"
        assert el.routed(fe, victim) == routed_dead, "requests went to the killed worker"
    finally:
        ep.kill(signal.SIGCONT)
    t_cont = time.monotonic()
    assert seen_down, "baton_frontend_discovery_up never read 0 while etcd was stopped"

    # etcd expires the leases it could not renew and deletes every key; the live workers find their
    # leases gone and register again. The frontend must route to them all along.
    checks, t_back = 0, None
    while t_back is None or time.monotonic() - t_back < 1.0:  # and 1 s more: the frontend sees the puts
        assert time.monotonic() - t_cont < GRACE + 3, "the workers did not register again"
        ids_now = el.health_ids(fe)
        assert ids_now == sorted(live), f"/health changed after etcd resumed: {ids_now}"
        checks += 1
        if t_back is None and all(el.log_has(ws[ids.index(w)].proc, r"etcd: registered again") for w in live):
            t_back = time.monotonic()
        time.sleep(0.05)
    print(f"pause: workers registered again {t_back - t_cont:.2f} s after SIGCONT; /health checked {checks} times")
    el.check_results(load.stop(), refs, 20, "load through the etcd pause")
    for wid in live:
        fe.proc.wait_log(rf"worker {wid} \(.*\) left discovery with a healthy connection: kept routable", 1)
        fe.proc.wait_log(rf"worker {wid} \(.*\) registered again after [\d.]+ s in its discovery grace", 1)
    keys = el.wait_keys(etcd, lambda k: sorted(k) == sorted(el.key_of(w) for w in live), 5,
                        "the live workers' keys, and not the killed one's")
    for wid in live:
        assert keys[el.key_of(wid)][1] != keys0[el.key_of(wid)][1], "a lease survived the pause: no expiry happened"
        w = ws[ids.index(wid)]
        m = w.proc.wait_log(r"etcd: lease [0-9a-f]+ is gone \((.*?);", 5)
        print(f"worker {wid}: {m.group(1)}")
    fe.proc.wait_log(rf"worker {victim} \(.*\) forgotten", 5)
    assert not el.log_has(fe.proc, rf"worker {victim} \(.*\) left discovery with a healthy connection"), \
        "the killed worker was kept by the grace"
    assert el.health_ids(fe) == sorted(live)
    samples = bl.metrics(fe.url)
    grace = {r: bl.metric_sum(samples, "baton_frontend_discovery_grace_total", result=r)
             for r in ("kept", "reregistered", "expired", "dropped")}
    assert grace == {"kept": 2, "reregistered": 2, "expired": 0, "dropped": 0}, grace
    assert bl.metric_sum(samples, "baton_frontend_discovery_grace_workers") == 0
    assert bl.metric_sum(samples, "baton_frontend_discovery_up") == 1
    assert bl.worker_metric(ws[0], "baton_worker_discovery_reregistrations_total") == 1
    assert bl.worker_metric(ws[0], "baton_worker_discovery_registered") == 1

    # ---- drain ---------------------------------------------------------------------------------
    load = el.Load(fe, concurrency=4)
    bl.wait_for(lambda: load.count() >= 10, 20, what="load to run")
    d = ws[ids.index(live[1])]
    mark = len(fe.proc.log_text())
    t0 = time.monotonic()
    d.proc.kill(signal.SIGTERM)
    fe.proc.wait_log(rf"worker {live[1]} \(.*\) is draining: routing nothing new to it", 2)
    el.wait_health(fe, [live[0]], 1, "the draining worker to leave /health")
    print(f"drain: out of /health {time.monotonic() - t0:.3f} s after SIGTERM")
    assert d.proc.wait(10) == 0
    fe.proc.wait_log(rf"worker {live[1]} \(.*\) forgotten", 5)
    m = d.proc.wait_log(r"drain summary: .*", 1)
    print(m.group(0))
    el.check_results(load.stop(), refs, 10, "load through the drain")
    after = fe.proc.log_text()[mark:]
    assert re.search(rf"worker {live[1]} \(.*\) left discovery with \d+ streams in flight", after), after
    assert not re.search(rf"worker {live[1]} \(.*\) left discovery with a healthy connection", after), \
        "a draining worker was kept by the grace"
    assert metric(fe, "baton_frontend_discovery_grace_total", result="kept") == 2

    # ---- expiry ----------------------------------------------------------------------------------
    t0 = time.monotonic()
    etcd.etcdctl("del", el.key_of(live[0]))
    fe.proc.wait_log(rf"worker {live[0]} \(.*\) left discovery with a healthy connection: kept routable", 5)
    assert el.health_ids(fe) == [live[0]], "a worker in its grace left /health"
    assert metric(fe, "baton_frontend_discovery_grace_workers") == 1
    fe.proc.wait_log(rf"worker {live[0]} \(.*\) did not register again within", GRACE + 3)
    gone = time.monotonic() - t0
    el.wait_health(fe, [], 2, "the worker to leave /health when its grace ended")
    assert GRACE - 0.5 <= gone <= GRACE + 2, f"the grace lasted {gone:.2f} s, not {GRACE} s"
    print(f"expiry: dropped {gone:.2f} s after its key was deleted (grace {GRACE} s)")
    assert metric(fe, "baton_frontend_discovery_grace_total", result="expired") == 1
    codes = c.close()
    etcd.stop()
    bad = {k: v for k, v in codes.items() if v not in (0, -signal.SIGKILL)}
    assert not bad, f"processes exited badly: {bad}"
print("test_etcd_pause: OK")
