"""Request migration when it cannot save a request, and before the first token, through the real
binaries: with --migration-limit 0 the streams of a killed worker end with a final SSE error event
(no [DONE]) and non-streaming requests with a 5xx JSON error, while the others complete exactly;
with every worker killed each client gets a clear error and none hangs; a budget of one migration
is exhausted by two failures; failures before the first token (a worker killed during prefill, a
stopped worker, a discovered worker whose port is dead) cost no request. Each scenario checks its
fault happened (pid dead or stopped, counters moved, log lines) and that the frontend returns to
baseline. Helpers and the checkers (self-tested there) come from test_migration.py.
"""

import json
import os
import signal
import time

import batonlib as bl
from test_migration import (MODEL, SPEEDUP, UNARY, Load, assert_no_problems, check_baseline, check_clean_error,
                            counters, delta, kill9, make_reqs, migrations, proc_state, ref_of,
                            references, start_cluster, worker_gauge, worker_ids)


def scenario_limit_zero(refs):
    """--migration-limit 0: the killed worker's requests end with a clean error, the rest complete."""
    with bl.Cluster() as c:
        fe, ws, ids = start_cluster(c, 3, fe_flags={"migration_limit": 0})
        before = counters(fe)
        assert before["limit"] == 0, before
        load = Load(fe, make_reqs("l0", range(30), True) + make_reqs("l0u", UNARY[:9], False))
        load.wait_tokens(30)
        vid = ids[ws[0].rpc_port]
        inflight = worker_gauge(fe, "inflight")[vid]
        assert inflight > 0
        kill9(ws[0])
        reqs = load.join()
        d = delta(counters(fe), before)
        ok = [r for r in reqs if r.result["complete"]]
        failed = [r for r in reqs if not r.result["complete"]]
        print(f"limit 0: {inflight:.0f} requests on the victim; {len(failed)} failed, {len(ok)} completed; deltas {d}")
        assert_no_problems(ok, refs, "limit 0, unaffected requests")
        assert len(failed) == inflight, f"{len(failed)} requests failed, {inflight:.0f} were on the killed worker"
        bad = [(r.rid, p) for r in failed for p in [check_clean_error(r.result, ref_of(refs, r), r.stream)] if p]
        assert not bad, f"limit 0: unclear errors: {bad[:5]}"
        for r in failed:
            if r.stream:  # mid-stream: the SSE error event, connection closed, no [DONE]
                assert r.result["status"] == 200 and r.result["token_ids"], r.result
            assert "migration is disabled" in r.result["error"]["message"], r.result["error"]
            assert r.result["error"]["type"] == "server_error", r.result["error"]  # a 5xx
        assert any(not r.stream for r in failed) and any(r.stream for r in failed), "need both kinds affected"
        assert migrations(fe, "l0") == [] and migrations(fe, "l0u") == [], "a migration with the limit at 0"
        # counted as Dynamo does (a failure a migration would have handled), but nothing exhausted
        assert d["ongoing"] == inflight and d["new"] == 0 and d["exhausted"] == 0 and d["stall_count"] == 0, d
        check_baseline(c, fe, refs, 2, "l0")


def scenario_budget_exhausted(refs):
    """--migration-limit 1: a request whose second worker dies too has used its budget."""
    with bl.Cluster() as c:
        fe, ws, ids = start_cluster(c, 3, fe_flags={"migration_limit": 1})
        before = counters(fe)
        load = Load(fe, make_reqs("ex", range(45), True) + make_reqs("exu", UNARY[:6], False))
        load.wait_tokens(20)
        a, b, last = (ids[w.rpc_port] for w in ws)
        kill9(ws[0])
        load.wait_tokens(80)
        on_b = worker_gauge(fe, "inflight")[b]
        kill9(ws[1])
        reqs = load.join()
        d = delta(counters(fe), before)
        migs = migrations(fe, "ex") + migrations(fe, "exu")
        moved_to_b = {m["rid"] for m in migs if m["from"] == a and m["to"] == b}
        failed = [r for r in reqs if not r.result["complete"]]
        print(f"budget 1: {len(moved_to_b)} requests moved to the second victim, which held {on_b:.0f}; "
              f"{len(failed)} failed; deltas {d}")
        assert moved_to_b, "no request was migrated to the second victim"
        assert {r.rid for r in failed} == moved_to_b, "the failed requests are not those that had migrated once"
        bad = [(r.rid, p) for r in failed for p in [check_clean_error(r.result, ref_of(refs, r), r.stream)] if p]
        assert not bad, bad[:5]
        assert all("migration limit of 1 exhausted" in r.result["error"]["message"] for r in failed), failed[0].result
        assert_no_problems([r for r in reqs if r.result["complete"]], refs, "budget 1, surviving requests")
        assert d["exhausted"] == len(failed), d
        assert d["ongoing"] == len(migs) + len(failed), d
        check_baseline(c, fe, refs, 1, "ex")


def scenario_all_killed(refs):
    """Every worker killed while requests run: each client gets a clear error; none hangs."""
    with bl.Cluster() as c:
        fe, ws, ids = start_cluster(c, 3)
        load = Load(fe, make_reqs("all", range(45), True) + make_reqs("allu", UNARY[:9], False))
        load.wait_tokens(20)
        for w in ws:
            kill9(w)
            time.sleep(0.2)
        t_killed = time.monotonic()
        reqs = load.join(60)
        late = [r.rid for r in reqs if r.t_end - t_killed > 10]
        assert not late, f"requests still running 10 s after the last worker died: {late[:5]}"
        bad = [(r.rid, p) for r in reqs for p in [check_clean_error(r.result, ref_of(refs, r), r.stream)] if p]
        assert not bad, f"all killed: {len(bad)} unclear endings: {bad[:5]}"
        msgs = {r.result["error"]["message"] for r in reqs}
        print(f"all killed: {len(reqs)} clear errors, e.g. {sorted(msgs)[:2]}")
        # 503s: no worker left, or the last attempt's worker failed
        assert all(r.result["error"]["type"] == "server_error" and
                   r.result["error"]["code"] in ("no_worker_available", "worker_unavailable") for r in reqs), \
            {r.result["error"]["code"] for r in reqs}
        # no worker: a new request is refused at once with a JSON 503
        t = time.monotonic()
        st, _, body = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("x", max_tokens=5), timeout=10)
        assert st == 503 and body["error"]["message"], (st, body)
        assert time.monotonic() - t < 5
        bl.wait_for(lambda: counters(fe)["inflight"] == 0, 10, 0.1, "inflight 0 with no worker")
        c.start_worker(speedup_ratio=SPEEDUP)
        check_baseline(c, fe, refs, 1, "all")


def write_dead_worker_key(c, port, instance_id):
    """A discovery entry for a worker that does not exist (nothing listens on `port`)."""
    key = f"v1/instances/dynamo/backend/generate/{instance_id:x}"
    value = {"type": "Endpoint", "namespace": "dynamo", "component": "backend", "endpoint": "generate",
             "instance_id": instance_id, "transport": {"tcp": f"127.0.0.1:{port}"},
             "model": {"name": MODEL, "total_kv_blocks": 16384, "block_size": 64}}
    name = key.replace("%", "%25").replace("/", "%2F")
    tmp = os.path.join(c.discovery_dir, f".tmp.{os.getpid()}.mig")
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, os.path.join(c.discovery_dir, name))


def scenario_before_first_token(refs):
    """Failures before the first token: (1) a discovered worker whose port is dead gets no request;
    (2) a worker killed while its requests are still in prefill: they migrate as new_request;
    (3) a worker stopped before requests reach it: declared dead, they migrate as new_request."""
    with bl.Cluster() as c:
        fe = c.start_frontend(stream_stall_timeout=2.0)
        fast = [c.start_worker(speedup_ratio=2) for _ in range(2)]
        slow = c.start_worker(speedup_ratio=0.004)  # its first prefill step takes over 4 s
        ids = worker_ids(c.wait_workers(fe, 3))
        dead_id = 0x5eadbeef12
        write_dead_worker_key(c, bl.free_port(), dead_id)
        fe.proc.wait_log(rf"worker {dead_id:x} \(\S+\): connecting -> down \(connect to \S+ failed", 10)
        c.wait_workers(fe, 3)  # the dead one never becomes routable
        before = counters(fe)

        # (1) + (2): requests spread over the fast workers and the slow one; the slow one dies
        load = Load(fe, make_reqs("pf", range(24), True) + make_reqs("pfu", UNARY[:6], False))
        sid = ids[slow.rpc_port]
        bl.wait_for(lambda: counters(fe)["inflight"] == len(load.reqs), 10, 0.02, "every request to be dispatched")
        on_slow = worker_gauge(fe, "inflight")[sid]
        assert on_slow >= 5, f"only {on_slow:.0f} requests on the slow worker"
        kill9(slow)
        reqs = load.join()
        d = delta(counters(fe), before)
        assert_no_problems(reqs, refs, "worker killed before its first token")
        migs = migrations(fe, "pf") + migrations(fe, "pfu")
        print(f"before first token: {on_slow:.0f} requests on the worker killed in prefill; {len(migs)} migrated; "
              f"deltas {d}")
        assert len(migs) == on_slow, (len(migs), on_slow)
        assert all(m["from"] == sid and m["carried"] == 0 and m["type"] == "new_request" for m in migs), migs[:3]
        assert d["new"] == on_slow and d["ongoing"] == 0, d
        routed = worker_gauge(fe, "routed_total")
        assert routed.get(format(dead_id, "x")) == 0, f"the dead-port worker was routed to: {routed}"

        # (3): a live worker stops before the requests reach it
        before = counters(fe)
        victim = fast[0]
        vid = ids[victim.rpc_port]
        victim.proc.kill(signal.SIGSTOP)
        bl.wait_for(lambda: proc_state(victim.proc.pid) == "T", 5, 0.01, "the worker to be stopped")
        load = Load(fe, make_reqs("sp", range(12), True) + make_reqs("spu", UNARY[:4], False))
        reqs = load.join()
        d = delta(counters(fe), before)
        assert_no_problems(reqs, refs, "worker stopped before the first token")
        migs = migrations(fe, "sp") + migrations(fe, "spu")
        print(f"stopped before first token: {len(migs)} migrated; deltas {d}")
        assert migs, "no request reached the stopped worker (the fault did not bite)"
        assert all(m["from"] == vid and m["carried"] == 0 and m["type"] == "new_request" and m["code"] ==
                   "BT_ERR_TIMEOUT" for m in migs), migs[:3]
        assert d["new"] == len(migs) and d["ongoing"] == 0 and d["exhausted"] == 0, d
        victim.proc.kill(signal.SIGCONT)
        check_baseline(c, fe, refs, 2, "pf")


def main():
    bl.deadline(200, "test_migration_errors")
    t0 = time.monotonic()
    refs = references(range(45), UNARY[:9])
    for sc in (scenario_limit_zero, scenario_budget_exhausted, scenario_all_killed, scenario_before_first_token):
        t = time.monotonic()
        sc(refs)
        print(f"{sc.__name__}: ok in {time.monotonic() - t:.1f} s")
    print(f"test_migration_errors: ok in {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
