"""NATS event plane through the real binaries and a real nats-server on a free loopback port.

Workers publish Dynamo's ActiveLoad JSON on namespace.dynamo.kv_metrics; the frontend subscribes.
A raw-socket NATS client written here (the protocol is text: CONNECT, SUB, PUB, MSG, PING/PONG)
reads the subject and publishes on it. Checked, in order:

  1. frontend and workers started while NATS is down serve anyway, and connect once it appears;
  2. every message on the subject is a well-formed ActiveLoad naming one of the two workers, both
     workers are heard from, and under load the reports and the frontend's per-worker gauges move;
  3. the frontend acts on what arrives over NATS: a report the test publishes for an idle worker
     shows in its gauges and makes it busy, both reported full gives 503 "busy", reports for an
     unknown worker or malformed ones are counted and ignored, and everything returns to normal;
  4. shedding follows real load with NATS up (reports arrive on both planes);
  5. nats-server killed with SIGKILL and restarted under streaming load: zero errors, every stream
     byte-exact against its fault-free reference, requests completed during the outage, the
     request-plane reports keep flowing while the event-plane ones stop, and afterwards the
     frontend and both workers reconnect and new reports arrive from both;
  6. shedding follows real load after the restart, and again with NATS down (request-plane
     fallback: the event-plane counters do not move while decisions are made);
  7. return to baseline: nothing in flight, both workers routable, none busy, a fresh request ok.

Every checker that decides pass or fail is fed a doctored input once and must reject it.
"""

import json
import re
import socket
import threading
import time

import batonlib as bl
import natslib

bl.deadline(280, "test_nats")

SUBJECT = "namespace.dynamo.kv_metrics"
WORKER = dict(speedup_ratio=4, num_gpu_blocks_override=64, block_size=16)
MAX_TOKENS = 160
ACTIVE_LOAD_FIELDS = ("worker_id", "dp_rank", "active_decode_blocks", "active_prefill_tokens", "total_blocks",
                      "waiting", "running", "ready")


class RawNats:
    """A minimal NATS client: subscribes to one subject and records (time, payload) of each MSG;
    can publish. Its reader thread answers the server's PINGs."""

    def __init__(self, port, subject):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.rf = self.sock.makefile("rb")
        self.wlock = threading.Lock()
        self.msgs = []
        self.lock = threading.Lock()
        line = self.rf.readline()
        assert line.startswith(b"INFO "), line
        self._send(b'CONNECT {"verbose":false,"pedantic":false,"name":"test_nats"}\r\nSUB ' + subject.encode()
                   + b" 1\r\nPING\r\n")
        while True:
            line = self.rf.readline()
            if line.startswith(b"PONG"):
                break
            if not line or line.startswith(b"-ERR"):
                raise AssertionError(f"NATS handshake failed: {line!r}")
        self.sock.settimeout(None)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _send(self, data):
        with self.wlock:
            self.sock.sendall(data)

    def _read(self):
        try:
            while True:
                line = self.rf.readline()
                if not line:
                    return
                if line.startswith(b"MSG "):
                    n = int(line.split()[-1])
                    data = self.rf.read(n + 2)[:n]
                    with self.lock:
                        self.msgs.append((time.monotonic(), data))
                elif line.startswith(b"PING"):
                    self._send(b"PONG\r\n")
        except (OSError, ValueError):
            return

    def publish(self, subject, payload):
        self._send(f"PUB {subject} {len(payload)}\r\n".encode() + payload + b"\r\n")

    def since(self, t=0.0):
        with self.lock:
            return [json.loads(d) for tm, d in self.msgs if tm >= t]

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def check_active_load(msg, ids, total_blocks=64):
    """An ActiveLoad as baton publishes it: every field, integer counts, a known worker."""
    assert isinstance(msg, dict), msg
    for k in ACTIVE_LOAD_FIELDS:
        assert k in msg, f"ActiveLoad without {k}: {msg}"
    assert msg["worker_id"] in ids, f"ActiveLoad from unknown worker {msg['worker_id']} (known {ids}): {msg}"
    assert msg["dp_rank"] == 0, msg
    for k in ("active_decode_blocks", "active_prefill_tokens", "total_blocks", "waiting", "running"):
        assert isinstance(msg[k], int) and not isinstance(msg[k], bool) and msg[k] >= 0, f"bad {k}: {msg}"
    assert msg["total_blocks"] == total_blocks, msg
    assert msg["active_decode_blocks"] <= msg["total_blocks"], msg
    assert isinstance(msg["ready"], bool), msg


def body(i, max_tokens=MAX_TOKENS):
    return bl.chat_body(f"nats prompt {i % 7}", max_tokens=max_tokens, return_token_ids=True)


def references(fe):
    refs = {}
    for i in range(7):
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(i))
        assert st == 200, b
        refs[i] = b["choices"][0]["token_ids"]
        assert len(refs[i]) == MAX_TOKENS, len(refs[i])
    return refs


def check_stream(s, i, refs, what):
    s.assert_ok(what)
    if s.token_ids != refs[i]:
        raise AssertionError(f"{what}: tokens differ from the reference of prompt {i} "
                             f"(got {len(s.token_ids)}, first difference at "
                             f"{next((k for k, (a, b) in enumerate(zip(s.token_ids, refs[i])) if a != b), None)})")


def hexid(i):
    return format(i, "x")


def gauge(m, name, wid):
    return bl.metric_sum(m, name, worker_id=hexid(wid))


def reports(m, wid, source):
    return bl.metric_sum(m, "baton_frontend_worker_load_reports_total", worker_id=hexid(wid), source=source)


def fe_connected(fe):
    return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_event_plane_connected", plane="nats")


def set_threshold(fe, value):
    st, _, b = bl.post_json(fe.url + "/busy_threshold", {"model": "mock-model", "active_decode_blocks_threshold": value})
    assert st == 200 and b["active_decode_blocks_threshold"] == value, (st, b)


def self_checks(refs, ids):
    """The checkers must reject doctored input."""
    good = {"worker_id": ids[0], "dp_rank": 0, "active_decode_blocks": 3, "active_prefill_tokens": 0,
            "total_blocks": 64, "waiting": 0, "running": 1, "max_num_batched_tokens": 8192, "ready": True}
    check_active_load(good, ids)
    for broken in (dict(good, worker_id=12345), {k: v for k, v in good.items() if k != "total_blocks"},
                   dict(good, active_decode_blocks=-1), dict(good, active_decode_blocks=65), dict(good, ready=1),
                   dict(good, waiting=1.5), dict(good, dp_rank=1)):
        try:
            check_active_load(broken, ids)
        except AssertionError:
            continue
        raise AssertionError(f"check_active_load accepted {broken}")

    class Fake:
        def __init__(self, ids, ok=True):
            self.token_ids, self._ok = ids, ok

        def assert_ok(self, what):
            if not self._ok:
                raise AssertionError(what)

    check_stream(Fake(refs[0]), 0, refs, "self-check (good)")
    for broken in (Fake(refs[0][:-1]), Fake(refs[0][:5] + [refs[0][5] + 1] + refs[0][6:]), Fake(refs[0], ok=False),
                   Fake(refs[1])):
        try:
            check_stream(broken, 0, refs, "self-check")
        except AssertionError:
            continue
        raise AssertionError("check_stream accepted a broken stream")


def spoof_check(fe, sub, ids):
    """The frontend acts on ActiveLoad reports that arrive over NATS (published here, in Dynamo's
    shape plus total_blocks) — gauges, the busy predicate, 503 — and ignores bad ones."""
    set_threshold(fe, 0.5)
    stop = threading.Event()
    marker = 61  # a value no real report of an idle worker carries

    def spam():
        while not stop.is_set():
            for wid in ids:
                sub.publish(SUBJECT, json.dumps({"worker_id": wid, "dp_rank": 0, "active_decode_blocks": marker,
                                                 "active_prefill_tokens": None, "total_blocks": 64}).encode())
            time.sleep(0.01)
    t = threading.Thread(target=spam)
    t.start()
    try:
        seen = {wid: False for wid in ids}
        busy = {wid: False for wid in ids}

        def all_seen():
            m = bl.metrics(fe.url)
            for wid in ids:
                seen[wid] = seen[wid] or gauge(m, "baton_frontend_worker_active_decode_blocks", wid) == marker
                busy[wid] = busy[wid] or gauge(m, "baton_frontend_worker_busy", wid) == 1
            return all(seen.values()) and all(busy.values())
        bl.wait_for(all_seen, 15, interval=0.02, what=f"NATS-published reports in the frontend gauges "
                                                      f"(seen {seen}, busy {busy})")
        # both workers reported full over NATS: a new request is shed
        rejected = None
        for _ in range(100):
            st, hdrs, b = bl.post_json(fe.url + "/v1/chat/completions", body(0, max_tokens=4))
            if st == 503:
                rejected = (hdrs, b)
                break
            assert st == 200, (st, b)
            time.sleep(0.02)
        assert rejected, "no request was shed while NATS said both workers are full"
        assert "busy" in rejected[1]["error"]["message"] and rejected[0].get("retry-after"), rejected
    finally:
        stop.set()
        t.join()
    # unknown worker and malformed reports: counted, ignored
    m0 = bl.metrics(fe.url)
    sub.publish(SUBJECT, json.dumps({"worker_id": 987654321, "active_decode_blocks": 64, "total_blocks": 64}).encode())
    for bad in (b"not json", b'{"worker_id":"x"}', b'{"worker_id":1,"active_decode_blocks":-5}'):
        sub.publish(SUBJECT, bad)
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_event_plane_messages_total",
                                      result="invalid") >= bl.metric_sum(m0, "baton_frontend_event_plane_messages_total",
                                                                         result="invalid") + 3,
                10, what="malformed reports counted as invalid")
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_event_plane_messages_total",
                                      result="unknown_worker") >= 1, 10, what="unknown-worker report counted")
    # the real reports (every second on both planes) take over again: not busy, requests pass
    bl.wait_for(lambda: all(gauge(bl.metrics(fe.url), "baton_frontend_worker_busy", wid) == 0 for wid in ids), 15,
                what="workers no longer busy after the published reports stopped")
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(0, max_tokens=4))
    assert st == 200, (st, b)
    set_threshold(fe, None)
    print(f"spoof check: frontend applied NATS reports for {len(ids)} workers, shed with 503, ignored bad ones")


def shed_check(fe, refs, ids, label, source):
    """With a low threshold, real load makes a worker busy (gauge), some requests are shed with a
    well-formed 503, admitted streams are exact, and busy-ness clears when the load ends. `source`
    is where the frontend must have taken the load from meanwhile: "event_plane" (NATS up: the LOAD
    frames, duplicates, go unused) or "request_plane" (NATS down: the fallback)."""
    m0 = bl.metrics(fe.url)
    set_threshold(fe, 0.3)
    busy_seen = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            m = bl.metrics(fe.url)
            for wid in ids:
                if gauge(m, "baton_frontend_worker_busy", wid) == 1:
                    busy_seen.add(wid)
            time.sleep(0.02)
    t = threading.Thread(target=watch)
    t.start()
    try:
        jobs = [(fe.url, body(i)) for i in range(14)]
        res = bl.run_concurrently(lambda u, b: bl.stream_chat(u, b, timeout=120), jobs, max_workers=14)
    finally:
        time.sleep(0.1)
        stop.set()
        t.join()
    ok, rejected = 0, 0
    for (_, b), s in zip(jobs, res):
        if s.status == 503:
            err = json.loads(s.body)["error"]
            assert err["code"] == "overloaded" and "busy" in err["message"] and s.headers.get("retry-after"), s.summary()
            rejected += 1
            continue
        check_stream(s, int(b["messages"][0]["content"].split()[-1]), refs, f"admitted stream ({label})")
        ok += 1
    assert busy_seen, f"{label}: no worker was ever reported busy under 14 long requests at threshold 0.3"
    assert ok >= 2, f"{label}: only {ok} admitted"
    bl.wait_for(lambda: all(gauge(bl.metrics(fe.url), "baton_frontend_worker_busy", wid) == 0 for wid in ids), 15,
                what=f"busy to clear after the load ({label})")
    set_threshold(fe, None)
    m1 = bl.metrics(fe.url)
    used = {src: sum(reports(m1, w, src) - reports(m0, w, src) for w in ids)
            for src in ("event_plane", "request_plane", "request_plane_unused")}
    other = "request_plane" if source == "event_plane" else "event_plane"
    assert used[source] >= 10, f"{label}: only {used[source]} reports applied from the {source}: {used}"
    # a report gap of more than 2 s under load would hand a worker back to its LOAD frames for a moment
    assert used[other] <= max(2, used[source] // 20), f"{label}: load taken from the {other}: {used}"
    print(f"shedding {label}: busy workers {sorted(hexid(w) for w in busy_seen)}, {ok} admitted, {rejected} shed; "
          f"reports applied {used}")
    return ok, rejected


class Traffic:
    """n clients streaming in a loop; every stream must match its reference."""

    def __init__(self, fe, refs, n=6):
        self.fe, self.refs, self.stop = fe, refs, threading.Event()
        self.done, self.failures, self.lock = [], [], threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(k,)) for k in range(n)]
        for t in self.threads:
            t.start()

    def run(self, k):
        i = k
        while not self.stop.is_set():
            s = bl.stream_chat(self.fe.url, body(i), timeout=60)
            try:
                check_stream(s, i % 7, self.refs, "stream under NATS restart")
                with self.lock:
                    self.done.append(time.monotonic())
            except AssertionError as e:
                with self.lock:
                    self.failures.append(str(e))
            i += 1

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()
        return self.done, self.failures


with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir)  # not started yet: the processes start while NATS is down
    port, url = nats.port, nats.url
    plane = dict(event_plane="nats", nats_server=url)

    # --- 1. everything starts while NATS is down, and serves
    fe = c.start_frontend(**plane)
    workers = [c.start_worker(**WORKER, **plane) for _ in range(2)]
    insts = c.wait_workers(fe, 2)
    ids = sorted(i["instance_id"] for i in insts)
    refs = references(fe)
    self_checks(refs, ids)
    for w in workers:
        w.proc.wait_log(r"NATS server nats://127\.0\.0\.1:\d+ is not reachable yet", timeout=10)
    m = bl.metrics(fe.url)
    assert fe_connected(fe) == 0 and bl.metric_sum(m, "baton_frontend_event_plane_connects_total") == 0
    assert all(reports(m, wid, "event_plane") == 0 for wid in ids), "event-plane reports without a server"
    nats.start()
    bl.wait_for(lambda: fe_connected(fe) == 1, 20, what="frontend connected to NATS after it started")
    for w in workers:
        w.proc.wait_log(r"NATS connected to nats://127\.0\.0\.1:\d+ \(publishing on " + SUBJECT.replace(".", r"\.")
                        + r"\)", timeout=20)
    print("started with NATS down: served, then connected")

    # --- 2. messages on the subject; gauges follow under load
    sub = RawNats(port, SUBJECT)
    t0 = time.monotonic()
    bl.wait_for(lambda: {msg["worker_id"] for msg in sub.since(t0)} >= set(ids), 15,
                what="ActiveLoad messages from both workers")
    peak = {wid: 0 for wid in ids}

    def watch_peak(stop):
        while not stop.is_set():
            mm = bl.metrics(fe.url)
            for wid in ids:
                peak[wid] = max(peak[wid], gauge(mm, "baton_frontend_worker_active_decode_blocks", wid))
            time.sleep(0.02)
    ev0 = bl.metrics(fe.url)
    t_load = time.monotonic()
    stop = threading.Event()
    watcher = threading.Thread(target=watch_peak, args=(stop,))
    watcher.start()
    jobs = [(fe.url, body(i)) for i in range(6)]
    for (_, b), s in zip(jobs, bl.run_concurrently(lambda u, b: bl.stream_chat(u, b, timeout=120), jobs)):
        check_stream(s, int(b["messages"][0]["content"].split()[-1]), refs, "stream with NATS up")
    time.sleep(0.3)
    stop.set()
    watcher.join()
    msgs = sub.since(t_load)
    for msg in msgs:
        check_active_load(msg, ids)
    loaded = {msg["worker_id"] for msg in msgs if msg["active_decode_blocks"] > 0}
    assert loaded == set(ids), f"no ActiveLoad with blocks in use from some worker: {loaded} vs {ids}"
    assert all(p > 0 for p in peak.values()), f"frontend gauges never moved: {peak}"
    ev1 = bl.metrics(fe.url)
    for wid in ids:
        assert reports(ev1, wid, "event_plane") > reports(ev0, wid, "event_plane"), "frontend applied no NATS report"
    print(f"{len(msgs)} ActiveLoad messages during a burst of 6; frontend gauge peaks {peak}")

    # --- 3. the frontend acts on what NATS says; 4. shedding with NATS up
    spoof_check(fe, sub, ids)
    shed_check(fe, refs, ids, "with NATS up", "event_plane")

    # --- 5. NATS killed and restarted under streaming load
    traffic = Traffic(fe, refs)
    time.sleep(1.5)
    m_kill = bl.metrics(fe.url)
    t_kill = time.monotonic()
    nats.kill()
    sub.close()
    bl.wait_for(lambda: fe_connected(fe) == 0, 10, what="frontend to notice the NATS outage")
    for w in workers:
        w.proc.wait_log(r"NATS connection to nats://127\.0\.0\.1:\d+ lost", timeout=10)
    m_down0 = bl.metrics(fe.url)
    time.sleep(4)
    m_down1 = bl.metrics(fe.url)
    t_restart = time.monotonic()
    nats.start()
    bl.wait_for(lambda: fe_connected(fe) == 1, 20, what="frontend to reconnect to the restarted NATS")
    sub = RawNats(port, SUBJECT)
    t_back = time.monotonic()
    bl.wait_for(lambda: {msg["worker_id"] for msg in sub.since(t_back)} >= set(ids), 20,
                what="ActiveLoad messages from both workers after the restart")
    time.sleep(2)
    done, failures = traffic.finish()
    assert not failures, f"{len(failures)} streams failed while NATS restarted: {failures[:3]}"
    during = [t for t in done if t_kill < t < t_restart]
    assert during, "no request completed while NATS was down"
    for wid in ids:
        assert reports(m_down1, wid, "event_plane") == reports(m_down0, wid, "event_plane"), \
            "event-plane reports applied while NATS was down"
        assert reports(m_down1, wid, "request_plane") > reports(m_down0, wid, "request_plane"), \
            "request-plane reports stopped while NATS was down"
        assert reports(m_down0, wid, "event_plane") >= reports(m_kill, wid, "event_plane")
    for msg in sub.since(t_back):
        check_active_load(msg, ids)
    m = bl.metrics(fe.url)
    assert bl.metric_sum(m, "baton_frontend_event_plane_connects_total") == 2, \
        bl.metric_sum(m, "baton_frontend_event_plane_connects_total")
    bl.wait_for(lambda: all(reports(bl.metrics(fe.url), wid, "event_plane") > reports(m_down1, wid, "event_plane")
                            for wid in ids), 10, what="frontend applying NATS reports again")
    for w in workers:
        n = len(re.findall(r"NATS connected to ", w.proc.log_text()))
        assert n == 2, f"worker connected {n} times, expected 2 (start, after the restart)"
    print(f"NATS restart under load: {len(done)} streams exact, {len(during)} completed during the "
          f"{t_restart - t_kill:.1f} s outage, reports resumed")

    # --- 6. shedding after the restart, and with NATS down (request-plane fallback)
    shed_check(fe, refs, ids, "after the NATS restart", "event_plane")
    nats.kill()
    sub.close()
    bl.wait_for(lambda: fe_connected(fe) == 0, 10, what="frontend to notice the second NATS outage")
    m_a = bl.metrics(fe.url)
    shed_check(fe, refs, ids, "with NATS down", "request_plane")
    m_b = bl.metrics(fe.url)
    for wid in ids:
        assert reports(m_b, wid, "event_plane") == reports(m_a, wid, "event_plane"), "event plane moved while down"
        assert reports(m_b, wid, "request_plane") > reports(m_a, wid, "request_plane")

    # --- 7. baseline
    m = bl.metrics(fe.url)
    assert bl.metric_sum(m, "dynamo_frontend_inflight_requests") == 0, "requests still in flight"
    assert bl.metric_sum(m, "baton_frontend_workers", state="routable") == 2, "a worker is not routable"
    assert all(gauge(m, "baton_frontend_worker_busy", wid) == 0 for wid in ids)
    check_stream(bl.stream_chat(fe.url, body(3)), 3, refs, "fresh request at the end")
    for w in workers:
        assert w.proc.alive(), "a worker exited"
    assert fe.proc.alive()
    codes = c.close()
    assert all(code == 0 for code in codes.values()), f"unclean exits: {codes}"
print("test_nats: OK")
