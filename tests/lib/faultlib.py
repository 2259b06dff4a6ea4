"""Fault scenarios written once and run on every engine (tests/fault/faults.py runs one of them on
one engine; CMake registers each pair as fault/test_faults_<engine>_<scenario>).

An engine profile says how to start a worker of that engine and how long its streams are (the
mocker at a slowed speed, llama.cpp at the length where its numerics would drift if a
continuation were not exact); the scenarios only use the profile. Each scenario starts its own
cluster: a frontend and two workers, a fault-free reference run of a mixed load (half greedy,
half sampled at temperature 0.8 with a seed, so a continuation must reproduce the sampler too),
then the same load with one fault, and checks every stream against its reference byte for byte
(text, token ids, finish_reason, usage) and that the fault moved some of them. The llama profile
runs 16 such streams of 1,500+ tokens, and beside them in the fault run 6 unseeded ones that their
clients cancel at 50-550 tokens (a busy, fragmented cache); the mocker's runs 6.

  kill9         kill -9 of one worker once a stream has TRIGGER tokens
  sigstop       SIGSTOP of one worker: the frontend's stall detection (--stream-stall-timeout 2)
                moves its streams
  drain         SIGTERM with a 1 s drain bound: the streams left are handed back and continue
  engine_failure  a worker whose engine dies after some tokens (--fault-die-after-tokens, as a
                failed decode): it hands its streams back and exits 1
  engine_hang   a worker whose engine stops for good after some tokens (llama: the engine thread
                blocks as in a decode that never returns, --fault-hang-after-tokens; mocker: its
                scheduler stalls) with --engine-stuck-timeout 1: the engine monitor fails it, its
                streams are handed back (no KV state from a failed engine) and it exits 1
  engine_nan    (llama only) NaN in the logits row the sampler reads after some tokens
                (--fault-nan-after-tokens): the engine fails, its streams migrate, it exits 1
  engine_decode_error  (llama only) llama_decode fails after some tokens
                (--fault-error-after-tokens): the same
  cancel_storm  twice as many streams, every other one closed by its client at a different
                point: the others byte-exact, and every worker's sequences and KV blocks back to 0
  shedding      a worker of 256 KV blocks of 16 tokens and a frontend busy above 30 % of them:
                503 with Retry-After while four long streams hold more, served again once their
                blocks are freed (on llama.cpp these are real KV cells)
"""

import os
import re
import signal
import threading
import time

import batonlib as bl

MODEL = "mock-model"
N = 6
SLOW = 4 if bl.sanitized_build() else 1  # a sanitized build decodes several times slower: deadlines stretch
# A scenario's stream, whole (a hang bound, not a speed check: the scenario's own deadline in
# faults.py is the backstop). 60 s cut 16 llama streams at ~1,500 of their 1,520-1,800 tokens on a
# machine loaded by other builds and tests: the text so far was exact, only slow.
STREAM_S = 150 * SLOW

PROFILES = {
    # ~6 ms decode steps at speedup 1: 250-350 tokens take 2-4 s at 0.6
    "mocker": {"worker": {"speedup_ratio": 0.6}, "base_tokens": 250, "trigger": 100, "die_after": 500,
               "hang": {"fault_stall_after_tokens": 500},
               "kv": {"speedup_ratio": 1, "num_gpu_blocks_override": 256, "block_size": 16, "max_num_seqs": 4}},
    # streams of 1,500 tokens and more: where a continuation that is not exact drifts (docs/engines.md);
    # 16 of them at once, beside 6 unseeded ones their clients cancel at 50-550 tokens: a busy,
    # fragmented cache (the oracle for this engine)
    "llama": {"worker": {"engine": "llama"}, "base_tokens": 1500, "trigger": 400, "die_after": 2000,
              "streams": 16, "noise": 6,
              "hang": {"fault_hang_after_tokens": 2000}, "nan": {"fault_nan_after_tokens": 2000},
              "decode_error": {"fault_error_after_tokens": 2000},
              "kv": {"engine": "llama", "ctx_size": 4096, "max_num_seqs": 4}},
}


def skip(engine):
    """The exit code 77 (skipped) when the engine cannot run in this build, else None."""
    if engine == "llama" and os.environ.get("BATON_NO_LLAMA") == "1":
        print("skipped: BATON_NO_LLAMA=1")
        return 77
    return None


def outcome(s):
    """What a stream must reproduce exactly: text, token ids, finish_reason, usage."""
    return {"text": s.text, "ids": list(s.token_ids), "finish": s.finish_reason, "usage": s.usage}


def max_tokens(p, i):
    return p["base_tokens"] + 20 * i


def body_for(p, i):
    extra = {"return_token_ids": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if i % 2:
        extra.update(temperature=0.8, seed=500 + i)
    return bl.completion_body(f"Once upon a time, a {['cat', 'dog', 'fox', 'owl'][i % 4]} number {i}",
                              max_tokens=max_tokens(p, i), model=MODEL, **extra)


def streams(p):
    """How many streams of the load are checked against their references (the profile's, or N)."""
    return p.get("streams", N)


def run_load(fe, p, tag, n=None, on_event=None, noise=None):
    """The load: n streams (default streams(p)) of body_for(p, i % streams(p)), returned in order.
    Beside them, except for the references, `noise` (default the profile's "noise", else none)
    unseeded sampled streams that their clients cancel at 50, 150, ... tokens, to keep the engines'
    caches busy and fragmented; each must have been cancelled by its client, nothing more is
    checked of them, and they are not returned."""
    n = streams(p) if n is None else n
    k = (0 if tag == "ref" else p.get("noise", 0)) if noise is None else noise

    def one(i):
        if i >= n:  # noise
            j = i - n
            body = bl.completion_body(f"Noise {j}: once upon a time", max_tokens=p["base_tokens"], model=MODEL,
                                      temperature=0.8, return_token_ids=True)
            return bl.stream_completion(fe.url, body, timeout=STREAM_S, headers={"X-Request-Id": f"{tag}-noise-{j}"},
                                        on_event=lambda st, obj: len(st.token_ids) >= 50 + 100 * j)
        return bl.stream_completion(fe.url, body_for(p, i % streams(p)), timeout=STREAM_S,
                                    headers={"X-Request-Id": f"{tag}-{i}"},
                                    on_event=(lambda st, obj: on_event(i, st, obj)) if on_event else None)
    runs = bl.run_concurrently(one, list(range(n + k)), max_workers=n + k)
    for j, s in enumerate(runs[n:]):
        assert s.aborted and 50 + 100 * j <= len(s.token_ids) < p["base_tokens"], f"noise stream {j}: {s.summary()}"
    return runs[:n]


def references(fe, p):
    refs = run_load(fe, p, "ref")
    for i, s in enumerate(refs):
        s.assert_ok(f"reference {i}")
        assert len(s.token_ids) == max_tokens(p, i), s.summary()
    return refs


def migrated(fe, tag):
    return sorted(set(int(m) for m in re.findall(rf"request {tag}-(\d+) migrated", fe.proc.log_text())))


def differences(refs, runs, only=None):
    """One line per stream (of `only`, when given) that did not end ok or differs from its
    reference refs[i % len(refs)]: where the token ids part, and both finish_reasons and usages."""
    bad = []
    for i, s in enumerate(runs):
        if only is not None and i not in only:
            continue
        a, b = outcome(refs[i % len(refs)]), outcome(s)
        if not s.ok or a != b:
            first = next((k for k in range(min(len(a["ids"]), len(b["ids"]))) if a["ids"][k] != b["ids"][k]), None)
            bad.append(f"stream {i}: {s.summary()}; first differing token {first}; "
                       f"finish {b['finish']} vs {a['finish']}; usage {b['usage']} vs {a['usage']}")
    return bad


def assert_exact(refs, runs, tag, only=None):
    bad = differences(refs, runs, only)
    assert not bad, f"{tag}: streams differ from their reference:\n" + "\n".join(bad)


def check(fe, tag, refs, runs, only=None, want_migrated=True):
    """Every stream (of `only`, when given) equals its reference; some were migrated."""
    assert_exact(refs, runs, tag, only)
    moved = migrated(fe, tag)
    assert moved or not want_migrated, f"{tag}: no stream migrated"
    print(f"{tag}: {len(runs) if only is None else len(only)} streams byte-exact; migrated {moved}")


class Fleet:
    """A frontend and two workers of the profile's engine, and the fault-free references."""

    def __init__(self, c, p, fe_flags=None, second=None):
        self.c, self.p = c, p
        self.fe = c.start_frontend(**(fe_flags or {}))
        self.w1 = c.start_worker(system_port=True, wait=True, **p["worker"])
        self.w2 = c.start_worker(system_port=True, wait=True, **p["worker"])
        c.wait_workers(self.fe, 2)
        self.refs = references(self.fe, p)
        if second is not None:  # the faulty worker replaces w1 for the faulted run
            self.w1.proc.stop()
            self.w1 = c.start_worker(system_port=True, wait=True, **dict(p["worker"], **second))
            c.wait_workers(self.fe, 2)


def once_at(tokens, action):
    """An on_event callback that runs action() once, when a stream has `tokens` token ids."""
    fired = threading.Event()

    def on_event(i, st, obj):
        if len(st.token_ids) >= tokens and not fired.is_set():
            fired.set()
            action()
        return False
    return on_event


def kill9(c, p):
    f = Fleet(c, p)
    runs = run_load(f.fe, p, "kill", on_event=once_at(p["trigger"], lambda: f.w1.proc.kill(signal.SIGKILL)))
    check(f.fe, "kill", f.refs, runs)


def sigstop(c, p):
    f = Fleet(c, p, fe_flags={"stream_stall_timeout": 2})
    try:
        runs = run_load(f.fe, p, "stop", on_event=once_at(p["trigger"], lambda: f.w1.proc.kill(signal.SIGSTOP)))
    finally:
        f.w1.proc.kill(signal.SIGCONT)
    check(f.fe, "stop", f.refs, runs)


def drain(c, p):
    f = Fleet(c, p, second={"graceful_shutdown_timeout": 1})
    runs = run_load(f.fe, p, "term", on_event=once_at(p["trigger"], lambda: f.w1.proc.kill(signal.SIGTERM)))
    assert f.w1.proc.wait(15) == 0, f"the drained worker exited {f.w1.proc.returncode}"
    check(f.fe, "term", f.refs, runs)


class HealthWatch:
    """Polls a worker's /live and /health every 20 ms from a thread until the process exits, and
    checks what a failed engine must answer there: once /live has said "dead" (503) it never says
    live again, and /health is never 200 from then on. `require_dead` (a worker that stays up for
    a while after its engine failed: a hung llama.cpp thread is waited for 5 s) also requires that
    both answers were seen: /live 503 "dead" and /health 503 "notready"."""

    def __init__(self, w):
        self.w, self.seen = w, []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _get(self, path):
        try:
            st, _, body = bl.get_json(self.w.system_url + path, timeout=2)
            return st, (body or {}).get("status")
        except OSError:
            return None  # not up, or gone

    def _run(self):
        while self.w.proc.alive():
            for path in ("/live", "/health"):
                r = self._get(path)
                if r:
                    self.seen.append((path, *r))
            time.sleep(0.02)

    def check(self, require_dead):
        self.t.join(30)
        dead_at = next((i for i, (path, st, status) in enumerate(self.seen)
                        if path == "/live" and st == 503 and status == "dead"), None)
        if require_dead:
            assert dead_at is not None, f"/live never answered 503 dead after the engine failed: {self.seen[-6:]}"
            assert any(path == "/health" and st == 503 and status == "notready"
                       for path, st, status in self.seen[dead_at:]), \
                f"/health did not answer 503 notready after the engine failed: {self.seen[dead_at:][:6]}"
        if dead_at is not None:
            after = self.seen[dead_at:]
            assert not any(path == "/live" and st != 503 for path, st, _ in after), f"/live came back: {after}"
            assert not any(path == "/health" and st == 200 for path, st, _ in after), f"/health ready again: {after}"


def engine_failure(c, p):
    f = Fleet(c, p, second={"fault_die_after_tokens": p["die_after"]})
    watch = HealthWatch(f.w1)
    runs = run_load(f.fe, p, "die")
    assert f.w1.proc.wait(10) == 1, f"the worker whose engine died exited {f.w1.proc.returncode}, not 1"
    watch.check(require_dead=False)
    assert "Engine health check failed" in f.w1.proc.log_text(), "the worker did not report its engine dead"
    check(f.fe, "die", f.refs, runs)


def engine_hang(c, p):
    f = Fleet(c, p, second=dict(p["hang"], engine_stuck_timeout=1))
    watch = HealthWatch(f.w1)
    runs = run_load(f.fe, p, "hang")
    # a hung llama.cpp thread is left to the process's exit after 5 s (docs/engines.md §3)
    assert f.w1.proc.wait(20) == 1, f"the worker whose engine hung exited {f.w1.proc.returncode}, not 1"
    # those 5 s are a window in which the worker still answers: it must say it is dead
    watch.check(require_dead=p["worker"].get("engine") == "llama")
    log = f.w1.proc.log_text()
    assert "Engine health check failed" in log and "stuck scheduler" in log, \
        "the engine monitor did not fail the worker\n" + f.w1.proc.log_tail()
    if p["worker"].get("engine") == "llama":
        assert "the engine thread did not stop" in log, f.w1.proc.log_tail()
    check(f.fe, "hang", f.refs, runs)


def _engine_fails(c, p, key, tag, why):
    f = Fleet(c, p, second=p[key])
    runs = run_load(f.fe, p, tag)
    assert f.w1.proc.wait(15) == 1, f"the worker whose engine failed ({why}) exited {f.w1.proc.returncode}, not 1"
    log = f.w1.proc.log_text()
    assert f"llama engine failed: {why}" in log and "Engine health check failed" in log, f.w1.proc.log_tail()
    check(f.fe, tag, f.refs, runs)


def engine_nan(c, p):
    _engine_fails(c, p, "nan", "nan", "non-finite logits")


def engine_decode_error(c, p):
    _engine_fails(c, p, "decode_error", "decerr", "injected decode failure")


def worker_kv(w):
    """The KV blocks the worker's engine holds (baton_worker_kv_active_blocks)."""
    return bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_active_blocks")


def worker_idle(w):
    m = bl.metrics(w.system_url)
    return bl.metric_sum(m, "baton_worker_active_sequences") == 0 and bl.metric_sum(m, "baton_worker_kv_active_blocks") == 0


def cancel_storm(c, p):
    f = Fleet(c, p)
    n = 2 * streams(p)
    # every other stream closed by its client, each at another point of its first half
    cut = {i: 10 + i * max_tokens(p, i % streams(p)) // (2 * n) for i in range(1, n, 2)}

    def on_event(i, st, obj):
        return i in cut and len(st.token_ids) >= cut[i]
    runs = run_load(f.fe, p, "cancel", n=n, on_event=on_event, noise=0)
    for i in cut:
        assert runs[i].aborted and len(runs[i].token_ids) < max_tokens(p, i % streams(p)), runs[i].summary()
    check(f.fe, "cancel", f.refs, runs, only=[i for i in range(n) if i not in cut], want_migrated=False)
    log = f.fe.proc.log_text()
    gone = [i for i in cut if re.search(rf"request cancel-{i}: client disconnected", log)]
    assert sorted(gone) == sorted(cut), f"the frontend saw {sorted(gone)} of {sorted(cut)} clients leave"
    # each cut stream's KILL reached its worker, which dropped the sequence from its engine
    wlog = f.w1.proc.log_text() + f.w2.proc.log_text()
    killed = [i for i in cut if re.search(rf"request cancel-{i} killed \(kill from the frontend\)", wlog)]
    assert sorted(killed) == sorted(cut), f"the workers killed {sorted(killed)} of {sorted(cut)} in their engines"
    for w in (f.w1, f.w2):
        bl.wait_for(lambda: worker_idle(w), 10, what="every sequence and KV block freed after the cancellations")
    print(f"cancel_storm: {len(cut)} streams cancelled by their clients, their sequences and KV freed")


def shedding(c, p):
    fe = c.start_frontend(active_decode_blocks_threshold=0.3)
    w = c.start_worker(system_port=True, wait=True, **p["kv"])
    c.wait_workers(fe, 1)
    total = bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_total_blocks")
    assert total == 256, f"total KV blocks {total}, expected 256"
    results = {}

    def long_stream(i, started):
        body = bl.completion_body(f"Once upon a time {i}", max_tokens=600, model=MODEL, temperature=0)
        results[i] = bl.stream_completion(fe.url, body, timeout=60, on_event=lambda st, o: started.set())
        started.set()

    ts = []
    for i in range(4):  # one after the other: the frontend's estimate for requests in flight admits them
        started = threading.Event()
        ts.append(threading.Thread(target=long_stream, args=(i, started)))
        ts[-1].start()
        assert started.wait(20), f"long stream {i} did not start"
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_active_blocks") > 0.3 * 256 + 8, 20,
                what="the streams to hold more than 30 % of the KV blocks")
    st, headers, body = bl.post_json(fe.url + "/v1/completions", bl.completion_body("Hello", max_tokens=4, model=MODEL))
    assert st == 503 and "retry-after" in headers, f"expected 503 with Retry-After, got {st} {headers} {body}"
    for t in ts:
        t.join()
    for i in range(4):
        results[i].assert_ok(f"long stream {i}")
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_active_blocks") == 0, 5,
                what="KV freed")

    def served():
        return bl.post_json(fe.url + "/v1/completions", bl.completion_body("Hello", max_tokens=4, model=MODEL))[0] == 200
    bl.wait_for(served, 10, what="requests served again once the KV is free")
    print("shedding: 503 while the streams held > 30 % of the KV blocks, served after")


SCENARIOS = {f.__name__: f for f in (kill9, sigstop, drain, engine_failure, engine_hang, engine_nan,
                                      engine_decode_error, cancel_storm, shedding)}
# scenarios that need what only some engines have (the profile key they read)
ENGINE_ONLY = {"engine_nan": "nan", "engine_decode_error": "decode_error"}


def run_streams(n, start, tag, trigger=None, action=None):
    """Runs start(i, request_id, on_event) for i < n concurrently and returns the streams. With an
    action, action() runs once, when every one of the n streams has `trigger` token ids (asserted)."""
    counts = [0] * n
    lock = threading.Lock()
    fired = threading.Event()

    def on_event(i, st, obj):
        with lock:
            counts[i] = len(st.token_ids)
            if not fired.is_set() and min(counts) >= trigger:
                fired.set()
                action()
        return False

    def one(i):
        return start(i, f"{tag}-{i}", (lambda st, obj: on_event(i, st, obj)) if action else None)

    res = bl.run_concurrently(one, list(range(n)), max_workers=n)
    assert not action or fired.is_set(), f"{tag}: the trigger never fired (counts {counts})"
    return res


KV_FALLBACKS = ("missing", "corrupt", "mismatch", "tokens", "import", "unsupported")


def kv_counters(w):
    """A worker's KV hand-off and prefill counters (its status server's /metrics)."""
    s = bl.metrics(w.system_url)
    return {"prefill": bl.metric_sum(s, "baton_worker_engine_prefill_tokens_total"),
            "imports": bl.metric_sum(s, "baton_worker_kv_handoff_imports_total"),
            "imported_tokens": bl.metric_sum(s, "baton_worker_kv_handoff_imported_tokens_total"),
            "exports": bl.metric_sum(s, "baton_worker_kv_handoff_exports_total"),
            "export_bytes": bl.metric_sum(s, "baton_worker_kv_handoff_export_bytes_total"),
            "fallbacks": {r: bl.metric_sum(s, "baton_worker_kv_handoff_fallbacks_total", reason=r)
                          for r in KV_FALLBACKS}}


def handoff_round(fe, refs, tag, run, receiver, action):
    """One KV hand-off round: run(tag, on_all) runs the load and calls on_all() once every stream
    reached its trigger; on_all reads the receiver's counters, then runs action() (the fault: a
    SIGTERM, a rebalance). Every stream must equal its reference and some must have moved.
    Returns (indices of the moved streams, the receiver's counters before and after)."""
    before = {}

    def on_all():
        before.update(kv_counters(receiver))
        action()

    runs = run(tag, on_all)
    assert_exact(refs, runs, tag)
    moved = migrated(fe, tag)
    assert moved, f"{tag}: no stream moved\n" + fe.proc.log_tail()
    return moved, before, kv_counters(receiver)


def start_all(fn, url, bodies, headers=None, timeout=60, started=None):
    """Starts fn(url, body) (bl.stream_chat or bl.stream_completion) for every body, each on its own
    thread; returns (the list the streams land in, the threads). With `started` (one
    threading.Event per body), started[i] is set once stream i has its first token."""
    out = [None] * len(bodies)

    def on_event(i, st, ev):
        if started is not None and st.t_first is not None:
            started[i].set()
        return False

    def one(i):
        out[i] = fn(url, bodies[i], timeout=timeout, headers=headers,
                    on_event=(lambda st, ev: on_event(i, st, ev)) if started is not None else None)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in ts:
        t.start()
    return out, ts


def preemptions(w, reason):
    """Sequences the worker's engine preempted for `reason` ("kv" or "priority")."""
    return bl.metric_sum(bl.metrics(w.system_url), "baton_worker_preemptions_total", reason=reason)


def run_all(fn, url, bodies, timeout=60, what="a reference stream", check=None):
    """fn(url, body) for every body at once (start_all), waited for: the streams, each ended ok
    (`what` names them in a failure) and passing check(s), when given."""
    out, ts = start_all(fn, url, bodies, timeout=timeout)
    for t in ts:
        t.join(timeout)
    for s in out:
        assert s is not None, f"{what} did not finish"
        s.assert_ok(what)
        if check:
            check(s)
    return out


def preemption_overload(fn, url, low_bodies, urgent_bodies, ready, timeout=60, urgent_timeout=30, check_urgent=None):
    """The overload of a priority preemption test (test_priority_preempt, test_llama_priority_preempt):
    every low-priority body at once with X-Priority 10; once ready(started) holds (started: one
    threading.Event per low stream, set at its first token), the urgent bodies one at a time, each
    ending ok (and passing check_urgent(s), when given). `timeout` bounds a low-priority stream,
    `urgent_timeout` an urgent one. Returns (low, urgent) after every
    low-priority stream has ended."""
    started = [threading.Event() for _ in low_bodies]
    low, ts = start_all(fn, url, low_bodies, headers={"X-Priority": "10"}, timeout=timeout, started=started)
    bl.wait_for(lambda: ready(started), 30, interval=0.01, what="the worker full of low-priority streams")
    urgent = []
    for body in urgent_bodies:
        s = fn(url, body, timeout=urgent_timeout)
        s.assert_ok("an urgent request under overload")
        if check_urgent:
            check_urgent(s)
        urgent.append(s)
    for t in ts:
        t.join(timeout + 30)
    return low, urgent


def assert_same_as_refs(low, ref):
    """Every low-priority stream ended ok and equals its reference exactly (text, token ids,
    finish_reason, usage): a preempted sequence recomputed from its tokens lost nothing."""
    for i, s in enumerate(low):
        assert s is not None, "a low-priority request did not finish"
        s.assert_ok("a low-priority stream")
        assert outcome(s) == outcome(ref[i]), \
            f"low-priority stream {i} differs from its reference:\n  got {s.summary()}\n  ref {ref[i].summary()}"


def llama_test(name, seconds, body, workers=1, fe_flags=None):
    """The frame of a llama test script: 77 (skipped) when this build has no llama.cpp; else,
    within `seconds` (times SLOW), a cluster of a frontend (fe_flags) and `workers` llama workers
    logging at debug level, each with its status port, all routable, handed to body(c, fe, ws);
    prints ok and returns 0 when body returns."""
    if skip("llama") is not None:  # scripts/setup was told not to fetch llama.cpp
        return 77
    with bl.deadline(seconds * SLOW, name):
        with bl.Cluster() as c:
            fe = c.start_frontend(**(fe_flags or {}))
            ws = [c.start_worker(engine="llama", system_port=True, wait=True, env={"DYN_LOG": "debug"})
                  for _ in range(workers)]
            c.wait_workers(fe, workers)
            body(c, fe, ws)
    print("ok")
    return 0
