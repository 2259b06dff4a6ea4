"""More fault kinds on the llama engine, byte-exact against a fault-free run: 6 concurrent streams
of 1,500-1,600 tokens (half greedy, half seeded at temperature 0.8) on two llama workers, a spare
started for each round, then:

1. engine failure: a worker started with --fault-die-after-tokens declares its engine dead mid-way
   (as a failed decode would): it hands every stream back and exits 1;
2. SIGTERM drain with a 1 s bound: the worker's streams are handed back and continue elsewhere;
3. SIGSTOP: the frontend's stall detection (--stream-stall-timeout 2) moves the streams of the
   stopped worker.

In every round every stream must equal its reference (text, token ids, finish_reason, usage),
and some streams must have been migrated. test_llama.py covers kill -9 and cancellation, test_llama_shedding.py shedding on real KV.
"""

import os
import re
import signal
import sys
import threading
import time

import batonlib as bl

MODEL = "mock-model"
N = 6


def body_for(i):
    extra = {"return_token_ids": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if i % 2:
        extra.update(temperature=0.8, seed=500 + i)
    return bl.completion_body(f"Once upon a time, a {['cat', 'dog', 'fox', 'owl'][i % 4]} number {i}",
                              max_tokens=1500 + 20 * i, model=MODEL, **extra)


def outcome(s):
    return {"text": s.text, "ids": list(s.token_ids), "finish": s.finish_reason, "usage": s.usage}


def run_load(fe, tag, on_event=None):
    def one(i):
        return bl.stream_completion(fe.url, body_for(i), timeout=60, on_event=on_event,
                                    headers={"X-Request-Id": f"{tag}-{i}"})
    return bl.run_concurrently(one, list(range(N)), max_workers=N)


def check(fe, tag, refs, runs):
    bad = []
    for i, (r, s) in enumerate(zip(refs, runs)):
        if not s.ok or outcome(s) != outcome(r):
            a, b = outcome(r), outcome(s)
            first = next((k for k in range(min(len(a["ids"]), len(b["ids"]))) if a["ids"][k] != b["ids"][k]), None)
            bad.append(f"stream {i}: {s.summary()}; first differing token {first}")
    assert not bad, f"{tag}: streams differ from their reference:\n" + "\n".join(bad)
    moved = sorted(set(int(m) for m in re.findall(rf"request {tag}-(\d+) migrated", fe.proc.log_text())))
    assert moved, f"{tag}: no stream migrated"
    print(f"{tag}: {N} streams byte-exact; migrated {moved}")


def main():
    if os.environ.get("BATON_NO_LLAMA") == "1":
        print("skipped: BATON_NO_LLAMA=1")
        return 77
    with bl.deadline(200, "test_llama_faults"):
        with bl.Cluster() as c:
            fe = c.start_frontend(stream_stall_timeout=2)
            w1 = c.start_worker(engine="llama", system_port=True, wait=True)
            w2 = c.start_worker(engine="llama", system_port=True, wait=True)
            c.wait_workers(fe, 2)
            refs = run_load(fe, "ref")
            for i, s in enumerate(refs):
                s.assert_ok(f"reference {i}")
                assert len(s.token_ids) == 1500 + 20 * i, s.summary()

            # 1. engine failure: w3's engine dies after 2,000 tokens (all its sequences together)
            w1.proc.stop()
            w3 = c.start_worker(engine="llama", system_port=True, wait=True, fault_die_after_tokens=2000)
            c.wait_workers(fe, 2)
            runs = run_load(fe, "die")
            assert w3.proc.wait(10) == 1, f"the worker whose engine died exited {w3.proc.returncode}, not 1"
            assert "injected engine death" in w3.proc.log_text()
            check(fe, "die", refs, runs)

            # 2. SIGTERM drain with a 1 s bound
            w4 = c.start_worker(engine="llama", system_port=True, wait=True, graceful_shutdown_timeout=1)
            c.wait_workers(fe, 2)
            fired = threading.Event()

            def term(st, obj):
                if len(st.token_ids) >= 400 and not fired.is_set():
                    fired.set()
                    w4.proc.kill(signal.SIGTERM)
                return False

            runs = run_load(fe, "term", term)
            assert w4.proc.wait(15) == 0, f"the drained worker exited {w4.proc.returncode}"
            check(fe, "term", refs, runs)

            # 3. SIGSTOP: the frontend's stall detection moves the streams
            w5 = c.start_worker(engine="llama", system_port=True, wait=True)
            c.wait_workers(fe, 2)
            stopped = threading.Event()

            def stop(st, obj):
                if len(st.token_ids) >= 400 and not stopped.is_set():
                    stopped.set()
                    w5.proc.kill(signal.SIGSTOP)
                return False

            t0 = time.monotonic()
            runs = run_load(fe, "stop", stop)
            w5.proc.kill(signal.SIGCONT)
            check(fe, "stop", refs, runs)
            print(f"SIGSTOP round in {time.monotonic() - t0:.1f} s")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
