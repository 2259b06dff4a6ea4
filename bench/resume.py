#!/usr/bin/env python3
"""Resumable streams: what a resume costs the client in time, what the journal costs the frontend
in CPU per token, and what a retained stream costs in memory (docs/benchmarks.md, "Resumable
streams"). Numbers are printed, never asserted; every run also checks exactness.

usage (from the repository root; BATON_BIN defaults to build/baton):
  python3 bench/resume.py latency [--trials 40] [--tokens 200] [--speedup 1]
      Streams are cut by their client after a random number of events; the client reconnects at
      once with Last-Event-ID. Measured: from the moment the resume request is sent to the first
      event it did not have (the resume latency), for
        - finished: the answer had completed (it is replayed from the journal);
        - unfinished: the cut killed the request; the resume replays nothing new and continues it
          by migration (a new attempt re-prefills prompt + journaled tokens).
      For reference, the time to first token of a fresh request of the same prompt.
      Every resumed answer is checked against an uncut run.
  python3 bench/resume.py cost [--streams 400] [--tokens 200] [--rounds 3] [--speedup 1]
      CPU of the frontend per million streamed tokens with the journal (the default) and without
      (--stream-retention 0): two frontends on the same workers, driven in turn by baton-sse-load
      (bench/sse_load.c) with the same load; CPU from /proc/<pid>/task/*/schedstat.
  python3 bench/resume.py memory [--streams 1000] [--tokens 256,1024] [--speedup 100]
      N streams of T tokens each run to completion and stay retained: the journal's own accounting
      (baton_frontend_stream_journal_bytes) per stream, and the frontend's RSS growth per stream.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perf import add_cost_parser, add_subcommand, check, cost_rounds, pct, rss_kib, run_load  # noqa: E402


def ms(x):
    return f"{x * 1000:.1f} ms"


def cmd_latency(a):
    bl.deadline(1800, "resume latency")
    rng = random.Random(7)
    with bl.Cluster() as c:
        fe = c.start_frontend()
        for _ in range(2):
            c.start_worker(speedup_ratio=a.speedup)
        c.wait_workers(fe, 2)
        fin, unfin, fresh = [], [], []
        for t in range(a.trials):
            body = bl.chat_body(f"resume bench {t}", max_tokens=a.tokens, return_token_ids=True)
            ref = bl.stream_chat(fe.url, body).assert_ok("reference")
            fresh.append(ref.t_first - ref.t_start)
            k = rng.randint(2, max(3, len(ref.events) - 5))
            # unfinished: cut mid-stream, resume at once
            cut = bl.stream_chat(fe.url, body, abort_after=k)
            res = bl.stream_chat(fe.url, body, headers={"Last-Event-ID": cut.last_event_id})
            res.assert_ok("resumed")
            if cut.token_ids + res.token_ids != ref.token_ids or cut.text + res.text != ref.text:
                raise SystemExit(f"trial {t}: the resumed answer differs from the uncut run")
            unfin.append(res.t_first - res.t_start)
            # finished: the same position of the (finished) reference stream
            eid = ref.event_ids[k - 1]
            res = bl.stream_chat(fe.url, body, headers={"Last-Event-ID": eid})
            res.assert_ok("replayed")
            pos = int(eid.split(":")[1])
            if res.token_ids != ref.token_ids[pos:]:
                raise SystemExit(f"trial {t}: the replay differs from the original")
            fin.append(res.t_first - res.t_start)
        m = bl.metrics(fe.url)
        print(f"{a.trials} trials, max_tokens {a.tokens}, mocker speedup {a.speedup}, 2 workers; every resumed "
              f"answer exact; resumes counted: "
              + ", ".join(f"{o} {bl.metric_sum(m, 'baton_frontend_stream_resumes_total', outcome=o):.0f}"
                          for o in ("replayed", "continued", "superseded")))
        for name, xs in (("finished (replay from the journal)", fin), ("unfinished (continued by migration)", unfin),
                         ("fresh request, time to first token", fresh)):
            print(f"{name:40s} p50 {ms(pct(xs, 50))}  p99 {ms(pct(xs, 99))}  mean {ms(statistics.mean(xs))}")


def cmd_cost(a):
    bl.deadline(3600, "resume cost")
    with bl.Cluster() as c:
        flags = dict(max_connections=30000, max_concurrent_requests=100000, http_idle_timeout_ms=600000)
        on = c.start_frontend(**flags)
        off = c.start_frontend(stream_retention=0, **flags)
        for _ in range(a.workers):
            c.start_worker(speedup_ratio=a.speedup, max_num_seqs=20000)
        c.wait_workers(on, a.workers)
        c.wait_workers(off, a.workers)
        per, _ = cost_rounds(a, {"journal": on, "no journal": off})
        stats = bl.metrics(on.url)
        print(f"journal cost: {per['journal'] - per['no journal']:+.2f} CPU-s per 1M tokens "
              f"({(per['journal'] / per['no journal'] - 1) * 100:+.1f} %); journal now holds "
              f"{bl.metric_sum(stats, 'baton_frontend_stream_journal_bytes') / 2**20:.1f} MiB in "
              f"{bl.metric_sum(stats, 'baton_frontend_stream_journal_streams'):.0f} streams")


def cmd_memory(a):
    bl.deadline(3600, "resume memory")
    for tokens in [int(x) for x in a.tokens.split(",")]:
        with bl.Cluster() as c:
            fe = c.start_frontend(max_connections=30000, max_concurrent_requests=100000,
                                  stream_retention_bytes=1 << 40)
            c.start_worker(speedup_ratio=a.speedup, max_num_seqs=20000)
            c.wait_workers(fe, 1)
            check(run_load(fe.url, 10, 10), "warm-up")
            time.sleep(0.5)
            m0 = bl.metrics(fe.url)
            rss0 = rss_kib(fe.proc.pid)
            b0 = bl.metric_sum(m0, "baton_frontend_stream_journal_bytes")
            n0 = bl.metric_sum(m0, "baton_frontend_stream_journal_streams")
            res = run_load(fe.url, min(a.streams, 500), tokens, requests=a.streams, rate=100000)
            check(res, f"{tokens} tokens")
            time.sleep(0.5)
            m1 = bl.metrics(fe.url)
            rss1 = rss_kib(fe.proc.pid)
            n = bl.metric_sum(m1, "baton_frontend_stream_journal_streams") - n0
            b = bl.metric_sum(m1, "baton_frontend_stream_journal_bytes") - b0
            avg_tok = res["tokens"] / res["requests"]
            print(f"{a.streams} streams of {avg_tok:.0f} tokens retained ({n:.0f} records): journal accounts "
                  f"{b / n / 1024:.2f} KiB per stream ({b / n / avg_tok:.1f} bytes per token); frontend RSS "
                  f"+{(rss1 - rss0) / n:.2f} KiB per stream", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_subcommand(sub, "latency", trials=40, tokens=200, speedup=1.0)
    add_cost_parser(sub)
    add_subcommand(sub, "memory", streams=1000, tokens="256,1024", speedup=100.0)
    a = ap.parse_args()
    {"latency": cmd_latency, "cost": cmd_cost, "memory": cmd_memory}[a.cmd](a)


if __name__ == "__main__":
    main()
