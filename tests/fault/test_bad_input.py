"""Hostile and broken input against the real binaries: the bad-input matrix of docs/security.md.

Every case checks the answer (status and JSON error body) and that the process keeps serving
afterwards: malformed HTTP, oversized headers and bodies, invalid JSON and field types, unknown
model, absurd max_tokens, invalid UTF-8, thousands of idle connections, a slowloris client, a
client that never reads its stream, garbage and oversized frames on the request-plane port, the
API key, and the request-plane shared secret.
"""

import json
import os
import resource
import socket
import struct
import time

import batonlib as bl

bl.deadline(240, "test_bad_input")


def raw_http(port, data, read_timeout=5.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def status_of(resp):
    line = resp.split(b"\r\n", 1)[0]
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def json_body(resp):
    return json.loads(resp.split(b"\r\n\r\n", 1)[1] or b"null")


def still_serving(fe):
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("still there?", max_tokens=4))
    assert st == 200 and b["choices"][0]["message"]["content"], (st, b)


def post_raw(fe, body_bytes, path="/v1/chat/completions"):
    return bl.request("POST", fe.url + path, body_bytes, {"Content-Type": "application/json"})


def expect_error(fe, body_bytes, status, path="/v1/chat/completions"):
    st, hdrs, data = post_raw(fe, body_bytes, path)
    assert st == status, (body_bytes[:100], st, data[:200])
    err = json.loads(data)["error"]
    assert err["code"] == status and err["message"] and err["type"], err
    return err


with bl.Cluster() as c:
    fe = c.start_frontend(http_header_timeout_ms=500, max_client_backlog_bytes=262144)
    w = c.start_worker(speedup_ratio=1000)
    c.wait_workers(fe, 1)

    # --- malformed request line and headers
    r = raw_http(fe.port, b"THIS IS NOT HTTP\r\n\r\n")
    assert status_of(r) == 400 and json_body(r)["error"]["code"] == 400, r[:200]
    r = raw_http(fe.port, b"GET /live HTTP/1.1\r\nBad Header Line\r\n\r\n")
    assert status_of(r) == 400, r[:200]
    # --- oversized headers (431) and body (413)
    r = raw_http(fe.port, b"GET /live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    assert status_of(r) == 431, r[:200]
    big = b'{"model":"mock-model","messages":[{"role":"user","content":"' + b"x" * (5 << 20) + b'"}]}'
    r = raw_http(fe.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(big)).encode() + b"\r\n\r\n" + big)
    assert status_of(r) == 413 and json_body(r)["error"]["code"] == 413, r[:200]
    # --- JSON and field errors
    expect_error(fe, b"{not json", 400)
    expect_error(fe, b"[1,2,3]", 400)
    expect_error(fe, json.dumps({"model": 5, "messages": []}).encode(), 400)
    expect_error(fe, json.dumps({"model": "mock-model", "messages": "hi"}).encode(), 400)
    expect_error(fe, json.dumps(bl.chat_body(max_tokens="ten")).encode(), 400)
    expect_error(fe, json.dumps(bl.chat_body(max_tokens=-5)).encode(), 400)
    expect_error(fe, json.dumps(bl.chat_body(max_tokens=10 ** 12)).encode(), 400)
    expect_error(fe, json.dumps(bl.chat_body(stream="yes")).encode(), 400)
    expect_error(fe, json.dumps(bl.chat_body(stop=["a", "b", "c", "d", "e"])).encode(), 400)
    expect_error(fe, json.dumps(bl.chat_body(n=3)).encode(), 400)
    expect_error(fe, json.dumps({"model": "mock-model", "prompt": [-1]}).encode(), 400, "/v1/completions")
    expect_error(fe, json.dumps(bl.chat_body(model="gpt-nope")).encode(), 404)
    # invalid UTF-8 inside a JSON string: rejected as invalid JSON, never crashes
    expect_error(fe, b'{"model":"mock-model","messages":[{"role":"user","content":"\xff\xfe\xc3"}]}', 400)
    st, _, _ = bl.request("DELETE", fe.url + "/v1/chat/completions")
    assert st == 405, st
    still_serving(fe)

    # --- thousands of idle connections: the frontend keeps serving
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n_idle = min(2000, hard - 300)
    idle = []
    for _ in range(n_idle):
        s = socket.socket()
        s.connect(("127.0.0.1", fe.port))
        idle.append(s)
    still_serving(fe)
    # --- slowloris: a request that never completes is cut after the header timeout (500 ms here)
    slow = socket.create_connection(("127.0.0.1", fe.port), timeout=10)
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    got = slow.recv(100)  # b"" when the server closes
    waited = time.monotonic() - t0
    assert got == b"" or got.startswith(b"HTTP/1.1 408"), got
    assert waited < 5, f"slowloris connection held for {waited:.1f}s"
    slow.close()
    # the idle ones were closed by the same timeout (they never sent a request)
    closed = 0
    for s in idle:
        s.settimeout(0.01)
        try:
            if s.recv(1) == b"":
                closed += 1
        except (socket.timeout, BlockingIOError):
            pass
        except ConnectionResetError:
            closed += 1
        s.close()
    assert closed > n_idle * 0.95, f"only {closed} of {n_idle} idle connections were closed"
    still_serving(fe)

    m = bl.metrics(fe.url)
    for reason, least in (("bad_request", 2), ("header_too_large", 1), ("body_too_large", 1),
                          ("header_timeout", n_idle * 0.95)):
        got = bl.metric_sum(m, "baton_frontend_http_rejections_total", reason=reason)
        assert got >= least, f"rejections for {reason}: {got}, expected at least {least}"
    # --- a client that never reads its stream: bounded backlog, then disconnect and cancellation
    before = bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_disconnected_clients")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", fe.port))
    body = json.dumps(bl.chat_body("flood", max_tokens=400000, stream=True)).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_disconnected_clients") > before, 60,
                what="the non-reading client to be disconnected")
    s.close()
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_inflight_requests") == 0, 10,
                what="in-flight requests back to 0")
    assert bl.metric_sum(bl.metrics(fe.url), "baton_frontend_http_rejections_total", reason="slow_reader") >= 1
    still_serving(fe)

    # --- garbage and oversized frames on the worker's request-plane port
    for junk in (os.urandom(4096), b"\x00\x00\x00\x04" + b"\x01" * 8, b"\xff\xff\xff\xff" + b"\x00" * 20,
                 b"GET / HTTP/1.1\r\n\r\n"):
        g = socket.create_connection(("127.0.0.1", w.rpc_port), timeout=5)
        g.sendall(junk)
        try:
            while g.recv(65536):
                pass
        except (ConnectionResetError, socket.timeout):
            pass
        g.close()
    assert w.proc.alive(), "worker died on garbage frames"
    assert "malformed frame" in w.proc.log_text() or "did not start with HELLO" in w.proc.log_text()
    still_serving(fe)

with bl.Cluster() as c:
    # --- API key on the frontend: 401 with JSON, probes stay open
    fe = c.start_frontend(api_key="sekrit")
    c.start_worker(speedup_ratio=1000)
    c.wait_workers(fe, 1)
    st, hdrs, data = post_raw(fe, json.dumps(bl.chat_body()).encode())
    assert st == 401 and json.loads(data)["error"]["code"] == 401, (st, data)
    st, _, data = bl.request("POST", fe.url + "/v1/chat/completions", json.dumps(bl.chat_body()).encode(),
                             {"Content-Type": "application/json", "Authorization": "Bearer wrong"})
    assert st == 401, st
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=3),
                            headers={"Authorization": "Bearer sekrit"})
    assert st == 200, b
    for probe in ("/live", "/health", "/metrics"):
        st, _, _ = bl.request("GET", fe.url + probe)
        assert st == 200, (probe, st)

with bl.Cluster() as c:
    # --- request-plane shared secret: only frontends that prove it can drive the worker
    w = c.start_worker(speedup_ratio=1000, env={"DYN_RPC_SECRET": "shared-1"})
    good = c.start_frontend(env={"DYN_RPC_SECRET": "shared-1"})
    none = c.start_frontend()
    wrong = c.start_frontend(env={"DYN_RPC_SECRET": "shared-2"})
    c.wait_workers(good, 1)
    st, _, b = bl.post_json(good.url + "/v1/chat/completions", bl.chat_body(max_tokens=3))
    assert st == 200, b
    time.sleep(1.5)
    for fe_bad in (none, wrong):
        st, _, body = bl.get_json(fe_bad.url + "/health")
        assert body["instances"] == [], f"an unauthenticated frontend lists the worker: {body}"
        st, _, b = bl.post_json(fe_bad.url + "/v1/chat/completions", bl.chat_body(max_tokens=3))
        assert st == 503, (st, b)
    assert "requires a shared secret" in none.proc.log_text(), none.proc.log_tail()
    assert "failed authentication" in w.proc.log_text(), w.proc.log_tail()
    # a raw client that skips the challenge and sends a REQUEST is cut off
    g = socket.create_connection(("127.0.0.1", w.rpc_port), timeout=5)
    hello = struct.pack(">IBBHIHHQ", 8 + 12, 1, 0, 0, 0, 1, 1, 42)
    req = json.dumps({"request_id": "x", "api": "chat", "body": bl.chat_body(), "max_tokens": 3}).encode()
    g.sendall(hello + struct.pack(">IBBHI", 8 + len(req), 2, 0, 0, 1) + req)
    data = b""
    try:
        while True:
            chunk = g.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    g.close()
    assert b"mock" not in data and struct.pack(">B", 3) not in data[12:13], "unauthenticated REQUEST was served"
    assert w.proc.alive()
    st, _, b = bl.post_json(good.url + "/v1/chat/completions", bl.chat_body(max_tokens=3))
    assert st == 200, b
print("test_bad_input: ok")
