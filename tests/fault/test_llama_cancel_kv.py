"""Cancellation on the llama engine frees the sequence's KV cells at once, through the real
binaries: one llama worker; a greedy stream of 1,500 tokens that its client closes after 100
tokens. The worker's KV gauge (baton_worker_kv_active_blocks, from llama.cpp's real cell usage)
is above zero while it streams and back to zero within 5 s of the close (docs/benchmarks.md
measures the time: a few milliseconds); the worker logs that the engine freed the cells.
"""

import sys

import batonlib as bl
import faultlib as fl

MODEL = "mock-model"
SLOW = fl.SLOW


worker_kv = fl.worker_kv


def run(c, fe, ws):
    (w,) = ws
    seen = {}

    def abort_mid(st, obj):
        if len(st.token_ids) >= 100 and "kv" not in seen:
            seen["kv"] = worker_kv(w)
            return True
        return False

    s = bl.stream_completion(fe.url, bl.completion_body("Once upon a time", max_tokens=1500, model=MODEL,
                                                        temperature=0, return_token_ids=True),
                             timeout=20 * SLOW, on_event=abort_mid, headers={"X-Request-Id": "cut-0"})
    assert s.aborted and 100 <= len(s.token_ids) < 1500, s.summary()
    assert seen.get("kv", 0) > 0, f"KV gauge was {seen.get('kv')} while streaming"
    bl.wait_for(lambda: worker_kv(w) == 0, 5, what="KV blocks back to 0 after the client left")
    w.proc.wait_log(r"request cut-0: llama engine freed the sequence's KV cells", timeout=5)
    print(f"cancellation: KV gauge {seen['kv']} blocks while streaming, 0 after")


if __name__ == "__main__":
    sys.exit(fl.llama_test("test_llama_cancel_kv", 30, run))
