"""The stream journal in NATS JetStream on a server that requires credentials, with frontends of
two event loops (docs/fault-tolerance.md, "Frontend failover").

One nats-server -js that admits only one user nkey, two mocker workers and two frontends, each
with --threads 2, all given the seed (NATS_AUTH_NKEY). Checked:

  1. the server refuses a client without credentials (so the rest means something);
     TLS: on a second nats-server -js that requires TLS and the nkey (certificates made by
     etcdlib.make_tls_certs), a frontend given the CA (SSL_CERT_FILE, OpenSSL's trust) journals
     there over tls://; given another CA, neither its journal nor its event plane connects;
     a late server: a frontend started before its nats-server says the server is not reachable
     yet, and journals in JetStream once the server is up (before, it kept the in-process journal
     for good);
  2. both frontends say at start-up that they journal in JetStream, and the server lists each
     one's journal connection (client name baton-frontend-journal-<pid>) under the nkey — the
     journal connects with the event plane's credentials. (Before, it connected without any and
     fell back to the in-process journal: "cannot use JetStream ... Authorization Violation".)
  3. a request started on one event loop is resumed on the other: a client stops reading after a
     few events, a second connection resumes with Last-Event-ID, and the kernel (SO_REUSEPORT)
     puts it on either loop; trials go on until a resume has had to wait for the other loop
     ("waits for thread N"). Every such resume gets the exact rest of the answer.
  4. failover: with a resume of that kind still streaming (its record now written by both loops
     of frontend A) and 4 more streams held open on A, A is killed with SIGKILL; each of the 5 is
     resumed on frontend B from the last event its client received, and gets exactly the rest of
     the uncut answer, ending with [DONE]; B fetched them from JetStream (its log).
  5. the journal's JetStream counters on B: messages published, none failed, none dropped, the
     fetches counted as logged; and the hand-off counter is exported (0: nothing was handed off).
"""

import json
import os
import re
import signal
import socket

import batonlib as bl
import etcdlib
import natslib

bl.deadline(200, "test_journal_js")

WORKER = dict(speedup_ratio=1, event_plane="nats", orphan_grace=30)
ID_RX = re.compile(r"^([0-9a-f]{32}):(\d+)(?::(end|usage|done|error))?$")
EXTRA_STREAMS = 4


def body(i, max_tokens=300):
    extra = {"return_token_ids": True, "stream_options": {"include_usage": True}}
    if i % 2:
        extra.update(temperature=0.7, seed=700 + i)
    return bl.chat_body(f"journal prompt {i}", max_tokens=max_tokens, **extra)


def held_stream(fe, b, headers=None, events=3):
    """A stream on a raw socket that reads `events` whole events and then goes silent (reads
    nothing more, never closes). Returns the socket, the id of the last whole event received and
    the text of the events up to it (what its client would show)."""
    data = json.dumps(dict(b, stream=True)).encode()
    s = socket.create_connection(("127.0.0.1", fe.port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{extra}"
               f"Content-Length: {len(data)}\r\n\r\n").encode() + data)
    got = b""
    while got.count(b"\nid: ") < events + 1:
        c = s.recv(1)
        assert c, f"stream ended early: {got[-300:]!r}"
        got += c
    head, _, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    sse = dechunk(rest) if b"transfer-encoding: chunked" in head.lower() else rest
    text, last = "", None
    # whole events only: an id line, a data line, both ended (the last id is cut short)
    for m in re.finditer(rb"(?m)^id: (\S+)\ndata: (.*)\n", sse):
        ch = (json.loads(m.group(2)).get("choices") or [{}])[0]
        text += (ch.get("delta") or {}).get("content") or ""
        last = m.group(1).decode()
    assert last, sse
    return s, last, text


def dechunk(raw):
    """The body of a chunked HTTP/1.1 response received so far: every chunk, the last one
    possibly cut short."""
    out, i = b"", 0
    while True:
        j = raw.find(b"\r\n", i)
        if j < 0:
            return out
        n = int(raw[i:j].split(b";")[0], 16)
        out += raw[j + 2:j + 2 + n]
        if n == 0 or j + 2 + n + 2 > len(raw):
            return out
        i = j + 2 + n + 2


def rest_matches(fe, b, last, before, ref, what):
    """Resumes on fe after event `last`, `before` being the text the client had; its answer put
    together must be exactly ref: token ids, text, finish reason and usage, ending with [DONE]."""
    pos = int(ID_RX.match(last).group(2))
    assert 0 < pos < len(ref.token_ids), (what, last)
    r = bl.stream_chat(fe.url, b, headers={"Last-Event-ID": last}, timeout=60)
    assert r.ok and r.done, f"{what}: {r.summary()}"
    assert r.token_ids == ref.token_ids[pos:], \
        f"{what}: resumed {len(r.token_ids)} tokens, expected the {len(ref.token_ids) - pos} after position {pos}"
    assert before + r.text == ref.text, \
        f"{what}: the text put together differs from the uncut answer: {before!r} + {r.text[:80]!r}… vs " \
        f"{ref.text[:len(before) + 80]!r}…"
    assert r.finish_reason == ref.finish_reason and r.usage == ref.usage, \
        f"{what}: end {r.finish_reason} {r.usage} vs {ref.finish_reason} {ref.usage}"
    return r


def cross_loop_waits(fe):
    return len(re.findall(r"resume of stream [0-9a-f]{32} waits for thread \d to end the request",
                          fe.proc.log_text()))


with bl.Cluster() as c:
    seed, pub = natslib.user_nkey(c.dir, "journal")
    nats = natslib.NatsServer(c.dir, config=(f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}\n'
                                             f'authorization {{ users = [ {{ nkey: "{pub}" }} ] }}'),
                              name="nats-js-nkey").start()
    # -- 1. credentials required
    reply = natslib.raw_connect(nats.port)
    assert reply.startswith(b"-ERR") and b"Authorization Violation" in reply, reply

    # -- TLS: a server that requires TLS (and the nkey) at a tls:// URL, its CA given through
    # OpenSSL's SSL_CERT_FILE: the journal connects as the event plane does, and without the CA
    # neither connects
    certs = etcdlib.make_tls_certs(os.path.join(c.dir, "tls"))
    tls_nats = natslib.NatsServer(c.dir, name="nats-tls", config=(
        f'tls {{ cert_file: "{certs["server_cert"]}", key_file: "{certs["server_key"]}" }}\n'
        f'jetstream {{ store_dir: "{os.path.join(c.dir, "js-tls")}" }}\n'
        f'authorization {{ users = [ {{ nkey: "{pub}" }} ] }}')).start()
    tls_url = f"tls://127.0.0.1:{tls_nats.port}"
    ft = c.start_frontend(env={"NATS_AUTH_NKEY": seed, "SSL_CERT_FILE": certs["ca"]}, event_plane="nats",
                          nats_server=tls_url)
    ft.proc.wait_log(r"journal shared through NATS JetStream at tls://127\.0\.0\.1:\d+ .*credentials: "
                     r"NATS_AUTH_NKEY\)", timeout=15)
    ft.proc.wait_log(r"NATS connected to tls://", timeout=15)
    fu = c.start_frontend(env={"NATS_AUTH_NKEY": seed, "SSL_CERT_FILE": certs["other_ca"]}, event_plane="nats",
                          nats_server=tls_url)
    fu.proc.wait_log(r"cannot use JetStream at tls://\S+ \(SSL Error", timeout=15)
    fu.proc.wait_log(r"NATS server tls://\S+ is not reachable yet|the client gave up on tls://", timeout=15)
    assert "NATS connected" not in fu.proc.log_text(), "the event plane trusted a server the journal did not"
    for f in (ft, fu):
        f.proc.stop()
        c.frontends.remove(f)
    tls_nats.kill()
    print("TLS: the journal connects over tls:// with the event plane's trust; with another CA neither does",
          flush=True)

    # -- a NATS server that comes up after the frontend: the journal connects when it does
    late = natslib.NatsServer(c.dir, name="nats-late", config=(
        f'jetstream {{ store_dir: "{os.path.join(c.dir, "js-late")}" }}\n'
        f'authorization {{ users = [ {{ nkey: "{pub}" }} ] }}'))
    fl = c.start_frontend(env={"NATS_AUTH_NKEY": seed}, event_plane="nats", nats_server=late.url)
    fl.proc.wait_log(r"the NATS server at \S+ is not reachable yet .*the journal connects to JetStream in the "
                     r"background", timeout=15)
    assert bl.metric_sum(bl.metrics(fl.url), "baton_frontend_stream_journal_shared") == 0
    late.start()
    fl.proc.wait_log(r"journal shared through NATS JetStream at \S+ .*credentials: NATS_AUTH_NKEY\)", timeout=15)
    assert bl.metric_sum(bl.metrics(fl.url), "baton_frontend_stream_journal_shared") == 1
    fl.proc.stop()
    c.frontends.remove(fl)
    late.kill()
    print("late server: the journal connected to JetStream once the server was up", flush=True)

    env = {"NATS_AUTH_NKEY": seed}
    plane = dict(event_plane="nats", nats_server=nats.url)
    workers = [c.start_worker(env=env, system_port=True, wait=True, nats_server=nats.url, **WORKER)
               for _ in range(2)]
    fa = c.start_frontend(env=env, threads=2, **plane)
    fb = c.start_frontend(env=env, threads=2, **plane)

    # -- 2. both journal in JetStream, authenticated with the nkey
    for fe in (fa, fb):
        try:
            fe.proc.wait_log(r"resumable streams: journal shared through NATS JetStream at \S+ \(stream "
                             r"BATON_JOURNAL_dynamo, .*credentials: NATS_AUTH_NKEY\)", timeout=15)
        except AssertionError:
            raise AssertionError("the frontend does not journal in JetStream on an nkey-protected server:\n"
                                 + "\n".join(l for l in fe.proc.log_text().splitlines() if "journal" in l))
        c.wait_workers(fe, 2)
    conns = nats.connz()
    journals = [(x.get("name"), x.get("authorized_user")) for x in conns
                if re.fullmatch(r"baton-frontend-journal-\d+", x.get("name", ""))]
    assert {n for n, _ in journals} == {f"baton-frontend-journal-{fe.proc.pid}" for fe in (fa, fb)} and \
        {u for _, u in journals} == {pub}, conns
    print(f"nkey-protected JetStream: both frontends journal there, connected as {pub[:8]}…", flush=True)

    # -- 3. a request on one loop, resumed on the other (same frontend, shared journal)
    # references first: the kill below comes while the held streams still run
    refs = {i: bl.stream_chat(fb.url, body(i), timeout=60).assert_ok(f"reference {i}")
            for i in range(100, 100 + EXTRA_STREAMS)}
    trial, held = 0, None
    for trial in range(40):
        b = body(trial)
        refs[trial] = bl.stream_chat(fb.url, b, timeout=60).assert_ok(f"reference {trial}")
        waits0 = cross_loop_waits(fa)
        s1, last1, text1 = held_stream(fa, b)
        s2, last2, text2 = held_stream(fa, b, headers={"Last-Event-ID": last1}, events=5)
        s1.close()
        crossed = cross_loop_waits(fa) > waits0
        if crossed and trial >= 2:
            held = (trial, b, s2, last2, text1 + text2)
            break
        s2.close()
        # the rest after the second client's last event, resumed on A again
        where = "across loops" if crossed else "on one loop"
        rest_matches(fa, b, last2, text1 + text2, refs[trial], f"trial {trial} (resumed {where})")
    assert held, f"in {trial + 1} trials no resume landed on the other event loop"
    print(f"two event loops: {trial + 1} resumes on frontend A, exact; the last one crossed loops", flush=True)

    # -- 4. kill -9 of A with that stream and 4 more held open: all resumed exactly on B
    open_streams = [held[:2] + held[3:]]
    sockets = [held[2]]
    for k in range(EXTRA_STREAMS):
        i = 100 + k
        b = body(i)
        s, last, text = held_stream(fa, b, events=2 + k)
        sockets.append(s)
        open_streams.append((i, b, last, text))
    adopted0 = sum(bl.metric_sum(bl.metrics(w.system_url), "baton_worker_orphan_events_total", event="adopted")
                   for w in workers)
    fa.proc.kill(signal.SIGKILL)
    assert fa.proc.wait(10) == -signal.SIGKILL
    for s in sockets:
        s.close()
    for i, b, last, text in open_streams:
        rest_matches(fb, b, last, text, refs[i], f"stream {i} resumed on B after A's death")
    fetched = re.findall(r"stream [0-9a-f]{32} fetched from JetStream", fb.proc.log_text())
    assert len(fetched) >= len(open_streams), f"B fetched {len(fetched)} streams from JetStream"
    adopted = sum(bl.metric_sum(bl.metrics(w.system_url), "baton_worker_orphan_events_total", event="adopted")
                  for w in workers) - adopted0
    print(f"failover: frontend A (2 loops) killed with {len(open_streams)} streams open; all resumed exactly on B "
          f"({adopted:.0f} re-attached to their orphans)", flush=True)

    # -- 5. B's journal counters
    m = bl.metrics(fb.url)
    pub_ok = bl.metric_sum(m, "baton_frontend_stream_journal_jetstream_messages_total", result="published")
    pub_err = bl.metric_sum(m, "baton_frontend_stream_journal_jetstream_messages_total", result="failed")
    dropped = bl.metric_sum(m, "baton_frontend_stream_journal_jetstream_dropped_total")
    assert pub_ok > 0 and pub_err == 0 and dropped == 0, (pub_ok, pub_err, dropped)
    assert bl.metric_sum(m, "baton_frontend_stream_journal_shared") == 1
    fetches = bl.metric_sum(m, "baton_frontend_stream_journal_jetstream_fetches_total", result="found")
    assert fetches == len(fetched), f"{fetches} fetches counted, {len(fetched)} logged"
    assert "baton_frontend_streams_handed_off_total" in m and m["baton_frontend_streams_handed_off_total"] == 0, \
        {k: v for k, v in m.items() if "handed" in k}

print("test_journal_js: ok")
