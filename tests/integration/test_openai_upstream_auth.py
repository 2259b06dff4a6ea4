"""The `openai` engine against an upstream that requires an API key, and its usage for max_tokens 0,
through the real binaries. The upstream U is a baton frontend with --api-key-file and a mocker worker.

1. A worker W without the right key (none, then a wrong one): its log names the refusal (HTTP 401)
   and what to check (--upstream-api-key), never "not reachable yet"; its GET /health answers 503
   with the endpoint "notready"; a client of its frontend gets an error that does not name U's
   address (which stays in W's log).
2. A worker with the key is ready, and `max_tokens: 0` reports the prompt's tokens in its usage as U
   itself does (chat and completions), not 0.
3. Against a small server of this file's own whose key check can be turned on and off (its GET
   /health, like vLLM's, needs no key): a worker refused at start becomes ready without a restart
   once the server accepts it (polling goes on); when the server refuses again, a request's 401
   makes the worker check the credentials at once and turn notready, though /health still answers.
"""

import http.server
import json
import os
import sys
import threading
import time

import batonlib as bl

KEY = "sk-upstream-test-key"
MODEL = "mock-model"


def health(w):
    st, _, body = bl.get_json(w.system_url + "/health")
    return st, body


def refused_worker(c, fe, u, key):
    extra = {"upstream_api_key": key} if key else {}
    w = c.start_worker(engine="openai", upstream=u.url, model_name=MODEL, system_port=True, wait=True, **extra)
    w.proc.wait_log(r"refused the credentials \(HTTP 401\)", 15)
    log = w.proc.log_text()
    assert "--upstream-api-key" in log, w.proc.log_tail()
    assert "not reachable yet" not in log, f"an auth refusal logged as unreachable:\n{w.proc.log_tail()}"
    st, body = health(w)
    assert st == 503 and body["status"] == "notready" and body["endpoints"]["generate"] == "notready", (st, body)
    # the frontend may list W, but never as one to route to; whatever a client gets, U's address
    # (host and port) is not in it
    st, _, b = bl.post_json(fe.url + "/v1/completions", bl.completion_body("x", max_tokens=3, model=MODEL))
    assert st != 200, (st, b)
    text = repr(b)
    assert u.url not in text and str(u.port) not in text, f"U's address reached the client: {text}"
    w.proc.kill()
    w.proc.wait(10)
    c.workers.remove(w)


class Upstream(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server that refuses every API call with 401 while `refusing` is set."""
    protocol_version = "HTTP/1.1"
    refusing = True

    def log_message(self, *a):
        pass

    def send_json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def refused(self):
        if Upstream.refusing:
            self.send_json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}})
        return Upstream.refusing

    def do_GET(self):
        if self.path == "/health":
            self.send_json(200, {})
        elif not self.refused():
            self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "x"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if not self.refused():
            self.send_json(500, {"error": {"message": "not served here", "type": "server_error"}})


def wait_health(w, want, timeout):
    end = time.monotonic() + timeout
    while True:
        st, body = health(w)
        if st == want:
            return body
        assert time.monotonic() < end, f"worker /health stayed {st} {body}, expected {want}\n{w.proc.log_tail()}"
        time.sleep(0.2)


def rotated_key(c, fe):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        w = c.start_worker(engine="openai", upstream=url, upstream_kind="sglang", upstream_api_key="sk-old",
                           upstream_health_interval=0.5, upstream_health_failures=1000, system_port=True, wait=True)
        w.proc.wait_log(r"refused the credentials \(HTTP 401\)", 15)
        wait_health(w, 503, 5)
        Upstream.refusing = False  # the key is accepted upstream now: no restart needed
        wait_health(w, 200, 10)
        w.proc.wait_log(r"accepts the credentials now", 5)
        c.wait_workers(fe, 1)
        Upstream.refusing = True  # revoked: its /health still answers, only API calls are refused
        time.sleep(1.5)  # polls of /health alone would keep it ready
        st, _ = health(w)
        assert st == 200, "the worker turned notready before any call was refused"
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("hi", max_tokens=3, model=MODEL))
        assert st != 200 and url not in repr(b), (st, b)
        body = wait_health(w, 503, 5)
        assert body["endpoints"]["generate"] == "notready", body
    finally:
        srv.shutdown()


def main():
    with bl.deadline(90, "test_openai_upstream_auth"):
        with bl.Cluster() as up, bl.Cluster() as c:
            key_file = os.path.join(up.dir, "key")
            with open(key_file, "w") as f:
                f.write(KEY + "\n")
            u = up.start_frontend(api_key_file=key_file)
            up.start_worker()
            up.wait_workers(u, 1)
            fe = c.start_frontend()

            refused_worker(c, fe, u, None)
            refused_worker(c, fe, u, "sk-wrong")
            print("refused credentials: logged as such, worker not ready, no upstream address to clients")

            w = c.start_worker(engine="openai", upstream=u.url, upstream_api_key=KEY, system_port=True, wait=True)
            w.proc.wait_log(r"upstream http://127\.0\.0\.1:\d+ is up", 15)
            c.wait_workers(fe, 1)
            st, body = health(w)
            assert st == 200 and body["endpoints"]["generate"] == "ready", (st, body)
            auth = {"Authorization": "Bearer " + KEY}
            for path, body in (("/v1/completions", bl.completion_body("Once upon a time", max_tokens=0, model=MODEL)),
                               ("/v1/chat/completions", bl.chat_body("Once upon a time", max_tokens=0, model=MODEL))):
                st, _, ref = bl.post_json(u.url + path, body, headers=auth)
                assert st == 200 and ref["usage"]["prompt_tokens"] > 0, (path, st, ref)
                st, _, got = bl.post_json(fe.url + path, body)
                assert st == 200, (path, st, got)
                assert got["usage"] == ref["usage"], f"{path}: usage {got['usage']}, the upstream's {ref['usage']}"
                assert got["choices"][0]["finish_reason"] == "length", (path, got)
            print("max_tokens 0: the upstream's usage")
            w.proc.kill()
            w.proc.wait(10)
            c.workers.remove(w)

            rotated_key(c, fe)
            print("a key accepted later makes the worker ready; a refused request makes it check and turn notready")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
