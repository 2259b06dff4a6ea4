#!/usr/bin/env python3
"""Graceful-shutdown figures.

Part A — SIGTERM → last request routed to the draining worker. Three steady workers and a frontend
under constant load from wrk (short non-streaming requests, as fast as they go); a fourth worker
joins, takes its share for a moment, then gets SIGTERM. The worker itself measures, from the moment
its signal handler runs, when the last REQUEST frame reached it (each such request crossed the
GOAWAY in flight and was refused and re-routed by the frontend); its drain summary line reports
it. No request after the signal counts as 0 ms. Repeated --rounds times: p50 / p99 / max.

Part B — drain duration versus in-flight count. N streams run on one worker (a second one joins
to take them over), then that worker gets SIGTERM. With --graceful-shutdown-timeout 0 the drain
hands every stream back at once: the figure is the worker's drain duration (signal to close) and
the stall the clients saw (the largest gap between two tokens of a stream, p50 / max over the N
streams). With a 60 s bound the streams run to their end on the worker: the drain lasts as long as
the longest remaining stream.

usage: BATON_BIN=build/baton python3 bench/drain.py [--rounds 30] [--counts 1,10,50,100]
"""

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perf import pct  # noqa: E402

SUMMARY_RX = re.compile(r"drain summary: streams_at_start=(\d+) finished=(\d+) handed_back=(\d+) refused=(\d+) "
                        r"last_request_after_ms=(-?[\d.]+) duration_ms=([\d.]+) exit_code=\d+ handback_after_ms=(-?[\d.]+)")


def summary(w):
    m = SUMMARY_RX.search(w.proc.log_text())
    assert m, w.proc.log_tail()
    return [float(x) for x in m.groups()]


def log_time(text, pattern):
    """Wall-clock time (s) of the first log line matching pattern (logs carry milliseconds)."""
    m = re.search(r"^(\S+) .*" + pattern, text, re.M)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def part_a(rounds):
    wrk = shutil.which("wrk")
    assert wrk, "wrk is needed for part A (apt-get install wrk)"
    with bl.Cluster() as c:
        fe = c.start_frontend()
        for _ in range(3):
            c.start_worker(speedup_ratio=1000)
        c.wait_workers(fe, 3)
        lua = os.path.join(c.dir, "post.lua")
        with open(lua, "w") as f:
            f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                    'wrk.body = \'{"model":"mock-model","messages":[{"role":"user","content":"hi"}],'
                    '"max_tokens":2}\'\n')
        duration = int(rounds * 2.5 + 30)
        load = subprocess.Popen([wrk, "-t2", "-c32", f"-d{duration}s", "-s", lua, fe.url + "/v1/chat/completions"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(2)
            lasts, refused, rates, goaway_ms, disc_ms = [], [], [], [], []
            for r in range(rounds):
                w = c.start_worker(speedup_ratio=1000)
                c.wait_workers(fe, 4)
                time.sleep(0.5)
                m0 = bl.metrics(fe.url)
                t0 = time.monotonic()
                time.sleep(0.5)
                m1 = bl.metrics(fe.url)
                rate = (bl.metric_sum(m1, "dynamo_frontend_requests_total") -
                        bl.metric_sum(m0, "dynamo_frontend_requests_total")) / (time.monotonic() - t0)
                rates.append(rate)
                w.proc.kill(signal.SIGTERM)
                assert w.proc.wait(30) == 0
                s = summary(w)
                lasts.append(max(0.0, s[4]))
                refused.append(s[3])
                wid = re.search(r"worker ([0-9a-f]+): registering -> ready", w.proc.log_text()).group(1)
                t_sig = log_time(w.proc.log_text(), "Received shutdown signal")
                fe_log = fe.proc.log_text()
                t_goaway = log_time(fe_log, f"worker {wid} .* is draining: routing nothing new")
                t_disc = log_time(fe_log, f"worker {wid} .* left discovery")
                if t_goaway is not None:
                    goaway_ms.append((t_goaway - t_sig) * 1000)
                if t_disc is not None:
                    disc_ms.append((t_disc - t_sig) * 1000)
                c.workers.remove(w)
        finally:
            load.send_signal(signal.SIGINT)
            out = load.communicate(timeout=30)[0]
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        print("\n## A. SIGTERM -> last request routed to the worker")
        print(f"rounds {rounds}; load {pct(rates, 50):.0f} requests/s through the frontend (median), "
              f"wrk non-2xx: {errors.group(1) if errors else 0}")
        print(f"last request after the signal: p50 {pct(lasts, 50):.3f} ms, p99 {pct(lasts, 99):.3f} ms, "
              f"max {max(lasts):.3f} ms; rounds with any request after the signal: "
              f"{sum(1 for x in lasts if x > 0)}; refused (re-routed) requests per round: p50 {pct(refused, 50):.0f}, "
              f"max {max(refused):.0f}")
        print(f"frontend log, signal -> GOAWAY handled (1 ms log resolution): p50 {pct(goaway_ms, 50):.0f} ms, "
              f"p99 {pct(goaway_ms, 99):.0f} ms, max {max(goaway_ms):.0f} ms ({len(goaway_ms)} rounds)")
        print(f"frontend log, signal -> discovery delete seen (inotify): p50 {pct(disc_ms, 50):.0f} ms, "
              f"p99 {pct(disc_ms, 99):.0f} ms, max {max(disc_ms):.0f} ms ({len(disc_ms)} rounds)")


def part_b(counts, max_tokens, bounds):
    print("\n## B. drain duration versus in-flight streams")
    print("| in flight | bound | streams handed back after | drain duration | handed back | client stall p50 | "
          "client stall max | all streams ok |")
    print("|---|---|---|---|---|---|---|---|")
    for bound in bounds:
        for n in counts:
            with bl.Cluster() as c:
                fe = c.start_frontend()
                a = c.start_worker(speedup_ratio=0.25, graceful_shutdown_timeout=bound)
                c.wait_workers(fe, 1)
                results, started, lock = [], set(), threading.Lock()
                ev = threading.Event()

                def one(i):
                    def on_event(st, obj):
                        with lock:
                            started.add(i)
                            if len(started) == n:
                                ev.set()
                    s = bl.stream_chat(fe.url, bl.chat_body(f"drain bench {i}", max_tokens=max_tokens), timeout=300,
                                       on_event=on_event)
                    with lock:
                        results.append(s)
                ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
                for t in ts:
                    t.start()
                assert ev.wait(120), "streams did not start"
                c.start_worker(speedup_ratio=0.25)
                c.wait_workers(fe, 2)
                a.proc.kill(signal.SIGTERM)
                assert a.proc.wait(120) == 0
                for t in ts:
                    t.join(300)
                s = summary(a)
                gaps = []
                for st in results:
                    tt = st.t_tokens
                    gaps.append(max((b - x for x, b in zip(tt, tt[1:])), default=0.0) * 1000)
                ok = sum(1 for st in results if st.ok and len(st.text) > 0)
                hb = f"{s[6]:.2f} ms" if s[6] >= 0 else "-"
                print(f"| {n} | {bound} s | {hb} | {s[5]:.1f} ms | {s[2]:.0f} | {pct(gaps, 50):.1f} ms | {max(gaps):.1f} ms | "
                      f"{ok}/{n} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--counts", default="1,10,50,100")
    ap.add_argument("--max-tokens", type=int, default=150)
    ap.add_argument("--bounds", default="0,60", help="drain bounds for part B, seconds")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    a = ap.parse_args()
    bl.deadline(3000, "drain bench")
    if not a.skip_a:
        part_a(a.rounds)
    if not a.skip_b:
        part_b([int(x) for x in a.counts.split(",")], a.max_tokens, [int(x) for x in a.bounds.split(",")])


if __name__ == "__main__":
    main()
