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
  * frames the frontend never asked for: TOKENS for a stream it never opened (the next odd id, and
    0xffffffff) and TOKENS and a second FINISH after the FINISH: the answer is exactly what came
    before the first FINISH, and the frontend keeps serving.
"""

import re

import batonlib as bl
import fakeworker as fk

bl.deadline(120, "test_hostile_worker")

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

print("test_hostile_worker: OK")
