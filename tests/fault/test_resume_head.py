"""HEAD on the GET form of a resume (/v1/chat/completions/{stream id}) is refused with 405 and
leaves the stream alone.

A GET there is not a read: it takes the stream over (the request still streaming it is superseded,
its client cut off) and continues it on a worker. Answered like a GET, as HEAD otherwise is, a HEAD
did all of that for a response with no body: the live client lost its stream (no [DONE]) and the
rest was generated for no one. Checked here, against a frontend with two threads:

- a HEAD on a live stream, pipelined with a GET /v1/models: 405 with `Allow: GET` (the head of a JSON
  error, no body), then the GET's 200 on the same connection; the live client still gets its whole stream
  (every token up to `<id>:<max_tokens>:end`, then [DONE]); nothing is counted as a resume and no
  request is superseded;
- a HEAD on the finished stream: 405 too, and a GET of it afterwards still replays it whole.
"""

import json
import socket

import batonlib as bl

MAX_TOKENS = 200


def chat_request():
    body = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "head resume"}],
                       "stream": True, "max_tokens": MAX_TOKENS}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def read_until(s, pred, what):
    """Reads until pred holds for what was read (which it returns)."""
    data = b""
    while not pred(data):
        chunk = s.recv(65536)
        assert chunk, f"connection closed before {what}: {data[-400:]!r}"
        data += chunk
    return data


def read_to_close_or_end(s, end=b"\r\n0\r\n\r\n"):
    """What the server sends: up to `end` (by default a chunked response's last chunk), or until
    it closes the connection (end=None: only that)."""
    data = b""
    while end is None or not data.endswith(end):
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def read_to_close(s):
    return read_to_close_or_end(s, end=None)


def split_responses(data, methods):
    """The responses in data to requests of these methods: (status line, head, body) each, body
    framed by Content-Length (none after a HEAD, whatever Content-Length says)."""
    out = []
    for method in methods:
        if not data:
            break
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"no complete head in {data[:300]!r}"
        lines = head.decode().split("\r\n")
        hdr = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        n = 0 if method == "HEAD" else int(hdr.get("content-length", "0"))
        out.append((lines[0], hdr, rest[:n]))
        data = rest[n:]
    assert not data, f"bytes after the responses: {data[:300]!r}"
    return out


def head_pipelined(port, path):
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        s.sendall(f"HEAD {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"
                  "GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        return split_responses(read_to_close(s), ["HEAD", "GET"])
    finally:
        s.close()


def check_refused(resps, what):
    assert len(resps) == 2, f"{what}: {len(resps)} responses, expected the 405 and the GET's: {resps!r}"
    (st, hdr, body), (st2, _, body2) = resps
    assert st == "HTTP/1.1 405 Method Not Allowed", f"{what}: {st!r} {hdr!r}"
    assert hdr.get("allow") == "GET", f"{what}: Allow {hdr.get('allow')!r}"
    assert hdr.get("content-type") == "application/json" and "x-stream-id" not in hdr, f"{what}: {hdr!r}"
    assert st2 == "HTTP/1.1 200 OK" and json.loads(body2)["object"] == "list", f"{what}: then {st2!r} {body2!r}"


def resumes(fe):
    return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_stream_resumes_total")


def main():
    bl.deadline(120, "test_resume_head")
    with bl.Cluster() as c:
        fe = c.start_frontend(threads=2)
        c.start_worker()  # a stream of 200 tokens lasts a few seconds
        c.wait_workers(fe, 1)

        s = socket.create_connection(("127.0.0.1", fe.port), timeout=30)
        s.sendall(chat_request())
        data = read_until(s, lambda d: d.count(b"\nid: ") >= 2, "the first events")
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith("HTTP/1.1 200"), head
        sid = [l.split(":", 1)[1].strip() for l in head.split("\r\n") if l.lower().startswith("x-stream-id:")][0]
        path = f"/v1/chat/completions/{sid}?stream=true&starting_after=1"

        before = resumes(fe)
        refused = head_pipelined(fe.port, path)
        s.settimeout(0.2)  # what the live client had when the HEAD was answered: not its end yet
        try:
            data += s.recv(65536)
        except socket.timeout:
            pass
        assert f"id: {sid}:{MAX_TOKENS}:end".encode() not in data, "the stream ended before the HEAD: not live"
        s.settimeout(30)
        data += read_to_close_or_end(s)
        s.close()
        assert f"id: {sid}:{MAX_TOKENS}:end".encode() in data, f"the live stream lost its end: {data[-600:]!r}"
        assert data.count(b"data: [DONE]") == 1, f"the live stream lost its [DONE]: {data[-600:]!r}"
        log = fe.proc.log_text()
        assert "resumed by another connection" not in log, "the HEAD superseded the live stream"
        assert resumes(fe) == before, f"the HEAD counted as a resume ({before} -> {resumes(fe)})"
        check_refused(refused, "HEAD on a live stream")

        check_refused(head_pipelined(fe.port, path), "HEAD on a finished stream")
        st, _, body = bl.request("GET", fe.url + f"/v1/chat/completions/{sid}?stream=true")
        assert st == 200, f"GET of the finished stream: {st} {body[:300]!r}"
        assert f"id: {sid}:{MAX_TOKENS}:end".encode() in body and body.count(b"data: [DONE]") == 1, body[-600:]
        assert resumes(fe) == before + 1, f"resumes {before} -> {resumes(fe)}, expected the GET's only"
    print("test_resume_head: OK")


if __name__ == "__main__":
    main()
