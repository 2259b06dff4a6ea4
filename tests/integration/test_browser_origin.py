"""Browsers and the edges of request framing, through the real binaries:

  1. Origin (docs/security.md, "Browsers"). A web page can make a browser POST a text/plain body
     to any address with no CORS preflight; such requests carry an Origin header. On a frontend
     without --api-key they changed /admission and /busy_threshold, started generations and
     cancelled requests (200). Now a request with an Origin not listed in --allowed-origins is a
     403 origin_not_allowed (OpenAI's error shape, naming the flag) and changes nothing, on every
     route but GET/HEAD of /live, /health and /metrics; the same requests without Origin are
     served as before. A listed origin (the flag or its twin BATON_ALLOWED_ORIGINS, or `*`) is
     served with Access-Control-Allow-Origin and Vary: Origin, and its preflights (OPTIONS with
     Access-Control-Request-Method) get a 204 with the methods and headers it may use, also
     without the API key (a browser sends none on a preflight), while its real requests still
     need the key. An --allowed-origins that is not a list of origins is a start-up error (2);
     `baton run` forwards the flag to its frontend.
     A worker's status server refuses POST /rebalance with an Origin (403), and serves its probes.
  2. Expect: 100-continue is answered only after the key and the Origin are checked: a client
     without the key gets its 401 (and one from an origin not listed its 403) at once, with the
     connection closed, instead of a 100 asking for its body; with the key, the 100 comes.
  3. A transfer coding other than chunked alone ("gzip, chunked", also over two header lines) is a
     501 not_implemented naming it (it was read as chunked: the still-gzipped body became a 400
     invalid JSON); a chunk size past 64 bits is a 400 saying so (it said "invalid character in
     content-length header").
  4. POST /admission and /busy_threshold with a field they do not know (a typo such as
     queue_max_request) are a 422 naming it, and change nothing (they answered 200).
"""

import json
import os
import socket
import subprocess

import batonlib as bl

bl.deadline(150, "test_browser_origin")
BIN = bl.baton_bin()
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "BATON_", "NATS_", "ETCD_"))}
EVIL = "http://evil.example"
APP = "https://app.example:8443"


def exchange(port, data, timeout=5.0):
    """Sends data on a fresh connection; returns (status, headers, body, the whole reply)."""
    out = bl.raw_exchange(port, data, timeout=timeout)
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split() if lines else []
    status = int(parts[1]) if len(parts) > 1 else None
    hdrs = {ln.split(":", 1)[0].strip().lower(): ln.split(":", 1)[1].strip() for ln in lines[1:] if ":" in ln}
    return status, hdrs, body, out


def text_post(path, body, origin=None, extra=b""):
    """What a page's fetch(url, {method: "POST", body}) sends: text/plain, no preflight."""
    data = body.encode() if isinstance(body, str) else body
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain;charset=UTF-8\r\n" +
            (b"Origin: " + origin.encode() + b"\r\n" if origin else b"") + extra +
            b"Content-Length: " + str(len(data)).encode() + b"\r\nConnection: close\r\n\r\n" + data)


def error_of(body):
    j = json.loads(body)
    return j["error"]


def admission(fe, key=None):
    st, _, b = bl.request("GET", fe.url + "/admission", headers={"Authorization": f"Bearer {key}"} if key else None)
    assert st == 200, (st, b[:200])
    return json.loads(b)


def thresholds(fe):
    st, _, b = bl.request("GET", fe.url + "/busy_threshold")
    assert st == 200, (st, b[:200])
    return json.loads(b)["thresholds"]


with bl.Cluster() as c:
    fe = c.start_frontend()
    app = c.start_frontend(allowed_origins=f"{APP}, http://localhost:3000, chrome-extension://abcdefghij",
                           api_key="sekrit")
    star = c.start_frontend(env={"BATON_ALLOWED_ORIGINS": "*"})
    w = c.start_worker(speedup_ratio=20, system_port=True, wait=True, rebalance_endpoint=True)
    c.wait_workers(fe, 1)
    c.wait_workers(app, 1)
    c.wait_workers(star, 1)
    chat = "/v1/chat/completions"
    gen = json.dumps(bl.completion_body("cross-site", max_tokens=3))

    # ---- 1. an Origin not listed: 403 before anything runs, nothing changed
    before = admission(fe)
    for path, body in (("/admission", '{"queue_timeout":1}'), ("/busy_threshold",
                       '{"model":"mock-model","active_decode_blocks_threshold":0.5}'),
                       ("/v1/completions", gen), (chat, json.dumps(bl.chat_body("x", max_tokens=2))),
                       ("/v1/requests/some-id/cancel", '{"mode":"kill"}')):
        st, hdrs, b, _ = exchange(fe.port, text_post(path, body, EVIL))
        assert st == 403, (path, st, b[:300])
        e = error_of(b)
        assert e["code"] == "origin_not_allowed" and e["type"] == "invalid_request_error", (path, e)
        assert "--allowed-origins" in e["message"] and EVIL in e["message"], e
        assert "access-control-allow-origin" not in hdrs, hdrs
    assert admission(fe) == before, (admission(fe), before)
    assert all(t["active_decode_blocks_threshold"] is None for t in thresholds(fe)), thresholds(fe)
    # GETs other than the probes follow the rule too; the probes and /metrics are exempt
    st, _, b = bl.request("GET", fe.url + "/v1/models", headers={"Origin": EVIL})
    assert st == 403, (st, b[:200])
    for path in ("/live", "/health", "/metrics"):
        st, hdrs, b = bl.request("GET", fe.url + path, headers={"Origin": EVIL})
        assert st == 200 and "access-control-allow-origin" not in hdrs, (path, st, hdrs)
    # a preflight from it gets the 403 as well (no allow headers)
    pre = b"OPTIONS /admission HTTP/1.1\r\nHost: localhost\r\nOrigin: " + EVIL.encode() + \
        b"\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
    st, hdrs, b, _ = exchange(fe.port, pre)
    assert st == 403 and "access-control-allow-methods" not in hdrs, (st, hdrs)

    # ---- without Origin, as before (curl, SDKs)
    st, _, b, _ = exchange(fe.port, text_post("/admission", '{"queue_timeout":1}'))
    assert st == 200 and json.loads(b)["queue_timeout"] == 1, (st, b[:200])
    st, _, b, _ = exchange(fe.port, text_post("/v1/completions", gen))
    assert st == 200 and json.loads(b)["choices"], (st, b[:200])

    # ---- a listed origin: CORS headers, preflights, and the key still needed
    pre = b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nOrigin: " + APP.encode() + \
        b"\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type" \
        b"\r\nConnection: close\r\n\r\n"
    st, hdrs, b, _ = exchange(app.port, pre)
    assert st == 204, (st, hdrs, b[:200])
    assert hdrs.get("access-control-allow-origin") == APP and "Origin" in hdrs.get("vary", ""), hdrs
    assert "POST" in hdrs.get("access-control-allow-methods", ""), hdrs
    allow_h = hdrs.get("access-control-allow-headers", "").lower()
    assert "authorization" in allow_h and "content-type" in allow_h, hdrs
    assert "Access-Control-Request-Headers" in hdrs.get("vary", ""), hdrs
    # the headers a client library adds (the openai SDK's X-Stainless-*, OpenAI-Organization) are
    # allowed as asked: a fixed list would make the browser block the SDK's every request
    sdk = "authorization, content-type, x-stainless-retry-count, x-stainless-lang, openai-organization"
    pre_sdk = pre.replace(b"authorization, content-type", sdk.encode())
    st, hdrs, b, _ = exchange(app.port, pre_sdk)
    assert st == 204 and hdrs.get("access-control-allow-headers") == sdk, (st, hdrs)
    # a list that is not header names gets the fixed list instead of an echo
    st, hdrs, b, _ = exchange(app.port, pre.replace(b"authorization, content-type", b"x-a x-b, (bad)"))
    assert st == 204 and hdrs.get("access-control-allow-headers", "").startswith("Authorization, Content-Type"), hdrs
    # with origins listed, an answer to a request without Origin says it varies by Origin too
    st, hdrs, b = bl.request("GET", app.url + "/v1/models", headers={"Authorization": "Bearer sekrit"})
    assert st == 200 and hdrs.get("vary") == "Origin" and "access-control-allow-origin" not in hdrs, (st, hdrs)
    st, hdrs, b = bl.request("GET", fe.url + "/v1/models")
    assert st == 200 and "vary" not in hdrs, (st, hdrs)
    # an extension's (or a desktop app's) origin may be listed: any scheme a browser sends
    st, hdrs, b, _ = exchange(app.port, pre.replace(APP.encode(), b"chrome-extension://abcdefghij"))
    assert st == 204 and hdrs.get("access-control-allow-origin") == "chrome-extension://abcdefghij", (st, hdrs)
    st, hdrs, b = bl.request("POST", app.url + chat, bl.chat_body("cors", max_tokens=2),
                             headers={"Origin": APP})
    assert st == 401 and hdrs.get("access-control-allow-origin") == APP, (st, hdrs, b[:200])
    st, hdrs, b = bl.request("POST", app.url + chat, bl.chat_body("cors", max_tokens=2),
                             headers={"Origin": APP, "Authorization": "Bearer sekrit"})
    assert st == 200 and hdrs.get("access-control-allow-origin") == APP, (st, hdrs, b[:200])
    assert "Origin" in hdrs.get("vary", "") and hdrs.get("access-control-expose-headers") == "X-Request-Id, Retry-After", hdrs
    # a streamed answer carries them too
    st, hdrs, b = bl.request("POST", app.url + chat, bl.chat_body("cors", max_tokens=2, stream=True),
                             headers={"Origin": "http://localhost:3000", "Authorization": "Bearer sekrit"})
    assert st == 200 and hdrs.get("access-control-allow-origin") == "http://localhost:3000", (st, hdrs)
    assert b"[DONE]" in b, b[-200:]
    # matching is exact: another port, scheme or a path is another origin
    for other in ("https://app.example", "http://app.example:8443", "https://app.example:8443.evil.example"):
        st, _, b = bl.request("GET", app.url + "/v1/models", headers={"Origin": other,
                                                                      "Authorization": "Bearer sekrit"})
        assert st == 403, (other, st, b[:200])
    # `*` (here through the environment twin): any origin, named back
    st, hdrs, b, _ = exchange(star.port, text_post("/admission", '{"queue_timeout":2}', EVIL))
    assert st == 200 and hdrs.get("access-control-allow-origin") == EVIL, (st, hdrs, b[:200])

    # ---- a bad --allowed-origins is a start-up error
    for bad in ("https://app.example/", "app.example", "null", "https://a.example:x", " , "):
        r = subprocess.run([BIN, "frontend", "--http-port", "0", "--allowed-origins", bad], env=CLEAN_ENV,
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 2 and "--allowed-origins" in r.stderr, (bad, r.returncode, r.stderr[-400:])

    # ---- `baton run` forwards the flag to its frontend
    run = c.start_run(workers=1, speedup_ratio=50, allowed_origins=APP, system_port=-1)
    st, hdrs, b, _ = exchange(run.port, text_post("/admission", '{"queue_timeout":4}', EVIL))
    assert st == 403, ("baton run, an origin not listed", st, b[:200])
    st, hdrs, b, _ = exchange(run.port, text_post("/admission", '{"queue_timeout":4}', APP))
    assert st == 200 and hdrs.get("access-control-allow-origin") == APP, ("baton run, listed", st, hdrs)

    # ---- the worker's status server: no POST from a page
    wport = w.system_port
    st, _, b, _ = exchange(wport, text_post("/rebalance?streams=1", "", EVIL))
    assert st == 403, (st, b[:200])
    st, _, b, _ = exchange(wport, text_post("/rebalance?streams=1", ""))
    assert st == 200 and "moved" in json.loads(b), (st, b[:200])
    st, _, b = bl.request("GET", w.system_url + "/metrics", headers={"Origin": EVIL})
    assert st == 200, st

    # ---- 2. Expect: 100-continue is answered after the key and the Origin are checked
    def expect(port, path, extra=b""):
        """Headers only, announcing a 1 MiB body; what the server says before any of it."""
        s = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        try:
            s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" +
                      extra + b"Expect: 100-continue\r\nContent-Length: 1048576\r\n\r\n")
            s.settimeout(3.0)
            out = b""
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return out, True
                    out += chunk
                    if out.startswith(b"HTTP/1.1 100 ") and out.endswith(b"\r\n\r\n"):
                        return out, False
            except socket.timeout:
                return out, False
        finally:
            s.close()

    out, closed = expect(app.port, chat)
    assert out.startswith(b"HTTP/1.1 401 ") and closed, ("no key, Expect", out[:300], closed)
    assert b"invalid_api_key" in out and b"Connection: close" in out, out[:400]
    out, closed = expect(app.port, "/admission", b"Authorization: Bearer wrong\r\n")
    assert out.startswith(b"HTTP/1.1 401 ") and closed, ("a wrong key, Expect", out[:300])
    out, closed = expect(fe.port, "/admission", b"Origin: " + EVIL.encode() + b"\r\n")
    assert out.startswith(b"HTTP/1.1 403 ") and closed and b"origin_not_allowed" in out, out[:300]
    out, closed = expect(app.port, chat, b"Authorization: Bearer sekrit\r\n")
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n") and not closed, ("the key, Expect", out[:300])
    # and a small body after the 100 is served whole
    data = json.dumps(bl.chat_body("expect", max_tokens=2)).encode()
    s = socket.create_connection(("127.0.0.1", app.port), timeout=5.0)
    try:
        s.sendall(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer sekrit\r\n"
                  b"Origin: " + APP.encode() + b"\r\nExpect: 100-continue\r\nContent-Length: " +
                  str(len(data)).encode() + b"\r\nConnection: close\r\n\r\n")
        interim = s.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim[:200]
        s.sendall(data)
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    finally:
        s.close()
    final = (interim + rest).split(b"\r\n\r\n", 1)[1]
    assert final.startswith(b"HTTP/1.1 200 "), final[:300]
    assert final.count(b"Access-Control-Allow-Origin: ") == 1 and \
        ("Access-Control-Allow-Origin: " + APP).encode() in final, final[:400]  # once: the gate ran twice

    # ---- 3. transfer codings
    gz = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae\x05\x00\x43\xbf\xa6\xa3\x02\x00\x00\x00"  # "{}"
    chunked_gz = f"{len(gz):x}".encode() + b"\r\n" + gz + b"\r\n0\r\n\r\n"
    for te in (b"Transfer-Encoding: gzip, chunked\r\n", b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"):
        st, hdrs, b, _ = exchange(fe.port, b"POST /admission HTTP/1.1\r\nHost: localhost\r\n" + te +
                                  b"Connection: close\r\n\r\n" + chunked_gz)
        assert st == 501, (te, st, b[:300])
        e = error_of(b)
        assert e["code"] == "not_implemented" and "gzip" in e["message"], e
    st, _, b, _ = exchange(fe.port, b"POST /admission HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                                    b"Connection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert st == 200, (st, b[:200])
    st, _, b, _ = exchange(fe.port, b"POST /admission HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                                    b"Connection: close\r\n\r\nFFFFFFFFFFFFFFFFFF\r\n{}\r\n0\r\n\r\n")
    assert st == 400, (st, b[:200])
    msg = error_of(b)["message"]
    assert "chunk size" in msg and "content-length" not in msg.lower(), msg

    # ---- 4. unknown fields
    before = admission(fe)
    for body in ({"bogus": 1}, {"queue_max_request": 5}, {"queue_timeout": 3, "queue_max_request": 5}):
        st, _, j = bl.post_json(fe.url + "/admission", body)
        bad = [k for k in body if k != "queue_timeout"][0]
        assert st == 422 and f"'{bad}'" in j["error"] and "queue_max_requests" in j["error"], (body, st, j)
    assert admission(fe) == before, (admission(fe), before)
    st, _, j = bl.post_json(fe.url + "/busy_threshold", {"model": "mock-model", "active_decode_block_threshold": 0.4})
    assert st == 422 and "'active_decode_block_threshold'" in j["error"], (st, j)
    assert all(t["active_decode_blocks_threshold"] is None for t in thresholds(fe)), thresholds(fe)
    st, _, j = bl.post_json(fe.url + "/busy_threshold", {"model": "mock-model", "active_decode_blocks_threshold": 0.4})
    assert st == 200 and j["active_decode_blocks_threshold"] == 0.4, (st, j)

print("test_browser_origin: ok")
