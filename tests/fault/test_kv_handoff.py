"""KV hand-off through the real binaries (llama engine, the bundled stories260K model,
--llama-ubatch 1): a worker that gives its streams back sends each one's exported KV state with
it, and the next worker continues from that state without computing any prefill token.

The oracle is a fault-free run of the same streams (greedy, and seeded sampling at temperature
0.8; chat and completions): every stream of every fault run must equal it byte for byte (text,
token ids, finish_reason, usage). The engine's counters (worker /metrics) tell which path ran:
baton_worker_engine_prefill_tokens_total counts every token computed that was not a sequence's
newest one, so a continuation that imported its state adds nothing to it, and a re-prefilled one
adds its prompt and carried tokens.

1. SIGTERM at a 0 s drain bound (--graceful-shutdown-timeout 0): every stream of the stopped
   worker continues on the other one with its state imported (imports = streams moved, no
   fallback) and zero prefill tokens computed there after the signal.
2. A corrupted state (--fault-kv-corrupt on the giving worker: one byte of every exported state
   flipped after its checksum): the receiver refuses it (fallback reason "corrupt", once per
   moved stream), prefills instead, and the streams are still byte-exact. Likewise a state from a
   worker whose KV layout differs (--max-num-seqs 8 on the receiver): fallback "mismatch".
3. The target dies during the hand-off: the giving worker's streams go to a worker whose engine
   is stalled (SIGUSR2, --fault-signals) so they cannot start; it is then killed (SIGKILL) and a
   third worker continues them by re-prefill (the frontend relays a state once), byte-exact.
Run with --kv-handoff false on the giving worker, check 1 fails (prefill tokens computed, no
imports): that is how the counters were shown to tell the two paths apart.
"""

import os
import re
import signal
import sys
import threading
import time

import batonlib as bl
import faultlib as fl

MODEL = "mock-model"
N = 6
TRIGGER = 200  # tokens every stream has before the giving worker is stopped


def body_for(i):
    extra = {"return_token_ids": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if i % 2:
        extra.update(temperature=0.8, seed=500 + i)
    mt = 600 + 17 * i
    if i % 3 == 1:
        return "chat", bl.chat_body(f"Tell me a story about a {['cat', 'dog', 'bird'][i % 3]} named {i}",
                                    max_tokens=mt, model=MODEL, **extra)
    return "completion", bl.completion_body(f"Once upon a time, in a town number {i},", max_tokens=mt, model=MODEL,
                                            **extra)


def runner(fe):
    def start(i, rid, on_event):
        api, body = body_for(i)
        fn = bl.stream_chat if api == "chat" else bl.stream_completion
        return fn(fe.url, body, timeout=50, on_event=on_event, headers={"X-Request-Id": rid})
    return lambda tag, on_all=None: fl.run_streams(N, start, tag, TRIGGER, on_all)


def llama_worker(c, **flags):
    flags.setdefault("graceful_shutdown_timeout", 0)
    return c.start_worker(engine="llama", llama_ubatch=1, system_port=True, wait=True, **flags)


def main():
    if os.environ.get("BATON_NO_LLAMA") == "1":
        print("skipped: BATON_NO_LLAMA=1")
        return 77
    with bl.deadline(60, "test_kv_handoff"):
        with bl.Cluster() as c:
            # no stall detection: phase 3 stalls an engine on purpose
            fe = c.start_frontend(stream_stall_timeout=60)
            a = llama_worker(c)
            b = llama_worker(c)
            c.wait_workers(fe, 2)
            t0 = time.monotonic()
            run = runner(fe)
            refs = run("ref")
            for i, s in enumerate(refs):
                s.assert_ok(f"reference stream {i}")
                _, body = body_for(i)
                assert len(s.token_ids) == body["max_tokens"], (i, s.summary())
            print(f"reference: {N} streams in {time.monotonic() - t0:.1f} s")

            # 1. SIGTERM at a 0 s bound: the states travel, nothing is prefilled on the receiver
            m, before, after = fl.handoff_round(fe, refs, "term", run, b, lambda: a.proc.kill(signal.SIGTERM))
            sent = re.findall(r"KV state of (\d+) bytes sent with the stream", a.proc.log_text())
            assert len(sent) == len(m), f"{len(sent)} states sent for {len(m)} moved streams\n" + a.proc.log_tail()
            assert after["imports"] - before["imports"] == len(m), (before, after, m)
            assert sum(after["fallbacks"].values()) == 0, after
            assert after["prefill"] == before["prefill"], \
                f"the receiver computed {after['prefill'] - before['prefill']} prefill tokens for imported streams"
            fm = bl.metrics(fe.url)
            assert bl.metric_sum(fm, "baton_frontend_kv_handoff_relayed_total") == len(m), fm
            assert bl.metric_sum(fm, "baton_frontend_kv_handoff_relayed_bytes_total") == sum(int(x) for x in sent)
            per_tok = sum(int(x) for x in sent) / (after["imported_tokens"] - before["imported_tokens"])
            print(f"SIGTERM: {len(m)} streams moved with their KV state ({len(sent)} states, "
                  f"{sum(int(x) for x in sent)} bytes, ~{per_tok:.0f} bytes per token), byte-exact, "
                  f"0 prefill tokens on the receiver")
            assert a.proc.wait(10) == 0, "the drained worker did not exit 0"

            # 2. a corrupted state is refused and the stream re-prefilled
            b.proc.stop()
            src = llama_worker(c, fault_kv_corrupt=True)
            dst = llama_worker(c)
            c.wait_workers(fe, 2)
            m, before, after = fl.handoff_round(fe, refs, "corrupt", run, dst, lambda: src.proc.kill(signal.SIGTERM))
            assert after["fallbacks"]["corrupt"] - before["fallbacks"]["corrupt"] == len(m), (before, after, m)
            assert after["imports"] == before["imports"], (before, after)
            assert after["prefill"] > before["prefill"], (before, after)
            print(f"corrupted state: {len(m)} streams refused their state (fallback corrupt), re-prefilled "
                  f"({after['prefill'] - before['prefill']:.0f} tokens), byte-exact")

            # 2b. a state from a worker with another KV layout (--max-num-seqs: the context's
            # sequence count and cells differ; each sequence's own cells, 2,048, do not) is refused
            src.proc.wait(10)
            dst.proc.stop()
            src = llama_worker(c)
            dst = llama_worker(c, max_num_seqs=8)
            c.wait_workers(fe, 2)
            m, before, after = fl.handoff_round(fe, refs, "layout", run, dst, lambda: src.proc.kill(signal.SIGTERM))
            assert after["fallbacks"]["mismatch"] - before["fallbacks"]["mismatch"] == len(m), (before, after, m)
            assert after["imports"] == before["imports"] and after["prefill"] > before["prefill"], (before, after)
            print(f"another KV layout: {len(m)} states refused (fallback mismatch), re-prefilled, byte-exact")

            # 3. the target dies during the hand-off: a third worker re-prefills
            dst.proc.stop()
            giver = llama_worker(c)
            target = llama_worker(c, fault_signals=True, engine_stuck_timeout=0)
            c.wait_workers(fe, 2)
            third = {}

            def stop_giver():
                target.proc.kill(signal.SIGUSR2)  # its engine stops stepping: nothing it gets starts
                giver.proc.kill(signal.SIGTERM)

            def kill_target():
                n = len(fl.migrated(fe, "die"))
                bl.wait_for(lambda: len(re.findall(r"request die-\d+: relaying a KV state",
                                                   fe.proc.log_text())) >= len(fl.migrated(fe, "die")) > 0, 15,
                            what="the states relayed to the stalled target")
                third["w"] = llama_worker(c)
                c.wait_workers(fe, 2)  # the target and the third (the giver has left)
                third["before"] = fl.kv_counters(third["w"])
                target.proc.kill()
                return n

            killer = threading.Thread(target=lambda: (bl.wait_for(lambda: not giver.proc.alive(), 30,
                                                                  what="the giver exiting"),
                                                      kill_target()))

            def on_all():
                stop_giver()
                killer.start()

            runs = run("die", on_all)
            killer.join(30)
            fl.assert_exact(refs, runs, "target died during the hand-off")
            w3 = third["w"]
            after = fl.kv_counters(w3)
            assert after["imports"] == 0 and sum(after["fallbacks"].values()) == 0, after
            assert after["prefill"] > third["before"]["prefill"], (third["before"], after)
            relayed = len(re.findall(r"request die-\d+: relaying a KV state", fe.proc.log_text()))
            print(f"target died: {relayed} states relayed to the stalled target; after its death the third worker "
                  f"re-prefilled ({after['prefill'] - third['before']['prefill']:.0f} tokens), byte-exact")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
