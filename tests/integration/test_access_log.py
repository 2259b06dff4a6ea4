"""The frontend's access log (--access-log, docs/operations.md "Access log"), through the real
binaries: one JSON object a line for each inference request as it ends and for each request the
API refuses.

  1. A frontend with --api-key and --access-log FILE, mocker workers: a unary and a streaming
     request each give one line whose request_id is the X-Request-Id they were answered with, status
     200, outcome success, the model, the tenant label (key-..., never the key), the usage's
     tokens, finish_reason, ttft_ms <= duration_ms, one attempt; a request without the key (401),
     bad JSON (400), an unknown model (404), an unknown path (404) each give a refusal line with
     method, path, status and error code; a client that closes its stream mid-way gives
     client_gone and outcome cancelled; a resume of a finished stream whose client has every
     event (204) gives a line too; a stream whose worker is killed with kill -9 mid-way ends
     whole with attempts 2 and migrations 1; /metrics counts the lines written.
  2. The file renamed away (logrotate's move, no copytruncate, no signal): the next lines go to a
     new file at the path within about a second, the old lines stay in the moved file.
  3. --threads 2: 40 requests over both event loops give 40 whole lines.
  4. --access-log - writes to the standard output; an empty --access-log or BATON_ACCESS_LOG, and a
     path that cannot be opened, are start-up errors (exit 2) that say so; `baton run --access-log`
     passes it to its frontend.
"""

import json
import os
import signal
import subprocess
import threading

import batonlib as bl

bl.deadline(150, "test_access_log")
BIN = bl.baton_bin()
KEY = "sk-access-log-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "BATON_", "NATS_", "ETCD_"))}


def lines_of(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    assert text == "" or text.endswith("\n"), f"a line cut short: {text[-200:]!r}"
    return [json.loads(ln) for ln in text.splitlines()]


def wait_line(path, pred, what, timeout=5.0):
    """The first line of the file that pred accepts, waited for (the writer thread is behind)."""
    found = []

    def look():
        found[:] = [ln for ln in lines_of(path) if pred(ln)]
        return bool(found)
    bl.wait_for(look, timeout, what=f"the access-log line of {what}")
    assert len(found) == 1, f"{what}: {len(found)} lines, expected one: {found}"
    return found[0]


def by_id(rid):
    return lambda ln: ln.get("request_id") == rid


def check_success(ln, stream, max_tokens):
    assert ln["status"] == 200 and ln["outcome"] == "success", ln
    assert ln["model"] == "mock-model" and ln["stream"] is stream, ln
    assert ln["tenant"].startswith("key-") and KEY not in json.dumps(ln), ln
    assert ln["completion_tokens"] == max_tokens and ln["prompt_tokens"] > 0, ln
    assert ln["finish_reason"] == "length" and ln["error"] is None, ln
    assert 0 < ln["ttft_ms"] <= ln["duration_ms"], ln
    assert ln["attempts"] == 1 and ln["migrations"] == 0 and len(ln["worker"]) > 0, ln
    assert ln["client_gone"] is False and ln["resumed"] is False, ln
    assert ln["time"].endswith("Z") and ln["path"] == "/v1/chat/completions", ln
    assert (ln["stream_id"] is not None) is stream, ln


def part1_and_2(c):
    log = os.path.join(c.dir, "access.log")
    fe = c.start_frontend(api_key=KEY, access_log=log)
    w1 = c.start_worker(speedup_ratio=0.5)  # ~13 ms a token: the kill below comes mid-stream
    c.wait_workers(fe, 1)

    # unary and streaming
    st, hdrs, body = bl.request("POST", fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=7), AUTH)
    assert st == 200, body
    check_success(wait_line(log, by_id(hdrs["x-request-id"]), "a unary request"), False, 7)
    s = bl.stream_chat(fe.url, bl.chat_body(max_tokens=9, stream=True), headers=AUTH)
    s.assert_ok("stream")
    ln = wait_line(log, by_id(s.headers["x-request-id"]), "a stream")
    check_success(ln, True, 9)
    # a resume with nothing left to send (its client has [DONE]) is answered 204, and written
    sid = ln["stream_id"]
    assert s.last_event_id.startswith(sid) and s.last_event_id.endswith(":done"), s.last_event_id
    st, _, _ = bl.request("GET", f"{fe.url}/v1/chat/completions/{sid}", None,
                          dict(AUTH, **{"Last-Event-ID": s.last_event_id, "X-Request-Id": "resume-done"}))
    assert st == 204, st
    ln = wait_line(log, by_id("resume-done"), "a resume answered 204")
    assert (ln["method"], ln["status"], ln["outcome"]) == ("GET", 204, "success"), ln

    # refusals
    cases = [("POST", "/v1/chat/completions", bl.chat_body(), {}, 401, "invalid_api_key"),
             ("POST", "/v1/chat/completions", b"{bad", AUTH, 400, "invalid_json"),
             ("POST", "/v1/chat/completions", bl.chat_body(model="no-such-model"), AUTH, 404, "model_not_found"),
             ("GET", "/v1/no/such/path", None, AUTH, 404, "unknown_url")]
    for i, (method, path, body, h, status, code) in enumerate(cases):
        rid = f"refused-{i}"
        st, hdrs, resp = bl.request(method, fe.url + path, body, dict(h, **{"X-Request-Id": rid}))
        assert st == status, (path, st, resp)
        assert json.loads(resp)["error"]["code"] == code, resp
        ln = wait_line(log, by_id(rid), f"a {status} {code}")
        assert (ln["method"], ln["path"], ln["status"], ln["error"]) == (method, path, status, code), ln
        assert ln["outcome"] == "refused", ln

    # a client that goes away mid-stream
    s = bl.stream_chat(fe.url, bl.chat_body(max_tokens=400, stream=True), headers=AUTH, abort_after=3)
    assert s.aborted, s.summary()
    ln = wait_line(log, by_id(s.headers["x-request-id"]), "a stream its client left")
    assert ln["client_gone"] is True and ln["outcome"] == "cancelled" and ln["status"] == 200, ln
    assert 3 <= ln["completion_tokens"] < 400, ln

    # kill -9 of the stream's worker: a second worker takes the continuation
    got = []
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("s", bl.stream_chat(
        fe.url, bl.chat_body(max_tokens=300, stream=True), headers=AUTH, timeout=60,
        on_event=lambda st, ev: got.append(ev))))
    t.start()
    bl.wait_for(lambda: len(got) >= 5, 10, what="the stream under way on the first worker")
    c.start_worker(speedup_ratio=5)
    c.wait_workers(fe, 2)
    assert len(got) < 250, "the stream ended before its worker could be killed"
    w1.proc.kill(signal.SIGKILL)
    t.join(60)
    s = out["s"]
    s.assert_ok("the stream across kill -9 of its worker")
    ln = wait_line(log, by_id(s.headers["x-request-id"]), "a migrated stream")
    assert ln["status"] == 200 and ln["outcome"] == "success", ln
    assert ln["attempts"] == 2 and ln["migrations"] == 1 and ln["completion_tokens"] == 300, ln
    # the worker that finished it: the one started second, not the one killed
    ids = {format(i["instance_id"], "x") for i in c.wait_workers(fe, 1)}
    assert ln["worker"] in ids, (ln, ids)

    # every line whole, each request once; /metrics counts them
    every = lines_of(log)
    assert len(every) == 9, every
    samples = bl.metrics(fe.url)
    assert bl.metric_sum(samples, "baton_frontend_access_log_lines_total", result="written") == 9, samples
    assert bl.metric_sum(samples, "baton_frontend_access_log_lines_total", result="dropped") == 0

    # 2. rotation by rename
    os.rename(log, log + ".1")
    st, hdrs, _ = bl.request("POST", fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=3), AUTH)
    rid = hdrs["x-request-id"]
    # the line goes to the moved file or, once the writer has looked, to the new one: the next
    # requests' lines reach the new file within about a second
    bl.wait_for(lambda: bl.request("POST", fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=1), AUTH)[0] == 200
                and len(lines_of(log)) > 0, 5, interval=0.2, what="a new file at the access log's path")
    old = lines_of(log + ".1")
    assert len(old) >= 9 and all(ln["request_id"] != "x" for ln in old)
    assert sum(ln["request_id"] == rid for ln in old + lines_of(log)) == 1
    fe.proc.stop()
    assert fe.proc.returncode == 0
    assert "access log: " in fe.proc.log_text() and "opened again" in fe.proc.log_text()


def part3(c):
    log = os.path.join(c.dir, "access-threads.log")
    fe = c.start_frontend(access_log=log, threads=2)
    c.start_worker(speedup_ratio=50)
    c.wait_workers(fe, 1)
    res = bl.run_concurrently(lambda i: bl.request("POST", fe.url + "/v1/completions",
                                                   bl.completion_body(max_tokens=4), {"X-Request-Id": f"t-{i}"}),
                              list(range(40)), max_workers=8)
    assert all(r[0] == 200 for r in res)
    bl.wait_for(lambda: len(lines_of(log)) == 40, 5, what="40 lines from two event loops")
    assert sorted(ln["request_id"] for ln in lines_of(log)) == sorted(f"t-{i}" for i in range(40))
    assert all(ln["path"] == "/v1/completions" and ln["tenant"] == "anonymous" for ln in lines_of(log))


def part4(c):
    # to the standard output (the harness keeps it with the log)
    fe = c.start_frontend(access_log="-")
    c.start_worker(speedup_ratio=50)
    c.wait_workers(fe, 1)
    st, hdrs, _ = bl.request("POST", fe.url + "/v1/completions", bl.completion_body(max_tokens=2))
    assert st == 200
    rid = hdrs["x-request-id"]
    bl.wait_for(lambda: f'"request_id":"{rid}"' in fe.proc.log_text(), 5, what="the line on the standard output")

    for args, env, says in [(["--access-log", ""], {}, "--access-log (BATON_ACCESS_LOG) is given empty"),
                            ([], {"BATON_ACCESS_LOG": ""}, "BATON_ACCESS_LOG (--access-log) is set but empty"),
                            (["--access-log", os.path.join(c.dir, "no", "such", "dir.log")], {},
                             "--access-log (BATON_ACCESS_LOG): cannot open"),
                            (["--access-log", c.dir], {}, "--access-log (BATON_ACCESS_LOG): ")]:
        p = subprocess.run([BIN, "frontend", "--http-host", "127.0.0.1", "--http-port", str(bl.free_port())] + args,
                           env=dict(CLEAN_ENV, **env), capture_output=True, text=True, timeout=20)
        assert p.returncode == 2, (args, env, p.returncode, p.stderr)
        assert says in p.stderr, (args, env, p.stderr)

    log = os.path.join(c.dir, "run-access.log")
    run = c.start_run(access_log=log, workers=1)
    st, hdrs, _ = bl.request("POST", run.url + "/v1/completions", bl.completion_body(max_tokens=2))
    assert st == 200
    wait_line(log, by_id(hdrs["x-request-id"]), "a request through baton run")


for part in (part1_and_2, part3, part4):
    with bl.Cluster() as c:  # each its own discovery directory: the workers of one part only
        part(c)
print("test_access_log: ok")
