"""The `openai` engine in front of an upstream that says it is busy, through the real binaries.

An upstream's 429, 503 or 504 is an overloaded upstream, not a dead worker (docs/engines.md §2.4):
the request is tried on another worker, the workers stay in service, and once every worker's
upstream has refused it the client gets the refusal with the upstream's Retry-After.

1. A baton upstream U (frontend + mocker) behind two openai workers P1, P2 of a frontend F, with two
   long streams running through F. U's /busy_threshold makes it shed (503 with Retry-After); one
   request through F gets 503 `overloaded` in the OpenAI error shape, with U's Retry-After. The
   threshold is removed: within a second a new request through F succeeds, while the long streams
   still run (before, both workers stayed quarantined until those streams ended, and every request
   in between got 503 "no worker available for the model"). F logs no quarantine; the long
   streams end whole.
2. A server of this file's own in front of two workers answers 429 with Retry-After: 20: the
   client gets 429 `rate_limit_exceeded` with Retry-After: 20 (before: 503 no_worker_available,
   Retry-After: 1), after the server was asked once by each worker; then 503 without Retry-After
   (the client's Retry-After is 1) and 504 (a 503 to the client); each time the next request, the
   server serving again, succeeds at once, and F logs no quarantine. On the request plane a worker
   sends the new code (24) only to a frontend whose HELLO announced BT_HELLO_UPSTREAM_BUSY, and
   BT_ERR_CANNOT_CONNECT (7) to one that did not, the Retry-After at the head of the message.
3. Least-loaded routing, two workers with refusing upstreams and a third serving a long answer: a
   request refused by both goes to the third, each busy upstream asked once (a busy worker holds
   no streams and scores lowest: the retry went back to the first, and three refusals for three
   workers gave the client a 503 with a worker free).
"""

import http.server
import json
import struct
import sys
import threading
import time

import batonlib as bl
import rpclib

MODEL = "mock-model"
HELLO_UPSTREAM_BUSY = 0x4  # HELLO flag: this frontend understands BT_ERR_UPSTREAM_BUSY / _RATE_LIMITED


class Busy(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server whose answer to a completion is set by the test: `mode` None
    streams a short answer; an (HTTP status, Retry-After or None) pair refuses with that status
    and an OpenAI error body. Counts the completion requests it receives."""
    protocol_version = "HTTP/1.1"
    mode = None
    requests = 0
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def send_json(self, code, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self.send_json(200, {})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "acme"}]})
        else:
            self.send_json(404, {"error": {"message": "not found"}})

    delay = 0.0  # seconds between the chunks of an answer

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        cls = type(self)
        with cls.lock:
            cls.requests += 1
            mode = cls.mode
        if mode is not None:
            status, retry_after = mode
            code = "rate_limit_exceeded" if status == 429 else "overloaded"
            self.send_json(status, {"error": {"message": f"busy ({status})", "type": "server_error", "param": None,
                                              "code": code}},
                           [("Retry-After", str(retry_after))] if retry_after is not None else [])
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for k in range(3):
            time.sleep(type(self).delay)
            c = {"index": 0, "text": f" w{k}", "finish_reason": "length" if k == 2 else None}
            self.chunk(json.dumps({"id": "b", "object": "text_completion", "model": MODEL, "choices": [c]}).encode())
        self.chunk(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def chunk(self, payload):
        data = b"data: " + payload + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def no_quarantine(fe):
    log = fe.proc.log_text()
    assert "quarantined" not in log, f"a busy upstream quarantined a worker:\n{fe.proc.log_tail()}"


def first_success(fe, body, within):
    """Sends `body` until one succeeds; returns the seconds that took, which must stay below `within`."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < within:
        st, _, b = bl.post_json(fe.url + "/v1/completions", body, timeout=30)
        if st == 200:
            return time.monotonic() - t0
        last = (st, b)
        time.sleep(0.05)
    raise AssertionError(f"no request succeeded within {within} s after the upstream recovered; last answer {last}\n"
                         f"{fe.proc.log_tail()}")


def baton_upstream():
    with bl.Cluster() as up, bl.Cluster() as c:
        u = up.start_frontend()
        up.start_worker(speedup_ratio=0.5)
        up.wait_workers(u, 1)
        fe = c.start_frontend()
        for _ in range(2):
            c.start_worker(engine="openai", upstream=u.url, upstream_kind="baton", model_name=MODEL)
        c.wait_workers(fe, 2)
        body = bl.completion_body("Once upon a time", max_tokens=5, model=MODEL)
        bl.wait_for(lambda: bl.post_json(fe.url + "/v1/completions", body)[0] == 200, 15, what="the proxy serves")
        longs, threads = [], []
        for i in range(2):
            def run(i=i):
                longs.append(bl.stream_completion(fe.url, bl.completion_body(f"long story {i}", max_tokens=1500,
                                                                             model=MODEL), timeout=120))
            threads.append(threading.Thread(target=run, daemon=True))
            threads[-1].start()
        bl.wait_for(lambda: bl.metric_sum(bl.metrics(u.url), "dynamo_frontend_inflight_requests") >= 2, 15,
                    what="both long streams running upstream")
        time.sleep(0.5)

        st, _, b = bl.post_json(u.url + "/busy_threshold", {"model": MODEL, "active_decode_blocks_threshold": 0.0001})
        assert st == 200, (st, b)
        st, hdrs, b = bl.post_json(fe.url + "/v1/completions", body)
        assert st == 503, f"expected the upstream's 503 through the proxy, got {st} {b}"
        err = (b or {}).get("error") or {}
        assert err.get("code") == "overloaded" and err.get("type") and "message" in err and "param" in err, b
        # the upstream's own Retry-After (its drain estimate, 1-30 s) reaches the client
        assert 1 <= int(hdrs.get("retry-after", "0")) <= 30, hdrs
        st, _, b = bl.post_json(u.url + "/busy_threshold", {"model": MODEL, "active_decode_blocks_threshold": None})
        assert st == 200, (st, b)

        took = first_success(fe, body, 1.5)
        assert not longs, "the long streams ended before the recovery was checked: the test proves nothing"
        print(f"baton upstream: shed once (503, Retry-After {hdrs.get('retry-after')}), served again {took:.2f} s "
              "after it recovered, long streams still running")
        for t in threads:
            t.join(120)
        for s in longs:
            assert s.done and s.finish_reason == "length" and s.error is None, (s.status, s.error, s.finish_reason)
        no_quarantine(fe)


def own_upstream():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        with bl.Cluster() as c:
            fe = c.start_frontend()
            for _ in range(2):
                c.start_worker(engine="openai", upstream=url, upstream_kind="openai")
            c.wait_workers(fe, 2)
            body = bl.completion_body("hello", max_tokens=3, model=MODEL)
            bl.wait_for(lambda: bl.post_json(fe.url + "/v1/completions", body)[0] == 200, 15, what="the proxy serves")
            for mode, want_status, want_code, want_ra in (((429, 20), 429, "rate_limit_exceeded", "20"),
                                                          ((503, None), 503, "overloaded", "1"),
                                                          ((504, None), 503, "overloaded", "1")):
                Busy.mode = mode
                n0 = Busy.requests
                st, hdrs, b = bl.post_json(fe.url + "/v1/completions", body)
                err = (b or {}).get("error") or {}
                assert st == want_status and err.get("code") == want_code, f"upstream {mode}: got {st} {hdrs} {b}"
                assert hdrs.get("retry-after") == want_ra, f"upstream {mode}: Retry-After {hdrs.get('retry-after')}"
                assert "param" in err and err.get("type"), b
                # one worker's refusal sends the request to the other one's upstream, not back to it
                assert Busy.requests - n0 == 2, f"upstream {mode}: asked {Busy.requests - n0} times, want 2"
                Busy.mode = None
                took = first_success(fe, body, 1.0)
                print(f"upstream {mode[0]}: client got {st} {want_code}, Retry-After {want_ra}; served again "
                      f"{took:.2f} s later")
            no_quarantine(fe)
            # on the request plane: the new codes only to a frontend that announced it knows them
            Busy.mode = (429, 20)
            for flags, want in ((0, 7), (HELLO_UPSTREAM_BUSY, 24)):
                conn = rpclib.Conn(c.workers[0].rpc_port, hello_flags=flags)
                sid = conn.request({"request_id": f"busy-{flags}", "api": "completion", "body": body})
                f = conn.read()
                conn.close()
                assert f.type == rpclib.ERROR and f.stream == sid, (f.type, f.stream, f.payload)
                code, msg = struct.unpack(">H", f.payload[:2])[0], f.payload[2:].decode()
                assert code == want and msg.startswith("retry after 20 s: the upstream answered HTTP 429"), \
                    f"HELLO flags {flags}: ERROR {code} {msg!r}, want code {want}"
            Busy.mode = None
            print("request plane: ERROR 24 to a frontend with BT_HELLO_UPSTREAM_BUSY, 7 (as before) to one without")
    finally:
        srv.shutdown()


def serve(mode, delay=0.0):
    """A server of its own (a Busy of its own class: its own mode and count); returns (server, class, url)."""
    cls = type("Own", (Busy,), {"mode": mode, "requests": 0, "lock": threading.Lock(), "delay": delay})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), cls)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, cls, f"http://127.0.0.1:{srv.server_address[1]}"


def two_busy_one_free():
    """3. Least-loaded routing, two workers whose upstreams refuse (503) and one whose upstream
    serves, busy with a long answer: a busy worker answers at once and holds no streams, so it
    scores lowest; a request refused by both must go to the third, not back to the first (before:
    A, B, A, three refusals for three workers, and the client got 503 with a worker free)."""
    servers = [serve((503, None)), serve((503, None))]
    slow = serve(None, delay=3.0)
    try:
        with bl.Cluster() as c:
            fe = c.start_frontend(router_mode="least-loaded")
            for _, _, url in servers + [slow]:
                c.start_worker(engine="openai", upstream=url, upstream_kind="openai")
            c.wait_workers(fe, 3)
            body = bl.completion_body("hello", max_tokens=3, model=MODEL)
            # the free worker holds a long answer: its score is above the busy ones'
            long = threading.Thread(target=lambda: bl.post_json(fe.url + "/v1/completions", body, timeout=60))
            # the busy ones refuse it too: it lands on the slow one, which then holds it
            long.start()
            bl.wait_for(lambda: slow[1].requests >= 1, 10, what="the long answer on the free worker")
            slow[1].delay = 0.0  # the next answers come at once
            for i in range(4):
                n0 = [s[1].requests for s in servers]
                st, _, b = bl.post_json(fe.url + "/v1/completions", body, timeout=30)
                asked = [s[1].requests - n for s, n in zip(servers, n0)]
                assert st == 200, f"request {i}: {st} {b}: a worker was free (busy upstreams asked {asked})"
                assert all(a <= 1 for a in asked), f"request {i}: a busy upstream was asked again: {asked}"
            long.join(60)
            no_quarantine(fe)
            print("least-loaded: refused by both busy upstreams, each once, then served by the free worker")
    finally:
        for s in servers + [slow]:
            s[0].shutdown()


def main():
    with bl.deadline(150, "test_openai_upstream_busy"):
        own_upstream()
        baton_upstream()
        two_busy_one_free()
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
