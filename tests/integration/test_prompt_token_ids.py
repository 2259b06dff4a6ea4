"""A prompt of token ids outside the model's vocabulary is OpenAI's 400 naming the prompt, with the
llama engine (the bundled stories260K model, 512 tokens) and with the mocker (4096 tokens).

The frontend refuses a negative id itself (400 invalid_value, param "prompt"); an id past the
vocabulary only the engine can judge. Each must give the same error: 400, code invalid_value,
type invalid_request_error, param "prompt", unary and streamed (a streamed refusal before the first
token is the same JSON error, not an SSE stream). The last id of the vocabulary is served (200), the
first past it refused: the bound is the vocabulary's, not a guess. The refusal is the client's
error: neither process logs a WARN for it, while the worker's error counter shows that the engine
refused the ids past the vocabulary (4: two prompts, unary and streamed) and never saw the negative one.
Skipped for llama (the mocker part still runs) only when scripts/setup was told not to fetch
llama.cpp (BATON_NO_LLAMA=1).
"""

import os

import batonlib as bl

bl.deadline(120, "test_prompt_token_ids")


def refused(fe, prompt, what):
    body = bl.completion_body(prompt=prompt, max_tokens=4)
    st, _, b = bl.post_json(fe.url + "/v1/completions", body)
    assert st == 400, f"{what}: {st} {b}"
    err = b["error"]
    assert (err["code"], err["type"], err["param"]) == ("invalid_value", "invalid_request_error", "prompt"), \
        f"{what}: {err}"
    s = bl.stream_completion(fe.url, body)
    assert s.status == 400 and s.error and s.error.get("param") == "prompt" and \
        s.error.get("code") == "invalid_value", f"{what}, streamed: {s.summary()}"
    return err["message"]


def served(fe, prompt, what):
    st, _, b = bl.post_json(fe.url + "/v1/completions", bl.completion_body(prompt=prompt, max_tokens=2))
    assert st == 200 and b["usage"]["prompt_tokens"] == len(prompt), f"{what}: {st} {b}"


def engine(c, fe, w, vocab, name):
    c.wait_workers(fe, 1)
    errors0 = bl.metric_sum(bl.metrics(w.system_url), "dynamo_component_errors_total")
    served(fe, [vocab - 1], f"{name}: the last id of the vocabulary")
    msg = refused(fe, [vocab], f"{name}: the first id past the vocabulary")
    refused(fe, [1, 2, 999999], f"{name}: 999999 after two good ids")
    refused(fe, [-1], f"{name}: a negative id (the frontend's refusal)")
    for proc, who in ((fe.proc, "frontend"), (w.proc, "worker")):
        warns = [ln for ln in proc.log_text().splitlines() if " WARN " in ln and "token" in ln]
        assert not warns, f"{name}: the {who} warned for a client's bad prompt: {warns}"
    # the two past-vocabulary prompts, unary and streamed, were the engine's refusals; the negative
    # id never reached the worker
    errors = bl.metric_sum(bl.metrics(w.system_url), "dynamo_component_errors_total") - errors0
    assert errors == 4, f"{name}: the worker counted {errors} errors, expected 4"
    print(f"{name}: ids >= {vocab} refused with 400 invalid_value param prompt ({msg!r}), as a negative id; "
          f"{vocab - 1} served")


with bl.Cluster() as c:
    fe = c.start_frontend()
    w = c.start_worker(system_port=True, wait=True)
    engine(c, fe, w, 4096, "mocker")

if os.environ.get("BATON_NO_LLAMA") == "1":
    print("BATON_NO_LLAMA=1: the llama engine was not fetched; its part skipped")
else:
    with bl.Cluster() as c:
        fe = c.start_frontend()
        w = c.start_worker(engine="llama", system_port=True, wait=True)
        engine(c, fe, w, 512, "llama")
print("test_prompt_token_ids: OK")
