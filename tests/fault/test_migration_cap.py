"""Migrations past --migration-concurrency wait for a slot and never fail
(src/frontend/admit.c, fe_admit_migration_hold): a worker dies holding about ten running streams;
with a cap of 2 the frontend sends at most two continuations at a time (the gauge, sampled, never
shows more), the others wait (counted, and logged one line each), and every stream completes
byte-identical to its reference. The cap is read and changed through /admission.
"""

import signal
import threading
import time

import batonlib as bl

bl.deadline(200, "test_migration_cap")

N, PROMPTS, TOKENS = 20, 5, 200


def body(i):
    return bl.chat_body(f"migrate cap {i % PROMPTS}", max_tokens=TOKENS, return_token_ids=True)


with bl.Cluster() as c:
    fe = c.start_frontend(migration_limit=3, migration_concurrency=2, router_mode="round-robin")
    c.start_worker(speedup_ratio=2)
    c.wait_workers(fe, 1)
    refs = {}
    for i in range(PROMPTS):
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(i))
        assert st == 200, b
        refs[i] = b["choices"][0]["token_ids"]
    victim = c.start_worker(speedup_ratio=2)
    c.wait_workers(fe, 2)
    st, _, adm = bl.get_json(fe.url + "/admission")
    assert st == 200 and adm["migration_concurrency"] == 2, adm

    res = [None] * N
    started = [threading.Event() for _ in range(N)]

    def one(i):
        res[i] = bl.stream_chat(fe.url, body(i), timeout=120,
                                on_event=lambda s, ev: started[i].set() and False)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(N)]
    for t in ts:
        t.start()
    for e in started:
        assert e.wait(30), "a stream never started"
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            m = bl.metrics(fe.url)
            peak[0] = max(peak[0], bl.metric_sum(m, "baton_frontend_migrations_in_flight"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    victim.proc.kill(signal.SIGKILL)
    for t in ts:
        t.join(120)
    stop.set()
    sampler.join()
    for i, s in enumerate(res):
        s.assert_ok("a migrated stream")
        assert s.token_ids == refs[i % PROMPTS], f"stream {i} differs from its reference"
    m = bl.metrics(fe.url)
    moved = bl.metric_sum(m, "dynamo_frontend_model_migration_total", migration_type="ongoing_request")
    waited = bl.metric_sum(m, "baton_frontend_migrations_waited_total")
    logged = len([ln for ln in fe.proc.log_text().splitlines() if "migration waits for a slot" in ln])
    print(f"migration cap: {moved:.0f} streams migrated, {waited:.0f} waited for a slot, peak in flight "
          f"{peak[0]:.0f} (sampled)")
    assert moved >= 5, f"only {moved} streams were on the victim"
    assert waited >= moved - 2, (waited, moved)
    assert logged == waited, (logged, waited)
    assert peak[0] <= 2, f"{peak[0]} migrations in flight with a cap of 2"
    assert bl.metric_sum(m, "baton_frontend_migrations_in_flight") == 0
    assert bl.metric_sum(m, "baton_frontend_migrations_waiting") == 0
    # runtime control: the cap is changed through /admission (0 = no cap)
    st, _, adm = bl.post_json(fe.url + "/admission", {"migration_concurrency": 0})
    assert st == 200 and adm["migration_concurrency"] == 0, adm
    st, _, adm = bl.post_json(fe.url + "/admission", {"migration_concurrency": -1})
    assert st == 400, adm
print("test_migration_cap: ok")
