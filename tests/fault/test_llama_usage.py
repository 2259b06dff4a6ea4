"""Usage, the context-length message and the migration counters on the llama engine, through the
real binaries (a frontend and one llama worker serving the bundled stories260K):

1. Usage with tokens the client carries in (`carried_token_ids`, docs/engines.md §2.6): max_tokens
   counts new tokens only, completion_tokens counts the carried ones too, and usage names them in
   carried_tokens; the same whole and streamed (include_usage), ending on max_tokens or on a stop
   string, and with 2,040 carried tokens and max_tokens 1 (the worker's prefill counter rises by
   the prompt and the carried tokens: what usage bills).
2. A prompt that fills the context without max_tokens is refused naming the least completion it
   asked for, one token: as ids (the frontend's check) and as text (the engine's), and one token
   less is served with one token.
3. An assistant message's refusal content part is read as its words: the same prompt tokens as
   the same words in a text part (the engine read text parts only: it was dropped).
4. kill -9 of the only worker mid-stream: the failure counts in migration_total
   (ongoing_request) and, with no worker left to continue it, in
   baton_frontend_model_migration_unserved_total: total − exhausted − unserved is 0 migrations
   performed.
"""

import re
import sys

import batonlib as bl
import faultlib as fl

MODEL = "mock-model"
SLOW = fl.SLOW
CTX = 2048  # the bundled model's context (its card's context_length)


def msum(url, name, **labels):
    return bl.metric_sum(bl.metrics(url), name, **labels)


def unary(fe, body, rid=None):
    st, _, b = bl.post_json(fe.url + "/v1/completions", body, timeout=30 * SLOW,
                            headers={"X-Request-Id": rid} if rid else None)
    assert st == 200, b
    return b


def streamed(fe, body, rid):
    s = bl.stream_completion(fe.url, dict(body, stream=True, stream_options={"include_usage": True}),
                             timeout=30 * SLOW, headers={"X-Request-Id": rid})
    s.assert_ok("streamed request with carried tokens")
    return s


def check_carried(fe, w):
    """A request carrying the first token of an uninterrupted run in carried_token_ids, with one
    max_token less, is billed exactly as that run: the same prompt_tokens and completion_tokens
    (tokens held back by a stop string count in both), plus carried_tokens 1."""
    run = lambda **kw: bl.completion_body("Once", model=MODEL, temperature=0, return_token_ids=True, **kw)
    full = unary(fe, run(max_tokens=9))
    first = full["choices"][0]["token_ids"][0]
    words = full["choices"][0]["text"].split()
    stop = [words[-2]]  # a word well after the first token: a stop string ends the run early
    for k, st in enumerate((None, stop)):
        extra = {"stop": st} if st else {}
        ref = unary(fe, run(max_tokens=9, **extra))
        body = run(max_tokens=8, carried_token_ids=[first], **extra)
        u = unary(fe, body, f"car-unary-{k}")
        want = dict(ref["usage"], carried_tokens=1)
        assert u["usage"] == want, f"stop {st}: usage {u['usage']}, want {want} (the run's {ref['usage']})"
        assert u["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"][1:], (u, ref)
        assert u["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"] == ("stop" if st else "length")
        s = streamed(fe, body, f"car-stream-{k}")
        assert s.token_ids == u["choices"][0]["token_ids"] and s.usage == want, \
            f"stop {st}: streamed {s.summary()} usage {s.usage}, want {want}"
        print(f"carried [{first}], stop {st}: usage {u['usage']}, the uninterrupted run's {ref['usage']} "
              f"(whole and streamed)")
    # 2,040 carried tokens and one new one: billed for what the worker prefilled and generated
    many = [300] * 2040
    pre0 = msum(w.system_url, "baton_worker_engine_prefill_tokens_total")
    u = unary(fe, bl.completion_body("Once", max_tokens=1, model=MODEL, temperature=0, carried_token_ids=many))
    prefilled = msum(w.system_url, "baton_worker_engine_prefill_tokens_total") - pre0
    pt = u["usage"]["prompt_tokens"]
    assert u["usage"] == {"prompt_tokens": pt, "completion_tokens": 2041, "total_tokens": pt + 2041,
                          "carried_tokens": 2040}, u["usage"]
    assert prefilled == pt + 2040 - 1 or prefilled == pt + 2040, f"prefill {prefilled} for usage {u['usage']}"
    print(f"2040 carried, max_tokens 1: usage {u['usage']}, {prefilled:.0f} tokens prefilled")
    # a request without carried tokens keeps OpenAI's three fields
    u = unary(fe, bl.completion_body("Once", max_tokens=3, model=MODEL, temperature=0))
    assert set(u["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}, u["usage"]


MSG = re.compile(r"maximum context length is (\d+) tokens\. However, you requested (\d+) tokens "
                 r"\((\d+) in the prompt, (\d+) in the completion\)")


def refusal(fe, prompt):
    st, _, b = bl.post_json(fe.url + "/v1/completions", {"model": MODEL, "prompt": prompt}, timeout=30 * SLOW)
    assert st == 400 and b["error"]["code"] == "context_length_exceeded", (st, b)
    m = MSG.search(b["error"]["message"])
    assert m, b["error"]["message"]
    return [int(x) for x in m.groups()], b["error"]["message"]


def check_context(fe):
    # as ids: 2,047 leave one token, 2,048 and 2,049 none
    u = unary(fe, {"model": MODEL, "prompt": [300] * (CTX - 1)})
    assert u["usage"]["completion_tokens"] == 1 and u["choices"][0]["finish_reason"] == "length", u
    for n in (CTX, CTX + 1):
        (ctx, total, p, c), msg = refusal(fe, [300] * n)
        assert (ctx, total, p, c) == (CTX, n + 1, n, 1), f"{n}-token prompt: {msg}"
    # as text: counted by the engine, the same rule
    (ctx, total, p, c), msg = refusal(fe, "Once upon a time " * 600)
    assert ctx == CTX and p >= CTX and c == 1 and total == p + 1, msg
    print(f"context: 2047 ids served with 1 token; refusals say prompt + 1 ({msg[:120]}...)")


def check_refusal_part(fe):
    # an assistant's refusal part is its words, as the same words in a text part: the same prompt
    def prompt_tokens(part):
        msgs = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": [part]},
                {"role": "user", "content": "Please"}]
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 1},
                                timeout=30 * SLOW)
        assert st == 200, (part, st, b)
        return b["usage"]["prompt_tokens"]
    words = "Once upon a time there was a little girl"
    refused, text = prompt_tokens({"type": "refusal", "refusal": words}), prompt_tokens({"type": "text", "text": words})
    empty = prompt_tokens({"type": "text", "text": ""})
    assert refused == text > empty, (refused, text, empty)
    print(f"refusal part: {refused} prompt tokens, as the same words in a text part ({empty} without them)")


def check_no_worker_left(fe, w):
    ongoing0 = msum(fe.url, "dynamo_frontend_model_migration_total", migration_type="ongoing_request")
    killed = {}

    def kill(st, obj):
        if len(st.token_ids) >= 100 and not killed:
            killed["at"] = len(st.token_ids)
            w.proc.kill()
        return False

    s = bl.stream_completion(fe.url, bl.completion_body("Once upon a time", max_tokens=1500, model=MODEL,
                                                        temperature=0, return_token_ids=True),
                             timeout=30 * SLOW, on_event=kill)
    assert killed and s.error, f"the stream did not fail with its only worker killed: {s.summary()}"
    fe.proc.wait_log(r"no worker left to continue the request", 10)
    ongoing = msum(fe.url, "dynamo_frontend_model_migration_total", migration_type="ongoing_request") - ongoing0
    exhausted = msum(fe.url, "dynamo_frontend_model_migration_exhausted_total")
    unserved = msum(fe.url, "baton_frontend_model_migration_unserved_total")
    assert (ongoing, exhausted, unserved) == (1, 0, 1), (ongoing, exhausted, unserved)
    assert "migrated from worker" not in fe.proc.log_text(), "a migration was logged with no worker left"
    print(f"kill -9 of the only worker at {killed['at']} tokens: ongoing_request +1, unserved 1, "
          f"performed {ongoing - exhausted - unserved:.0f}")


def run(c, fe, ws):
    (w,) = ws
    check_carried(fe, w)
    check_context(fe)
    check_refusal_part(fe)
    check_no_worker_left(fe, w)


if __name__ == "__main__":
    sys.exit(fl.llama_test("test_llama_usage", 50, run, workers=1))
