"""Hostile and broken input against the real binaries: the bad-input matrix of docs/security.md.

Every case checks the answer (status and JSON error body) and that the process keeps serving
afterwards: malformed HTTP, oversized headers and bodies, invalid JSON and field types, unknown
model, absurd max_tokens, invalid UTF-8, thousands of idle connections, a slowloris client, a
client that never reads its stream, garbage and oversized frames on the request-plane port, stop
strings and chat roles or part types holding U+0000 sent straight to it, the API key, and the
request-plane shared secret; a JSON key given twice (an API or an operator's body), a flag, `user`
or `metadata` of the wrong type, a refusal part on an assistant message (accepted, read as its
words) and a seed past 64 bits (named).
"""

import json
import os
import resource
import socket
import struct
import time

import batonlib as bl

bl.deadline(240, "test_bad_input")


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


def expect_error(fe, body_bytes, status, path="/v1/chat/completions", code=None, param=None):
    """OpenAI's error shape: message, type (from the status), param and a string code."""
    st, hdrs, data = post_raw(fe, body_bytes, path)
    assert st == status, (body_bytes[:100], st, data[:200])
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error"), err
    assert isinstance(err["code"], str) and (code is None or err["code"] == code), (code, err)
    assert param is None or err["param"] == param, (param, err)
    return err


def frames(data):
    """Request-plane frames in data: [(type, stream, payload)] (a partial last frame is dropped)."""
    out = []
    while len(data) >= 12:
        length, ftype, _, _, stream = struct.unpack(">IBBHI", data[:12])
        if len(data) < 4 + length:
            break
        out.append((ftype, stream, data[12:4 + length]))
        data = data[4 + length:]
    return out


def rpc_request(port, body, role=1, wait_for=(4, 5), timeout=10.0):
    """A raw frontend on a worker's request plane: HELLO with `role`, one REQUEST on stream 1 (if
    body is not None), then reads frames until one of the types in wait_for arrives on stream 1,
    the worker closes, or the timeout. Returns (frames, closed_by_worker)."""
    g = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    g.sendall(struct.pack(">IBBHIHHQ", 8 + 12, 1, 0, 0, 0, 1, role, 4242))
    if body is not None:
        req = json.dumps({"request_id": "raw-1", "api": "chat", "body": body, "max_tokens": 3}).encode()
        g.sendall(struct.pack(">IBBHI", 8 + len(req), 2, 0, 0, 1) + req)
    data, closed, end = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            g.settimeout(max(0.05, end - time.monotonic()))
            try:
                chunk = g.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                closed = True
                break
            data += chunk
            if any(t in wait_for and st == 1 for t, st, _ in frames(data)):
                break
    except ConnectionResetError:
        closed = True
    g.close()
    return frames(data), closed


with bl.Cluster() as c:
    fe = c.start_frontend(http_header_timeout_ms=500, max_client_backlog_bytes=262144)
    w = c.start_worker(speedup_ratio=1000)
    c.wait_workers(fe, 1)

    # --- malformed request line and headers
    r = bl.raw_exchange(fe.port, b"THIS IS NOT HTTP\r\n\r\n")
    assert status_of(r) == 400 and json_body(r)["error"]["code"] == "malformed_request", r[:200]
    r = bl.raw_exchange(fe.port, b"GET /live HTTP/1.1\r\nHost: localhost\r\nBad Header Line\r\n\r\n")
    assert status_of(r) == 400, r[:200]
    # --- oversized headers (431) and body (413)
    r = bl.raw_exchange(fe.port, b"GET /live HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    assert status_of(r) == 431, r[:200]
    big = b'{"model":"mock-model","messages":[{"role":"user","content":"' + b"x" * (5 << 20) + b'"}]}'
    r = bl.raw_exchange(fe.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(big)).encode() + b"\r\n\r\n" + big)
    assert status_of(r) == 413 and json_body(r)["error"]["code"] == "request_too_large", r[:200]
    # --- JSON and field errors
    expect_error(fe, b"{not json", 400)
    expect_error(fe, b"[1,2,3]", 400)
    expect_error(fe, json.dumps({"model": 5, "messages": []}).encode(), 400)
    expect_error(fe, json.dumps({"model": "mock-model", "messages": "hi"}).encode(), 400)
    expect_error(fe, json.dumps(bl.chat_body(max_tokens="ten")).encode(), 400)
    expect_error(fe, json.dumps(bl.chat_body(max_tokens=-5)).encode(), 400)
    expect_error(fe, json.dumps(bl.chat_body(max_tokens=10 ** 12)).encode(), 400)
    expect_error(fe, json.dumps(bl.chat_body(stream="yes")).encode(), 400)
    expect_error(fe, json.dumps(bl.chat_body(stop=["a", "b", "c", "d", "e"])).encode(), 400, param="stop")
    # stop strings are matched after every token: at most 4 of at most 1024 bytes each
    expect_error(fe, json.dumps(bl.chat_body(stop=["x" * 1025])).encode(), 400, code="invalid_value", param="stop")
    expect_error(fe, json.dumps(bl.chat_body(stop="x" * (1 << 20))).encode(), 400, param="stop")
    expect_error(fe, json.dumps(bl.chat_body(stop=["ok", "a\u0000b"])).encode(), 400, param="stop")
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=3, stop=["y" * 1024] * 4))
    assert st == 200 and b["choices"][0]["finish_reason"] == "length", (st, b)
    expect_error(fe, json.dumps(bl.chat_body(n=3)).encode(), 400)
    expect_error(fe, json.dumps({"model": "mock-model", "prompt": [-1]}).encode(), 400, "/v1/completions")
    expect_error(fe, json.dumps(bl.chat_body(model="gpt-nope")).encode(), 404, code="model_not_found", param="model")
    # invalid UTF-8 inside a JSON string: rejected as invalid JSON, never crashes
    expect_error(fe, b'{"model":"mock-model","messages":[{"role":"user","content":"\xff\xfe\xc3"}]}', 400,
                 code="invalid_json")
    # a key given twice: jansson kept the last one, a gateway in front may read the first (a
    # request that is one thing to it and another here); refused, naming the key
    dup_model = b'{"model":"nope","model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":3}'
    err = expect_error(fe, dup_model, 400, code="invalid_json")
    assert "duplicate" in err["message"] and '"model"' in err["message"], err
    dup_max = b'{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"max_tokens":5}'
    err = expect_error(fe, dup_max, 400, code="invalid_json")
    assert '"max_tokens"' in err["message"], err
    dup_role = b'{"model":"mock-model","messages":[{"role":"system","role":"user","content":"hi"}]}'
    expect_error(fe, dup_role, 400, code="invalid_json")
    # a wrong type is not absent: echo 1 or "true" was served without echo, user and metadata
    # were not looked at (OpenAI answers each with invalid_type)
    for echo in (1, "true", [True]):
        expect_error(fe, json.dumps({"model": "mock-model", "prompt": "hi", "echo": echo}).encode(), 400,
                     "/v1/completions", code="invalid_type", param="echo")
    expect_error(fe, json.dumps({"model": "mock-model", "prompt": "hi", "echo": True}).encode(), 400,
                 "/v1/completions", code="unsupported_value", param="echo")
    for fld, val in (("user", 5), ("user", {"id": "u"}), ("metadata", "k=v"), ("metadata", {"k": 1}),
                     ("return_token_ids", "yes"), ("continue_final_message", 1)):
        expect_error(fe, json.dumps(bl.chat_body(max_tokens=3, **{fld: val})).encode(), 400, code="invalid_type",
                     param=fld)
    # OpenAI's documented bounds: at most 16 pairs, keys of at most 64 characters, values of 512
    for md in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        expect_error(fe, json.dumps(bl.chat_body(max_tokens=3, metadata=md)).encode(), 400, code="invalid_value",
                     param="metadata")
    for extra in ({"user": "u-1", "metadata": {f"k{i}": "v" for i in range(16)}},
                  {"metadata": {"k" * 64: "é" * 512}}, {"user": None, "metadata": None, "echo": None}):
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=3, **extra))
        assert st == 200, (extra, st, b)
    for echo in (False, None):
        st, _, b = bl.post_json(fe.url + "/v1/completions", {"model": "mock-model", "prompt": "hi", "max_tokens": 3,
                                                            "echo": echo})
        assert st == 200, (echo, st, b)
    # an assistant's refusal part (OpenAI's schema) is its text: read as the same words in a text
    # part would be (it was a 400); on another role it is not in the schema
    def prompt_tokens(part):
        msgs = [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": [part]},
                {"role": "user", "content": "please"}]
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions",
                                {"model": "mock-model", "messages": msgs, "max_tokens": 2})
        assert st == 200, (part, st, b)
        return b["usage"]["prompt_tokens"]
    words = "I cannot help with that one"
    refused = prompt_tokens({"type": "refusal", "refusal": words})
    assert refused == prompt_tokens({"type": "text", "text": words}) > prompt_tokens({"type": "text", "text": ""}), \
        refused
    user_refusal = {"model": "mock-model", "messages": [{"role": "user", "content": [
        {"type": "refusal", "refusal": "no"}]}]}
    expect_error(fe, json.dumps(user_refusal).encode(), 400, param="messages.[0].content.[0].type")
    bad_refusal = {"model": "mock-model", "messages": [{"role": "assistant", "content": [{"type": "refusal"}]},
                                                       {"role": "user", "content": "hi"}]}
    expect_error(fe, json.dumps(bad_refusal).encode(), 400, code="invalid_type", param="messages.[0].content.[0]")
    # a seed past 2^63 - 1 cannot be held: named, not "invalid JSON"
    err = expect_error(fe, json.dumps(bl.chat_body(max_tokens=3, seed=2 ** 64)).encode(), 400, param="seed")
    assert "'seed'" in err["message"], err
    # the operator's bodies too: which of two values would take is a guess
    for path, raw_body in (("/admission", b'{"queue_max_requests":5,"queue_max_requests":6}'),
                           ("/busy_threshold", b'{"model":"mock-model","model":"other",'
                                               b'"active_prefill_tokens_threshold":7}')):
        st, _, data = post_raw(fe, raw_body, path)
        assert st == 422 and "duplicate" in json.loads(data)["error"], (path, st, data)
    st, _, g = bl.get_json(fe.url + "/admission")
    assert st == 200 and g["queue_max_requests"] != 5 and g["queue_max_requests"] != 6, g
    st, _, data = post_raw(fe, b'{"mode":"kill","mode":"stop"}', "/v1/requests/nope/cancel")
    assert st == 400 and json.loads(data)["error"]["param"] == "mode", (st, data)
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
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
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
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
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
    # --- the worker bounds stop strings itself: a raw frontend that skips the frontend's check
    fr, _ = rpc_request(w.rpc_port, bl.chat_body(max_tokens=3, stop=["z" * 4096] * 4))
    errs = [p for t, st, p in fr if t == 5 and st == 1]
    assert errs and struct.unpack(">H", errs[0][:2])[0] == 1 and b"stop string" in errs[0], fr
    fr, _ = rpc_request(w.rpc_port, bl.chat_body(max_tokens=3, stop=["z" * 1024] * 4))
    assert any(t == 4 and st == 1 for t, st, _ in fr), f"a stop string of 1024 bytes was not served: {fr}"
    # --- a chat role or content part type holding U+0000 would reach the engines as its prefix
    # ("user\u0000x" as "user"): the worker refuses it, as the frontend does, and not migratable
    nul_role = [{"role": "user\u0000x", "content": "hi"}]
    nul_type = [{"role": "user", "content": [{"type": "text\u0000image", "text": "hi"}]}]
    for msgs, what in ((nul_role, b"messages[0].role"), (nul_type, b"messages[0].content[0].type")):
        fr, _ = rpc_request(w.rpc_port, bl.chat_body(max_tokens=3, messages=msgs))
        errs = [p for t, st, p in fr if t == 5 and st == 1]
        assert errs and not any(t == 4 for t, _, _ in fr), f"{what} with U+0000 was served: {fr}"
        # code 1, BT_ERR_INVALID: not migratable, the frontend would not try another worker
        assert struct.unpack(">H", errs[0][:2])[0] == 1 and what + b" must not contain U+0000" in errs[0], errs
    assert "must not contain U+0000" in w.proc.log_text(), w.proc.log_tail()
    for msgs in ([{"role": "user", "content": "hi"}], [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]):
        fr, _ = rpc_request(w.rpc_port, bl.chat_body(max_tokens=3, messages=msgs))
        assert any(t == 4 and st == 1 for t, st, _ in fr), f"{msgs} was not served: {fr}"
    # --- a HELLO must announce the opposite role: a worker takes frontends (1) only
    for role in (2, 3, 0xFFFF):
        fr, closed = rpc_request(w.rpc_port, bl.chat_body(max_tokens=3), role=role, timeout=5)
        assert closed and not any(st == 1 for _, st, _ in fr), f"HELLO with role {role}: served {fr}"
        if role != 2:
            assert f"announced role {role} in its HELLO" in w.proc.log_text(), w.proc.log_tail()
    fr, closed = rpc_request(w.rpc_port, None, role=1, wait_for=(), timeout=1.5)
    assert not closed and fr and fr[0][0] == 1, f"a frontend's HELLO was refused: closed={closed} {fr}"
    assert w.proc.alive()
    still_serving(fe)

with bl.Cluster() as c:
    # --- API key on the frontend: 401 with JSON, probes stay open
    fe = c.start_frontend(api_key="sekrit")
    c.start_worker(speedup_ratio=1000)
    c.wait_workers(fe, 1)
    st, hdrs, data = post_raw(fe, json.dumps(bl.chat_body()).encode())
    assert st == 401 and json.loads(data)["error"]["code"] == "invalid_api_key", (st, data)
    assert hdrs.get("www-authenticate", "").startswith("Bearer"), hdrs
    # the key is compared whole (constant time); the scheme is case-insensitive
    for auth in ("Bearer wrong", "Bearer sekri", "Bearer sekrit2", "Bearer  sekri", "Basic sekrit", "sekrit",
                 "Bearer", "Bearer "):
        st, hdrs, data = bl.request("POST", fe.url + "/v1/chat/completions", json.dumps(bl.chat_body()).encode(),
                                    {"Content-Type": "application/json", "Authorization": auth})
        assert st == 401 and hdrs.get("www-authenticate", "").startswith("Bearer"), (auth, st, hdrs)
    for auth in ("Bearer sekrit", "bearer sekrit", "BEARER sekrit", "Bearer   sekrit"):
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=3),
                                headers={"Authorization": auth})
        assert st == 200, (auth, st, b)
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
    # the refused frontends back off (50 ms doubling to 2 s): a few attempts, not 20 a second
    before = w.proc.log_text().count("failed authentication")
    time.sleep(4)
    tries = w.proc.log_text().count("failed authentication") - before
    assert tries <= 6, f"the frontend with the wrong secret tried {tries} times in 4 s"
    print(f"a frontend with the wrong secret tried {tries} times in 4 s")
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
with bl.Cluster() as c:
    # --- connections over --max-connections: each refused with a 503, the log bounded
    fe = c.start_frontend(max_connections=4)
    # hold 4 connections the frontend has certainly accepted: each got an answer and stays open
    held = []
    for _ in range(20):
        if len(held) == 4:
            break
        h = socket.create_connection(("127.0.0.1", fe.port), timeout=5)
        h.sendall(b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        got = h.recv(4096)
        if status_of(got) == 200:
            held.append(h)
        else:  # a connection of start_frontend's readiness probe was still counted
            h.close()
    assert len(held) == 4, "could not hold 4 connections"
    t0 = time.monotonic()
    n_refused = 150
    for _ in range(n_refused):
        r = bl.raw_exchange(fe.port, b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status_of(r) == 503 and json_body(r)["error"]["code"] == "too_many_connections", r[:200]
    elapsed = time.monotonic() - t0
    for s in held:
        s.close()
    bl.wait_for(lambda: bl.request("GET", fe.url + "/live")[0] == 200, 10, what="the frontend to take connections")
    assert bl.metric_sum(bl.metrics(fe.url), "baton_frontend_http_rejections_total",
                         reason="max_connections") >= n_refused
    lines = [ln for ln in fe.proc.log_text().splitlines() if "rejecting a new one" in ln]
    assert 1 <= len(lines) <= 2 + elapsed / 10, f"{len(lines)} log lines for {n_refused} refusals in {elapsed:.1f} s"
print("test_bad_input: ok")
