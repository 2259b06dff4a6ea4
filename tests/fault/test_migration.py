"""Request migration through the real binaries, checked byte for byte: three mocker workers, a hundred
concurrent streams of a few hundred tokens (and some non-streaming requests), then kill -9 of one
worker mid-stream (also with a stream journal too small for every stream, so that some streams
lose their journal record before the kill), kill -9 of workers one after another until one is left,
and SIGSTOP of a worker
(declared dead by missed heartbeats, SIGCONT afterwards). Every request must end exactly as its
fault-free reference (text, token ids, finish reason, usage); the migration counters, the stall
histogram and the frontend's one-line-per-migration log must account for every migrated request;
afterwards the frontend is back to baseline. A self-test first proves the checkers reject a result
with a dropped, duplicated or reordered token.

The helpers here are also used by test_migration_errors.py (budget exhausted, no worker left,
failures before the first token).
"""

import copy
import json
import re
import signal
import threading
import time

import batonlib as bl

MODEL = "mock-model"
# Decode steps take ~6.4 ms at speedup 1 with these loads: 250-350 tokens last ~3-5 s at 0.6.
SPEEDUP = 0.6
STALL_TIMEOUT = 2.0  # the frontend's --stream-stall-timeout in these tests (its default)

# ---------------------------------------------------------------------------------------------
# Requests and their outcomes.


def max_tokens_for(i):
    return 250 + (i * 37) % 100


def body_for(i, stream):
    """Request i: chat for most, completions for every fourth; two in five sample (temperature and
    seed: the engine's randomness is a function of seed and position, so it must continue exactly
    too), most of those with a nucleus (top_p < 1), which takes part in the choice; all return
    token ids."""
    extra = {"return_token_ids": True}
    if i % 5 == 1:
        extra.update(temperature=0.9, seed=1000 + i)
        if i % 10 == 1:
            extra["top_p"] = 0.8
    if i % 5 == 3:
        extra.update(temperature=0.7, seed=2000 + i, top_p=0.5)
    if stream:
        extra["stream_options"] = {"include_usage": True}
    if i % 4 == 3:
        return "completion", bl.completion_body(f"Migration prompt {i}: the story of topic {(i * 7919) % 1000}",
                                                max_tokens=max_tokens_for(i), **extra)
    return "chat", bl.chat_body(f"Migration prompt {i}: tell me about topic {(i * 7919) % 1000}",
                                max_tokens=max_tokens_for(i), **extra)


class Req:
    """One request of a load: its index (which fixes its body), kind and request id; `ntok` is the
    number of token ids received so far (streams), `stream_obj` the batonlib Stream, `result` the
    normalised outcome (see outcome_of_*)."""

    def __init__(self, i, stream, rid):
        self.i, self.stream, self.rid = i, stream, rid
        self.api, self.body = body_for(i, stream)
        self.ntok = 0
        self.stream_obj = None
        self.unary = None  # (status, body bytes)
        self.result = None
        self.t_end = None

    def __repr__(self):
        return f"<Req {self.rid} stream={self.stream} ntok={self.ntok}>"


def outcome_of_stream(s):
    """A Stream -> the dict the checkers compare."""
    return {"complete": s.ok, "status": s.status, "text": s.text, "token_ids": list(s.token_ids),
            "finish_reason": s.finish_reason, "usage": s.usage, "error": s.error, "done": s.done,
            "closed_early": s.closed_early, "timed_out": s.timed_out, "after_done": list(s.after_done),
            "json": None}


def outcome_of_unary(status, data):
    obj = None
    try:
        obj = json.loads(data)
    except ValueError:
        pass
    out = {"complete": False, "status": status, "text": None, "token_ids": None, "finish_reason": None,
           "usage": None, "error": None, "done": False, "closed_early": False, "timed_out": False,
           "after_done": [], "json": None}
    if not isinstance(obj, dict):
        out["error"] = {"message": f"not JSON: {data[:200]!r}"}
        return out
    if status != 200:
        out["error"] = obj.get("error")
        return out
    c = (obj.get("choices") or [{}])[0]
    out["text"] = c["message"]["content"] if "message" in c else c.get("text")
    out["token_ids"] = c.get("token_ids")
    out["finish_reason"] = c.get("finish_reason")
    out["usage"] = obj.get("usage")
    out["complete"] = out["finish_reason"] is not None
    out["json"] = {k: v for k, v in obj.items() if k not in ("id", "created")}
    return out


def run_req(fe_url, r):
    headers = {"X-Request-Id": r.rid}
    if r.stream:
        def on_event(st, obj):
            r.ntok = len(st.token_ids)
            return False

        fn = bl.stream_chat if r.api == "chat" else bl.stream_completion
        s = fn(fe_url, r.body, timeout=90, headers=headers, on_event=on_event)
        r.stream_obj = s
        r.result = outcome_of_stream(s)
    else:
        path = "/v1/chat/completions" if r.api == "chat" else "/v1/completions"
        try:
            status, _, data = bl.request("POST", fe_url + path, r.body, headers, timeout=90)
        except OSError as e:
            status, data = None, repr(e).encode()
        r.unary = (status, data)
        r.result = outcome_of_unary(status, data)
    r.t_end = time.monotonic()
    return r


def make_reqs(prefix, indices, stream):
    return [Req(i, stream, f"{prefix}-{i}") for i in indices]


class Load:
    """Runs requests concurrently on background threads."""

    def __init__(self, fe, reqs):
        self.fe, self.reqs = fe, reqs
        self.errors = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.t_start = time.monotonic()
        self.thread.start()

    def _run(self):
        res = bl.run_concurrently(lambda r: run_req(self.fe.url, r), self.reqs, max_workers=len(self.reqs),
                                  return_exceptions=True)
        self.errors = [e for e in res if isinstance(e, BaseException)]

    def streams(self):
        return [r for r in self.reqs if r.stream]

    def wait_tokens(self, n, timeout=60):
        """Until every streaming request has at least n token ids."""
        bl.wait_for(lambda: all(r.ntok >= n for r in self.streams()), timeout, 0.02,
                    f"every stream to reach {n} tokens (now min "
                    f"{min((r.ntok for r in self.streams()), default=0)})")

    def join(self, timeout=120):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"requests still running after {timeout} s"
        assert not self.errors, f"request threads raised: {self.errors[:3]!r}"
        assert all(r.result is not None for r in self.reqs)
        return self.reqs


# ---------------------------------------------------------------------------------------------
# References and the checkers.


def references(indices_stream, indices_unary):
    """Fault-free outcomes of every request index used, from a cluster of its own (one fast
    worker): {("s"|"u", i): outcome}."""
    refs = {}
    with bl.Cluster() as c:
        fe = c.start_frontend()
        c.start_worker(speedup_ratio=20)
        c.wait_workers(fe, 1)
        reqs = make_reqs("ref", indices_stream, True) + make_reqs("refu", indices_unary, False)
        bl.run_concurrently(lambda r: run_req(fe.url, r), reqs, max_workers=32)
        for r in reqs:
            assert r.result["complete"], f"reference {r.rid} did not complete: {r.result}"
            assert r.result["finish_reason"] == "length" and len(r.result["token_ids"]) == max_tokens_for(r.i), \
                f"reference {r.rid}: {r.result['finish_reason']} after {len(r.result['token_ids'])} tokens"
            refs[("s" if r.stream else "u", r.i)] = r.result
    for i in indices_stream:
        if ("u", i) in refs:  # the same request, streamed or not, gives the same text and ids
            assert refs[("u", i)]["text"] == refs[("s", i)]["text"]
    return refs


def ref_of(refs, r):
    return refs[("s" if r.stream else "u", r.i)]


def _first_diff(a, b):
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return min(len(a), len(b))


def check_exact(got, ref):
    """Problems (a list of strings, empty when none) of a request that should have completed
    exactly as its fault-free reference: complete, same text, token ids, finish reason and usage;
    for non-streaming requests the whole JSON body but id and created."""
    p = []
    if not got["complete"]:
        p.append(f"did not complete: status={got['status']} error={got['error']} done={got['done']} "
                 f"closed_early={got['closed_early']} timed_out={got['timed_out']}")
    if got["after_done"]:
        p.append(f"{len(got['after_done'])} events after [DONE]")
    if got["text"] != ref["text"]:
        k = _first_diff(got["text"] or "", ref["text"])
        p.append(f"text differs at byte {k}: got {(got['text'] or '')[k:k + 30]!r}, want {ref['text'][k:k + 30]!r} "
                 f"(lengths {len(got['text'] or '')} / {len(ref['text'])})")
    if got["token_ids"] != ref["token_ids"]:
        g = got["token_ids"] or []
        k = _first_diff(g, ref["token_ids"])
        p.append(f"token ids differ at index {k}: got {g[k:k + 5]}, want {ref['token_ids'][k:k + 5]} "
                 f"(lengths {len(g)} / {len(ref['token_ids'])})")
    if got["finish_reason"] != ref["finish_reason"]:
        p.append(f"finish_reason {got['finish_reason']!r}, want {ref['finish_reason']!r}")
    if got["usage"] != ref["usage"]:
        p.append(f"usage {got['usage']}, want {ref['usage']}")
    if ref["json"] is not None and got["json"] != ref["json"]:
        p.append("JSON body differs from the reference")
    return p


def check_clean_error(got, ref, stream):
    """Problems of a request that should have ended with a clear error: a stream with a final SSE
    data event carrying an error object and no [DONE] (or, before its first token, a 5xx JSON
    error), whose text and ids so far are an exact prefix of the reference; a non-streaming
    request with a 5xx JSON error."""
    p = []
    err = got["error"]
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not err.get("message") \
            or not isinstance(err.get("type"), str) or not isinstance(err.get("code"), str):
        p.append(f"no error object with message, type and code: {err!r}")
    if got["timed_out"]:
        p.append("timed out (hung)")
    if got["done"] or got["complete"]:
        p.append("ended with [DONE] / a finish reason instead of an error")
    if stream and got["status"] == 200:
        text, ids = got["text"] or "", got["token_ids"] or []
        if not ref["text"].startswith(text):
            k = _first_diff(text, ref["text"])
            p.append(f"text before the error is not a prefix of the reference (differs at byte {k})")
        if ref["token_ids"][:len(ids)] != ids:
            p.append(f"token ids before the error are not a prefix (differ at {_first_diff(ids, ref['token_ids'])})")
        if len(ids) >= len(ref["token_ids"]):
            p.append("all tokens arrived, yet an error")
        if not got["closed_early"]:
            p.append("the connection did not close after the error event")
    elif not (isinstance(got["status"], int) and 500 <= got["status"] <= 599):
        p.append(f"status {got['status']}, want a 5xx JSON error (or 200 with an SSE error event)")
    return p


def assert_no_problems(reqs, refs, what):
    bad = [(r.rid, pr) for r in reqs for pr in [check_exact(r.result, ref_of(refs, r))] if pr]
    assert not bad, f"{what}: {len(bad)} of {len(reqs)} requests differ from their references: {bad[:5]}"


def selftest_checkers(refs):
    """The checkers must reject broken results: a dropped, duplicated or swapped token, a dropped
    text byte, a missing [DONE], a different usage, an error prefix with a gap."""
    ref = refs[("s", 0)]
    good = copy.deepcopy(ref)
    assert check_exact(good, ref) == [], check_exact(good, ref)
    doctored = []
    d = copy.deepcopy(ref)
    del d["token_ids"][len(d["token_ids"]) // 2]
    doctored.append(("dropped token id", d))
    d = copy.deepcopy(ref)
    k = len(d["text"]) // 2
    d["text"] = d["text"][:k] + d["text"][k + 1:]
    doctored.append(("dropped text byte", d))
    d = copy.deepcopy(ref)
    d["token_ids"].insert(10, d["token_ids"][10])
    doctored.append(("duplicated token id", d))
    d = copy.deepcopy(ref)
    d["token_ids"][5], d["token_ids"][6] = d["token_ids"][6], d["token_ids"][5]
    if d["token_ids"] != ref["token_ids"]:
        doctored.append(("swapped token ids", d))
    d = copy.deepcopy(ref)
    d["complete"], d["done"] = False, False
    doctored.append(("no [DONE]", d))
    d = copy.deepcopy(ref)
    d["usage"] = dict(d["usage"], completion_tokens=d["usage"]["completion_tokens"] - 1)
    doctored.append(("usage off by one", d))
    d = copy.deepcopy(ref)
    d["token_ids"] = d["token_ids"][:-1]
    d["text"] = d["text"][:-1]
    doctored.append(("last token missing", d))
    for name, d in doctored:
        assert check_exact(d, ref), f"check_exact accepted a result with a {name}"
    uref = refs[("u", 100)] if ("u", 100) in refs else None
    if uref is not None:
        d = copy.deepcopy(uref)
        d["json"] = copy.deepcopy(uref["json"])
        d["json"]["choices"][0]["token_ids"] = d["json"]["choices"][0]["token_ids"][1:]
        assert check_exact(d, uref), "check_exact accepted a JSON body with a dropped token"
    # error-prefix checker: a clean prefix passes, a prefix with a gap or a [DONE] does not
    half = len(ref["token_ids"]) // 2
    e = dict(copy.deepcopy(ref), complete=False, done=False, closed_early=True,
             error={"message": "x", "type": "server_error", "param": None, "code": "worker_unavailable"})
    e["token_ids"] = ref["token_ids"][:half]
    e["text"] = ref["text"][:len(ref["text"]) // 2]
    assert check_clean_error(e, ref, True) == [], check_clean_error(e, ref, True)
    g = copy.deepcopy(e)
    del g["token_ids"][3]
    assert check_clean_error(g, ref, True), "check_clean_error accepted ids with a gap"
    g = copy.deepcopy(e)
    g["text"] = g["text"][:5] + g["text"][6:]
    assert check_clean_error(g, ref, True), "check_clean_error accepted text with a gap"
    g = dict(copy.deepcopy(e), done=True)
    assert check_clean_error(g, ref, True), "check_clean_error accepted [DONE] after an error"
    g = dict(copy.deepcopy(e), error=None)
    assert check_clean_error(g, ref, True), "check_clean_error accepted a stream without an error object"
    g = dict(copy.deepcopy(e), timed_out=True)
    assert check_clean_error(g, ref, True), "check_clean_error accepted a hung stream"
    print(f"selftest: checkers reject {len(doctored) + 1} doctored results and 5 bad error endings")


# ---------------------------------------------------------------------------------------------
# The frontend's view: worker ids, gauges, counters, migration log lines.


def worker_ids(instances):
    """/health instances -> {rpc port: instance id as the metrics print it (lower-case hex)}."""
    out = {}
    for inst in instances:
        port = int(inst["transport"]["tcp"].rsplit(":", 1)[1])
        out[port] = format(inst["instance_id"], "x")
    return out


def worker_gauge(fe, name):
    """{worker id: value} of baton_frontend_worker_<name>."""
    m = bl.metrics(fe.url)
    out = {}
    for k, v in m.items():
        if k.startswith(f"baton_frontend_worker_{name}{{"):
            out[bl.parse_labels(k[k.index("{"):])["worker_id"]] = v
    return out


def counters(fe):
    m = bl.metrics(fe.url)
    g = lambda name, **kw: bl.metric_sum(m, name, model=MODEL, **kw)  # noqa: E731
    hist = "dynamo_frontend_model_migration_stall_seconds"
    return {
        "new": g("dynamo_frontend_model_migration_total", migration_type="new_request"),
        "ongoing": g("dynamo_frontend_model_migration_total", migration_type="ongoing_request"),
        "exhausted": g("dynamo_frontend_model_migration_exhausted_total"),
        "limit": g("dynamo_frontend_model_migration_limit"),
        "stall_count": g(hist + "_count"),
        "stall_le_1": g(hist + "_bucket", le="1"),
        "stall_le_10": g(hist + "_bucket", le="10"),
        "inflight": g("dynamo_frontend_inflight_requests"),
        "tokens": g("dynamo_frontend_output_tokens_total"),
    }


def delta(after, before):
    return {k: after[k] - before[k] for k in after}


MIG_RX = re.compile(r"request (\S+) migrated from worker ([0-9a-f]+) to worker ([0-9a-f]+) with (\d+) tokens "
                    r"carried \((new_request|ongoing_request) after (BT_[A-Z_]+): ")


def migrations(fe, prefix):
    """The frontend's migration log lines for request ids starting with prefix + '-'."""
    out = []
    for m in MIG_RX.finditer(fe.proc.log_text()):
        if m.group(1).startswith(prefix + "-"):
            out.append({"rid": m.group(1), "from": m.group(2), "to": m.group(3), "carried": int(m.group(4)),
                        "type": m.group(5), "code": m.group(6)})
    return out


def proc_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rfind(")") + 2]


def check_baseline(c, fe, refs, n_workers, prefix):
    """Back to baseline: nothing in flight (frontend and per worker), the expected routable
    workers, a fresh request answered exactly."""
    bl.wait_for(lambda: counters(fe)["inflight"] == 0, 15, 0.1, "the frontend's inflight gauge to return to 0")
    bl.wait_for(lambda: all(v == 0 for v in worker_gauge(fe, "inflight").values()), 15, 0.1,
                "every worker's inflight gauge to return to 0")
    c.wait_workers(fe, n_workers, timeout=20)
    fresh = make_reqs(prefix + "-fresh", [0], True) + make_reqs(prefix + "-freshu", [100], False)
    for r in fresh:
        run_req(fe.url, r)
    assert_no_problems(fresh, refs, f"{prefix}: fresh requests after the fault")
    bl.wait_for(lambda: counters(fe)["inflight"] == 0, 10, 0.1, "inflight 0 after the fresh requests")
    bl.wait_for(lambda: bl.metrics(fe.url)["baton_frontend_http_connections"] <= 1, 10, 0.1,
                "client connections to close")


def start_cluster(c, n, fe_flags=None, **worker_flags):
    fe = c.start_frontend(stream_stall_timeout=STALL_TIMEOUT, **(fe_flags or {}))
    worker_flags.setdefault("speedup_ratio", SPEEDUP)
    ws = [c.start_worker(**worker_flags) for _ in range(n)]
    ids = worker_ids(c.wait_workers(fe, n))
    return fe, ws, ids


def kill9(w):
    w.proc.kill(signal.SIGKILL)
    rc = w.proc.wait(5)
    assert rc == -signal.SIGKILL, f"worker pid {w.proc.pid} did not die of SIGKILL (status {rc})"


# ---------------------------------------------------------------------------------------------
# Scenarios.

N_STREAMS = 100
UNARY = list(range(100, 120))


def scenario_kill_one(refs, prefix="k1", streams=range(N_STREAMS), unary=UNARY, fe_flags=None, on_load=None):
    """kill -9 one of three workers while 100 streams and 20 non-streaming requests run.
    test_threads.py runs the same with other flags for the frontend; on_load(fe, load) is called
    once every stream is under way, before the kill."""
    with bl.Cluster() as c:
        fe, ws, ids = start_cluster(c, 3, fe_flags)
        before = counters(fe)
        assert before["limit"] == 3, f"default migration limit gauge is {before['limit']}, want 3"
        load = Load(fe, make_reqs(prefix, streams, True) + make_reqs(prefix + "u", unary, False))
        load.wait_tokens(30)
        if on_load:
            on_load(fe, load)
        victim = ws[0]
        vid = ids[victim.rpc_port]
        inflight = worker_gauge(fe, "inflight")[vid]
        assert inflight > 0, "the victim serves no request"
        kill9(victim)
        reqs = load.join()
        after = counters(fe)
        assert_no_problems(reqs, refs, "kill -9 of one worker")
        migs = migrations(fe, prefix) + migrations(fe, prefix + "u")
        d = delta(after, before)
        print(f"kill one: victim had {inflight:.0f} requests; {len(migs)} migrated; deltas {d}")
        assert len(migs) == inflight, f"{len(migs)} migration log lines for {inflight:.0f} requests on the victim"
        assert len({m["rid"] for m in migs}) == len(migs), "a request migrated twice"
        for m in migs:
            assert m["from"] == vid and m["to"] != vid and m["to"] in ids.values(), m
            assert m["type"] == "ongoing_request" and m["carried"] > 0 and m["code"] == "BT_ERR_DISCONNECTED", m
        assert any(m["rid"].startswith(prefix + "u-") for m in migs), "no non-streaming request migrated"
        by_rid = {r.rid: r for r in reqs}
        assert any(by_rid[m["rid"]].body.get("top_p", 1) < 1 for m in migs), "no stream with a nucleus migrated"
        assert d["ongoing"] == len(migs) and d["new"] == 0 and d["exhausted"] == 0, d
        assert d["stall_count"] == len(migs), f"stall histogram counted {d['stall_count']}, want {len(migs)}"
        check_baseline(c, fe, refs, 2, prefix)
    return reqs, migs


# the frontend's warning when a stream's record is dropped (the journal full)
DROP_RX = re.compile(r"request (\S+): stream journal full; stream [0-9a-f]+ is no longer resumable")


def scenario_journal_full(refs):
    """The same kill -9 with a stream journal too small for every stream: a streaming request's
    output lives only in its journal record while the record lives, and goes back to the request
    when the journal drops the record (full); at the kill some streams still have their record and
    others have lost it, and both kinds must migrate carrying exactly what was delivered."""
    seen = {}

    def at_kill(fe, load):
        # A record is dropped when its stream outgrows the room it opened with (64 tokens here)
        # and the full journal has none to give. At 70 tokens every journaled stream has passed
        # that room: each record has grown or been dropped, on every worker, the victim's too.
        load.wait_tokens(70)
        m = bl.metrics(fe.url)
        seen["dropped"] = bl.metric_sum(m, "baton_frontend_stream_journal_evictions_total", reason="dropped_live")
        seen["live"] = bl.metric_sum(m, "baton_frontend_stream_journal_streams", state="live")
        seen["dropped_rids"] = set(DROP_RX.findall(fe.proc.log_text()))

    reqs, migs = scenario_kill_one(refs, prefix="jf", fe_flags={"stream_retention_bytes": 160 * 1024},
                                   on_load=at_kill)
    # of the victim's streams, one whose record was dropped before the kill and one that still had
    # its record (journaled from its first event): both migrated, their output checked above
    by_rid = {r.rid: r for r in reqs}
    lost = [m["rid"] for m in migs if m["rid"] in seen["dropped_rids"]]
    kept = [m["rid"] for m in migs if m["rid"] not in seen["dropped_rids"] and by_rid[m["rid"]].stream and
            by_rid[m["rid"]].stream_obj.event_ids and by_rid[m["rid"]].stream_obj.event_ids[0] is not None]
    print(f"journal full: at the kill {seen['dropped']:.0f} live records had been dropped, {seen['live']:.0f} live; "
          f"of the {len(migs)} migrated, {len(lost)} had lost their record, {len(kept)} still had it")
    assert seen["dropped"] > 0, "no live record was dropped before the kill: the scenario tests nothing new"
    assert len(seen["dropped_rids"]) == seen["dropped"], (seen["dropped_rids"], seen["dropped"])
    assert seen["live"] > 0, "no stream kept its record until the kill"
    assert lost, "no stream whose record had been dropped migrated: the drop path's migration is untested"
    assert kept, "no stream that still had its record migrated"


def scenario_kill_until_one(refs):
    """kill -9 two of three workers one after the other; the streams end on the last one."""
    with bl.Cluster() as c:
        fe, ws, ids = start_cluster(c, 3)
        before = counters(fe)
        load = Load(fe, make_reqs("k2", range(N_STREAMS), True) + make_reqs("k2u", UNARY[:10], False))
        load.wait_tokens(20)
        first = worker_gauge(fe, "inflight")[ids[ws[0].rpc_port]]
        kill9(ws[0])
        load.wait_tokens(90)  # every stream moved on past the first failure
        second = worker_gauge(fe, "inflight")[ids[ws[1].rpc_port]]
        assert second > first / 2, f"the second victim holds {second:.0f} requests after the first failure"
        kill9(ws[1])
        reqs = load.join()
        d = delta(counters(fe), before)
        assert_no_problems(reqs, refs, "kill -9 of workers until one is left")
        migs = migrations(fe, "k2") + migrations(fe, "k2u")
        a, b, last = (ids[w.rpc_port] for w in ws)
        from_a = [m for m in migs if m["from"] == a]
        from_b = [m for m in migs if m["from"] == b]
        print(f"kill until one: {first:.0f} then {second:.0f} requests on the victims; {len(migs)} migrations; "
              f"deltas {d}")
        assert len(from_a) == first and len(from_b) == second and len(migs) == first + second, \
            (len(from_a), first, len(from_b), second, len(migs))
        assert all(m["to"] in (b, last) for m in from_a), from_a
        assert all(m["to"] == last for m in from_b), "after the second kill a request went elsewhere than the last"
        assert all(m["type"] == "ongoing_request" and m["carried"] > 0 for m in migs)
        twice = {m["rid"] for m in from_b} & {m["rid"] for m in from_a}
        print(f"kill until one: {len(twice)} requests migrated twice")
        assert d["ongoing"] == len(migs) and d["new"] == 0 and d["exhausted"] == 0, d
        check_baseline(c, fe, refs, 1, "k2")


def scenario_sigstop(refs):
    """SIGSTOP one of three workers: declared dead by missed heartbeats, its streams continue on
    the others after a stall of about --stream-stall-timeout; SIGCONT brings it back (a reconnect
    and handshake lift its quarantine) and it serves again."""
    with bl.Cluster() as c:
        fe, ws, ids = start_cluster(c, 3)
        before = counters(fe)
        load = Load(fe, make_reqs("st", range(N_STREAMS), True))
        load.wait_tokens(30)
        victim = ws[0]
        vid = ids[victim.rpc_port]
        inflight = worker_gauge(fe, "inflight")[vid]
        victim.proc.kill(signal.SIGSTOP)
        bl.wait_for(lambda: proc_state(victim.proc.pid) == "T", 5, 0.01, "the victim to be stopped")
        t_stop = time.monotonic()
        c.wait_workers(fe, 2, timeout=STALL_TIMEOUT + 8)  # declared dead and quarantined
        t_detected = time.monotonic()
        reqs = load.join()
        d = delta(counters(fe), before)
        assert_no_problems(reqs, refs, "SIGSTOP of one worker")
        migs = migrations(fe, "st")
        print(f"sigstop: victim had {inflight:.0f} streams; {len(migs)} migrated; seen dead after "
              f"{t_detected - t_stop:.2f} s; deltas {d}")
        assert len(migs) == inflight, f"{len(migs)} migrations for {inflight:.0f} streams on the stopped worker"
        assert all(m["from"] == vid and m["to"] != vid and m["code"] == "BT_ERR_TIMEOUT" and m["carried"] > 0
                   for m in migs), migs[:3]
        by_rid = {r.rid: r for r in reqs}
        gaps = []
        for m in migs:
            t = by_rid[m["rid"]].stream_obj.t_tokens
            gaps.append(max(b - a for a, b in zip(t, t[1:])))
        # the stall is the detection bound plus rerouting; generous on a loaded machine
        assert min(gaps) >= STALL_TIMEOUT * 0.75, f"a migrated stream stalled only {min(gaps):.2f} s"
        assert max(gaps) <= STALL_TIMEOUT + 5, f"a migrated stream stalled {max(gaps):.2f} s"
        assert d["stall_count"] == len(migs) and d["stall_le_1"] == 0 and d["stall_le_10"] == len(migs), d
        assert d["ongoing"] == len(migs) and d["new"] == 0, d
        print(f"sigstop: stall seen by migrated streams {min(gaps):.2f} .. {max(gaps):.2f} s")
        # still stopped: it stays out (its reconnects cannot complete a handshake)
        time.sleep(1.0)
        assert vid not in {format(i["instance_id"], "x") for i in c.wait_workers(fe, 2)}
        routed_before = worker_gauge(fe, "routed_total")[vid]
        victim.proc.kill(signal.SIGCONT)
        c.wait_workers(fe, 3, timeout=15)
        fe.proc.wait_log(rf"worker {vid} \(\S+\) out of quarantine: reconnected", 5)
        again = make_reqs("st-again", range(9), True)
        bl.run_concurrently(lambda r: run_req(fe.url, r), again)
        assert_no_problems(again, refs, "requests after SIGCONT")
        assert worker_gauge(fe, "routed_total")[vid] > routed_before, "the resumed worker gets no request"
        check_baseline(c, fe, refs, 3, "st")


def main():
    bl.deadline(230, "test_migration")
    t0 = time.monotonic()
    refs = references(range(N_STREAMS), UNARY)
    print(f"references: {len(refs)} in {time.monotonic() - t0:.1f} s")
    selftest_checkers(refs)
    for sc in (scenario_kill_one, scenario_journal_full, scenario_kill_until_one, scenario_sigstop):
        t = time.monotonic()
        sc(refs)
        print(f"{sc.__name__}: ok in {time.monotonic() - t:.1f} s")
    print(f"test_migration: ok in {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
