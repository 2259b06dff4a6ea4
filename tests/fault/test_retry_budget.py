"""The retry budget through the real binaries (src/frontend/budget.c): a worker that dies holding
many requests that have not produced a token yet (its engine runs one sequence at a time) would
send all of them to be re-routed at once; with --retry-budget 0.1 and a floor of 2 (set through POST /admission) only
max(2, 0.1 x requests started in the last 10 s) are, the others fail with the budget named in the
error, and the counters match what the clients saw. The stream that was running on the dead worker
(its first mid-stream migration is not a retry) still completes. Without the budget, every one of
them is re-routed and completes.
"""

import signal
import threading

import batonlib as bl

bl.deadline(200, "test_retry_budget")


def run(budget):
    with bl.Cluster() as c:
        # the budget's share from the flag, its floor set at run time (POST /admission)
        flags = dict(migration_limit=3, router_mode="round-robin")
        if budget:
            flags.update(retry_budget=0.1)
        fe = c.start_frontend(**flags)
        if budget:
            st, _, b = bl.post_json(fe.url + "/admission", {"retry_budget_min": 2})
            assert st == 200 and b["retry_budget_min"] == 2 and b["retry_budget"] == 0.1, b
        c.start_worker(speedup_ratio=4)
        c.wait_workers(fe, 1)
        victim = c.start_worker(max_num_seqs=1, speedup_ratio=1)
        c.wait_workers(fe, 2)
        res = [None] * 20

        def one(i):
            res[i] = bl.stream_chat(fe.url, bl.chat_body(f"budget {i}", max_tokens=200, return_token_ids=True),
                                    timeout=120)

        ts = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in ts:
            t.start()
        # half went to the victim: one runs there, the others wait for its only slot
        bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_waiting_requests") >= 6, 20,
                    what="requests to wait on the victim")
        # and the one running there has produced a token (the healthy worker's 10 have their first tokens
        # at once), so that its re-route is a mid-stream migration and not one of the budget's retries
        bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_time_to_first_token_seconds_count")
                    >= 11, 20, what="the victim's running stream to produce a token")
        victim.proc.kill(signal.SIGKILL)
        for t in ts:
            t.join(120)
        m = bl.metrics(fe.url)
        allowed = bl.metric_sum(m, "baton_frontend_retry_budget_total", kind="new_request", decision="allowed")
        refused = bl.metric_sum(m, "baton_frontend_retry_budget_total", kind="new_request", decision="refused")
        failed = [s for s in res if not s.ok]
        for s in failed:
            assert s.error and "retry budget exhausted" in s.error["message"], s.summary()
        ok = [s for s in res if s.ok]
        for s in ok:
            assert len(s.token_ids) == 200, s.summary()
        return allowed, refused, len(ok), len(failed), bl.metric_sum(
            m, "dynamo_frontend_model_migration_total", migration_type="ongoing_request")


allowed, refused, ok, failed, ongoing = run(budget=True)
print(f"budget on: {allowed:.0f} re-routes allowed, {refused:.0f} refused; {ok} streams completed, {failed} failed; "
      f"{ongoing:.0f} mid-stream migrations")
assert allowed <= 2, f"the budget allowed {allowed} re-routes (cap: max(2, 0.1 x 20))"
assert refused >= 4 and failed == refused, (refused, failed)
assert ongoing >= 1, "the running stream did not migrate"
allowed, refused, ok, failed, ongoing = run(budget=False)
print(f"budget off: {allowed:.0f} allowed, {refused:.0f} refused; {ok} completed, {failed} failed")
assert refused == 0 and failed == 0 and ok == 20, (refused, failed, ok)
print("test_retry_budget: ok")
