"""A stream whose record the in-process journal drops (--stream-retention-bytes) while the journal
is shared through JetStream (docs/fault-tolerance.md, "Frontend failover").

nats-server -js, two frontends (event plane NATS: the journal is shared), one mocker worker.
Frontend A has a journal cap of 4 KiB: a long stream's record is dropped after its first events,
and the stream goes on to its end. Then:

- a resume on A from one of the ids its client received is told that the record was dropped
  (404 stream_not_found naming --stream-retention-bytes): A has nothing to continue from;
- a resume on B from the same id continues from the prefix that reached JetStream: the answer put
  together (the client's events up to that id, then B's) equals the uncut answer. The stream's
  request on A closes its dropped record only at its end, with the answer finished: A must not
  publish that close (nothing more of a dropped stream is), or B would read a prefix closed as
  finished and end the answer short.
"""

import os

import batonlib as bl
import natslib

bl.deadline(150, "test_journal_js_dropped")

BODY = bl.completion_body("a stream whose record is dropped", max_tokens=600, return_token_ids=True, stream=True,
                          stream_options={"include_usage": True})


with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}').start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    c.start_worker(**plane)
    # A first: it creates the JetStream stream with MaxBytes 4096, which B, with 256 MiB, raises (the limits only grow)
    fa = c.start_frontend(stream_retention_bytes=4096, **plane)
    fa.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
    fb = c.start_frontend(**plane)
    fb.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
    for fe in (fa, fb):
        c.wait_workers(fe, 1)
    ref = bl.stream_completion(fb.url, BODY, timeout=60).assert_ok("reference")

    first = bl.stream_completion(fa.url, BODY, timeout=60)
    first.assert_ok("the stream on A")
    with_id = [i for i in first.event_ids if i]
    assert with_id and first.event_ids[-1] is None, f"A's record was not dropped: {len(with_id)} ids"
    assert first.token_ids == ref.token_ids, "the stream on A differs from the reference"
    fa.proc.wait_log(r"stream journal full; stream [0-9a-f]{32} is no longer resumable", timeout=5)
    fa.proc.wait_log(r"stream [0-9a-f]{32} was dropped by this frontend's journal", timeout=5)
    early = with_id[len(with_id) // 2]

    s, _, b = bl.request("POST", fa.url + "/v1/completions", BODY, headers={"Last-Event-ID": early})
    assert s == 404 and b"--stream-retention-bytes" in b, (s, b[:300])

    rest = bl.stream_completion(fb.url, BODY, headers={"Last-Event-ID": early}, timeout=60)
    assert rest.ok and rest.done, rest.summary()
    ids, text = bl.events_up_to(first, early)
    ids += rest.token_ids
    text += rest.text
    assert ids == ref.token_ids, (f"token ids differ at {next((k for k, (a, b) in enumerate(zip(ids, ref.token_ids)) if a != b), min(len(ids), len(ref.token_ids)))}: "
                                  f"{len(ids)} vs {len(ref.token_ids)} tokens")
    assert text == ref.text, "text differs"
    assert rest.finish_reason == ref.finish_reason and rest.usage == ref.usage, (rest.finish_reason, rest.usage)
    print(f"a record dropped on A after {len(with_id)} events: A says so; B resumed from position "
          f"{early.split(':')[1]} and continued to {len(ref.token_ids)} tokens, exact", flush=True)

print("test_journal_js_dropped: ok")
