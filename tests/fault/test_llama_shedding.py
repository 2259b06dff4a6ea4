"""Load shedding on the llama engine's real KV memory: the worker's load reports count the cells
its sequences hold, so the frontend's --active-decode-blocks-threshold refuses new requests (503,
Retry-After) while they are in use and serves again once they are freed."""

import os
import sys
import threading

import batonlib as bl

MODEL = "mock-model"


def shedding_on_real_kv():
    """Shedding on real KV memory: a worker of 4,096 cells (256 blocks of 16) and a frontend
    busy above 30 % of them. Four streams (started one after the other, each once the previous one
    streams, so the frontend's estimate for requests in flight does not refuse them) hold more
    than that after ~340 tokens each: a new request is then refused with 503 and Retry-After;
    once the streams end and their cells are freed, requests are served again."""
    with bl.Cluster() as c:
        fe = c.start_frontend(active_decode_blocks_threshold=0.3)
        w = c.start_worker(engine="llama", system_port=True, wait=True, ctx_size=4096, max_num_seqs=4)
        c.wait_workers(fe, 1)
        total = bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_total_blocks")
        assert total == 256, f"total KV blocks {total}, expected 4096 cells / 16"
        results = {}

        def long_stream(i, started):
            body = bl.completion_body(f"Once upon a time {i}", max_tokens=600, model=MODEL, temperature=0)
            results[i] = bl.stream_completion(fe.url, body, timeout=60, on_event=lambda st, o: started.set())
            started.set()

        ts = []
        for i in range(4):
            started = threading.Event()
            ts.append(threading.Thread(target=long_stream, args=(i, started)))
            ts[-1].start()
            assert started.wait(20), f"long stream {i} did not start"
        bl.wait_for(lambda: bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_active_blocks") > 0.3 * 256 + 8,
                    20, what="the streams to hold more than 30 % of the KV blocks")
        st, headers, body = bl.post_json(fe.url + "/v1/completions",
                                         bl.completion_body("Hello", max_tokens=4, model=MODEL))
        assert st == 503 and "retry-after" in headers, f"expected 503 with Retry-After, got {st} {headers} {body}"
        for t in ts:
            t.join()
        for i in range(4):
            results[i].assert_ok(f"long stream {i}")
        bl.wait_for(lambda: bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_active_blocks") == 0, 5,
                    what="KV freed")

        def served():
            st, _, _ = bl.post_json(fe.url + "/v1/completions", bl.completion_body("Hello", max_tokens=4, model=MODEL))
            return st == 200
        bl.wait_for(served, 10, what="requests served again once the KV is free")
        print("shedding on real KV: 503 while the streams held > 30 % of the cells, served after")



def main():
    if os.environ.get("BATON_NO_LLAMA") == "1":
        print("skipped: BATON_NO_LLAMA=1")
        return 77
    with bl.deadline(60, "test_llama_shedding"):
        shedding_on_real_kv()
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
