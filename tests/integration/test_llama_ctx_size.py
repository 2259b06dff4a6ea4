"""The llama engine's KV cache is the size its flags say, through the real binaries (docs/engines.md
§3.2, "KV cells and memory").

llama.cpp gives every sequence's KV stream a multiple of 256 cells, rounding up: left to itself it
turned --ctx-size 1024 for 16 sequences into 4,096 cells, and the automatic size for 255 sequences
into 130,560 where at most 65,536 are documented. Checked, on workers of the bundled stories260K:
  1. --ctx-size 1024 with the default 16 sequences is refused as configuration (exit 2) naming
     --ctx-size, --max-num-seqs and the 4,096 cells it would need; nothing is loaded;
  2. --ctx-size 5000 (16 sequences) allocates 4,096 cells, 256 per sequence, and says so: a WARN
     that it was rounded down, the start-up line (cells, per-sequence context) and llama.cpp's own
     count of the cells of a stream (its log at DYN_LOG=trace); the model card advertises 256
     tokens of context and 256 blocks of 16 cells;
  3. --kv-unified --ctx-size 1000: one pool of 768 cells, the context 768;
  4. the default size with --max-num-seqs 255 stays within 65,536 cells (65,280: 256 each), the
     card advertises a context of 256, and through a frontend a prompt at that context is served
     (token ids: prompt + max_tokens = 256; a text prompt without max_tokens runs to the 256th
     token and ends with "length", every one of its positions in llama.cpp's cells), while one
     token past it is refused with 400 context_length_exceeded (token ids: by the frontend from
     the card; text: by the engine, with the model's context in its message).
"""

import json
import os
import re
import sys

import batonlib as bl
import faultlib as fl

MODEL = "mock-model"

if fl.skip("llama") is not None:
    sys.exit(77)
bl.deadline(150 * fl.SLOW, "test_llama_ctx_size")


def card_of(c, w, timeout=20):
    """The model card `w` announced in the cluster's discovery directory."""
    found = {}

    def announced():
        for name in os.listdir(c.discovery_dir):
            if name.startswith("."):
                continue
            try:
                with open(os.path.join(c.discovery_dir, name)) as f:
                    v = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(v, dict) and v.get("transport", {}).get("tcp", "").endswith(f":{w.rpc_port}"):
                found["card"] = v.get("model")
                return True
        return False

    bl.wait_for(announced, timeout, what=f"worker {w.rpc_port}'s discovery key")
    return found["card"]


def start_line(w):
    """The engine's start-up line: (cells, its layout, the context per sequence)."""
    m = w.proc.wait_log(r"llama engine: .*?, (\d+) KV cells \(([^)]*)\), a context of (\d+) tokens per sequence",
                        timeout=30 * fl.SLOW)
    return int(m.group(1)), m.group(2), int(m.group(3))


def llama_stream_cells(w):
    """The cells of one KV stream as llama.cpp itself reports them (its trace-level log)."""
    m = w.proc.wait_log(r"llama_kv_cache: size = .*?\(\s*(\d+) cells", timeout=5)
    return int(m.group(1))


with bl.Cluster() as c:
    # 1. fewer cells than 256 per sequence: refused before anything is loaded
    w = c.start_worker(engine="llama", ctx_size=1024)
    rc = w.proc.wait(20)
    log = w.proc.log_text()
    assert rc == 2, f"--ctx-size 1024 for 16 sequences: expected exit 2, got {rc}; log:\n{w.proc.log_tail()}"
    assert "--ctx-size (1024) is too small for --max-num-seqs (16)" in log and "at least 4096" in log, log
    assert "tokens per sequence" not in log, f"an engine started:\n{log}"
    print("--ctx-size 1024 x 16 sequences: refused, exit 2")

    # 2. rounded down to whole streams, and said so
    w = c.start_worker(engine="llama", ctx_size=5000, env={"DYN_LOG": "trace"})
    cells, layout, ctx = start_line(w)
    assert (cells, layout, ctx) == (4096, "256 for each of up to 16 sequences", 256), (cells, layout, ctx)
    assert llama_stream_cells(w) == 256, w.proc.log_tail()
    assert re.search(r" WARN .*--ctx-size 5000 rounded down to 4096 KV cells", w.proc.log_text()), w.proc.log_tail()
    card = card_of(c, w)
    assert card["context_length"] == 256 and card["total_kv_blocks"] == 4096 // 16, card
    w.proc.stop()
    print("--ctx-size 5000 x 16 sequences: 4096 cells, 256 each, warned")

    # 3. one shared pool: a multiple of 256 cells, no more
    w = c.start_worker(engine="llama", ctx_size=1000, kv_unified=True, env={"DYN_LOG": "trace"})
    assert start_line(w) == (768, "shared by up to 16 sequences", 768), w.proc.log_tail()
    assert llama_stream_cells(w) == 768, w.proc.log_tail()
    assert card_of(c, w)["context_length"] == 768
    w.proc.stop()
    print("--kv-unified --ctx-size 1000: 768 cells")

    # 4. the automatic size for 255 sequences, within its cap; the context it advertises is served
    # to its last token and refused one past it
    fe = c.start_frontend()
    w = c.start_worker(engine="llama", max_num_seqs=255, env={"DYN_LOG": "trace"})
    cells, layout, ctx = start_line(w)
    assert cells <= 65536 and (cells, layout, ctx) == (65280, "256 for each of up to 255 sequences", 256), \
        (cells, layout, ctx)
    assert llama_stream_cells(w) == 256, w.proc.log_tail()
    assert card_of(c, w)["context_length"] == ctx
    c.wait_workers(fe, 1)

    ids = [1] + [(7 * i) % 500 + 10 for i in range(199)]  # 200 token ids
    st, _, b = bl.post_json(fe.url + "/v1/completions",
                            bl.completion_body(ids, max_tokens=ctx - len(ids), model=MODEL, temperature=0))
    assert st == 200, (st, b)
    assert b["usage"] == {"prompt_tokens": 200, "completion_tokens": ctx - 200, "total_tokens": ctx}, b["usage"]
    st, _, b = bl.post_json(fe.url + "/v1/completions",
                            bl.completion_body(ids, max_tokens=ctx - len(ids) + 1, model=MODEL, temperature=0))
    assert st == 400 and b["error"]["code"] == "context_length_exceeded", (st, b)

    # a text prompt (tokenized by the engine, which checks it): its length first
    prompt = "Once upon a time, there was a little girl named Lily. " * 12
    st, _, b = bl.post_json(fe.url + "/v1/completions",
                            bl.completion_body(prompt, max_tokens=1, model=MODEL, temperature=0))
    assert st == 200, (st, b)
    n_prompt = b["usage"]["prompt_tokens"]
    assert 100 < n_prompt < ctx, n_prompt
    body = bl.completion_body(prompt, model=MODEL, temperature=0)
    del body["max_tokens"]  # the default, cut to what is left of the context
    st, _, b = bl.post_json(fe.url + "/v1/completions", body, timeout=60 * fl.SLOW)
    assert st == 200 and b["choices"][0]["finish_reason"] == "length", (st, b)
    assert b["usage"]["total_tokens"] == ctx, b["usage"]
    st, _, b = bl.post_json(fe.url + "/v1/completions",
                            bl.completion_body(prompt, max_tokens=ctx - n_prompt + 1, model=MODEL, temperature=0))
    assert st == 400 and b["error"]["code"] == "context_length_exceeded", (st, b)
    assert f"maximum context length is {ctx} tokens" in b["error"]["message"], b
    assert w.proc.alive() and "llama engine failed" not in w.proc.log_text(), w.proc.log_tail()
    print(f"default size x 255 sequences: {cells} cells, a context of {ctx} served to its end and refused past it")

print("ok")
