"""Resumable streams with `baton run`'s defaults (docs/fault-tolerance.md, "Resumable streams"):
no flag about streams or journals is given, and a client that loses its connection gets exactly
the rest of its answer.

1. A reference: the uncut answer of a chat request (token ids asked for).
2. The same request, cut by its client after 5 events: the events carry ids "<stream id>:<n>"
   (the stream id also in X-Stream-Id); the cut kills the request on the engine (the frontend
   logs the disconnect); a re-POST of the same body with Last-Event-ID gets the rest, continued by
   migration from the journal's tokens, and the two pieces put together equal the reference
   (text, token ids, finish reason) and end with [DONE]; so do they for the body written with
   `"max_tokens": 120.0` (an integral number, read as 120 by the first POST and the re-POST alike).
   A real-valued parameter is compared by value: a stream started with `"temperature": 1.0,
   "top_p": 0.5` resumes from a re-POST that writes them `1` and `5e-1`, and again (replayed from
   the journal) from one that writes `10E-1` and `0.50`; a re-POST with `"temperature": 0.5` is
   another request (400). Integers stay exact: a stream with seed 2^53+1 is not resumed by a
   re-POST with seed 2^53 or with `9007199254740993.0` (a real, read as 2^53).
3. The finished stream is kept after its end: the GET form from position 0 replays the whole
   answer, equal to the reference, and resuming at [DONE] answers 204.
4. `baton run --stream-retention 0` (forwarded to its frontend) turns it off: no ids, and a resume
   is 404 (never a fresh generation).
"""

import json
import re

import batonlib as bl

bl.deadline(120, "test_run_resume")

ID_RX = re.compile(r"^([0-9a-f]{32}):(\d+)$")
BODY = bl.chat_body("a story to resume", max_tokens=120, return_token_ids=True)


def check_same(pieces, ref, what):
    text = "".join(p.text for p in pieces)
    ids = [t for p in pieces for t in p.token_ids]
    assert not [p.error for p in pieces if p.error], f"{what}: errors {[p.error for p in pieces]}"
    assert pieces[-1].done, f"{what}: no [DONE] at the end"
    assert ids == ref.token_ids, f"{what}: {len(ids)} token ids vs {len(ref.token_ids)}"
    assert text == ref.text, f"{what}: text differs"
    assert pieces[-1].finish_reason == ref.finish_reason, f"{what}: finish_reason {pieces[-1].finish_reason!r}"


with bl.Cluster() as c:
    fe = c.start_run(workers=1, speedup_ratio=1)
    c.wait_workers(fe, 1)
    ref = bl.stream_chat(fe.url, BODY).assert_ok("the reference")
    assert len(ref.token_ids) == 120, ref.summary()

    cut = bl.stream_chat(fe.url, BODY, abort_after=5)
    assert cut.aborted and not cut.done, f"the stream was not cut: {cut.summary()}"
    m = ID_RX.match(cut.last_event_id or "")
    assert m, f"no event id with baton run's defaults: {cut.event_ids}"
    assert cut.headers.get("x-stream-id") == m.group(1), cut.headers
    assert int(m.group(2)) == len(cut.token_ids), f"id {cut.last_event_id} after {len(cut.token_ids)} tokens"
    fe.proc.wait_log(r"client disconnected after \d+ tokens \(streaming.*killing it", timeout=5)
    rest = bl.stream_chat(fe.url, BODY, headers={"Last-Event-ID": cut.last_event_id})
    check_same([cut, rest], ref, "cut and resumed")
    fe.proc.wait_log(r"stream [0-9a-f]{32} resumed after \d+ journaled tokens; continuing it", timeout=5)

    whole = bl.stream_sse(fe.url, f"/v1/chat/completions/{m.group(1)}?stream=true", None, method="GET")
    check_same([whole], ref, "GET replay of the finished stream")
    done = bl.stream_chat(fe.url, BODY, headers={"Last-Event-ID": f"{m.group(1)}:120:done"})
    assert done.status == 204, f"resume at [DONE]: {done.status}"

    # max_tokens written 120.0 is 120 (an integral number): the re-POST of that same body matches
    # the stream it started, and both pieces equal the reference
    real = dict(BODY, max_tokens=120.0)
    cut = bl.stream_chat(fe.url, real, abort_after=5)
    assert cut.aborted and cut.last_event_id, cut.summary()
    rest = bl.stream_chat(fe.url, real, headers={"Last-Event-ID": cut.last_event_id})
    check_same([cut, rest], ref, "max_tokens 120.0, cut and resumed")

    # numbers compared by value: the same request, whichever way its numbers are written
    temp = dict(BODY, temperature=1.0, top_p=0.5, stream=True)
    ref_t = bl.stream_chat(fe.url, temp).assert_ok("the reference with temperature 1.0")
    cut = bl.stream_chat(fe.url, temp, abort_after=5)
    assert cut.aborted and cut.last_event_id, cut.summary()
    text = json.dumps(temp)
    assert '"temperature": 1.0' in text and '"top_p": 0.5' in text, text

    def respelled(temperature, top_p):
        return text.replace('"temperature": 1.0', f'"temperature": {temperature}').replace(
            '"top_p": 0.5', f'"top_p": {top_p}')

    def repost(raw, **kw):
        return bl.stream_sse(fe.url, "/v1/chat/completions", respelled(*raw),
                             headers={"Content-Type": "application/json", "Last-Event-ID": cut.last_event_id}, **kw)

    check_same([cut, repost(("1", "5e-1"))], ref_t, "temperature 1.0 resumed as 1")
    check_same([cut, repost(("10E-1", "0.50"))], ref_t, "temperature 1.0 replayed as 10E-1")
    other = repost(("0.5", "0.5"))
    assert other.status == 400 and "differs" in (other.error or {}).get("message", ""), \
        f"a re-POST with another temperature: {other.status} {other.body[:300]!r}"

    # integers are exact: 2^53 + 1 is not 2^53, nor the real 9007199254740993.0 (read as 2^53)
    seeded = dict(BODY, seed=2**53 + 1, stream=True)
    cut = bl.stream_chat(fe.url, seeded, abort_after=5)
    assert cut.aborted and cut.last_event_id, cut.summary()
    for seed in (str(2**53), "9007199254740993.0"):
        raw = json.dumps(seeded).replace(f'"seed": {2**53 + 1}', f'"seed": {seed}')
        assert seed in raw, raw
        r = bl.stream_sse(fe.url, "/v1/chat/completions", raw,
                          headers={"Content-Type": "application/json", "Last-Event-ID": cut.last_event_id})
        assert r.status == 400 and "differs" in (r.error or {}).get("message", ""), \
            f"a re-POST with seed {seed}: {r.status} {r.body[:300]!r}"
    rest = bl.stream_chat(fe.url, seeded, headers={"Last-Event-ID": cut.last_event_id})
    assert rest.done and not rest.error, f"the re-POST with the same seed: {rest.summary()}"

with bl.Cluster() as c:
    fe = c.start_run(workers=1, speedup_ratio=1, stream_retention=0)
    c.wait_workers(fe, 1)
    s = bl.stream_chat(fe.url, BODY, abort_after=5)
    assert s.aborted and not [i for i in s.event_ids if i], f"ids with --stream-retention 0: {s.event_ids}"
    assert "x-stream-id" not in s.headers, s.headers
    r = bl.stream_chat(fe.url, BODY, headers={"Last-Event-ID": f"{'0' * 31}1:5"})
    assert r.status == 404 and not r.text, f"a resume with the journal off: {r.status} {r.summary()}"

print("test_run_resume: ok")
