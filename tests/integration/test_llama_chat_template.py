"""continue_final_message under a model's own chat template, through the real binaries and
llama.cpp's own template code (docs/engines.md §3.3).

The bundled stories260K has no chat template, so the test writes a copy of it whose metadata adds
`tokenizer.chat_template`: the ChatML template, which llama.cpp recognises and renders as
"<|im_start|>role\\ncontent<|im_end|>\\n" per message, "<|im_start|>assistant\\n" for the turn to
come. `baton run --engine llama` serves the copy (its start-up line names the model's template).
  1. A chat answered anew is the completion of exactly that rendering (the template is ChatML).
  2. With continue_final_message, for final assistant messages that also occur in the markers
     around them ("<" and "|" and ">\\n" in "<|im_end|>\\n", a line end, "assistant" and "im_start" in
     the final message's own header) and for one that also is the user's message, the answer is
     the completion of the chat rendered up to the end of the final message's content and no
     further (the same text and prompt_tokens, greedy).
  3. An empty final message is refused with 400 invalid_value naming continue_final_message.
"""

import os
import struct
import sys

import batonlib as bl
import faultlib as fl

MODEL = "mock-model"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
USER = "Tell me a story."

if fl.skip("llama") is not None:
    sys.exit(77)
bl.deadline(60 * fl.SLOW, "test_llama_chat_template")


def with_chat_template(src, dst, template):
    """Copies the GGUF file src to dst with one more metadata pair, tokenizer.chat_template =
    template. GGUF (version 2 or 3): magic, version, tensor count, pair count; the pairs; the
    tensor descriptions (offsets relative to the data); the data, aligned to general.alignment
    (32 by default). The pair is appended and the data realigned after the longer header."""
    with open(src, "rb") as f:
        b = f.read()
    assert b[:4] == b"GGUF", f"{src} is not a GGUF file"
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", b, 4)
    assert version in (2, 3), version
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", b, pos)
        pos += 8 + n
        return b[pos - n:pos].decode()

    def value(t):
        nonlocal pos
        if t == 8:
            return string()
        if t == 9:
            et, count = struct.unpack_from("<IQ", b, pos)
            pos += 12
            for _ in range(count):
                value(et)
            return None
        v = b[pos:pos + sizes[t]]
        pos += sizes[t]
        return v

    alignment = 32
    for _ in range(n_kv):
        key = string()
        (t,) = struct.unpack_from("<I", b, pos)
        pos += 4
        assert key != "tokenizer.chat_template", f"{src} already has a chat template"
        v = value(t)
        if key == "general.alignment":
            (alignment,) = struct.unpack("<I", v)
    kv_end = pos
    for _ in range(n_tensors):
        string()
        (n_dims,) = struct.unpack_from("<I", b, pos)
        pos += 4 + 8 * n_dims + 4 + 8
    infos = b[kv_end:pos]
    data = b[-(-pos // alignment) * alignment:]
    key, tmpl = b"tokenizer.chat_template", template.encode()
    pair = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(tmpl)) + tmpl
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv + 1) + b[24:kv_end] + pair + infos
    head += b"\0" * (-len(head) % alignment)
    with open(dst, "wb") as f:
        f.write(head + data)


def chat(fe, final, continued, max_tokens=12):
    msgs = [{"role": "user", "content": USER}]
    if final is not None:
        msgs.append({"role": "assistant", "content": final})
    return bl.post_json(fe.url + "/v1/chat/completions",
                        dict(model=MODEL, messages=msgs, max_tokens=max_tokens, temperature=0,
                             continue_final_message=continued))


def completion(fe, prompt, max_tokens=12):
    st, _, r = bl.post_json(fe.url + "/v1/completions",
                            dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0))
    assert st == 200, (st, r)
    return r["choices"][0]["text"], r["usage"]["prompt_tokens"]


def same(fe, got, prompt, what):
    st, r = got[0], got[2]
    assert st == 200, (what, st, r)
    text, tokens = completion(fe, prompt)
    answer = (r["choices"][0]["message"]["content"], r["usage"]["prompt_tokens"])
    assert answer == (text, tokens), f"{what}: answered {answer}, the completion of {prompt!r} is {(text, tokens)}"


with bl.Cluster() as c:
    model = os.path.join(c.dir, "chatml.gguf")
    with_chat_template(os.path.join(os.path.dirname(__file__), "..", "..", "models", "stories260K.gguf"), model,
                       CHATML)
    fe = c.start_run(engine="llama", model=model, model_name=MODEL)
    fe.proc.wait_log(r"chat template: the model's", timeout=5)
    head = f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
    # 1. the real template is ChatML, the turn to come written
    same(fe, chat(fe, None, False), head, "a chat answered anew")
    # 2. the final message left open, cut after its own content
    for final in ("Once upon a time", "<", "|", ">\n", "\n", "assistant", "im_start", USER):
        same(fe, chat(fe, final, True), head + final, f"final message {final!r} continued")
    print("continue_final_message under ChatML: each final message cut right after its own content")
    # 3. nothing to cut after
    st, _, r = chat(fe, "", True)
    assert st == 400 and r["error"]["param"] == "continue_final_message", (st, r)
    assert r["error"]["code"] == "invalid_value", r
    print("an empty final message: 400 invalid_value")
print("ok")
