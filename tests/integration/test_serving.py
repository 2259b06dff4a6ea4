"""Core serving path through the real binaries: one frontend, mocker workers, file discovery.

Checks streaming and non-streaming responses of both APIs, the SSE and JSON shapes, usage,
byte-identical output for identical requests (another seed or top_p, another output: top_p is
part of a sampled choice), exact continuation from prompt + k generated tokens, JSON errors with the right status, /v1/models, /health, /live, /metrics, 200 concurrent
streams across two workers, and a worker added and removed while traffic flows.
"""

import json
import signal
import threading
import time

import batonlib as bl

bl.deadline(240, "test_serving")


def check_shapes(fe):
    # streaming chat with usage
    s = bl.stream_chat(fe.url, bl.chat_body("Hello there", max_tokens=24, stream_options={"include_usage": True},
                                            return_token_ids=True))
    s.assert_ok("streaming chat")
    assert s.headers.get("content-type", "").startswith("text/event-stream"), s.headers
    assert s.headers.get("x-request-id"), "X-Request-Id missing on a stream"
    assert s.finish_reason == "length", s.summary()
    assert len(s.token_ids) == 24, s.summary()
    assert s.usage == {"prompt_tokens": s.usage["prompt_tokens"], "completion_tokens": 24,
                       "total_tokens": s.usage["prompt_tokens"] + 24}, s.usage
    first = s.events[0]
    assert first["object"] == "chat.completion.chunk" and first["model"] == "mock-model", first
    assert first["choices"][0]["delta"].get("role") == "assistant", first
    assert s.text.strip(), "empty text"
    # non-streaming chat: same request, same text and ids
    st, hdrs, body = bl.post_json(fe.url + "/v1/chat/completions",
                                  bl.chat_body("Hello there", max_tokens=24, return_token_ids=True))
    assert st == 200, (st, body)
    assert hdrs.get("x-request-id"), hdrs
    assert body["object"] == "chat.completion", body
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == s.text, (msg, s.text)
    assert body["choices"][0]["token_ids"] == s.token_ids
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 24
    # completions, both ways
    st, _, c1 = bl.post_json(fe.url + "/v1/completions", bl.completion_body("Once upon a time", max_tokens=16))
    assert st == 200 and c1["object"] == "text_completion" and c1["choices"][0]["text"], c1
    assert c1["usage"]["completion_tokens"] == 16, c1
    s2 = bl.stream_completion(fe.url, bl.completion_body("Once upon a time", max_tokens=16))
    s2.assert_ok("streaming completion")
    assert s2.text == c1["choices"][0]["text"], (s2.text, c1)
    # a request id given by the client is kept
    st, hdrs, _ = bl.post_json(fe.url + "/v1/completions", bl.completion_body("x", max_tokens=2),
                               headers={"X-Request-Id": "client-id-42"})
    assert st == 200 and hdrs.get("x-request-id") == "client-id-42", hdrs
    # ... and names every chunk of a stream, a short id and the longest one (64 characters: the
    # chunks' constant head then outgrows the room the request keeps for it and goes to the heap)
    for rid in ("c" * 8, "L" * 64):
        for api in ("chat", "completion"):
            ids = []
            if api == "chat":
                s = bl.stream_chat(fe.url, bl.chat_body("Hello there", max_tokens=5, stream_options={"include_usage": True}),
                                   headers={"X-Request-Id": rid}).assert_ok(rid)
                want_id, want_obj = "chatcmpl-" + rid, "chat.completion.chunk"
            else:
                s = bl.stream_completion(fe.url, bl.completion_body("Once", max_tokens=5,
                                                                    stream_options={"include_usage": True}),
                                         headers={"X-Request-Id": rid}).assert_ok(rid)
                want_id, want_obj = "cmpl-" + rid, "text_completion"
            assert s.headers.get("x-request-id") == rid, s.headers
            for e in s.events:
                ids.append((e["id"], e["object"], e["model"], e["created"]))
            # the tokens' events, the final event, the usage event
            assert len(s.events) >= 3 and s.events[-2]["choices"][0]["finish_reason"] == "length", s.summary()
            assert set(ids) == {(want_id, want_obj, "mock-model", s.events[0]["created"])}, (rid, api, ids)
            assert s.events[-1]["choices"] == [] and s.usage["completion_tokens"] == 5, s.events[-1]


def check_determinism_and_continuation(fe):
    body = bl.completion_body([101, 202, 303, 404], max_tokens=40, return_token_ids=True, seed=7)
    a = bl.stream_completion(fe.url, body).assert_ok()
    b = bl.stream_completion(fe.url, body).assert_ok()
    assert a.text == b.text and a.token_ids == b.token_ids, "identical requests differ"
    assert len(a.token_ids) == 40
    # a different seed or temperature gives another stream
    c = bl.stream_completion(fe.url, dict(body, seed=8)).assert_ok()
    assert c.token_ids != a.token_ids, "seed has no effect"
    # top_p is part of a sampled choice (temperature 1, the default, here), as in a real sampler:
    # another top_p, another stream; the same top_p, the same stream; top_p 1 is no nucleus (a);
    # top_p 0 keeps the most probable token alone, as temperature 0 does, which ignores top_p
    p9 = bl.stream_completion(fe.url, dict(body, top_p=0.9)).assert_ok()
    assert p9.token_ids != a.token_ids, "top_p has no effect on a sampled stream"
    assert bl.stream_completion(fe.url, dict(body, top_p=0.9)).assert_ok().text == p9.text, "the same top_p differs"
    p5 = bl.stream_completion(fe.url, dict(body, top_p=0.5)).assert_ok()
    assert p5.token_ids not in (a.token_ids, p9.token_ids), "top_p 0.5 and 0.9 give the same stream"
    assert bl.stream_completion(fe.url, dict(body, top_p=1)).assert_ok().text == a.text, "top_p 1 is not the default"
    greedy = bl.stream_completion(fe.url, dict(body, temperature=0)).assert_ok()
    assert greedy.token_ids != a.token_ids
    for t, p in ((0, 0.5), (0.7, 0), (1.5, 0)):
        g = bl.stream_completion(fe.url, dict(body, temperature=t, top_p=p)).assert_ok()
        assert g.text == greedy.text, f"temperature {t}, top_p {p} is not the greedy stream"
    # a stream with a nucleus continues exactly from its prefix (what a migration sends)
    for k in (1, 21):
        cont = bl.stream_completion(fe.url, dict(body, top_p=0.9, prompt=[101, 202, 303, 404] + p9.token_ids[:k],
                                                 max_tokens=40 - k)).assert_ok()
        assert cont.token_ids == p9.token_ids[k:], f"top_p 0.9: continuation after {k} tokens differs"
    for k in (1, 13, 39):
        head = bl.stream_completion(fe.url, dict(body, max_tokens=k)).assert_ok()
        assert head.token_ids == a.token_ids[:k], f"prefix of length {k} differs"
        cont = bl.stream_completion(fe.url, dict(body, prompt=[101, 202, 303, 404] + a.token_ids[:k],
                                                 max_tokens=40 - k)).assert_ok()
        assert cont.token_ids == a.token_ids[k:], f"continuation after {k} tokens differs"
        assert head.text + cont.text == a.text, f"continuation text after {k} tokens differs"
    # stop strings end the text before the stop and report finish_reason stop
    words = a.text.split()
    stop = words[5]
    st, _, r = bl.post_json(fe.url + "/v1/completions", dict(body, stop=[stop], return_token_ids=False))
    assert st == 200, r
    assert r["choices"][0]["finish_reason"] == "stop", r
    assert stop not in r["choices"][0]["text"] and a.text.startswith(r["choices"][0]["text"]), (r, a.text)


def check_errors(fe):
    def err(path, raw, status, headers=None):
        st, hdrs, data = bl.request("POST", fe.url + path, raw, headers or {"Content-Type": "application/json"})
        assert st == status, (path, raw[:80], st, data[:300])
        obj = json.loads(data)
        # OpenAI's shape: a string code, the type that goes with the status
        err = obj.get("error")
        assert isinstance(err, dict) and err["message"] and isinstance(err["code"], str), obj
        assert obj["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error"), obj
        return obj
    err("/v1/chat/completions", b"{not json", 400)
    err("/v1/chat/completions", json.dumps({"model": "mock-model"}).encode(), 400)
    err("/v1/chat/completions", json.dumps(bl.chat_body(max_tokens=-1)).encode(), 400)
    err("/v1/chat/completions", json.dumps(bl.chat_body(temperature="hot")).encode(), 400)
    err("/v1/completions", json.dumps({"model": "mock-model", "prompt": 5}).encode(), 400)
    err("/v1/chat/completions", json.dumps(bl.chat_body(model="no-such-model")).encode(), 404)
    big = json.dumps(bl.chat_body("x" * (5 << 20))).encode()
    try:
        err("/v1/chat/completions", big, 413)
    except (ConnectionResetError, BrokenPipeError):
        pass  # the server may close while the client is still sending; then the 413 is unread
    st, _, _ = bl.request("GET", fe.url + "/nope")
    assert st == 404


def check_probes(fe):
    st, _, body = bl.get_json(fe.url + "/v1/models")
    assert st == 200 and [m["id"] for m in body["data"]] == ["mock-model"], body
    st, _, body = bl.get_json(fe.url + "/live")
    assert st == 200 and body["status"] == "live", body
    st, _, body = bl.get_json(fe.url + "/health")
    assert st == 200 and body["status"] == "healthy" and len(body["instances"]) == 2, body
    inst = body["instances"][0]
    for k in ("namespace", "component", "endpoint", "instance_id", "transport"):
        assert k in inst, inst
    assert body["endpoints"] == ["dyn://dynamo.backend.generate"], body
    m = bl.metrics(fe.url)
    ok = bl.metric_sum(m, "dynamo_frontend_requests_total", status="success")
    assert ok >= 10, f"success counter {ok}"
    assert bl.metric_sum(m, "dynamo_frontend_time_to_first_token_seconds_count") >= 10
    assert bl.metric_sum(m, "dynamo_frontend_inflight_requests") == 0


def check_concurrency(c, fe):
    prompts = [f"prompt number {i}" for i in range(10)]
    refs = {}
    for p in prompts:
        st, _, body = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(p, max_tokens=30,
                                                                                  return_token_ids=True))
        assert st == 200, body
        refs[p] = body["choices"][0]["token_ids"]
    jobs = [(fe.url, bl.chat_body(prompts[i % 10], max_tokens=30, return_token_ids=True)) for i in range(200)]
    results = bl.run_concurrently(lambda url, body: bl.stream_chat(url, body, timeout=120), jobs, max_workers=200)
    for (url, body), s in zip(jobs, results):
        s.assert_ok("concurrent stream")
        assert s.token_ids == refs[body["messages"][0]["content"]], "a concurrent stream differs from its reference"
    # both workers served
    m = bl.metrics(fe.url)
    routed = [v for k, v in m.items() if k.startswith("baton_frontend_worker_inflight")]
    assert len(routed) == 2, routed


def check_membership_changes(c, fe):
    """A worker joins and another leaves (SIGTERM, drain) while requests flow; nothing fails."""
    stop = threading.Event()
    failures, done = [], [0]

    def traffic():
        i = 0
        while not stop.is_set():
            s = bl.stream_chat(fe.url, bl.chat_body(f"flow {i}", max_tokens=20), timeout=60)
            if not s.ok:
                failures.append(s.summary())
            done[0] += 1
            i += 1

    threads = [threading.Thread(target=traffic) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    w3 = c.start_worker(speedup_ratio=100)
    c.wait_workers(fe, 3, timeout=10)
    time.sleep(0.5)
    leaving = c.workers[0]
    leaving.proc.kill(signal.SIGTERM)
    rc = leaving.proc.wait(30)
    assert rc == 0, f"draining worker exited with {rc}"
    c.wait_workers(fe, 2, timeout=10)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(60)
    assert done[0] > 20, f"only {done[0]} requests ran"
    assert not failures, f"{len(failures)} requests failed during membership changes: {failures[:3]}"
    assert w3.proc.alive()


with bl.Cluster() as c:
    fe = c.start_frontend()
    c.start_worker(speedup_ratio=100)
    c.start_worker(speedup_ratio=100)
    c.wait_workers(fe, 2)
    check_shapes(fe)
    check_determinism_and_continuation(fe)
    check_errors(fe)
    check_probes(fe)
    check_concurrency(c, fe)
    check_membership_changes(c, fe)
print("test_serving: ok")
