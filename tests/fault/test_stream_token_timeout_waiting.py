"""--stream-token-timeout with the WAITING frame (docs/protocol.md): a worker tells the frontend which
of its streams its engine keeps waiting, and the frontend judges every other silent stream of it;
and a timed-out stream whose worker is the only one that can continue it goes back there.

Fake workers (tests/lib/fakeworker.py) answer with the mocker's own answer to the same request (the
reference, taken first through a frontend with a real mocker worker), token by token, so every
answer can be compared byte for byte. The frontends run at --stream-token-timeout 1.

  1. A worker that announces BT_HELLO_WAITING and reports waiting=3 in its LOAD for good holds three
     streams: one it answers slowly all along (the engine visibly runs), one it reports WAITING
     (preempted) and answers only after 3 times the bound, and one it never answers. The silent one is judged after the bound although the LOAD shows sequences
     waiting, gets its KILL, and completes exactly on a second worker; the waiting one is not
     judged (no KILL) and completes exactly, as does the slow one; the counters say one timeout, one new_request
     migration and one WAITING frame (preempted). Without the frame, the LOAD's waiting count hid
     the silent stream for good: its client gave up.
  2. The same LOAD from a worker that does not announce the flag (an older build): its silent
     stream is not judged for 3 times the bound (the whole-worker rule is kept for it), until its
     client gives up.
  3. The model's only worker sends 5 tokens of a stream, then nothing: the stream is given up
     after the bound, the worker is not quarantined, and the continuation goes back to it with the
     5 tokens carried; the client sees one exact stream (it got a 503 "no worker left to continue
     the request" before), and the next request is served.
  4. The model's only worker never answers, --migration-limit 1: both attempts go to it, each is
     given up after the bound, and the client gets the exhausted-migration 503 (the budget still
     bounds a worker that loses every stream)."""

import json
import time

import batonlib as bl
import fakeworker as fk

bl.deadline(180, "test_stream_token_timeout_waiting")

TIMEOUT = 1.0
MARGIN = 8.0
K = 5
MODEL = "mock-model"


def body():
    b = bl.chat_body("Streams that wait and streams that are lost", max_tokens=30, return_token_ids=True,
                     seed=99, temperature=0.7)
    b["stream"] = True
    b["stream_options"] = {"include_usage": True}
    return b


def counters(fe):
    m = bl.metrics(fe.url)
    return {"timeouts": bl.metric_sum(m, "baton_frontend_stream_token_timeouts_total", model=MODEL),
            "new": bl.metric_sum(m, "dynamo_frontend_model_migration_total", migration_type="new_request"),
            "ongoing": bl.metric_sum(m, "dynamo_frontend_model_migration_total", migration_type="ongoing_request"),
            "waits": bl.metric_sum(m, "baton_frontend_stream_waits_total", model=MODEL)}


def delta(after, before):
    return {k: after[k] - before[k] for k in after}


def stream(fe, rid, timeout=30):
    return fk.stream_async(fe, body(), rid, timeout)


with bl.Cluster() as c:
    c.start_worker(speedup_ratio=0.3)  # slow enough that the client sees one event per token, even on a busy machine
    fe_ref = c.start_frontend()
    c.wait_workers(fe_ref, 1)
    rp = fk.Replay(fe_ref, body(), K + 5)
    ref, events, answer = rp.outcome, rp.events, rp.answer

    fakes = []
    try:
        # --- 1. a worker that tells its waits and always reports sequences waiting
        d1 = bl.tmpdir("tw-waiting")

        def on_a(fw, stream_id, raw):
            payload = json.loads(raw)
            if payload["request_id"] == "tw-busy":  # what runs while tw-wait waits: 4.5 times the bound
                answer(fw.sender(), stream_id, payload, pace=4.5 * TIMEOUT / len(events))
            if payload["request_id"] == "tw-wait":
                if fw.frontend_flags() & fk.HELLO_WAITING:
                    fw.send(fk.waiting(stream_id, fk.WAIT_PREEMPTED))
                answer(fw.sender(), stream_id, payload, delay=3 * TIMEOUT)
            # tw-lost: nothing, ever

        fa = fk.FakeWorker(d1, on_a, hello_flags=fk.HELLO_WAITING, after_hello=fk.load(waiting=3, running=1))
        fakes.append(fa)
        fb = fk.FakeWorker(d1, lambda fw, s, raw: answer(fw.sender(), s, json.loads(raw)),
                           after_hello=fk.load(ready=False))  # routable only once told
        fakes.append(fb)
        fe1 = c.start_frontend(discovery_dir=d1, stream_token_timeout=TIMEOUT)
        c.wait_workers(fe1, 1)
        bl.wait_for(lambda: fb.handshaken() >= 1, 20, what="the frontend's handshake with the second worker")
        time.sleep(0.3)  # its LOAD (not ready) came in the same write as its HELLO
        before = counters(fe1)
        tb, bb = stream(fe1, "tw-busy")
        bl.wait_for(lambda: fa.request_of("tw-busy"), 10, what="tw-busy on the worker that tells its waits")
        tw, bw = stream(fe1, "tw-wait")
        bl.wait_for(lambda: fa.request_of("tw-wait"), 10, what="tw-wait on the worker that tells its waits")
        tl, blost = stream(fe1, "tw-lost")
        bl.wait_for(lambda: fa.request_of("tw-lost"), 10, what="tw-lost on the worker that tells its waits")
        fb.send(fk.load())  # ready: the silent stream's continuation can go there
        tl.join(40)
        tw.join(40)
        tb.join(40)
        lost, wait, busy = blost["s"], bw["s"], bb["s"]
        busy.assert_ok("the stream that runs while another waits")
        assert bl.stream_outcome(busy) == ref, f"{bl.stream_outcome(busy)} != reference {ref}"
        lost.assert_ok("the silent stream of a worker that reports sequences waiting")
        assert bl.stream_outcome(lost) == ref, f"{bl.stream_outcome(lost)} != reference {ref}"
        ttft = lost.t_first - lost.t_start
        assert TIMEOUT * 0.9 <= ttft < TIMEOUT + MARGIN, f"the silent stream's first token after {ttft:.2f} s"
        conn, sid, _ = fa.request_of("tw-lost")
        bl.wait_for(lambda: fa.control_for(conn, sid) == [fk.KILL], 10, what="the KILL for the silent stream")
        assert fb.request_of("tw-lost"), "the continuation did not go to the second worker"
        wait.assert_ok("the stream its worker reported waiting")
        assert bl.stream_outcome(wait) == ref, f"{bl.stream_outcome(wait)} != reference {ref}"
        wait_ttft = wait.t_first - wait.t_start
        assert wait_ttft >= 2.5 * TIMEOUT, f"the waiting stream's first token after {wait_ttft:.2f} s: no wait"
        conn, sid, _ = fa.request_of("tw-wait")
        assert fa.control_for(conn, sid) == [], f"the waiting stream was cut: {fa.control_for(conn, sid)}"
        assert not fb.request_of("tw-wait"), "the waiting stream migrated"
        d = delta(counters(fe1), before)
        assert d == {"timeouts": 1, "new": 1, "ongoing": 0, "waits": 1}, d
        m = bl.metrics(fe1.url)
        assert bl.metric_sum(m, "baton_frontend_stream_waits_total", model=MODEL, reason="preempted") == 1
        print(f"worker reporting waiting=3 for good: the silent stream judged after {ttft:.2f} s and completed "
              f"exactly elsewhere; the stream it reported WAITING completed exactly after {wait_ttft:.2f} s; {d}")

        # --- 2. the same LOAD from a worker without the flag: the whole-worker rule still holds
        d2 = bl.tmpdir("tw-old")
        fc = fk.FakeWorker(d2, fk.FakeWorker.silent, after_hello=fk.load(waiting=3, running=1))
        fakes.append(fc)
        fe2 = c.start_frontend(discovery_dir=d2, stream_token_timeout=TIMEOUT)
        c.wait_workers(fe2, 1)
        t_old = time.monotonic()
        s_old = bl.stream_chat(fe2.url, body(), timeout=3 * TIMEOUT, headers={"X-Request-Id": "tw-old"})
        assert s_old.timed_out and not s_old.token_ids and s_old.error is None, s_old.summary()
        assert time.monotonic() - t_old >= 3 * TIMEOUT * 0.9
        conn, sid, _ = fc.request_of("tw-old")
        assert counters(fe2)["timeouts"] == 0
        bl.wait_for(lambda: fc.control_for(conn, sid) == [fk.KILL], 10, what="the KILL once the client left")
        assert "no frame from worker" not in fe2.proc.log_text()
        print("a worker without BT_HELLO_WAITING reporting waiting=3: its silent stream not judged (older rule)")

        # --- 3. the model's only worker loses a stream after K tokens: the continuation goes back to it
        d3 = bl.tmpdir("tw-only")

        def on_d(fw, stream_id, raw):
            payload = json.loads(raw)
            if payload["request_id"] == "tw-only" and not payload.get("carried"):
                for ids, text in events[:K]:  # then nothing
                    fw.send(fk.tokens(stream_id, ids, text))
                return
            answer(fw.sender(), stream_id, payload)

        fd = fk.FakeWorker(d3, on_d, hello_flags=fk.HELLO_WAITING)
        fakes.append(fd)
        fe3 = c.start_frontend(discovery_dir=d3, stream_token_timeout=TIMEOUT)
        c.wait_workers(fe3, 1)
        before = counters(fe3)
        s = bl.stream_chat(fe3.url, body(), timeout=30, headers={"X-Request-Id": "tw-only"})
        s.assert_ok("the stream of the only worker, continued on it")
        assert bl.stream_outcome(s) == ref, f"{bl.stream_outcome(s)} != reference {ref}"
        gap = s.t_tokens[K] - s.t_tokens[K - 1]
        assert TIMEOUT * 0.9 <= gap < TIMEOUT + MARGIN, f"gap after token {K}: {gap:.2f} s"
        reqs = [(n, sid, json.loads(p)) for n, t, sid, p in list(fd.frames) if t == fk.REQUEST]
        mine = [(n, sid, p) for n, sid, p in reqs if p["request_id"] == "tw-only"]
        assert len(mine) == 2 and mine[1][2]["carried"] == ref["token_ids"][:K], mine
        bl.wait_for(lambda: fd.control_for(mine[0][0], mine[0][1]) == [fk.KILL], 10, what="the KILL (only worker)")
        assert fd.control_for(mine[1][0], mine[1][1]) == [], "the continuation was cut"
        d = delta(counters(fe3), before)
        assert d == {"timeouts": 1, "new": 0, "ongoing": 1, "waits": 0}, d
        log = fe3.proc.log_text()
        assert "no other worker can take its continuation" in log, "the return to the only worker was not logged"
        assert "quarantined until" not in log, [ln for ln in log.splitlines() if "quarantined until" in ln]
        st, _, b = bl.post_json(fe3.url + "/v1/chat/completions", bl.chat_body("after", max_tokens=30), timeout=30)
        assert st == 200, (st, b)
        print(f"the only worker lost a stream after {K} tokens ({gap:.2f} s gap): continued on it exactly; {d}")

        # --- 4. the only worker loses every stream: the budget ends the request
        d4 = bl.tmpdir("tw-only-silent")
        fsil = fk.FakeWorker(d4, fk.FakeWorker.silent, hello_flags=fk.HELLO_WAITING)
        fakes.append(fsil)
        fe4 = c.start_frontend(discovery_dir=d4, stream_token_timeout=TIMEOUT, migration_limit=1)
        c.wait_workers(fe4, 1)
        t0 = time.monotonic()
        unary = body()
        del unary["stream"], unary["stream_options"]
        st, _, b = bl.post_json(fe4.url + "/v1/chat/completions", unary, timeout=30,
                                headers={"X-Request-Id": "tw-exhausted"})
        took = time.monotonic() - t0
        assert st == 503 and b["error"]["code"] == "worker_unavailable", (st, b)
        assert "migration limit of 1 exhausted" in b["error"]["message"], b
        assert 2 * TIMEOUT * 0.9 <= took < 2 * TIMEOUT + MARGIN, took
        reqs = [(n, sid) for n, t, sid, p in list(fsil.frames)
                if t == fk.REQUEST and json.loads(p)["request_id"] == "tw-exhausted"]
        assert len(reqs) == 2, reqs
        for n, sid in reqs:
            bl.wait_for(lambda: fsil.control_for(n, sid) == [fk.KILL], 10, what="the KILL of each attempt")
        print(f"the only worker silent, --migration-limit 1: both attempts on it, 503 after {took:.2f} s")

        for f in (fe_ref, fe1, fe2, fe3, fe4):
            assert f.proc.alive(), "a frontend died"
    finally:
        for f in fakes:
            f.close()

print("test_stream_token_timeout_waiting: OK")
