"""What an OpenAI client expects of the frontend, through the real binaries (docs/security.md has
the error table, docs/engines.md the context length):

  * GET /v1/models lists "created" as Unix time; GET /v1/models/{id} answers one model, with the id
    percent-decoded and allowed to hold '/' (raw or %2F), and a 404 model_not_found otherwise;
  * every error body has OpenAI's shape {"error": {"message", "type", "param", "code"}} with a
    string code and the type that goes with the status, from the frontend's own checks, from the
    HTTP layer (400/413/431), from a worker (400), for a full frontend (503) and as the SSE event
    that ends a stream that failed mid-way, whose response ends whole on a connection that stays
    open for the next request;
  * a stream with stream_options.include_usage has "usage": null in every chunk before the usage
    chunk (as OpenAI's), and no "usage" key in any chunk without it; stream_options on a request
    whose "stream" is not true is a 400 with param "stream_options" (as OpenAI's and vLLM's), and
    "stream_options": null is absent;
  * parameters: only those that ask for a missing feature are refused (logprobs true, n > 1, tools,
    echo, suffix, tool_choice "required" or a named function, content parts other than text: an
    image would otherwise be dropped unseen); their neutral values pass; U+0000 inside content
    reaches the engine whole; a chat role OpenAI does not define is a 400 "messages.[i].role";
    a value compared with a fixed one (role, content part type, tool_choice, function_call, model)
    and a stop string holding U+0000 are a 400 invalid_value naming the field, never read as the
    part before the NUL;
  * sampling parameters: top_k an integer >= -1 (-1 and 0 are off), frequency_penalty and presence_penalty numbers in
    [-2, 2], logit_bias an object of at most 300 decimal token ids to numbers in [-100, 100]; a
    wrong type or range is a 400 naming the field; top_k and priority written 1.0 are integers;
  * prompt + max_tokens beyond the worker's --context-length is a 400 context_length_exceeded,
    checked by the frontend where it can count (max_tokens alone, token-id prompts: the worker
    sees nothing) and by the engine for text prompts (logged below WARN by neither process); without
    max_tokens the answer fits the rest;
  * HEAD /health and HEAD /live (frontend and worker) answer as GET without a body.
"""

import json
import socket
import threading
import time
import urllib.parse

import batonlib as bl

bl.deadline(200, "test_openai_conformance")

SLASHED = "org/model-b"  # a model id with a slash, as Hugging Face names are
CTX = 64


def error_of(status, body, want_status, code, param=None, what=""):
    """Asserts OpenAI's error shape with the given status, code and param; returns the error."""
    assert status == want_status, f"{what}: status {status}, expected {want_status}: {body!r}"
    assert isinstance(body, dict) and set(body) == {"error"}, f"{what}: not an error object: {body!r}"
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, f"{what}: fields {sorted(err)}: {err}"
    want_type = "server_error" if want_status >= 500 else "invalid_request_error"
    assert err["type"] == want_type, f"{what}: type {err['type']!r}, expected {want_type!r}"
    assert isinstance(err["code"], str) and err["code"] == code, f"{what}: code {err['code']!r}, expected {code!r}"
    assert err["param"] == param, f"{what}: param {err['param']!r}, expected {param!r}"
    assert isinstance(err["message"], str) and err["message"], f"{what}: empty message"
    return err


raw = bl.raw_exchange  # bytes on a fresh connection, all that comes back until it closes


def split_response(resp):
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {ln.split(":", 1)[0].strip().lower(): ln.split(":", 1)[1].strip() for ln in lines[1:] if ":" in ln}
    return status, hdrs, body


def check_head(port, path, what):
    """HEAD answers as GET (status, type, length) and sends no body."""
    g_status, g_hdrs, g_body = split_response(raw(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                                                  .encode()))
    h_status, h_hdrs, h_body = split_response(raw(port, f"HEAD {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                                                  .encode()))
    assert g_status == 200 and h_status == 200, f"{what} {path}: GET {g_status}, HEAD {h_status}"
    assert h_body == b"", f"{what} HEAD {path} sent a body: {h_body[:100]!r}"
    assert h_hdrs.get("content-type") == g_hdrs.get("content-type"), (what, path, h_hdrs, g_hdrs)
    assert int(h_hdrs["content-length"]) > 0, (what, path, h_hdrs)
    if path == "/live":  # a constant body: the length must be the GET body's
        assert int(h_hdrs["content-length"]) == len(g_body), (what, h_hdrs, len(g_body))


def metric(url, name, **labels):
    return bl.metric_sum(bl.metrics(url), name, **labels)


with bl.Cluster() as c:
    t0 = time.time()
    w = c.start_worker(speedup_ratio=1000, context_length=CTX, system_port=True, wait=True)
    c.start_worker(speedup_ratio=1000, model_name=SLASHED)
    # a worker whose engine fails every sequence after its first 4 tokens: the mid-stream error
    c.start_worker(speedup_ratio=200, model_name="faulty", fault_error_after_tokens=4)
    fe = c.start_frontend(migration_limit=0)
    c.wait_workers(fe, 3)
    u = fe.url

    # ---- /v1/models and /v1/models/{id}
    st, _, body = bl.get_json(u + "/v1/models")
    assert st == 200 and body["object"] == "list", (st, body)
    ids = sorted(m["id"] for m in body["data"])
    assert ids == sorted(["mock-model", SLASHED, "faulty"]), ids
    for m in body["data"]:
        assert t0 - 60 <= m["created"] <= time.time() + 1, f"created is not Unix time: {m}"
    for path in ("/v1/models/mock-model", "/v1/models/" + SLASHED, "/v1/models/" + urllib.parse.quote(SLASHED, safe=""),
                 "/v1/models/%6Dock-model"):
        st, _, m = bl.get_json(u + path)
        want = SLASHED if "org" in path else "mock-model"
        assert st == 200 and m["id"] == want and m["object"] == "model" and m["owned_by"] == "baton", (path, st, m)
        assert t0 - 60 <= m["created"] <= time.time() + 1, m
    for path in ("/v1/models/nope", "/v1/models/org", "/v1/models/mock-model%", "/v1/models/mock%00model"):
        st, _, b = bl.get_json(u + path)
        error_of(st, b, 404, "model_not_found", "model", path)
    st, _, b = bl.post_json(u + "/v1/models/mock-model", {})
    error_of(st, b, 405, "method_not_allowed", None, "POST /v1/models/{id}")

    # ---- error shapes from the frontend's checks and from the HTTP layer
    st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(model="nope"))
    error_of(st, b, 404, "model_not_found", "model", "unknown model")
    st, _, data = bl.request("POST", u + "/v1/chat/completions", b"{oops", {"Content-Type": "application/json"})
    error_of(st, json.loads(data), 400, "invalid_json", None, "bad JSON")
    st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(max_tokens="ten"))
    error_of(st, b, 400, "invalid_value", "max_tokens", "max_tokens a string")
    st, _, b = bl.get_json(u + "/v1/nowhere")
    error_of(st, b, 404, "unknown_url", None, "unknown route")
    st, _, body = split_response(raw(fe.port, b"NOT HTTP AT ALL\r\n\r\n"))
    error_of(st, json.loads(body), 400, "malformed_request", None, "not HTTP")
    st, _, body = split_response(raw(fe.port, b"GET /live HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"))
    error_of(st, json.loads(body), 431, "headers_too_large", None, "huge header")
    big = b"x" * (5 << 20)
    st, _, body = split_response(raw(fe.port, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: " +
                                     str(len(big)).encode() + b"\r\n\r\n" + big))
    error_of(st, json.loads(body), 413, "request_too_large", None, "huge body")

    # ---- parameters: refuse only what asks for a missing feature
    for extra, param in (({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"), ({"n": 2}, "n"),
                         ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")):
        st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(max_tokens=2, **extra))
        error_of(st, b, 400, "unsupported_value", param, f"chat {extra}")
    for extra, param in (({"logprobs": 3}, "logprobs"), ({"echo": True}, "echo"), ({"best_of": 2}, "best_of")):
        st, _, b = bl.post_json(u + "/v1/completions", bl.completion_body(max_tokens=2, **extra))
        error_of(st, b, 400, "unsupported_value", param, f"completions {extra}")
    st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(max_tokens=2, logprobs="yes"))
    error_of(st, b, 400, "invalid_type", "logprobs", "logprobs a string")
    # an out-of-range value is a mistake (invalid_value), not a request for a missing feature
    for extra, param in (({"top_logprobs": -1}, "top_logprobs"), ({"top_logprobs": 21}, "top_logprobs"),
                         ({"n": 0}, "n")):
        st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(max_tokens=2, **extra))
        error_of(st, b, 400, "invalid_value", param, f"chat {extra}")
    st, _, b = bl.post_json(u + "/v1/completions", bl.completion_body(max_tokens=2, logprobs=-1))
    error_of(st, b, 400, "invalid_value", "logprobs", "completions logprobs -1")
    # JSON has one number type: an integral 1.0 is 1 for every integer parameter (as OpenAI's and
    # vLLM's parsers), 1.5 is not an integer; 2.0 asks for two choices
    st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(max_tokens=3.0, n=1.0, seed=7.0, top_logprobs=0.0))
    assert st == 200 and b["usage"]["completion_tokens"] == 3, (st, b)
    st, _, b = bl.post_json(u + "/v1/completions", bl.completion_body(max_tokens=2.0, best_of=1.0, logprobs=0.0))
    assert st == 200 and b["usage"]["completion_tokens"] == 2, (st, b)
    for extra, code, param in (({"n": 1.5}, "invalid_type", "n"), ({"max_tokens": 2.5}, "invalid_value", "max_tokens"),
                               ({"seed": 1.5}, "invalid_type", "seed"), ({"n": 2.0}, "unsupported_value", "n")):
        st, _, b = bl.post_json(u + "/v1/chat/completions", dict(bl.chat_body(max_tokens=2), **extra))
        error_of(st, b, 400, code, param, f"chat {extra}")
    # top_k and priority are integer parameters too: 1.0 is 1, "1" and 1.5 are not integers
    st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(max_tokens=2, top_k=1.0, priority=1.0))
    assert st == 200 and b["usage"]["completion_tokens"] == 2, (st, b)
    # sampling parameters the llama engine applies (docs/engines.md §3.4): OpenAI's types and ranges,
    # never read as "off"; logit_bias keys are token ids in decimal, at most 300 of them
    sampling_cases = (({"top_k": "1"}, "invalid_type", "top_k"), ({"top_k": 1.5}, "invalid_type", "top_k"),
                      ({"top_k": -2}, "invalid_value", "top_k"), ({"top_k": 2 ** 31}, "invalid_value", "top_k"),
                      ({"frequency_penalty": 5}, "invalid_value", "frequency_penalty"),
                      ({"frequency_penalty": -2.5}, "invalid_value", "frequency_penalty"),
                      ({"frequency_penalty": "1"}, "invalid_type", "frequency_penalty"),
                      ({"presence_penalty": 2.01}, "invalid_value", "presence_penalty"),
                      ({"presence_penalty": [1]}, "invalid_type", "presence_penalty"),
                      ({"logit_bias": [1, 2]}, "invalid_type", "logit_bias"),
                      ({"logit_bias": "x"}, "invalid_type", "logit_bias"),
                      ({"logit_bias": {"x": 1}}, "invalid_value", "logit_bias"),
                      ({"logit_bias": {"-1": 1}}, "invalid_value", "logit_bias"),
                      ({"logit_bias": {"1.0": 1}}, "invalid_value", "logit_bias"),
                      ({"logit_bias": {" 1": 1}}, "invalid_value", "logit_bias"),
                      ({"logit_bias": {"": 1}}, "invalid_value", "logit_bias"),
                      ({"logit_bias": {"99999999999": 1}}, "invalid_value", "logit_bias"),
                      ({"logit_bias": {"264": 101}}, "invalid_value", "logit_bias"),
                      ({"logit_bias": {"264": -100.5}}, "invalid_value", "logit_bias"),
                      ({"logit_bias": {"264": "1"}}, "invalid_type", "logit_bias"),
                      ({"logit_bias": {"264": None}}, "invalid_type", "logit_bias"),
                      ({"logit_bias": {str(i): 1 for i in range(301)}}, "invalid_value", "logit_bias"))
    for extra, code, param in sampling_cases:
        for path, body in (("/v1/chat/completions", bl.chat_body(max_tokens=2)),
                           ("/v1/completions", bl.completion_body(max_tokens=2))):
            st, _, b = bl.post_json(u + path, dict(body, **extra))
            error_of(st, b, 400, code, param, f"{path} {str(extra)[:60]}")
    for extra in ({"top_k": 0}, {"top_k": -1}, {"top_k": 40}, {"top_k": None}, {"frequency_penalty": -2}, {"frequency_penalty": 2},
                  {"presence_penalty": 0.5}, {"frequency_penalty": None, "presence_penalty": None},
                  {"logit_bias": {}}, {"logit_bias": None}, {"logit_bias": {"0": -100, "7": 100, "264": 2.5}},
                  {"logit_bias": {str(i): 1 for i in range(300)}}):
        st, _, b = bl.post_json(u + "/v1/chat/completions", dict(bl.chat_body(max_tokens=2), **extra))
        assert st == 200 and b["usage"]["completion_tokens"] == 2, (extra, st, b)
    # a non-boolean include_usage is refused (OpenAI: 400 invalid_type), never read as false
    for bad in ("yes", 1, 0, [], {}):
        for path, body in (("/v1/chat/completions", bl.chat_body(max_tokens=2, stream=True)),
                           ("/v1/completions", bl.completion_body(max_tokens=2, stream=True))):
            st, _, b = bl.post_json(u + path, dict(body, stream_options={"include_usage": bad}))
            error_of(st, b, 400, "invalid_type", "stream_options.include_usage", f"{path} include_usage {bad!r}")
    # stream_options only with "stream": true (OpenAI and vLLM: 400, param "stream_options"); false,
    # absent and null are not true; "stream_options": null is absent and passes, as every null here
    for path, body in (("/v1/chat/completions", bl.chat_body(max_tokens=2)),
                       ("/v1/completions", bl.completion_body(max_tokens=2))):
        for stream in (False, None, "absent"):
            b = dict(body) if stream == "absent" else dict(body, stream=stream)
            for so in ({"include_usage": True}, {"include_usage": False}, {}):
                st, _, r = bl.post_json(u + path, dict(b, stream_options=so))
                err = error_of(st, r, 400, "invalid_value", "stream_options", f"{path} stream {stream} options {so}")
                assert "'stream' is true" in err["message"], err
            st, _, r = bl.post_json(u + path, dict(b, stream_options=None))
            assert st == 200 and r["object"] in ("chat.completion", "text_completion"), (path, stream, st, r)
        st, hdrs, data = bl.request("POST", u + path, dict(body, stream=True, stream_options={"include_usage": True}))
        assert st == 200 and hdrs.get("content-type", "").startswith("text/event-stream"), (path, st, data[:200])
        assert b'"usage":{' in data and data.rstrip().endswith(b"data: [DONE]"), (path, data[-300:])
    for ok in (True, False, None):  # a boolean (or null: not given) streams, with usage only for true
        s = bl.stream_chat(u, bl.chat_body(max_tokens=2, stream=True, stream_options={"include_usage": ok}))
        assert s.status == 200 and s.done, (ok, s.status, s.raw[:300])
        assert (s.usage is not None) == (ok is True), (ok, s.usage)
    # with include_usage, as OpenAI: "usage": null in every chunk but the last, which has "choices": []
    # and the usage object; without it, no chunk has a "usage" key at all (chat and completions)
    for fn, body in ((bl.stream_chat, bl.chat_body(max_tokens=6, stream=True)),
                     (bl.stream_completion, bl.completion_body(max_tokens=6, stream=True))):
        for ok in (True, False, None):
            s = fn(u, dict(body, stream_options={"include_usage": ok}))
            s.assert_ok(f"{fn.__name__} include_usage {ok!r}")
            ev = s.events
            assert len(ev) >= 3, (fn.__name__, ok, ev)  # token chunks, the finish chunk, the usage chunk
            if ok is True:
                bad = [e for e in ev[:-1] if "usage" not in e or e["usage"] is not None]
                assert not bad, (fn.__name__, "chunks before the last without \"usage\": null", bad)
                assert ev[-1]["choices"] == [] and ev[-1]["usage"]["completion_tokens"] == 6, (fn.__name__, ev[-1])
            else:
                bad = [e for e in ev if "usage" in e]
                assert not bad, (fn.__name__, ok, "chunks with a usage key without include_usage", bad)
    st, _, b = bl.post_json(u + "/v1/chat/completions",
                            bl.chat_body(max_tokens=2, n=1, logprobs=False, top_logprobs=0, tools=[], tool_choice="none",
                                         user="u1", presence_penalty=0, frequency_penalty=0, logit_bias={}))
    assert st == 200 and b["choices"][0]["message"]["content"], (st, b)
    st, _, b = bl.post_json(u + "/v1/completions", bl.completion_body(max_tokens=2, logprobs=0, echo=False, best_of=1))
    assert st == 200 and b["choices"][0]["text"], (st, b)
    # U+0000 inside content is valid JSON and reaches the engine whole (not cut at the NUL)
    st, _, with_nul = bl.post_json(u + "/v1/chat/completions", bl.chat_body("alpha\u0000beta gamma", max_tokens=4))
    assert st == 200, (st, with_nul)
    st, _, cut = bl.post_json(u + "/v1/chat/completions", bl.chat_body("alpha", max_tokens=4))
    assert st == 200, (st, cut)
    assert with_nul["usage"]["prompt_tokens"] > cut["usage"]["prompt_tokens"], (with_nul["usage"], cut["usage"])
    st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(model="mock-model\u0000x"))
    error_of(st, b, 400, "invalid_value", "model", "NUL in the model name")
    # a field compared with a fixed value is compared whole: U+0000 does not make "user\u0000x" pass
    # as "user", "text\u0000x" as a text part, or "none\u0000x" as "none" (streaming or not)
    nul_cases = [
        ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user\u0000x", "content": "hi"}]},
         "messages.[1].role"),
        ({"messages": [{"role": "assistant\u0000", "content": "hi"}]}, "messages.[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                    {"type": "text\u0000image_url", "text": "b"}]}]},
         "messages.[0].content.[1].type"),
        ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "none\u0000x"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "hi"}], "function_call": "auto\u0000"}, "function_call"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "a\u0000b"]}, "stop"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": "\u0000"}, "stop"),
    ]
    for extra, param in nul_cases:
        for stream in (False, True):
            body = {"model": "mock-model", "max_tokens": 2, "stream": stream, **extra}
            st, _, b = bl.post_json(u + "/v1/chat/completions", body)
            err = error_of(st, b, 400, "invalid_value", param, f"U+0000 in {param} stream {stream}")
            assert "U+0000" in err["message"], err
    st, _, b = bl.post_json(u + "/v1/completions", bl.completion_body(model="mock-model\u0000", max_tokens=2))
    error_of(st, b, 400, "invalid_value", "model", "NUL at the end of the model name")
    # free text keeps it: a text part holding U+0000 is read whole, as string content is
    st, _, parts = bl.post_json(u + "/v1/chat/completions", {"model": "mock-model", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "alpha\u0000beta gamma"}]}]})
    assert st == 200 and parts["usage"]["prompt_tokens"] == with_nul["usage"]["prompt_tokens"], (st, parts, with_nul)

    # ---- roles, content parts, tool_choice, suffix
    # a role OpenAI does not define is a 400 naming the message, as OpenAI's (streaming or not)
    for role in ("bot", "User", "", "tools"):
        for stream in (False, True):
            body = {"model": "mock-model", "max_tokens": 2, "stream": stream,
                    "messages": [{"role": "system", "content": "be brief"}, {"role": role, "content": "hi"}]}
            st, _, b = bl.post_json(u + "/v1/chat/completions", body)
            err = error_of(st, b, 400, "invalid_value", "messages.[1].role", f"role {role!r} stream {stream}")
            assert "'developer'" in err["message"], err
    # every role OpenAI defines passes, and text parts are read; content may be null (or absent) on
    # an assistant message that carries its tool or function calls (a replayed conversation), and
    # on a function message
    msgs = [{"role": r, "content": "x"} for r in ("system", "developer", "user", "assistant", "tool", "function")]
    msgs.append({"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]})
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs += [{"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "assistant", "tool_calls": [call]},
             {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
             {"role": "tool", "tool_call_id": "call_1", "content": "42"}, {"role": "function", "name": "f",
                                                                          "content": None}]
    st, _, b = bl.post_json(u + "/v1/chat/completions", {"model": "mock-model", "max_tokens": 2, "messages": msgs})
    assert st == 200 and b["choices"][0]["message"]["content"], (st, b)
    # null content elsewhere, and an empty list of parts, are refused as OpenAI's schema does
    for m, code in (({"role": "user", "content": None}, "invalid_type"),
                    ({"role": "assistant", "content": None}, "invalid_type"),
                    ({"role": "assistant", "content": None, "tool_calls": []}, "invalid_type"),
                    ({"role": "system", "content": None}, "invalid_type"),
                    ({"role": "user", "content": []}, "invalid_value")):
        for stream in (False, True):
            body = {"model": "mock-model", "max_tokens": 2, "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}, m]}
            st, _, b = bl.post_json(u + "/v1/chat/completions", body)
            error_of(st, b, 400, code, "messages.[1].content", f"message {m!r} stream {stream}")
    # parts that are not text would be dropped by every engine (the model would answer without
    # seeing the image): refused, naming the part
    for part in ({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                 {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                 {"type": "file", "file": {"file_id": "file-1"}}):
        for stream in (False, True):
            body = {"model": "mock-model", "max_tokens": 2, "stream": stream,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]}
            st, _, b = bl.post_json(u + "/v1/chat/completions", body)
            err = error_of(st, b, 400, "unsupported_value", "messages.[0].content.[1].type", f"part {part['type']}")
            assert f"'{part['type']}' are not supported" in err["message"], err
    # a part's type is required (OpenAI's schema): one without it is refused as a null one is
    for part, code in (("text", "invalid_type"), ({"type": "text", "text": 3}, "invalid_type"),
                       ({"type": 7, "text": "x"}, "invalid_type"), ({"image_url": {"url": "x"}}, "invalid_type"),
                       ({"text": "hi"}, "invalid_type"), ({"type": None, "text": "hi"}, "invalid_type")):
        body = {"model": "mock-model", "max_tokens": 2, "messages": [{"role": "user", "content": [part]}]}
        st, _, b = bl.post_json(u + "/v1/chat/completions", body)
        err = error_of(st, b, 400, code, "messages.[0].content.[0]", f"part {part!r}")
        assert "'type' \"text\" (required)" in err["message"], err
    # tool_choice asking for a tool call without tools (OpenAI: only allowed when tools are
    # specified); baton refuses non-empty tools, so only "none", "auto" and null pass
    for choice in ("required", {"type": "function", "function": {"name": "f"}}, "sometimes"):
        for tools in ("absent", [], None):
            extra = {} if tools == "absent" else {"tools": tools}
            st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(max_tokens=2, tool_choice=choice, **extra))
            err = error_of(st, b, 400, "invalid_value", "tool_choice", f"tool_choice {choice!r} tools {tools!r}")
            assert "only allowed when 'tools' are specified" in err["message"], err
    st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(max_tokens=2, function_call={"name": "f"}))
    error_of(st, b, 400, "invalid_value", "function_call", "function_call without functions")
    for choice in ("none", "auto", None):
        st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(max_tokens=2, tool_choice=choice,
                                                                       function_call=choice))
        assert st == 200 and b["choices"][0]["message"]["content"], (choice, st, b)
    # suffix on /v1/completions (vLLM: not supported) instead of an answer that ignores it
    for sfx in ("the end.", "", ["x"]):
        for stream in (False, True):
            st, _, b = bl.post_json(u + "/v1/completions", bl.completion_body(max_tokens=2, suffix=sfx, stream=stream))
            err = error_of(st, b, 400, "unsupported_value", "suffix", f"suffix {sfx!r}")
            assert err["message"] == "suffix is not currently supported", err
    st, _, b = bl.post_json(u + "/v1/completions", bl.completion_body(max_tokens=2, suffix=None))
    assert st == 200 and b["choices"][0]["text"], (st, b)

    # ---- context length (the worker's --context-length, from its model card)
    before = metric(w.system_url, "dynamo_component_requests_total")
    st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body("hi", max_tokens=CTX + 1))
    err = error_of(st, b, 400, "context_length_exceeded", "messages", "max_tokens over the context")
    assert f"maximum context length is {CTX} tokens" in err["message"], err
    st, _, b = bl.post_json(u + "/v1/completions", {"model": "mock-model", "prompt": list(range(CTX - 9)),
                                                    "max_tokens": 10})
    error_of(st, b, 400, "context_length_exceeded", "prompt", "token-id prompt + max_tokens")
    s = bl.stream_chat(u, bl.chat_body("hi", max_tokens=CTX + 5, stream=True))
    assert s.status == 400 and s.error["code"] == "context_length_exceeded", s.summary()
    after = metric(w.system_url, "dynamo_component_requests_total")
    assert after == before, f"the frontend sent {after - before} requests it could refuse itself to the worker"
    # a token-id prompt that fits exactly, and a text prompt the engine has to count
    st, _, b = bl.post_json(u + "/v1/completions", {"model": "mock-model", "prompt": list(range(CTX - 10)),
                                                    "max_tokens": 10})
    assert st == 200 and b["usage"]["completion_tokens"] == 10, (st, b)
    long_text = " ".join(["word"] * (CTX + 10))
    st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(long_text, max_tokens=5))
    err = error_of(st, b, 400, "context_length_exceeded", "messages", "text prompt over the context")
    assert "in the messages" in err["message"], err
    s = bl.stream_chat(u, bl.chat_body(long_text, max_tokens=5, stream=True))
    assert s.status == 400 and s.error["code"] == "context_length_exceeded" and not s.events, s.summary()
    assert metric(w.system_url, "dynamo_component_errors_total") >= 2
    # the engine's refusal is the client's 400, as the frontend's own refusals are: no warning per
    # such request in the worker's or the frontend's log (a client could fill them); the refusal
    # did happen in the worker (its error counter moved)
    before = metric(w.system_url, "dynamo_component_errors_total")
    st, _, b = bl.post_json(u + "/v1/chat/completions", bl.chat_body(long_text, max_tokens=5),
                            headers={"X-Request-Id": "ctx-over-quiet"})
    assert st == 400 and b["error"]["code"] == "context_length_exceeded", (st, b)
    assert metric(w.system_url, "dynamo_component_errors_total") == before + 1
    for p in (w.proc, fe.proc):
        noisy = [line for line in p.log_text().splitlines() if " WARN " in line and
                 ("ctx-over-quiet" in line or "maximum context length" in line)]
        assert not noisy, noisy
    # without max_tokens the completion takes what is left of the context
    prompt = list(range(CTX - 7))
    st, _, b = bl.post_json(u + "/v1/completions", {"model": "mock-model", "prompt": prompt})
    assert st == 200 and b["usage"]["completion_tokens"] == 7 and b["choices"][0]["finish_reason"] == "length", b

    # ---- a stream that fails mid-way ends with an SSE error event of the same shape
    s = bl.stream_chat(u, bl.chat_body("fail later", model="faulty", max_tokens=50, stream=True))
    assert s.status == 200 and s.text and not s.done and s.error, s.summary()
    err = s.error
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == "server_error" and err["code"] == "engine_error" and err["param"] is None, err
    # a failed stream's response ends whole (its last chunk) on a connection its head called
    # keep-alive: the next request on that connection is answered (a client that reuses it, as
    # node's fetch does, must not see its next POST fail). The fault above fires once; an operator
    # kill ends a stream with the same error event.
    body = json.dumps(bl.chat_body("run long", model=SLASHED, max_tokens=500000, stream=True)).encode()
    with socket.create_connection(("127.0.0.1", fe.port), timeout=10) as sk:
        sk.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                   b"X-Request-Id: keepalive-after-error\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        got = sk.recv(65536)
        st, _, b = bl.post_json(u + "/v1/requests/keepalive-after-error/cancel", {"mode": "kill"})
        assert st == 200 and b["status"] == "cancelling", (st, b)
        while not got.endswith(b"\r\n0\r\n\r\n"):
            more = sk.recv(65536)
            assert more, f"the connection closed before the killed stream's last chunk: {got[-300:]!r}"
            got += more
        assert b"Connection: keep-alive" in got.split(b"\r\n\r\n", 1)[0], got[:300]
        assert b'"code":"request_cancelled"' in got[-400:] and b"[DONE]" not in got, got[-400:]
        sk.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        nxt = b""
        while b"\r\n\r\n" not in nxt:
            try:
                more = sk.recv(65536)
            except ConnectionResetError:
                more = b""
            assert more, "the connection closed after a failed stream: the next request on it got no answer"
            nxt += more
        assert nxt.startswith(b"HTTP/1.1 200 "), nxt[:200]

    # ---- HEAD probes
    for path in ("/health", "/live"):
        check_head(fe.port, path, "frontend")
        check_head(w.system_port, path, "worker")

with bl.Cluster() as c:
    # ---- 503 from a full frontend, in the same shape
    c.start_worker(speedup_ratio=5)
    fe = c.start_frontend(max_concurrent_requests=1)
    c.wait_workers(fe, 1)
    hold = threading.Event()
    first = threading.Event()

    def hold_stream(s, obj):
        first.set()
        hold.wait(30)
        return True

    t = threading.Thread(target=bl.stream_chat, args=(fe.url, bl.chat_body("long", max_tokens=5000, stream=True)),
                         kwargs={"on_event": hold_stream})
    t.start()
    try:
        assert first.wait(20), "the first stream never started"
        st, hdrs, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=2))
        error_of(st, b, 503, "overloaded", None, "over --max-concurrent-requests")
        assert hdrs.get("retry-after"), hdrs
    finally:
        hold.set()
        t.join(30)
print("test_openai_conformance: ok")
