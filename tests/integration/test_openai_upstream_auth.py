"""The `openai` engine against an upstream that requires an API key, and its usage for max_tokens 0,
through the real binaries. The upstream U is a baton frontend with --api-key-file and a mocker worker.

1. A worker W without the right key (none, then a wrong one): its log names the refusal (HTTP 401)
   and what to check (--upstream-api-key), never "not reachable yet"; its GET /health answers 503
   with the endpoint "notready"; a client of its frontend gets an error that does not name U's
   address (which stays in W's log).
2. A worker with the key is ready, and `max_tokens: 0` reports the prompt's tokens in its usage as U
   itself does (chat and completions), not 0.
"""

import os
import sys

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
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
