"""What the processes log says what happens: start-up lines, a frontend's disconnect on a worker, a
stale NATS connection. One cluster on etcd and NATS: two frontends, one worker.

1. Start-up: the etcd discovery line names no lease TTL on a frontend (it holds no lease); the
   worker says its TTL when its lease is granted. Each HTTP port is logged once: the worker's
   status server (not also by the HTTP server under it), the frontend's listening address.
2. A frontend killed with a streamed request (kept as an orphan) and a unary one (killed) on the
   worker: the worker logs, in this order, the disconnect with the 2 streams running, each
   stream's fate, and the count of each ("of its 2 streams, 1 kept as orphan, 1 killed"); never a
   line saying its streams stop before one is kept.
3. nats-server paused (SIGSTOP): the connection is found stale by unanswered pings, and the worker
   and the frontend log it as such ("lost (stale: no answer to 2 pings in 10 s)"), not as a closed
   socket; once resumed they reconnect, and a nats-server killed then is "lost (socket closed)".
"""

import os
import re
import signal
import threading
import time

import batonlib as bl
import natslib

bl.deadline(120, "test_log_lines")


def lines(proc, pattern):
    return re.findall(r"(?m)^.*" + pattern + r".*$", proc.log_text())


with bl.Cluster() as c:
    etcd = bl.Etcd(1, dir=c.dir).start()
    # with JetStream the frontends share their journal, and a streamed request names its stream to
    # the worker, which then keeps it as an orphan when its frontend dies
    nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}').start()
    common = dict(discovery="etcd", etcd_endpoints=etcd.endpoints, event_plane="nats", nats_server=nats.url)
    fe = c.start_frontend(**common)
    fe2 = c.start_frontend(**common)
    w = c.start_worker(system_port=True, wait=True, speedup_ratio=0.5, **common)
    c.wait_workers(fe, 1)
    c.wait_workers(fe2, 1)
    for p in (fe, w):
        p.proc.wait_log(r"NATS connected to ", timeout=10)

    # --- 1. start-up lines
    disc = lines(fe.proc, r"frontend\[\d+\]: discovery\(etcd\): endpoints ")
    assert len(disc) == 1 and "TTL" not in disc[0], disc
    w.proc.wait_log(r"etcd: lease [0-9a-f]+ granted via \S+ \(TTL 10 s, refreshed every \d+ ms\)", timeout=10)
    assert not lines(fe.proc, r"TTL"), lines(fe.proc, r"TTL")
    status = lines(w.proc, rf"listening on \S+:{w.system_url.rsplit(':', 1)[1]}\b")
    assert len(status) == 1 and "status server listening on" in status[0], status
    front = lines(fe.proc, rf"listening on \S+:{fe.port}\b")
    assert len(front) == 1 and "frontend listening on http://" in front[0], front

    # --- 2. a frontend's disconnect, as the worker tells it
    results = {}

    def run(name, fn):
        results[name] = fn()

    threads = [threading.Thread(target=run, args=("stream", lambda: bl.stream_completion(
                   fe2.url, bl.completion_body("orphaned", max_tokens=2000, stream=True), timeout=30))),
               threading.Thread(target=run, args=("unary", lambda: bl.request(
                   "POST", fe2.url + "/v1/completions", bl.completion_body("killed", max_tokens=2000), timeout=30)))]
    for t in threads:
        t.start()
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(w.system_url), "baton_worker_engine_submits_total") >= 2, 10,
                what="both requests on the worker")
    time.sleep(0.3)
    # the NATS pause of part 3 starts now: its ~10-15 s run alongside the rest
    nats.proc.kill(signal.SIGSTOP)
    t_pause = time.monotonic()
    fe2.proc.kill(signal.SIGKILL)
    for t in threads:
        t.join(35)
    summary = w.proc.wait_log(r"frontend (\S+): of its 2 streams, 1 kept as orphan, 1 killed", timeout=10)
    peer = re.escape(summary.group(1))
    log = w.proc.log_text()
    first = re.search(rf"frontend {peer} disconnected \([^)]*\) with 2 streams running", log)
    kept = re.search(r"request \S+: frontend connection lost after \d+ new tokens; kept as an orphan", log)
    killed = re.search(r"request \S+ killed \(frontend connection lost\)", log)
    assert first and kept and killed, log[-3000:]
    assert first.start() < kept.start() < summary.start() and first.start() < killed.start() < summary.start(), \
        f"out of order:\n{first.group(0)}\n{kept.group(0)}\n{killed.group(0)}\n{summary.group(0)}"
    assert "streams stop" not in log, log[-3000:]

    # --- 3. a stale NATS connection, and then a closed one
    stale = r"NATS connection to nats://127\.0\.0\.1:\d+ lost \(stale: no answer to 2 pings in 10 s\)"
    for p in (w, fe):
        p.proc.wait_log(stale, timeout=25)
    took = time.monotonic() - t_pause
    for p in (w, fe):
        assert not lines(p.proc, r"lost \(socket closed\)"), lines(p.proc, r"lost \(")
    nats.proc.kill(signal.SIGCONT)
    for p in (w, fe):
        bl.wait_for(lambda: len(lines(p.proc, r"NATS connected to ")) == 2, 15, what="the reconnect after SIGCONT")
    nats.kill()
    for p in (w, fe):
        p.proc.wait_log(r"NATS connection to nats://127\.0\.0\.1:\d+ lost \(socket closed\)", timeout=10)
    print(f"test_log_lines: start-up lines once each; a disconnect told in order; stale NATS found in {took:.1f} s")

print("test_log_lines: ok")
