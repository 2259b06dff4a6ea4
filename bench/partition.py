#!/usr/bin/env python3
"""Partition figures: how long the streams of a worker that is cut off from the network stall,
from the cut to their next token, and how long the worker takes to leave and rejoin /health.

One frontend and two mocker workers; worker A runs in its own network namespace behind a veth
pair (tests/lib/batonnet.py), worker B on the host. Each round runs --streams concurrent streams
on both workers, cuts A's link once every stream has delivered --carried tokens, and measures for
every stream that was on A (the frontend logs which ones migrated and how many tokens they carried):

    detection    cut → the frontend saw the attempt fail (its heartbeats declared A dead), from the
                 frontend's debug log (CLOCK_MONOTONIC, comparable with time.monotonic here)
    total        cut → the first token the new worker produced reached the HTTP client
    left /health cut → A no longer listed in the frontend's /health
    rejoined     link restored → A listed in /health again

Then it restores the link, waits for A to rejoin, and starts the next round. Every stream is also
checked byte for byte against a fault-free reference; failures are counted and printed.

usage: BATON_BIN=build/baton python3 bench/partition.py [--rounds 5] [--streams 8]
           [--carried 20] [--stall-timeout 2]          (root: it creates a network namespace)
"""

import argparse
import os
import re
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402
from batonnet import Netns, resume_gap, start_netns_worker  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perf import pct  # noqa: E402

SEEN_RX = re.compile(r"request (\S+): failure seen at t=(\d+) us")


def health_ids(fe):
    st, _, b = bl.get_json(fe.url + "/health", timeout=5)
    return {i["instance_id"] for i in b["instances"]} if st == 200 else set()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--carried", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--stall-timeout", type=float, default=2.0)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/partition.py needs root (network namespaces)")
    bl.deadline(120 + a.rounds * 60, "bench/partition")
    ns = Netns()
    det, tot, left, back, fails = [], [], [], [], 0
    try:
        ns.create()
        with bl.Cluster() as c:
            fe = c.start_frontend(stream_stall_timeout=a.stall_timeout, env={"DYN_LOG": "debug"})
            start_netns_worker(c, ns, speedup_ratio=1)
            c.start_worker(speedup_ratio=1)
            insts = c.wait_workers(fe, 2)
            a_id = next(i["instance_id"] for i in insts if i["transport"]["tcp"].startswith(ns.ns_ip + ":"))
            b_id = next(i["instance_id"] for i in insts if i["instance_id"] != a_id)

            def body(k):
                return bl.chat_body(f"partition bench {k}", max_tokens=a.max_tokens, return_token_ids=True)
            refs = [b["choices"][0]["token_ids"] for _, _, b in bl.run_concurrently(
                lambda k: bl.post_json(fe.url + "/v1/chat/completions", body(k), timeout=120), list(range(a.streams)))]
            for r in range(a.rounds):
                results, counts = [None] * a.streams, [0] * a.streams

                def run(k):
                    def on_event(st, obj):
                        counts[k] = len(st.t_tokens)
                    results[k] = bl.stream_chat(fe.url, body(k), timeout=120, on_event=on_event,
                                                headers={"X-Request-Id": f"r{r}-{k}"})
                threads = [threading.Thread(target=run, args=(k,)) for k in range(a.streams)]
                for t in threads:
                    t.start()
                bl.wait_for(lambda: all(n >= a.carried for n in counts), 60, what="streams under way")
                t_cut = time.monotonic()
                ns.cut()
                bl.wait_for(lambda: a_id not in health_ids(fe), 30, interval=0.01, what="A to leave /health")
                left.append(time.monotonic() - t_cut)
                for t in threads:
                    t.join()
                log = fe.proc.log_text()
                mig = {rid: int(n) for rid, n in re.findall(
                    rf"request (r{r}-\d+) migrated from worker {a_id:x} to worker {b_id:x} with (\d+) tokens", log)}
                seen = {rid: int(us) / 1e6 for rid, us in SEEN_RX.findall(log) if rid in mig}
                for k, s in enumerate(results):
                    if not s.ok or s.token_ids != refs[k]:
                        fails += 1
                        print(f"round {r}: stream {k} failed or differs: {s.summary()}")
                    rid = f"r{r}-{k}"
                    if rid in mig:
                        g = resume_gap(s, mig[rid], t_cut)
                        if g is not None:
                            tot.append(g)
                        if rid in seen:
                            det.append(seen[rid] - t_cut)
                time.sleep(max(0.0, 3 - (time.monotonic() - t_cut)))
                ns.restore()
                t_up = time.monotonic()
                bl.wait_for(lambda: a_id in health_ids(fe), 30, interval=0.01, what="A to rejoin /health")
                back.append(time.monotonic() - t_up)
                print(f"round {r}: {len(mig)} streams migrated; left /health {left[-1]:.2f} s, "
                      f"rejoined {back[-1]:.2f} s")
                time.sleep(1)
    finally:
        ns.destroy()
    print(f"\nstall timeout {a.stall_timeout} s, {a.rounds} rounds, {a.streams} streams per round "
          f"({len(tot)} migrated streams measured), failed or differing streams: {fails}")
    print("| measure | n | p50 | max |\n|---|---|---|---|")
    for name, xs in (("detection (cut → failure seen)", det), ("total (cut → next token at the client)", tot),
                     ("A left /health", left), ("A back in /health after the link returned", back)):
        if xs:
            print(f"| {name} | {len(xs)} | {statistics.median(xs):.2f} s | {max(xs):.2f} s |")


if __name__ == "__main__":
    main()
