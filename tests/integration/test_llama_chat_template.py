"""continue_final_message under a model's own chat template, through the real binaries and
llama.cpp's own template code (docs/engines.md §3.3).

The bundled stories260K has no chat template, so the test writes copies of it whose metadata adds
`tokenizer.chat_template`, each served by `baton run --engine llama` in turn (its start-up line
names the model's template):
  - ChatML, which llama.cpp renders as "<|im_start|>role\ncontent<|im_end|>\n" per message,
    "<|im_start|>assistant\n" for the turn to come: the content as sent;
  - Meta-Llama-3-8B-Instruct's, rendered as
    "<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>": the content trimmed of white
    space at both ends, the turn ended by "<|eot_id|>" with no line end;
  - gemma-7b-it's, rendered as "<start_of_turn>role\ncontent<end_of_turn>\n" with the assistant
    called "model": the content trimmed too.
For each:
  1. A chat answered anew is the completion of exactly that rendering (the template is the one
     named).
  2. With continue_final_message, for final assistant messages that also occur in the markers
     around them ("<" and "|" and ">\n" in "<|im_end|>\n", "eot_id", "end_of_turn", a line end,
     "assistant" and "im_start" in the final message's own header), for one that also is the
     user's message, and for ones with white space at their ends, the answer is the completion of
     the chat rendered up to the end of the final message's content as the template writes it and
     no further (the same text and prompt_tokens, greedy): under Llama 3 and Gemma, after the
     content trimmed, as vLLM cuts it. Before, a final message with white space at an end (">\n",
     "Once upon a time ") was refused under those two.
  3. An empty final message, and under the trimming templates one of white space only, is refused
     with 400 invalid_value naming continue_final_message.
"""

import os
import struct
import sys

import batonlib as bl
import faultlib as fl

MODEL = "mock-model"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Meta-Llama-3-8B-Instruct's and gemma-7b-it's templates, which llama.cpp recognises by their
# markers and renders with its own code, each message's content trimmed
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
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


def serve(c, name, template):
    """A `baton run` of a copy of stories260K given template; its frontend."""
    model = os.path.join(c.dir, f"{name}.gguf")
    with_chat_template(os.path.join(os.path.dirname(__file__), "..", "..", "models", "stories260K.gguf"), model,
                       template)
    fe = c.start_run(engine="llama", model=model, model_name=MODEL)
    fe.proc.wait_log(r"chat template: the model's", timeout=5)
    return fe


def check(c, name, template, head, finals, written):
    """The template's rendering of a chat answered anew is head; each final message continued is
    the completion of head + written(final); a final message the template writes as nothing, and an
    empty one, are refused."""
    fe = serve(c, name, template)
    # 1. the real template is the one named, the turn to come written
    same(fe, chat(fe, None, False), head, f"{name}: a chat answered anew")
    # 2. the final message left open, cut right after its own content as the template writes it
    for final in finals:
        same(fe, chat(fe, final, True), head + written(final), f"{name}: final message {final!r} continued")
    print(f"continue_final_message under {name}: each final message cut right after its own content")
    # 3. nothing to cut after
    for final in ["", " \n "] if written(" \n ") == "" else [""]:
        st, _, r = chat(fe, final, True)
        assert st == 400 and r["error"]["param"] == "continue_final_message", (name, final, st, r)
        assert r["error"]["code"] == "invalid_value", r
    print(f"{name}: an empty final message: 400 invalid_value")
    fe.proc.stop()


with bl.Cluster() as c:
    # ChatML writes the content as sent, and ends a turn with "<|im_end|>\n"
    check(c, "chatml", CHATML, f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n",
          ("Once upon a time", "<", "|", ">\n", "\n", "assistant", "im_start", USER, "Once upon a time "),
          lambda final: final)
    # Llama 3 and Gemma write the content trimmed of white space at both ends, and end a turn with
    # "<|eot_id|>" and "<end_of_turn>\n": the cut goes after the content as written, as vLLM cuts
    # it (the whole final message when it has no white space at its ends)
    check(c, "llama3", LLAMA3,
          f"<|start_header_id|>user<|end_header_id|>\n\n{USER}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
          ("Once upon a time", "<", "|", "eot_id", "<|eot_id|>", "assistant", "end_header_id", ">\n",
           "Once upon a time ", "\n\nOnce upon a time\n", USER),
          lambda final: final.strip(" \t\n\r\v\f"))
    check(c, "gemma", GEMMA, f"<start_of_turn>user\n{USER}<end_of_turn>\n<start_of_turn>model\n",
          ("Once upon a time", "<", "_", "end_of_turn", "<end_of_turn>\n", "model", ">\n", "Once upon a time ",
           " Once upon a time", USER),
          lambda final: final.strip(" \t\n\r\v\f"))
print("ok")
