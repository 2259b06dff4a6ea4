"""etcd recreated empty (its data directory lost) with the same command line, through the real
binaries: the frontend must see the new store as it is.

One etcd member, two mocker workers A and B (lease TTL 3 s), one frontend. etcd is killed with -9
and its data directory removed; while it is down B is killed with -9 and a new worker C started.
etcd then starts again, empty, from the same flags, so the new store has the same cluster id as the
old one, and the workers' registrations again soon bring its revision up to the old one's: neither
a new cluster id nor a revision that went back can tell the frontend it talks to another store.
A and C register in the new store, B never does. The frontend reaches etcd through a proxy cut for
the outage and restored once A and C registered and the new store's revision reached the old one
(the timing under which the frontend's watch came back in the field, made certain). The frontend
must list again when its watch comes back: C discovered and routed to, B (whose connection is
refused) dropped and no longer dialled, A kept throughout, and one log line saying what the listing
changed. Before the listing after each break, the frontend resumed its watch from its old
revision + 1, missed every event below it, never saw C and kept dialling B forever.
"""

import json
import re
import shutil
import signal
import time

import batonlib as bl
import etcdlib as el

bl.deadline(120, "test_etcd_recreated")
el.self_check()

WORKER = dict(discovery="etcd", discovery_ttl=3, speedup_ratio=5)


def revision(etcd):
    return int(json.loads(etcd.etcdctl("get", "--prefix", el.PREFIX, "-w", "json"))["header"]["revision"])


def metric(fe, name, **labels):
    return bl.metric_sum(bl.metrics(fe.url), name, **labels)


with bl.Cluster() as c:
    etcd = bl.Etcd(1).start()
    # the frontend reaches etcd through a proxy, so that its watch comes back only once the new
    # store holds what the probe saw: A and C registered, its revision up to the old one's
    proxy = el.Proxy(etcd.client_ports[0])
    fe = c.start_frontend(discovery="etcd", etcd_endpoints=proxy.url)
    wa = c.start_worker(etcd_endpoints=etcd.endpoints, **WORKER)
    wb = c.start_worker(etcd_endpoints=etcd.endpoints, **WORKER)
    a, b = el.worker_id(wa), el.worker_id(wb)
    el.wait_health(fe, [a, b], 20)
    bl.wait_for(lambda: metric(fe, "baton_frontend_discovery_up") == 1, 10, what="discovery_up to read 1")
    old_rev = revision(etcd)

    # ---- etcd lost with its data; B dies and C starts meanwhile --------------------------------
    proxy.cut()
    etcd.kill_member(0)
    shutil.rmtree(f"{etcd.dir}/etcd-{etcd.names[0]}")
    wb.proc.kill(signal.SIGKILL)
    assert wb.proc.wait(5) == -signal.SIGKILL
    wc = c.start_worker(etcd_endpoints=etcd.endpoints, **WORKER)
    cid = el.worker_id(wc)
    el.wait_health(fe, [a], 10, "the killed worker to leave /health while etcd is down")
    mark = len(fe.proc.log_text())

    etcd.start_member(0)
    etcd.wait_healthy()
    t_back = time.monotonic()
    el.wait_keys(etcd, lambda k: sorted(k) == sorted([el.key_of(a), el.key_of(cid)]), 15,
                 "A and C registered in the new store")
    while revision(etcd) < old_rev:  # writes outside the prefix: the revision alone must not tell
        etcd.etcdctl("put", "unrelated", "x")
    new_rev = revision(etcd)
    time.sleep(1)
    proxy.restore()
    print(f"old store at revision {old_rev}, new store at revision {new_rev} once A and C registered")

    # ---- the frontend sees the new store: C in, B out, A kept ----------------------------------
    el.wait_health(fe, [a, cid], 15, "the frontend to list A and C from the new store")
    print(f"/health lists A and C {time.monotonic() - t_back:.2f} s after etcd came back")
    bl.wait_for(lambda: metric(fe, "baton_frontend_workers", state="known") == 2, 10,
                what="the frontend to forget B (2 workers known)")
    fe.proc.wait_log(rf"worker {b} \(.*\) forgotten", 5)
    forgotten_at = len(fe.proc.log_text())
    # routable, not just listed: a request reaches C
    def route_one():
        st, _, body = bl.post_json(fe.url + "/v1/chat/completions", el.body(el.PROMPTS[0]))
        assert st == 200, (st, body)
        return el.routed(fe, cid) > 0

    bl.wait_for(route_one, 20, interval=0.1, what="a request routed to C")
    after = fe.proc.log_text()[mark:]
    # the log says what happened, once: the listing and what it changed
    assert len(re.findall(r"etcd: listed \S+ again via .*: 2 key\(s\) at revision \d+ .*; \d+ new or changed, 1 gone",
                          after)) == 1, after
    assert not re.search(rf"worker {a} \(.*\) (left discovery|forgotten)", after), "A was dropped"
    assert metric(fe, "baton_frontend_discovery_up") == 1
    time.sleep(3)  # no dial of the dead worker goes on
    assert f"worker {b}" not in fe.proc.log_text()[forgotten_at:], "B is still dialled"
    assert metric(fe, "baton_frontend_workers", state="known") == 2
    assert el.health_ids(fe) == sorted([a, cid])
print("test_etcd_recreated: ok")
