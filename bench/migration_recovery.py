#!/usr/bin/env python3
"""Migration recovery figures: how long the streams of a failed worker stall, from the worker's
death to the next token they deliver, and where that time goes.

Each round starts a frontend and three mocker workers, runs concurrent streams until each has
generated --carried tokens, then fails one worker: kill -9 (the process dies, the frontend sees
EOF on its request-plane connection) or SIGSTOP (the process hangs with its socket open, the
frontend declares it dead by missed heartbeats after --stream-stall-timeout). For every stream
that was on the victim, three instants from the frontend's debug log, all CLOCK_MONOTONIC (the
clock of Python's time.monotonic, so comparable with the instant this script sent the signal):

    failure seen     the frontend saw the attempt fail (EOF, or the peer declared dead)
    re-dispatched    the continuation (prompt + carried tokens) was written to another worker
    next token       the first token of the continuation reached the frontend

detection = seen - signal, rerouting = re-dispatched - seen, re-prefill = next token -
re-dispatched (the new worker's prefill of prompt + carried tokens, plus waiting for its current
step), total = next token - signal. The client-side stall (the longest gap between two tokens
around the failure, as the HTTP client saw it) and the streams' normal inter-token
latency are printed next to them as the anchor.

usage: BATON_BIN=build/baton python3 bench/migration_recovery.py [--rounds 5] [--streams 30]
           [--carried 200] [--speedup 1] [--stall-timeout 2]
"""

import argparse
import os
import signal
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perf import MIG_RX, NEXT_RX, migration_instants, pct  # noqa: E402



def fmt(xs):
    return f"{pct(xs, 50) * 1e3:8.1f} {pct(xs, 99) * 1e3:8.1f} {max(xs) * 1e3:8.1f}" if xs else "   (none)"


def one_round(a, mode, rnd):
    """Returns a list of per-stream dicts for the streams of the failed worker."""
    out = []
    with bl.Cluster() as c:
        fe = c.start_frontend(env={"DYN_LOG": "debug"}, stream_stall_timeout=a.stall_timeout)
        ws = [c.start_worker(speedup_ratio=a.speedup) for _ in range(3)]
        inst = c.wait_workers(fe, 3)
        ids = {int(i["transport"]["tcp"].rsplit(":", 1)[1]): format(i["instance_id"], "x") for i in inst}
        stop = threading.Event()
        times = {}  # rid -> list of (monotonic s, tokens so far)

        def run(i):
            rid = f"r{rnd}-{i}"
            times[rid] = []

            def on_event(st, obj):
                times[rid].append((time.monotonic(), len(st.token_ids)))
                return stop.is_set()

            body = bl.chat_body(f"recovery bench {rnd} {i}", max_tokens=100000, return_token_ids=True)
            return bl.stream_chat(fe.url, body, timeout=120, headers={"X-Request-Id": rid}, on_event=on_event)

        pool = threading.Thread(target=lambda: bl.run_concurrently(run, list(range(a.streams)),
                                                                   max_workers=a.streams), daemon=True)
        pool.start()
        bl.wait_for(lambda: len(times) == a.streams and all(t and t[-1][1] >= a.carried for t in times.values()),
                    120, 0.01, f"every stream to reach {a.carried} tokens")
        victim = ws[0]
        vid = ids[victim.rpc_port]
        t_sig = time.monotonic()
        victim.proc.kill(signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
        # until every stream of the victim has its first token after the migration
        def settled():
            log = fe.proc.log_text()
            migs = {m.group(1) for m in MIG_RX.finditer(log) if m.group(2) == vid}
            nexts = {m.group(1) for m in NEXT_RX.finditer(log)}
            return migs and migs <= nexts and time.monotonic() - t_sig > a.stall_timeout + 1
        bl.wait_for(settled, a.stall_timeout + 30, 0.05, "the victim's streams to resume")
        time.sleep(0.3)
        log = fe.proc.log_text()
        stop.set()
        pool.join(30)
        if mode == "stop":
            victim.proc.kill(signal.SIGCONT)
        seen, nxt = migration_instants(log)
        migs = {m.group(1): int(m.group(4)) for m in MIG_RX.finditer(log) if m.group(2) == vid}
        for rid, carried in migs.items():
            t_seen, t_disp = seen[rid]
            t_next = nxt[rid]
            ev = times[rid]
            ts = [t for t, _ in ev]
            before = [t for t in ts if t < t_sig]
            itl = [b - a_ for a_, b in zip(before, before[1:])]
            # tokens the victim sent just before the signal may still arrive after it: the stall
            # is the longest gap between consecutive events that ends after the signal
            gaps = [b - a_ for a_, b in zip(ts, ts[1:]) if b > t_sig]
            out.append({"detect": t_seen - t_sig, "reroute": t_disp - t_seen, "prefill": t_next - t_disp,
                        "total": t_next - t_sig, "client_gap": max(gaps) if gaps else None,
                        "carried": carried, "itl": statistics.median(itl) if itl else None})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", type=int, default=30)
    ap.add_argument("--carried", type=int, default=200, help="tokens each stream has before the fault")
    ap.add_argument("--speedup", type=float, default=1.0)
    ap.add_argument("--stall-timeout", type=float, default=2.0)
    ap.add_argument("--modes", default="kill,stop")
    a = ap.parse_args()
    bl.deadline(60 + a.rounds * 2 * (a.stall_timeout + 40), "migration recovery bench")
    print(f"{a.rounds} rounds x {a.streams} streams over 3 workers, speedup {a.speedup}, "
          f"~{a.carried} tokens carried, --stream-stall-timeout {a.stall_timeout}")
    for mode in a.modes.split(","):
        rows = []
        for rnd in range(a.rounds):
            rows += one_round(a, mode, rnd)
        what = "kill -9" if mode == "kill" else "SIGSTOP"
        carried = [r["carried"] for r in rows]
        print(f"\n{what}: {len(rows)} migrated streams, {min(carried)}-{max(carried)} tokens carried")
        print(f"  {'ms':24} {'p50':>8} {'p99':>8} {'max':>8}")
        for k, name in (("detect", "detection"), ("reroute", "rerouting"), ("prefill", "re-prefill + first step"),
                        ("total", "death -> next token"), ("client_gap", "client-side stall"),
                        ("itl", "normal ITL (anchor)")):
            xs = [r[k] for r in rows if r[k] is not None]
            print(f"  {name:24} {fmt(xs)}")


if __name__ == "__main__":
    main()
