#!/usr/bin/env python3
"""KV hand-off vs re-prefill: the stall a client sees when the worker streaming to it is stopped
(SIGTERM at a 0 s drain bound) after N carried tokens, with the KV state travelling to the next
worker (--kv-handoff true, the default) and without (--kv-handoff false: the next worker
re-prefills prompt + N tokens).

Each round starts a frontend and two llama workers (the bundled stories260K model,
--llama-ubatch 1, --graceful-shutdown-timeout 0), streams one greedy completion, and when the
client has received N tokens sends SIGTERM to the worker serving it. The stall is the longest gap
between two consecutive SSE events the client received after the signal (the gap that spans the
give-back, the relay and the first token of the continuation). Also printed: the normal gap
between tokens (mean, before the signal), the state's size, and the tokens the receiving worker
computed as prefill for the continuation (baton_worker_engine_prefill_tokens_total delta: 0 with
the hand-off). Both modes run in the same invocation, interleaved round by round.

With --mocker-bpt BYTES the workers run the mocker engine exporting BYTES of state per token
(524288 = a 7B-class model's 512 KiB): the rounds then show large states, and also the time the
frontend took to relay the state to the next worker (its log: "relaying a KV state" to "KV state
... written to worker"), that relay's throughput, and the frontend's resident memory before the
signal and at its peak during the hand-off (sampled every 5 ms from /proc).

usage: BATON_BIN=build/baton python3 bench/handoff.py [--carried 200,1000,1900] [--rounds 3]
       BATON_BIN=build/baton python3 bench/handoff.py --mocker-bpt 524288 --carried 200,500 --rounds 3
"""

import argparse
import datetime
import os
import re
import signal
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402

MODEL = "mock-model"


def prefill(w):
    return bl.metric_sum(bl.metrics(w.system_url), "baton_worker_engine_prefill_tokens_total")


def inflight(w):
    return bl.metric_sum(bl.metrics(w.system_url), "dynamo_component_inflight_requests")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) / 1024 for x in f if x.startswith("VmRSS:"))


def log_time(log, pattern):
    """The timestamp (s) of the first log line matching pattern, or None."""
    m = re.search(r"^(\S+Z) .*" + pattern, log, re.M)
    return datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp() if m else None


def one_round(carried, handoff, bpt=0):
    env = {"DYN_KV_HANDOFF": "true" if handoff else "false"}
    engine = {"mocker_kv_bytes_per_token": bpt} if bpt else {"engine": "llama", "llama_ubatch": 1}
    with bl.Cluster() as c:
        fe = c.start_frontend(stream_stall_timeout=30)
        ws = [c.start_worker(graceful_shutdown_timeout=0, system_port=True, wait=True, env=env, **engine)
              for _ in range(2)]
        c.wait_workers(fe, 2)
        times, state = [], {}

        def on_event(st, obj):
            times.append(time.monotonic())
            if "sig" not in state and len(st.token_ids) >= carried:
                src = next(w for w in ws if inflight(w) > 0)
                dst = next(w for w in ws if w is not src)
                state.update(src=src, dst=dst, before=prefill(dst), n=len(st.token_ids))
                state["rss0"] = rss_mib(fe.proc.pid)
                state["sig"] = time.monotonic()
                src.proc.kill(signal.SIGTERM)
            return False

        peak = [0.0]
        done = threading.Event()

        def sample():
            while not done.wait(0.005):
                peak[0] = max(peak[0], rss_mib(fe.proc.pid))
        sampler = threading.Thread(target=sample)
        sampler.start()

        body = bl.completion_body("Once upon a time", max_tokens=carried + 60, model=MODEL, temperature=0,
                                  return_token_ids=True)
        s = bl.stream_completion(fe.url, body, timeout=60, on_event=on_event)
        done.set()
        sampler.join()
        s.assert_ok("bench stream")
        assert "sig" in state, "the signal was never sent"
        after = [t for t in times if t >= state["sig"]]
        first = times[0]
        n_before = sum(1 for t in times if t < state["sig"])
        gaps = [b - a for a, b in zip(after, after[1:])]
        stall = max([after[0] - state["sig"]] + gaps)
        sent = re.findall(r"KV state of (\d+) bytes sent", state["src"].proc.log_text())
        log = fe.proc.log_text()
        t0, t1 = log_time(log, "relaying a KV state"), log_time(log, r"KV state of \d+ bytes written to worker")
        return {"stall_ms": stall * 1000, "itl_ms": (state["sig"] - first) / max(1, n_before - 1) * 1000,
                "bytes": int(sent[0]) if sent else 0, "prefill": prefill(state["dst"]) - state["before"],
                "n": state["n"], "relay_ms": (t1 - t0) * 1000 if t0 is not None and t1 is not None else None, "rss0": state["rss0"],
                "rss_peak": peak[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--carried", default="200,1000,1900")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mocker-bpt", type=int, default=0, help="mocker engine, this many state bytes per token")
    a = ap.parse_args()
    rows = []
    for n in [int(x) for x in a.carried.split(",")]:
        res = {True: [], False: []}
        for _ in range(a.rounds):
            for mode in (True, False):
                res[mode].append(one_round(n, mode, a.mocker_bpt))
        for mode in (True, False):
            r = res[mode]
            relays = [x["relay_ms"] for x in r if x["relay_ms"] is not None]
            rows.append((n, "KV hand-off" if mode else "re-prefill", statistics.median(x["stall_ms"] for x in r),
                         max(x["stall_ms"] for x in r), statistics.median(x["itl_ms"] for x in r),
                         statistics.median(x["bytes"] for x in r), statistics.median(x["prefill"] for x in r),
                         statistics.median(relays) if relays else None, statistics.median(x["rss0"] for x in r),
                         max(x["rss_peak"] for x in r)))
    print(f"| carried tokens | path | client stall, median (ms) | max (ms) | normal time per token (ms) | "
          f"state (bytes) | prefill tokens on the receiver | relay to the next worker, median (ms) | MB/s | "
          f"frontend RSS before / peak (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, mode, med, mx, itl, b, p, rl, r0, rp in rows:
        if rl is None:
            relay = "– | –"
        elif rl < 1:  # the log's timestamps have 1 ms resolution
            relay = "< 1 | –"
        else:
            relay = f"{rl:.0f} | {b / 1e6 / (rl / 1000):,.0f}"
        print(f"| {n} | {mode} | {med:.1f} | {mx:.1f} | {itl:.2f} | {b:,.0f} | {p:.0f} | {relay} | {r0:.0f} / {rp:.0f} |")


if __name__ == "__main__":
    main()
