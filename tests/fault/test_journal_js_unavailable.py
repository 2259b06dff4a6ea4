"""A resume that reads another frontend's stream from JetStream is counted for what it is, and one
that JetStream does not answer is told to retry, not that the stream is unknown
(docs/fault-tolerance.md, "Frontend failover").

nats-server -js, one mocker worker, frontends A and B (the journal shared through JetStream).
1. A stream cut by its client on A (A alive) is resumed on B: B reads it from JetStream and
   continues it, exactly, counted baton_frontend_stream_resumes_total{outcome="continued"} (before:
   "superseded", as every resume that waited for a fetch) and fetches_total{result="found"}.
2. Another stream cut on A; nats-server is stopped (SIGSTOP); its resume on B is answered 503
   journal_unavailable with Retry-After, counted resumes_total{outcome="unavailable"} and
   fetches_total{result="unavailable"}, not "not_found" (before: 404 stream_not_found "unknown, or
   expired", which ends an EventSource or an SDK's retries for good).
3. nats-server continues (SIGCONT): the same resume on B continues the stream, exactly.
"""

import os
import signal
import time

import batonlib as bl
import natslib

bl.deadline(150, "test_journal_js_unavailable")

BODY = bl.chat_body("a stream resumed through JetStream", max_tokens=150, return_token_ids=True, seed=3,
                    stream_options={"include_usage": True})


def counts(fe):
    m = bl.metrics(fe.url)
    out = {o: bl.metric_sum(m, "baton_frontend_stream_resumes_total", outcome=o)
           for o in ("continued", "superseded", "not_found", "unavailable")}
    for r in ("found", "not_found", "unavailable"):
        out["fetch_" + r] = bl.metric_sum(m, "baton_frontend_stream_journal_jetstream_fetches_total", result=r)
    return out


def delta(before, after):
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def exact(cut, rest, ref, what):
    assert rest.ok, f"{what}: {rest.summary()}"
    assert cut.token_ids + rest.token_ids == ref.token_ids, f"{what}: {len(cut.token_ids)} + {len(rest.token_ids)}"
    assert cut.text + rest.text == ref.text and rest.usage == ref.usage, what


with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}').start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    c.start_worker(**plane)
    fa = c.start_frontend(**plane)
    fb = c.start_frontend(**plane)
    for fe in (fa, fb):
        fe.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
        c.wait_workers(fe, 1)
    ref = bl.stream_chat(fb.url, BODY, timeout=60).assert_ok("reference")

    # -- 1. a resume through a fetch is a continuation
    cut = bl.stream_chat(fa.url, BODY, abort_after=6, timeout=30)
    assert cut.aborted and cut.last_event_id, cut.summary()
    time.sleep(0.3)  # A's batch reaches JetStream (20 ms)
    before = counts(fb)
    rest = bl.stream_chat(fb.url, BODY, headers={"Last-Event-ID": cut.last_event_id}, timeout=60)
    exact(cut, rest, ref, "the resume on B")
    d = delta(before, counts(fb))
    assert d == {"continued": 1, "fetch_found": 1}, f"counted {d}"
    print(f"a resume through JetStream counted {d}", flush=True)

    # -- 2. JetStream does not answer: 503, retry
    cut = bl.stream_chat(fa.url, BODY, abort_after=9, timeout=30)
    assert cut.aborted and cut.last_event_id, cut.summary()
    time.sleep(0.3)
    before = counts(fb)
    nats.proc.kill(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        s, h, b = bl.request("POST", fb.url + "/v1/chat/completions", BODY,
                             headers={"Last-Event-ID": cut.last_event_id}, timeout=10)
        took = time.monotonic() - t0
    finally:
        nats.proc.kill(signal.SIGCONT)
    assert s == 503 and b"journal_unavailable" in b, (s, b[:300])
    assert h.get("retry-after") == "1", h
    d = delta(before, counts(fb))
    assert d == {"unavailable": 1, "fetch_unavailable": 1}, f"counted {d}"
    fb.proc.wait_log(r"resume of stream [0-9a-f]{32} answered 503", timeout=5)
    print(f"with nats-server stopped: 503 after {took:.1f} s, Retry-After {h.get('retry-after')}, counted {d}",
          flush=True)

    # -- 3. once it answers, the same resume continues the stream
    rest = None
    for _ in range(20):  # the journal's connection may take a moment to catch up after SIGCONT
        rest = bl.stream_chat(fb.url, BODY, headers={"Last-Event-ID": cut.last_event_id}, timeout=60)
        if rest.status != 503:
            break
        time.sleep(0.25)
    exact(cut, rest, ref, "the resume on B after SIGCONT")
    print("after SIGCONT the same resume continued the stream exactly", flush=True)

print("test_journal_js_unavailable: ok")
