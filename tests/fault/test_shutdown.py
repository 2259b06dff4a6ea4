"""Frontend graceful shutdown under load, through the real binaries.

1. SIGTERM with streams running, some shorter and some longer than the bound: /live answers 503
   `shutting_down` at once; a request inside the accept window is served; one after it gets a
   503 JSON error; the short streams complete byte-identical; the long ones run until the bound
   (accept window + --shutdown-drain-timeout), never less, and then end with an explicit SSE
   error; the frontend exits 0 at the bound; the workers drop the cut streams (back to baseline).
2. SIGTERM when everything can finish: the frontend exits 0 as soon as the last stream ends,
   without waiting for the bound, and every stream is complete.
3. The accept window follows Dynamo's DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS (default 5 s) and a
   second signal exits at once, with 143 (a forced stop), as does a draining worker's; the same
   SIGTERM again 20 ms after the first (as GNU timeout delivers it) is one stop: exit 0.

The checkers are run once more against doctored input and must fail.
"""

import signal
import threading
import time

import batonlib as bl

bl.deadline(200, "test_shutdown")


def check_complete(results, refs, what):
    bad = []
    for key, s in results:
        if isinstance(s, Exception) or not s.ok:
            bad.append(f"{key}: {s if isinstance(s, Exception) else s.summary()}")
        elif s.token_ids != refs[key][0] or s.text != refs[key][1]:
            bad.append(f"{key}: differs from its reference")
    if bad:
        raise AssertionError(f"{what}: {len(bad)} of {len(results)} streams bad: {bad[:4]}")


def check_cut_at_bound(results, t_bound, what):
    """Each stream ran until the bound (not cut before it) and then ended with a readable error."""
    bad = []
    for key, s in results:
        if isinstance(s, Exception):
            bad.append(f"{key}: {s!r}")
        elif s.t_end < t_bound - 0.25:
            bad.append(f"{key}: ended {t_bound - s.t_end:.2f}s before the bound ({s.summary()})")
        elif s.done or not s.error or "shutting down" not in (s.error.get("message") or ""):
            bad.append(f"{key}: did not end with the shutdown error ({s.summary()})")
        elif not s.token_ids:
            bad.append(f"{key}: produced nothing before the bound")
    if bad:
        raise AssertionError(f"{what}: {len(bad)} of {len(results)} streams bad: {bad[:4]}")


def self_check():
    class Fake:
        def __init__(self, ok=True, ids=(1, 2), text="ab", t_end=10.0, done=True, error=None):
            self.ok, self.token_ids, self.text, self.t_end, self.done, self.error = ok, list(ids), text, t_end, done, error

        def summary(self):
            return "fake"
    refs = {"k": ([1, 2], "ab")}
    check_complete([("k", Fake())], refs, "self-check")
    for s in (Fake(ok=False), Fake(ids=(1,)), Fake(text="a"), ValueError("x")):
        try:
            check_complete([("k", s)], refs, "self-check")
        except AssertionError:
            continue
        raise AssertionError(f"check_complete accepted {s!r}")
    cut = dict(done=False, error={"message": "the frontend is shutting down"})
    check_cut_at_bound([("k", Fake(t_end=10.0, **cut))], 10.0, "self-check")
    for s in (Fake(t_end=9.0, **cut), Fake(t_end=10.0, done=True, error=None),
              Fake(t_end=10.0, done=False, error={"message": "other"}), Fake(ids=(), t_end=10.0, **cut)):
        try:
            check_cut_at_bound([("k", s)], 10.0, "self-check")
        except AssertionError:
            continue
        raise AssertionError(f"check_cut_at_bound accepted {s!r}")


self_check()


def body(key, max_tokens):
    return bl.chat_body(f"shutdown {key}", max_tokens=max_tokens, return_token_ids=True)


def reference(fe, key, max_tokens):
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(key, max_tokens), timeout=120)
    assert st == 200, b
    return b["choices"][0]["token_ids"], b["choices"][0]["message"]["content"]


class Streams:
    def __init__(self, fe, specs):
        self.n, self.results = len(specs), []
        self.firsts, self.lock, self.started = set(), threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self.one, args=(fe, k, mt)) for k, mt in specs]
        for t in self.threads:
            t.start()

    def _first(self, k):
        with self.lock:
            self.firsts.add(k)
            if len(self.firsts) == self.n:
                self.started.set()

    def one(self, fe, k, mt):
        s = bl.stream_chat(fe.url, body(k, mt), timeout=120, on_event=lambda st, obj: self._first(k))
        self._first(k)
        with self.lock:
            self.results.append((k, s))

    def join(self):
        for t in self.threads:
            t.join(120)
        assert len(self.results) == self.n, "a stream did not end"
        return self.results


# ---- 1. streams shorter and longer than the bound ------------------------------------------------
WINDOW, DRAIN = 1.5, 4
with bl.Cluster() as c:
    fe = c.start_frontend(shutdown_accept_window_ms=int(WINDOW * 1000), shutdown_drain_timeout=DRAIN)
    ws = [c.start_worker(system_port=True, speedup_ratio=0.3) for _ in range(2)]
    c.wait_workers(fe, 2)
    short = [(f"short {i}", 40) for i in range(24)]
    long_ = [(f"long {i}", 1000) for i in range(6)]
    refs = dict(zip([k for k, _ in short], bl.run_concurrently(lambda k, mt: reference(fe, k, mt), short)))
    late_ref = reference(fe, "late", 5)
    streams = Streams(fe, short + long_)
    assert streams.started.wait(60), "streams did not start"
    t0 = time.monotonic()
    fe.proc.kill(signal.SIGTERM)
    # the signal is handled on the frontend's loop: /live turns 503 within moments, not later
    bl.wait_for(lambda: bl.get_json(fe.url + "/live", timeout=5)[0] == 503, 1.0, interval=0.01,
                what="/live to answer 503 after SIGTERM")
    st, _, live = bl.get_json(fe.url + "/live", timeout=5)
    assert st == 503 and live == {"status": "shutting_down", "message": "Service is shutting down"}, (st, live)
    # inside the accept window: still served
    sent = time.monotonic() - t0
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body("late", 5), timeout=30)
    assert sent < WINDOW - 0.2, f"the in-window request was sent {sent:.2f}s after SIGTERM: too late to prove anything"
    assert st == 200 and b["choices"][0]["token_ids"] == late_ref[0], (st, b)
    # after it: a 503 the client can read
    time.sleep(max(0.0, t0 + WINDOW + 0.3 - time.monotonic()))
    st, hdrs, b = bl.post_json(fe.url + "/v1/chat/completions", body("too late", 5), timeout=30)
    assert st == 503 and b["error"]["code"] == "shutting_down" and "shutting down" in b["error"]["message"], (st, b)
    assert fe.proc.alive(), "the frontend exited before its bound with streams running"
    rc = fe.proc.wait(WINDOW + DRAIN + 10)
    exit_after = time.monotonic() - t0
    assert rc == 0, f"frontend exit code {rc}"
    results = dict((k, s) for k, s in streams.join())
    check_complete([(k, results[k]) for k, _ in short], refs, "streams that fit in the bound")
    check_cut_at_bound([(k, results[k]) for k, _ in long_], t0 + WINDOW + DRAIN, "streams longer than the bound")
    assert WINDOW + DRAIN - 0.3 <= exit_after <= WINDOW + DRAIN + 5, f"frontend exited after {exit_after:.2f}s"
    fe.proc.wait_log(r"shutdown bound reached with 6 requests running")
    for w in ws:  # the cut streams were killed on the workers: back to baseline
        bl.wait_for(lambda: bl.metrics(w.system_url)["dynamo_component_inflight_requests{model=\"mock-model\"}"] == 0,
                    10, what="worker in-flight gauge back to 0")
        bl.wait_for(lambda: bl.metrics(w.system_url)["baton_worker_kv_active_blocks"] == 0, 10,
                    what="worker KV blocks freed")
    print(f"frontend SIGTERM under load: exit 0 after {exit_after:.2f}s (bound {WINDOW + DRAIN}s); "
          f"{len(short)} streams complete, {len(long_)} cut at the bound")

# ---- 2. everything finishes: exit as soon as the last stream ends ----------------------------------
with bl.Cluster() as c:
    fe = c.start_frontend(shutdown_accept_window_ms=0, shutdown_drain_timeout=60)
    c.start_worker(speedup_ratio=0.3)
    c.wait_workers(fe, 1)
    specs = [(f"fin {i}", 40) for i in range(20)]
    refs = dict(zip([k for k, _ in specs], bl.run_concurrently(lambda k, mt: reference(fe, k, mt), specs)))
    streams = Streams(fe, specs)
    assert streams.started.wait(60)
    t0 = time.monotonic()
    fe.proc.kill(signal.SIGTERM)
    rc = fe.proc.wait(60)
    took = time.monotonic() - t0
    res = streams.join()
    last_end = max(s.t_end for _, s in res) - t0
    assert rc == 0, rc
    check_complete(res, refs, "streams running at SIGTERM")
    assert took < 20 and took <= last_end + 3, f"frontend took {took:.2f}s to exit; last stream ended at {last_end:.2f}s"
    print(f"frontend SIGTERM, all finish: exit 0 after {took:.2f}s (last stream ended at {last_end:.2f}s)")

# ---- 3. Dynamo's accept-window variable, the default, and a second signal ------------------------
with bl.Cluster() as c:
    fe = c.start_frontend(shutdown_accept_window_ms=None, env={"DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS": "1"})
    t0 = time.monotonic()
    fe.proc.kill(signal.SIGTERM)
    fe.proc.wait_log(r"accepting for 1000 ms more")
    assert fe.proc.wait(10) == 0
    assert time.monotonic() - t0 >= 0.9, "the 1 s accept window was not kept"
    fe2 = c.start_frontend(shutdown_accept_window_ms=None)
    fe2.proc.kill(signal.SIGTERM)
    fe2.proc.wait_log(r"accepting for 5000 ms more")
    time.sleep(0.2)  # a second stop: the same signal within 100 ms would be the first delivered twice
    fe2.proc.kill(signal.SIGTERM)
    assert fe2.proc.wait(3) == 128 + signal.SIGTERM, "a second signal did not exit at once, with 143"
    fe2.proc.wait_log(r"second signal: exiting at once")
    # a worker draining a stream: the second signal cuts it, and says so in its status
    w = c.start_worker(speedup_ratio=0.05, graceful_shutdown_timeout=60)
    fe3 = c.start_frontend()
    c.wait_workers(fe3, 1)
    res = {}
    t = threading.Thread(target=lambda: res.update(s=bl.stream_completion(
        fe3.url, bl.completion_body("a long one", max_tokens=2000, stream=True), timeout=30)))
    t.start()
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe3.url), "dynamo_frontend_inflight_requests") >= 1, 10,
                what="the stream to run")
    w.proc.kill(signal.SIGTERM)
    w.proc.wait_log(r"draining", 5)
    assert w.proc.alive(), "the worker did not wait for its stream"
    time.sleep(0.2)
    w.proc.kill(signal.SIGTERM)
    assert w.proc.wait(5) == 128 + signal.SIGTERM, "a worker's second signal is a forced stop: 143"
    w.proc.wait_log(r"second signal \(SIGTERM\): exiting at once \(status 143\)", 1)
    t.join(30)
    # the same stop delivered twice in a row (GNU timeout signals the command, then its whole
    # process group) is one stop: the drain runs and the exit is 0, not a forced 143
    fe4 = c.start_frontend(shutdown_accept_window_ms=300)
    fe4.proc.kill(signal.SIGTERM)
    time.sleep(0.02)
    fe4.proc.kill(signal.SIGTERM)
    assert fe4.proc.wait(10) == 0, "a SIGTERM repeated after 20 ms was taken as a forced stop"
    fe4.proc.wait_log(r"SIGTERM received again [0-9.]+ ms after the first: taken as the same stop", 1)
    assert "second signal" not in fe4.proc.log_text(), "the repeated SIGTERM forced the stop"
print("test_shutdown: ok")
