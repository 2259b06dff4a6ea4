#!/usr/bin/env python3
"""bench/llama.py — figures of the llama engine (docs/benchmarks.md), through the real binaries:
a frontend and llama workers serving the bundled stories260K model.

    python3 bench/llama.py throughput [--streams 1,16] [--tokens 1000] [--llama-ubatch 1] [--no-loop]
    python3 bench/llama.py migration  [--streams 8] [--tokens 1200] [--kill-at 100,500,1000]
    python3 bench/llama.py cancel     [--runs 20]

throughput: one worker; N concurrent greedy completions of --tokens tokens each; prints total
  tokens/s (first request sent to last token) and TTFT p50/p99; then the same N sequences of
  --tokens tokens in a minimal llama.cpp loop in one process with the engine's settings
  (bench/llama_loop.c, built as baton-llama-loop next to the baton binary): the engine's ceiling,
  printed beside it. --llama-ubatch N runs the workers with physical batches of N tokens (what
  exactness costs: docs/benchmarks.md), --no-loop skips the loop.
migration: two workers; N concurrent streams (half greedy, half seeded at temperature 0.8); when
  every stream has K tokens the worker holding most of them is killed (SIGKILL). The stall of a
  migrated stream is the longest gap between two token events it saw; printed p50/p99/max per K
  (the re-prefill replays K carried tokens one token per step, docs/engines.md).
cancel: one worker; a stream closed by the client after 100 tokens; the time from the close to
  the worker's KV gauge reading 0 (polled every 5 ms; the gauge lags the engine by a load
  report, so this bounds the engine's own release from above).
Standard library only (tests/lib/batonlib.py); BATON_BIN selects the binary (default build/baton).
"""

import argparse
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402

MODEL = "mock-model"


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def throughput(a):
    for n in [int(x) for x in a.streams.split(",")]:
        with bl.Cluster() as c:
            fe = c.start_frontend()
            c.start_worker(engine="llama", system_port=True, wait=True, llama_ubatch=a.llama_ubatch)
            c.wait_workers(fe, 1)

            def one(i):
                body = bl.completion_body(f"Once upon a time {i}", max_tokens=a.tokens, model=MODEL, temperature=0,
                                          return_token_ids=True)
                return bl.stream_completion(fe.url, body, timeout=600)

            t0 = time.monotonic()
            rs = bl.run_concurrently(one, list(range(n)))
            dt = max(s.t_end for s in rs) - t0
            for s in rs:
                s.assert_ok()
            tot = sum(len(s.token_ids) for s in rs)
            ttft = [(s.t_first - s.t_start) * 1000 for s in rs]
            print(f"throughput streams={n} tokens={a.tokens} ubatch={a.llama_ubatch}: {tot} tokens in {dt:.2f} s = {tot / dt:.0f} tok/s; "
                  f"TTFT p50 {pct(ttft, 50):.1f} ms p99 {pct(ttft, 99):.1f} ms")
        loop = os.path.join(os.path.dirname(os.path.abspath(bl.baton_bin())), "baton-llama-loop")
        if a.no_loop:
            continue
        if not os.access(loop, os.X_OK):
            print(f"  (no {loop}: build it with cmake to compare with the minimal llama.cpp loop)")
            continue
        out = subprocess.run([loop, "--streams", str(n), "--tokens", str(a.tokens)], capture_output=True, text=True,
                             timeout=600)
        line = out.stdout.strip()
        rate = float(line.rsplit("=", 1)[1].split()[0]) if out.returncode == 0 and "tok/s" in line else None
        print(f"  {line or out.stderr.strip()}")
        if rate:
            print(f"  engine / loop, {n} stream(s): {tot / dt:.0f} / {rate:.0f} tok/s = {tot / dt / rate * 100:.0f} %")


def migration(a):
    for k in [int(x) for x in a.kill_at.split(",")]:
        with bl.Cluster() as c:
            fe = c.start_frontend(stream_stall_timeout=5)
            ws = [c.start_worker(engine="llama", system_port=True, wait=True) for _ in range(2)]
            c.wait_workers(fe, 2)
            n = a.streams
            counts = [0] * n
            lock = threading.Lock()
            done = threading.Event()

            def kill_if_ready(i):
                def cb(st, obj):
                    with lock:
                        counts[i] = len(st.token_ids)
                        if not done.is_set() and min(counts) >= k:
                            done.set()
                            kv = [bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_active_blocks") for w in ws]
                            ws[0 if kv[0] >= kv[1] else 1].proc.kill()
                    return False
                return cb

            def one(i):
                extra = {"return_token_ids": True, "temperature": 0}
                if i % 2:
                    extra.update(temperature=0.8, seed=i)
                body = bl.completion_body(f"Once upon a time {i}", max_tokens=a.tokens, model=MODEL, **extra)
                return bl.stream_completion(fe.url, body, timeout=600, on_event=kill_if_ready(i),
                                            headers={"X-Request-Id": f"bench-{i}"})

            rs = bl.run_concurrently(one, list(range(n)))
            log = fe.proc.log_text()
            stalls = []
            for i, s in enumerate(rs):
                s.assert_ok()
                if f"request bench-{i} migrated" not in log:
                    continue
                gaps = [b - a_ for a_, b in zip(s.t_tokens, s.t_tokens[1:])]
                stalls.append(max(gaps) * 1000)
            print(f"migration kill_at={k} streams={n}: {len(stalls)} migrated; stall p50 {pct(stalls, 50):.0f} ms "
                  f"p99 {pct(stalls, 99):.0f} ms max {max(stalls):.0f} ms")


def cancel(a):
    with bl.Cluster() as c:
        fe = c.start_frontend()
        w = c.start_worker(engine="llama", system_port=True, wait=True)
        c.wait_workers(fe, 1)
        lat = []
        for r in range(a.runs):
            body = bl.completion_body("Once upon a time", max_tokens=1500, model=MODEL, temperature=0,
                                      return_token_ids=True)
            s = bl.stream_completion(fe.url, body, timeout=60, on_event=lambda st, o: len(st.token_ids) >= 100)
            t0 = s.t_end
            while bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_active_blocks") != 0:
                time.sleep(0.005)
            lat.append((time.monotonic() - t0) * 1000)
        print(f"cancel runs={a.runs}: client close -> worker KV gauge 0: p50 {pct(lat, 50):.1f} ms "
              f"p99 {pct(lat, 99):.1f} ms")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["throughput", "migration", "cancel"])
    p.add_argument("--streams", default=None)
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--kill-at", default="100,500,1000")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--llama-ubatch", type=int, default=1,
                   help="throughput: the workers' --llama-ubatch (1, the default, is exact across migration)")
    p.add_argument("--no-loop", action="store_true", help="throughput: skip the minimal llama.cpp loop")
    a = p.parse_args()
    if a.what == "throughput":
        a.streams = a.streams or "1,16"
        throughput(a)
    elif a.what == "migration":
        a.streams = int(a.streams or 8)
        a.tokens = max(a.tokens, 1200)
        migration(a)
    else:
        cancel(a)


if __name__ == "__main__":
    main()
