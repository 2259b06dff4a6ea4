"""A stream moved by its operator (POST /rebalance, BT_ERR_MOVED) is not a failure: the move is
charged neither to the request's --migration-limit nor to the retry budget.

1. --migration-limit 0 (migration off): a rebalanced stream still continues on the other worker,
   byte-exact. Charged to the limit, it would end with "migration is disabled".
2. --migration-limit 3 with a retry budget that allows no retry at all (--retry-budget 0.001,
   --retry-budget-min 0): a stream rebalanced from X to Y and then losing Y (kill -9) continues
   on X, byte-exact. The loss is its first real migration mid-stream, which the budget never
   refuses; had the rebalance counted, it would be a repeat migration and be refused.
Both check the evidence: the rebalance answered moved=1 and the frontend logged the migrations.
And both check that the move is counted as what it is: not in dynamo_frontend_model_migration_total
or the migration stall histogram (which count failures), its log line at INFO (a migration's is a
WARN), and the access log's "migrations" leaving it out (case 2: the kill's migration alone).
"""

import json
import os
import re
import signal
import sys
import threading

import batonlib as bl

MODEL = "mock-model"


def body():
    return bl.completion_body("Tell me about moving streams around", max_tokens=300, model=MODEL,
                              return_token_ids=True, stream_options={"include_usage": True})


def worker(c, **flags):
    return c.start_worker(system_port=True, wait=True, mocker_kv_bytes_per_token=4096, **flags)


def moved_stream(c, fe, x, rid, after=None):
    """Streams rid from X (the only worker at its start); once it has 30 tokens, starts Y, moves the
    stream off X with POST /rebalance and then runs after(y). Returns (stream, y)."""
    got, reached = {}, threading.Event()

    def on_event(st, obj):
        if len(st.token_ids) >= 30:
            reached.set()

    t = threading.Thread(target=lambda: got.update(s=bl.stream_completion(
        fe.url, body(), timeout=60, on_event=on_event, headers={"X-Request-Id": rid})))
    t.start()
    y = worker(c)
    c.wait_workers(fe, 2)
    assert reached.wait(30), "the stream never reached 30 tokens"
    st, _, b = bl.request("POST", x.system_url + "/rebalance?streams=1")
    assert st == 200 and json.loads(b)["moved"] == 1, (st, b)
    if after:
        fe.proc.wait_log(rf"request {rid} migrated from worker [0-9a-f]+ to worker", timeout=20)
        after(y)
    t.join(60)
    return got["s"], y


def migration_counts(fe):
    """(dynamo_frontend_model_migration_total, migrations in the stall histogram) of the frontend."""
    m = bl.metrics(fe.url)
    return (bl.metric_sum(m, "dynamo_frontend_model_migration_total"),
            bl.metric_sum(m, "dynamo_frontend_model_migration_stall_seconds_count"))


def migration_lines(fe, rid):
    """The levels of the frontend's "request <rid> migrated" lines, in order."""
    return re.findall(rf"^\S+ (\w+) +frontend\[\d+\]: request {rid} migrated from", fe.proc.log_text(), re.M)


def exact(ref, s, what):
    s.assert_ok(what)
    assert s.token_ids == ref.token_ids and s.text == ref.text, f"{what}: differs\n{s.summary()}\n{ref.summary()}"
    assert s.usage == ref.usage, (s.usage, ref.usage)


def main():
    with bl.deadline(120, "test_rebalance_budget"):
        with bl.Cluster() as c:
            # 1. migration off
            fe = c.start_frontend(migration_limit=0)
            x = worker(c, rebalance_endpoint=True)
            c.wait_workers(fe, 1)
            ref = bl.stream_completion(fe.url, body(), timeout=60)
            ref.assert_ok("reference")
            s, y = moved_stream(c, fe, x, "reb0")
            exact(ref, s, "rebalanced with --migration-limit 0")
            assert "request reb0 migrated" in fe.proc.log_text(), "the stream did not move"
            assert migration_counts(fe) == (0, 0), f"the move counted as a migration: {migration_counts(fe)}"
            assert migration_lines(fe, "reb0") == ["INFO"], migration_lines(fe, "reb0")
            print("--migration-limit 0: a rebalanced stream continued on the other worker, byte-exact")
            y.proc.stop()
            fe.proc.stop()

            # 2. a retry budget that refuses every retry; the loss after a rebalance is a first migration
            access = os.path.join(c.dir, "access-reb1.log")
            fe = c.start_frontend(migration_limit=3, retry_budget=0.001, retry_budget_min=0, access_log=access)
            c.wait_workers(fe, 1)
            s, y = moved_stream(c, fe, x, "reb1", after=lambda y: y.proc.kill(signal.SIGKILL))
            exact(ref, s, "rebalanced, then its worker killed")
            log = fe.proc.log_text()
            assert log.count("request reb1 migrated") == 2, "expected two moves (rebalance, kill)\n" + fe.proc.log_tail()
            assert "retry refused" not in log, fe.proc.log_tail()
            # the kill is a migration, counted once; the rebalance before it is not
            assert migration_counts(fe) == (1, 1), f"expected the kill's migration alone: {migration_counts(fe)}"
            assert migration_lines(fe, "reb1") == ["INFO", "WARN"], migration_lines(fe, "reb1")
            bl.wait_for(lambda: os.path.exists(access) and "reb1" in open(access).read(), 5, what="the access log")
            line = next(json.loads(x) for x in open(access) if '"reb1"' in x)
            assert line["attempts"] == 3 and line["migrations"] == 1, line
            print("retry budget of 0: rebalance then kill -9 of the new worker, continued byte-exact")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
