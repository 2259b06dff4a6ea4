"""A stream's priority survives a resume and a migration (src/frontend/resume.c, journal.c,
admit.c fe_admit_resume; docs/load-shedding.md, "Priority").

The worker (--max-num-seqs 1) runs one sequence at a time and admits its waiting ones by
(priority, arrival), so the order in which waiting requests get their first token shows the
priority each carried.

1. Resume: stream S asks for priority 10 with the X-Priority header (not in its body: only the
   journal can remember it) and is cut after a few events. A priority-0 blocker then runs on the
   worker, three priority-5 requests wait behind it, and S is resumed (re-POST with Last-Event-ID,
   no X-Priority) while they wait. S continues only after all three: it kept priority 10. At the
   default priority 0, which a resume used to get, it would overtake them.
2. Migration: S (X-Priority 10) runs alone on worker A; worker B runs a priority-0 blocker with
   three priority-5 requests waiting. A is killed: S's continuation waits on B behind all three.
3. A resume on another frontend: two frontends share the journal through NATS JetStream; S is
   cut on the first and resumed on the second, which fetches its record (with the priority) from
   JetStream; the order is checked as in 1.

Both resumed and migrated answers are exact (equal to the same request run undisturbed).
"""

import os
import signal
import threading

import batonlib as bl
import natslib

bl.deadline(200, "test_priority_resume")

S_TOKENS, BLOCK_TOKENS, P5_TOKENS = 60, 300, 20


def s_body():
    return bl.chat_body("priority survives", max_tokens=S_TOKENS, return_token_ids=True)


def start(fn, *a):
    t = threading.Thread(target=fn, args=a)
    t.start()
    return t


def waiting(fe):
    return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_waiting_requests")


def blocker_and_p5(fe, res):
    """Starts the priority-0 blocker, then (once it streams) three priority-5 requests."""
    ts = [start(lambda: res.__setitem__("block", bl.stream_chat(
        fe.url, bl.chat_body("blocker", max_tokens=BLOCK_TOKENS, priority=0), timeout=120)))]
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_inflight_requests") >= 1 and
                waiting(fe) == 0, 10, what="the blocker to run")
    for k in range(3):
        ts.append(start(lambda k=k: res.__setitem__(f"p5-{k}", bl.stream_chat(
            fe.url, bl.chat_body(f"p5 {k}", max_tokens=P5_TOKENS, priority=5), timeout=120))))
    bl.wait_for(lambda: waiting(fe) >= 3, 10, what="the priority-5 requests to wait on the worker")
    return ts


def check_order(res, s_first, what):
    for k, s in res.items():
        s.assert_ok(k)
    assert res["block"].t_end is not None
    p5_first = [res[f"p5-{k}"].t_first for k in range(3)]
    print(f"{what}: S continued {s_first - max(p5_first):.2f} s after the last priority-5 request's first token")
    assert s_first > max(p5_first), f"{what}: S (priority 10) overtook a priority-5 request"


def cut_and_resume(fe_cut, fe_resume, what):
    """A priority-10 stream cut after 3 events on fe_cut, resumed without the header on fe_resume
    behind a blocker and three priority-5 requests: byte-exact, and only after them."""
    st, _, ref = bl.post_json(fe_cut.url + "/v1/chat/completions", s_body(), headers={"X-Priority": "10"})
    assert st == 200, ref
    ref = ref["choices"][0]["token_ids"]
    cut = bl.stream_chat(fe_cut.url, s_body(), abort_after=3, headers={"X-Priority": "10"}, timeout=60)
    assert cut.aborted and cut.last_event_id and 0 < len(cut.token_ids) < S_TOKENS, cut.summary()
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe_cut.url), "dynamo_frontend_inflight_requests") == 0, 10,
                what="the cut stream to end")
    res = {}
    ts = blocker_and_p5(fe_resume, res)
    resumed = {}
    ts.append(start(lambda: resumed.__setitem__("s", bl.stream_chat(
        fe_resume.url, s_body(), headers={"Last-Event-ID": cut.last_event_id}, timeout=120))))
    bl.wait_for(lambda: waiting(fe_resume) >= 4, 10, what="the resumed stream to wait on the worker")
    assert "block" not in res, "the blocker ended before everything waited: nothing was ordered"
    for t in ts:
        t.join(120)
    r = resumed["s"]
    r.assert_ok(f"the stream of the {what}")
    assert cut.token_ids + r.token_ids == ref, "the resumed answer differs from its reference"
    check_order(res, r.t_first, what)


# 1. a resume
with bl.Cluster() as c:
    fe = c.start_frontend()
    c.start_worker(max_num_seqs=1, speedup_ratio=1)
    c.wait_workers(fe, 1)
    cut_and_resume(fe, fe, "resume")
    m = bl.metrics(fe.url)
    assert bl.metric_sum(m, "baton_frontend_stream_resumes_total", outcome="continued") == 1

# 2. a migration
with bl.Cluster() as c:
    # least-loaded: S goes to the worker that holds nothing
    fe = c.start_frontend(migration_limit=2, router_mode="least-loaded")
    b = c.start_worker(max_num_seqs=1, speedup_ratio=1)
    c.wait_workers(fe, 1)
    st, _, ref = bl.post_json(fe.url + "/v1/chat/completions", s_body(), headers={"X-Priority": "10"})
    assert st == 200, ref
    ref = ref["choices"][0]["token_ids"]
    res = {}
    ts = blocker_and_p5(fe, res)  # all on B, the only worker
    a = c.start_worker(max_num_seqs=1, speedup_ratio=0.5)
    c.wait_workers(fe, 2)
    moved = {}
    tok = threading.Event()
    ts.append(start(lambda: moved.__setitem__("s", bl.stream_chat(
        fe.url, s_body(), headers={"X-Priority": "10"}, timeout=120,
        on_event=lambda st, ev: bool(st.token_ids and tok.set())))))
    assert tok.wait(20), "S never started"
    assert waiting(fe) == 3, "S did not run alone on the new worker"
    a.proc.kill(signal.SIGKILL)
    bl.wait_for(lambda: waiting(fe) >= 4, 10, what="S's continuation to wait on the other worker")
    assert "block" not in res, "the blocker ended before everything waited: nothing was ordered"
    for t in ts:
        t.join(120)
    r = moved["s"]
    r.assert_ok("the migrated stream")
    assert r.token_ids == ref, "the migrated answer differs from its reference"
    m = bl.metrics(fe.url)
    assert bl.metric_sum(m, "dynamo_frontend_model_migration_total", migration_type="ongoing_request") == 1
    # S's first token after the migration: the first one that came after the kill
    i = next(k for k, t in enumerate(r.t_tokens) if k and t - r.t_tokens[k - 1] > 0.3)
    check_order(res, r.t_tokens[i], "migration")
# 3. a resume on another frontend, through the JetStream journal
with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}',
                              name="nats-js").start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    fe1, fe2 = c.start_frontend(**plane), c.start_frontend(**plane)
    for fe in (fe1, fe2):
        fe.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
    c.start_worker(max_num_seqs=1, speedup_ratio=1, **plane)
    for fe in (fe1, fe2):
        c.wait_workers(fe, 1)
    cut_and_resume(fe1, fe2, "resume on another frontend")
    assert fe2.proc.wait_log(r"stream [0-9a-f]{32} fetched from JetStream", timeout=1)
print("test_priority_resume: ok")
