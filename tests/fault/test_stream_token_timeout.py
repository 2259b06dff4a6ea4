"""--stream-token-timeout: a worker that keeps its request-plane connection alive (it answers every
PING, so --stream-stall-timeout never fires) but sends nothing for a stream no longer holds that
request until its client gives up.

A fake worker (tests/lib/fakeworker.py) registers beside a real mocker worker and answers the
frontend's HELLO and PINGs; for REQUESTs it either sends nothing at all, or the first tokens of the
mocker's own answer (what a worker that lost the stream half-way would have sent) and then nothing.
With the frontend at --stream-token-timeout 1 --threads 2:

  * a streamed request whose first attempt lands on the silent worker completes byte for byte as
    the same request run on the mocker alone (text, token ids, finish reason, usage); its first
    token comes no sooner than the timeout and well within timeout + margin; the silent worker got
    a KILL for that stream; baton_frontend_stream_token_timeouts_total and the new_request
    migration counter moved by one; one WARN line names the request, the worker and the timeout;
  * the same after 5 tokens from the fake worker: the continuation carries them (ongoing_request),
    the gap between the 5th and 6th token is at least the timeout, and the client sees one exact
    stream;
  * the same for a non-streamed request;
  * with the budget spent (a frontend on a discovery directory of two silent workers,
    --migration-limit 1): 503 worker_unavailable with "migration limit of 1 exhausted", as any
    exhausted migration ends, after one timeout on each worker (both got their KILL);
  * with the flag off (the default), a request on the silent worker is still waiting, with no KILL
    sent, after 4 times the would-be timeout; its client then gives up and the worker gets the KILL;
  * a pause of the frontend itself (SIGSTOP for 2.5 times the bound, mid-stream, the mocker alone)
    is not the workers' silence: every stream completes, none is given up.

Run against a frontend whose sweep does nothing, the first check fails (the request waits until
the client's bound); with the sweep counting the frontend's own pause, the last one does."""

import re
import signal
import threading
import time

import batonlib as bl
import fakeworker as fk

bl.deadline(240, "test_stream_token_timeout")

TIMEOUT = 1.0  # --stream-token-timeout in this test
MARGIN = 10.0  # what "within the timeout" allows on a loaded machine (the sweep adds at most 0.25 s)
K = 5  # tokens the half-silent worker sends before it goes quiet
MODEL = "mock-model"


def body(stream):
    b = bl.chat_body("Tell me about silent workers and the streams they lose", max_tokens=40,
                     return_token_ids=True, seed=4242, temperature=0.7)
    if stream:
        b["stream"] = True
        b["stream_options"] = {"include_usage": True}
    return b


outcome, unary_outcome = bl.stream_outcome, bl.unary_outcome


def counters(fe):
    m = bl.metrics(fe.url)
    return {"timeouts": bl.metric_sum(m, "baton_frontend_stream_token_timeouts_total", model=MODEL),
            "new": bl.metric_sum(m, "dynamo_frontend_model_migration_total", migration_type="new_request"),
            "ongoing": bl.metric_sum(m, "dynamo_frontend_model_migration_total", migration_type="ongoing_request"),
            "exhausted": bl.metric_sum(m, "dynamo_frontend_model_migration_exhausted_total")}


def delta(after, before):
    return {k: after[k] - before[k] for k in after}


def warn_lines(fe, rid):
    return [ln for ln in fe.proc.log_text().splitlines() if f"request {rid}: no frame from worker" in ln]


def check_warn(fe, rid, worker_id):
    lines = warn_lines(fe, rid)
    assert len(lines) == 1, f"{rid}: {len(lines)} timeout lines: {lines}"
    rx = (rf" WARN .*request {rid}: no frame from worker {worker_id:x} on stream \d+ for [0-9.]+ s "
          rf"\(--stream-token-timeout 1 s;")
    assert re.search(rx, lines[0]), lines[0]


with bl.Cluster() as c:
    # the references: the same requests on the mocker alone, and its first K tokens, event by
    # event: what the half-silent worker sends
    fe, ref, ref_u, first = fk.start_with_reference(c, body, K, stream_token_timeout=TIMEOUT, threads=2)
    assert len(ref["token_ids"]) > K + 5, ref

    behaviour = {"fn": fk.FakeWorker.silent}
    fw = fk.FakeWorker.joined(c, fe, lambda fw_, s, p: behaviour["fn"](fw_, s, p), 2)
    fa = fb = None
    try:
        # --- 1. silent from the start, streamed
        before = counters(fe)
        rid, s, (conn, stream), others = fw.first_routed(
            "tt", lambda rid: bl.stream_chat(fe.url, body(True), timeout=30, headers={"X-Request-Id": rid}))
        s.assert_ok(f"{rid}: the stream on the silent worker")
        assert outcome(s) == ref, f"{rid}: {outcome(s)} != reference {ref}"
        ttft = s.t_first - s.t_start
        assert TIMEOUT * 0.9 <= ttft < TIMEOUT + MARGIN, f"{rid}: first token after {ttft:.2f} s"
        for orid, o in others:
            o.assert_ok(orid)
            assert outcome(o) == ref, orid
        bl.wait_for(lambda: fw.control_for(conn, stream) == [fk.KILL], 10,
                    what=f"the silent worker's KILL for stream {stream} (got {fw.control_for(conn, stream)})")
        d = delta(counters(fe), before)
        assert d == {"timeouts": 1, "new": 1, "ongoing": 0, "exhausted": 0}, d
        check_warn(fe, rid, fw.instance_id)
        print(f"silent stream: completed exactly, first token after {ttft:.2f} s (timeout {TIMEOUT} s); "
              f"KILL received; counters {d}")

        # --- 2. K tokens, then silence, streamed: an ongoing migration
        def half(fw_, stream_, payload):
            for ids, text in first:
                fw_.send(fk.tokens(stream_, ids, text))

        behaviour["fn"] = half
        before = counters(fe)
        rid, s, (conn, stream), others = fw.first_routed(
            "tt", lambda rid: bl.stream_chat(fe.url, body(True), timeout=30, headers={"X-Request-Id": rid}))
        s.assert_ok(f"{rid}: the stream on the half-silent worker")
        assert outcome(s) == ref, f"{rid}: {outcome(s)} != reference {ref}"
        gap = s.t_tokens[K] - s.t_tokens[K - 1]
        assert TIMEOUT * 0.9 <= gap < TIMEOUT + MARGIN, f"{rid}: gap after token {K}: {gap:.2f} s"
        for orid, o in others:
            o.assert_ok(orid)
            assert outcome(o) == ref, orid
        bl.wait_for(lambda: fw.control_for(conn, stream) == [fk.KILL], 10, what="the KILL after the silence")
        d = delta(counters(fe), before)
        assert d == {"timeouts": 1, "new": 0, "ongoing": 1, "exhausted": 0}, d
        check_warn(fe, rid, fw.instance_id)
        print(f"half-silent stream: {K} tokens, {gap:.2f} s gap, then completed exactly; counters {d}")

        # --- 3. silent, not streamed
        behaviour["fn"] = fk.FakeWorker.silent
        before = counters(fe)
        t0 = time.monotonic()

        def unary(rid):
            st_, _, b_ = bl.post_json(fe.url + "/v1/chat/completions", body(False), timeout=30,
                                      headers={"X-Request-Id": rid})
            return st_, b_, time.monotonic()

        rid, (st, b, t1), (conn, stream), others = fw.first_routed("tt", unary)
        assert st == 200, (rid, st, b)
        assert unary_outcome(b) == ref_u, f"{rid}: {unary_outcome(b)} != reference {ref_u}"
        for orid, (ost, ob, _) in others:
            assert ost == 200 and unary_outcome(ob) == ref_u, (orid, ost, ob)
        bl.wait_for(lambda: fw.control_for(conn, stream) == [fk.KILL], 10, what="the KILL (unary)")
        d = delta(counters(fe), before)
        assert d == {"timeouts": 1, "new": 1, "ongoing": 0, "exhausted": 0}, d
        check_warn(fe, rid, fw.instance_id)
        print(f"silent unary request: answered exactly; counters {d}")

        # --- 4. the budget spent: two silent workers, --migration-limit 1
        d2 = bl.tmpdir("tt-silent-only")
        fa = fk.FakeWorker(d2, fk.FakeWorker.silent)
        fb = fk.FakeWorker(d2, fk.FakeWorker.silent)
        fe_ex = c.start_frontend(discovery_dir=d2, stream_token_timeout=TIMEOUT, migration_limit=1)
        c.wait_workers(fe_ex, 2)
        before = counters(fe_ex)
        rid = "tt-exhausted"
        t0 = time.monotonic()
        st, _, b = bl.post_json(fe_ex.url + "/v1/chat/completions", body(False), timeout=30,
                                headers={"X-Request-Id": rid})
        took = time.monotonic() - t0
        assert st == 503 and b["error"]["code"] == "worker_unavailable", (st, b)
        assert "migration limit of 1 exhausted" in b["error"]["message"], b
        assert "--stream-token-timeout" in b["error"]["message"], b
        assert 2 * TIMEOUT * 0.9 <= took < 2 * TIMEOUT + MARGIN, took
        for f in (fa, fb):
            got = f.request_of(rid)
            assert got, "each silent worker gets one attempt"
            bl.wait_for(lambda: f.control_for(got[0], got[1]) == [fk.KILL], 10, what="the KILL (exhausted)")
        d = delta(counters(fe_ex), before)
        assert d == {"timeouts": 2, "new": 2, "ongoing": 0, "exhausted": 1}, d
        print(f"two silent workers, --migration-limit 1: 503 after {took:.2f} s; counters {d}")

        # --- 5. the flag off (the default): the request waits for as long as its client does
        fe_off = c.start_frontend()
        c.wait_workers(fe_off, 2)
        before = counters(fe_off)
        for attempt in range(8):
            rid = f"tt-off-{attempt}"
            box = {}
            t = threading.Thread(target=lambda: box.setdefault(
                "s", bl.stream_chat(fe_off.url, body(True), timeout=5 * TIMEOUT, headers={"X-Request-Id": rid})))
            t.start()
            bl.wait_for(lambda: fw.request_of(rid) or not t.is_alive(), 10, what="the request routed")
            got = fw.request_of(rid)
            if not got:  # on the mocker
                t.join()
                box["s"].assert_ok(rid)
                assert outcome(box["s"]) == ref, rid
                continue
            conn, stream, _ = got
            time.sleep(4 * TIMEOUT)
            assert t.is_alive(), f"{rid} ended within 4x the would-be timeout: {box.get('s')}"
            assert fw.control_for(conn, stream) == [], fw.control_for(conn, stream)
            assert counters(fe_off)["timeouts"] == 0
            t.join()
            s = box["s"]
            assert s.timed_out and not s.token_ids and s.error is None, s.summary()
            bl.wait_for(lambda: fw.control_for(conn, stream) == [fk.KILL], 10,
                        what="the KILL once the client gave up")
            break
        else:
            raise AssertionError("8 requests and none was routed to the fake worker")
        d = delta(counters(fe_off), before)
        assert d == {"timeouts": 0, "new": 0, "ongoing": 0, "exhausted": 0}, d
        assert not warn_lines(fe_off, rid)
        print(f"flag off: {rid} still waiting after {4 * TIMEOUT:.0f} s, no KILL until its client left")

        # --- 6. a pause of the frontend itself is not its workers' silence: SIGSTOP for 2.5x the
        # bound while streams run on the mocker alone; their frames wait in the sockets and are read
        # after the first sweep that follows the pause, which must not give up on them
        fw.close()
        c.wait_workers(fe, 1)
        before = counters(fe)
        paused = threading.Event()

        def pause_once(s_, ev):
            if len(s_.token_ids) >= 3 and not paused.is_set():
                paused.set()
                fe.proc.kill(signal.SIGSTOP)
                time.sleep(2.5 * TIMEOUT)
                fe.proc.kill(signal.SIGCONT)
            return False

        pb = bl.chat_body("A pause of the frontend", max_tokens=120, return_token_ids=True, seed=7)
        res = bl.run_concurrently(
            lambda i: bl.stream_chat(fe.url, pb, timeout=60, on_event=pause_once if i == 0 else None), range(4))
        assert paused.is_set(), "the frontend was never stopped"
        for i, s in enumerate(res):
            s.assert_ok(f"paused stream {i}")
            assert s.token_ids == res[0].token_ids and len(s.token_ids) == 120, (i, len(s.token_ids))
        gap = max(b_ - a_ for a_, b_ in zip(res[0].t_tokens, res[0].t_tokens[1:]))
        assert gap >= 2.5 * TIMEOUT * 0.9, f"the pause did not show: largest gap {gap:.2f} s"
        d = delta(counters(fe), before)
        assert d == {"timeouts": 0, "new": 0, "ongoing": 0, "exhausted": 0}, d
        print(f"frontend stopped for {2.5 * TIMEOUT:.1f} s mid-stream (gap {gap:.2f} s): no stream timed out; "
              f"counters {d}")

        for f in (fe, fe_ex, fe_off):
            assert f.proc.alive(), "a frontend died"
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(False), timeout=30)
        assert st == 200, (st, b)
    finally:
        for f in (fw, fa, fb):
            if f:
                f.close()

print("test_stream_token_timeout: OK")
