"""Discovery over a real etcd (one member): leases, watches, self-healing, auth.

Frontends and mocker workers run with --discovery etcd against `etcd` on free loopback ports:
  * processes started before etcd wait for it (they never exit) and register once it is up;
  * serving is byte-exact; keys hold the value and are written with a lease of the worker's TTL,
    kept alive past several TTLs;
  * kill -9: the key expires within the TTL and the frontend is told; SIGTERM: the key is gone at
    once (far inside a 30 s TTL) and the lease is revoked;
  * a worker cut off from etcd (a switchable TCP proxy) loses its lease, keeps serving, and when
    the link returns grants a new lease, registers again (log line) and takes traffic again;
  * a frontend cut off from etcd keeps its workers (no deletes for what it cannot see) and, when
    the link returns, reconciles: it lists again and diffs against what it had (also when the
    revision it had reached was compacted meanwhile), then watches from the listing;
  * etcd's data lost (a new, empty cluster on the same address): workers register again and the
    frontends notice another store and list again;
  * auth: user/password, a token that expires under the processes, a wrong password.
Streams under every fault are compared to fault-free references; etcdlib.self_check() proves the
comparison rejects broken runs.
"""

import json
import os
import shutil
import signal
import time

import batonlib as bl
import etcdlib as el

bl.deadline(280, "test_etcd")
el.self_check()

TTL = 3
WORKER = dict(discovery="etcd", discovery_ttl=TTL, speedup_ratio=50)


def check_key_value(keys, w, wid, rpc_port):
    value, lease = keys[el.key_of(wid)]
    v = json.loads(value)
    assert v["type"] == "Endpoint" and format(v["instance_id"], "x") == wid, v
    assert v["transport"]["tcp"] == f"127.0.0.1:{rpc_port}", v
    assert v["model"]["name"] == "mock-model" and v["model"]["total_kv_blocks"] > 0, v
    assert lease != 0, f"{el.key_of(wid)} was written without a lease"
    return lease


def phase_start_before_etcd(c, etcd):
    """Frontend and worker start while etcd is down: both wait, then come up with it."""
    fe = c.start_frontend(discovery="etcd", etcd_endpoints=etcd.endpoints)
    w1 = c.start_worker(etcd_endpoints=etcd.endpoints, **WORKER)
    time.sleep(2.5)
    assert fe.proc.alive() and w1.proc.alive(), "a process exited while etcd was down"
    assert el.health_ids(fe) == [], "a worker appeared without etcd"
    assert el.log_has(w1.proc, r"etcd: lease grant via .* failed"), "the worker never tried etcd"
    etcd.start()
    w1id = el.worker_id(w1)
    el.wait_health(fe, [w1id], 20, "the frontend to see the worker once etcd is up")
    w1.proc.wait_log(r"etcd: registered " + el.key_of(w1id), timeout=5)
    return fe, w1, w1id


def phase_serving_and_leases(c, etcd, fe, w1, w1id):
    w2 = c.start_worker(etcd_endpoints=etcd.endpoints, **WORKER)
    w2id = el.worker_id(w2)
    el.wait_health(fe, [w1id, w2id], 20)
    refs = el.references(fe)
    jobs = [(fe.url, el.body(el.PROMPTS[i % len(el.PROMPTS)])) for i in range(40)]
    res = bl.run_concurrently(lambda u, b: bl.stream_chat(u, b, timeout=60), jobs, max_workers=20)
    el.check_results([(b["messages"][0]["content"], s) for (_, b), s in zip(jobs, res)], refs, 40, "concurrent")
    keys = etcd.get_prefix(el.PREFIX)
    assert sorted(keys) == sorted([el.key_of(w1id), el.key_of(w2id)]), keys
    l1 = check_key_value(keys, w1, w1id, w1.rpc_port)
    l2 = check_key_value(keys, w2, w2id, w2.rpc_port)
    assert l1 != l2, "two processes share a lease"
    ttl = etcd.etcdctl("lease", "timetolive", format(l1, "x"))
    assert f"granted with TTL({TTL}s)" in ttl, ttl
    # Kept alive: after more than three TTLs the same keys are there with the same leases.
    time.sleep(3 * TTL + 1)
    again = etcd.get_prefix(el.PREFIX)
    assert again == keys, f"keys changed while their owners lived: {keys} -> {again}"
    return refs, w2, w2id


def phase_kill9(c, etcd, fe, w1id, w2, w2id):
    """kill -9: nothing revokes the lease; the key expires within the TTL, and the frontend hears it."""
    assert el.key_of(w2id) in etcd.get_prefix(el.PREFIX)
    t0 = time.monotonic()
    w2.proc.kill(signal.SIGKILL)
    assert w2.proc.wait(5) == -signal.SIGKILL
    el.wait_keys(etcd, lambda k: el.key_of(w2id) not in k, TTL + 4, "the killed worker's key to expire")
    gone = time.monotonic() - t0
    print(f"kill -9: key expired {gone:.2f} s after the kill (TTL {TTL} s)")
    fe.proc.wait_log(rf"worker {w2id} \(.*\) left discovery", timeout=5)
    el.wait_health(fe, [w1id], 5)


def phase_sigterm(c, etcd, fe, w1id):
    """SIGTERM: the key goes at once — well inside a 30 s TTL, so expiry cannot explain it."""
    w3 = c.start_worker(etcd_endpoints=etcd.endpoints, **dict(WORKER, discovery_ttl=30))
    w3id = el.worker_id(w3)
    el.wait_health(fe, [w1id, w3id], 20)
    keys = etcd.get_prefix(el.PREFIX)
    lease = keys[el.key_of(w3id)][1]
    assert lease in etcd.leases()
    t0 = time.monotonic()
    w3.proc.kill(signal.SIGTERM)
    el.wait_keys(etcd, lambda k: el.key_of(w3id) not in k, 2.0, "the SIGTERMed worker's key to go at once")
    print(f"SIGTERM: key deleted {time.monotonic() - t0:.3f} s after the signal (TTL 30 s)")
    fe.proc.wait_log(rf"worker {w3id} \(.*\) left discovery", timeout=3)
    assert w3.proc.wait(10) == 0, f"worker exited with {w3.proc.returncode}"
    assert lease not in etcd.leases(), "the lease outlived its process: not revoked"
    assert el.log_has(w3.proc, rf"etcd: lease {lease:x} revoked"), w3.proc.log_tail()


def phase_worker_partition(c, etcd, fe, w1id, refs):
    """A worker cut off from etcd loses its lease, never exits, and registers again afterwards."""
    proxy = el.Proxy(etcd.client_ports[0])
    w4 = c.start_worker(etcd_endpoints=proxy.url, **WORKER)
    w4id = el.worker_id(w4)
    el.wait_health(fe, [w1id, w4id], 20)
    lease1 = etcd.get_prefix(el.PREFIX)[el.key_of(w4id)][1]
    load = el.Load(fe, concurrency=3)
    proxy.cut()
    t0 = time.monotonic()
    el.wait_keys(etcd, lambda k: el.key_of(w4id) not in k, TTL + 5, "the cut-off worker's lease to expire")
    print(f"partition: the cut-off worker's key expired {time.monotonic() - t0:.2f} s after the cut")
    fe.proc.wait_log(rf"worker {w4id} \(.*\) left discovery", timeout=5)
    time.sleep(2)
    assert w4.proc.alive(), "the worker exited when it lost its lease"
    assert el.log_has(w4.proc, r"etcd: lease keep-alive via .* failed"), "no evidence the worker lost etcd"
    proxy.restore()
    t1 = time.monotonic()
    keys = el.wait_keys(etcd, lambda k: el.key_of(w4id) in k, 15, "the worker to register again")
    print(f"partition healed: registered again {time.monotonic() - t1:.2f} s after the link returned")
    lease2 = keys[el.key_of(w4id)][1]
    assert lease2 != lease1 and lease2 != 0, (lease1, lease2)
    w4.proc.wait_log(rf"etcd: lease {lease1:x} is gone .*registering 1 key\(s\) again", timeout=5)
    w4.proc.wait_log(rf"etcd: registered again: 1 key\(s\) under lease {lease2:x}", timeout=5)
    el.wait_health(fe, [w1id, w4id], 10, "the frontend to route to the re-registered worker")
    before = el.routed(fe, w4id)
    for i in range(6):
        s = bl.stream_chat(fe.url, el.body(el.PROMPTS[i]), timeout=30)
        el.check_results([(el.PROMPTS[i], s)], refs)
    assert el.routed(fe, w4id) > before, "the re-registered worker took no traffic"
    el.check_results(load.stop(), refs, 10, "load through the worker's partition")
    return w4, w4id, proxy


def fake_instance(iid, port):
    return json.dumps({"type": "Endpoint", "namespace": "dynamo", "component": "backend", "endpoint": "generate",
                       "instance_id": iid, "transport": {"tcp": f"127.0.0.1:{port}"},
                       "model": {"name": "mock-model", "total_kv_blocks": 16, "block_size": 16}})


def phase_frontend_partition(c, etcd, w1id, w4id, refs):
    """A frontend cut off from etcd keeps serving with what it knew, then reconciles."""
    proxy = el.Proxy(etcd.client_ports[0])
    fe2 = c.start_frontend(discovery="etcd", etcd_endpoints=proxy.url)
    el.wait_health(fe2, [w1id, w4id], 20)
    dead = bl.free_port()
    # 1. A fake instance deleted and a worker added while the frontend is cut off.
    etcd.etcdctl("put", el.key_of("fa0e"), fake_instance(0xFA0E, dead))
    fe2.proc.wait_log(r"discovered worker fa0e", timeout=5)
    proxy.cut()
    w5 = c.start_worker(etcd_endpoints=etcd.endpoints, **WORKER)
    w5id = el.worker_id(w5)
    el.wait_keys(etcd, lambda k: el.key_of(w5id) in k, 10, "the new worker's key")
    etcd.etcdctl("del", el.key_of("fa0e"))
    for _ in range(8):  # more than two watch probe periods: the frontend knows etcd is gone
        assert el.health_ids(fe2) == sorted([w1id, w4id]), "the frontend changed its workers while cut off"
        s = bl.stream_chat(fe2.url, el.body(el.PROMPTS[0]), timeout=30)
        el.check_results([(el.PROMPTS[0], s)], refs, what="serving while cut off from etcd")
        time.sleep(0.9)
    fe2.proc.wait_log(r"etcd: watch on v1/instances/dynamo/ via .* broke", timeout=1)
    assert not el.log_has(fe2.proc, r"worker fa0e \(.*\) left discovery"), "a delete was seen through the cut"
    proxy.restore()
    el.wait_health(fe2, [w1id, w4id, w5id], 15, "the frontend to learn of the worker added while cut off")
    fe2.proc.wait_log(r"worker fa0e \(.*\) left discovery", timeout=5)
    fe2.proc.wait_log(r"etcd: watch on v1/instances/dynamo/ resumed from revision \d+", timeout=5)
    # 2. Compaction while cut off: the revision the frontend had reached is gone; the listing
    #    after the cut does not need it.
    etcd.etcdctl("put", el.key_of("fa0f"), fake_instance(0xFA0F, dead))
    fe2.proc.wait_log(r"discovered worker fa0f", timeout=5)
    proxy.cut()
    time.sleep(1)
    etcd.etcdctl("del", el.key_of("fa0f"))
    w5.proc.kill(signal.SIGTERM)
    assert w5.proc.wait(10) == 0
    el.wait_keys(etcd, lambda k: el.key_of(w5id) not in k, 5, "the stopped worker's key")
    etcd.etcdctl("put", "unrelated/key", "x")
    rev = json.loads(etcd.etcdctl("get", "unrelated/key", "-w", "json"))["header"]["revision"]
    etcd.etcdctl("compact", rev)
    time.sleep(7)  # past two probe periods
    assert not el.log_has(fe2.proc, r"worker fa0f \(.*\) left discovery"), "a delete was seen through the cut"
    proxy.restore()
    fe2.proc.wait_log(r"etcd: listed v1/instances/dynamo/ again via .*; \d+ new or changed, 2 gone", timeout=15)
    fe2.proc.wait_log(r"worker fa0f \(.*\) left discovery", timeout=5)
    fe2.proc.wait_log(rf"worker {w5id} \(.*\) left discovery", timeout=5)
    el.wait_health(fe2, [w1id, w4id], 10)
    s = bl.stream_chat(fe2.url, el.body(el.PROMPTS[1]), timeout=30)
    el.check_results([(el.PROMPTS[1], s)], refs, what="after reconciling")
    return fe2, proxy


def phase_store_replaced(c, etcd, fes, w1, w1id, w4, w4id, refs):
    """etcd comes back empty (its data lost: a new cluster on the same address): the workers find
    their leases gone and register again; the frontends see another store and list again."""
    before = etcd.get_prefix(el.PREFIX)
    etcd.kill_member(0)
    shutil.rmtree(os.path.join(etcd.dir, f"etcd-{etcd.names[0]}"))
    etcd.cluster_token += "-new"
    etcd.start_member(0)
    etcd.wait_healthy()
    after = el.wait_keys(etcd, lambda k: sorted(k) == sorted(before), 15, "the workers to register in the new store")
    assert all(after[k][1] != before[k][1] for k in before), "a lease survived the loss of the store"
    for w in (w1, w4):
        w.proc.wait_log(r"etcd: lease [0-9a-f]+ is gone .*registering 1 key\(s\) again", timeout=5)
    for fe in fes:
        fe.proc.wait_log(r"etcd: .* is another store \(cluster \d+ at revision \d+; we had cluster \d+", timeout=15)
        el.wait_health(fe, [w1id, w4id], 10, "the frontend to list the workers from the new store")
        s = bl.stream_chat(fe.url, el.body(el.PROMPTS[3]), timeout=30)
        el.check_results([(el.PROMPTS[3], s)], refs, what="after the store was replaced")


def phase_auth(c):
    """User and password; a token that expires under the processes; a wrong password."""
    ea = bl.Etcd(1, name="auth", extra_args=["--auth-token", "simple", "--auth-token-ttl", "2"]).start()
    ea.etcdctl("user", "add", "root:rootpw")
    ea.etcdctl("user", "add", "baton:s3cret")
    ea.etcdctl("role", "add", "baton")
    ea.etcdctl("role", "grant-permission", "baton", "--prefix=true", "readwrite", "v1/")
    ea.etcdctl("user", "grant-role", "baton", "baton")
    ea.etcdctl("auth", "enable")
    ea.auth = "root:rootpw"
    good = {"ETCD_AUTH_USERNAME": "baton", "ETCD_AUTH_PASSWORD": "s3cret"}
    fe = c.start_frontend(discovery="etcd", etcd_endpoints=ea.endpoints, env=good)
    wa = c.start_worker(etcd_endpoints=ea.endpoints, env=good, **WORKER)
    bad = c.start_worker(etcd_endpoints=ea.endpoints, env={"ETCD_AUTH_USERNAME": "baton",
                                                            "ETCD_AUTH_PASSWORD": "wrong"}, **WORKER)
    waid, badid = el.worker_id(wa), el.worker_id(bad)
    el.wait_health(fe, [waid], 20)
    bad.proc.wait_log(r"etcd: cannot authenticate as 'baton'", timeout=10)
    assert sorted(ea.get_prefix(el.PREFIX)) == [el.key_of(waid)], "the wrong password registered"
    refs = el.references(fe)
    time.sleep(5)  # tokens (TTL 2 s) expire under everyone
    wb = c.start_worker(etcd_endpoints=ea.endpoints, env=good, **WORKER)
    wbid = el.worker_id(wb)
    el.wait_health(fe, [waid, wbid], 20, "a worker registered after the tokens expired")
    t0 = time.monotonic()
    wa.proc.kill(signal.SIGTERM)
    el.wait_keys(ea, lambda k: el.key_of(waid) not in k, 3, "the SIGTERMed worker's key (expired token)")
    print(f"auth: SIGTERM with an expired token: key deleted after {time.monotonic() - t0:.3f} s")
    assert wa.proc.wait(10) == 0
    fe.proc.wait_log(rf"worker {waid} \(.*\) left discovery", timeout=3)
    s = bl.stream_chat(fe.url, el.body(el.PROMPTS[2]), timeout=30)
    el.check_results([(el.PROMPTS[2], s)], refs, what="serving with auth")
    assert bad.proc.alive() and el.key_of(badid) not in ea.get_prefix(el.PREFIX)
    assert fe.proc.log_text().count("authenticating again") >= 1, "no token ever expired: the test proves nothing"
    bad.proc.kill(signal.SIGTERM)
    assert bad.proc.wait(10) == 0
    ea.stop()


with bl.Cluster() as c:
    etcd = bl.Etcd(1)
    fe, w1, w1id = phase_start_before_etcd(c, etcd)
    refs, w2, w2id = phase_serving_and_leases(c, etcd, fe, w1, w1id)
    phase_kill9(c, etcd, fe, w1id, w2, w2id)
    phase_sigterm(c, etcd, fe, w1id)
    w4, w4id, wproxy = phase_worker_partition(c, etcd, fe, w1id, refs)
    fe2, fproxy = phase_frontend_partition(c, etcd, w1id, w4id, refs)
    phase_store_replaced(c, etcd, [fe, fe2], w1, w1id, w4, w4id, refs)
    phase_auth(c)
    codes = c.close()
    etcd.stop()
    bad = {k: v for k, v in codes.items() if v not in (0, -signal.SIGKILL)}
    assert not bad, f"processes exited badly: {bad}"
print("test_etcd: OK")
