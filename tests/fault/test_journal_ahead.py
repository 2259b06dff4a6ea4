"""A client ahead of the shared journal, whose frontend and worker die together, with events of
several tokens (docs/fault-tolerance.md, "Frontend failover").

The shared journal lags what the client received by up to one batch, so after a kill -9 of its
frontend a client usually holds events that JetStream never got. When the worker died too, the
frontend that takes the resume continues from the journal's last token by migration and regenerates
the missing tokens — but in events of the new engine's making. With one token per event their
boundaries are the client's; with several (a fast engine, or a loop that coalesces) the client's
position may fall inside one of them, and the client cannot be given the part it lacks. Before the
fix such a resume ended with an error event ("a chunk is larger than the frontend's output
buffer"). Now the straddling event is dropped and the continuation catches up: a new attempt stops
at the client's position (an event ends there) and the rest follows from there.

nats-server -js, frontends A and B (journal shared), mocker worker W1 at --speedup-ratio 5. Six
long streams run on A, all on W1; W2 starts at --speedup-ratio 200 (the same tokens, batched
otherwise: many per event); A and W1 are killed with SIGKILL together; every client resumes on B
with its Last-Event-ID and its stream continues on W2. Each answer put together must equal the
uncut one (token ids, text, finish reason, usage, [DONE]); B must have caught up at least one
stream (its log: a straddle, then the catch-up reaching the client), so that the case was tested;
the kill's point in the journal's batching is random, so the round repeats (up to 4 times, each
checked exactly) until one has tested it.
"""

import os
import re
import signal
import threading

import batonlib as bl
import natslib

bl.deadline(150, "test_journal_ahead")

N = 6
SPEED_W1, SPEED_W2 = 5, 200  # the mocker's output does not depend on its speed; its batching does


def body(i):
    extra = {"return_token_ids": True, "stream_options": {"include_usage": True}}
    if i % 2:
        extra.update(temperature=0.8, seed=300 + i)
    return bl.chat_body(f"ahead of the journal {i}", max_tokens=1500, **extra)


with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}').start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    w1 = c.start_worker(system_port=True, wait=True, speedup_ratio=SPEED_W1, orphan_grace=30, **plane)
    fa = c.start_frontend(**plane)
    fb = c.start_frontend(**plane)
    for fe in (fa, fb):
        fe.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
        c.wait_workers(fe, 1)
    refs = bl.run_concurrently(lambda i: bl.stream_chat(fb.url, body(i), timeout=90).assert_ok(f"reference {i}"),
                               [(i,) for i in range(N)])

    # The kill lands at a random point of the journal's batching: a round may leave no client
    # ahead of the journal inside a W2 event (more often on a slow, sanitized build). Rounds repeat,
    # each checked exactly, until one has tested the catch-up.
    ROUNDS = 4
    w1_, fa_ = w1, fa
    for rnd in range(ROUNDS):
        if rnd:
            w1_ = c.start_worker(system_port=True, wait=True, speedup_ratio=SPEED_W1, orphan_grace=30, **plane)
            fa_ = c.start_frontend(**plane)
            fa_.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
            c.wait_workers(fa_, 1)
        events = [[] for _ in range(N)]
        got = [None] * N

        def run(i):
            got[i] = bl.stream_chat(fa_.url, body(i), timeout=60, on_event=lambda st, ev: events[i].append(ev))

        ts = [threading.Thread(target=run, args=(i,)) for i in range(N)]
        for t in ts:
            t.start()
        bl.wait_for(lambda: all(len(e) >= 30 for e in events), 30, interval=0.002, what="every stream under way on A")
        w2 = c.start_worker(system_port=True, wait=True, speedup_ratio=SPEED_W2, orphan_grace=30, **plane)
        c.wait_workers(fb, 2)
        fa_.proc.kill(signal.SIGKILL)
        w1_.proc.kill(signal.SIGKILL)
        for t in ts:
            t.join(60)
        bad = []
        for i, first in enumerate(got):
            assert first is not None and not first.done and first.last_event_id, \
                f"round {rnd} stream {i}: {first and first.summary()}"
            rest = bl.stream_chat(fb.url, body(i), headers={"Last-Event-ID": first.last_event_id}, timeout=60)
            ids = first.token_ids + rest.token_ids
            why = None
            if not rest.ok:
                why = f"resume failed: {rest.summary()}"
            elif ids != refs[i].token_ids:
                why = f"token ids differ: {len(ids)} vs {len(refs[i].token_ids)}"
            elif first.text + rest.text != refs[i].text or rest.usage != refs[i].usage:
                why = "text or usage differs"
            if why:
                bad.append(f"round {rnd} stream {i} (cut at {first.last_event_id.split(':')[1]}): {why}")
        assert not bad, "\n".join(bad)
        w2.proc.kill(signal.SIGTERM)  # the next round's streams go to its own W1
        w2.proc.wait(30)
        bl.wait_for(lambda: not (bl.get_json(fb.url + "/health")[2].get("instances") or []), 30,
                    what="B to forget this round's workers")
        log = fb.proc.log_text()
        straddled = re.findall(r"straddles its client's position \d+; catching up to it first", log)
        caught = re.findall(r"caught up with its client at position \d+; continuing it from there", log)
        assert len(caught) == len(straddled), f"{len(straddled)} catch-ups begun, {len(caught)} reached the client"
        if straddled:
            break
    assert straddled, f"in {ROUNDS} rounds no continuation's event straddled its client's position: the case was not tested"
    print(f"test_journal_ahead: {N} streams per round resumed exactly on B after A and W1 died; {len(straddled)} "
          f"caught up with their client first (round {rnd + 1})")

print("test_journal_ahead: ok")
