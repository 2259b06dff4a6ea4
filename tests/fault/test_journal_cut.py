"""A change of a stream that never reached JetStream must not leave a hole in the stream's shared
record (docs/fault-tolerance.md, "Frontend failover", and src/frontend/journal_js.c).

nats-server -js with max_payload 4096, two frontends (event plane NATS: the journal is shared), one
mocker worker. A stream runs on frontend A, read by its client. Then nats-server is stopped
(SIGSTOP) for 0.9 s while a resume of an unknown stream makes A's journal thread wait on a
JetStream read: the stream's changes of that time pile up into one batch larger than the server's
max_payload, and its publish fails (NATS_MAX_PAYLOAD). The stream goes on and its later batches are
small again. A is killed with SIGKILL mid-stream and the client resumes on frontend B from the last
event it received: its answer put together must equal the uncut answer (token ids, text, finish
reason, usage, [DONE]).

Before the fix, A went on publishing the stream's later batches after the failed one, so B read
back a record with a hole in the middle and continued from the wrong tokens. Now A publishes
nothing more of a stream once a change of it is lost (it logs that and counts it), so the record
is a prefix and B continues from its end. The test also requires that the publish did fail (A's
log and its counter), so it cannot pass without testing anything.
"""

import os
import secrets
import signal
import threading
import time

import batonlib as bl
import natslib

bl.deadline(150, "test_journal_cut")

BODY = bl.chat_body("a stream whose journal loses a batch", max_tokens=2400, return_token_ids=True,
                    stream_options={"include_usage": True})

with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, name="nats-js-small",
                              config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}\nmax_payload: 4096'
                              ).start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    w = c.start_worker(system_port=True, wait=True, speedup_ratio=2, orphan_grace=30, **plane)
    fa = c.start_frontend(**plane)
    fb = c.start_frontend(**plane)
    for fe in (fa, fb):
        fe.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
        c.wait_workers(fe, 1)
    ref = bl.stream_chat(fb.url, BODY, timeout=90).assert_ok("reference")

    got = {}
    events = []
    t = threading.Thread(target=lambda: got.setdefault(
        "s", bl.stream_chat(fa.url, BODY, timeout=90, on_event=lambda st, ev: events.append(ev))))
    t.start()
    bl.wait_for(lambda: len(events) >= 100, 30, what="the stream under way on A")

    # A's journal thread waits on a JetStream read while the server is stopped: one big batch
    probe = threading.Thread(target=lambda: bl.stream_chat(
        fa.url, BODY, headers={"Last-Event-ID": f"{secrets.token_hex(16)}:1"}, timeout=30))
    nats.proc.kill(signal.SIGSTOP)
    probe.start()
    time.sleep(0.9)
    nats.proc.kill(signal.SIGCONT)
    probe.join(30)
    fa.proc.wait_log(r"stream journal: a change of stream [0-9a-f]{32} did not reach JetStream", timeout=10)
    n0 = len(events)
    bl.wait_for(lambda: len(events) >= n0 + 100, 30, what="the stream going on after the lost batch")
    time.sleep(0.3)  # small batches published after the lost one (the hole, before the fix)
    m = bl.metrics(fa.url)
    failed = bl.metric_sum(m, "baton_frontend_stream_journal_jetstream_messages_total", result="failed")
    cut = bl.metric_sum(m, "baton_frontend_stream_journal_jetstream_streams_cut_total")
    assert failed >= 1 and cut == 1, f"no lost batch to test with: failed {failed}, cut {cut}"
    assert not got, "the stream ended before A was killed"

    fa.proc.kill(signal.SIGKILL)
    assert fa.proc.wait(10) == -signal.SIGKILL
    t.join(30)
    first = got["s"]
    assert not first.done and first.last_event_id, first.summary()
    rest = bl.stream_chat(fb.url, BODY, headers={"Last-Event-ID": first.last_event_id}, timeout=90)
    assert rest.ok and rest.done, rest.summary()
    ids = first.token_ids + rest.token_ids
    assert ids == ref.token_ids, (f"token ids differ at {next((k for k, (a, b) in enumerate(zip(ids, ref.token_ids)) if a != b), min(len(ids), len(ref.token_ids)))}: "
                                  f"{len(ids)} vs {len(ref.token_ids)} tokens")
    assert first.text + rest.text == ref.text, "text differs"
    assert rest.finish_reason == ref.finish_reason and rest.usage == ref.usage, (rest.finish_reason, rest.usage)
    print(f"a batch of {n0} events lost on its way to JetStream ({failed:.0f} failed publish); after A's death "
          f"the stream resumed on B at {len(first.token_ids)} of {len(ref.token_ids)} tokens, exact", flush=True)

print("test_journal_cut: ok")
