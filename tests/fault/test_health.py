"""Worker health through the real binaries: the status server, canary health checks and engine
monitoring.

1. Status server (DYN_SYSTEM_PORT): Dynamo's /health body and codes, /live, /metrics, custom probe
   paths, port 0 (a free port, logged), -1 (off), a port already taken (a clear start-up error,
   exit code != 0, never announced in discovery).
2. Canary: invalid payloads refuse to start; Dynamo's token-form payload works; canaries are off
   unless enabled; a stalled engine (the mocker's stall, SIGUSR2 with --fault-signals: the engine
   stops, the process does not) turns /health 503 within wait + timeout, the frontend stops routing
   to it while a stream already running there waits, and resuming restores it: the stream completes
   byte-identical and traffic comes back.
3. Engine monitoring: engine death (SIGUSR1, and the die-after-tokens hook) and a stuck engine (the
   monitor's --engine-stuck-timeout) end the worker with exit code 1 and its streams migrate,
   byte-identical; `baton run` restarts a worker that exits 1.

The checkers are run once more against doctored input and must fail.
"""

import json
import os
import re
import signal
import socket
import threading
import time

import batonlib as bl

bl.deadline(280, "test_health")


# ---- checkers ------------------------------------------------------------------------------------

def check_health(status, body, ready):
    """Dynamo's worker /health: 200 ready / 503 notready with uptime and endpoint states."""
    want_status = 200 if ready else 503
    word = "ready" if ready else "notready"
    assert status == want_status, f"/health answered {status}, expected {want_status}: {body!r}"
    assert isinstance(body, dict) and body.get("status") == word, f"/health body status is not {word!r}: {body!r}"
    up = body.get("uptime")
    assert isinstance(up, dict) and isinstance(up.get("secs"), int) and isinstance(up.get("nanos"), int) and \
        0 <= up["nanos"] < 10**9, f"bad uptime in {body!r}"
    eps = body.get("endpoints")
    assert isinstance(eps, dict) and eps.get("generate") == word, f"bad endpoints in {body!r}"


def check_streams(results, refs, what):
    bad = []
    for key, s in results:
        if isinstance(s, Exception) or not s.ok:
            bad.append(f"{key}: {s if isinstance(s, Exception) else s.summary()}")
        elif s.token_ids != refs[key][0] or s.text != refs[key][1]:
            bad.append(f"{key}: differs from its reference")
    if bad:
        raise AssertionError(f"{what}: {len(bad)} of {len(results)} streams bad: {bad[:4]}")


def self_check():
    check_health(200, {"status": "ready", "uptime": {"secs": 1, "nanos": 5}, "endpoints": {"generate": "ready"}}, True)
    broken = [
        (200, {"status": "notready", "uptime": {"secs": 1, "nanos": 5}, "endpoints": {"generate": "ready"}}, True),
        (503, {"status": "ready", "uptime": {"secs": 1, "nanos": 5}, "endpoints": {"generate": "ready"}}, True),
        (200, {"status": "ready", "endpoints": {"generate": "ready"}}, True),
        (200, {"status": "ready", "uptime": {"secs": 1, "nanos": 5}, "endpoints": {}}, True),
        (200, {"status": "ready", "uptime": {"secs": 1, "nanos": 5}, "endpoints": {"generate": "ready"}}, False),
    ]
    for st, b, r in broken:
        try:
            check_health(st, b, r)
        except AssertionError:
            continue
        raise AssertionError(f"check_health accepted {st} {b} (ready={r})")

    class Fake:
        def __init__(self, ok, ids, text):
            self.ok, self.token_ids, self.text = ok, ids, text

        def summary(self):
            return "fake"
    refs = {"k": ([1, 2, 3], "abc")}
    check_streams([("k", Fake(True, [1, 2, 3], "abc"))], refs, "self-check")
    for s in (Fake(True, [1, 2], "abc"), Fake(True, [1, 2, 4], "abc"), Fake(True, [1, 2, 3], "ab"),
              Fake(False, [1, 2, 3], "abc"), RuntimeError("x")):
        try:
            check_streams([("k", s)], refs, "self-check")
        except AssertionError:
            continue
        raise AssertionError(f"check_streams accepted {s!r}")


self_check()


# ---- helpers -------------------------------------------------------------------------------------

def health(w):
    return bl.get_json(w.system_url + "/health", timeout=5)[::2]


def instance_hex(w):
    st, body = health(w)
    return format(body["instance_id"], "x")


def routed(fe, wid):
    return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_routed_total", worker_id=wid)


def body(key, max_tokens):
    return bl.chat_body(f"health prompt {key}", max_tokens=max_tokens, return_token_ids=True)


def reference(fe, key, max_tokens):
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(key, max_tokens), timeout=120)
    assert st == 200, b
    return b["choices"][0]["token_ids"], b["choices"][0]["message"]["content"]


class Streams:
    """Streams started on threads; .started once each has its first token."""

    def __init__(self, fe, keys, max_tokens):
        self.keys, self.results = keys, []
        self.firsts, self.lock, self.started = set(), threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self.one, args=(fe, k, max_tokens)) for k in keys]
        for t in self.threads:
            t.start()

    def one(self, fe, k, max_tokens):
        def on_event(st, obj):
            with self.lock:
                self.firsts.add(k)
                if len(self.firsts) == len(self.keys):
                    self.started.set()
            return False
        s = bl.stream_chat(fe.url, body(k, max_tokens), timeout=150, on_event=on_event)
        with self.lock:
            self.results.append((k, s))
            self.firsts.add(k)
            if len(self.firsts) == len(self.keys):
                self.started.set()

    def wait_started(self):
        assert self.started.wait(60), f"only {len(self.firsts)} of {len(self.keys)} streams started"

    def join(self):
        for t in self.threads:
            t.join(150)
        assert len(self.results) == len(self.keys), "a stream did not end"
        return self.results


SUMMARY_RX = re.compile(r"drain summary: streams_at_start=(\d+) finished=(\d+) handed_back=(\d+)")


# ---- 1. status server --------------------------------------------------------------------------
with bl.Cluster() as c:
    fe = c.start_frontend()
    w = c.start_worker(system_port=True, wait=True, speedup_ratio=50)
    c.wait_workers(fe, 1)
    check_health(*health(w), ready=True)
    st, _, live = bl.get_json(w.system_url + "/live")
    assert st == 200 and live["status"] == "live", (st, live)
    m = bl.metrics(w.system_url)
    assert m["baton_worker_ready"] == 1 and "dynamo_component_inflight_requests{model=\"mock-model\"}" in m, m
    st, _, data = bl.request("GET", w.system_url + "/nope")
    assert st == 404 and data == b"Route not found", (st, data)

    # custom probe paths
    w2 = c.start_worker(system_port=True, speedup_ratio=50,
                        env={"DYN_SYSTEM_HEALTH_PATH": "/ready", "DYN_SYSTEM_LIVE_PATH": "/alive"})
    bl.wait_http(w2.system_url + "/alive", w2.proc)
    check_health(*bl.get_json(w2.system_url + "/ready")[::2], ready=True)
    assert bl.request("GET", w2.system_url + "/health")[0] == 404

    # port 0: a free port, logged
    w0 = c.start_worker(env={"DYN_SYSTEM_PORT": "0"}, speedup_ratio=50)
    port = int(w0.proc.wait_log(r"status server listening on [\d.]+:(\d+)").group(1))
    assert port > 0
    st, _, b = bl.get_json(f"http://127.0.0.1:{port}/health")
    assert st == 200 and b["status"] == "ready", (st, b)
    # -1: off
    woff = c.start_worker(speedup_ratio=50)
    woff.proc.wait_log(r"status server off \(DYN_SYSTEM_PORT=-1\)")
    c.wait_workers(fe, 4)

    # a port already taken: start-up error, exit != 0, never announced
    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen(1)
    taken = holder.getsockname()[1]
    keys_before = sorted(os.listdir(c.discovery_dir))
    wt = c.start_worker(system_port=taken, speedup_ratio=50)
    rc = wt.proc.wait(15)
    assert rc not in (None, 0), f"a worker on a taken DYN_SYSTEM_PORT exited with {rc}"
    log = wt.proc.log_text()
    assert f"DYN_SYSTEM_PORT={taken}" in log and "address already in use" in log, log[-600:]
    assert sorted(os.listdir(c.discovery_dir)) == keys_before, "a worker that failed to start was announced"
    holder.close()
    print(f"status server: ok (taken port -> exit {rc})")

    # canary options: a bad payload is a start-up error with a message; canaries are off by default
    wbad = c.start_worker(speedup_ratio=50, env={"DYN_HEALTH_CHECK_ENABLED": "true",
                                                  "DYN_HEALTH_CHECK_PAYLOAD": "{not json"})
    assert wbad.proc.wait(15) == 2 and "DYN_HEALTH_CHECK_PAYLOAD" in wbad.proc.log_text(), wbad.proc.log_tail()
    assert bl.metric_sum(bl.metrics(w.system_url), "baton_worker_canary_total") == 0, "canary ran while disabled"
    wtok = c.start_worker(system_port=True, speedup_ratio=50,
                          env={"DYN_HEALTH_CHECK_ENABLED": "true", "DYN_CANARY_WAIT_TIME": "0.3",
                               "DYN_HEALTH_CHECK_PAYLOAD": json.dumps({"token_ids": [1, 2, 3],
                                                                       "sampling_options": {"temperature": 0.0}})})
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(wtok.system_url), "baton_worker_canary_total",
                                      result="success") >= 3, 15, what="three successful token-form canaries")
    check_health(*health(wtok), ready=True)
    wtok.proc.wait_log(r"Health check manager started \(canary_wait_time: 0.3s, request_timeout: 3s\)")

# ---- 2. canary: a stalled engine ----------------------------------------------------------------
WAIT, TIMEOUT = 1.0, 1.0
with bl.Cluster() as c:
    fe = c.start_frontend()
    a = c.start_worker(system_port=True, wait=True, speedup_ratio=0.5, fault_signals=True,
                       env={"DYN_HEALTH_CHECK_ENABLED": "true", "DYN_CANARY_WAIT_TIME": str(WAIT),
                            "DYN_HEALTH_CHECK_REQUEST_TIMEOUT": str(TIMEOUT)})
    c.wait_workers(fe, 1)
    check_health(*health(a), ready=True)
    assert bl.metric_sum(bl.metrics(a.system_url), "baton_worker_canary_total", result="success") >= 1, \
        "the start-up canary did not run"
    refs = {k: reference(fe, k, 120) for k in ("stalled",)}
    running = Streams(fe, ["stalled"], 120)  # on A, the only worker
    running.wait_started()
    b = c.start_worker(system_port=True, wait=True, speedup_ratio=50)
    c.wait_workers(fe, 2)
    aid = instance_hex(a)
    t0 = time.monotonic()
    a.proc.kill(signal.SIGUSR2)  # the engine stalls; the process keeps answering
    bl.wait_for(lambda: health(a)[0] == 503, WAIT + TIMEOUT + 5, interval=0.02, what="A's /health to turn 503")
    detect = time.monotonic() - t0
    check_health(*health(a), ready=False)
    assert bl.get_json(a.system_url + "/live")[0] == 200, "/live failed while only the canary fails"
    c.wait_workers(fe, 1, timeout=5)  # the frontend no longer lists A
    before = routed(fe, aid)
    res = bl.run_concurrently(lambda i: bl.stream_chat(fe.url, bl.chat_body(f"avoid {i}", max_tokens=8)), range(20))
    for s in res:
        s.assert_ok("a request while A's canary fails")
    assert routed(fe, aid) == before, "the frontend routed to a worker whose canary fails"
    assert not running.results, "the stream on the stalled engine ended while the engine was stalled"
    m = bl.metrics(a.system_url)
    assert bl.metric_sum(m, "baton_worker_canary_total", result="timeout") >= 1 and m["baton_worker_ready"] == 0, m
    print(f"canary: stalled engine not ready after {detect:.2f}s (wait {WAIT}s + timeout {TIMEOUT}s)")
    assert detect <= WAIT + TIMEOUT + 3, f"detection took {detect:.2f}s"

    t1 = time.monotonic()
    a.proc.kill(signal.SIGUSR2)  # resume
    bl.wait_for(lambda: health(a)[0] == 200, 10, interval=0.02, what="A's /health back to 200")
    restore = time.monotonic() - t1
    check_health(*health(a), ready=True)
    c.wait_workers(fe, 2, timeout=10)
    check_streams(running.join(), refs, "the stream that waited on the stalled engine")
    res = bl.run_concurrently(lambda i: bl.stream_chat(fe.url, bl.chat_body(f"back {i}", max_tokens=4)), range(10))
    for s in res:
        s.assert_ok("a request after the resume")
    assert routed(fe, aid) > before, "no traffic came back to A after it recovered"
    assert bl.metric_sum(bl.metrics(a.system_url), "baton_worker_canary_total", result="late_success") >= 1
    assert a.proc.alive(), "a stall shorter than the stuck timeout killed the worker"
    print(f"canary: restored {restore:.2f}s after the engine resumed")

# ---- 3. engine monitoring -----------------------------------------------------------------------
with bl.Cluster() as c:
    fe = c.start_frontend(migration_limit=3)
    # engine death (SIGUSR1): every stream is on A when it dies
    a = c.start_worker(speedup_ratio=0.5, fault_signals=True)
    c.wait_workers(fe, 1)
    keys = [f"death {i}" for i in range(16)]
    refs = dict(zip(keys, bl.run_concurrently(lambda k: reference(fe, k, 60), keys)))
    wave = Streams(fe, keys, 60)
    wave.wait_started()
    c.start_worker(speedup_ratio=0.5)
    c.wait_workers(fe, 2)
    a.proc.kill(signal.SIGUSR1)
    rc = a.proc.wait(15)
    assert rc == 1, f"a worker whose engine died exited with {rc}"
    sm = SUMMARY_RX.search(a.proc.log_text())
    assert sm and int(sm.group(1)) == 16 and int(sm.group(3)) == 16, a.proc.log_tail()
    assert "Engine health check failed" in a.proc.log_text()
    check_streams(wave.join(), refs, "streams of a worker whose engine died")
    print("engine death (SIGUSR1): exit 1, 16 streams migrated")

    # the die-after-tokens hook, under round-robin traffic
    keys = [f"hook {i}" for i in range(12)]
    refs = dict(zip(keys, bl.run_concurrently(lambda k: reference(fe, k, 60), keys)))  # on B alone
    d = c.start_worker(speedup_ratio=0.5, fault_die_after_tokens=150)
    c.wait_workers(fe, 2)
    wave = Streams(fe, keys, 60)
    rc = d.proc.wait(60)
    assert rc == 1, f"a worker with --fault-die-after-tokens exited with {rc}"
    sm = SUMMARY_RX.search(d.proc.log_text())
    assert sm and int(sm.group(3)) >= 1, f"the worker died with no stream to hand back:\n{d.proc.log_tail()}"
    check_streams(wave.join(), refs, "streams of a worker that died after N tokens")
    print("engine death (hook): exit 1")

    # a stuck engine: the monitor fails it after --engine-stuck-timeout while streams wait
    for w in list(c.workers):
        if w.proc.alive():
            w.proc.stop()
    s = c.start_worker(speedup_ratio=0.5, fault_signals=True, engine_stuck_timeout=2)
    c.wait_workers(fe, 1)
    keys = [f"stuck {i}" for i in range(8)]
    refs = dict(zip(keys, bl.run_concurrently(lambda k: reference(fe, k, 60), keys)))
    wave = Streams(fe, keys, 60)
    wave.wait_started()
    c.start_worker(speedup_ratio=0.5)
    c.wait_workers(fe, 2)
    t0 = time.monotonic()
    s.proc.kill(signal.SIGUSR2)
    rc = s.proc.wait(20)
    took = time.monotonic() - t0
    assert rc == 1, f"a worker with a stuck engine exited with {rc}"
    assert "stuck scheduler" in s.proc.log_text(), s.proc.log_tail()
    assert 1.5 <= took <= 8, f"the stuck engine was detected after {took:.2f}s (bound 2 s)"
    check_streams(wave.join(), refs, "streams of a stuck engine")
    print(f"stuck engine: exit 1 after {took:.2f}s, streams migrated")

# ---- 4. `baton run` restarts a worker that exits 1 ------------------------------------------------
with bl.Cluster() as c:
    fe = c.start_run(workers=1, speedup_ratio=20, fault_signals=True)
    bl.wait_for(lambda: len(bl.get_json(fe.url + "/health")[2]["instances"]) == 1, 20, what="the run's worker")

    def worker_pids():
        out = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if ppid == fe.proc.pid and b"worker" in cmd:
                out.append(int(name))
        return out
    pids = worker_pids()
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGUSR1)
    fe.proc.wait_log(r"worker 0 exited unexpectedly \(status 1\); restarting it", timeout=15)
    bl.wait_for(lambda: worker_pids() and worker_pids() != pids, 15, what="a restarted worker")
    bl.wait_for(lambda: len(bl.get_json(fe.url + "/health")[2]["instances"]) == 1, 20,
                what="the restarted worker to be routable")
    bl.stream_chat(fe.url, bl.chat_body("after restart", max_tokens=5)).assert_ok("a request after the restart")
    print("baton run: restarted the worker that exited 1")
print("test_health: ok")
