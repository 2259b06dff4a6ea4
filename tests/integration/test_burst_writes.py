"""A burst of streaming requests costs the frontend as few writes as the work allows, watched with
strace on the real process (docs/benchmarks.md, burst TTFT):

- the REQUEST frames of the client requests read in one loop iteration reach the worker in one
  write(2), not one write each: a worker woken by the first of N writes starts an engine step with
  a few requests and leaves the rest a whole step behind, where a burst sent straight to it (one
  write of N frames) goes into one step;
- a stream's response head goes out in the same write as its first chunk, not in a write of its
  own (one syscall and one wakeup of the client less per stream in the fan-out of the step that
  makes the first tokens).

To make "read in one loop iteration" certain, the frontend is stopped (SIGSTOP) while the 20
clients, already connected, write their requests; once continued, one epoll_wait returns all 20.
Every response must still be complete and well formed: status 200, the head's X-Request-Id, the
chunked SSE body ending in [DONE].
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import batonlib as bl

N = 20


def proc_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def tracer_pid(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def read_response(s):
    """The whole chunked response on s (until the zero chunk), as bytes."""
    data = b""
    s.settimeout(30)
    while not data.endswith(b"\r\n0\r\n\r\n"):
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-response: {data[-300:]!r}"
        data += chunk
    return data


def main():
    bl.deadline(120, "test_burst_writes")
    strace = shutil.which("strace")
    if not strace:
        print("strace not installed; skipped")
        raise SystemExit(77)
    with bl.Cluster() as c:
        fe = c.start_frontend()
        c.start_worker(speedup_ratio=10)
        c.wait_workers(fe, 1)
        status, _, _ = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("warm", max_tokens=2))
        assert status == 200, f"warm-up: {status}"
        pid = fe.proc.pid
        socks = [socket.create_connection(("127.0.0.1", fe.port)) for _ in range(N)]
        time.sleep(0.5)  # accepted and idle
        trace = os.path.join(c.dir, "frontend.strace")
        st = subprocess.Popen([strace, "-f", "-qq", "-e", "trace=write,writev,sendmsg", "-e", "signal=none",
                               "-s", "65536", "-o", trace, "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            bl.wait_for(lambda: tracer_pid(pid) != 0, 10, what="strace attached to the frontend")
            os.kill(pid, signal.SIGSTOP)
            bl.wait_for(lambda: proc_state(pid) in ("T", "t"), 10, what="the frontend stopped")
            for i, s in enumerate(socks):
                body = (f'{{"model":"mock-model","messages":[{{"role":"user","content":"burst {i}"}}],'
                        f'"stream":true,"max_tokens":4}}').encode()
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                          + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.3)
            os.kill(pid, signal.SIGCONT)
            responses = [read_response(s) for s in socks]
        finally:
            os.kill(pid, signal.SIGCONT)
            st.send_signal(signal.SIGINT)
            try:
                st.wait(10)
            except subprocess.TimeoutExpired:
                st.kill()
                st.wait()
            for s in socks:
                s.close()
        for i, r in enumerate(responses):
            head, _, body = r.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n"), f"response {i}: {head!r}"
            assert b"\r\nTransfer-Encoding: chunked" in head and b"\r\nX-Request-Id: " in head, f"response {i}: {head!r}"
            assert b"data: {" in body and body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), f"response {i}: {body!r}"
        with open(trace, errors="replace") as f:
            lines = f.read().splitlines()
        # the REQUEST frames: every request's frame holds its JSON body with the prompt "burst <i>"
        per_write = [len(re.findall(r"burst \d+", ln)) for ln in lines if '\\"request_id\\"' in ln]
        print(f"REQUEST frames per write to the worker: {per_write}")
        assert sum(per_write) == N, f"{sum(per_write)} REQUEST frames seen in the trace, expected {N}"
        assert per_write == [N], f"the {N} REQUESTs read in one loop iteration took {len(per_write)} writes"
        # the heads: each in the same syscall as a data chunk
        heads = [ln for ln in lines if "HTTP/1.1 200 OK" in ln and "text/event-stream" in ln]
        alone = [ln for ln in heads if "data: {" not in ln]
        print(f"{len(heads)} stream heads written, {len(alone)} without a chunk in the same write")
        assert len(heads) == N, f"{len(heads)} stream heads in the trace, expected {N}"
        assert not alone, f"heads written alone: {alone[:2]}"
    print("test_burst_writes: ok")


if __name__ == "__main__":
    main()
