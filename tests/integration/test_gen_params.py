"""Request fields that ask for output the engines generating text themselves cannot give are refused,
never ignored, on the mocker and on the llama engine (docs/engines.md, "Request fields"):
response_format other than {"type": "text"}, vLLM's guided_json / guided_regex / guided_choice /
guided_grammar / structured_outputs, modalities other than ["text"], audio. Each is a 400 with
code unsupported_value (invalid_value for a malformed response_format or modalities) naming the
field, unary and streamed, for chat and completions, before any token; {"type": "text"} and
["text"] are served. vLLM's bad_words (non-empty), truncate_prompt_tokens and
min_tokens with stop_token_ids are refused the same way; stop_token_ids is served (the completion
ends with "stop" at the first token named, that token delivered with its text), and so is
include_stop_str_in_output (the text ends after the stop string, not before it). The form of vLLM's generation fields (min_p, repetition_penalty, ignore_eos,
min_tokens, continue_final_message, stop_token_ids, include_stop_str_in_output, bad_words,
truncate_prompt_tokens) is the frontend's 400 (invalid_type / invalid_value, the field
named) whatever the engine; continue_final_message after a user message is the engine's 400. The
mocker honours ignore_eos and min_tokens by itself (it has no end of sequence and runs to
max_tokens) but refuses min_tokens with stop strings, which it does not hold off. A worker reached
on its request plane (no frontend) refuses too: ERROR 25 (BT_ERR_UNSUPPORTED_PARAM) or 26
(BT_ERR_INVALID_PARAM). The refusals are the client's mistakes: no WARN in either process.
Skipped for llama (the mocker part still runs) only when scripts/setup did not fetch llama.cpp.
"""

import os

import batonlib as bl
import rpclib

bl.deadline(180, "test_gen_params")

UNSUPPORTED = [
    ("response_format", {"type": "json_object"}, "unsupported_value"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
     "unsupported_value"),
    ("response_format", {"type": "bogus"}, "unsupported_value"),
    ("response_format", "json", "invalid_value"),
    ("guided_json", {"type": "object"}, "unsupported_value"),
    ("guided_regex", "[a-z]+", "unsupported_value"),
    ("guided_choice", ["yes", "no"], "unsupported_value"),
    ("guided_grammar", "root ::= \"a\"", "unsupported_value"),
    ("structured_outputs", {"json": {"type": "object"}}, "unsupported_value"),
    ("modalities", ["audio"], "unsupported_value"),
    ("modalities", ["text", "audio"], "unsupported_value"),
    ("modalities", "text", "invalid_value"),
    ("audio", {"voice": "alloy", "format": "wav"}, "unsupported_value"),
    ("bad_words", ["was"], "unsupported_value"),
    ("truncate_prompt_tokens", 5, "unsupported_value"),
    ("truncate_prompt_tokens", -1, "unsupported_value"),
]

MALFORMED = [
    ("min_p", 1.5, "invalid_value"), ("min_p", "0.1", "invalid_type"), ("min_p", -0.1, "invalid_value"),
    ("repetition_penalty", 0, "invalid_value"), ("repetition_penalty", -1, "invalid_value"),
    ("repetition_penalty", "2", "invalid_type"),
    ("ignore_eos", "yes", "invalid_type"), ("ignore_eos", 1, "invalid_type"),
    ("min_tokens", 1.5, "invalid_type"), ("min_tokens", -1, "invalid_value"), ("min_tokens", 9, "invalid_value"),
    ("continue_final_message", 1, "invalid_type"),
    ("stop_token_ids", "garbage", "invalid_type"), ("stop_token_ids", [1.5], "invalid_type"),
    ("stop_token_ids", 286, "invalid_type"), ("stop_token_ids", [-1], "invalid_value"),
    ("stop_token_ids", list(range(65)), "invalid_value"),
    ("include_stop_str_in_output", "yes", "invalid_type"), ("bad_words", "was", "invalid_type"),
    ("bad_words", [1], "invalid_type"), ("truncate_prompt_tokens", "5", "invalid_type"),
    ("truncate_prompt_tokens", 0, "invalid_value"),
]


def bodies(field, value, max_tokens=8):
    yield "completions", bl.completion_body("Once upon a time", max_tokens=max_tokens, **{field: value})
    yield "chat/completions", bl.chat_body("Tell me a story", max_tokens=max_tokens, **{field: value})


def refused(fe, path, body, field, code, what):
    st, _, b = bl.post_json(fe.url + "/v1/" + path, body)
    assert st == 400 and b["error"]["param"] == field and b["error"]["code"] == code, f"{what} {path}: {st} {b}"
    stream = (bl.stream_chat if path.startswith("chat") else bl.stream_completion)(fe.url, body)
    assert stream.status == 400 and stream.error and stream.error.get("param") == field and \
        stream.error.get("code") == code and not stream.text, f"{what} {path}, streamed: {stream.summary()}"


def engine(c, fe, w, name):
    c.wait_workers(fe, 1)
    for field, value, code in UNSUPPORTED:
        for path, body in bodies(field, value):
            refused(fe, path, body, field, code, f"{name}: {field}={value!r}")
    for field, value in (("response_format", {"type": "text"}), ("modalities", ["text"]), ("response_format", None)):
        for path, body in bodies(field, value):
            st, _, b = bl.post_json(fe.url + "/v1/" + path, body)
            assert st == 200, f"{name}: {field}={value!r} {path}: {st} {b}"
    for field, value, code in MALFORMED:
        for path, body in bodies(field, value):
            refused(fe, path, body, field, code, f"{name}: {field}={value!r}")
    # min_tokens holds off stop tokens in vLLM, which the engines do not: refused with them
    for path, body in bodies("stop_token_ids", [5]):
        refused(fe, path, dict(body, min_tokens=2), "min_tokens", "unsupported_value",
                f"{name}: min_tokens with stop_token_ids")
    # stop_token_ids: the completion ends at the first token named, delivered with its text
    plain = bl.stream_completion(fe.url, bl.completion_body("Once upon a time", max_tokens=12, temperature=0,
                                                            return_token_ids=True))
    plain.assert_ok(f"{name}: plain")
    ids = plain.token_ids
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    for stream in (True, False):
        body = bl.completion_body("Once upon a time", max_tokens=12, temperature=0, return_token_ids=True,
                                  stop_token_ids=[ids[k], 999999], stream=stream)
        if stream:
            got = bl.stream_completion(fe.url, body)
            got.assert_ok(f"{name}: stop_token_ids")
            assert got.token_ids == ids[:k + 1] and got.finish_reason == "stop", (name, got.summary(), ids)
            text = got.text
        else:
            st, _, b = bl.post_json(fe.url + "/v1/completions", body)
            assert st == 200 and b["choices"][0]["finish_reason"] == "stop", (name, st, b)
            assert b["usage"]["completion_tokens"] == k + 1, (name, b, ids)
            text = b["choices"][0]["text"]
        assert plain.text.startswith(text) and len(text) < len(plain.text), (name, text, plain.text)
    # include_stop_str_in_output: the text ends after the stop string instead of before it
    txt = plain.text
    at = next(i for i in range(4, len(txt) - 3) if txt.find(txt[i:i + 3]) == i)
    for include, want in ((False, txt[:at]), (True, txt[:at + 3])):
        body = bl.completion_body("Once upon a time", max_tokens=12, temperature=0, stop=[txt[at:at + 3]],
                                  include_stop_str_in_output=include)
        st, _, b = bl.post_json(fe.url + "/v1/completions", body)
        assert st == 200 and b["choices"][0]["text"] == want and b["choices"][0]["finish_reason"] == "stop", \
            (name, include, st, b, txt)
        got = bl.stream_completion(fe.url, dict(body, stream=True))
        got.assert_ok(f"{name}: include_stop_str_in_output={include}")
        assert got.text == want and got.finish_reason == "stop", (name, include, got.summary(), txt)
    body = bl.chat_body("Tell me a story", max_tokens=8, continue_final_message=True)
    refused(fe, "chat/completions", body, "continue_final_message", "invalid_value", f"{name}: continue after user")
    # straight to the worker's request plane: the engine refuses before any token
    conn = rpclib.Conn(w.rpc_port)
    for extra, code in (({"response_format": {"type": "json_object"}}, 25), ({"guided_regex": "a"}, 25),
                        ({"modalities": ["audio"]}, 25), ({"audio": {}}, 25), ({"min_p": 2}, 26),
                        ({"repetition_penalty": 0}, 26), ({"min_tokens": 3, "max_tokens": 2}, 26),
                        ({"bad_words": ["a"]}, 25), ({"truncate_prompt_tokens": 3}, 25),
                        ({"stop_token_ids": "x"}, 26)):
        body = dict(bl.completion_body("Once upon a time", max_tokens=4), **extra)
        r = rpclib.read_stream(conn, conn.request({"request_id": "raw", "api": "completion", "body": body,
                                                   "max_tokens": 4}))
        assert r.error and r.error[0] == code and not r.ids, (name, extra, r.error, r.ids)
    conn.close()
    for proc, who in ((fe.proc, "frontend"), (w.proc, "worker")):
        warns = [ln for ln in proc.log_text().splitlines() if " WARN " in ln and "not supported" in ln]
        assert not warns, f"{name}: the {who} warned for a client's refused field: {warns}"
    print(f"{name}: {len(UNSUPPORTED)} unsupported and {len(MALFORMED)} malformed fields refused with 400 naming "
          f"the field, unary and streamed, chat and completions; text output served")


with bl.Cluster() as c:
    fe = c.start_frontend()
    w = c.start_worker(system_port=True, wait=True)
    engine(c, fe, w, "mocker")
    # the mocker honours ignore_eos and min_tokens without stop strings: a completion of max_tokens
    st, _, b = bl.post_json(fe.url + "/v1/completions", bl.completion_body(max_tokens=6, ignore_eos=True,
                                                                            min_tokens=6))
    assert st == 200 and b["usage"]["completion_tokens"] == 6, (st, b)
    body = bl.completion_body(max_tokens=6, min_tokens=3, stop=["the"])
    refused(fe, "completions", body, "min_tokens", "unsupported_value", "mocker: min_tokens with a stop string")
    print("mocker: ignore_eos and min_tokens served (runs to max_tokens), min_tokens with stop refused")

if os.environ.get("BATON_NO_LLAMA") == "1":
    print("BATON_NO_LLAMA=1: the llama engine was not fetched; its part skipped")
else:
    with bl.Cluster() as c:
        fe = c.start_frontend()
        w = c.start_worker(engine="llama", system_port=True, wait=True)
        engine(c, fe, w, "llama")
print("test_gen_params: OK")
