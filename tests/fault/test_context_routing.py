"""New requests across workers of different context lengths (a mixed fleet), through the real
binaries: one mocker worker with --context-length 512 (S), one with 4096 (L), one model.

The frontend refused, before routing, a request that did not fit the smallest context among the
model's workers, though a larger worker could serve it. Now it checks against the largest and
routes the request only to a worker whose card holds it:

  * a prompt of 1,000 token ids fits only L: 200, served by L (S's engine never sees it), under
    every --router-mode;
  * the same prompt as text, which the frontend cannot count (the mocker's card bounds no token's
    length): S refuses it for its context, and the frontend goes on to L (not charged as a
    migration); 200, served by L;
  * larger than both (5,000 ids, or max_tokens 5,000, or 5,000 words of text): 400
    context_length_exceeded naming L's 4,096;
  * with the admission queue on and L busy: the request waits for L (S, free, cannot hold it),
    admitted once, not spinning between the queue and routing; L killed while it waits: 400
    context_length_exceeded, and the stream on L ends with a clear error, not a wrong or truncated
    answer;
  * both busy, S running a less urgent stream than L: an urgent request that fits only L is routed
    past the busy verdict to L, which preempts for it, never to S;
  * L killed (kill -9) mid-stream with only S left: a clear context_length_exceeded error event,
    the text so far an exact prefix of the undisturbed answer.
"""

import threading
import time

import batonlib as bl
from test_migration import check_clean_error, kill9, outcome_of_stream

bl.deadline(240, "test_context_routing")

SMALL, LARGE = 512, 4096
IDS = [(i * 7919) % 997 + 3 for i in range(1000)]
TEXT = " ".join(f"w{(i * 7919) % 997}" for i in range(1000))
MAX_TOKENS = 40


def ids_body(prompt=IDS, max_tokens=MAX_TOKENS, **kw):
    return dict({"model": "mock-model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, **kw)


def text_body(prompt=TEXT, max_tokens=MAX_TOKENS, **kw):
    return ids_body(prompt, max_tokens, **kw)


def submits(w):
    return bl.metric_sum(bl.metrics(w.system_url, timeout=5), "baton_worker_engine_submits_total")


def fleet(c, speedup=(100, 100), **fe_flags):
    fe = c.start_frontend(**fe_flags)
    s = c.start_worker(system_port=True, wait=True, context_length=SMALL, speedup_ratio=speedup[0])
    big = c.start_worker(system_port=True, wait=True, context_length=LARGE, speedup_ratio=speedup[1])
    c.wait_workers(fe, 2)
    return fe, s, big


def post(fe, body):
    return bl.post_json(fe.url + "/v1/completions", body, timeout=30)


def too_large(fe, body, what):
    st, _, b = post(fe, body)
    assert st == 400, (what, st, b)
    err = b["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt", (what, err)
    assert f"maximum context length is {LARGE} tokens" in err["message"], (what, err)


def served_by_larger():
    for mode in ("round-robin", "random", "least-loaded"):
        with bl.Cluster() as c:
            fe, s, big = fleet(c, router_mode=mode)
            n = 0
            for kind, body in (("ids", ids_body()), ("text", text_body())):
                for i in range(4):
                    st, _, b = post(fe, body)
                    assert st == 200, (mode, kind, i, st, b)
                    assert b["usage"]["prompt_tokens"] >= 1000 and b["usage"]["completion_tokens"] == MAX_TOKENS, b
                    n += 1
                stream = bl.stream_completion(fe.url, dict(body, stream=True), timeout=30)
                stream.assert_ok(f"{mode} {kind} stream")
                n += 1
            assert submits(big) == n and submits(s) == 0, (mode, submits(big), submits(s))
            log = fe.proc.log_text()
            if mode == "round-robin":  # one of two text requests in a row is offered to S first
                assert "refused it for its context length" in log and "trying a worker of a larger context" in log
            migrated = bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_model_migration_total")
            assert migrated == 0, f"{mode}: S's refusal counted as {migrated:.0f} migrations"
            # larger than both: refused before routing, naming the largest context
            too_large(fe, ids_body(prompt=IDS * 5), f"{mode}: 5,000 ids")
            too_large(fe, ids_body(max_tokens=5000), f"{mode}: max_tokens 5,000")
            # text the frontend cannot count: S refuses, then L, whose words the client gets
            too_large(fe, text_body(prompt=" ".join([TEXT] * 5)), f"{mode}: 5,000 words")
            # a request that fits S still goes anywhere (both engines take it)
            for _ in range(4):
                st, _, b = post(fe, ids_body(prompt=IDS[:100]))
                assert st == 200, b
            print(f"{mode}: {n} requests that fit only L served by L; S took "
                  f"{submits(s):.0f} of 4 small ones; larger than both: 400")


def queue_waits_for_larger():
    with bl.Cluster() as c:
        fe, s, big = fleet(c, speedup=(1, 0.5), queue_max_requests=10, queue_timeout=30,
                           active_decode_blocks_threshold=0.0, migration_limit=3)

        def admissions(decision):
            return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_admission_total", decision=decision)

        res = {}

        def run(k, body):
            res[k] = bl.stream_completion(fe.url, dict(body, stream=True), timeout=60)

        t1 = threading.Thread(target=run, args=(1, ids_body(max_tokens=400)))
        t1.start()
        bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_inflight_requests") >= 1, 10,
                    what="the first stream to run on L")
        time.sleep(0.5)  # L's load report shows it busy
        t2 = threading.Thread(target=run, args=(2, ids_body()))
        t2.start()
        bl.wait_for(lambda: admissions("queued") >= 1, 10, what="the second request to queue behind L")
        time.sleep(2)
        admitted = admissions("admitted")
        assert admitted <= 2, f"{admitted:.0f} admissions for 2 requests while one waited for L"
        assert t2.is_alive() and submits(s) == 0, "the second request left the queue for S"
        kill9(big)  # no worker left can hold either
        t1.join(30)
        t2.join(30)
        first = res.get(1)
        assert first is not None and first.error and first.error["code"] == "context_length_exceeded", \
            first and first.summary()
        assert not first.done and "no worker left can hold this request" in first.error["message"], first.error
        second = res.get(2)
        assert second is not None and second.status == 400, second and second.summary()
        assert f"This model's maximum context length is {SMALL} tokens (the largest among its live workers)" \
            in second.error["message"], second.error
        # nothing was delivered: the client's request is too large, which is not worth a WARN
        warns = [ln for ln in fe.proc.log_text().splitlines() if " WARN " in ln and "maximum context length" in ln]
        assert not warns, f"a WARN for a client's request: {warns}"
        assert admissions("admitted") <= 2 and submits(s) == 0
        print(f"queue: the request waited for L ({admitted:.0f} admissions); L killed: "
              f"{second.status} {second.error['message'][:120]}")


KILLED = (("ids", ids_body(max_tokens=300, return_token_ids=True)),
          ("text", text_body(max_tokens=300, return_token_ids=True)))


def killed_mid_stream():
    refs = {}
    with bl.Cluster() as c:
        fe, _, _ = fleet(c)
        for kind, body in KILLED:
            refs[kind] = outcome_of_stream(
                bl.stream_completion(fe.url, dict(body, stream=True), timeout=30).assert_ok(f"reference {kind}"))
    with bl.Cluster() as c:
        fe, s, big = fleet(c, speedup=(100, 0.3), migration_limit=3)
        runs, n = {}, {}

        def run(kind, body):
            def on_event(st, ev):
                n[kind] = len(st.token_ids)
                return False

            runs[kind] = bl.stream_completion(fe.url, dict(body, stream=True), timeout=60, on_event=on_event)

        got = {}
        ts = []
        for kind, body in KILLED:
            t = threading.Thread(target=run, args=(kind, body))
            t.start()
            ts.append(t)
        bl.wait_for(lambda: all(n.get(kind, 0) >= 20 for kind, _ in KILLED), 30, 0.02, "both streams' tokens on L")
        kill9(big)
        for t in ts:
            t.join(60)
        for kind in ("ids", "text"):
            got[kind] = outcome_of_stream(runs[kind])
            problems = check_clean_error(got[kind], refs[kind], True)
            assert not problems, f"{kind}: {problems}: {got[kind]['error']}"
            err = got[kind]["error"]
            assert err["code"] == "context_length_exceeded", err
            assert "no worker left can hold this request" in err["message"], err
            assert 20 <= len(got[kind]["token_ids"]) < 300, got[kind]["token_ids"]
            print(f"{kind}: L killed mid-stream, S left: {err['message'][:140]}")
        assert submits(s) == 0


def preempts_on_larger():
    """Both workers busy (one sequence at a time), L running priority 5 and S priority 10: an urgent
    request that fits only L is routed past the busy verdict to L, which preempts for it, not to S,
    whose victim is less urgent but whose context cannot hold it."""
    with bl.Cluster() as c:
        fe = c.start_frontend(active_decode_blocks_threshold=0.0, queue_max_requests=64, queue_timeout=60)
        s = c.start_worker(system_port=True, wait=True, context_length=SMALL, max_num_seqs=1, speedup_ratio=1)
        big = c.start_worker(system_port=True, wait=True, context_length=LARGE, max_num_seqs=1, speedup_ratio=1)
        c.wait_workers(fe, 2)
        res, ts = {}, []

        def start(name, body):
            ev = threading.Event()

            def on_event(st, e):
                if st.t_first is not None:
                    ev.set()
                return False

            def run():
                res[name] = bl.stream_completion(fe.url, dict(body, stream=True), timeout=60, on_event=on_event)
            ts.append(threading.Thread(target=run))
            ts[-1].start()
            assert ev.wait(20), f"the {name} request got no first token"

        start("mid", ids_body(max_tokens=300, priority=5))  # only L holds it
        start("bulk", ids_body(prompt=IDS[:50], max_tokens=300, priority=10))  # L is busy: S
        time.sleep(0.3)  # both decoding: each worker's report offers its running sequence as a victim
        urgent = bl.stream_completion(fe.url, ids_body(max_tokens=8, priority=0, stream=True), timeout=30)
        for t in ts:
            t.join(60)
        urgent.assert_ok("the urgent request")
        for name in ("mid", "bulk"):
            res[name].assert_ok(f"the {name} stream")
        assert urgent.t_first < res["mid"].t_end, "the urgent request waited for L's stream to end"
        routed = bl.metric_sum(bl.metrics(fe.url), "baton_frontend_preempt_routed_total")
        p_s, p_big = (bl.metric_sum(bl.metrics(w.system_url), "baton_worker_preemptions_total", reason="priority")
                      for w in (s, big))
        assert "refused it for its context length" not in fe.proc.log_text(), "the urgent request went to S first"
        assert routed == 1 and p_big == 1 and p_s == 0, (routed, p_big, p_s)
        print(f"preemption: the urgent request went to L past its busy verdict (TTFT "
              f"{urgent.t_first - urgent.t_start:.3f}s); preemptions: L {p_big:.0f}, S {p_s:.0f}")


served_by_larger()
queue_waits_for_larger()
preempts_on_larger()
killed_mid_stream()
print("test_context_routing: ok")
