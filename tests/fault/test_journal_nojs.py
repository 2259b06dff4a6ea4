"""A frontend whose event plane is NATS on a server without JetStream (docs/fault-tolerance.md,
"Frontend failover"): it says so at start-up and keeps the in-process journal — resumable streams
work as on a frontend without NATS, and nothing pretends to be shared.

nats-server without -js, one frontend (event plane NATS), one mocker worker (event plane NATS,
--orphan-grace 30).
1. The start-up line says the server has no JetStream and that the in-process journal is kept;
   baton_frontend_stream_journal_shared is 0.
2. The in-process journal works: a stream cut by its client after 5 events carries ids, is killed
   on the engine, and its re-POST with Last-Event-ID gets exactly the rest (token ids, text,
   finish reason, usage, [DONE]); the GET form replays the finished stream.
3. Nothing is orphaned: the REQUESTs of such a frontend name no journal stream (no other frontend
   could resume it), so a kill -9 of the frontend mid-stream ends the stream on the worker at once
   (dynamo_component_cancellation_total{kind="frontend_lost"}), with no orphan kept.
"""

import batonlib as bl
import natslib

bl.deadline(90, "test_journal_nojs")

BODY = bl.chat_body("a stream on a server without JetStream", max_tokens=300, return_token_ids=True,
                    stream_options={"include_usage": True})

wm = bl.worker_metric

with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, name="nats-plain").start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    w = c.start_worker(system_port=True, wait=True, speedup_ratio=1, orphan_grace=30, **plane)
    fe = c.start_frontend(**plane)
    fe.proc.wait_log(r"NATS server at \S+ has no JetStream \(start it with -js\): keeping the in-process journal; "
                     r"streams resume only on the frontend that served them", timeout=15)
    c.wait_workers(fe, 1)
    assert bl.metric_sum(bl.metrics(fe.url), "baton_frontend_stream_journal_shared") == 0
    assert "journal shared through NATS JetStream" not in fe.proc.log_text()

    ref = bl.stream_chat(fe.url, BODY, timeout=60).assert_ok("reference")
    assert len(ref.token_ids) == 300, ref.summary()
    cut = bl.stream_chat(fe.url, BODY, abort_after=5, timeout=30)
    assert cut.aborted and cut.last_event_id and cut.headers.get("x-stream-id"), cut.summary()
    bl.wait_for(lambda: wm(w, "baton_worker_active_sequences") == 0, 1.0, interval=0.01,
                what="the cut request gone from the engine within 1 s")
    rest = bl.stream_chat(fe.url, BODY, headers={"Last-Event-ID": cut.last_event_id}, timeout=60)
    assert rest.ok, rest.summary()
    assert cut.token_ids + rest.token_ids == ref.token_ids, "token ids differ"
    assert cut.text + rest.text == ref.text and rest.finish_reason == ref.finish_reason and rest.usage == ref.usage
    whole = bl.stream_sse(fe.url, f"/v1/chat/completions/{cut.headers['x-stream-id']}?stream=true", None,
                          method="GET")
    assert whole.ok and whole.token_ids == ref.token_ids and whole.text == ref.text, whole.summary()

    lost0 = wm(w, "dynamo_component_cancellation_total", kind="frontend_lost")
    bl.kill9_mid_stream(fe, BODY)
    bl.wait_for(lambda: wm(w, "dynamo_component_cancellation_total", kind="frontend_lost") == lost0 + 1, 5,
                what="the dead frontend's stream ended on the worker")
    assert wm(w, "baton_worker_active_sequences") == 0
    assert wm(w, "baton_worker_orphans") == 0 and wm(w, "baton_worker_orphan_events_total", event="orphaned") == 0, \
        "a stream of a frontend with the in-process journal was orphaned"

print("test_journal_nojs: ok")
