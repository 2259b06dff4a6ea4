"""Migration across workers of different context lengths (a rolling upgrade), through the real
binaries. Worker A (--context-length 1536) streams a request of about 1,000 prompt tokens with no
max_tokens (--default-max-tokens 420, which fits A); workers B (1280) and C (1536) join while it
runs; A is killed (kill -9) once prompt + streamed tokens exceed B's context.

  * prompt as token ids: the frontend counts the prompt, so B's card rules it out: the stream
    continues on C, byte-exact against an undisturbed run, and B never sees the request;
  * prompt as text: the frontend cannot count it (the mocker's card bounds no token's length), so
    the continuation may go to B, which refuses it (context_length_exceeded); the frontend then
    tries C, which completes it byte-exact, the refusal logged and charged as a migration;
  * only B left: both streams end with a clear context_length_exceeded error event saying that no
    worker left can hold them, and the frontend logs why.
"""

import threading

import batonlib as bl
from test_migration import check_clean_error, kill9, migrations, outcome_of_stream, worker_ids

bl.deadline(240, "test_migration_context")

MODEL = "mock-model"
BIG, SMALL = 1536, 1280
DEFAULT = 420  # --default-max-tokens: the requests set no max_tokens
SLOW = 0.4  # the workers' --speedup-ratio: the stream outlasts two workers' start
PROMPT_IDS = [(i * 7919) % 997 + 3 for i in range(1000)]
PROMPT_TEXT = " ".join(f"w{(i * 7919) % 997}" for i in range(990))


def body(kind):
    b = {"model": MODEL, "return_token_ids": True, "stream_options": {"include_usage": True}}
    if kind == "ids":
        return dict(b, prompt=PROMPT_IDS)
    return dict(b, messages=[{"role": "user", "content": PROMPT_TEXT}])


def stream(url, kind, **kw):
    fn = bl.stream_completion if kind == "ids" else bl.stream_chat
    return fn(url, body(kind), **kw)


def worker(c, ctx, speedup=SLOW):
    return c.start_worker(system_port=True, wait=True, context_length=ctx, default_max_tokens=DEFAULT,
                          speedup_ratio=speedup)


def submits(w):
    return bl.metric_sum(bl.metrics(w.system_url, timeout=5), "baton_worker_engine_submits_total")


def references():
    """Undisturbed runs on one worker of the large context: {kind: (outcome, prompt tokens)}."""
    refs = {}
    with bl.Cluster() as c:
        fe = c.start_frontend()
        worker(c, BIG, speedup=100)
        c.wait_workers(fe, 1)
        for kind in ("ids", "text"):
            s = stream(fe.url, kind, timeout=60).assert_ok(f"reference {kind}")
            assert len(s.token_ids) == DEFAULT and s.finish_reason == "length", s.summary()
            pt = s.usage["prompt_tokens"]
            # killed past B's context, with tokens still to come
            assert SMALL - pt + 20 < DEFAULT - 60, f"{kind}: a prompt of {pt} tokens leaves no room for the test"
            refs[kind] = (outcome_of_stream(s), pt)
    return refs


class Running:
    """One stream on a background thread; n = token ids received so far."""

    def __init__(self, fe, kind, rid):
        self.kind, self.rid, self.n, self.s = kind, rid, 0, None

        def on_event(st, ev):
            self.n = len(st.token_ids)
            return False

        def run():
            self.s = stream(fe.url, kind, timeout=120, headers={"X-Request-Id": rid}, on_event=on_event)

        self.t = threading.Thread(target=run, daemon=True)
        self.t.start()

    def join(self):
        self.t.join(120)
        assert not self.t.is_alive() and self.s is not None, f"{self.rid}: still running"
        return outcome_of_stream(self.s)


def on_a_then(c, fe, kinds, prefix, joiners):
    """Starts A and a stream of each kind on it, then the workers of contexts `joiners`; kills A once
    every stream holds more than B's context. Returns (A, [joined workers], {rpc port: id}, streams)."""
    a = worker(c, BIG)
    c.wait_workers(fe, 1)
    runs = [Running(fe, kind, f"{prefix}-{kind}") for kind in kinds]
    bl.wait_for(lambda: all(r.n > 0 for r in runs), 30, 0.02, "the streams' first tokens on A")
    ws = []
    for ctx in joiners:  # in this order: round-robin routing offers B first
        ws.append(worker(c, ctx))
        ids = worker_ids(c.wait_workers(fe, 1 + len(ws)))
    print(f"{prefix}: workers joined after {[r.n for r in runs]} tokens")
    for r in runs:
        kill_at = SMALL - REFS[r.kind][1] + 20
        bl.wait_for(lambda: r.n >= kill_at, 60, 0.01, f"{r.rid} to reach {kill_at} tokens")
    assert all(r.n < DEFAULT for r in runs), "a stream ended before the kill"
    carried = {r.rid: r.n for r in runs}
    kill9(a)
    return a, ws, ids, runs, carried


def moves(fe, rid):
    """The frontend's migration log lines for request rid."""
    return [m for m in migrations(fe, rid.rsplit("-", 1)[0]) if m["rid"] == rid]


def exact(got, ref, what):
    for k in ("complete", "text", "token_ids", "finish_reason", "usage", "error"):
        assert got[k] == ref[k], f"{what}: {k} differs: {str(got[k])[:200]} != {str(ref[k])[:200]}"


def larger_one_takes_it():
    for kind in ("ids", "text"):
        with bl.Cluster() as c:
            fe = c.start_frontend(migration_limit=3)
            a, (b, cc), ids, (r,), carried = on_a_then(c, fe, [kind], "big", [SMALL, BIG])
            got = r.join()
            exact(got, REFS[kind][0], f"{kind}: the stream across the kill")
            mig = moves(fe, r.rid)
            last = mig[-1]
            assert last["from"] != ids[cc.rpc_port] and last["to"] == ids[cc.rpc_port], mig
            assert submits(cc) == 1, "C did not serve the continuation"
            log = fe.proc.log_text()
            if kind == "ids":  # B's card rules it out: B never sees it
                assert len(mig) == 1 and submits(b) == 0, (mig, submits(b))
            else:  # the card cannot tell: B refuses, and the frontend goes on to C
                assert [m["to"] for m in mig] == [ids[b.rpc_port], ids[cc.rpc_port]], mig
                assert mig[1]["code"] == "BT_ERR_CONTEXT_LENGTH", mig
                assert f"request {r.rid}: worker {ids[b.rpc_port]} refused its continuation" in log, log[-3000:]
            print(f"{kind}: killed A after {carried[r.rid]} tokens; completed byte-exact on C "
                  f"({len(mig)} migration(s): {[m['code'] for m in mig]})")


def only_small_left():
    with bl.Cluster() as c:
        fe = c.start_frontend(migration_limit=3)
        a, (b,), ids, runs, carried = on_a_then(c, fe, ["ids", "text"], "small", [SMALL])
        log = None
        for r in runs:
            got = r.join()
            problems = check_clean_error(got, REFS[r.kind][0], True)
            assert not problems, f"{r.rid}: {problems}: {got['error']}"
            err = got["error"]
            assert err["code"] == "context_length_exceeded", err
            assert "no worker left can hold this request" in err["message"], err
            if r.kind == "ids":  # the card says it: B is not asked
                assert f"the largest among the workers left is {SMALL} tokens" in err["message"], err
            else:
                assert "every other worker refused it for its context length" in err["message"], err
            log = fe.proc.log_text()
            assert f"request {r.rid}: no worker left can hold this request" in log, log[-3000:]
            print(f"{r.kind}: killed A after {carried[r.rid]} tokens; B alone: {err['message'][:160]}")
        # the request whose prompt the frontend counts never went to B; the other one did, once
        assert moves(fe, "small-ids") == [] and "request small-ids: worker" not in log, moves(fe, "small-ids")
        assert [m["to"] for m in moves(fe, "small-text")] == [ids[b.rpc_port]], moves(fe, "small-text")
        assert submits(b) == 0


REFS = references()
larger_one_takes_it()
only_small_left()
print("test_migration_context: ok")
