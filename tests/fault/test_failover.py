"""Frontend failover through a real load balancer (docs/fault-tolerance.md, "Frontend failover").

Two frontends (event plane NATS, so their stream journal is shared through JetStream) behind
HAProxy, two mocker workers, one nats-server -js, all started here. Clients stream through
HAProxy; one frontend is killed with SIGKILL mid-stream; every client whose connection broke
re-POSTs through HAProxy with Last-Event-ID (landing on the surviving frontend) until [DONE], and
its answer put together must equal an uncut run byte for byte (text, token ids, finish reason,
usage, chunk id and created). Two rounds:

  * worker alive: the streams of the dead frontend are re-attached to their orphans on the
    workers (baton_worker_orphan_events_total{event="adopted"} counts each of them) and no
    sequence is prefilled again: the workers' engine submissions grow by exactly the number of
    streams started;
  * worker killed too: a frontend and a worker are killed together; streams of the dead
    frontend on the live worker re-attach, those on the dead worker continue by migration from
    the journal's tokens (on the other worker), and every answer is still exact.

  * SIGTERM drain: a frontend is stopped with --shutdown-drain-timeout 1 while its streams need
    ~5 s more: at the bound each of them ends cleanly (200, no error event, no [DONE]), the
    client resumes through HAProxy, its stream is re-attached on its worker, nothing is prefilled
    again, and the answer is exact (the whole answer put together equals the uncut run: the
    resumed rest is exact); baton_frontend_streams_handed_off_total is exported, and its final
    value (logged at the bound, as the process exits) equals the number of streams handed off.

Also checked: the JetStream stream's bounds (MaxAge = retention + 1 h, MaxBytes = the journal's
cap, from nats-server's /jsz), and that a finished stream's messages are purged by subject once its
retention has passed (--stream-retention 1 on a third frontend). Without JetStream (nats-server without -js) a frontend says so at start-up and keeps
the in-process journal; the start-up line naming JetStream; the survivor fetched the streams
from JetStream (its log).
"""

import os
import re
import signal
import subprocess
import threading
import time

import batonlib as bl
import natslib

bl.deadline(240, "test_failover")

N = 8
MAX_TOKENS = 160
WORKER = dict(speedup_ratio=0.5, event_plane="nats", orphan_grace=30)


def body(i, max_tokens=MAX_TOKENS):
    extra = {"return_token_ids": True, "stream_options": {"include_usage": True}}
    if i % 2:
        extra.update(temperature=0.7, seed=500 + i)
    return bl.chat_body(f"failover prompt {i}", max_tokens=max_tokens, **extra)


def chunk_meta(s):
    return {(e.get("id"), e.get("created")) for e in s.events if isinstance(e, dict) and "choices" in e}


def check_exact(pieces, ref):
    text = "".join(p.text for p in pieces)
    ids = [t for p in pieces for t in p.token_ids]
    # a gateway error that the client retried is not part of its answer; any other error is
    errs = [p.error for k, p in enumerate(pieces)
            if p.error and not (k < len(pieces) - 1 and p.status in (502, 503, 504))]
    if errs:
        return f"errors {errs}"
    if not pieces[-1].done:
        return "no [DONE]"
    if ids != ref.token_ids:
        return f"token ids differ: {len(ids)} vs {len(ref.token_ids)}"
    if text != ref.text:
        return "text differs"
    fr = next((p.finish_reason for p in reversed(pieces) if p.finish_reason), None)
    us = next((p.usage for p in reversed(pieces) if p.usage), None)
    if fr != ref.finish_reason or us != ref.usage:
        return f"end differs: {fr} {us} vs {ref.finish_reason} {ref.usage}"
    meta = set().union(*(chunk_meta(p) for p in pieces))
    if meta != chunk_meta(ref) and len(meta) != 1:
        return f"chunk id/created differ: {meta}"
    return None


class HAProxy:
    def __init__(self, d, backends):
        self.port = bl.free_port()
        self.cfg = os.path.join(d, "haproxy.cfg")
        servers = "\n".join(f"    server fe{i} 127.0.0.1:{p} check inter 200 fall 1 rise 2"
                            for i, p in enumerate(backends))
        with open(self.cfg, "w") as f:
            f.write(f"""global
    maxconn 512
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
frontend fe
    bind 127.0.0.1:{self.port}
    default_backend frontends
backend frontends
    balance roundrobin
    option httpchk GET /live
{servers}
""")
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = bl.Proc(["/usr/sbin/haproxy", "-db", "-f", self.cfg], log=os.path.join(d, "haproxy.log"),
                            name=f"haproxy:{self.port}")
        bl.wait_for(lambda: self._up(), 10, what="haproxy listening")

    def _up(self):
        try:
            return bl.request("GET", self.url + "/live", timeout=2)[0] == 200
        except OSError:
            return False


def client(url, i, out, deaths, max_tokens):
    """Streams body(i) through the balancer, resuming with Last-Event-ID after every break."""
    pieces, last = [], None
    for _ in range(10):
        hdrs = {"Last-Event-ID": last} if last else None
        s = bl.stream_chat(url, body(i, max_tokens), headers=hdrs, timeout=60)
        if last is not None and s.t_tokens and deaths:
            out.setdefault("gaps", []).append(s.t_tokens[0] - deaths[0])
        pieces.append(s)
        # a gateway error (the balancer's request reached the dying frontend) is retried like a cut
        if s.done or s.status not in (200, 502, 503, 504, None):
            break
        last = s.last_event_id or last
        time.sleep(0.05)
    out[i] = pieces


def wsum(workers, name, **labels):
    return sum(bl.metric_sum(bl.metrics(w.system_url), name, **labels) for w in workers)


def jsz_stream(nats, name):
    """The JetStream stream `name` as nats-server's monitoring /jsz reports it (config and state)."""
    import json as _json
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{nats.http_port}/jsz?streams=true&config=true", timeout=5) as r:
        j = _json.loads(r.read())
    for acc in j.get("account_details") or []:
        for st in acc.get("stream_detail") or []:
            if st.get("name") == name:
                return st
    return None


def run_round(cl, lb, fes, workers, kill_worker, drain=False, max_tokens=MAX_TOKENS):
    refs = [bl.stream_chat(fes[1].url, body(i, max_tokens), timeout=60).assert_ok("reference") for i in range(N)]
    sub0 = wsum(workers, "baton_worker_engine_submits_total")
    adopted0 = wsum(workers, "baton_worker_orphan_events_total", event="adopted")
    out, deaths = {}, []
    threads = [threading.Thread(target=client, args=(lb.url, i, out, deaths, max_tokens)) for i in range(N)]
    for t in threads:
        t.start()
    victim = fes[0]
    # every stream has started and none has finished: the kill lands mid-stream
    bl.wait_for(lambda: wsum(workers, "dynamo_component_inflight_requests") >= N, 20, what="all streams running")
    time.sleep(0.4)
    victims = [victim.proc] + ([workers[0].proc] if kill_worker else [])
    for p in victims:
        p.kill(signal.SIGTERM if drain else signal.SIGKILL)
    deaths.append(time.monotonic())
    for p in victims:
        want = 0 if drain else -signal.SIGKILL
        assert p.wait(20) == want, f"{p.name} exited with {p.returncode}, not {want}"
    for t in threads:
        t.join(90)
    assert len([k for k in out if isinstance(k, int)]) == N, "a client did not finish"
    cut = [i for i in range(N) if len(out[i]) > 1]
    assert cut, "no stream was cut: the kill missed every stream"
    bad = {i: check_exact(out[i], refs[i]) for i in range(N)}
    bad = {i: v for i, v in bad.items() if v}
    assert not bad, f"inexact answers after failover: {bad}"
    live = [w for w in workers if w.proc.alive()]
    adopted = wsum(live, "baton_worker_orphan_events_total", event="adopted") - (adopted0 if not kill_worker else 0)
    return refs, out, cut, sub0, adopted, deaths


with bl.Cluster() as cl:
    d = cl.dir
    # -- no JetStream: said at start-up, the in-process journal stays ---------------------------
    plain = natslib.NatsServer(d, name="nats-plain").start()
    fe0 = cl.start_frontend(event_plane="nats", nats_server=plain.url)
    fe0.proc.wait_log(r"NATS server at \S+ has no JetStream \(start it with -js\): keeping the in-process journal",
                      timeout=15)
    fe0.proc.kill(signal.SIGKILL)
    fe0.proc.wait(10)
    cl.frontends.remove(fe0)

    nats = natslib.NatsServer(d, config=f'jetstream {{ store_dir: "{os.path.join(d, "js")}" }}', name="nats-js").start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    workers = [cl.start_worker(system_port=True, wait=True, nats_server=nats.url, **WORKER) for _ in range(2)]
    ports = [bl.free_port(), bl.free_port()]
    fes = [cl.start_frontend(http_port=p, **plane) for p in ports]
    for fe in fes:
        fe.proc.wait_log(r"resumable streams: journal shared through NATS JetStream at \S+ \(stream BATON_JOURNAL_",
                         timeout=15)
        cl.wait_workers(fe, 2)
    lb = HAProxy(d, ports)

    # -- the JetStream stream: its bounds, and finished streams purged after their retention -----
    st = jsz_stream(nats, "BATON_JOURNAL_dynamo")
    assert st, "no JetStream stream BATON_JOURNAL_dynamo"
    cfg = st["config"]
    assert cfg["max_age"] == (300 + 3600) * 10**9 and cfg["max_bytes"] == 268435456, cfg
    short = cl.start_frontend(stream_retention=1, **plane)
    short.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
    cl.wait_workers(short, 2)
    before = jsz_stream(nats, "BATON_JOURNAL_dynamo")["state"]["messages"]
    s = bl.stream_chat(short.url, body(99, 20), timeout=30).assert_ok("short-retention stream")
    subj = f"baton.journal.dynamo.{s.headers['x-stream-id']}"
    bl.wait_for(lambda: jsz_stream(nats, "BATON_JOURNAL_dynamo")["state"]["messages"] > before, 5,
                what="the stream's messages stored in JetStream")
    bl.wait_for(lambda: jsz_stream(nats, "BATON_JOURNAL_dynamo")["state"]["messages"] == before, 10,
                what=f"the finished stream's messages ({subj}) purged after its 1 s retention")
    short.proc.kill(signal.SIGTERM)
    short.proc.wait(10)
    cl.frontends.remove(short)

    # -- round 1: the frontend dies, the workers live: re-attachment -----------------------------
    refs, out, cut, sub0, adopted, deaths = run_round(cl, lb, fes, workers, kill_worker=False)
    subs = wsum(workers, "baton_worker_engine_submits_total") - sub0
    print(f"round 1: {len(cut)} of {N} streams cut and resumed; {adopted} re-attached; engine submits {subs}; "
          f"death -> next token {sorted(round(g * 1000) for g in out.get('gaps', []))} ms")
    assert subs == N, f"{subs} sequences went into the engines for {N} streams: something was prefilled again"
    assert adopted == len(cut), f"{adopted} re-attachments for {len(cut)} resumed streams"
    assert re.search(r"stream [0-9a-f]{32} fetched from JetStream", fes[1].proc.log_text()), \
        "the survivor never fetched a stream from JetStream"

    # -- round 2: a frontend and a worker die together ------------------------------------------
    cl.frontends.remove(fes[0])
    fes[0] = cl.start_frontend(http_port=ports[0], **plane)
    cl.wait_workers(fes[0], 2)
    bl.wait_for(lambda: lb._up(), 10, what="haproxy sees the restarted frontend")
    time.sleep(1.0)  # two health checks: both frontends in rotation again
    refs, out, cut, sub0, adopted, deaths = run_round(cl, lb, fes, workers, kill_worker=True)
    print(f"round 2: {len(cut)} of {N} streams cut and resumed, exact; death -> next token "
          f"{sorted(round(g * 1000) for g in out.get('gaps', []))} ms")

    # -- round 3: SIGTERM drain: what is not finished within the bound is handed off ---------------
    cl.frontends.remove(fes[0])
    workers = [workers[1], cl.start_worker(system_port=True, wait=True, nats_server=nats.url, **WORKER)]
    fes[0] = cl.start_frontend(http_port=ports[0], shutdown_drain_timeout=1, **plane)
    for fe in fes:
        cl.wait_workers(fe, 2)
    time.sleep(1.0)
    m0 = bl.metrics(fes[0].url)
    assert "baton_frontend_streams_handed_off_total" in m0 and m0["baton_frontend_streams_handed_off_total"] == 0, \
        "the hand-off counter is not exported"
    refs, out, cut, sub0, adopted, deaths = run_round(cl, lb, fes, workers, kill_worker=False, drain=True,
                                                      max_tokens=400)
    subs = wsum(workers, "baton_worker_engine_submits_total") - sub0
    print(f"round 3: {len(cut)} of {N} streams handed off at the drain bound and resumed; {adopted} re-attached; "
          f"engine submits {subs}")
    for i in cut:
        first = out[i][0]
        assert first.status == 200 and first.error is None and not first.done and first.exception is None, \
            f"a handed-off stream did not end cleanly: {first.summary()}"
    assert subs == N and adopted == len(cut), f"submits {subs}, re-attached {adopted} of {len(cut)}"
    assert fes[0].proc.wait_log(r"handed off after \d+ tokens at the shutdown bound", timeout=1)
    # the counter's last value (the process has exited: its log says it) is the number of streams cut
    counted = [int(n) for n in re.findall(r"(\d+) streams handed off at the shutdown bound "
                                          r"\(baton_frontend_streams_handed_off_total\)", fes[0].proc.log_text())]
    assert counted == [len(cut)], f"hand-off counter {counted}, {len(cut)} streams handed off"
    lb.proc.kill(signal.SIGTERM)

print("test_failover: ok")
