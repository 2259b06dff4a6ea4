"""vLLM's generation fields on the llama engine, through the real binaries with the bundled model
(docs/engines.md §3.4), each changing the output as vLLM defines it:

1. min_tokens: stop strings are not looked for in the text of the first min_tokens - 1 tokens and
   end-of-generation cannot be drawn before min_tokens. With stop "," (the greedy text's first
   token) a plain request ends at once; with min_tokens 5 it runs on to the next "," after the
   fifth token, its text a prefix of the plain greedy text that the next "," follows. With a
   logit_bias of +100 on EOS (id 2) a request ends at once; with min_tokens 5 it gives the plain
   greedy first 5 tokens and then ends (usage 6: the EOS counts).
2. ignore_eos: the same EOS-forced request runs to max_tokens (finish_reason "length").
3. repetition_penalty changes the greedy text (both above and below 1), the same on every run;
   min_p 1 at temperature 2 is the greedy text, which the same seed without it is not.
4. continue_final_message: a chat whose last message is the assistant's is continued, exactly as
   the completion of the plain template's text up to that message's end; without it the chat is
   answered anew (another text).
5. Migration: a stream with repetition_penalty (greedy; and seeded with min_p), and one with
   min_tokens 200 and a stop string that fires before it, whose worker is killed with SIGKILL
   after 100 tokens continue on a second worker and equal the uninterrupted run byte for byte
   (text, token ids, finish_reason, usage): the continuation counts the carried tokens for the
   penalty and for min_tokens. So is one with stop_token_ids naming a token the greedy text first
   generates past its 120th: it stops there, the token delivered, on the second worker too; and one
   with include_stop_str_in_output and a stop string first found past the 120th token: its text
   ends with the stop string.
"""

import sys

import batonlib as bl
import faultlib as fl

MODEL = "mock-model"
PROMPT = [1, 403, 407, 261, 378]  # "Once upon a time" with BOS (models/README.md)
EOS = "2"


def complete(fe, max_tokens, prompt=PROMPT, **extra):
    body = bl.completion_body(prompt, max_tokens=max_tokens, model=MODEL, return_token_ids=True,
                              stream_options={"include_usage": True}, **dict({"temperature": 0}, **extra))
    s = bl.stream_completion(fe.url, body, timeout=30)
    s.assert_ok(f"completion {extra}")
    return s


def behaviour(fe):
    plain = complete(fe, 60)
    assert plain.text.startswith(","), plain.summary()
    # 1. min_tokens against a stop string that fires at the first token
    early = complete(fe, 60, stop=",")
    assert early.token_ids == [] and early.finish_reason == "stop", early.summary()
    held = complete(fe, 60, stop=",", min_tokens=5)
    n = len(held.token_ids)
    assert n >= 5 and held.finish_reason == "stop", held.summary()
    assert held.token_ids == plain.token_ids[:n] and plain.text.startswith(held.text), held.summary()
    assert plain.text[len(held.text):].startswith(","), (held.text, plain.text)
    assert "," in held.text, "the stop string in the first tokens was not kept"
    print(f"min_tokens 5 with stop ',': {n} tokens, to the first ',' after the fifth (without it: none)")
    # 1, 2. EOS before min_tokens, and ignore_eos
    ended = complete(fe, 8, logit_bias={EOS: 100})
    assert ended.token_ids == [] and ended.finish_reason == "stop" and ended.usage["completion_tokens"] == 1, \
        ended.summary()
    five = complete(fe, 8, logit_bias={EOS: 100}, min_tokens=5)
    assert five.token_ids == plain.token_ids[:5] and five.finish_reason == "stop", five.summary()
    assert five.usage["completion_tokens"] == 6, five.usage
    ign = complete(fe, 8, logit_bias={EOS: 100}, ignore_eos=True)
    assert ign.token_ids == [2] * 8 and ign.finish_reason == "length", ign.summary()
    print("EOS forced: ends at once; min_tokens 5 gives 5 greedy tokens first; ignore_eos runs to max_tokens")
    # 3. repetition_penalty, min_p
    for rp in (1.3, 0.8):
        a, b = complete(fe, 60, repetition_penalty=rp), complete(fe, 60, repetition_penalty=rp)
        assert a.token_ids == b.token_ids, f"repetition_penalty {rp} is not deterministic"
        assert a.token_ids != plain.token_ids, f"repetition_penalty {rp} changed nothing"
        print(f"repetition_penalty {rp}: {sum(x != y for x, y in zip(a.token_ids, plain.token_ids))} of 60 tokens "
              f"differ from plain greedy")
    hot = complete(fe, 60, temperature=2, seed=3)
    cut = complete(fe, 60, temperature=2, seed=3, min_p=1)
    assert hot.token_ids != plain.token_ids and cut.token_ids == plain.token_ids, (hot.token_ids, cut.token_ids)
    print("min_p 1 at temperature 2 is the greedy text")
    # 4. continue_final_message (the bundled model's chat template is baton's plain one)
    msgs = [{"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": "Once upon a time, there was a dog"}]
    chat = dict(model=MODEL, messages=msgs, max_tokens=20, temperature=0)
    st, _, cont = bl.post_json(fe.url + "/v1/chat/completions", dict(chat, continue_final_message=True))
    assert st == 200, (st, cont)
    ref = complete(fe, 20, prompt="user: Tell me a story.\nassistant: Once upon a time, there was a dog")
    assert cont["choices"][0]["message"]["content"] == ref.text, (cont, ref.text)
    assert cont["usage"]["prompt_tokens"] == ref.usage["prompt_tokens"], (cont["usage"], ref.usage)
    st, _, anew = bl.post_json(fe.url + "/v1/chat/completions", chat)
    assert st == 200 and anew["choices"][0]["message"]["content"] != ref.text, anew
    print(f"continue_final_message: continued as the open text ({ref.text[:30]!r}...), answered anew without it")


def migrated(c, fe, ws):
    """kill -9 of the worker serving the stream after 100 tokens; a second worker continues it."""
    cases = (("rep", {"repetition_penalty": 1.3}),
             ("rep-minp-seeded", {"repetition_penalty": 1.2, "min_p": 0.1, "temperature": 0.9, "seed": 41}),
             ("min-tokens", {"repetition_penalty": 1.1, "min_tokens": 200, "stop": [","]}))
    # stop_token_ids: a token the greedy text first generates past the 120th token stops it there;
    # the continuation must stop at the same token (it reads the ids from the body it carries)
    probe = bl.stream_completion(fe.url, bl.completion_body(
        "Once upon a time, a little fox", max_tokens=400, model=MODEL, return_token_ids=True, temperature=0,
        repetition_penalty=1.3), timeout=40)
    probe.assert_ok("stop_token_ids probe")
    ids = probe.token_ids
    late = next((t for i, t in enumerate(ids) if i >= 120 and t not in ids[:i]), None)
    assert late is not None, f"no token first generated past the 120th: {probe.summary()}"
    # include_stop_str_in_output: a stop string first found in the text of the tokens past the 120th
    # ends it there, kept in the text, on the second worker too
    head, n = "", 0
    for ev in probe.events:
        ch = (ev.get("choices") or [{}])[0]
        if n >= 120:
            break
        head += ch.get("text") or ""
        n += len(ch.get("token_ids") or [])
    txt = probe.text
    at = next((i for i in range(len(head), len(txt) - 4) if txt.find(txt[i:i + 4]) == i), None)
    assert at is not None, f"no new 4 bytes past the 120th token: {probe.summary()}"
    kept = txt[at:at + 4]
    cases += (("stop-ids", {"repetition_penalty": 1.3, "stop_token_ids": [late]}),
              ("stop-kept", {"repetition_penalty": 1.3, "stop": [kept], "include_stop_str_in_output": True}))
    for name, extra in cases:
        body = bl.completion_body("Once upon a time, a little fox", max_tokens=400, model=MODEL,
                                  **dict({"return_token_ids": True, "stream_options": {"include_usage": True},
                                          "temperature": 0}, **extra))
        ref = bl.stream_completion(fe.url, body, timeout=40)
        ref.assert_ok(f"{name} reference")
        if "stop_token_ids" in extra:  # ends with the stop token, delivered
            assert ref.finish_reason == "stop" and ref.token_ids[-1] == late and len(ref.token_ids) > 120, \
                ref.summary()
        elif "include_stop_str_in_output" in extra:  # ends with the stop string
            assert ref.finish_reason == "stop" and ref.text == txt[:at + 4] and len(ref.token_ids) > 100, \
                ref.summary()
        else:
            assert len(ref.token_ids) >= 200, ref.summary()
        rid = f"gen-{name}"
        killed = []

        def on_event(st, obj):
            if len(st.token_ids) >= 100 and not killed:
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
        print(f"{name} {extra}: killed after 100+ of {len(ref.token_ids)} tokens, continued byte-exact")


def run(c, fe, ws):
    behaviour(fe)
    migrated(c, fe, ws)


if __name__ == "__main__":
    sys.exit(fl.llama_test("test_llama_gen_params", 90, run, workers=2))
