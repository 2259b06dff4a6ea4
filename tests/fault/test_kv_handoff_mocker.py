"""KV hand-off with the mocker engine (--mocker-kv-bytes-per-token), for fleet tests: the same path
as the llama engine's (KVSTATE pieces relayed by the frontend, the same counters), with a state
sized like a real one.

1. SIGTERM at a 0 s drain bound: the giving worker sends one state per stream (4 KiB per token,
   about 650 KiB each at the trigger, so every state travels in several KVSTATE pieces) and the receiver imports
   each one: imports = streams moved, no fallback, zero prefill tokens computed after the signal;
   every stream equals its fault-free reference byte for byte.
2. A receiver configured with another state size (a different model, as far as the mocker can
   tell) refuses every state (fallback "mismatch") and prefills; the streams are still byte-exact.
3. Rebalance: POST /rebalance?streams=2 on a worker's status server (--rebalance-endpoint) moves
   exactly 2 of its running streams to the other worker with their states (imported there, no
   prefill) while it keeps serving the rest; everything stays byte-exact, the frontend keeps
   routing to it (GET /health lists both), and without the flag the route does not exist (404).
"""

import json
import re
import signal
import sys
import threading

import batonlib as bl

MODEL = "mock-model"
N = 8
TRIGGER = 150
BPT = 4096


def body_for(i):
    return bl.completion_body(f"Tell me about the number {i} and its friends", max_tokens=700 + 11 * i, model=MODEL,
                              return_token_ids=True, stream_options={"include_usage": True})


def outcome(s):
    return {"text": s.text, "ids": list(s.token_ids), "finish": s.finish_reason, "usage": s.usage}


def run(fe, tag, on_all=None):
    counts = [0] * N
    lock = threading.Lock()
    fired = threading.Event()

    def one(i):
        def on_event(st, obj):
            with lock:
                counts[i] = len(st.token_ids)
                if on_all and not fired.is_set() and min(counts) >= TRIGGER:
                    fired.set()
                    on_all()
            return False
        return bl.stream_completion(fe.url, body_for(i), timeout=40, on_event=on_event,
                                    headers={"X-Request-Id": f"{tag}-{i}"})

    res = bl.run_concurrently(one, list(range(N)), max_workers=N)
    if on_all:
        assert fired.is_set(), f"{tag}: the trigger never fired (counts {counts})"
    return res


def check_exact(refs, runs, tag):
    bad = [f"stream {i}: {s.summary()}" for i, (r, s) in enumerate(zip(refs, runs))
           if not s.ok or outcome(s) != outcome(r)]
    assert not bad, f"{tag}: streams differ from the reference:\n" + "\n".join(bad)


def counters(w):
    s = bl.metrics(w.system_url)
    return {"prefill": bl.metric_sum(s, "baton_worker_engine_prefill_tokens_total"),
            "imports": bl.metric_sum(s, "baton_worker_kv_handoff_imports_total"),
            "fallbacks": {r: bl.metric_sum(s, "baton_worker_kv_handoff_fallbacks_total", reason=r)
                          for r in ("missing", "corrupt", "mismatch", "tokens", "import", "unsupported")}}


def worker(c, bpt, **flags):
    return c.start_worker(system_port=True, wait=True, speedup_ratio=3, graceful_shutdown_timeout=0,
                          mocker_kv_bytes_per_token=bpt, **flags)


def main():
    with bl.deadline(60, "test_kv_handoff_mocker"):
        with bl.Cluster() as c:
            fe = c.start_frontend(stream_stall_timeout=30)
            a, b = worker(c, BPT), worker(c, BPT)
            c.wait_workers(fe, 2)
            refs = run(fe, "ref")
            for i, s in enumerate(refs):
                s.assert_ok(f"reference {i}")

            before = {}

            def stop_a():
                before.update(counters(b))
                a.proc.kill(signal.SIGTERM)

            runs = run(fe, "term", stop_a)
            check_exact(refs, runs, "mocker SIGTERM hand-off")
            moved = set(re.findall(r"request term-(\d+) migrated", fe.proc.log_text()))
            assert moved, "no stream moved\n" + fe.proc.log_tail()
            sent = [int(x) for x in re.findall(r"KV state of (\d+) bytes sent with the stream", a.proc.log_text())]
            assert len(sent) == len(moved), (sent, moved)
            assert all(x >= TRIGGER * BPT for x in sent), f"states smaller than {TRIGGER} tokens of KV: {sent}"
            after = counters(b)
            assert after["imports"] - before["imports"] == len(moved), (before, after, moved)
            assert sum(after["fallbacks"].values()) == 0, after
            assert after["prefill"] == before["prefill"], (before, after)
            print(f"mocker SIGTERM: {len(moved)} streams moved with states of {min(sent)}-{max(sent)} bytes, "
                  f"imported, 0 prefill tokens, byte-exact")

            # 2. a receiver with another state size: mismatch, prefill, still exact
            b.proc.stop()
            src, dst = worker(c, BPT), worker(c, BPT // 2)
            c.wait_workers(fe, 2)
            before = {}

            def stop_src():
                before.update(counters(dst))
                src.proc.kill(signal.SIGTERM)

            runs = run(fe, "mis", stop_src)
            check_exact(refs, runs, "mocker mismatched state")
            moved = set(re.findall(r"request mis-(\d+) migrated", fe.proc.log_text()))
            assert moved, "no stream moved"
            after = counters(dst)
            assert after["fallbacks"]["mismatch"] - before["fallbacks"]["mismatch"] == len(moved), (before, after)
            assert after["imports"] == before["imports"] and after["prefill"] > before["prefill"], (before, after)
            print(f"mocker mismatch: {len(moved)} states refused (mismatch), re-prefilled, byte-exact")

            # 3. rebalance: 2 streams moved off a live worker
            src.proc.wait(10)
            dst.proc.stop()
            x = worker(c, BPT, rebalance_endpoint=True)
            y = worker(c, BPT)
            c.wait_workers(fe, 2)
            st, _, _ = bl.request("POST", y.system_url + "/rebalance?streams=1")
            assert st == 404, f"POST /rebalance without --rebalance-endpoint answered {st}"
            before, answer = {}, {}

            def rebalance():
                before.update(counters(y))
                st, _, body = bl.request("POST", x.system_url + "/rebalance?streams=2")
                answer.update(status=st, body=body)

            runs = run(fe, "reb", rebalance)
            check_exact(refs, runs, "rebalance")
            assert answer["status"] == 200, answer
            got = json.loads(answer["body"])
            assert got["moved"] == 2 and got["running"] >= 1, got
            moved = set(re.findall(r"request reb-(\d+) migrated", fe.proc.log_text()))
            assert len(moved) == 2, moved
            after = counters(y)
            assert after["imports"] - before["imports"] == 2 and after["prefill"] == before["prefill"], (before, after)
            assert bl.metric_sum(bl.metrics(x.system_url), "baton_worker_rebalanced_total") == 2
            assert x.proc.alive(), "the rebalanced worker stopped"
            assert len(c.wait_workers(fe, 2)) == 2
            print(f"rebalance: 2 streams moved off a live worker with their states, imported, byte-exact; "
                  f"{got['running']} kept running there")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
