"""The `openai` engine: baton workers in front of OpenAI-compatible servers, through the real binaries.

Part A uses baton itself as the upstream (a frontend + mocker worker gives token ids): two upstream
stacks U1 and U2; an outer frontend F0 whose workers P1, P2 run `--engine openai` against U1 and U2
(token ids, the baton dialect); and a second outer frontend T0 whose workers T1, T2 front the same
stacks as a text-only upstream (`--upstream-kind sglang`: no token ids; `--upstream-raw-completions` declared).
  1. Streaming and non-streaming chat and completions through F0 and T0 equal the same requests
     sent to U1 directly: text byte for byte, finish reason, usage, and through F0 the token ids;
     through T0 the ids are text-mode ids (bit 31 set, consecutive positions); with a stop string,
     with it and vLLM's include_stop_str_in_output, and with stop_token_ids (passed upstream as
     given, the upstream's mocker applying them). Finished requests
     leave no disconnect behind upstream. The upstream's 400 context_length_exceeded reaches F0's
     client as that error (param "prompt"), whole and streamed.
  2. A client that goes away closes the upstream request: the upstream frontend counts a
     disconnected client and the mocker's active sequences return to 0 (they were > 0 before).
     An operator stop on F0 ends the stream with finish_reason "cancelled" and the text delivered
     so far (equal to the reference of that length), and also closes the upstream request.
  3. U1's frontend is killed (SIGKILL) while eight streams run (four through F0, four through T0):
     every stream ends exactly as its fault-free reference computed on U2, except that a text-mode
     chat that had to move ends with the documented error event after an exact prefix (a text-only
     upstream cannot continue a chat exactly); the migration counters moved, and P1 and T1 exit
     with code 1 (their upstream is dead) while P2 and T2 keep serving.
Part B puts a worker in front of a third-party OpenAI-compatible mock server from the npm registry
(@dwmkerr/mock-llm, installed by the test into a cache directory): streamed and whole chat answers
through baton equal the mock's echo, with text-mode ids (it gives no token ids and no usage); a
worker whose upstream never answers refuses work at once and exits 1 after its start-up bound.
Part A also runs canaries on P2: its start-up canary must succeed through the engine.
Part C runs a small vLLM-shaped server of this file's own (separate processes, deterministic
tokens, vLLM's field names: return_token_ids, prompt_token_ids, /tokenize, vllm:* gauges) to
cover the vLLM dialect: answers equal the server's own (also with frequency_penalty, presence_penalty,
logit_bias and top_k, which change its answer: they reach it unchanged); its KV usage and queue feed the worker's
load (and so shedding: a threshold below its usage makes the frontend answer 503); a client abort
reaches it; and when one such server is killed mid-stream, the streams continue on the other
through /tokenize + a token-id prompt, byte for byte.
Part D puts two workers in front of one server of this file's own that, like most servers, ignores
a prefill (a final assistant message), and kills (-9) the worker serving six streams: each chat
ends with the documented error event after an exact prefix (never its text again with
finish_reason "stop"), each completion continues byte-exact as a declared raw completion, the
server never receives a prefill, and the refusing worker still serves fresh requests.

A self-check first proves the comparison rejects a result with a dropped, duplicated or altered
token. If the npm package cannot be installed the test fails: it never passes without running.
"""

import contextlib
import json
import os
import signal
import sys
import threading
import time

import batonlib as bl
import npmlib
from fakeupstream import FakeHandler, serve

MOCK_PKG = "@dwmkerr/mock-llm"
MOCK_VERSION = "0.1.29"
SPEEDUP = 1.0  # the upstream mockers: ~6 ms a token
TEXT_BIT = 1 << 31


def fail(msg):
    raise AssertionError(msg)  # main() marks the run failed (logs and temporary directories kept)


# ---------------------------------------------------------------------------------------------
# Results and their comparison.


def outcome(fe_url, api, body, stream, **kw):
    """Runs one request; returns a dict with text, token_ids, finish_reason, usage, ok, raw."""
    if stream:
        fn = bl.stream_chat if api == "chat" else bl.stream_completion
        s = fn(fe_url, body, **kw)
        return {"ok": s.ok, "text": s.text, "token_ids": s.token_ids, "finish_reason": s.finish_reason,
                "usage": s.usage, "raw": s.summary(), "stream": s}
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    # a whole answer has its usage anyway; stream_options are for streams only (400 otherwise)
    body = {k: v for k, v in body.items() if k != "stream_options"}
    st, _, j = bl.post_json(fe_url + path, body, timeout=kw.get("timeout", 60))
    if st != 200 or not isinstance(j, dict):
        return {"ok": False, "raw": f"HTTP {st}: {j!r}"}
    c = j["choices"][0]
    text = c["message"]["content"] if api == "chat" else c["text"]
    return {"ok": True, "text": text, "token_ids": c.get("token_ids", []), "finish_reason": c["finish_reason"],
            "usage": j.get("usage"), "raw": json.dumps(j)[:300]}


def diff_at(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def check_same(got, ref, what, ids=True, usage=True):
    """got must equal ref: text byte for byte, finish reason, usage, token ids (when asked)."""
    if not got.get("ok"):
        fail(f"{what}: did not complete: {got.get('raw')}")
    if got["text"] != ref["text"]:
        i = diff_at(got["text"], ref["text"])
        fail(f"{what}: text differs at byte {i}: got ...{got['text'][max(0, i - 20):i + 20]!r}, "
             f"want ...{ref['text'][max(0, i - 20):i + 20]!r} (lengths {len(got['text'])} / {len(ref['text'])})")
    if got["finish_reason"] != ref["finish_reason"]:
        fail(f"{what}: finish_reason {got['finish_reason']!r}, want {ref['finish_reason']!r}")
    if ids and got["token_ids"] != ref["token_ids"]:
        fail(f"{what}: token ids differ at {diff_at(got['token_ids'], ref['token_ids'])} "
             f"({len(got['token_ids'])} / {len(ref['token_ids'])})")
    if usage and got["usage"] != ref["usage"]:
        fail(f"{what}: usage {got['usage']}, want {ref['usage']}")


def check_text_ids(got, what):
    """Text-mode ids: every id tagged, positions 0, 1, 2, ... without a gap or repeat."""
    ids = got["token_ids"]
    if not ids:
        fail(f"{what}: no text-mode ids: {got.get('raw')}")
    for i, t in enumerate(ids):
        if not t & TEXT_BIT or (t & (TEXT_BIT - 1)) != i:
            fail(f"{what}: text-mode id {i} is {t} (want {TEXT_BIT | i}): ids {ids[:40]}")


def check_exact_or_refused(got, ref, what):
    """A stream that moved to a worker which cannot continue it exactly: it either equals ref (text,
    finish reason) or ends with the documented error event (a server_error no_worker_available error object,
    no [DONE]) after a non-empty exact prefix of ref. Never other text, never a silent success.
    Returns "exact" or "refused"."""
    s = got.get("stream")
    if s is None:
        fail(f"{what}: not a stream: {got.get('raw')}")
    if s.error is None:
        if not got["ok"]:
            fail(f"{what}: neither completed nor ended with an error event: {s.summary()}")
        if got["text"] != ref["text"] or got["finish_reason"] != ref["finish_reason"]:
            i = diff_at(got["text"], ref["text"])
            fail(f"{what}: SILENTLY WRONG: finish_reason {got['finish_reason']!r} (want {ref['finish_reason']!r}) "
                 f"and the text differs at byte {i} of {len(got['text'])} / {len(ref['text'])}: "
                 f"got ...{got['text'][max(0, i - 20):i + 40]!r}, want ...{ref['text'][max(0, i - 20):i + 40]!r}")
        return "exact"
    e = s.error
    if s.status != 200 or s.done or e.get("type") != "server_error" or e.get("code") != "no_worker_available" or \
            not e.get("message") or s.finish_reason is not None:
        fail(f"{what}: the error is not the documented mid-stream error event: {s.summary()}")
    if not got["text"] or not ref["text"].startswith(got["text"]) or got["text"] == ref["text"]:
        fail(f"{what}: the text before the error event is not a strict prefix of the reference: "
             f"{len(got['text'])} bytes, {got['text'][:60]!r} / {ref['text'][:60]!r}")
    return "refused"


def must_reject(check, cases, what):
    """Each case must make check fail: a checker that accepts a broken result is itself broken."""
    for case in cases:
        try:
            check(case)
        except AssertionError:
            continue
        raise AssertionError(f"{what} accepted a broken result: {case}")


def selftest():
    ref = {"ok": True, "text": " a b c", "token_ids": [1, 2, 3], "finish_reason": "length",
           "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}
    bad = [dict(ref, text=" a c", token_ids=[1, 3]), dict(ref, text=" a b b c", token_ids=[1, 2, 2, 3]),
           dict(ref, text=" a b d"), dict(ref, finish_reason="stop"), dict(ref, token_ids=[1, 3, 2]),
           dict(ref, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}), dict(ref, ok=False)]
    must_reject(lambda b: check_same(b, ref, "selftest"), bad, "the checker")
    check_same(dict(ref), ref, "selftest")
    must_reject(lambda ids: check_text_ids({"token_ids": ids}, "selftest"),
                ([TEXT_BIT | 0, TEXT_BIT | 2], [TEXT_BIT | 0, 1], []), "the text-id checker")
    check_text_ids({"token_ids": [TEXT_BIT, TEXT_BIT | 1]}, "selftest")
    # exact-or-refused: the bug's shape (delivered text, then the answer again from its start, stop)
    # and every other wrong ending are rejected; the two right ones pass

    class St:
        def __init__(self, error=None, done=True, status=200, finish="stop"):
            self.error, self.done, self.status, self.finish_reason = error, done, status, finish

        def summary(self):
            return "selftest"

    ref = {"ok": True, "text": " a b c d", "finish_reason": "stop"}
    err = {"message": "no worker can continue", "type": "server_error", "param": None, "code": "no_worker_available"}
    good = [({"ok": True, "text": " a b c d", "finish_reason": "stop", "stream": St()}, "exact"),
            ({"ok": False, "text": " a b", "finish_reason": None, "stream": St(err, False, finish=None)}, "refused")]
    for g, want in good:
        if check_exact_or_refused(g, ref, "selftest") != want:
            raise AssertionError(f"exact-or-refused misread {g}")
    bad = [{"ok": True, "text": " a b a b c d", "finish_reason": "stop", "stream": St()},
           {"ok": True, "text": " a b c d", "finish_reason": "length", "stream": St()},
           {"ok": False, "text": " a b", "finish_reason": None, "stream": St(None, False, finish=None)},
           {"ok": False, "text": " a x", "finish_reason": None, "stream": St(err, False, finish=None)},
           {"ok": False, "text": "", "finish_reason": None, "stream": St(err, False, finish=None)},
           {"ok": False, "text": " a b", "finish_reason": None, "stream": St(err, True, finish=None)},
           {"ok": False, "text": " a b", "finish_reason": None,
            "stream": St(dict(err, type="internal_error", code=500), False, finish=None)}]
    must_reject(lambda b: check_exact_or_refused(b, ref, "selftest"), bad, "the exact-or-refused checker")


# ---------------------------------------------------------------------------------------------
# Metrics.


def msum(url, name, **labels):
    return bl.metric_sum(bl.metrics(url), name, **labels)


def active_seqs(w):
    return msum(w.system_url, "baton_worker_active_sequences")


def disconnects(fe):
    return msum(fe.url, "dynamo_frontend_disconnected_clients")


def migrations(fe):
    return msum(fe.url, "dynamo_frontend_model_migration_total")


# ---------------------------------------------------------------------------------------------
# Part A: baton upstreams.


def start_upstream(name):
    c = bl.Cluster(tmpdir_path=bl.tmpdir(f"baton-{name}-"))
    fe = c.start_frontend()
    w = c.start_worker(system_port=True, wait=True, speedup_ratio=SPEEDUP)
    c.wait_workers(fe, 1)
    return c, fe, w


def equality_phase(u1, f0, t0):
    """Outer answers equal direct ones, streamed and whole, both APIs, ids and text mode."""
    cases = [
        ("chat", bl.chat_body("Hello there", max_tokens=30, seed=1, return_token_ids=True,
                              stream_options={"include_usage": True})),
        ("chat", bl.chat_body("Tell me a story", max_completion_tokens=25, temperature=0.7, seed=9,
                              return_token_ids=True)),
        ("completion", bl.completion_body("Once upon a time", max_tokens=28, seed=4, return_token_ids=True,
                                          stream_options={"include_usage": True})),
        ("completion", bl.completion_body([101, 202, 303], max_tokens=20, return_token_ids=True)),
    ]
    # one case with a stop string picked from the reference's middle
    base = bl.chat_body("Stop somewhere", max_tokens=40, seed=2, return_token_ids=True)
    full = outcome(u1.url, "chat", base, False)
    words = full["text"].split(" ")
    stop = " " + words[len(words) // 2]
    cases.append(("chat", dict(base, stop=[stop])))
    # vLLM's stop fields go upstream as given: the outer answer stops where the direct one does
    cases.append(("chat", dict(base, stop=[stop], include_stop_str_in_output=True)))
    mid = full["token_ids"][len(full["token_ids"]) // 2]
    cases.append(("chat", dict(base, stop_token_ids=[mid])))
    n = 0
    for api, body in cases:
        for stream in (True, False):
            ref = outcome(u1.url, api, body, stream)
            if not ref["ok"]:
                fail(f"reference failed: {ref['raw']}")
            got = outcome(f0.url, api, body, stream)
            check_same(got, ref, f"F0 {api} stream={stream} {body}")
            got = outcome(t0.url, api, body, stream)
            # text mode: same text, finish and usage; its ids are its own
            check_same(got, ref, f"T0 {api} stream={stream} {body}", ids=False)
            check_text_ids(got, f"T0 {api} stream={stream}")
            n += 1
    if outcome(u1.url, "chat", dict(base, stop=[stop]), False)["finish_reason"] != "stop":
        fail("the stop-string case did not stop on its stop string")
    kept = outcome(u1.url, "chat", dict(base, stop=[stop], include_stop_str_in_output=True), False)
    if not kept["text"].endswith(stop):
        fail(f"include_stop_str_in_output did not keep the stop string: {kept['raw']}")
    if outcome(u1.url, "chat", dict(base, stop_token_ids=[mid]), False)["token_ids"][-1:] != [mid]:
        fail("the stop_token_ids case did not stop on its token")
    # the upstream's 400 context_length_exceeded (prompt + max_tokens over the mocker's context of
    # 1,038,080 tokens) reaches the client as that error, param "prompt", whole and streamed: not as
    # a generic invalid_value, which a client that trims its prompt on that code would not recognise
    big = bl.completion_body([7] * 40000, max_tokens=1000000)
    st, _, ref = bl.post_json(u1.url + "/v1/completions", big)
    if st != 400 or ref["error"]["code"] != "context_length_exceeded":
        fail(f"the upstream did not refuse the over-long request: {st} {ref}")
    st, _, j = bl.post_json(f0.url + "/v1/completions", big)
    e = j.get("error") if isinstance(j, dict) else None
    if st != 400 or not e or e["code"] != "context_length_exceeded" or e["param"] != "prompt" or \
            e["type"] != "invalid_request_error" or ref["error"]["message"] not in e["message"]:
        fail(f"F0: expected 400 context_length_exceeded with the upstream's message, got {st} {j}")
    s = bl.stream_completion(f0.url, dict(big, stream=True))
    if s.status != 400 or not s.error or s.error["code"] != "context_length_exceeded" or s.events:
        fail(f"F0 streamed: expected 400 context_length_exceeded, got {s.summary()}")
    print(f"equality: {n} request shapes equal through F0 (ids) and T0 (text)")


def cancel_phase(ups, f0):
    """Client disconnect and operator stop close the upstream request."""
    (c1, u1, w1), (c2, u2, w2) = ups
    before = disconnects(u1) + disconnects(u2)
    seen = {}

    def on_event(st, obj):
        if len(st.token_ids) >= 3:
            seen["active"] = active_seqs(w1) + active_seqs(w2)
            return True  # abort: close the connection
        return False

    s = bl.stream_chat(f0.url, bl.chat_body("A very long answer", max_tokens=5000, seed=11, return_token_ids=True),
                       on_event=on_event, timeout=60)
    if not s.aborted:
        fail(f"client abort did not happen: {s.summary()}")
    if seen.get("active", 0) < 1:
        fail(f"no upstream sequence was active while the stream ran: {seen}")
    bl.wait_for(lambda: disconnects(u1) + disconnects(u2) == before + 1, 15, what="upstream sees its client go")
    bl.wait_for(lambda: active_seqs(w1) + active_seqs(w2) == 0, 15, what="upstream sequences freed")
    print(f"cancel: client abort after {len(s.token_ids)} tokens closed the upstream request "
          f"(active upstream sequences {seen['active']:.0f} -> 0)")

    # operator stop: finish_reason cancelled with what was delivered
    rid = "oa-stop-1"
    body = bl.chat_body("Another long answer", max_tokens=5000, seed=12, return_token_ids=True)
    before = disconnects(u1) + disconnects(u2)
    stopped = {}

    def on_event2(st, obj):
        if len(st.token_ids) >= 5 and not stopped:
            stopped["status"] = bl.post_json(f0.url + f"/v1/requests/{rid}/cancel", {"mode": "stop"})[0]
        return False

    s = bl.stream_chat(f0.url, body, on_event=on_event2, headers={"X-Request-Id": rid}, timeout=60)
    if stopped.get("status") != 200:
        fail(f"operator stop answered {stopped}")
    if not s.ok or s.finish_reason != "cancelled":
        fail(f"stopped stream did not end with finish_reason cancelled: {s.summary()}")
    n = len(s.token_ids)
    if n < 5 or n >= 5000:
        fail(f"stopped stream delivered {n} tokens")
    ref = outcome(u1.url, "chat", dict(body, max_tokens=n), False)
    if ref["text"] != s.text or ref["token_ids"] != s.token_ids:
        fail(f"stopped stream's {n} tokens differ from the reference of that length")
    bl.wait_for(lambda: disconnects(u1) + disconnects(u2) == before + 1, 15, what="stop closes the upstream request")
    bl.wait_for(lambda: active_seqs(w1) + active_seqs(w2) == 0, 15, what="upstream sequences freed after stop")
    print(f"stop: operator stop after {n} tokens -> finish_reason cancelled, upstream request closed")


class Runner:
    """Runs requests on threads; records streams as they go."""

    def __init__(self, fe_url, reqs):
        self.fe_url = fe_url
        self.reqs = reqs  # list of (name, api, body)
        self.results = {}
        self.progress = {name: 0 for name, _, _ in reqs}
        self.threads = [threading.Thread(target=self._run, args=r, daemon=True) for r in reqs]
        for t in self.threads:
            t.start()

    def _run(self, name, api, body):
        def on_event(st, obj):
            self.progress[name] = len(st.events)
            return False

        self.results[name] = outcome(self.fe_url, api, body, True, on_event=on_event, timeout=120)

    def join(self):
        for t in self.threads:
            t.join(150)
            if t.is_alive():
                fail("a stream did not end within 150 s")


def migration_phase(ups, f0, t0, p1, p2, t1, t2):
    (c1, u1, w1), (c2, u2, w2) = ups
    # ids mode: plain max_tokens; text mode: a stop string well after the kill (docs/engines.md:
    # in text mode the token budget counts chunks, so exactness needs the stream to end by itself)
    ids_reqs, text_reqs, refs = [], [], {}
    for i in range(4):
        api = "chat" if i % 2 == 0 else "completion"
        mk = bl.chat_body if api == "chat" else bl.completion_body
        body = mk(f"migrating request {i}", max_tokens=280 + 10 * i, seed=20 + i, return_token_ids=True)
        ids_reqs.append((f"ids-{i}", api, body))
        text_reqs.append((f"text-{i}", api, mk(f"text request {i}", max_tokens=400, seed=40 + i,
                                                return_token_ids=True)))
    probes = bl.run_concurrently(lambda r: outcome(u2.url, r[1], r[2], False), [(r,) for r in text_reqs])
    for i, ((name, api, tb), probe) in enumerate(zip(list(text_reqs), probes)):
        toks = probe["text"].split(" ")
        # a word whose first appearance lies between 40 % and 75 % of the way
        stop = None
        for k in range(int(len(toks) * 0.4), int(len(toks) * 0.75)):
            w = toks[k].strip(",.\n")
            if w and (" " + w) not in " ".join(toks[:k]) and "\n" not in toks[k]:
                stop = " " + w
                break
        if not stop:
            fail(f"no stop word found for text request {i}")
        text_reqs[i] = (name, api, dict(tb, stop=[stop]))
    all_reqs = ids_reqs + text_reqs
    outs = bl.run_concurrently(lambda r: outcome(u2.url, r[1], r[2], True), [(r,) for r in all_reqs])
    for (name, _, _), o in zip(all_reqs, outs):
        refs[name] = o
        if not refs[name]["ok"]:
            fail(f"reference {name} failed: {refs[name]['raw']}")
    for name, _, _ in text_reqs:
        if refs[name]["finish_reason"] != "stop":
            fail(f"reference {name} did not end on its stop string")

    mig0 = migrations(f0) + migrations(t0)
    ra = Runner(f0.url, ids_reqs)
    rb = Runner(t0.url, text_reqs)
    bl.wait_for(lambda: all(v >= 10 for v in list(ra.progress.values()) + list(rb.progress.values())), 60,
                what="every stream has 10 events")
    u1.proc.kill(signal.SIGKILL)
    u1.proc.wait(10)
    killed_at = dict(ra.progress, **rb.progress)
    ra.join()
    rb.join()
    for name, _, _ in ids_reqs:
        check_same(ra.results[name], refs[name], f"after upstream kill: {name}")
    # text mode: completions continue as raw completions (declared), byte for byte; a chat has no
    # exact continuation on a text-only upstream: unmoved it completes, moved it ends with the error
    # event after an exact prefix
    refused = 0
    for name, api, _ in text_reqs:
        if api == "completion":
            check_same(rb.results[name], refs[name], f"after upstream kill: {name}", ids=False, usage=False)
        elif check_exact_or_refused(rb.results[name], refs[name], f"after upstream kill: {name}") == "refused":
            refused += 1
            continue
        check_text_ids(rb.results[name], f"after upstream kill: {name}")
    moved = migrations(f0) + migrations(t0) - mig0
    if moved < 2:  # at least one stream of each outer frontend was on U1
        fail(f"the kill migrated {moved} streams; some must have been on U1 (progress at kill {killed_at})")
    # the workers whose upstream died exit 1; the others keep serving
    for p, name in ((p1, "P1"), (t1, "T1")):
        if p.proc.wait(20) is None:
            fail(f"{name} did not exit after its upstream died:\n{p.proc.log_tail()}")
        if p.proc.returncode != 1:
            fail(f"{name} exited with {p.proc.returncode}, want 1:\n{p.proc.log_tail()}")
        if "upstream" not in p.proc.log_text() or "is dead" not in p.proc.log_text():
            fail(f"{name}'s log does not say its upstream is dead")
    for p, name in ((p2, "P2"), (t2, "T2")):
        if not p.proc.alive():
            fail(f"{name} died with U1")
    print(f"migration: after U1 was killed (progress at kill {sorted(killed_at.values())}) every stream is "
          f"byte-exact but {refused} text-mode chats that ended with the error event; {moved:.0f} migrations; "
          f"P1 and T1 exited 1")
    # baseline: one instance each, fresh requests succeed, upstream idle
    for fe in (f0, t0):
        bl.wait_for(lambda: len(bl.get_json(fe.url + "/health")[2].get("instances", [])) == 1, 20,
                    what="dead worker leaves the instance list")
    body = bl.completion_body("after the fault", max_tokens=12, return_token_ids=True)
    check_same(outcome(f0.url, "completion", body, True), outcome(u2.url, "completion", body, True), "after fault F0")
    check_same(outcome(t0.url, "completion", body, False), outcome(u2.url, "completion", body, False),
               "after fault T0", ids=False)
    bl.wait_for(lambda: active_seqs(w2) == 0, 15, what="U2 idle after the fault")
    for fe in (f0, t0):
        bl.wait_for(lambda: msum(fe.url, "dynamo_frontend_inflight_requests") == 0, 15, what="no request in flight")


@contextlib.contextmanager
def guarded(clusters, procs=()):
    """The body of a part, over its clusters: on failure their logs are dumped; at the end they are
    closed and procs (the fake servers) killed; a sanitizer report in any of their processes (in a
    sanitizer build) fails the test."""
    try:
        yield
    except BaseException:
        bl.mark_failed()
        for c in clusters:
            c.dump_logs(40)
        raise
    finally:
        for c in clusters:
            c.close(check_sanitizers=False)
        for p in procs:
            p.kill()
        for c in clusters:
            for p in c.procs():
                r = p.sanitizer_report()
                if r:
                    fail(f"sanitizer report in {p.name}:\n{r}")


def part_a():
    ups = [start_upstream("oa-u1"), start_upstream("oa-u2")]
    (c1, u1, w1), (c2, u2, w2) = ups
    outer = bl.Cluster(tmpdir_path=bl.tmpdir("baton-oa-outer-"))
    text = bl.Cluster(tmpdir_path=bl.tmpdir("baton-oa-text-"))
    with guarded((c1, c2, outer, text)):
        f0 = outer.start_frontend(migration_limit=3)
        p1 = outer.start_worker(engine="openai", upstream=u1.url)
        # P2 runs canaries (the start-up one only): they go through the engine to U2
        p2 = outer.start_worker(engine="openai", upstream=u2.url, system_port=True,
                                env={"DYN_HEALTH_CHECK_ENABLED": "true", "DYN_CANARY_WAIT_TIME": "3600"})
        outer.wait_workers(f0, 2)
        t0 = text.start_frontend(migration_limit=3)
        t1 = text.start_worker(engine="openai", upstream=u1.url, upstream_kind="sglang", upstream_raw_completions=True)
        t2 = text.start_worker(engine="openai", upstream=u2.url + "/v1/", upstream_kind="sglang",
                               upstream_raw_completions=True)
        text.wait_workers(t0, 2)
        for p in (p1, p2):
            p.proc.wait_log(r"upstream http://127\.0\.0\.1:\d+ is up \(kind baton, detected", 10)
        for p in (t1, t2):
            p.proc.wait_log(r"upstream http://127\.0\.0\.1:\d+ is up \(kind sglang, model 'mock-model'\)", 10)

        if msum(p2.system_url, "baton_worker_canary_total", result="success") < 1:
            fail("P2's start-up canary did not succeed through the openai engine")
        equality_phase(u1, f0, t0)
        if disconnects(u1) + disconnects(u2) != 0:
            fail("finished requests left disconnected clients upstream: the engine cut a finished stream")
        cancel_phase(ups, f0)
        migration_phase(ups, f0, t0, p1, p2, t1, t2)


# ---------------------------------------------------------------------------------------------
# Part B: a third-party mock server from the npm registry.


def mock_main(d):
    return os.path.join(d, "node_modules", "@dwmkerr", "mock-llm", "dist", "main.js")


def ensure_mock():
    return npmlib.ensure_package(MOCK_PKG, MOCK_VERSION, f"mock-llm-{MOCK_VERSION}", timeout=240,
                                 check=lambda d: os.path.exists(mock_main(d)))


MOCK_CONFIG = {
    "streaming": {"chunkSize": 7, "chunkIntervalMs": 15},
    "rules": [
        {"path": "/v1/chat/completions", "method": "POST", "match": "@",
         "response": {"status": 200, "content": json.dumps({
             "id": "chatcmpl-{{timestamp}}", "object": "chat.completion", "model": "{{jmes request body.model}}",
             "choices": [{"index": 0, "message": {"role": "assistant",
                                                  "content": "{{jmes request body.messages[-1].content}}"},
                          "finish_reason": "stop"}]})}},
        {"path": "/v1/models", "method": "GET",
         "response": {"status": 200, "content": json.dumps(
             {"object": "list", "data": [{"id": "mock-model", "object": "model", "owned_by": "mock-llm"}]})}},
    ],
}


def part_b():
    d = ensure_mock()
    work = bl.tmpdir("baton-oa-npm-")
    cfg = os.path.join(work, "mock-llm.yaml")
    with open(cfg, "w") as f:
        json.dump(MOCK_CONFIG, f)  # JSON is YAML
    port = bl.free_port()
    mock = bl.Proc(["node", mock_main(d), "--config", cfg], env={"PORT": str(port), "HOST": "127.0.0.1"},
                   log=os.path.join(work, "mock-llm.log"), name="mock-llm", cwd=work)
    url = f"http://127.0.0.1:{port}"
    c = bl.Cluster(tmpdir_path=os.path.join(work, "cluster"))
    try:
        bl.wait_http(url + "/health", mock, timeout=30)
        fe = c.start_frontend()
        w = c.start_worker(engine="openai", upstream=url, system_port=True, wait=True)
        c.wait_workers(fe, 1)
        w.proc.wait_log(r"is up \(kind openai, detected, model 'mock-model'\)", 10)
        msg = "Hello from baton, in pieces of seven bytes!"  # the mock echoes the last message
        want_chunks = (len(msg) + 6) // 7
        body = bl.chat_body(msg, max_tokens=100, return_token_ids=True)
        s = outcome(fe.url, "chat", body, True)
        u = outcome(fe.url, "chat", body, False)
        for got, what in ((s, "streamed"), (u, "whole")):
            if not got["ok"] or got["text"] != msg or got["finish_reason"] != "stop":
                fail(f"{what} chat through baton from mock-llm: {got.get('raw')}")
            check_text_ids(got, f"mock-llm {what}")
            if len(got["token_ids"]) != want_chunks:
                fail(f"{what}: {len(got['token_ids'])} text-mode ids for {want_chunks} chunks")
            # no usage upstream: the engine counts the chunks it delivered
            if got["usage"] is not None and got["usage"]["completion_tokens"] != want_chunks:
                fail(f"{what}: usage {got['usage']}")
        if len(s["stream"].events) < want_chunks:
            fail(f"the stream came in {len(s['stream'].events)} events: it was not streamed through")
        direct = bl.stream_chat(url, dict(body, model="mock-model"))
        if not direct.ok or direct.text != msg:
            fail(f"mock-llm itself: {direct.summary()}")
        # several at once, and the engine's own load counts return to 0
        outs = bl.run_concurrently(lambda i: outcome(fe.url, "chat", bl.chat_body(f"parallel {i} " * 3), True),
                                   list(range(6)))
        for i, o in enumerate(outs):
            if not o["ok"] or o["text"] != f"parallel {i} " * 3:
                fail(f"parallel request {i}: {o.get('raw')}")
        bl.wait_for(lambda: msum(w.system_url, "baton_worker_active_sequences") == 0, 10, what="engine idle")
        # an upstream that never answers: work is refused at once, the worker exits 1 at its bound
        wd = c.start_worker(engine="openai", upstream=f"http://127.0.0.1:{bl.free_port()}", model_name="nowhere",
                            upstream_startup_timeout=3)
        c.wait_workers(fe, 2)
        t0 = time.monotonic()
        st, _, j = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("hi", model="nowhere"))
        if st != 503 or "not reachable" not in json.dumps(j):
            fail(f"a request to a worker whose upstream is unreachable: {st} {j}")
        if time.monotonic() - t0 > 5:
            fail("the request to an unreachable upstream was not refused at once")
        if wd.proc.wait(20) != 1 or "no answer within the start-up bound" not in wd.proc.log_text():
            fail(f"the worker of an upstream that never answered: exit {wd.proc.returncode}\n{wd.proc.log_tail()}")
        print(f"npm mock-llm {MOCK_VERSION}: streamed and whole chat through baton equal the echo "
              f"({want_chunks} chunks, text-mode ids); 6 concurrent streams")
    except BaseException:
        bl.mark_failed()
        c.dump_logs(40)
        sys.stderr.write(mock.log_tail(40) + "\n")
        raise
    finally:
        c.close(check_sanitizers=False)
        mock.kill()


# ---------------------------------------------------------------------------------------------
# Part C: a vLLM-shaped upstream.


def fake_vllm(port, kv_usage):
    """A deterministic stand-in for vLLM's OpenAI server (one process). Token i has the text " w<i>";
    the next token is a hash of the whole prefix (prompt ids + generated ids) and the seed, so a
    continuation from prompt + carried ids equals an uninterrupted run. Chat messages render as
    "role: content" lines plus "assistant:", tokenized by words. It streams one token per chunk,
    8 ms apart, with vLLM's shapes; counts aborted streams and /tokenize calls in /metrics."""
    import struct
    import zlib

    lock = threading.Lock()
    stats = {"running": 0, "aborted": 0, "tokenize": 0}

    def tokenize(text):
        return [zlib.crc32(w.encode()) % 997 + 3 for w in text.split(" ") if w]

    def render(msgs):
        return "\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:"

    class H(FakeHandler):

        def do_GET(self):
            if self.path == "/health":
                self.send_json(200, "", "text/plain")
            elif self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": "fake/llama", "object": "model",
                                                                 "owned_by": "vllm"}]})
            elif self.path == "/metrics":
                with lock:
                    t = ("# TYPE vllm:num_requests_running gauge\n"
                         f'vllm:num_requests_running{{engine="0",model_name="fake/llama"}} {stats["running"]}.0\n'
                         f'vllm:num_requests_waiting{{engine="0",model_name="fake/llama"}} 7.0\n'
                         f'vllm:kv_cache_usage_perc{{engine="0",model_name="fake/llama"}} {kv_usage}\n'
                         f'fake_vllm_aborted_total {stats["aborted"]}\n'
                         f'fake_vllm_tokenize_total {stats["tokenize"]}\n')
                self.send_json(200, t, "text/plain; version=0.0.4")
            else:
                self.send_json(404, {"detail": "Not Found"})

        def do_POST(self):
            body = self.read_json()
            if self.path == "/tokenize":
                with lock:
                    stats["tokenize"] += 1
                ids = tokenize(render(body["messages"])) if "messages" in body else tokenize(body["prompt"])
                return self.send_json(200, {"count": len(ids), "max_model_len": 4096, "tokens": ids})
            chat = self.path == "/v1/chat/completions"
            if not chat and self.path != "/v1/completions":
                return self.send_json(404, {"detail": "Not Found"})
            if body.get("stream") is not True:
                return self.send_json(400, {"object": "error", "message": "this fake streams only", "code": 400})
            if chat:
                prompt = tokenize(render(body["messages"]))
            elif isinstance(body["prompt"], list):
                prompt = list(body["prompt"])
            else:
                prompt = tokenize(body["prompt"])
            ids_on = body.get("return_token_ids") is True
            state = zlib.crc32(struct.pack("<q", int(body.get("seed") or 0)))
            # sampling parameters take part in the choice, as in a real sampler: an engine that
            # dropped one would answer otherwise than the server asked directly
            samp = {k: body[k] for k in ("frequency_penalty", "presence_penalty", "logit_bias", "top_k") if k in body}
            if samp:
                state = zlib.crc32(json.dumps(samp, sort_keys=True).encode(), state)
            for t in prompt:
                state = zlib.crc32(struct.pack("<I", t), state)
            n = int(body.get("max_tokens") or 16)
            self.start_sse()
            head = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1,
                    "model": body.get("model")}
            with lock:
                stats["running"] += 1
            try:
                if chat:
                    first = dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}])
                    if ids_on:
                        first["prompt_token_ids"] = prompt
                    self.chunk(first)
                for k in range(n):
                    tok = state % 997 + 3
                    state = zlib.crc32(struct.pack("<I", tok), state)
                    c = {"index": 0, "logprobs": None, "finish_reason": "length" if k == n - 1 else None}
                    if chat:
                        c["delta"] = {"content": f" w{tok}"}
                    else:
                        c["text"] = f" w{tok}"
                        if ids_on and k == 0:
                            c["prompt_token_ids"] = prompt
                    if ids_on:
                        c["token_ids"] = [tok]
                    self.chunk(dict(head, choices=[c]))
                    time.sleep(0.008)
                if (body.get("stream_options") or {}).get("include_usage"):
                    self.chunk(dict(head, choices=[], usage={"prompt_tokens": len(prompt), "completion_tokens": n,
                                                             "total_tokens": len(prompt) + n}))
                self.end_sse()
            except (BrokenPipeError, ConnectionResetError):
                with lock:
                    stats["aborted"] += 1
                self.close_connection = True
            finally:
                with lock:
                    stats["running"] -= 1

    serve(H, port)


def start_fake(kv):
    port = bl.free_port()
    p = bl.Proc([sys.executable, os.path.abspath(__file__), "--fake-vllm", str(port), str(kv)],
                name=f"fake-vllm:{port}")
    url = f"http://127.0.0.1:{port}"
    bl.wait_http(url + "/health", p, timeout=20)
    return p, url


def direct_fake(url, api, body, stream):
    """The fake's own answer to an OpenAI request (model name changed to its own)."""
    b = dict(body, model="fake/llama", stream_options={"include_usage": True})
    b.pop("max_completion_tokens", None)
    return outcome(url, api, b, True) if stream else collect_unary(url, api, b)


def collect_unary(url, api, b):
    """The fake streams only: a whole answer is its stream collected (what baton's frontend does)."""
    o = outcome(url, api, b, True)
    return dict(o, usage=o["usage"])


def part_c():
    fa, ua = start_fake(0.5)
    fb, ub = start_fake(0.5)
    c = bl.Cluster(tmpdir_path=bl.tmpdir("baton-oa-vllm-"))
    with guarded((c,), (fa, fb)):
        fe = c.start_frontend(migration_limit=3)
        v1 = c.start_worker(engine="openai", upstream=ua, system_port=True, wait=True)
        v2 = c.start_worker(engine="openai", upstream=ub, system_port=True, wait=True)
        c.wait_workers(fe, 2)
        for v in (v1, v2):
            v.proc.wait_log(r"is up \(kind vllm, detected, model 'fake/llama'\)", 10)
        # answers equal the server's own, ids and usage included
        cases = [("chat", bl.chat_body("Hello vLLM", max_tokens=20, seed=3, return_token_ids=True,
                                       stream_options={"include_usage": True})),
                 ("completion", bl.completion_body("Once upon a time", max_tokens=15, seed=5, return_token_ids=True,
                                                   stream_options={"include_usage": True})),
                 ("completion", bl.completion_body([7, 8, 9], max_tokens=12, return_token_ids=True,
                                                   stream_options={"include_usage": True}))]
        # the sampling parameters reach the server unchanged (they change its answer)
        samp = {"frequency_penalty": 0.5, "presence_penalty": -1.25, "logit_bias": {"17": -100, "4": 2.5},
                "top_k": 7}
        cases += [("chat", dict(cases[0][1], **samp)), ("completion", dict(cases[1][1], **samp))]
        if direct_fake(ua, "chat", cases[3][1], True)["token_ids"] == direct_fake(ua, "chat", cases[0][1], True)["token_ids"]:
            fail("the fake vLLM ignores the sampling parameters")
        for api, body in cases:
            ref = direct_fake(ua, api, body, True)
            for stream in (True, False):
                check_same(outcome(fe.url, api, body, stream), ref, f"vLLM {api} stream={stream}")
        # load: usage x --upstream-total-blocks, the upstream's queue
        for v in (v1, v2):
            bl.wait_for(lambda: msum(v.system_url, "baton_worker_kv_active_blocks") == 500 and
                        msum(v.system_url, "baton_worker_waiting_requests") == 7, 15, what="vLLM gauges in the load")
        # ... and so shedding
        st, _, j = bl.post_json(fe.url + "/busy_threshold", {"model": "mock-model", "active_decode_blocks_threshold": 0.4})
        if st != 200:
            fail(f"/busy_threshold answered {st} {j}")
        st, hdrs, j = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("shed me", max_tokens=3))
        if st != 503 or not hdrs.get("retry-after"):
            fail(f"a worker at 50 % KV (threshold 40 %) was not shed: {st} {hdrs} {j}")
        bl.post_json(fe.url + "/busy_threshold", {"model": "mock-model", "active_decode_blocks_threshold": 0.9})
        st, _, j = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("serve me", max_tokens=3))
        if st != 200:
            fail(f"with the threshold above the usage the request failed: {st} {j}")
        # a client abort reaches the vLLM-like server
        ab0 = msum(ua, "fake_vllm_aborted_total") + msum(ub, "fake_vllm_aborted_total")
        s = bl.stream_chat(fe.url, bl.chat_body("abort me", max_tokens=2000, return_token_ids=True), abort_after=3)
        if not s.aborted:
            fail(f"abort did not happen: {s.summary()}")
        bl.wait_for(lambda: msum(ua, "fake_vllm_aborted_total") + msum(ub, "fake_vllm_aborted_total") == ab0 + 1, 15,
                    what="the upstream sees the abort")
        # kill one server mid-stream: /tokenize + token-id prompt on the other, byte for byte
        reqs = []
        for i in range(4):
            api = "chat" if i % 2 == 0 else "completion"
            mk = bl.chat_body if api == "chat" else bl.completion_body
            reqs.append((f"vllm-{i}", api, mk(f"vllm migrating {i}", max_tokens=180 + 7 * i, seed=60 + i,
                                              return_token_ids=True, stream_options={"include_usage": True})))
        refs = dict(zip([r[0] for r in reqs],
                        bl.run_concurrently(lambda r: direct_fake(ub, r[1], r[2], True), [(r,) for r in reqs])))
        tk0 = msum(ub, "fake_vllm_tokenize_total")
        mig0 = migrations(fe)
        run = Runner(fe.url, reqs)
        bl.wait_for(lambda: all(v >= 10 for v in run.progress.values()), 60, what="every stream has 10 events")
        fa.kill(signal.SIGKILL)
        fa.wait(10)
        run.join()
        for name, _, _ in reqs:
            check_same(run.results[name], refs[name], f"after vLLM kill: {name}")
        moved = migrations(fe) - mig0
        tk = msum(ub, "fake_vllm_tokenize_total") - tk0
        if moved < 1 or tk != moved:
            fail(f"{moved} streams migrated and {tk} /tokenize calls: each continuation must tokenize once")
        if v1.proc.wait(20) != 1:
            fail(f"V1 did not exit 1 after its upstream died: {v1.proc.returncode}\n{v1.proc.log_tail()}")
        print(f"vLLM dialect: 10 answers equal the server's (sampling parameters passed on); KV 50 % -> 500 of 1000 blocks, waiting 7; shed at "
              f"threshold 0.4; abort reached it; {moved:.0f} streams continued via /tokenize byte-exact; V1 exited 1")


# ---------------------------------------------------------------------------------------------
# Part D: an upstream that ignores prefills, like most OpenAI-compatible servers.

PLAIN_CHAT_LEN = 300  # an assistant turn ends by itself ("stop") after this many words
PLAIN_DELAY = 0.02  # seconds between streamed tokens


def plain_server(port, flavour):
    """A deterministic OpenAI-compatible server that, like most servers, ignores a prefill: a chat
    is rendered from its non-assistant messages only ("role: content" lines, then "assistant:"), so
    a final assistant message (or continue_final_message) changes nothing and the answer starts
    from its beginning again. Its /v1/completions is a raw completion: the text continues the
    prompt, split into words, so prompt + delivered text continues exactly. An assistant turn
    (the words after the last "assistant:") ends with "stop" after PLAIN_CHAT_LEN words. One word
    " w<n>" per chunk, no token ids, no usage. flavour "openai": owned_by "acme-inference";
    "llamacpp": owned_by "llamacpp" and llama.cpp's POST /apply-template ({"prompt": rendered}).
    /metrics counts requests, prefills received, renders, and requests whose X-Request-Id came
    before (continuations)."""
    import struct
    import zlib

    lock = threading.Lock()
    stats = {"requests": 0, "prefills": 0, "continuations": 0, "renders": 0}
    seen = set()

    def render(msgs):
        return "".join(f"{m.get('role')}: {m.get('content')}\n" for m in msgs if m.get("role") != "assistant") + \
            "assistant:"

    class H(FakeHandler):

        def do_GET(self):
            if self.path == "/health":
                self.send_json(200, "", "text/plain")
            elif self.path == "/v1/models":
                owner = "llamacpp" if flavour == "llamacpp" else "acme-inference"
                self.send_json(200, {"object": "list", "data": [{"id": "plain-model", "object": "model",
                                                                 "owned_by": owner}]})
            elif self.path == "/metrics":
                with lock:
                    self.send_json(200, "".join(f"plain_{k}_total {v}\n" for k, v in stats.items()), "text/plain")
            else:
                self.send_json(404, {"error": {"message": "not found"}})

        def do_POST(self):
            body = self.read_json()
            if self.path == "/apply-template" and flavour == "llamacpp":
                with lock:
                    stats["renders"] += 1
                return self.send_json(200, {"prompt": render(body.get("messages") or [])})
            chat = self.path == "/v1/chat/completions"
            if not chat and self.path != "/v1/completions":
                return self.send_json(404, {"error": {"message": "not found"}})
            rid = self.headers.get("X-Request-Id")
            msgs = body.get("messages") or []
            with lock:
                stats["requests"] += 1
                if rid and rid in seen:
                    stats["continuations"] += 1
                seen.add(rid)
                if chat and (msgs and msgs[-1].get("role") == "assistant" or "continue_final_message" in body):
                    stats["prefills"] += 1
            words = (render(msgs) if chat else str(body.get("prompt"))).split()
            st = zlib.crc32(struct.pack("<q", int(body.get("seed") or 0)))
            for w in words:
                st = zlib.crc32(w.encode(), st)
            turn = len(words) - 1 - words[::-1].index("assistant:") if "assistant:" in words else None
            limit = PLAIN_CHAT_LEN - (len(words) - 1 - turn) if turn is not None else 1 << 30
            n = min(int(body.get("max_tokens") or 16), limit)
            self.start_sse()
            head = {"id": "p", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1,
                    "model": "plain-model"}
            try:
                for k in range(n):
                    w = f"w{st % 9973}"
                    st = zlib.crc32(w.encode(), st)
                    fin = None if k < n - 1 else ("stop" if n == limit else "length")
                    c = {"index": 0, "finish_reason": fin}
                    if chat:
                        c["delta"] = {"content": " " + w}
                    else:
                        c["text"] = " " + w
                    self.chunk(dict(head, choices=[c]))
                    time.sleep(PLAIN_DELAY)
                self.end_sse()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    serve(H, port)


def plain_round(flavour, n_chat, n_comp):
    """One plain server of `flavour`, a frontend and W1 (raw completions declared); n_chat chats and
    n_comp completions start on W1; W2 joins; W1 is killed (-9) mid-stream, so every stream moves
    to W2. Returns (requests, results, references, W2, upstream metric deltas, kill progress)."""
    port = bl.free_port()
    srv = bl.Proc([sys.executable, os.path.abspath(__file__), "--plain-server", str(port), flavour],
                  name=f"plain-{flavour}:{port}")
    url = f"http://127.0.0.1:{port}"
    c = bl.Cluster(tmpdir_path=bl.tmpdir(f"baton-oa-plain-{flavour}-"))
    kind = "llamacpp" if flavour == "llamacpp" else "openai"
    with guarded((c,), (srv,)):
        bl.wait_http(url + "/health", srv, timeout=20)
        fe = c.start_frontend(migration_limit=3)
        wk = dict(engine="openai", upstream=url, upstream_raw_completions=True, system_port=True, wait=True)
        w1 = c.start_worker(**wk)
        c.wait_workers(fe, 1)
        w1.proc.wait_log(rf"is up \(kind {kind}, detected, model 'plain-model'\)", 10)
        reqs = [(f"{flavour}-chat-{i}", "chat", bl.chat_body(f"plain chat {i}", max_tokens=1000, seed=70 + i,
                                                             return_token_ids=True)) for i in range(n_chat)]
        reqs += [(f"{flavour}-comp-{i}", "completion",
                  bl.completion_body(f"plain completion {i}", max_tokens=PLAIN_CHAT_LEN - 20, seed=80 + i,
                                     return_token_ids=True)) for i in range(n_comp)]
        # the references, straight from the server; alongside, fault-free through baton: the same
        pair = (reqs[0], reqs[-1])
        outs = bl.run_concurrently(lambda u, r: outcome(u, r[1], dict(r[2], model="plain-model") if u == url else r[2],
                                                        True, timeout=60),
                                   [(url, r) for r in reqs] + [(fe.url, r) for r in pair])
        refs = dict(zip([r[0] for r in reqs], outs))
        for name, o in refs.items():
            if not o["ok"] or len(o["text"].split()) != PLAIN_CHAT_LEN - (20 if "comp" in name else 0):
                fail(f"reference {name} from the {flavour} server: {o['raw']}")
        for (name, api, body), got in zip(pair, outs[len(reqs):]):
            check_same(got, refs[name], f"{name} through baton", ids=False, usage=False)
            check_text_ids(got, name)
        m0 = bl.metrics(url)
        mig0 = migrations(fe)
        run = Runner(fe.url, reqs)
        bl.wait_for(lambda: all(v >= 10 for v in run.progress.values()), 60, what="every stream has 10 events")
        w2 = c.start_worker(**wk)
        c.wait_workers(fe, 2)
        w2.proc.wait_log(rf"is up \(kind {kind}, detected, model 'plain-model'\)", 10)
        at_kill = dict(run.progress)
        if max(at_kill.values()) >= PLAIN_CHAT_LEN - 40:
            fail(f"the streams were nearly over before the kill (events {at_kill}): the test proves nothing")
        w1.proc.kill(signal.SIGKILL)
        if w1.proc.wait(10) is None:
            fail("W1 did not die")
        run.join()
        m1 = bl.metrics(url)
        delta = {k: bl.metric_sum(m1, f"plain_{k}_total") - bl.metric_sum(m0, f"plain_{k}_total")
                 for k in ("continuations", "prefills", "renders")}
        delta["prefills"] = bl.metric_sum(m1, "plain_prefills_total")  # none ever, not only during the fault
        moved = migrations(fe) - mig0
        if moved != len(reqs):
            fail(f"{moved} migrations counted, want {len(reqs)} (every stream was on W1 at its kill)")
        # the worker that refused or continued is healthy: a fresh request goes through it
        name, api, body = reqs[0]
        body = dict(body, max_tokens=20)
        check_same(outcome(fe.url, api, body, True, timeout=60),
                   outcome(url, api, dict(body, model="plain-model"), True, timeout=60), f"fresh {name} after the fault",
                   ids=False, usage=False)
        bl.wait_for(lambda: msum(fe.url, "dynamo_frontend_inflight_requests") == 0, 15, what="no request in flight")
        return reqs, dict(run.results), refs, w2.proc.log_text(), delta, at_kill


def part_d():
    """Prefill-ignoring servers behind two workers; the worker serving every stream is killed (-9)
    mid-stream. Kind openai: a chat cannot continue exactly, it ends with the error event after an
    exact prefix; a completion continues as a declared raw completion, byte for byte. Kind
    llamacpp: a chat continues too, as a raw completion of the server's own /apply-template
    rendering + the delivered text, byte for byte."""
    reqs, res, refs, w2log, d, at_kill = plain_round("openai", 3, 3)
    for name, api, _ in reqs:
        got = res[name]
        v = check_exact_or_refused(got, refs[name], f"after W1's kill: {name}")
        want = "refused" if api == "chat" else "exact"
        if v != want:
            fail(f"{name} ({api}) was {v}, want {want}: {got['raw']}")
        if want == "exact":
            check_text_ids(got, f"after W1's kill: {name}")
        else:
            msg = got["stream"].error["message"]
            if "continue" not in msg or "exactly" not in msg:
                fail(f"{name}: the error event does not say why: {msg!r}")
    if d != {"continuations": 3, "prefills": 0, "renders": 0}:
        fail(f"upstream counters {d}: want 3 continuations (the completions only) and no prefill")
    if "refusing to continue a stream" not in w2log:
        fail("W2's log does not record the refusals")
    print(f"prefill-ignoring upstream (kind openai): W1 killed at events {sorted(at_kill.values())}; 3 chats ended "
          f"with the 503 error event after an exact prefix, 3 completions continued byte-exact as raw completions; "
          f"upstream saw {d}")
    reqs, res, refs, w2log, d, at_kill = plain_round("llamacpp", 2, 1)
    for name, api, _ in reqs:
        check_same(res[name], refs[name], f"after W1's kill: {name}", ids=False, usage=False)
        check_text_ids(res[name], f"after W1's kill: {name}")
    if d != {"continuations": 3, "prefills": 0, "renders": 2}:
        fail(f"upstream counters {d}: want 3 continuations, 2 renders (one per chat) and no prefill")
    print(f"prefill-ignoring upstream (kind llamacpp): W1 killed at events {sorted(at_kill.values())}; 2 chats "
          f"continued byte-exact via /apply-template + raw completion, 1 completion as a raw completion; "
          f"upstream saw {d}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--fake-vllm":
        fake_vllm(int(sys.argv[2]), float(sys.argv[3]))
        sys.exit(0)
    if len(sys.argv) == 4 and sys.argv[1] == "--plain-server":
        plain_server(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    if os.environ.get("OA_TEST_ONLY") == "plain":  # one part alone, for debugging
        selftest()
        part_d()
        print("test_openai_engine: part D passed")
        sys.exit(0)
    bl.deadline(340, "test_openai_engine")
    try:
        selftest()
        part_a()
        part_b()
        part_c()
        part_d()
    except BaseException:
        bl.mark_failed()
        raise
    print("test_openai_engine: all checks passed")
