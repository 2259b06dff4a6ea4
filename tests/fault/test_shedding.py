"""Load shedding through the real binaries: busy thresholds, routing around busy workers, 503 with
Retry-After, runtime threshold changes, stale load reports.

Workers are small on purpose (64 KV blocks of 16 tokens) so that a few long requests fill them.
"""

import json
import signal
import threading
import time

import batonlib as bl

bl.deadline(240, "test_shedding")

WORKER = dict(speedup_ratio=4, num_gpu_blocks_override=64, block_size=16)
MAX_TOKENS = 160


def body(i):
    return bl.chat_body(f"shed prompt {i % 7}", max_tokens=MAX_TOKENS, return_token_ids=True)


def references(fe):
    refs = {}
    for i in range(7):
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(i))
        assert st == 200, b
        refs[i % 7] = b["choices"][0]["token_ids"]
    return refs


class BlockWatch:
    """Polls the frontend's per-worker gauges and records the worst blocks/total seen."""

    def __init__(self, fe):
        self.fe, self.stop, self.worst, self.samples = fe, threading.Event(), [], 0
        self.t = threading.Thread(target=self.run)
        self.t.start()

    def run(self):
        while not self.stop.is_set():
            m = bl.metrics(self.fe.url)
            for k, v in m.items():
                if k.startswith("baton_frontend_worker_active_decode_blocks"):
                    total = m[k.replace("active_decode_blocks", "total_blocks")]
                    self.worst.append((v, total))
            self.samples += 1
            time.sleep(0.05)

    def done(self):
        self.stop.set()
        self.t.join()
        assert self.samples > 3, "block watcher took no samples"
        over = [(v, t) for v, t in self.worst if t and v > t]
        assert not over, f"a worker reported more blocks than it has: {over[:3]}"
        assert max(v for v, _ in self.worst) > 0, "no load was ever reported"


def burst(fe, n, refs):
    jobs = [(fe.url, body(i)) for i in range(n)]
    res = bl.run_concurrently(lambda u, b: bl.stream_chat(u, b, timeout=120), jobs, max_workers=n)
    ok, rejected = 0, []
    for (u, b), s in zip(jobs, res):
        if s.status == 503:
            rejected.append(s)
            continue
        s.assert_ok("admitted stream")
        i = int(b["messages"][0]["content"].split()[-1])
        assert s.token_ids == refs[i], "an admitted stream differs from its reference"
        ok += 1
    return ok, rejected


def check_rejection_shape(s):
    ra = s.headers.get("retry-after")
    assert ra is not None and ra.isdigit() and 1 <= int(ra) <= 30, f"bad Retry-After {ra!r}"
    err = json.loads(s.body)["error"]
    assert err["code"] == "overloaded" and err["type"] == "server_error" and "busy" in err["message"], err


with bl.Cluster() as c:
    # --- thresholds set: 3x overload → some rejected, admitted ones exact, capacity never exceeded
    fe = c.start_frontend(active_decode_blocks_threshold=0.5)
    c.start_worker(**WORKER)
    c.start_worker(**WORKER)
    c.wait_workers(fe, 2)
    refs = references(fe)
    watch = BlockWatch(fe)
    ok, rejected = burst(fe, 30, refs)
    watch.done()
    assert rejected, "3x overload with thresholds rejected nothing"
    assert ok >= 2, f"only {ok} admitted"
    for s in rejected:
        check_rejection_shape(s)
    m = bl.metrics(fe.url)
    assert bl.metric_sum(m, "dynamo_frontend_model_rejection_total") == len(rejected), \
        (bl.metric_sum(m, "dynamo_frontend_model_rejection_total"), len(rejected))
    print(f"overload with threshold: {ok} admitted, {len(rejected)} rejected; Retry-After values "
          f"{sorted(set(s.headers['retry-after'] for s in rejected))}")

    # --- threshold removed at runtime: the next burst is not shed
    st, _, b = bl.post_json(fe.url + "/busy_threshold", {"model": "mock-model", "active_decode_blocks_threshold": None})
    assert st == 200 and b["active_decode_blocks_threshold"] is None, b
    ok2, rejected2 = burst(fe, 30, refs)
    assert not rejected2 and ok2 == 30, (ok2, len(rejected2))
    # and set again: shedding resumes on the next request
    st, _, b = bl.post_json(fe.url + "/busy_threshold", {"model": "mock-model", "active_decode_blocks_threshold": 0.5})
    assert st == 200 and b["active_decode_blocks_threshold"] == 0.5, b
    st, _, g = bl.get_json(fe.url + "/busy_threshold")
    assert st == 200 and g["thresholds"][0]["model"] == "mock-model", g
    ok3, rejected3 = burst(fe, 30, refs)
    assert rejected3, "a threshold set at runtime had no effect"
    # endpoint errors
    for payload, code in (({"model": "mock-model", "active_decode_blocks_threshold": 1.5}, 400),
                          ({"model": "nope", "active_decode_blocks_threshold": 0.5}, 404),
                          (b"{bad json", 422)):
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        st, _, data = bl.request("POST", fe.url + "/busy_threshold", raw, {"Content-Type": "application/json"})
        assert st == code and "error" in json.loads(data), (payload, st, data)

with bl.Cluster() as c:
    # --- without thresholds nothing is rejected, even at 3x overload
    fe = c.start_frontend()
    c.start_worker(**WORKER)
    c.start_worker(**WORKER)
    c.wait_workers(fe, 2)
    refs = references(fe)
    ok, rejected = burst(fe, 30, refs)
    assert not rejected and ok == 30, (ok, len(rejected))

with bl.Cluster() as c:
    # --- one busy worker among free ones receives nothing new
    # no threshold yet: A must take all its load first; the threshold is set at runtime below
    fe = c.start_frontend(stream_stall_timeout=15)
    a = c.start_worker(**dict(WORKER, speedup_ratio=1))
    c.wait_workers(fe, 1)
    # six long requests need far more than A's 64 blocks: its KV stays full (queueing, preemption)
    long_body = lambda i: bl.chat_body(f"long {i}", max_tokens=600)
    bg = [threading.Thread(target=bl.stream_chat, args=(fe.url, long_body(i)), kwargs={"timeout": 120})
          for i in range(6)]
    for t in bg:
        t.start()
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_active_decode_blocks") > 40, 20,
                what="worker A's KV blocks to fill")
    st, _, r = bl.post_json(fe.url + "/busy_threshold", {"model": "mock-model", "active_decode_blocks_threshold": 0.5})
    assert st == 200, r
    b = c.start_worker(**WORKER)
    c.wait_workers(fe, 2)
    m0 = bl.metrics(fe.url)
    routed_before = {k: v for k, v in m0.items() if k.startswith("baton_frontend_worker_routed_total")}
    for i in range(8):
        st, _, r = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(f"small {i}", max_tokens=4))
        assert st == 200, r
    m1 = bl.metrics(fe.url)
    busy_key = [k for k, v in m1.items() if k.startswith("baton_frontend_worker_busy") and v == 1]
    assert len(busy_key) == 1, f"expected exactly one busy worker: {busy_key}"
    busy_id = busy_key[0].split('worker_id="')[1].split('"')[0]
    for k, v in m1.items():
        if k.startswith("baton_frontend_worker_routed_total"):
            delta = v - routed_before.get(k, 0)
            if busy_id in k:
                assert delta == 0, f"the busy worker received {delta} new requests"
            else:
                assert delta == 8, f"the free worker received {delta} of 8"
    # --- a stale load report does not keep a worker busy forever: stop A (its connection stays
    # up for the 15 s stall timeout) and its busy flag clears once its last report is stale
    a.proc.kill(signal.SIGSTOP)
    t0 = time.monotonic()
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_busy") == 0, 10,
                what="busy flag of a silent worker to clear")
    cleared = time.monotonic() - t0
    assert cleared >= 1.0, f"busy cleared after {cleared:.2f}s: too early to be staleness"
    a.proc.kill(signal.SIGCONT)
    for t in bg:
        t.join(120)

# --- under a flood of refusals the log keeps its head: ten lines of 5xx a second at most per event
# loop, the next one saying how many were not written (the counters count them all)
with bl.Cluster() as c:
    fe = c.start_frontend(max_concurrent_requests=1)  # one long stream held: every other request a 503
    c.start_worker(speedup_ratio=0.5)
    c.wait_workers(fe, 1)
    held = threading.Thread(target=bl.stream_chat, args=(fe.url, dict(body(0), max_tokens=5000)),
                            kwargs=dict(timeout=120))
    held.start()
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_inflight_requests") == 1, 10,
                what="the held stream")
    t0 = time.monotonic()
    for i in range(120):
        st, _, _ = bl.post_json(fe.url + "/v1/chat/completions", body(i), timeout=10)
        assert st == 503, st
    took = time.monotonic() - t0
    time.sleep(1.1)
    st, _, _ = bl.post_json(fe.url + "/v1/chat/completions", body(0), timeout=10)  # after the second
    assert st == 503, st
    text = fe.proc.log_text()
    lines = text.count(" answered 503: ")
    assert lines <= 10 * (int(took) + 2) + 1, f"{lines} log lines for 121 refusals in {took:.1f} s"
    assert lines >= 2 and "more answers of 5xx in the second before, not logged" in text, text[-2000:]
    print(f"121 refusals in {took:.1f} s: {lines} log lines")
held.join(30)  # its stream ended with the cluster
print("test_shedding: ok")
