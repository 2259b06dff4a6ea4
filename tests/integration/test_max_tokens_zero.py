"""max_tokens 0 asks for no completion: the engines answer it with the prompt's usage, no text and
finish_reason "length" (as OpenAI's legacy completions do), so a prompt that exactly fills the
context fits, on the mocker (--context-length) and on the llama engine (its context of 2048). The
frontend's context check and its routing count it the same way: the request reaches the worker.
A prompt longer than the context is the usual 400 context_length_exceeded ("maximum context
length"), from the frontend for token ids and from the llama engine for a text prompt it counts.
These are the client's answers: no WARN in the frontend's log (docs/security.md).
Skipped for llama (the mocker part still runs) only when scripts/setup did not fetch llama.cpp.
"""

import os

import batonlib as bl

bl.deadline(120, "test_max_tokens_zero")


def served(fe, model, prompt, what):
    body = {"model": model, "prompt": prompt, "max_tokens": 0}
    st, _, b = bl.post_json(fe.url + "/v1/completions", body)
    assert st == 200, f"{what}: {st} {b}"
    ch = b["choices"][0]
    assert ch["text"] == "" and ch["finish_reason"] == "length", (what, b)
    assert b["usage"]["completion_tokens"] == 0, (what, b)
    stream = bl.stream_completion(fe.url, dict(body, stream=True))
    stream.assert_ok(what + ", streamed")
    assert stream.text == "" and stream.finish_reason == "length", (what, stream.summary())
    return b["usage"]["prompt_tokens"]


def refused(fe, model, prompt, what):
    st, _, b = bl.post_json(fe.url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 0})
    assert st == 400 and b["error"]["code"] == "context_length_exceeded", f"{what}: {st} {b}"
    assert "maximum context length" in b["error"]["message"], (what, b)


def no_warn(fe, what):
    warns = [ln for ln in fe.proc.log_text().splitlines() if " WARN " in ln]
    assert not warns, f"{what}: the frontend warned for a client's request: {warns}"


with bl.Cluster() as c:
    fe = c.start_frontend()
    c.start_worker(context_length=64)
    c.wait_workers(fe, 1)
    assert served(fe, "mock-model", [300] * 64, "mocker: 64 ids in a context of 64") == 64
    assert served(fe, "mock-model", [300] * 10, "mocker: 10 ids") == 10
    refused(fe, "mock-model", [300] * 65, "mocker: 65 ids in a context of 64")
    no_warn(fe, "mocker")
    print("mocker: max_tokens 0 answers a prompt that fills the context; a longer one is refused")

if os.environ.get("BATON_NO_LLAMA") == "1":
    print("BATON_NO_LLAMA=1: the llama engine was not fetched; its part skipped")
else:
    with bl.Cluster() as c:
        fe = c.start_frontend()
        c.start_worker(engine="llama", wait=True)
        c.wait_workers(fe, 1)
        assert served(fe, "mock-model", [300] * 2048, "llama: 2048 ids in a context of 2048") == 2048
        assert served(fe, "mock-model", "Once upon a time", "llama: a text prompt") > 0
        refused(fe, "mock-model", [300] * 2049, "llama: 2049 ids")
        refused(fe, "mock-model", "the " * 2100, "llama: a text prompt of 2,100 words")
        no_warn(fe, "llama")
        print("llama: max_tokens 0 answers a prompt that fills the context; a longer one is refused")
print("test_max_tokens_zero: OK")
