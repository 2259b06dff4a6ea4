"""Discovery over a 3-member etcd cluster: the leader killed under load, then all of etcd down.

Every baton process gets the endpoint list with the current leader first, so each of them starts
on the member that is about to die:
  1. kill -9 of the leader under streaming load: zero client-visible errors (streams compared to
     fault-free references byte for byte); the workers' keep-alives move to a live member and keep
     the same leases past several TTLs; the frontend's watch resumes on another member and still
     sees a worker come and go;
  2. the old leader restarts and rejoins;
  3. every member killed for 20 s under load: serving goes on; the frontend keeps its workers (no
     deletes for what it cannot see); a worker killed meanwhile keeps its key until etcd is back and
     then expires, a worker started meanwhile registers once etcd is back, and etcdctl shows the
     live workers' keys afterwards.
"""

import signal
import socket
import time

import batonlib as bl
import etcdlib as el

bl.deadline(280, "test_etcd_cluster")
el.self_check()

TTL = 3
OUTAGE_S = 20


def lease_alive(etcd, lease):
    out = etcd.etcdctl("lease", "timetolive", format(lease, "x"))
    return "remaining(" in out and "already expired" not in out


with bl.Cluster() as c:
    etcd = bl.Etcd(3).start()
    leader = etcd.leader()
    eps = etcd.endpoints_from(leader)
    worker = dict(discovery="etcd", etcd_endpoints=eps, discovery_ttl=TTL, speedup_ratio=20)
    fe = c.start_frontend(discovery="etcd", etcd_endpoints=eps)
    w1, w2 = c.start_worker(**worker), c.start_worker(**worker)
    w1id, w2id = el.worker_id(w1), el.worker_id(w2)
    el.wait_health(fe, [w1id, w2id], 20)
    refs = el.references(fe)
    keys0 = etcd.get_prefix(el.PREFIX)
    assert sorted(keys0) == sorted([el.key_of(w1id), el.key_of(w2id)]), keys0
    fe.proc.wait_log(r"etcd: watching v1/instances/dynamo/ from revision \d+ via " + etcd.urls[leader], timeout=5)

    # 1. The leader dies under load.
    load = el.Load(fe, concurrency=4)
    time.sleep(1.5)
    etcd.kill_member(leader)
    t_kill = time.monotonic()
    survivors = etcd.live_members()
    assert leader not in survivors and len(survivors) == 2
    (new_leader,) = bl.wait_for(lambda: (etcd.leader(),), 15, what="a new leader")
    assert new_leader in survivors, (leader, new_leader)
    print(f"leader {leader} killed; member {new_leader} leads after {time.monotonic() - t_kill:.2f} s")
    m = fe.proc.wait_log(r"etcd: watch on v1/instances/dynamo/ resumed from revision \d+ via (\S+) after ([\d.]+) s",
                         timeout=20)
    assert m.group(1) != etcd.urls[leader], m.group(0)
    print(f"frontend watch resumed via {m.group(1)} after {m.group(2)} s")
    time.sleep(3 * TTL)  # the leases must survive several TTLs: keep-alives reach a live member
    keys1 = etcd.get_prefix(el.PREFIX)
    assert keys1 == keys0, f"worker keys or leases changed after the leader died: {keys0} -> {keys1}"
    for w in (w1, w2):
        assert el.log_has(w.proc, r"etcd: now using http://"), "a worker never left the dead member"
        assert not el.log_has(w.proc, r"is gone"), "a worker lost its lease to a leader change"
    w3 = c.start_worker(**worker)
    w3id = el.worker_id(w3)
    el.wait_health(fe, [w1id, w2id, w3id], 20, "the frontend to see a worker added after the leader died")
    w3.proc.kill(signal.SIGTERM)
    fe.proc.wait_log(rf"worker {w3id} \(.*\) left discovery", timeout=5)
    assert w3.proc.wait(10) == 0
    el.check_results(load.stop(), refs, 20, "load through the leader's death")

    # 2. The old leader comes back and rejoins.
    etcd.start_member(leader)
    etcd.wait_healthy()
    assert sorted(etcd.get_prefix(el.PREFIX, members=[leader])) == sorted(keys0)

    # 3. All of etcd down for 20 s under load.
    load = el.Load(fe, concurrency=4)
    time.sleep(1.5)
    for i in etcd.live_members():
        etcd.kill_member(i)
    t_down = time.monotonic()
    assert not etcd.live_members()
    for port in etcd.client_ports:  # evidence: no member answers
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            raise AssertionError(f"an etcd member still listens on {port}")
        except ConnectionRefusedError:
            pass
    time.sleep(2)
    w2.proc.kill(signal.SIGKILL)  # its key cannot expire while etcd is down
    assert w2.proc.wait(5) == -signal.SIGKILL
    w4 = c.start_worker(**worker)  # cannot register while etcd is down
    w4id = el.worker_id(w4)
    while time.monotonic() - t_down < OUTAGE_S:
        ids = el.health_ids(fe)
        assert w1id in ids, f"the frontend dropped a live worker while etcd was down: {ids}"
        assert w4id not in ids, "a worker appeared without etcd"
        time.sleep(0.5)
    assert not el.log_has(fe.proc, rf"worker {w1id} \(.*\) left discovery")
    assert el.log_has(w4.proc, r"etcd: lease grant via .* failed"), "the new worker never tried etcd"
    for i in range(etcd.n):
        etcd.start_member(i)
    etcd.wait_healthy(timeout=30)
    t_up = time.monotonic()
    print(f"etcd was down for {t_up - t_down:.1f} s")
    keys = el.wait_keys(etcd, lambda k: el.key_of(w4id) in k and el.key_of(w2id) not in k and el.key_of(w1id) in k,
                        TTL + 20, "live workers' keys present and the dead worker's key expired")
    print(f"after the outage: keys settled {time.monotonic() - t_up:.2f} s after etcd returned: {sorted(keys)}")
    assert lease_alive(etcd, keys[el.key_of(w1id)][1]) and lease_alive(etcd, keys[el.key_of(w4id)][1])
    el.wait_health(fe, [w1id, w4id], 15, "the frontend to reconcile after the outage")
    fe.proc.wait_log(rf"worker {w2id} \(.*\) left discovery", timeout=10)
    assert w1.proc.alive() and w4.proc.alive(), "a worker exited during the outage"
    time.sleep(2 * TTL)  # and the keys stay: keep-alives work again
    assert sorted(etcd.get_prefix(el.PREFIX)) == sorted([el.key_of(w1id), el.key_of(w4id)])
    el.check_results(load.stop(), refs, 40, "load through the etcd outage")
    codes = c.close()
    etcd.stop()
    bad = {k: v for k, v in codes.items() if v not in (0, -signal.SIGKILL)}
    assert not bad, f"processes exited badly: {bad}"
print("test_etcd_cluster: OK")
