"""How the `openai` engine ends a stream from what its upstream sends, through the real binaries,
in front of a scripted OpenAI-compatible server of this file's own (docs/engines.md §2.4):

1. Budget: the upstream streams 100 chunks (0.1 s apart) to a client that asked for 10. The client
   gets 10 pieces and finish_reason "length" (not "stop"), in about a second, and the upstream's
   request is closed at once (its 12th chunk at the latest finds the connection gone), not read to
   its end 10 s later.
2. Finish reasons: "content_filter", "tool_calls" and "function_call" reach the client as the
   upstream sent them (before: all "stop"); an unknown reason is "stop". On the request plane a
   frontend whose HELLO lacks BT_HELLO_FINISH_REASONS (an older build) gets reason 0 (stop).
3. Endings that are not a finish: a stream of `data: [DONE]` alone, and text then [DONE] without
   any finish_reason, are incomplete streams (an error event), never a 200 success with "stop";
   as the upstream's own answer (the next worker would get the same) they neither migrate nor
   quarantine a worker.
4. A finish chunk with its usage, then neither [DONE] nor a close: the client gets the whole
   answer, its finish and that usage at once (before: an error after 30 s), and the worker stays.
   A finish and [DONE] without usage (include_usage was asked for): the client's usage is null,
   streamed and whole, not a prompt_tokens 0 and a chunk count made up as if measured. A usage
   chunk 1.2 s after a stop string's finish is passed on (before: null after 0.5 s); a finish and
   then silence ends whole at the stall bound, usage null.
5. A stalled upstream request (two pieces, then nothing, the connection open) with
   --engine-stuck-timeout 2: that request alone fails (an error event after about 2 s per
   attempt), while another stream on the same worker completes whole and the worker keeps serving
   (before: the engine monitor shut the worker down, exit 1, with every stream on it).
6. A whole (non-SSE) JSON answer to the streaming request, as from a server that ignores "stream":
   with finish_reason null or missing it is an error (500 engine_error, no quarantine), as [DONE]
   without a finish is (before: "stop"); with stop or length it is served as sent, usage included.
7. An upstream that queues a request (nothing at all, or the head and then nothing) has its own
   bound, --upstream-first-byte-timeout 5 (longer than the stall bound, 2): a request queued 3 s is
   served; one queued past 5 s fails alone with 504 upstream_timeout, streamed and whole, without a
   migration or a quarantine, while another stream on the worker completes and new requests are
   served (before: the stall bound failed it as a cut stream, the worker was quarantined and the
   client got 503 no_worker_available).
8. A continuation with nothing left to generate (the serving worker killed once the client had its
   whole budget, before the finish): its usage is the upstream's count for kinds baton (the
   carried ids sent with max_tokens 0) and vllm (/tokenize), null for a text-only kind (before:
   null for every kind).
"""

import json
import sys
import threading
import time

import batonlib as bl
import rpclib
from fakeupstream import FakeHandler, serve_in_thread

MODEL = "mock-model"
FIRST_BYTE = 5  # the worker's --upstream-first-byte-timeout (its --engine-stuck-timeout is 2)
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


class Scripted(FakeHandler):
    """Answers a completion by the script named at the head of its prompt."""
    closed = {}  # script -> seconds from the request to the write that found the connection closed
    lock = threading.Lock()

    def piece(self, text, finish=None, usage=None, ids=None):
        obj = {"id": "x", "object": "text_completion", "model": MODEL,
               "choices": [{"index": 0, "text": text, "finish_reason": finish}]}
        if ids is not None:
            obj["choices"][0]["token_ids"] = ids
        if usage:
            obj["usage"] = usage
        self.chunk(obj)

    def whole(self, finish):
        """A whole text_completion (not SSE), as from a server that ignores "stream": true; finish
        "missing" leaves finish_reason out, "null" sends null."""
        choice = {"index": 0, "text": " a b"}
        if finish != "missing":
            choice["finish_reason"] = None if finish == "null" else finish
        self.send_json(200, {"id": "x", "object": "text_completion", "model": MODEL, "choices": [choice],
                             "usage": USAGE})

    def do_POST(self):
        body = self.read_json()
        if self.path == "/tokenize":  # vLLM's: the prompt is 7 tokens
            return self.send_json(200, {"count": 7, "max_model_len": 4096, "tokens": list(range(1, 8))})
        script = body.get("prompt", "").split()[0]
        t0 = time.monotonic()
        usage = USAGE
        try:
            if script.startswith("whole="):
                return self.whole(script[len("whole="):])
            if script == "queue":  # the request is queued: no byte, not even the head, for 40 s
                time.sleep(40)
                return
            if script == "queue3":  # queued for 3 s, then answered
                time.sleep(3)
            self.start_sse()
            if script == "queuehead":  # the head at once (as vLLM), then the request waits in its queue
                time.sleep(40)
                return
            if script == "budget":
                for k in range(100):
                    self.piece(f" w{k}", "stop" if k == 99 else None)
                    time.sleep(0.1)
                self.chunk(b"[DONE]")
            elif script.startswith("reason="):
                self.piece(" a")
                self.piece(" b", script[len("reason="):])
                self.piece("", None, usage)
                self.chunk(b"[DONE]")
            elif script == "nousage":  # a finish and [DONE], no usage although it was asked for
                assert body.get("stream_options") == {"include_usage": True}, body
                self.piece(" a")
                self.piece(" b", "stop")
                self.chunk(b"[DONE]")
            elif script == "stoplate":  # a stop string hit; the usage chunk 1.2 s after the finish
                self.piece(" a")
                self.piece(" b", "stop")
                time.sleep(1.2)
                self.piece("", None, usage)
                self.chunk(b"[DONE]")
            elif script == "finhold":  # a finish, then silence with the connection open: no usage
                self.piece(" a")
                self.piece(" b", "stop")
                time.sleep(40)
            elif script == "finping":  # a finish, then SSE keep-alive comments: never usage nor [DONE]
                self.piece(" a")
                self.piece(" b", "stop")
                for _ in range(80):
                    time.sleep(0.5)
                    ping = b": ping\n\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(ping), ping))
                    self.wfile.flush()
            elif script == "doneonly":
                self.chunk(b"[DONE]")
            elif script == "nofinish":
                self.piece(" a")
                self.piece(" b")
                self.chunk(b"[DONE]")
            elif script == "held":  # a finish with its usage, then silence with the connection open
                self.piece(" a")
                self.piece(" b", "stop", usage)
                time.sleep(40)
            elif script == "stall":  # two pieces, then silence with the connection open
                self.piece(" a")
                self.piece(" b")
                time.sleep(40)
            elif script == "spent":
                carried = body.get("carried_token_ids")
                if carried is not None:  # a baton upstream's continuation: its usage counts the carried ids
                    self.piece("", "length", {"prompt_tokens": 7, "completion_tokens": len(carried) + body["max_tokens"],
                                              "total_tokens": 7 + len(carried) + body["max_tokens"]}, [])
                    self.chunk(b"[DONE]")
                else:  # max_tokens pieces, then nothing: the budget is reached, the finish not sent yet
                    ids_on = body.get("return_token_ids") is True
                    for k in range(body["max_tokens"]):
                        self.piece(f" i{k}", None, None, [100 + k] if ids_on else None)
                    time.sleep(40)
            elif script == "queue3":
                self.piece(" q")
                self.piece(" r", "stop", usage)
                self.chunk(b"[DONE]")
            elif script == "slow":
                for k in range(8):
                    self.piece(f" s{k}", "length" if k == 7 else None, usage if k == 7 else None)
                    time.sleep(0.5)
                self.chunk(b"[DONE]")
            self.end_chunks()
        except (BrokenPipeError, ConnectionResetError):
            with Scripted.lock:
                Scripted.closed[script] = time.monotonic() - t0


def stream(fe, prompt, max_tokens=50, timeout=60):
    body = bl.completion_body(prompt, max_tokens=max_tokens, model=MODEL)
    return bl.stream_completion(fe.url, dict(body, stream_options={"include_usage": True}), timeout=timeout)


def msum(url, name):
    return bl.metric_sum(bl.metrics(url), name)


def spent_continuation(url, kind):
    """Two workers before the upstream; the one serving a stream is killed (-9) once the client has
    every token of its budget but not yet its finish (the worker waits up to 0.5 s for the
    upstream's), so the continuation on the other worker has nothing left to generate. Returns the
    stream."""
    with bl.Cluster() as c:
        fe = c.start_frontend(migration_limit=2)
        ws = [c.start_worker(engine="openai", upstream=url, upstream_kind=kind, system_port=True, wait=True)
              for _ in range(2)]
        c.wait_workers(fe, 2)
        killed = []

        def kill(st, obj):
            if len(st.t_tokens) >= 6 and not killed:
                busy = [w for w in ws if msum(w.system_url, "baton_worker_active_sequences") > 0]
                if len(busy) == 1:
                    killed.append(busy[0])
                    busy[0].proc.kill(9)
            return False

        body = bl.completion_body("spent hi", max_tokens=6, model=MODEL, stream_options={"include_usage": True})
        s = bl.stream_completion(fe.url, body, timeout=30, on_event=kill)
        assert killed, f"{kind}: the serving worker was not killed at the budget: {s.summary()}"
        assert msum(fe.url, "dynamo_frontend_model_migration_total") == 1, f"{kind}: no migration"
        return s


def main():
    # the sections to run (1-8, all by default), so that one can be run on its own
    only = {int(a) for a in sys.argv[1:]} or {1, 2, 3, 4, 5, 6, 7, 8}
    srv, url = serve_in_thread(Scripted)
    try:
        with bl.Cluster() as c:
            fe = c.start_frontend(migration_limit=1)
            w = c.start_worker(engine="openai", upstream=url, upstream_kind="openai", engine_stuck_timeout=2,
                               env={"DYN_UPSTREAM_FIRST_BYTE_TIMEOUT": str(FIRST_BYTE)})
            c.wait_workers(fe, 1)
            bl.wait_for(lambda: stream(fe, "reason=stop hi").ok, 15, what="the proxy serves")

            if 1 in only:
                # 1. the budget ends the stream with "length" and closes the upstream's request
                t0 = time.monotonic()
                s = stream(fe, "budget please", max_tokens=10)
                took = time.monotonic() - t0
                s.assert_ok("budget stream")
                assert s.text == "".join(f" w{k}" for k in range(10)), s.summary()
                assert s.finish_reason == "length", f"at the budget: finish {s.finish_reason!r}, want 'length'"
                assert took < 4, f"the budget stream took {took:.1f} s: the worker read the upstream to its end"
                bl.wait_for(lambda: "budget" in Scripted.closed, 5, what="the upstream's request closed")
                assert Scripted.closed["budget"] < 4, f"the upstream request was closed after {Scripted.closed['budget']:.1f} s"
                print(f"budget: 10 pieces, 'length', in {took:.2f} s; upstream closed after {Scripted.closed['budget']:.2f} s")

            if 2 in only:
                # 2. the upstream's finish reasons pass through; an unknown one is "stop"
                for sent, want in (("content_filter", "content_filter"), ("tool_calls", "tool_calls"),
                                   ("function_call", "function_call"), ("stop", "stop"), ("length", "length"),
                                   ("eos_of_some_server", "stop")):
                    s = stream(fe, f"reason={sent} hi")
                    s.assert_ok(f"finish {sent}")
                    assert s.text == " a b" and s.finish_reason == want, f"upstream {sent}: {s.summary()}, want {want}"
                    st, _, b = bl.post_json(fe.url + "/v1/completions",
                                            bl.completion_body(f"reason={sent} hi", max_tokens=50, model=MODEL), timeout=30)
                    assert st == 200 and b["choices"][0]["finish_reason"] == want, (sent, st, b)
                print("finish reasons: content_filter, tool_calls, function_call, stop, length as sent; unknown -> stop")
                # on the request plane: reasons 3-5 only to a frontend that announced it knows them
                for flags, want in ((0, "stop"), (rpclib.HELLO_FINISH_REASONS, "content_filter")):
                    conn = rpclib.Conn(w.rpc_port, hello_flags=flags)
                    body = bl.completion_body("reason=content_filter hi", max_tokens=50, model=MODEL)
                    sid = conn.request({"request_id": f"reason-{flags}", "api": "completion", "body": body})
                    r = rpclib.read_stream(conn, sid)
                    conn.close()
                    assert r.error is None and r.finish[0] == want, f"HELLO flags {flags}: {r.finish} {r.error}"
                print("request plane: FINISH content_filter (3) to a frontend with BT_HELLO_FINISH_REASONS, stop (0) "
                      "to one without")

            if 3 in only:
                # 3. [DONE] without a finish is no success
                for script in ("doneonly", "nofinish"):
                    s = stream(fe, f"{script} hi")
                    assert s.error is not None and s.finish_reason is None, f"{script}: {s.summary()}"
                    st, _, b = bl.post_json(fe.url + "/v1/completions",
                                            bl.completion_body(f"{script} hi", max_tokens=50, model=MODEL), timeout=30)
                    assert st != 200, f"{script}: whole answer {st} {b}"
                    print(f"{script}: stream error {s.error.get('message')!r}; whole answer {st}")

                    assert "without a finish_reason" in (s.error.get("message") or "") or script == "doneonly", s.error
                # the upstream's way of answering, not a cut: no migration, no worker quarantined
                # (a server that never sends finish_reason would otherwise take every worker out)
                assert "quarantined" not in fe.proc.log_text(), fe.proc.log_tail()
                assert stream(fe, "reason=stop again").ok, "the worker does not serve at once"

            if 4 in only:
                # 4. a finish with its usage ends the stream, without [DONE] or a close
                t0 = time.monotonic()
                s = stream(fe, "held hi", timeout=20)
                took = time.monotonic() - t0
                s.assert_ok("finish without [DONE]")
                assert s.text == " a b" and s.finish_reason == "stop", s.summary()
                assert s.usage and s.usage["prompt_tokens"] == 7 and s.usage["completion_tokens"] == 3, s.usage
                assert took < 3, f"a finished answer was held {took:.1f} s"
                print(f"finish + usage without [DONE]: complete in {took:.2f} s, usage {s.usage}")
                # no usage from the upstream: none is made up (before: prompt_tokens 0 and the chunk
                # count, as if measured); the usage chunk says null, and so does a whole answer
                s = stream(fe, "nousage hi")
                s.assert_ok("finish without usage")
                assert s.text == " a b" and s.finish_reason == "stop", s.summary()
                tail = [e for e in s.events if isinstance(e, dict) and "usage" in e and not e.get("choices")]
                assert len(tail) == 1 and tail[0]["usage"] is None, f"usage events {tail}"
                st, _, b = bl.post_json(fe.url + "/v1/completions",
                                        bl.completion_body("nousage hi", max_tokens=50, model=MODEL), timeout=30)
                assert st == 200 and b["choices"][0]["text"] == " a b" and b["usage"] is None, (st, b)
                assert "finished a stream without usage" in w.proc.log_text(), w.proc.log_tail()
                print("no usage upstream: the answer's usage is null (streamed and whole), the worker's log says so")
                # the usage after a finish is waited for while the response goes on (before: null
                # once 0.5 s had passed); a response that goes silent after its finish ends whole
                # at the stall bound (2 s), its usage null
                body = bl.completion_body("stoplate hi", max_tokens=50, model=MODEL, stop=[" c"])
                s = bl.stream_completion(fe.url, dict(body, stream_options={"include_usage": True}), timeout=20)
                s.assert_ok("usage 1.2 s after the finish")
                assert s.text == " a b" and s.finish_reason == "stop" and s.usage == USAGE, (s.summary(), s.usage)
                st, _, b = bl.post_json(fe.url + "/v1/completions", body, timeout=30)
                assert st == 200 and b["usage"] == USAGE and b["choices"][0]["finish_reason"] == "stop", (st, b)
                t0 = time.monotonic()
                s = stream(fe, "finhold hi", timeout=20)
                took = time.monotonic() - t0
                s.assert_ok("a finish, then silence")
                assert s.text == " a b" and s.finish_reason == "stop" and s.usage is None, (s.summary(), s.usage)
                assert took < 5, f"a finished answer without usage was held {took:.1f} s"
                # keep-alive comments after the finish are no usage: the wait for it is bounded
                # (5 s), not renewed by every byte (before: held for as long as the pings came)
                t0 = time.monotonic()
                s = stream(fe, "finping hi", timeout=40)
                took_ping = time.monotonic() - t0
                s.assert_ok("a finish, then keep-alive comments")
                assert s.text == " a b" and s.finish_reason == "stop" and s.usage is None, (s.summary(), s.usage)
                assert 4 < took_ping < 9, f"a finished answer followed by pings was held {took_ping:.1f} s"
                print(f"usage 1.2 s after a stop: passed on (streamed and whole); a finish then silence: whole, usage "
                      f"null, after {took:.1f} s; a finish then pings: whole after {took_ping:.1f} s")

            if 5 in only:
                # 5. a stalled upstream request fails alone; the worker and its other stream go on
                bl.wait_for(lambda: stream(fe, "reason=stop again").ok, 30, what="the worker serves again")
                slow = {}
                th = threading.Thread(target=lambda: slow.update(s=stream(fe, "slow hi", timeout=30)), daemon=True)
                th.start()
                time.sleep(0.3)
                t0 = time.monotonic()
                s = stream(fe, "stall hi", timeout=30)
                took = time.monotonic() - t0
                assert s.error is not None and s.text.startswith(" a b"), f"stalled: {s.summary()}"
                th.join(30)
                slow["s"].assert_ok("the other stream on the worker")
                assert slow["s"].text == "".join(f" s{k}" for k in range(8)), slow["s"].summary()
                assert w.proc.alive(), f"the worker exited:\n{w.proc.log_tail()}"
                bl.wait_for(lambda: stream(fe, "reason=stop again").ok, 10, what="the worker serves after the stall")
                print(f"stalled request: error after {took:.1f} s ({s.error.get('message')!r}); the other stream whole, "
                      "the worker serving")

            if 6 in only:
                # 6. a whole (non-SSE) answer to the streaming request follows the rule of [DONE]: no
                # finish_reason is no success (before: "stop"); with one, it is the answer
                log0 = len(fe.proc.log_text())
                for finish in ("null", "missing"):
                    s = stream(fe, f"whole={finish} hi")
                    assert s.error is not None and s.finish_reason is None, f"whole, finish {finish}: {s.summary()}"
                    assert "without a finish_reason" in (s.error.get("message") or ""), s.error
                    st, _, b = bl.post_json(fe.url + "/v1/completions",
                                            bl.completion_body(f"whole={finish} hi", max_tokens=50, model=MODEL),
                                            timeout=30)
                    assert st == 500 and b["error"]["code"] == "engine_error", f"whole, finish {finish}: {st} {b}"
                    print(f"whole answer, finish_reason {finish}: stream error {s.error.get('message')!r}; whole {st}")
                assert "quarantined" not in fe.proc.log_text()[log0:], fe.proc.log_tail()
                for finish in ("stop", "length"):
                    s = stream(fe, f"whole={finish} hi")
                    s.assert_ok(f"whole answer, finish {finish}")
                    assert s.text == " a b" and s.finish_reason == finish and s.usage == USAGE, s.summary()
                print("whole answers with stop and length: served as sent, with their usage")

            if 7 in only:
                # 7. an upstream that queues a request: it has its own bound (FIRST_BYTE), longer than
                # the stall bound; past it that request alone fails, 504 upstream_timeout, without a
                # migration or a quarantine, while another stream on the worker goes on (before:
                # the stall bound, 2 s, failed a request queued 3 s, migrated it and quarantined the
                # worker until its streams ended)
                log0 = len(fe.proc.log_text())
                mig0 = bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_model_migration_total")
                s = stream(fe, "queue3 hi")
                s.assert_ok("a request queued 3 s")
                assert s.text == " q r", s.summary()
                print("a request queued 3 s upstream (stall bound 2 s): served")
                for script in ("queue", "queuehead"):
                    slow = {}
                    th = threading.Thread(target=lambda: slow.update(s=stream(fe, "slow hi", timeout=30)), daemon=True)
                    th.start()
                    time.sleep(0.3)
                    t0 = time.monotonic()
                    s = stream(fe, f"{script} hi", timeout=30)
                    took = time.monotonic() - t0
                    err = s.error or {}
                    assert s.status == 504 and err.get("code") == "upstream_timeout", f"{script}: {s.summary()}"
                    assert "upstream" in err.get("message", "") and not s.text, s.summary()
                    assert FIRST_BYTE - 0.5 < took < FIRST_BYTE + 3, f"{script}: failed after {took:.1f} s"
                    # meanwhile the worker serves the other stream, and new requests are routed to it
                    assert stream(fe, "reason=stop meanwhile").ok, "the worker does not serve at once"
                    th.join(30)
                    slow["s"].assert_ok(f"{script}: the other stream on the worker")
                    print(f"{script}: stream 504 {err.get('message')!r} after {took:.1f} s; the other stream whole")
                st, _, b = bl.post_json(fe.url + "/v1/completions",
                                        bl.completion_body("queue hi", max_tokens=50, model=MODEL), timeout=30)
                assert st == 504 and b["error"]["code"] == "upstream_timeout", (st, b)
                mig = bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_model_migration_total") - mig0
                assert mig == 0, f"{mig} migrations for queued requests"
                assert "quarantined" not in fe.proc.log_text()[log0:], fe.proc.log_tail()
                assert stream(fe, "reason=stop again").ok, "the worker does not serve at once"
                print("queued past the first-byte bound: 504 upstream_timeout, streamed and whole; not migrated, "
                      "no worker quarantined")
        if 8 in only:
            # 8. a continuation with nothing left to generate: its usage is the upstream's count where
            # its kind gives one without generating (before: null for every kind)
            want = {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13}
            for kind, usage in (("baton", want), ("vllm", want), ("openai", None)):
                s = spent_continuation(url, kind)
                s.assert_ok(f"{kind}: the spent continuation")
                assert s.text == "".join(f" i{k}" for k in range(6)) and s.finish_reason == "length", s.summary()
                got = {k: s.usage[k] for k in want} if s.usage else None
                assert got == usage, f"{kind}: usage {s.usage}, want {usage}"
                print(f"kind {kind}: a continuation with nothing left to generate has usage {s.usage}")
    finally:
        srv.shutdown()
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
