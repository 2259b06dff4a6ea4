"""A broken or hostile worker on the request plane against the real frontend: the answers its
clients get stay within what they asked for and consistent with themselves.

A fake worker (tests/lib/fakeworker.py) registers in file discovery and answers REQUESTs with
frames of the test's choosing:

  * tokens past max_tokens: 30 one-token frames for max_tokens 5, then FINISH with usage 30. The
    client gets exactly the first 5 tokens and their text, streamed (one event per position, ids
    strictly increasing, then :5:end and :5:done) and whole; usage says 5; a replay of the
    journaled stream (the GET form) is the same 5 events. One WARN per request in the log.
  * a worker that ends every attempt with ERROR BT_ERR_MOVED (what a rebalance sends): 8 moves are
    free, later ones are charged to --migration-limit, so the request fails after 12 attempts
    (503 worker_unavailable, or an error event) instead of bouncing between the frontend and the
    worker for ever;
  * ERROR frames on stream 0 (2,000 of them): the frontend closes the connection at the first
    (docs/protocol.md §11) with one log line, reconnects and serves; it kept the connection and
    logged a WARN line per frame;
  * 5,000 first pieces of a KV state over the frontend's cap on one stream: refused, with one log
    line for the request (there was one per piece);
  * one frame of several ids across max_tokens (3 one-token frames, then one frame of 5 ids and
    one text, for max_tokens 6), with a real mocker worker beside the fake one: the frame's text
    cannot be cut per id, so none of it is written; the attempt fails as after a worker error (a
    WARN naming request and worker, the worker quarantined, an ongoing_request migration, a KILL
    for the stream), and the continuation on the mocker carries the 3 ids delivered. Streamed and
    whole, the client's answer equals the same request run on the mocker alone (text, ids, usage,
    finish reason) and holds no text of that frame;
  * frames the frontend never asked for: TOKENS for a stream it never opened (the next odd id, and
    0xffffffff) and TOKENS and a second FINISH after the FINISH: the answer is exactly what came
    before the first FINISH, and the frontend keeps serving.
"""

import re

import batonlib as bl
import fakeworker as fk

bl.deadline(240, "test_hostile_worker")

ID_RX = re.compile(r"^([0-9a-f]{32}):(\d+)(?::(end|usage|done|error))?$")


def overrun(fw, stream, payload):
    """30 tokens whatever max_tokens says, then a FINISH that counts them all."""
    for i in range(30):
        fw.send(fk.tokens(stream, [100 + i], f" t{i}"))
    fw.send(fk.finish(stream, fk.FINISH_LENGTH, 7, 30))


def strays(fw, stream, payload):
    """Two tokens, FINISH, then frames of no stream the frontend has open."""
    fw.send(fk.tokens(stream, [1], " a"))
    fw.send(fk.tokens(stream + 2, [9], " OTHER"))  # the next stream id, never opened
    fw.send(fk.tokens(0xFFFFFFFF, [9], " HIGH"))
    fw.send(fk.tokens(stream, [2], " b"))
    fw.send(fk.finish(stream, fk.FINISH_STOP, 7, 2))
    fw.send(fk.tokens(stream, [3], " AFTER"))  # after its FINISH
    fw.send(fk.finish(stream, fk.FINISH_LENGTH, 7, 3))


def always_moved(fw, stream, payload):
    """Every attempt ends at once with ERROR BT_ERR_MOVED (20), as a rebalance would end it, after a
    load report that shows the worker idle (so that it stays the frontend's choice for the next
    attempt: without reports, the estimates of the attempts routed to it would make it busy)."""
    fw.send(fk.load())
    fw.send(fk.error(stream, 20, "moved away"))


def kv_flood(fw, stream, payload):
    """5,000 first pieces of a KV state over the frontend's cap (2^32 bytes), then an answer."""
    fw.send(fk.kvstate(stream, 1 << 32, 0) * 5000)
    fw.send(fk.tokens(stream, [1], " a"))
    fw.send(fk.finish(stream, fk.FINISH_STOP, 7, 1))


def positions(s, what):
    """The stream's event ids as (position, mark); all of one stream id, which it returns too."""
    out, sids = [], set()
    for eid in s.event_ids:
        m = ID_RX.match(eid or "")
        assert m, f"{what}: malformed event id {eid!r}"
        sids.add(m.group(1))
        out.append((int(m.group(2)), m.group(3)))
    assert len(sids) == 1, f"{what}: stream ids {sids}"
    return sids.pop(), out


with bl.Cluster() as c:
    fe = c.start_frontend(stream_retention=60)
    behaviour = {"fn": overrun}
    fw = fk.FakeWorker(c.discovery_dir, lambda w, s, p: behaviour["fn"](w, s, p))
    try:
        fw.wait_connected()
        bl.wait_for(lambda: any(m["id"] == "mock-model" for m in bl.get_json(fe.url + "/v1/models")[2]["data"]),
                    20, what="the fake worker's model listed")
        want_ids = [100, 101, 102, 103, 104]
        want_text = " t0 t1 t2 t3 t4"

        # --- tokens past max_tokens, streamed
        body = bl.chat_body("overrun", max_tokens=5, stream=True, return_token_ids=True,
                            stream_options={"include_usage": True})
        s = bl.stream_chat(fe.url, body, timeout=20)
        s.assert_ok("overrun stream")
        assert s.token_ids == want_ids, f"token ids {s.token_ids}"
        assert s.text == want_text, f"text {s.text!r}"
        assert s.finish_reason == "length", s.finish_reason
        assert s.usage and s.usage["completion_tokens"] == 5 and s.usage["prompt_tokens"] == 7, s.usage
        sid, pos = positions(s, "overrun stream")
        assert pos == [(1, None), (2, None), (3, None), (4, None), (5, None), (5, "end"), (5, "usage"),
                       (5, "done")], f"event ids {s.event_ids}"

        # the journaled stream replays the same 5 events (GET form, from the start)
        r = bl.stream_sse(fe.url, f"/v1/chat/completions/{sid}", None, method="GET", timeout=20)
        r.assert_ok("replay")
        assert r.token_ids == want_ids and r.text == want_text, f"replay: {r.token_ids} {r.text!r}"
        assert r.event_ids == s.event_ids, f"replay ids {r.event_ids} vs {s.event_ids}"

        # --- the same, whole
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions",
                                bl.chat_body("overrun", max_tokens=5, return_token_ids=True), timeout=20)
        assert st == 200, (st, b)
        ch = b["choices"][0]
        assert ch["message"]["content"] == want_text, ch
        assert ch["token_ids"] == want_ids, ch
        assert b["usage"]["completion_tokens"] == 5 and b["usage"]["total_tokens"] == 12, b["usage"]
        warns = [ln for ln in fe.proc.log_text().splitlines() if "past max_tokens" in ln]
        assert len(warns) == 2 and all(" WARN " in ln for ln in warns), warns

        # --- frames for streams never opened, and after FINISH
        behaviour["fn"] = strays
        for _ in range(2):
            s = bl.stream_chat(fe.url, bl.chat_body("strays", max_tokens=50, stream=True, return_token_ids=True),
                               timeout=20)
            s.assert_ok("strays stream")
            assert s.token_ids == [1, 2] and s.text == " a b" and s.finish_reason == "stop", s.summary()
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions",
                                bl.chat_body("strays", max_tokens=50, return_token_ids=True), timeout=20)
        assert st == 200 and b["choices"][0]["message"]["content"] == " a b", (st, b)
        assert b["choices"][0]["token_ids"] == [1, 2] and b["usage"]["completion_tokens"] == 2, b

        # --- a worker that moves every attempt (BT_ERR_MOVED): 8 moves are free, then each is
        # charged to --migration-limit (3): 12 attempts, then the request fails; it used to bounce
        # for ever
        behaviour["fn"] = always_moved
        n0 = len(fw.requests)
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("moved", max_tokens=50), timeout=15)
        assert st == 503 and b["error"]["code"] == "worker_unavailable", (st, b)
        assert "migration limit of 3 exhausted" in b["error"]["message"], b
        assert len(fw.requests) - n0 == 12, f"{len(fw.requests) - n0} attempts"
        n0 = len(fw.requests)
        s = bl.stream_chat(fe.url, bl.chat_body("moved", max_tokens=50, stream=True), timeout=15)
        assert s.status == 503 and s.error and s.error["code"] == "worker_unavailable", s.summary()
        assert len(fw.requests) - n0 == 12, f"{len(fw.requests) - n0} attempts"
        # --- ERROR frames on stream 0 (the connection): the frontend closes the connection at the
        # first, as docs/protocol.md §11 says, logging one line; it reconnects and serves. It used
        # to keep the connection and log a WARN line per frame
        behaviour["fn"] = strays
        conns = fw.accepted
        fw.send(fk.error(0, 5, "broken " * 20) * 2000)
        bl.wait_for(lambda: fw.accepted > conns, 20, what="the frontend reconnected to the fake worker")
        bl.wait_for(lambda: any(m["id"] == "mock-model" for m in bl.get_json(fe.url + "/v1/models")[2]["data"]),
                    20, what="the fake worker's model listed again")
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions",
                                bl.chat_body("after", max_tokens=50, return_token_ids=True), timeout=20)
        assert st == 200 and b["choices"][0]["message"]["content"] == " a b", (st, b)
        lines = [ln for ln in fe.proc.log_text().splitlines() if "reports a connection error" in ln]
        assert len(lines) == 1 and "closing the connection" in lines[0], (len(lines), lines[:3])

        # --- KV states over the cap, 5,000 in a row on one stream: refused, logged once
        behaviour["fn"] = kv_flood
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("kv", max_tokens=50), timeout=20)
        assert st == 200 and b["choices"][0]["message"]["content"] == " a", (st, b)
        rid = b["id"].split("-", 1)[1]
        lines = [ln for ln in fe.proc.log_text().splitlines() if "not relayed" in ln and rid in ln]
        assert len(lines) == 1, (len(lines), lines[:3])

        assert fe.proc.alive(), "the frontend died"
        st, _, _ = bl.request("GET", fe.url + "/live")
        assert st == 200, st
    finally:
        fw.close()

# --- one frame of several ids across max_tokens, beside a real mocker worker
MT = 6  # max_tokens of these requests
OVERRUN_TEXT = " OVERRUN-FRAME"


def xbody(stream):
    b = bl.chat_body("Tell me about frames that cross their limit", max_tokens=MT, return_token_ids=True,
                     seed=777, temperature=0.7)
    if stream:
        b["stream"] = True
        b["stream_options"] = {"include_usage": True}
    return b


outcome, unary_outcome = bl.stream_outcome, bl.unary_outcome


with bl.Cluster() as c:
    fe, ref, ref_u, first = fk.start_with_reference(c, xbody, 3, migration_limit=3)
    assert len(ref["token_ids"]) == MT and ref["finish_reason"] == "length", ref

    def crossing(fw_, stream, payload):
        """The reference's first 3 events, then one frame of 5 ids across max_tokens."""
        for ids, text in first:
            fw_.send(fk.tokens(stream, ids, text))
        fw_.send(fk.tokens(stream, [900001, 900002, 900003, 900004, 900005], OVERRUN_TEXT))
        fw_.send(fk.finish(stream, fk.FINISH_LENGTH, 7, 8))

    fw = fk.FakeWorker.joined(c, fe, crossing, 2)
    try:
        def ongoing():
            return bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_model_migration_total",
                                 migration_type="ongoing_request")

        for mode in ("stream", "unary"):
            # the fake worker is quarantined after each violation: back in once it reconnected
            if mode != "stream":
                bl.wait_for(lambda: any(f"worker {fw.instance_id:x} (" in ln and "out of quarantine" in ln
                                        for ln in fe.proc.log_text().splitlines()), 20,
                            what="the fake worker out of quarantine")
            m0 = ongoing()
            if mode == "stream":
                rid, s, (conn, stream), others = fw.first_routed("cross", lambda rid: bl.stream_chat(
                    fe.url, xbody(True), timeout=30, headers={"X-Request-Id": rid}))
                s.assert_ok(f"{rid}: crossing frame, streamed")
                got, want = outcome(s), ref
                for orid, o in others:
                    assert outcome(o.assert_ok(orid)) == ref, orid
            else:
                def unary(rid):
                    st_, _, b_ = bl.post_json(fe.url + "/v1/chat/completions", xbody(False), timeout=30,
                                              headers={"X-Request-Id": rid})
                    assert st_ == 200, (rid, st_, b_)
                    return b_
                rid, b, (conn, stream), others = fw.first_routed("cross", unary)
                got, want = unary_outcome(b), ref_u
                for orid, ob in others:
                    assert unary_outcome(ob) == ref_u, orid
            assert OVERRUN_TEXT.strip() not in (got["text"] or ""), f"{rid} ({mode}): {got}"
            assert got == want, f"{rid} ({mode}): {got} != reference {want}"
            # the continuation went to the mocker carrying the 3 ids delivered before the frame
            assert fw.control_for(conn, stream)[:1] == [fk.KILL], fw.control_for(conn, stream)
            assert ongoing() - m0 == 1, f"{rid}: ongoing migrations moved by {ongoing() - m0}"
            log = fe.proc.log_text().splitlines()
            warns = [ln for ln in log if f"request {rid}: worker {fw.instance_id:x} sent one frame of 5 tokens "
                     f"across max_tokens {MT}" in ln]
            assert len(warns) == 1 and " WARN " in warns[0], warns
            assert any(f"worker {fw.instance_id:x}" in ln and "quarantined" in ln for ln in log), "no quarantine"
            print(f"crossing frame ({mode}): answer equals the reference; KILL, migration, WARN seen")
        assert fe.proc.alive(), "the frontend died"
    finally:
        fw.close()

print("test_hostile_worker: OK")
