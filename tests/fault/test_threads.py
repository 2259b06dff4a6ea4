"""A frontend on several event loops (--threads 2: two loops in one process, one listening socket
each on the same port through SO_REUSEPORT), through the real binaries.

A request lives on the loop that accepted its connection; what must be one answer for the whole
process crosses loops. Checked here:
  - kill -9 of one of three workers under 60 streams and 10 non-streaming requests spread over both
    loops: every request ends exactly as its fault-free reference, the migrations are logged and
    counted once each (the /metrics the frontend answers is the merge of both loops), and the
    frontend is back to baseline;
  - both loops took requests (baton_frontend_thread_requests_total has a series per loop);
  - an operator cancel reaches its request whichever loop the cancel lands on; an unknown id is
    404 from every loop; a busy threshold set through one connection is what every loop reports;
  - --max-concurrent-requests and --max-connections are limits of the process, not of each loop;
  - SIGTERM drains the streams of both loops, which end complete, and the process exits 0;
  - a second signal while loop 1 still drains (loop 0 has finished) exits 143 at once;
  - a port another frontend with several loops listens on is in use: SO_REUSEPORT must not let a
    second process join it;
  - with the NATS event plane every loop keeps one steady connection (each loop's NATS client is
    driven from that loop's own thread), load reports arriving;
  - a loop that cannot open (no descriptors left) fails the start-up with exit 1, and what the
    loops before it opened is closed and freed (a leak is a report under ASan).
"""

import signal
import socket
import threading
import time

import batonlib as bl
import natslib as nl
from test_migration import MODEL, references, scenario_kill_one

THREADS = 2
STREAMS = range(60)
UNARY = range(100, 110)


def thread_requests(fe):
    m = bl.metrics(fe.url)
    out = {}
    for k, v in m.items():
        if k.startswith("baton_frontend_thread_requests_total{"):
            out[bl.parse_labels(k[k.index("{"):])["thread"]] = v
    return out


def spread(fe, start, first=8, most=40):
    """Starts streams with start(i) (i = 0, 1, ...): `first` of them, then more one at a time until
    both loops hold some. The kernel picks a connection's loop by a hash of its addresses, so a few
    connections may all land on one loop (1 in 128 for 8). Returns how many were started."""
    n = 0
    while n < first:
        start(n)
        n += 1
    while n < most:
        bl.wait_for(lambda: sum(thread_requests(fe).values()) == n, 10, 0.02, f"{n} requests to arrive")
        if all(v > 0 for v in thread_requests(fe).values()):
            return n
        start(n)
        n += 1
    raise AssertionError(f"{most} connections all landed on one loop: {thread_requests(fe)}")


def scenario_kill(refs):
    def both_loops_serve(fe, load):
        fe.proc.wait_log(r"frontend listening on .*2 threads", 5)
        per_thread = thread_requests(fe)
        print(f"threads: requests per loop {per_thread}")
        assert sorted(per_thread) == ["0", "1"], per_thread
        assert all(v > 0 for v in per_thread.values()), f"one loop took no request: {per_thread}"
        assert sum(per_thread.values()) == len(load.reqs), (per_thread, len(load.reqs))

    scenario_kill_one(refs, "t1", STREAMS, UNARY, fe_flags={"threads": THREADS}, on_load=both_loops_serve)


def scenario_operator():
    with bl.Cluster() as c:
        fe = c.start_frontend(threads=THREADS)
        c.start_worker(speedup_ratio=0.3)
        c.wait_workers(fe, 1)
        rids, ts = [], []
        live, streams = {}, {}

        def run(rid):
            def on_event(s, ev):
                live[rid] = s
                return False
            streams[rid] = bl.stream_chat(fe.url, bl.chat_body(f"operator {rid}", max_tokens=2000,
                                                               return_token_ids=True),
                                          headers={"X-Request-Id": rid}, on_event=on_event, timeout=60)

        def start(i):
            rids.append(f"op-{i}")
            ts.append(threading.Thread(target=run, args=(rids[-1],), daemon=True))
            ts[-1].start()

        spread(fe, start)
        bl.wait_for(lambda: len(live) == len(rids) and all(len(x.token_ids) >= 5 for x in list(live.values())), 30,
                    what="every stream to stream")
        per_thread = thread_requests(fe)
        assert all(per_thread.get(k, 0) > 0 for k in ("0", "1")), f"the streams are on one loop only: {per_thread}"
        for rid in rids:  # each cancel on a connection of its own: it lands on either loop
            st, _, b = bl.post_json(fe.url + f"/v1/requests/{rid}/cancel", {"mode": "stop"})
            assert st == 200 and b["request_id"] == rid and b["status"] == "cancelling", (rid, st, b)
        for t in ts:
            t.join(30)
            assert not t.is_alive(), "a stopped stream did not end"
        for rid in rids:
            s = streams[rid]
            s.assert_ok(f"operator stop of {rid}")
            assert s.finish_reason == "cancelled" and 5 <= len(s.token_ids) < 2000, s.summary()
        for i in range(6):
            st, _, b = bl.post_json(fe.url + f"/v1/requests/no-such-{i}/cancel", {"mode": "kill"})
            assert st == 404 and b["error"]["code"] == "request_not_found", (st, b)
        m = bl.metrics(fe.url)
        assert bl.metric_sum(m, "dynamo_frontend_model_cancellation_total", model=MODEL) == len(rids), m
        assert bl.metric_sum(m, "dynamo_frontend_requests_total", model=MODEL, status="cancelled") == len(rids)
        # a threshold set through one connection is every loop's
        st, _, b = bl.post_json(fe.url + "/busy_threshold", {"model": MODEL, "active_decode_blocks_threshold": 0.42})
        assert st == 200 and b["active_decode_blocks_threshold"] == 0.42, (st, b)
        seen = set()
        for _ in range(12):
            st, _, b = bl.get_json(fe.url + "/busy_threshold")
            assert st == 200, (st, b)
            seen.add(tuple(t["active_decode_blocks_threshold"] for t in b["thresholds"] if t["model"] == MODEL))
        assert seen == {(0.42,)}, f"the loops disagree on the threshold: {seen}"


def scenario_limits():
    with bl.Cluster() as c:
        fe = c.start_frontend(threads=THREADS, max_concurrent_requests=4, max_connections=12)
        c.start_worker(speedup_ratio=0.3)
        c.wait_workers(fe, 1)
        # 8 concurrent long streams, each on its own connection: exactly 4 run, 4 get 503
        results, lock = [], threading.Lock()
        started = threading.Barrier(8)

        def run(i):
            started.wait(10)
            s = bl.stream_chat(fe.url, bl.chat_body(f"limit {i}", max_tokens=150), timeout=60)
            with lock:
                results.append(s)

        ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        statuses = sorted(s.status for s in results)
        assert statuses == [200] * 4 + [503] * 4, statuses
        for s in results:
            if s.status == 200:
                s.assert_ok("a stream under the limit")
        m = bl.metrics(fe.url)
        assert m["baton_frontend_limit_rejections_total"] == 4, m["baton_frontend_limit_rejections_total"]
        assert thread_requests(fe).keys() == {"0", "1"}
        # 12 connections are the process's, whichever loop holds them: of 14, the last 2 are refused
        bl.wait_for(lambda: bl.metrics(fe.url)["baton_frontend_http_connections"] <= 1, 10, 0.05,
                    "the load's connections to close")
        held = []
        for _ in range(14):
            held.append(socket.create_connection(("127.0.0.1", fe.port), timeout=5))
            time.sleep(0.03)
        answered = []
        for i, s in enumerate(held):
            s.settimeout(0.3)
            try:
                data = s.recv(256)
            except socket.timeout:
                data = None  # accepted and waiting for a request
            answered.append(data)
        refused = [i for i, d in enumerate(answered) if d is not None]
        assert refused == [12, 13], f"connections answered at once: {refused} ({answered})"
        assert all(answered[i].startswith(b"HTTP/1.1 503") or answered[i] == b"" for i in refused), answered
        for s in held:
            s.close()
        # a scrape that races the closes may itself find the 12 slots taken and be refused (and
        # counted): each failed scrape allows one more rejection, none allows exactly the 2
        failed_scrapes = [0]

        def closed():
            try:
                return bl.metrics(fe.url)["baton_frontend_http_connections"] <= 1
            except Exception:
                failed_scrapes[0] += 1
                raise

        bl.wait_for(closed, 10, 0.05, "the held connections to close")
        m = bl.metrics(fe.url)
        rejected = m['baton_frontend_http_rejections_total{reason="max_connections"}']
        assert 2 <= rejected <= 2 + failed_scrapes[0], (rejected, failed_scrapes[0], m)


def scenario_drain():
    with bl.Cluster() as c:
        fe = c.start_frontend(threads=THREADS, shutdown_drain_timeout=30)
        c.start_worker(speedup_ratio=1)
        c.wait_workers(fe, 1)
        out = []

        def run(i):
            out.append(bl.stream_chat(fe.url, bl.chat_body(f"drain {i}", max_tokens=300, stream_options={"include_usage": True}), timeout=60))

        ts = []

        def start(i):
            ts.append(threading.Thread(target=run, args=(i,), daemon=True))
            ts[-1].start()

        n = spread(fe, start, first=12)
        bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_inflight_requests") == n, 10,
                    what=f"{n} streams in flight")
        per_thread = thread_requests(fe)
        assert all(per_thread.get(k, 0) > 0 for k in ("0", "1")), f"the streams are on one loop only: {per_thread}"
        fe.proc.kill(signal.SIGTERM)
        for t in ts:
            t.join(40)
        assert len(out) == n
        for s in out:
            s.assert_ok("a stream drained at shutdown")
            assert s.finish_reason == "length" and s.usage["completion_tokens"] == 300, s.summary()
        rc = fe.proc.wait(20)
        assert rc == 0, f"frontend exit status {rc}"
        log = fe.proc.log_text()
        assert log.count("frontend shutting down after") == THREADS, log[-2000:]


def scenario_second_signal():
    with bl.Cluster() as c:
        fe = c.start_frontend(threads=THREADS, shutdown_drain_timeout=60)
        c.start_worker(speedup_ratio=0.3)
        c.wait_workers(fe, 1)
        # one long stream on loop 1 and none on loop 0: a stream that lands on loop 0 is killed
        held = None
        for i in range(40):
            rid = f"late-{i}"
            before = thread_requests(fe)
            t = threading.Thread(target=bl.stream_chat, args=(fe.url, bl.chat_body(rid, max_tokens=2000)),
                                 kwargs={"headers": {"X-Request-Id": rid}, "timeout": 60}, daemon=True)
            t.start()
            bl.wait_for(lambda: sum(thread_requests(fe).values()) == sum(before.values()) + 1, 10, 0.02,
                        f"stream {rid} to arrive")
            if thread_requests(fe).get("1", 0) > before.get("1", 0):
                held = t
                break
            st, _, b = bl.post_json(fe.url + f"/v1/requests/{rid}/cancel", {"mode": "kill"})
            assert st == 200, (rid, st, b)
            t.join(30)
            assert not t.is_alive(), f"killed stream {rid} did not end"
        assert held is not None, f"40 connections all landed on loop 0: {thread_requests(fe)}"
        fe.proc.kill(signal.SIGTERM)
        fe.proc.wait_log(r"frontend shutting down after", 10)  # loop 0: nothing to drain
        time.sleep(0.5)  # loop 0 closes its handles (its signal handles too) and ends
        assert fe.proc.alive(), "the frontend exited with a stream still draining on loop 1"
        fe.proc.kill(signal.SIGTERM)
        rc = fe.proc.wait(5)
        assert rc == 128 + signal.SIGTERM, f"second signal: exit status {rc}, not 143 (forced)"
        fe.proc.wait_log(r"second signal: exiting at once", 1)
        held.join(10)


def scenario_port_in_use():
    with bl.Cluster() as c:
        fe = c.start_frontend(threads=THREADS)
        other = c.start_frontend(threads=THREADS, http_port=fe.port, wait=False)
        rc = other.proc.wait(10)
        assert rc is not None and rc != 0, f"a second frontend started on port {fe.port} in use (exit {rc})"
        assert "address already in use" in other.proc.log_text(), other.proc.log_tail()
        st, _, b = bl.get_json(fe.url + "/live")
        assert st == 200, (st, b)


def scenario_nats():
    with bl.Cluster() as c:
        ns = nl.NatsServer(c.dir).start()
        fe = c.start_frontend(threads=THREADS, event_plane="nats", nats_server=ns.url)
        c.start_worker(speedup_ratio=2, event_plane="nats", nats_server=ns.url)
        c.wait_workers(fe, 1)
        bl.wait_for(lambda: bl.metrics(fe.url)['baton_frontend_event_plane_connected{plane="nats"}'] == 1, 10, 0.05,
                    "every loop's NATS connection")
        for i in range(4):
            bl.stream_chat(fe.url, bl.chat_body(f"nats {i}", max_tokens=40), timeout=30).assert_ok("a stream")
        time.sleep(1)
        m = bl.metrics(fe.url)
        assert m['baton_frontend_event_plane_connected{plane="nats"}'] == 1, m
        assert m["baton_frontend_event_plane_connects_total"] == THREADS, m["baton_frontend_event_plane_connects_total"]
        assert m['baton_frontend_event_plane_messages_total{result="applied"}'] > 0, m
        assert "NATS connection to" not in fe.proc.log_text(), fe.proc.log_tail()


def scenario_startup_failure():
    with bl.Cluster() as c:
        args = ["sh", "-c", 'ulimit -n 40 && exec "$@"', "sh", c.bin, "frontend", "--http-host", "127.0.0.1",
                "--http-port", bl.free_port(), "--threads", 16, "--discovery-dir", c.discovery_dir]
        # at debug, each loop's HTTP server says it listens: the first does, the failure comes later
        proc = bl.Proc(args, env=dict(c.env, DYN_LOG="debug"), log=c._log("frontend"), name="frontend:40-fds")
        rc = proc.wait(20)
        log = proc.log_text()
        assert rc == 1, f"exit status {rc} with 40 descriptors for 16 loops: {log[-1500:]}"
        assert "http: listening on" in log and "frontend listening on" not in log, log[-1500:]
        report = proc.sanitizer_report()
        assert report is None, report


def main():
    bl.deadline(300, "test_threads")
    refs = references(STREAMS, UNARY)
    scenario_kill(refs)
    scenario_operator()
    scenario_limits()
    scenario_drain()
    scenario_second_signal()
    scenario_port_in_use()
    scenario_startup_failure()
    scenario_nats()
    print("test_threads: OK")


if __name__ == "__main__":
    main()
