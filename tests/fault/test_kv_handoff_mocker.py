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
The frontend's migration counters: a stream a drain hands back is a migration (each counted once in
dynamo_frontend_model_migration_total and in the stall histogram), a rebalanced one is not (neither
moves).
"""

import json
import re
import signal
import sys

import batonlib as bl
import faultlib as fl

MODEL = "mock-model"
N = 8
TRIGGER = 150
BPT = 4096


def body_for(i):
    return bl.completion_body(f"Tell me about the number {i} and its friends", max_tokens=700 + 11 * i, model=MODEL,
                              return_token_ids=True, stream_options={"include_usage": True})


def runner(fe):
    def start(i, rid, on_event):
        return bl.stream_completion(fe.url, body_for(i), timeout=40, on_event=on_event, headers={"X-Request-Id": rid})
    return lambda tag, on_all=None: fl.run_streams(N, start, tag, TRIGGER, on_all)


def worker(c, bpt, **flags):
    return c.start_worker(system_port=True, wait=True, speedup_ratio=3, graceful_shutdown_timeout=0,
                          mocker_kv_bytes_per_token=bpt, **flags)


def migration_counts(fe):
    """(dynamo_frontend_model_migration_total, migrations in the stall histogram) of the frontend."""
    m = bl.metrics(fe.url)
    return (bl.metric_sum(m, "dynamo_frontend_model_migration_total"),
            bl.metric_sum(m, "dynamo_frontend_model_migration_stall_seconds_count"))


def main():
    with bl.deadline(60, "test_kv_handoff_mocker"):
        with bl.Cluster() as c:
            fe = c.start_frontend(stream_stall_timeout=30)
            a, b = worker(c, BPT), worker(c, BPT)
            c.wait_workers(fe, 2)
            run = runner(fe)
            refs = run("ref")
            for i, s in enumerate(refs):
                s.assert_ok(f"reference {i}")

            # 1. SIGTERM at a 0 s bound: every state imported, nothing prefilled
            moved, before, after = fl.handoff_round(fe, refs, "term", run, b, lambda: a.proc.kill(signal.SIGTERM))
            sent = [int(x) for x in re.findall(r"KV state of (\d+) bytes sent with the stream", a.proc.log_text())]
            assert len(sent) == len(moved), (sent, moved)
            assert all(x >= TRIGGER * BPT for x in sent), f"states smaller than {TRIGGER} tokens of KV: {sent}"
            assert after["imports"] - before["imports"] == len(moved), (before, after, moved)
            assert sum(after["fallbacks"].values()) == 0, after
            assert after["prefill"] == before["prefill"], (before, after)
            assert migration_counts(fe) == (len(moved), len(moved)), (migration_counts(fe), moved)
            print(f"mocker SIGTERM: {len(moved)} streams moved with states of {min(sent)}-{max(sent)} bytes, "
                  f"imported, 0 prefill tokens, byte-exact")

            # 2. a receiver with another state size: mismatch, prefill, still exact
            b.proc.stop()
            src, dst = worker(c, BPT), worker(c, BPT // 2)
            c.wait_workers(fe, 2)
            moved, before, after = fl.handoff_round(fe, refs, "mis", run, dst, lambda: src.proc.kill(signal.SIGTERM))
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
            answer = {}
            counts = migration_counts(fe)

            def rebalance():
                st, _, body = bl.request("POST", x.system_url + "/rebalance?streams=2")
                answer.update(status=st, body=body)

            moved, before, after = fl.handoff_round(fe, refs, "reb", run, y, rebalance)
            assert answer["status"] == 200, answer
            got = json.loads(answer["body"])
            assert got["moved"] == 2 and got["running"] >= 1, got
            assert len(moved) == 2, moved
            assert after["imports"] - before["imports"] == 2 and after["prefill"] == before["prefill"], (before, after)
            assert bl.metric_sum(bl.metrics(x.system_url), "baton_worker_rebalanced_total") == 2
            assert x.proc.alive(), "the rebalanced worker stopped"
            assert len(c.wait_workers(fe, 2)) == 2
            assert migration_counts(fe) == counts, f"the moves counted as migrations: {counts} -> {migration_counts(fe)}"
            print(f"rebalance: 2 streams moved off a live worker with their states, imported, byte-exact; "
                  f"{got['running']} kept running there")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
