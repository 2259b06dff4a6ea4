"""Edges of the frontend's HTTP surface, through the real binaries, each a case an earlier build got
wrong:

  * a stream whose body holds U+0000 (valid JSON, accepted: docs/security.md) resumes like any
    other: by a re-POST with Last-Event-ID and by the GET form, with exactly the rest of its events
    (the resume parsed the body without JSON_ALLOW_NUL: 400 "invalid JSON body" and 500
    "out of memory"); a re-POST whose body has a key twice is a 400 invalid_json naming it, as the
    first POST would be (it resumed when the last value matched the original's);
  * header values lose their trailing whitespace (RFC 9110 §5.5: it is not part of the value):
    `X-Priority: 3 `, `X-Request-Id: id `, `Authorization: Bearer KEY ` and `Last-Event-ID: ID `
    work as without it (they were a 400, a fresh id, a 401 and a 400), and so does
    `Expect: 100-continue ` (read before the others were trimmed: no interim 100);
  * whitespace between a header's name and its colon is a 400 malformed_request with the
    connection closed (RFC 9112 §5.1: a server MUST reject it; one that reads such a line one way
    while a proxy reads it another is open to request smuggling);
  * an HTTP/1.1 request without a Host header, or any request with more than one, is a 400
    malformed_request with the connection closed (RFC 9112 §3.2: MUST; they were served); an
    HTTP/1.0 request without Host is served, as is an empty Host (a target without an authority);
  * a request line of another major version than HTTP/1 (HTTP/2.0, HTTP/0.5) is a 505 with the
    connection closed, and one without a version (HTTP/0.9) a 400 (both were served as 1.1);
  * a header line that starts with a space or tab (obsolete line folding, RFC 9112 §5.2) is a 400
    with the connection closed, however the bytes arrive: `Transfer-Encoding:` folded onto
    ` chunked` was read as chunked, where a proxy may read it otherwise;
  * a bare CR in the framing (ending the header section, a chunk-size line or the trailers, before
    the request line), chunk data followed by two bytes other than CRLF, a bare LF in a chunk
    extension: a 400 malformed_request with the connection closed, on the frontend and a
    worker's status server (http-parser took any byte after a CR for its LF, any two after chunk
    data for CRLF, and served the request pipelined behind); an HTTP/1.0 request with
    Transfer-Encoding is answered with Connection: close and its connection closed (RFC 9112
    §6.1: MUST; it was kept open and the request behind served);
  * a Transfer-Encoding without chunked last (`identity`, `gzip`, `chunked, gzip`) is a 400 (RFC
    9112 §6.3: the body's length cannot be known), and one beside a Content-Length a 400 saying
    so (it said "unexpected content-length header");
  * refused resumes (404 unknown id, 400 malformed Last-Event-ID) are not logged at the default
    level, as every client error (they were an INFO line each);
  * two Authorization or two X-Tenant lines in one request are a 400 malformed_request with the
    connection closed (the last one was used: a proxy checking the first and the frontend reading
    the last saw two different callers);
  * request bodies being received at once over all connections are capped
    (--max-body-bytes-total): past it a body, declared or chunked, is a 503 too_many_request_bytes
    with Retry-After and the connection closed; closes and dispatched requests give their charge back (each connection could hold up to
    --max-body-bytes, 80 GB over 20,000 connections at the defaults);
  * response bytes queued for clients at once are capped over all connections
    (--max-output-bytes-total): streaming clients that never read are cut, the largest backlog
    first, as client disconnects (counted as output_budget), the frontend's RSS stays bounded, a
    reading client's stream meanwhile is exact, and a cut one resumes with Last-Event-ID (each
    could queue --max-client-backlog-bytes, 8 MiB: 160 GB over 20,000 connections); with
    --threads 2 the largest backlog of either event loop is cut: a client that reads late on one
    loop, its backlog passing the total held by clients that never read on the other, is served
    whole and one of theirs is cut (each loop saw only its own connections: the reader was cut);
  * a 405 names the methods the path takes in an Allow header (RFC 9110 §15.5.6: MUST);
  * POST /busy_threshold with an unknown model whose long name is cut inside a UTF-8 character
    answers its 404 error message (the body was "{}");
  * `top_p` (read by the llama engine and the mocker) of the wrong type or outside [0, 1] is a 400 naming it, as
    `temperature` is (it was ignored: "0.9" sampled as top_p 1); null and 0..1 pass.
"""

import http.client
import json
import math
import socket
import threading
import time

import batonlib as bl

bl.deadline(300, "test_http_edges")


def raw(port, data, timeout=5.0):
    """Sends data on a fresh connection; returns (status, headers, body bytes, closed by server)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    out, closed = b"", False
    try:
        s.sendall(data)
        while True:
            if b"\r\n\r\n" in out:
                head, rest = out.split(b"\r\n\r\n", 1)
                cl = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                if cl and len(rest) >= int(cl[0].split(b":")[1]):
                    # the answer is whole: does the server close after it?
                    s.settimeout(1.0)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                closed = True
                break
            out += chunk
    except ConnectionResetError:
        closed = True
    finally:
        s.close()
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else None
    hdrs = {ln.split(":", 1)[0].strip().lower(): ln.split(":", 1)[1].strip() for ln in lines[1:] if ":" in ln}
    return status, hdrs, body, closed


def post(path, body, extra=b""):
    data = json.dumps(body).encode()
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: " + str(len(data)).encode() + b"\r\nConnection: close\r\n\r\n" + data)


def sse_text(raw_body):
    """The concatenated content of the chunked SSE body's data events, and whether [DONE] came."""
    text, done, buf, rest = "", False, b"", raw_body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        buf += rest[:size]
        rest = rest[size + 2:]
    for ln in buf.decode().split("\n"):
        if not ln.startswith("data: "):
            continue
        if ln == "data: [DONE]":
            done = True
            continue
        ch = json.loads(ln[6:])["choices"]
        if ch:
            text += ch[0]["delta"].get("content", "")
    return text, done


def sse_events(raw_bytes):
    """The whole SSE events (id, data) of a chunked body cut anywhere."""
    parts, rest = [], raw_bytes.partition(b"\r\n\r\n")[2]
    pos = 0
    while pos < len(rest):
        eol = rest.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(rest[pos:eol], 16)
        if size == 0:
            break
        parts.append(rest[eol + 2:eol + 2 + size])  # a chunk cut short: what came of it
        pos = eol + 2 + size + 2
    out = []
    for ev in b"".join(parts).split(b"\n\n")[:-1]:  # the last piece is not known to be whole
        eid = data = None
        for ln in ev.decode().split("\n"):
            if ln.startswith("id: "):
                eid = ln[4:]
            elif ln.startswith("data: "):
                data = ln[6:]
        out.append((eid, data))
    return out


def recv_until_done(s):
    """What socket s gives until the stream's data: [DONE], its end, a reset or its timeout."""
    got = b""
    while b"data: [DONE]\n\n" not in got[-4096:]:
        try:
            chunk = s.recv(1 << 20)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        got += chunk
    return got


def texts(events):
    t = ""
    for _, d in events:
        if d and d != "[DONE]":
            ch = json.loads(d)["choices"]
            if ch:
                t += ch[0]["delta"].get("content") or ""
    return t


def loop_requests(f):
    """Requests received by each event loop of a --threads frontend: {"0": n, "1": m}."""
    m = bl.metrics(f.url)
    return {bl.parse_labels(k[k.index("{"):])["thread"]: v for k, v in m.items()
            if k.startswith("baton_frontend_thread_requests_total{")}


def framing(port, post_path, body, post_status):
    """Framing of port's HTTP server that http-parser's lenient build misread, each followed by a
    pipelined GET /live: a bare CR, or any two bytes in place of a CRLF, in the header section,
    a chunk-size line, after chunk data, in the trailers or before the request line, which it
    took for the CRLF, and served what followed as a request of its own (a proxy in front may
    read those bytes otherwise: request smuggling). Each is a 400 malformed_request naming it,
    the connection closed and the request behind it never answered; split across reads too. The
    same bytes framed right are served, the request behind too. An HTTP/1.0 request with
    Transfer-Encoding is answered with Connection: close and its connection closed (RFC 9112
    §6.1: MUST; it was kept open and the next request served), one with Content-Length is not."""
    get = b"GET /live HTTP/1.1\r\nHost: localhost\r\n"
    nxt = get + b"Connection: close\r\n\r\n"
    te = (b"POST " + post_path + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
          b"Transfer-Encoding: chunked\r\n\r\n")
    size = b"%x" % len(body)
    bare_cr = "a CR not followed by LF"
    cases = [(te + size + b"\r\n" + body + b"XY0\r\n\r\n", "chunk data not followed by CRLF"),
             (get + b"\rX", bare_cr),
             (te + size + b"\rX" + body + b"\r\n0\r\n\r\n", bare_cr),
             (te + size + b"\r\n" + body + b"\r\n0\r\n\rX", bare_cr),
             (get + b"X-A: 1\rX-B: 2\r\n\r\n", bare_cr),
             (b"\r" + get + b"\r\n", bare_cr),
             (te + size + b";a\nb\r\n" + body + b"\r\n0\r\n\r\n", "chunk-size line")]
    for req, why in cases:
        st, _, b, closed = raw(port, req + nxt)
        assert st == 400 and closed and b"HTTP/1." not in b, (port, req[-40:], st, b[:300], closed)
        err = json.loads(b)["error"]
        assert err["code"] == "malformed_request" and why in err["message"], (port, req[-40:], err)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    for piece in (te + size + b"\r", b"\n" + body + b"\r", b"\n0\r\n\r", b"X" + nxt):
        s.sendall(piece)
        time.sleep(0.05)
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    assert got.startswith(b"HTTP/1.1 400 ") and got.count(b"HTTP/1.") == 1 and bare_cr.encode() in got, got[:300]
    good = bl.raw_exchange(port, te + size + b"\r\n" + body + b"\r\n0\r\nX-T: 1\r\n\r\n" + nxt)
    answers = good.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 2 and answers[0].startswith(b"%d " % post_status) and answers[1].startswith(b"200 "), \
        (port, good[:600])
    h10 = (b"POST " + post_path + b" HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n"
           b"Connection: keep-alive\r\n")
    st, hdrs, b, closed = raw(port, h10 + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" + body +
                              b"\r\n0\r\n\r\n" + nxt)
    assert st == post_status and hdrs.get("connection") == "close" and closed and b"HTTP/1." not in b, \
        (port, st, hdrs, b[:300], closed)
    kept = bl.raw_exchange(port, h10 + b"Content-Length: %d\r\n\r\n" % len(body) + body + nxt)
    answers = kept.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 2 and b"Connection: keep-alive" in answers[0] and answers[1].startswith(b"200 "), \
        (port, kept[:600])


def output_budget_threads(c):
    """--max-output-bytes-total with --threads 2: each loop sees only its own connections, and a
    client that reads, queueing a burst on one loop while the total is held by clients that do not
    read on the other, was the one cut (the largest backlog of its own loop). The largest of every
    loop is cut, by its own loop; the reader's stream is whole.

    Non-reading clients hold 0.8 of the total or so on one loop (their streams end: what they
    hold then stays put), and a client on the other loop leaves its stream unread until it has been
    sent: its own backlog passes the total while it is smaller than the largest of theirs. The kernel
    puts each connection on a loop by a hash of its addresses: connections are opened until five
    are on one loop and one on the other, each told apart by a request the frontend refuses at once
    (a 400 counted on the loop that received it)."""
    CAP = 2 << 20
    # the clients that come last wait through the fill, which takes minutes on a loaded machine:
    # the default idle timeout (60 s) would close them first, and their request wait in vain
    tf = c.start_frontend(threads=2, max_output_bytes_total=CAP, http_idle_timeout_ms=600_000)
    c.wait_workers(tf, 1)

    def tf_metric(name, **labels):
        return bl.metric_sum(bl.metrics(tf.url), name, **labels)

    def open_conn():
        """A connection with a small receive window, and the loop that holds it."""
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        s.settimeout(10)
        s.connect(("127.0.0.1", tf.port))
        before = loop_requests(tf)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1\r\n\r\n{")
        got = b""
        while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < int(
                got.lower().partition(b"content-length:")[2].split(b"\r\n")[0]):
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 400 "), got[:200]
        after = loop_requests(tf)
        grew = [k for k in after if after[k] > before.get(k, 0)]
        assert len(grew) == 1, (before, after)
        return s, grew[0]

    HOG_CONNS = 5
    hogs, hog_loop, reader, reader_loop = [], None, None, None
    for _ in range(64):
        s, k = open_conn()
        if hog_loop is None:
            hog_loop = k
        if k == hog_loop and len(hogs) < HOG_CONNS:
            hogs.append(s)
        elif k != hog_loop and reader is None:
            reader, reader_loop = s, k
        else:
            s.close()
        if len(hogs) == HOG_CONNS and reader:
            break
    assert len(hogs) == HOG_CONNS and reader, "64 connections, and not 5 on one loop and 1 on the other"
    cut0 = tf_metric("baton_frontend_http_rejections_total", reason="output_budget")

    def send(s, max_tokens, prompt="a client that never reads"):
        data = json.dumps(bl.chat_body(prompt, max_tokens=max_tokens, stream=True)).encode()
        done = sent_all(1)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        bl.wait_for(done, 90, 0.1, "a stream sent to its end (or cut)")
        return tf_metric("baton_frontend_http_output_queued_bytes")

    def sent_all(n):
        """n more requests received than before, and none running."""
        seen0 = sum(loop_requests(tf).values())
        return lambda: (sum(loop_requests(tf).values()) >= seen0 + n and
                        tf_metric("dynamo_frontend_inflight_requests") == 0)

    # Non-reading clients on one loop fill the total to between CAP - 0.7 B and CAP - 0.3 B, each
    # holding up to B = 0.35 of it. What a request of n tokens adds is not known in advance: the
    # worker sends the tokens due at each of its ticks in one frame, an SSE event each with its own
    # overhead, so bytes per token follow the machine's pace (on a loaded machine a probe's figure
    # was a quarter low at the next requests, which filled 2.0 MB for a 1.73 MB aim). The fill
    # goes in steps, each at most half of what is left below CAP - 0.3 B, so that it passes that
    # only if a step's bytes per token were twice the estimate, which each step on a connection
    # whose kernel buffers are already full measures again. A connection's first request fills
    # those (SEND_BUF or so: TCP_MAXSEG keeps them small, a 64 KiB loopback MSS made them
    # megabytes) and adds what they did not take, so it is kept as small as the next step.
    # The estimate can be more than twice too low (a probe read while the machine was busiest
    # batched more tokens per event than the step after it: a hog was cut in the fill), so no step
    # asks for more tokens than could fill what is left below CAP - 0.3 B at the most bytes a token
    # can cost, whatever the batching: an SSE event of its own (its id line, the JSON around the
    # text and the framing come to some 250 bytes, the longest token to 7), and once a request its
    # first and last events and [DONE].
    B, SEND_BUF, MOST_PER_TOKEN, MOST_PER_REQUEST = 0.35 * CAP, 200_000, 280, 1000
    LOW, HIGH = CAP - 0.6 * B, CAP - 0.3 * B
    probe = bl.stream_chat(tf.url, bl.chat_body("how big is a token", max_tokens=400, stream=True), timeout=60)
    probe.assert_ok("the probe stream")
    per_token = len(probe.raw) / 400
    held, hog_held, i, steps, seen = 0, [0] * HOG_CONNS, 0, [], []
    for _ in range(40):
        if held >= LOW or i == HOG_CONNS:
            break
        full = hog_held[i] > 0
        want = min(B - hog_held[i] if full else SEND_BUF, (HIGH - held) / 2)
        tokens = max(20, min(int(want / per_token), int((HIGH - held - MOST_PER_REQUEST) / MOST_PER_TOKEN)))
        now = send(hogs[i], tokens)
        hog_held[i] += now - held
        if full:
            per_token = (now - held) / tokens
            seen.append(per_token)
        steps.append(f"{i}:{tokens}:{now - held:.0f}")
        held = now
        # a hog cut here is a closed connection, where the next request would wait in vain
        assert tf_metric("baton_frontend_http_rejections_total", reason="output_budget") == cut0, steps
        if hog_held[i] >= 0.8 * B:
            i += 1
    used = i + (i < HOG_CONNS and hog_held[i] > 0)
    for s in hogs[used:]:
        s.close()
    hogs = hogs[:used]
    assert CAP - 0.7 * B < held < CAP - 0.3 * B and i >= 1, (held, hog_held, CAP, steps, "the test measures nothing")
    # the reader's stream passes the total when its backlog is CAP - held, under 0.6 B, smaller than
    # the largest hog's (at least 0.8 B): that one is cut. The rest then fits while the reader's
    # backlog stays under CAP - held + the largest. Its tokens are the geometric mean of the
    # fewest that pass the first at the lowest bytes per token seen and the most that stay under
    # the second at the highest (a factor 1.9 apart at least, when the bytes per token seen in the
    # fill differed by 1.7 at most on a loaded machine)
    largest, seen = max(hog_held), seen or [per_token]
    fewest = (CAP - held + SEND_BUF) / min(seen)
    most = (CAP - held + largest + SEND_BUF) / max(seen)
    good_max = int(math.sqrt(fewest * most))
    good_ref = bl.stream_chat(tf.url, bl.chat_body("a client that reads late", max_tokens=good_max, stream=True),
                              timeout=90)
    good_ref.assert_ok("the reading client's stream, alone")
    send(reader, good_max, "a client that reads late")
    cut = tf_metric("baton_frontend_http_rejections_total", reason="output_budget") - cut0

    good = sse_events(recv_until_done(reader))
    hog_events = [sse_events(recv_until_done(s)) for s in hogs]
    for s in hogs + [reader]:
        s.close()
    print(f"test_http_edges: --threads 2: {held:.0f} bytes held on loop {hog_loop} (hog:tokens:bytes "
          f"{' '.join(steps)}), the reader on loop {reader_loop} ({good_max} tokens of {fewest:.0f} to {most:.0f}); "
          f"{cut:.0f} cut")
    assert good and good[-1][1] == "[DONE]", ("the reader was cut", good[-3:])
    assert texts(good) == good_ref.text, (len(texts(good)), len(good_ref.text))
    assert cut == 1, cut
    assert sum(evs[-1][1] != "[DONE]" for evs in hog_events) == 1, [e[-1] for e in hog_events]
    assert (f"closing the connection with the largest backlog of all event loops, on this one (event loop "
            f"{hog_loop}, ") in tf.proc.log_text() and f"for a write on event loop {reader_loop}" in tf.proc.log_text()
    bl.wait_for(lambda: tf_metric("baton_frontend_http_output_queued_bytes") == 0, 10, what="the queued bytes given back")
    tf.proc.stop()


with bl.Cluster() as c:
    fe = c.start_frontend()
    keyed = c.start_frontend(api_key="sekrit")
    # tokens ~0.35 ms apart: each its own event, even with a sanitizer slowing the frontend (at a
    # faster pace the worker sends the tokens of several steps in one frame, and the stream has
    # fewer events than the resume checks below need)
    worker = c.start_worker(speedup_ratio=20, system_port=True)
    c.wait_workers(fe, 1)
    c.wait_workers(keyed, 1, timeout=30)
    chat = "/v1/chat/completions"

    # ---- a stream whose body holds U+0000 resumes, in both forms
    body = bl.chat_body("a\u0000b", max_tokens=8, stream=True)
    s = bl.stream_chat(fe.url, body)
    s.assert_ok("the stream with U+0000 in its prompt")
    ids = s.event_ids
    assert len(ids) >= 3 and s.text, s.summary()  # two with text at least, then the last
    sid = ids[0].split(":")[0]
    rest = bl.stream_sse(fe.url, chat, body, headers={"Last-Event-ID": ids[0]})
    assert rest.status == 200 and rest.done, f"re-POST resume of a U+0000 stream: {rest.summary()}"
    first = s.text[:len(s.text) - len(rest.text)]
    assert rest.text and s.text.endswith(rest.text) and first, (s.text, rest.text)
    assert rest.event_ids == ids[1:], (rest.event_ids, ids)
    full = bl.stream_sse(fe.url, f"{chat}/{sid}?starting_after=0", None, method="GET")
    assert full.status == 200 and full.done, f"GET resume of a U+0000 stream: {full.summary()}"
    assert full.text == s.text and full.event_ids == ids, (full.text, s.text, full.event_ids)
    # a re-POST with a key given twice is refused as the first POST would be, though its last
    # value is the original's (it resumed: the first value, which a proxy may have read, differs)
    dup = json.dumps(body).encode().replace(b'"max_tokens": 8', b'"max_tokens": 2, "max_tokens": 8')
    assert dup.count(b"max_tokens") == 2, dup
    st, _, b = bl.request("POST", fe.url + chat, dup, {"Content-Type": "application/json",
                                                      "Last-Event-ID": ids[0]})
    assert st == 400 and b"data:" not in b, (st, b[:300])
    err = json.loads(b)["error"]
    assert err["code"] == "invalid_json" and '"max_tokens"' in err["message"], err
    # a starting_after too long for any position is refused, not cut: 40 digits ending in 1 would
    # have been read as its first 31 zeros, the position 0 (the whole stream again)
    long_pos = "0" * 39 + "1"
    cut = bl.stream_sse(fe.url, f"{chat}/{sid}?starting_after={long_pos}", None, method="GET")
    assert cut.status == 400 and not cut.text, f"a 40-digit starting_after: {cut.summary()}"

    # ---- trailing whitespace is not part of a header's value
    ok = bl.chat_body("ows", max_tokens=2)
    st, hdrs, b, _ = raw(fe.port, post(chat, ok, b"X-Priority: 3 \t\r\n"))
    assert st == 200, ("X-Priority with trailing whitespace", st, b[:200])
    st, hdrs, b, _ = raw(fe.port, post(chat, ok, b"X-Request-Id: my-req-7  \r\n"))
    assert st == 200 and hdrs.get("x-request-id") == "my-req-7", (st, hdrs)
    assert json.loads(b)["id"] == "chatcmpl-my-req-7", b[:200]
    st, hdrs, b, _ = raw(keyed.port, post(chat, ok, b"Authorization: Bearer sekrit \r\n"))
    assert st == 200, ("Authorization with trailing whitespace", st, b[:200])
    st, _, b, _ = raw(keyed.port, post(chat, ok, b"Authorization: Bearer sekri \r\n"))
    assert st == 401, ("a wrong key with trailing whitespace", st, b[:200])
    st, hdrs, b, _ = raw(fe.port, post(chat, body, b"Last-Event-ID: " + ids[-2].encode() + b" \r\n"))
    text, done = sse_text(b)
    assert st == 200 and done and text == "", ("Last-Event-ID with trailing whitespace", st, b[:300])
    assert b"data: [DONE]" in b and ids[-1].encode() in b, b[:400]
    # `Expect: 100-continue ` is read before the request is dispatched: it too is the value
    # 100-continue, answered by an interim 100 before the body is sent
    data = json.dumps(ok).encode()
    s = socket.create_connection(("127.0.0.1", fe.port), timeout=5.0)
    try:
        s.sendall(b"POST " + chat.encode() + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue \r\nContent-Length: " + str(len(data)).encode() +
                  b"\r\nConnection: close\r\n\r\n")
        s.settimeout(3.0)
        try:
            interim = s.recv(65536)
        except socket.timeout:
            interim = b""
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), ("Expect with trailing whitespace", interim[:200])
        s.settimeout(5.0)
        s.sendall(data)
        rest = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    finally:
        s.close()
    final = (interim + rest).split(b"\r\n\r\n", 1)[1]
    assert final.startswith(b"HTTP/1.1 200 "), ("the request after its 100 Continue", final[:200])

    # ---- whitespace between a header's name and its colon: 400, connection closed
    for line in (b"X-Request-Id : abc\r\n", b"Content-Length : 5\r\n", b"Transfer-Encoding\t: chunked\r\n"):
        st, _, b, closed = raw(fe.port, post(chat, ok, line))
        assert st == 400 and closed, (line, st, b[:200], closed)
        err = json.loads(b)["error"]
        assert err["code"] == "malformed_request" and "header" in err["message"], (line, err)
    # a smuggled request inside the body of one with such a line is never answered
    smug = b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n"
    st, _, b, closed = raw(fe.port, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length : " +
                           str(len(smug)).encode() + b"\r\n\r\n" + smug)
    assert st == 400 and closed and b"Service is live" not in b, (st, b)

    # ---- Host (RFC 9112 §3.2): an HTTP/1.1 request without one, and any request with more than
    # one, is a 400 malformed_request with the connection closed; HTTP/1.0 needs none
    chat_req = post(chat, dict(ok, stream=True))
    assert chat_req.count(b"Host: localhost\r\n") == 1
    no_host = [b"GET /live HTTP/1.1\r\n\r\n", b"HEAD /live HTTP/1.1\r\nConnection: close\r\n\r\n",
               chat_req.replace(b"Host: localhost\r\n", b"")]
    two_hosts = [b"GET /live HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n",
                 b"GET /live HTTP/1.1\r\nHost: localhost\r\nhOST: x\r\n\r\n",  # names are case-insensitive
                 b"GET /live HTTP/1.0\r\nHost: localhost\r\nHost: localhost\r\n\r\n",  # "any request message"
                 chat_req.replace(b"Host: localhost\r\n", b"Host: localhost\r\nX-Other: 1\r\nHost: localhost\r\n")]
    rejected0 = bl.metric_sum(bl.metrics(fe.url), "baton_frontend_http_rejections_total", reason="bad_request")
    for req, why in [(r, "without a Host header") for r in no_host] + [(r, "more than one Host") for r in two_hosts]:
        st, _, b, closed = raw(fe.port, req)
        assert st == 400 and closed, (req[:60], st, b[:200], closed)
        if req.startswith(b"HEAD"):
            continue
        err = json.loads(b)["error"]
        assert err["code"] == "malformed_request" and why in err["message"], (req[:60], err)
    rejected = bl.metric_sum(bl.metrics(fe.url), "baton_frontend_http_rejections_total", reason="bad_request")
    assert rejected - rejected0 == len(no_host) + len(two_hosts), (rejected0, rejected)
    # served: HTTP/1.0 without Host (a GET and a streamed chat), HTTP/1.1 with one Host (empty is
    # allowed there: a target without an authority), and two requests with one Host each on one
    # connection (the count is per request)
    st, _, b, _ = raw(fe.port, b"GET /live HTTP/1.0\r\n\r\n")
    assert st == 200, (st, b[:200])
    st, _, b, _ = raw(fe.port, chat_req.replace(b"HTTP/1.1", b"HTTP/1.0", 1).replace(b"Host: localhost\r\n", b""))
    assert st == 200 and b"data: [DONE]" in b, (st, b[:300])
    for host in (b"Host: localhost\r\n", b"Host:\r\n", b"host: 127.0.0.1:1\r\n"):
        st, _, b, _ = raw(fe.port, b"GET /live HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n")
        assert st == 200, (host, st, b[:200])
    both = bl.raw_exchange(fe.port, b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n"
                                    b"GET /live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert both.count(b"HTTP/1.1 200 ") == 2 and b" 400 " not in both, both[:400]
    # and a keep-alive connection's next request without Host is refused after the first is served
    mixed = bl.raw_exchange(fe.port, b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\nGET /live HTTP/1.1\r\n\r\n")
    assert mixed.startswith(b"HTTP/1.1 200 ") and mixed.count(b"HTTP/1.1 400 ") == 1, mixed[:400]

    # ---- the request line's version: HTTP/1.x only (other majors were served as 1.1), a later
    # 1.x served as 1.1 (RFC 9110 §2.5); a line without one (HTTP/0.9) is refused, not answered in full
    for version in (b"HTTP/2.0", b"HTTP/3.0", b"HTTP/0.5"):
        st, _, b, closed = raw(fe.port, b"GET /live " + version + b"\r\nHost: localhost\r\n\r\n")
        assert st == 505 and closed, (version, st, b[:200], closed)
        err = json.loads(b)["error"]
        assert err["code"] == "http_version_not_supported" and version.decode() in err["message"], err
    st, _, b, _ = raw(fe.port, b"GET /live HTTP/1.2\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert st == 200, ("HTTP/1.2 is served as 1.1", st, b[:200])
    for line in (b"GET /live\r\n\r\n", b"GET /live\r\nHost: localhost\r\n\r\n"):
        st, _, b, closed = raw(fe.port, line)
        assert st == 400 and closed and "HTTP/0.9" in json.loads(b)["error"]["message"], (line, st, b[:200])
    # ---- obsolete line folding (RFC 9112 §5.2: a server may reject it with 400): a folded
    # Transfer-Encoding was read as chunked, a proxy may read it otherwise (request smuggling)
    folded = [b"POST /admission HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding:\r\n chunked\r\n"
              b"Connection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
              b"GET /live HTTP/1.1\r\nHost: localhost\r\nX-Other: a\r\n\tb\r\nConnection: close\r\n\r\n",
              b"GET /live HTTP/1.1\r\n Host: localhost\r\nConnection: close\r\n\r\n"]
    for req in folded:
        st, _, b, closed = raw(fe.port, req)
        assert st == 400 and closed, (req[:80], st, b[:200], closed)
        assert "folding" in json.loads(b)["error"]["message"], b
    # split anywhere, as it may arrive: still refused; the same bytes without the fold are served
    s = socket.create_connection(("127.0.0.1", fe.port), timeout=5)
    for piece in (b"GET /live HTTP/1.1\r\nHost: localhost\r\nX-Other: a\r", b"\n", b" b\r\n\r\n"):
        s.sendall(piece)
        time.sleep(0.05)
    got = s.recv(65536)
    s.close()
    assert got.startswith(b"HTTP/1.1 400 ") and b"folding" in got, got[:200]
    st, _, b, _ = raw(fe.port, folded[1].replace(b"\r\n\tb", b""))
    assert st == 200, (st, b[:200])
    # two requests on one connection, the second folded: the first is served, the second refused
    st, _, b, closed = raw(fe.port, b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n" + folded[1])
    assert st == 200 and closed and b"HTTP/1.1 400 " in b and b"folding" in b, (st, b[:400], closed)
    # ---- transfer codings without chunked last: the body's length cannot be known (RFC 9112
    # §6.3: 400); with a Content-Length too (§6.1: refused, and closed)
    for te, cl, why in ((b"identity", b"Content-Length: 2\r\n", "Content-Length"), (b"identity", b"", "chunked"),
                        (b"gzip", b"", "chunked"), (b"chunked, gzip", b"", "chunked"),
                        (b"chunked", b"Content-Length: 2\r\n", "Content-Length")):
        st, _, b, closed = raw(fe.port, b"POST /admission HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: " + te +
                               b"\r\n" + cl + b"Connection: close\r\n\r\n{}")
        err = json.loads(b)["error"] if b.startswith(b"{") else {}
        assert st == 400 and closed and "Transfer-Encoding" in err.get("message", "") and \
            why in err["message"], (te, cl, st, b[:300])

    # ---- framing http-parser misread: a bare CR, two bytes for a CRLF; HTTP/1.0 with
    # Transfer-Encoding. The frontend and a worker's status server (the same HTTP server; POST /live
    # is a 404 there, its body read all the same)
    bl.wait_http(worker.system_url + "/live", worker.proc)
    framing(fe.port, b"/v1/completions", json.dumps(bl.completion_body("Once", max_tokens=3)).encode(), 200)
    framing(worker.system_port, b"/live", b'{"a": 1}', 404)

    # ---- refused resumes are client errors: answered (and counted), never logged at the default
    # level, so that a client guessing stream ids cannot fill the log (they were an INFO line each)
    lines0 = fe.proc.log_text().count("\n")
    for k in range(40):
        st, _, b = bl.request("GET", fe.url + f"{chat}/{k:032x}")
        assert st == 404 and json.loads(b)["error"]["code"] == "stream_not_found", (st, b)
        st, _, b = bl.request("POST", fe.url + chat, json.dumps(bl.chat_body("x", stream=True)).encode(),
                              {"Content-Type": "application/json", "Last-Event-ID": f"{k:032x}:not-a-position"})
        assert st == 400 and json.loads(b)["error"]["code"] == "invalid_value", (st, b)
    time.sleep(0.2)
    new_lines = fe.proc.log_text().splitlines()[lines0:]
    assert not [ln for ln in new_lines if "refused" in ln], [ln for ln in new_lines if "refused" in ln][:3]
    assert bl.metric_sum(bl.metrics(fe.url), "baton_frontend_stream_resumes_total", outcome="not_found") >= 40

    # ---- Authorization and X-Tenant say who calls: two lines of either (which a proxy may read as
    # the first and this server as the last) are a 400 malformed_request, connection closed, even
    # when the last one holds the right key; one line of each is served, and the count is per request
    ok_key = b"Authorization: Bearer sekrit\r\n"
    dups = [(b"Authorization: Bearer nope\r\n" + ok_key, "more than one Authorization header"),
            (ok_key + b"authorization: Bearer sekrit\r\n", "more than one Authorization header"),
            (ok_key + b"X-Tenant: a\r\nx-tenant: b\r\n", "more than one X-Tenant header")]
    for hdrs, why in dups:
        for path in (b"/v1/models", b"/metrics"):
            st, _, b, closed = raw(keyed.port, b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n" + hdrs + b"\r\n")
            assert st == 400 and closed, (hdrs, path, st, b[:200], closed)
            err = json.loads(b)["error"]
            assert err["code"] == "malformed_request" and why in err["message"], (hdrs, err)
    st, _, b, _ = raw(keyed.port, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n" + ok_key +
                      b"X-Tenant: a\r\nConnection: close\r\n\r\n")
    assert st == 200 and b"mock-model" in b, (st, b[:200])
    two = bl.raw_exchange(keyed.port, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n" + ok_key + b"\r\n"
                                      b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n" + ok_key + b"Connection: close\r\n\r\n")
    assert two.count(b"HTTP/1.1 200 ") == 2 and b" 400 " not in two, two[:400]

    # ---- 405 names the allowed methods
    for method, path, allow in (("DELETE", chat, {"POST"}), ("POST", "/live", {"GET", "HEAD"}),
                                ("PUT", "/busy_threshold", {"GET", "HEAD", "POST"}),
                                ("POST", "/v1/models/mock-model", {"GET", "HEAD"}),
                                ("POST", f"{chat}/{sid}", {"GET"})):  # HEAD is refused there (405)
        st, hdrs, b = bl.request(method, fe.url + path, b"" if method != "GET" else None)
        assert st == 405 and json.loads(b)["error"]["code"] == "method_not_allowed", (method, path, st, b)
        got = {m.strip() for m in hdrs.get("allow", "").split(",") if m.strip()}
        assert got == allow, (method, path, hdrs.get("allow"))

    # ---- /busy_threshold: an unknown model's name cut inside a character still gets its message
    st, _, b = bl.post_json(fe.url + "/busy_threshold", {"model": "a" + "\u00e9" * 200})
    assert st == 404 and isinstance(b, dict) and "not found" in b.get("error", ""), (st, b)

    # ---- top_p: a number from 0 to 1, or null
    for bad in ("0.9", -0.1, 1.5, [0.5], True):
        st, _, b = bl.post_json(fe.url + chat, bl.chat_body("tp", max_tokens=2, top_p=bad))
        assert st == 400 and b["error"]["param"] == "top_p" and b["error"]["code"] == "invalid_value", (bad, st, b)
    for good in (None, 0, 0.9, 1):
        st, _, b = bl.post_json(fe.url + chat, bl.chat_body("tp", max_tokens=2, top_p=good))
        assert st == 200, (good, st, b)

    # ---- request bodies being received at once are capped over all connections
    # (--max-body-bytes-total): each connection may send up to --max-body-bytes, which alone bounds
    # nothing (20,000 connections of 4 MiB); a body past the total is a 503 with the connection
    # closed, and the charge goes back when a connection closes or its request is dispatched
    budget = c.start_frontend(max_body_bytes=1 << 20, max_body_bytes_total=2 << 20)
    c.wait_workers(budget, 1)
    big = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"

    def hold(n):
        """A connection that sends all of an n-byte body but its last byte, and waits."""
        s = socket.create_connection(("127.0.0.1", budget.port), timeout=5)
        s.sendall(big % n + b" " * (n - 1))
        return s

    def rejected():
        return bl.metric_sum(bl.metrics(budget.url), "baton_frontend_http_rejections_total", reason="body_budget")

    for rnd in range(2):  # twice: what the first round held was given back
        held = [hold(1 << 20), hold(1 << 20)]
        time.sleep(0.3)
        r0 = rejected()
        st, hdrs, b, closed = raw(budget.port, big % (1 << 20) + b" " * 100)
        assert st == 503 and closed and hdrs.get("retry-after") == "1", (rnd, st, hdrs, b[:200], closed)
        err = json.loads(b)["error"]
        assert err["code"] == "too_many_request_bytes" and err["type"] == "server_error", err
        # a chunked body is charged as it grows
        st, _, b, closed = raw(budget.port, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + b" " * 16 + b"\r\n")
        assert st == 503 and closed, (rnd, st, b[:200], closed)
        assert rejected() - r0 == 2, (r0, rejected())
        held.pop().close()
        time.sleep(0.3)
        one = json.dumps(bl.completion_body("budget", max_tokens=2)).encode()
        one += b" " * ((1 << 20) - len(one))
        # a request in flight holds no charge: a stream of a body of the same size, running
        long = json.dumps(bl.completion_body("budget", max_tokens=100000, stream=True)).encode()
        long += b" " * ((1 << 20) - len(long))
        inflight = socket.create_connection(("127.0.0.1", budget.port), timeout=5)
        inflight.sendall(big % len(long) + long)
        seen = b""
        while b"data:" not in seen:
            chunk = inflight.recv(65536)
            assert chunk, seen[:300]
            seen += chunk
        assert seen.startswith(b"HTTP/1.1 200 "), seen[:300]
        # room for one body again: a request of the same size is read whole (and served)
        st, _, b, _ = raw(budget.port, (big % len(one)).replace(b"Content-Type", b"Connection: close\r\nContent-Type")
                          + one)
        assert st == 200 and json.loads(b)["choices"][0]["text"], (rnd, st, b[:200])
        # dispatched requests give their charge back: one after the other on one keep-alive
        # connection, more bodies than the total (one body's room is left)
        kc = http.client.HTTPConnection("127.0.0.1", budget.port, timeout=10)
        for k in range(3):
            kc.request("POST", "/v1/completions", body=one, headers={"Content-Type": "application/json"})
            resp = kc.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["choices"][0]["text"], (rnd, k, resp.status)
        kc.close()
        for s in held + [inflight]:
            s.close()
        time.sleep(0.3)

    # a refused request gives its body back at once, not when its lingering connection closes: a
    # chunked body of 1 MiB broken by a bad chunk size is a 400, its connection left open by the
    # client, and the whole total is free again
    bad = socket.create_connection(("127.0.0.1", budget.port), timeout=5)
    bad.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n" +
                b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\nZZZ\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        got += bad.recv(65536)
    assert got.startswith(b"HTTP/1.1 400 "), got[:200]
    r0 = rejected()
    held = [hold(1 << 20), hold(1 << 20)]
    time.sleep(0.3)
    assert rejected() == r0, (r0, rejected())
    for s in held + [bad]:
        s.close()

    # ---- response bytes queued for clients that do not read are capped over all connections
    # (--max-output-bytes-total): each connection may queue up to --max-client-backlog-bytes
    # (8 MiB), which alone bounds nothing (160 GB over 20,000 connections). Past the total, the
    # connection with the largest backlog is cut; a client that reads is served to the end, and a
    # cut one resumes its stream from the journal with Last-Event-ID.
    # At most one hog may finish uncut only if each hog's whole stream, less what the kernel holds
    # for it (which the frontend does not count), passes half the total: two such backlogs then
    # cannot both fit. That must hold however the tokens are batched, which follows the machine's
    # pace: the worker sends the tokens of each of its ticks (64 steps at most) in one frame, an SSE
    # event each, so a token costs its text (5.1 bytes on average for this prompt) and 1/64 of an
    # event (200 bytes or more) at least, 8.2 bytes: 246 KB for 30,000 tokens. The kernel took
    # 2.8 MB per connection at the loopback's 64 KiB MSS (a loaded machine, batching more, then let
    # two hogs finish within a 2 MiB total); at an MSS of 536 it takes 138 KB, at any load. Against
    # a total of 64 KiB a hog's stream needs 171 KB: past it by 40% at the least bytes per token
    HOGS, TOTAL, HOG_TOKENS = 6, 64 << 10, 30000
    ob = c.start_frontend(max_output_bytes_total=TOTAL)
    c.wait_workers(ob, 1)

    def rss_kib(pid):
        with open(f"/proc/{pid}/status") as f:
            return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])

    def ob_metric(name, **labels):
        return bl.metric_sum(bl.metrics(ob.url), name, **labels)

    hog_body = bl.chat_body("a client that never reads", max_tokens=HOG_TOKENS, stream=True)
    good_body = bl.chat_body("a client that reads", max_tokens=6000, stream=True)
    good_ref = bl.stream_chat(ob.url, good_body, timeout=90)
    good_ref.assert_ok("the reading client's stream, alone")
    rss0 = rss_kib(ob.proc.pid)
    cut0 = ob_metric("baton_frontend_http_rejections_total", reason="output_budget")
    slow0 = ob_metric("baton_frontend_http_rejections_total", reason="slow_reader")
    data = json.dumps(hog_body).encode()
    hogs = []
    for k in range(HOGS):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        s.connect(("127.0.0.1", ob.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        hogs.append(s)
    # a reading client meanwhile: its stream is whole and exact
    good = []
    reader = threading.Thread(target=lambda: good.append(bl.stream_chat(ob.url, good_body, timeout=90)))
    reader.start()
    peak, queued_max, t_end = rss0, 0, time.monotonic() + 90
    while time.monotonic() < t_end:
        peak = max(peak, rss_kib(ob.proc.pid))
        m = bl.metrics(ob.url)
        queued_max = max(queued_max, bl.metric_sum(m, "baton_frontend_http_output_queued_bytes"))
        # every hog but the last is cut (the last one too, as its stream passes the whole total)
        if (bl.metric_sum(m, "baton_frontend_http_rejections_total", reason="output_budget") - cut0 >= HOGS - 1
                and bl.metric_sum(m, "dynamo_frontend_inflight_requests") == 0):
            break
        time.sleep(0.1)
    reader.join(90)
    cut = ob_metric("baton_frontend_http_rejections_total", reason="output_budget") - cut0
    print(f"test_http_edges: output budget: {cut} of {HOGS} non-reading clients cut, peak RSS "
          f"{rss0} -> {peak} KiB, at most {queued_max:.0f} bytes queued")
    assert HOGS - 1 <= cut <= HOGS, (cut, HOGS)
    assert ob_metric("baton_frontend_http_rejections_total", reason="slow_reader") == slow0
    assert queued_max <= TOTAL, queued_max
    # without the total, each held what it was sent (up to 8 MiB): 30 MB over the baseline was
    # measured (AddressSanitizer keeps freed memory in a quarantine: no RSS bound there)
    assert bl.sanitized_build() or peak - rss0 < 20 << 10, (rss0, peak)
    assert good and good[0].ok, good and good[0].summary()
    # (the events may batch differently under load: the text is what must be equal)
    assert good[0].text == good_ref.text and good[0].finish_reason == good_ref.finish_reason, good[0].summary()
    # a cut client reads what the kernel had taken, then the end of the connection (no [DONE]);
    # it resumes from its last whole event and gets exactly the rest
    # (the reference answer: the hog not cut, whose whole stream waits for it, or a fresh read)
    got_all, ref_text = [], None
    for s in hogs:
        s.settimeout(5)
        got = recv_until_done(s)
        evs = sse_events(got)
        assert got.startswith(b"HTTP/1.1 200 ") and len(evs) >= 2, got[:300]
        got_all.append(evs)
        if evs[-1][1] == "[DONE]":
            ref_text = texts(evs)
    assert sum(evs[-1][1] != "[DONE]" for evs in got_all) == cut, ([evs[-1] for evs in got_all], cut)
    if ref_text is None:
        ref = bl.stream_chat(ob.url, hog_body, timeout=120)
        ref.assert_ok("the long stream, read")
        ref_text = ref.text
    for evs in [e for e in got_all if e[-1][1] != "[DONE]"][:1]:  # one resume shows it (each takes seconds)
        before = texts(evs)
        rest = bl.stream_chat(ob.url, hog_body, timeout=120, headers={"Last-Event-ID": evs[-1][0]})
        rest.assert_ok("the resume of a cut client")
        assert before + rest.text == ref_text, (len(before), len(rest.text), len(ref_text))
    for s in hogs:
        s.close()
    bl.wait_for(lambda: ob_metric("baton_frontend_http_output_queued_bytes") == 0 and
                ob_metric("baton_frontend_http_connections") <= 1, 10, what="the queued bytes given back")

    # the same with two event loops: the largest backlog of either is cut
    output_budget_threads(c)

    # the frontends still serve
    for f in (fe, keyed):
        st, _, b = bl.post_json(f.url + chat, bl.chat_body("still there?", max_tokens=3),
                                headers={"Authorization": "Bearer sekrit"})
        assert st == 200 and b["choices"][0]["message"]["content"], (st, b)
print("test_http_edges: ok")
