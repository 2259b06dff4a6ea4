"""The retry budget against a fault that hits the whole fleet at once (src/frontend/budget.c).

Every worker serving the model (three, each running two sequences at a time, so that most of the
30 requests wait in their engines without a token) is killed at the same moment; three replacement
workers, started after every request was routed (they got none before the fault), take over.
Each stream that had received tokens moves mid-stream (its first migration: never a retry, never
refused); each that had not must be re-routed, which is a retry.

With --retry-budget 0.1 and a floor of 2, at most max(2, 0.1 x 30) = 3 retries may happen in the
10 s window. The kills are a few microseconds apart, so a stream's continuation can land on a
worker that dies next: that stream then moves a second time, a repeat migration, which is a retry
too. A stream "could have completed" when the budget never refused one of its retries (a first
mid-stream migration is never refused). The test asserts that every such stream completes with
the exact tokens of its reference (the same request run on the healthy fleet afterwards); that
every failed stream failed for the budget (named in its error), those without a token delivered
for a refused re-route and those with tokens for a refused repeat migration, one for one with the
refused counters; that the budget refused nothing while it had room (allowed retries equal the
bound whenever one was refused); and that no stream that had tokens at the fault failed unless a
repeat migration was refused.

The negative check: the same fault without the budget re-routes more requests than the budget's
bound (every waiting one) and all 30 complete; a budget that did nothing would fail the first run.
"""

import signal
import threading

import batonlib as bl

bl.deadline(280, "test_retry_budget_fleet")

N, TOKENS, FLEET = 30, 200, 3
BUDGET, FLOOR = 0.1, 2
BOUND = max(FLOOR, int(BUDGET * N))  # retries the budget allows for N requests started


def body(i):
    return bl.chat_body(f"fleet budget {i}", max_tokens=TOKENS, return_token_ids=True)


def run(budget):
    with bl.Cluster() as c:
        flags = dict(migration_limit=3, router_mode="round-robin")
        if budget:
            flags.update(retry_budget=BUDGET, retry_budget_min=FLOOR)
        fe = c.start_frontend(**flags)
        st, _, adm = bl.get_json(fe.url + "/admission")
        assert st == 200 and adm["retry_budget"] == (BUDGET if budget else 0), adm
        old = [c.start_worker(max_num_seqs=2, speedup_ratio=1) for _ in range(FLEET)]
        c.wait_workers(fe, FLEET)
        old_ids = {k.split('worker_id="')[1].split('"')[0]
                   for k in bl.metrics(fe.url) if k.startswith("baton_frontend_worker_routed_total")}
        res = [None] * N
        first_before_kill = [False] * N
        killed = threading.Event()

        def on_event(i, s):
            if s.t_first is not None and not killed.is_set():
                first_before_kill[i] = True
            return False

        def one(i):
            res[i] = bl.stream_chat(fe.url, body(i), timeout=150, on_event=lambda s, ev: on_event(i, s))

        ts = [threading.Thread(target=one, args=(i,)) for i in range(N)]
        for t in ts:
            t.start()
        # 10 per worker: 2 run, 8 wait in the engine without a token
        bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_waiting_requests") >= 20, 30,
                    what="requests to wait in the engines")
        bl.wait_for(lambda: sum(first_before_kill) >= 2 * FLEET, 30, what="the running streams' first tokens")
        # the replacements join after every request was routed: the fault hits all that serve
        new = [c.start_worker(speedup_ratio=4) for _ in range(FLEET)]
        c.wait_workers(fe, 2 * FLEET)
        m = bl.metrics(fe.url)
        new_ids = {k.split('worker_id="')[1].split('"')[0]
                   for k in m if k.startswith("baton_frontend_worker_routed_total")} - old_ids
        assert len(new_ids) == FLEET, new_ids
        for wid in new_ids:
            assert bl.metric_sum(m, "baton_frontend_worker_routed_total", worker_id=wid) == 0, \
                "a replacement got work before the fault"
        killed.set()
        for w in old:
            w.proc.kill(signal.SIGKILL)
        for w in old:
            w.proc.wait(10)
            assert not w.proc.alive(), "a worker survived SIGKILL"
        had_tokens = [first_before_kill[i] for i in range(N)]
        for t in ts:
            t.join(150)
        assert all(s is not None for s in res), "a client thread did not finish"
        m = bl.metrics(fe.url)

        def budget(kind, decision):
            return bl.metric_sum(m, "baton_frontend_retry_budget_total", kind=kind, decision=decision)

        out = dict(
            allowed_new=budget("new_request", "allowed"), refused_new=budget("new_request", "refused"),
            allowed_rep=budget("repeat_migration", "allowed"), refused_rep=budget("repeat_migration", "refused"),
            rerouted=bl.metric_sum(m, "dynamo_frontend_model_migration_total", migration_type="new_request"),
            ongoing=bl.metric_sum(m, "dynamo_frontend_model_migration_total", migration_type="ongoing_request"),
            to_new=sum(bl.metric_sum(m, "baton_frontend_worker_routed_total", worker_id=w) for w in new_ids),
        )
        out["allowed"] = out["allowed_new"] + out["allowed_rep"]
        out["refused"] = out["refused_new"] + out["refused_rep"]
        # references: the same requests on the healthy replacements
        refs = bl.run_concurrently(lambda i: bl.post_json(fe.url + "/v1/chat/completions", body(i), timeout=120),
                                   [(i,) for i in range(N)], max_workers=10)
        for i, (st, _, b) in enumerate(refs):
            assert st == 200, b
            refs[i] = b["choices"][0]["token_ids"]
            assert len(refs[i]) == TOKENS
        ok, failed = [], []
        for i, s in enumerate(res):
            (ok if s.ok else failed).append(i)
            if s.ok:
                assert s.token_ids == refs[i], f"stream {i} differs from its reference: {s.summary()}"
        for i in failed:
            s = res[i]
            assert s.error and "retry budget exhausted" in s.error["message"], f"stream {i}: {s.summary()}"
        out.update(ok=len(ok), failed=len(failed), with_tokens=sum(had_tokens),
                   failed_no_tokens=sum(1 for i in failed if not res[i].token_ids),
                   failed_tokens_before=sum(1 for i in failed if had_tokens[i]))
        return out


on = run(budget=True)
print(f"budget on: {on['with_tokens']} streams had tokens at the fault; {on['ongoing']:.0f} mid-stream moves, "
      f"{on['rerouted']:.0f} re-routes needed; retries allowed {on['allowed_new']:.0f} re-routes + "
      f"{on['allowed_rep']:.0f} repeat migrations, refused {on['refused_new']:.0f} + {on['refused_rep']:.0f}; "
      f"{on['ok']} completed, {on['failed']} failed (bound {BOUND})")
assert on["to_new"] > 0 and on["ongoing"] >= 2 * FLEET, "the fault did not move the streams"
assert on["allowed"] <= BOUND, f"the budget allowed {on['allowed']} retries (bound {BOUND})"
assert on["refused"] == 0 or on["allowed"] == BOUND, f"refused with room left: {on}"
# every re-route went through the budget: allowed or refused, none uncounted
assert on["allowed_new"] + on["refused_new"] == on["rerouted"], on
# no stream that could have completed failed: failures are the budget's refusals, one for one
assert on["failed"] == on["refused"] and on["ok"] == N - on["refused"], on
assert on["failed_no_tokens"] == on["refused_new"], on
assert on["failed"] - on["failed_no_tokens"] == on["refused_rep"], on
assert on["failed_tokens_before"] <= on["refused_rep"], "a stream with tokens failed without a refused repeat"

off = run(budget=False)
print(f"budget off: {off['rerouted']:.0f} re-routes, {off['ongoing']:.0f} mid-stream moves; {off['ok']} completed, "
      f"{off['failed']} failed")
assert off["failed"] == 0 and off["ok"] == N, off
assert off["rerouted"] > BOUND, f"without the budget only {off['rerouted']} re-routes: the fault proves nothing"
assert off["allowed"] == 0 and off["refused"] == 0
print("test_retry_budget_fleet: ok")
