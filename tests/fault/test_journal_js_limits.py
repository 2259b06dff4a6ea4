"""One frontend's journal settings never cut the JetStream journal every frontend shares
(docs/operations.md, "Resumable streams behind a load balancer"; docs/fault-tolerance.md, "Frontend
failover").

nats-server -js, one mocker worker, frontends A and B with the default settings (MaxBytes 256 MiB,
MaxAge 300 s + 1 h). A journals a stream its client cuts, then 40 finished ones. Then:

1. frontend C starts with --stream-retention 1 --stream-retention-bytes 4096: the stream
   BATON_JOURNAL_dynamo keeps MaxBytes 268435456 and MaxAge 3900 s and its messages (C logs that it
   keeps them, naming both values), and B resumes A's cut stream from JetStream, exactly. Before,
   C set MaxBytes 4096 at its start: JetStream dropped all but the last few messages at once, and
   the resume on B got 404 "unknown, or expired".
2. frontend D starts with --stream-retention-bytes 536870912: the stream's MaxBytes grows to it
   (D logs the change with both values) and MaxAge stays 3900 s.
"""

import json
import os
import urllib.request

import batonlib as bl
import natslib

bl.deadline(150, "test_journal_js_limits")

STREAM = "BATON_JOURNAL_dynamo"
BODY = bl.chat_body("a stream cut on one frontend and resumed on another", max_tokens=200, return_token_ids=True,
                    seed=5, stream_options={"include_usage": True})


def jsz_stream(nats):
    with urllib.request.urlopen(f"http://127.0.0.1:{nats.http_port}/jsz?streams=true&config=true", timeout=5) as r:
        j = json.loads(r.read())
    for acc in j.get("account_details") or []:
        for st in acc.get("stream_detail") or []:
            if st.get("name") == STREAM:
                return st
    return None


with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}').start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    c.start_worker(**plane)
    fa = c.start_frontend(**plane)
    fa.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
    fb = c.start_frontend(**plane)
    fb.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
    for fe in (fa, fb):
        c.wait_workers(fe, 1)
    cfg = jsz_stream(nats)["config"]
    assert cfg["max_bytes"] == 268435456 and cfg["max_age"] == 3900 * 10**9, cfg

    ref = bl.stream_chat(fb.url, BODY, timeout=60).assert_ok("reference")
    cut = bl.stream_chat(fa.url, BODY, abort_after=8, timeout=30)
    assert cut.aborted and cut.last_event_id, cut.summary()
    sid = cut.last_event_id.split(":")[0]
    for i in range(40):
        bl.stream_chat(fa.url, bl.chat_body(f"filler {i}", max_tokens=60), timeout=30).assert_ok(f"stream {i}")
    bl.wait_for(lambda: jsz_stream(nats)["state"]["messages"] >= 80, 5, what="A's streams stored in JetStream")
    held = jsz_stream(nats)["state"]["messages"]

    # -- 1. a frontend with a tiny journal leaves the shared stream's limits and messages alone
    fc = c.start_frontend(stream_retention=1, stream_retention_bytes=4096, **plane)
    fc.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)

    rest = bl.stream_chat(fb.url, BODY, headers={"Last-Event-ID": cut.last_event_id}, timeout=60)
    assert rest.ok, f"the resume on B of A's stream {sid}: {rest.summary()}"
    assert cut.token_ids + rest.token_ids == ref.token_ids, (len(cut.token_ids), len(rest.token_ids))
    assert cut.text + rest.text == ref.text and rest.usage == ref.usage
    fb.proc.wait_log(rf"stream {sid} fetched from JetStream", timeout=5)
    st = jsz_stream(nats)
    assert st["config"]["max_bytes"] == 268435456 and st["config"]["max_age"] == 3900 * 10**9, st["config"]
    assert st["state"]["messages"] >= held, f"messages dropped: {held} -> {st['state']['messages']}"
    fc.proc.wait_log(rf"the JetStream stream {STREAM} keeps its MaxAge 3900s and MaxBytes 268435456 .*not this "
                     r"frontend's 3601s .* and 4096 \(--stream-retention-bytes\)", timeout=5)
    print(f"a frontend with a 4 KiB journal left {STREAM} at 256 MiB and {held}+ messages; A's cut stream resumed "
          f"on B exactly", flush=True)

    # -- 2. a frontend with a larger cap raises it, and says so
    fd = c.start_frontend(stream_retention_bytes=536870912, **plane)
    fd.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
    fd.proc.wait_log(rf"raised the limits of the JetStream stream {STREAM}, shared by every frontend of namespace "
                     r"dynamo, from MaxAge 3900s, MaxBytes 268435456 to this frontend's MaxAge 3900s .* MaxBytes "
                     r"536870912", timeout=5)
    cfg = jsz_stream(nats)["config"]
    assert cfg["max_bytes"] == 536870912 and cfg["max_age"] == 3900 * 10**9, cfg
    print("a frontend with a 512 MiB journal raised MaxBytes to it", flush=True)

print("test_journal_js_limits: ok")
