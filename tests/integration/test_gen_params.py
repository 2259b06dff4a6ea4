"""Request fields that ask for output the engines generating text themselves cannot give are refused,
never ignored, on the mocker and on the llama engine (docs/engines.md, "Request fields"):
response_format other than {"type": "text"}, vLLM's guided_json / guided_regex / guided_choice /
guided_grammar / structured_outputs, modalities other than ["text"], audio. Each is a 400 with
code unsupported_value (invalid_value for a malformed response_format or modalities) naming the
field, unary and streamed, for chat and completions, before any token; {"type": "text"} and
["text"] are served. The form of vLLM's generation fields (min_p, repetition_penalty, ignore_eos,
min_tokens, continue_final_message) is the frontend's 400 (invalid_type / invalid_value, the field
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
]

MALFORMED = [
    ("min_p", 1.5, "invalid_value"), ("min_p", "0.1", "invalid_type"), ("min_p", -0.1, "invalid_value"),
    ("repetition_penalty", 0, "invalid_value"), ("repetition_penalty", -1, "invalid_value"),
    ("repetition_penalty", "2", "invalid_type"),
    ("ignore_eos", "yes", "invalid_type"), ("ignore_eos", 1, "invalid_type"),
    ("min_tokens", 1.5, "invalid_type"), ("min_tokens", -1, "invalid_value"), ("min_tokens", 9, "invalid_value"),
    ("continue_final_message", 1, "invalid_type"),
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
    body = bl.chat_body("Tell me a story", max_tokens=8, continue_final_message=True)
    refused(fe, "chat/completions", body, "continue_final_message", "invalid_value", f"{name}: continue after user")
    # straight to the worker's request plane: the engine refuses before any token
    conn = rpclib.Conn(w.rpc_port)
    for extra, code in (({"response_format": {"type": "json_object"}}, 25), ({"guided_regex": "a"}, 25),
                        ({"modalities": ["audio"]}, 25), ({"audio": {}}, 25), ({"min_p": 2}, 26),
                        ({"repetition_penalty": 0}, 26), ({"min_tokens": 3, "max_tokens": 2}, 26)):
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
