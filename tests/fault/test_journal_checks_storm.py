"""A migration storm with the shared journal while JetStream does not answer: the journal's thread
asks about every migrated stream whether another frontend took it over (docs/fault-tolerance.md,
"Two writers"), and a server that does not answer must cost it one wait, not one per stream.

nats-server -js, one frontend (the journal shared through JetStream), worker W running N streams
and a second worker W2. nats-server is stopped (SIGSTOP) and W killed (kill -9): the N streams
migrate to W2, and each migration asks the journal. nats-server is continued after STOPPED_S.
Checked: every stream ends with [DONE] (a stream whose check got no answer is this frontend's, as
before), and the journal waited for at most two of those reads (each waits 700 ms): the first
that got no answer answers the others queued with it without reading. Before, the thread read
them one after another, each waiting 700 ms, publishing nothing meanwhile: about STOPPED_S / 0.7
timed-out reads, one warning each.
"""

import os
import re
import signal
import threading
import time

import batonlib as bl
import natslib

bl.deadline(150, "test_journal_checks_storm")

N = 40
STOPPED_S = 6

with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}').start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    w = c.start_worker(system_port=True, wait=True, speedup_ratio=0.3, max_num_seqs=N + 10, orphan_grace=30, **plane)
    fe = c.start_frontend(**plane)
    fe.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
    c.wait_workers(fe, 1)
    got = [None] * N
    started = [threading.Event() for _ in range(N)]

    def run(i):
        def on_ev(st, ev):
            if len(st.token_ids) >= 3:
                started[i].set()
            return False
        got[i] = bl.stream_chat(fe.url, bl.chat_body(f"storm {i}", max_tokens=200, return_token_ids=True),
                                timeout=120, on_event=on_ev)
        started[i].set()

    ts = [threading.Thread(target=run, args=(i,)) for i in range(N)]
    for t in ts:
        t.start()
    for e in started:
        assert e.wait(60), "a stream did not get under way"
    w2 = c.start_worker(system_port=True, wait=True, speedup_ratio=2, max_num_seqs=N + 10, **plane)
    c.wait_workers(fe, 2)
    time.sleep(0.5)  # the streams' records are in JetStream
    nats.proc.kill(signal.SIGSTOP)
    w.proc.kill(signal.SIGKILL)
    time.sleep(STOPPED_S)
    nats.proc.kill(signal.SIGCONT)
    for t in ts:
        t.join(120)
    bad = [g.summary() for g in got if not g.ok]
    assert not bad, f"{len(bad)} of {N} streams did not end properly: {bad[:3]}"
    log = fe.proc.log_text()
    waits = re.findall(r"stream journal: cannot read \S+\.own: ", log)
    migrated = len(re.findall(r"taken to be still this frontend's", log))
    assert migrated, "no check of a migrated stream went unanswered: the case was not tested"
    assert len(waits) <= 2, f"the journal waited for {len(waits)} unanswered reads of N={N} migrated streams' owners"
    print(f"test_journal_checks_storm: {N} streams migrated while JetStream was stopped {STOPPED_S}s; "
          f"{len(waits)} unanswered read(s) waited for; every stream ended with [DONE]")

print("test_journal_checks_storm: ok")
