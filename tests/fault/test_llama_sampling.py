"""frequency_penalty, presence_penalty and logit_bias on the llama engine, through the real binaries
(docs/engines.md §3.4), against references computed in the test:

1. logit_bias: +100 on token 264 makes every greedy token 264; -100 on the plain greedy run's first
   token makes the first token another; a key outside the model's vocabulary (512 tokens) is a 400
   from the worker, before any token; out-of-range values sent to a worker's request plane
   directly (no frontend) are refused by the engine too. top_k 1 (also written 1.0) at
   temperature 0.8 is the greedy text.
2. Penalties change the greedy text, exactly as OpenAI defines them: token j's logit loses
   c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, c[j] counting j among the tokens
   generated so far. The reference is built one token at a time: a request of max_tokens 1 whose
   prompt is the prompt's ids plus the reference's tokens so far, with no penalty and a logit_bias of
   -(that amount) on each token generated so far. The engine applies a bias and a penalty in one
   expression, so the reference must equal the penalised stream token for token. Penalties of both
   signs, alone and together, and with a bias.
3. Migration: a stream with penalties and a bias (greedy, and seeded at temperature 0.8) whose
   worker is killed with SIGKILL mid-generation continues on a second worker and equals the
   uninterrupted run byte for byte (text, token ids, finish_reason, usage): the continuation counts
   the carried tokens as generated ones.
"""

import sys

import batonlib as bl
import faultlib as fl
import rpclib

MODEL = "mock-model"
PROMPT = [1, 403, 407, 261, 378]  # "Once upon a time" with BOS (models/README.md)
N = 40


def complete(fe, prompt, max_tokens, **extra):
    body = bl.completion_body(prompt, max_tokens=max_tokens, model=MODEL, return_token_ids=True,
                              **dict({"temperature": 0}, **extra))
    s = bl.stream_completion(fe.url, body, timeout=30)
    s.assert_ok(f"completion {extra}")
    return s


def reference(fe, fp, pp, bias=None):
    """The greedy tokens under the penalties, one request per token with the penalty as a bias."""
    out = []
    while len(out) < N:
        counts = {}
        for t in out:
            counts[t] = counts.get(t, 0) + 1
        lb = dict(bias or {})
        for t, c in counts.items():
            lb[str(t)] = lb.get(str(t), 0) - (c * fp + pp)
        s = complete(fe, PROMPT + out, 1, logit_bias=lb)
        if not s.token_ids:  # end of text: the penalised stream stops there too
            assert s.finish_reason == "stop", s.summary()
            break
        out += s.token_ids
    return out


def bias_and_penalties(c, fe, ws):
    plain = complete(fe, PROMPT, N).token_ids
    assert len(plain) == N, plain

    forced = complete(fe, PROMPT, N, logit_bias={"264": 100})
    assert forced.token_ids == [264] * N, forced.token_ids
    banned = complete(fe, PROMPT, N, logit_bias={str(plain[0]): -100})
    assert banned.token_ids[0] != plain[0], (plain[0], banned.token_ids[:4])
    st, _, b = bl.post_json(fe.url + "/v1/completions",
                            bl.completion_body(PROMPT, max_tokens=4, model=MODEL, logit_bias={"512": 1}))
    assert st == 400 and b["error"]["code"] == "invalid_value" and b["error"]["param"] == "logit_bias", (st, b)
    assert "512" in b["error"]["message"] and "vocabulary 0..511" in b["error"]["message"], b
    for w in ws:  # the client's mistake: not a warning per request in either process
        assert "logit_bias key" not in "".join(l for l in w.proc.log_text().splitlines(True) if " WARN " in l)
    assert "logit_bias key" not in "".join(l for l in fe.proc.log_text().splitlines(True) if " WARN " in l)
    # straight to a worker's request plane (no frontend checks): the engine refuses what is out of
    # range before any token (BT_ERR_INVALID_LOGIT_BIAS 22, BT_ERR_INVALID 1)
    conn = rpclib.Conn(ws[0].rpc_port)
    for extra, code in (({"logit_bias": {"512": 1}}, 22), ({"logit_bias": {"7": 1e300}}, 22),
                        ({"logit_bias": {"-7": 1}}, 22), ({"frequency_penalty": 1e300}, 1),
                        ({"presence_penalty": -3}, 1)):
        body = dict(bl.completion_body(PROMPT, max_tokens=4, model=MODEL), **extra)
        r = rpclib.read_stream(conn, conn.request({"request_id": "raw", "api": "completion", "body": body,
                                                   "max_tokens": 4}))
        assert r.error and r.error[0] == code and not r.ids, (extra, r.error, r.ids)
    conn.close()
    print("logit_bias: +100 forces token 264, -100 bans the greedy first token, id 512 refused (400); "
          "out-of-range values sent to the worker directly refused")
    # top_k written 1.0 is top_k 1 (the frontend's integral reals): a sampled stream is the greedy one
    for k in (1, 1.0):
        s = complete(fe, PROMPT, N, top_k=k, temperature=0.8, seed=5)
        assert s.token_ids == plain, f"top_k {k!r} at temperature 0.8 is not greedy: {s.token_ids}"
    assert complete(fe, PROMPT, N, temperature=0.8, seed=5).token_ids != plain, "seed 5 samples the greedy text"

    for fp, pp, bias in ((0.7, 0.5, None), (2.0, 0.0, None), (0.0, 2.0, None), (-1.5, -0.25, None),
                         (0.35, 0.3, {"13": 1.5, str(plain[1]): -3})):
        extra = {"frequency_penalty": fp, "presence_penalty": pp}
        if bias:
            extra["logit_bias"] = bias
        got = complete(fe, PROMPT, N, **extra)
        ref = reference(fe, fp, pp, bias)
        assert got.token_ids == ref, f"{extra}: the engine's stream differs from the reference\n{got.token_ids}\n{ref}"
        assert got.token_ids != plain, f"{extra}: the penalties changed nothing"
        assert got.token_ids[0] == (plain[0] if not bias else ref[0]), "a penalty before any token was generated"
        print(f"penalties {extra}: equal to the reference, {sum(a != b for a, b in zip(got.token_ids, plain))} "
              f"of {N} tokens differ from plain greedy")
    return plain


def migrated(c, fe, ws):
    """kill -9 of the worker serving a penalised stream; a second worker continues it."""
    for seeded in (False, True):
        extra = {"frequency_penalty": 0.4, "presence_penalty": 0.6, "logit_bias": {"13": 2, "264": -1},
                 "return_token_ids": True, "stream_options": {"include_usage": True}, "temperature": 0}
        if seeded:
            extra.update(temperature=0.8, seed=77)
        body = bl.completion_body("Once upon a time, a little fox", max_tokens=500, model=MODEL, **extra)
        ref = bl.stream_completion(fe.url, body, timeout=40)
        ref.assert_ok("reference")
        assert len(ref.token_ids) == 500, ref.summary()
        plain = bl.stream_completion(fe.url, dict(body, frequency_penalty=0, presence_penalty=0, logit_bias={}),
                                     timeout=40)
        assert plain.token_ids[:150] != ref.token_ids[:150], "the penalties changed nothing before the kill"
        # the penalties must matter after the seam too: the tail differs from plain's
        rid = f"pen-{int(seeded)}"
        killed = []

        def on_event(st, obj):
            if len(st.token_ids) >= 150 and not killed:
                for w in ws:
                    if w.proc.alive() and fl.worker_kv(w) > 0:
                        killed.append(w)
                        w.proc.kill(9)
                        break
            return False

        s = bl.stream_completion(fe.url, body, timeout=40, on_event=on_event, headers={"X-Request-Id": rid})
        assert killed, "no worker was serving the stream"
        s.assert_ok(rid)
        assert f"request {rid} migrated" in fe.proc.log_text(), f"{rid} was not migrated"
        assert fl.outcome(s) == fl.outcome(ref), f"{rid}: differs from the uninterrupted run: {s.summary()}"
        ws = [w for w in ws if w is not killed[0]]
        ws.append(c.start_worker(engine="llama", system_port=True, wait=True, env={"DYN_LOG": "debug"}))
        c.wait_workers(fe, 2)
        print(f"{'seeded' if seeded else 'greedy'} stream with penalties and a bias: killed after 150+ tokens, "
              f"continued byte-exact")


def run(c, fe, ws):
    bias_and_penalties(c, fe, ws)
    migrated(c, fe, ws)


if __name__ == "__main__":
    sys.exit(fl.llama_test("test_llama_sampling", 60, run, workers=2))
