#!/usr/bin/env python3
"""Migration storm: one worker holding --streams in-flight streams is killed (kill -9); every stream
must continue byte for byte on the remaining workers. Reports the time from the kill to the last
resumed token, how the continuations spread over the targets, and the targets' KV use against the
frontend's --active-decode-blocks-threshold (docs/benchmarks.md, Migration storm).

One frontend (debug log: its per-request migration lines carry CLOCK_MONOTONIC instants, the clock
of Python's time.monotonic) and one mocker worker, the victim. baton-sse-load (bench/sse_load.c)
opens --streams streams, one request each; once all stream at the same time, --targets more
workers join (the first --small of them with a KV cache of --small-blocks blocks, to show the
threshold at work), and the victim is killed once every target has reported its load. For every
migrated request, from the frontend's log:

    failure seen     the frontend saw the attempt fail (EOF on the victim's connection)
    re-dispatched    the continuation was written to its target
    next token       the first token of the continuation reached the frontend

The run's digest (every request's text) must equal a fault-free reference run of the same requests
afterwards, on the same cluster, and every request must end properly. Numbers are printed, not
asserted, except exactness. tests/fault/test_migration_storm.py is the small, asserted version.

usage: BATON_BIN=build/baton python3 bench/storm.py [--streams 1000] [--targets 4] [--tokens 300]
           [--speedup 0.5] [--threshold 0.5] [--small 1] [--small-blocks 256] [--rounds 1]
"""

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perf import MIG_RX, migration_instants, pct  # noqa: E402

BUSY_RX = re.compile(r"every worker is busy; its continuation goes to busy worker ([0-9a-f]+)")


def load_cmd(url, streams, tokens, ready=None):
    args = [os.path.join(os.path.dirname(bl.baton_bin()), "baton-sse-load"), "--url", url, "--streams", str(streams),
            "--requests", str(streams), "--max-tokens", str(tokens), "--rate", "2000", "--timeout", "300"]
    return args + (["--ready-file", ready] if ready else [])


def finish(p, what):
    out, err = p.communicate(timeout=400)
    try:
        res = json.loads(out)
    except ValueError:
        raise SystemExit(f"{what}: baton-sse-load printed no result (exit {p.returncode}): {out!r} {err!r}")
    if p.returncode != 0 or res["failed"] or res["ok"] != res["requests"]:
        raise SystemExit(f"{what}: {res['failed']} of {res['requests']} requests failed: {res['errors']}")
    return res


def worker_gauges(fe):
    m = bl.metrics(fe.url)
    out = collections.defaultdict(dict)
    for k, v in m.items():
        if k.startswith("baton_frontend_worker_") and "{" in k:
            name = k[len("baton_frontend_worker_"):k.index("{")]
            out[bl.parse_labels(k[k.index("{"):])["worker_id"]][name] = v
    return out


def one_round(a, rnd):
    children = []
    try:
        with bl.Cluster() as c:
            fe = c.start_frontend(env={"DYN_LOG": "debug"}, max_connections=30000, max_concurrent_requests=100000,
                                  http_idle_timeout_ms=600000, active_decode_blocks_threshold=a.threshold)
            seqs = a.streams + 100
            victim = c.start_worker(speedup_ratio=a.speedup, max_num_seqs=seqs)
            c.wait_workers(fe, 1)
            ready = os.path.join(c.dir, f"ready-{rnd}")
            p = subprocess.Popen(load_cmd(fe.url, a.streams, a.tokens, ready), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            children.append(p)
            bl.wait_for(lambda: os.path.exists(ready) or p.poll() is not None, 120, 0.05,
                        "every stream to be under way")
            if p.poll() is not None:
                finish(p, "storm load")
            targets = []
            for i in range(a.targets):
                extra = {"num_gpu_blocks_override": a.small_blocks} if i < a.small else {}
                targets.append(c.start_worker(speedup_ratio=a.speedup, max_num_seqs=seqs, **extra))
            inst = c.wait_workers(fe, 1 + a.targets)
            ids = {int(x["transport"]["tcp"].rsplit(":", 1)[1]): format(x["instance_id"], "x") for x in inst}
            vid = ids[victim.rpc_port]
            tids = [ids[w.rpc_port] for w in targets]
            bl.wait_for(lambda: all(worker_gauges(fe)[t].get("total_blocks", 0) > 0 for t in tids), 10, 0.05,
                        "the targets' first load reports")
            on_victim = worker_gauges(fe)[vid].get("inflight", 0)
            peak = collections.defaultdict(float)  # target -> highest active_decode_blocks / total seen
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    try:
                        g = worker_gauges(fe)
                    except OSError:
                        g = {}
                    for t in tids:
                        if g.get(t, {}).get("total_blocks"):
                            peak[t] = max(peak[t], g[t]["active_decode_blocks"] / g[t]["total_blocks"])
                    stop.wait(0.1)

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            t_kill = time.monotonic()
            victim.proc.kill(signal.SIGKILL)
            victim.proc.wait(5)
            res = finish(p, "storm load")
            stop.set()
            th.join()
            log = fe.proc.log_text()
            # the reference: the same requests, fault-free, on the same targets
            ref = finish(subprocess.Popen(load_cmd(fe.url, a.streams, a.tokens), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True), "reference load")
            if ref["digest"] != res["digest"]:
                raise SystemExit(f"round {rnd}: streamed text differs from the fault-free reference")
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
                p.wait()
    seen, nxt = migration_instants(log)
    migs = {m.group(1): m.group(3) for m in MIG_RX.finditer(log) if m.group(2) == vid}
    missing = [r for r in migs if r not in nxt or r not in seen]
    if missing:
        raise SystemExit(f"round {rnd}: {len(missing)} migrated requests without their log instants")
    total = [nxt[r] - t_kill for r in migs]
    per = collections.Counter(migs.values())
    busy_to = collections.Counter(m.group(1) for m in BUSY_RX.finditer(log))
    return {"on_victim": on_victim, "migrated": len(migs), "res": res, "per": per, "tids": tids,
            "small": set(tids[:a.small]), "busy_to": busy_to, "peak": dict(peak),
            "detect": [seen[r][0] - t_kill for r in migs], "dispatch": [seen[r][1] - t_kill for r in migs],
            "total": total}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--speedup", type=float, default=0.5)
    ap.add_argument("--threshold", type=float, default=0.5, help="the frontend's --active-decode-blocks-threshold")
    ap.add_argument("--small", type=int, default=1, help="targets with a small KV cache")
    ap.add_argument("--small-blocks", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    bl.deadline(900 * a.rounds, "storm")
    print(f"streams={a.streams} targets={a.targets} ({a.small} with {a.small_blocks} KV blocks, the rest 16384) "
          f"max_tokens={a.tokens} speedup={a.speedup} threshold={a.threshold}")
    for rnd in range(1, a.rounds + 1):
        r = one_round(a, rnd)
        ms = lambda xs, p: pct(xs, p) * 1e3  # noqa: E731
        print(f"round {rnd}: victim held {r['on_victim']:.0f} streams, {r['migrated']} migrated; all "
              f"{r['res']['ok']} requests complete and identical to the fault-free reference")
        print(f"  kill -> failure seen p50 {ms(r['detect'], 50):.1f} ms, max {max(r['detect']) * 1e3:.1f} ms; "
              f"-> re-dispatched max {max(r['dispatch']) * 1e3:.1f} ms; -> next token p50 {ms(r['total'], 50):.1f} ms "
              f"p99 {ms(r['total'], 99):.1f} ms, last {max(r['total']) * 1e3:.1f} ms")
        for t in r["tids"]:
            kind = "small" if t in r["small"] else "large"
            print(f"  target {t} ({kind}): {r['per'][t]} continuations ({r['per'][t] / max(r['migrated'], 1):.0%}), "
                  f"peak KV use {r['peak'].get(t, 0):.2f} of its blocks, "
                  f"{r['busy_to'][t]} sent to it while every worker was busy")
        print(f"  client: TTFT p50 {r['res']['ttft_us']['p50'] / 1000:.1f} ms, gap p99 "
              f"{r['res']['gap_us']['p99'] / 1000:.1f} ms, max gap {r['res']['gap_us'].get('max', 0) / 1000:.1f} ms",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
