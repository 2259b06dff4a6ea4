"""A sampled request without a seed on the llama engine, migrated by kill -9, through the real
binaries: the frontend chose a seed and carried it with every attempt, so the migrated stream
continues byte-exactly (docs/engines.md §3).

Two llama workers logging at debug level (each logs the seed it samples a request with, and
where the seed came from). One completion at temperature 0.8 without a seed; when its client has
200 tokens the worker holding it (the one whose KV gauge is above zero) is killed with SIGKILL.
The stream must end whole (800 tokens, finish_reason length), the frontend must log its
migration, the surviving worker must have sampled it with the frontend's seed, and a fault-free
replay of the request with that seed must equal it byte for byte (text, token ids, finish_reason,
usage).
"""

import re
import sys

import batonlib as bl
import faultlib as fl

MODEL = "mock-model"
SLOW = fl.SLOW


worker_kv = fl.worker_kv


def run(c, fe, ws):
    w1, w2 = ws
    victim = {}

    def kill_serving(st, obj):
        if len(st.token_ids) >= 200 and not victim:
            for w in (w1, w2):  # the worker holding the stream has KV in use
                if worker_kv(w) > 0:
                    victim["w"] = w
                    w.proc.kill()
                    break
        return False

    noseed = bl.completion_body("Once upon a time", max_tokens=800, model=MODEL, temperature=0.8,
                                return_token_ids=True, stream_options={"include_usage": True})
    s = bl.stream_completion(fe.url, noseed, timeout=30 * SLOW, on_event=kill_serving,
                             headers={"X-Request-Id": "noseed-0"})
    assert victim, "the worker serving the unseeded stream was not found"
    s.assert_ok("unseeded migrated stream")
    assert len(s.token_ids) == 800 and s.finish_reason == "length", s.summary()
    assert "request noseed-0 migrated" in fe.proc.log_text(), "the unseeded stream did not migrate"
    alive = w2 if victim["w"] is w1 else w1
    seeds = re.findall(r"request noseed-0: sampling seed (\d+) \((\w+)\)", alive.proc.log_text())
    assert seeds and seeds[0][1] == "frontend", f"continuation sampled with {seeds}"
    replay = bl.stream_completion(fe.url, dict(noseed, seed=int(seeds[0][0])), timeout=30 * SLOW)
    replay.assert_ok("replay with the frontend's seed")
    assert fl.outcome(replay) == fl.outcome(s), "the migrated unseeded stream differs from its replay"
    print(f"unseeded stream: migrated, equal to a fault-free replay with the frontend's seed {seeds[0][0]}")


if __name__ == "__main__":
    sys.exit(fl.llama_test("test_llama_unseeded", 40, run, workers=2, fe_flags={"stream_stall_timeout": 5}))
