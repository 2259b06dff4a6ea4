"""A client disconnect still cancels at once when the stream journal is shared (docs/fault-tolerance.md,
"Cancellation is unchanged" and "Frontend failover"): orphans are for streams whose *frontend* is
gone, never for a client that left a live frontend.

nats-server -js, one frontend with the event plane on it (its journal shared through JetStream, so
its REQUESTs name a stream_key), one mocker worker with --orphan-grace 30.
1. A long stream is cut by its client after 5 events: within a second the worker has no active
   sequence, its KILL counter moved, and no orphan was kept (baton_worker_orphans 0, no
   "orphaned" event) — the grace applies only when the frontend's connection is lost.
2. The client re-POSTs with Last-Event-ID: the stream is continued by migration from the journal's
   tokens (a new engine sequence: nothing ran meanwhile), and the pieces put together equal the
   uncut answer (token ids, text, finish reason, usage, [DONE]).
3. For contrast, in the same setup, a kill -9 of the frontend mid-stream does leave an orphan
   (the mechanism under test is live here: without it step 1 proves nothing).
"""

import os

import batonlib as bl
import natslib

bl.deadline(120, "test_journal_js_cancel")

BODY = bl.chat_body("a stream its client leaves", max_tokens=400, return_token_ids=True,
                    stream_options={"include_usage": True})

wm = bl.worker_metric

with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, name="nats-js", config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}'
                              ).start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    w = c.start_worker(system_port=True, wait=True, speedup_ratio=1, orphan_grace=30, **plane)
    fe = c.start_frontend(**plane)
    fe.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
    c.wait_workers(fe, 1)
    ref = bl.stream_chat(fe.url, BODY, timeout=60).assert_ok("reference")
    assert len(ref.token_ids) == 400, ref.summary()

    # -- 1. the client leaves: killed on the engine at once, not orphaned
    kills0 = wm(w, "dynamo_component_cancellation_total", kind="kill")
    sub0 = wm(w, "baton_worker_engine_submits_total")
    cut = bl.stream_chat(fe.url, BODY, abort_after=5, timeout=30)
    assert cut.aborted and cut.last_event_id, cut.summary()
    bl.wait_for(lambda: wm(w, "baton_worker_active_sequences") == 0, 1.0, interval=0.01,
                what="the cut request gone from the engine within 1 s")
    assert wm(w, "dynamo_component_cancellation_total", kind="kill") == kills0 + 1, "no KILL reached the worker"
    assert wm(w, "baton_worker_orphans") == 0, "a client disconnect left an orphan running"
    assert wm(w, "baton_worker_orphan_events_total", event="orphaned") == 0

    # -- 2. its resume continues by migration from the journal's tokens, exactly
    rest = bl.stream_chat(fe.url, BODY, headers={"Last-Event-ID": cut.last_event_id}, timeout=60)
    assert rest.ok, rest.summary()
    ids = cut.token_ids + rest.token_ids
    assert ids == ref.token_ids, f"token ids: {len(ids)} vs {len(ref.token_ids)}"
    assert cut.text + rest.text == ref.text and rest.finish_reason == ref.finish_reason and rest.usage == ref.usage
    assert wm(w, "baton_worker_engine_submits_total") == sub0 + 2, "the resume did not run as a new sequence"
    fe.proc.wait_log(r"resumed after \d+ journaled tokens; continuing it", timeout=5)

    # -- 3. contrast: the frontend's death does orphan the stream
    bl.kill9_mid_stream(fe, BODY)
    bl.wait_for(lambda: wm(w, "baton_worker_orphan_events_total", event="orphaned") == 1, 5,
                what="the stream of the killed frontend kept as an orphan")

print("test_journal_js_cancel: ok")
