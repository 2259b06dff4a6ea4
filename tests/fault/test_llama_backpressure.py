"""KV back-pressure on the llama engine, through the real binaries: llama_decode finding no free
KV slot is back-pressure, not a failure (docs/engines.md §3.2).

One llama worker with one KV pool shared by all sequences (--kv-unified) of only 1,024 cells and
--max-num-seqs 4, debug log. Four greedy streams of 600 tokens are admitted together (their
prompts fit) and grow to 4 x ~610 cells, more than the pool holds: llama.cpp reports no free
slot, and the engine must preempt the most recently admitted sequence (drop its cells, queue it
again, recompute it from its tokens later, as vLLM does). Checked: the engine preempted (its
debug log); every stream ends whole (600 tokens, finish_reason length, exact usage) and equals,
byte for byte, the same request run alone on the same worker beforehand; the worker is still
serving afterwards and holds no sequence and no KV block.
"""

import sys

import batonlib as bl
import faultlib as fl

MODEL = "mock-model"
SLOW = fl.SLOW
N, TOKENS = 4, 600


def body(i):
    return bl.completion_body(f"Once upon a time, a bear number {i}", max_tokens=TOKENS, model=MODEL, temperature=0,
                              return_token_ids=True, stream_options={"include_usage": True})


def main():
    if fl.skip("llama") is not None:
        return 77
    with bl.deadline(45 * SLOW, "test_llama_backpressure"):
        with bl.Cluster() as c:
            fe = c.start_frontend()
            w = c.start_worker(engine="llama", system_port=True, wait=True, kv_unified=True, ctx_size=1024,
                               max_num_seqs=N, env={"DYN_LOG": "debug"})
            c.wait_workers(fe, 1)
            refs = []
            for i in range(N):  # alone: the pool holds one stream
                refs.append(bl.stream_completion(fe.url, body(i), timeout=30 * SLOW).assert_ok(f"reference {i}"))
                assert len(refs[i].token_ids) == TOKENS, refs[i].summary()
            assert fl.preemptions(w, "kv") == 0, "a lone stream was preempted"
            runs = bl.run_concurrently(lambda i: bl.stream_completion(fe.url, body(i), timeout=30 * SLOW),
                                       list(range(N)), max_workers=N)
            preempted = fl.preemptions(w, "kv")
            assert preempted > 0, "the pool never ran out: no preemption (the test would show nothing)"
            fl.assert_exact(refs, runs, "backpressure")
            for s in runs:
                assert s.finish_reason == "length" and s.usage["completion_tokens"] == TOKENS, s.summary()
            assert w.proc.alive() and "llama engine failed" not in w.proc.log_text(), w.proc.log_tail()
            bl.wait_for(lambda: fl.worker_idle(w), 5, what="no sequence and no KV block left")
            st, _, b = bl.post_json(fe.url + "/v1/completions", bl.completion_body("Hello", max_tokens=4, model=MODEL))
            assert st == 200 and b["usage"]["completion_tokens"] == 4, (st, b)
            print(f"back-pressure: {preempted:.0f} preemptions with {N} streams in 1,024 shared cells; every stream "
                  f"whole and equal to its run alone")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
