#!/usr/bin/env python3
"""Cancellation latency: from a client disconnect to the engine dropping the sequence.

One frontend and two mocker workers (speedup 1: a decode step lasts about 6 ms, as in Dynamo's
timing model), both at DYN_LOG=debug so that each cancellation leaves timestamped lines (CLOCK_MONOTONIC
microseconds, the clock of Python's time.monotonic):
  frontend  "request R: KILL written to worker W stream S, X us after the cancel (t=T us; ...)"
  worker    "request R: engine dropped the sequence X us after the KILL arrived (t=T us)"
  worker    "request R killed (kill from the frontend) after N new tokens"
and the client records when it closed its socket and how many tokens it had read. Per cancellation:
  detect     client close → the frontend's abort (the HTTP server saw EOF/reset)
  fe         abort → KILL frame written to the worker's socket
  wire       KILL written → read and handled by the worker
  worker     KILL frame arrival → the engine dropped the sequence (KV blocks freed)
  total      client close → engine drop, also in engine steps (total / the step time the clients saw)
  extra      tokens the engine generated for the stream that the client never read
Phases: streaming clients one at a time; 200 streaming clients at once; 100 non-streaming clients at
once that close while waiting. Clients drop after a random number of token events (1 event = 1
decode step here) or, non-streaming, after a random delay. All clients of a phase are raw sockets
driven by one Python thread, so a close time is read right before the close(2) it dates (with
client threads, the interpreter lock could delay the close by milliseconds after the reading).

With --engine llama the two workers run llama.cpp (the bundled stories260K, their defaults: 16
sequences at once, the others wait) instead of the mocker. Its kill only posts a command to the
engine thread, so the worker's "engine dropped" line dates the hand-off; the engine thread logs
  worker    "request R: llama engine freed the sequence's KV cells (t=T us)"
when the cells are free again, and one more row shows KILL arrival → KV freed.

usage: BATON_BIN=build/baton python3 bench/cancel_latency.py [--engine mocker|llama] [--sequential 100]
       [--concurrent 200] [--unary 100]
"""

import argparse
import json
import os
import random
import re
import selectors
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perf import pct  # noqa: E402

FE_RX = re.compile(r"request (\S+): KILL written to worker \S+ stream \d+, (\d+) us after the cancel "
                   r"\(cancel t=(\d+) us, write t=(\d+) us")
WK_RX = re.compile(r"request (\S+): engine dropped the sequence (\d+) us after the KILL arrived \(t=(\d+) us\)")
KV_RX = re.compile(r"request (\S+): llama engine freed the sequence's KV cells \(t=(\d+) us\)")
TOK_RX = re.compile(r"request (\S+) killed \(kill from the frontend\) after (\d+) new tokens")


def now_us():
    return time.monotonic_ns() / 1000.0


def body(i, stream, max_tokens=2000):
    return bl.chat_body(f"bench cancel {i % 13}", max_tokens=max_tokens, stream=stream, return_token_ids=True)


IDS_RX = re.compile(rb'"token_ids":\[([0-9,]*)\]')


def request_bytes(b, rid):
    data = json.dumps(b).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"X-Request-Id: {rid}\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def run_streams(fe, plan):
    """Streaming clients on raw sockets, all driven by this one thread (selectors), so that a
    client's close time is taken right before its close(2) with no other Python thread in
    between. plan: [(request id, k)]; client i closes after its k-th token event."""
    sel = selectors.DefaultSelector()
    st = {}
    for rid, k in plan:
        sk = socket.create_connection(("127.0.0.1", fe.port), timeout=30)
        sk.sendall(request_bytes(body(0, True), rid))
        sk.setblocking(False)
        st[sk] = {"rid": rid, "k": k, "buf": b"", "pos": 0, "counts": [], "times": []}
        sel.register(sk, selectors.EVENT_READ)
    out = []
    end = time.monotonic() + 120
    while st and time.monotonic() < end:
        for key, _ in sel.select(1.0):
            sk = key.fileobj
            c = st[sk]
            chunk = sk.recv(1 << 20)
            if not chunk:
                raise AssertionError(f"{c['rid']}: stream ended early")
            t = time.monotonic()
            c["buf"] += chunk
            for m in IDS_RX.finditer(c["buf"], c["pos"]):  # no JSON parsing: the client must keep up
                c["pos"] = m.end()
                n = m.group(1).count(b",") + 1 if m.group(1) else 0
                if n:
                    c["counts"].append(n)
                    c["times"].append(t)
                if len(c["counts"]) >= c["k"]:
                    break
            if len(c["counts"]) >= c["k"]:
                t_close = now_us()
                sel.unregister(sk)
                sk.close()
                del st[sk]
                cnt, tms = c["counts"], c["times"]
                # the decode step as this client saw it: first to last token event, over the
                # tokens after the first
                itl = (tms[-1] - tms[0]) / (sum(cnt) - cnt[0]) if len(cnt) >= 3 else None
                out.append({"rid": c["rid"], "t_close": t_close, "tokens": sum(cnt), "itl": itl})
    assert not st, f"{len(st)} streams did not reach their event count"
    return out


def run_unary(fe, plan):
    """Non-streaming clients: each sends its request, then closes its socket at its own time
    (plan: [(request id, delay s)]), all from this thread."""
    socks = []
    t0 = time.monotonic()
    for rid, delay in plan:
        sk = socket.create_connection(("127.0.0.1", fe.port), timeout=10)
        sk.sendall(request_bytes(body(1, False), rid))
        socks.append((t0 + delay, rid, sk))
    out = []
    for when, rid, sk in sorted(socks, key=lambda x: x[0]):
        time.sleep(max(0.0, when - time.monotonic()))
        t = now_us()
        sk.close()
        out.append({"rid": rid, "t_close": t, "tokens": None, "itl": None})
    return out


def analyse(name, clients, fe_log, wk_logs, step_us):
    fe = {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4))) for m in FE_RX.finditer(fe_log)}
    wk, toks, kv = {}, {}, {}
    for text in wk_logs:
        wk.update({m.group(1): (int(m.group(2)), int(m.group(3))) for m in WK_RX.finditer(text)})
        kv.update({m.group(1): int(m.group(2)) for m in KV_RX.finditer(text)})
        toks.update({m.group(1): int(m.group(2)) for m in TOK_RX.finditer(text)})
    rows = {"detect": [], "fe": [], "wire": [], "worker": [], "total": [], "extra": [], "kv": [], "kv_total": []}
    missing = 0
    for c in clients:
        r = c["rid"]
        if r not in fe or r not in wk:
            missing += 1
            continue
        fe_us, t_cancel, t_write = fe[r]
        wk_us, t_drop = wk[r]
        rows["detect"].append(t_cancel - c["t_close"])
        rows["fe"].append(fe_us)
        rows["wire"].append(t_drop - wk_us - t_write)
        rows["worker"].append(wk_us)
        rows["total"].append(t_drop - c["t_close"])
        if r in kv:  # the llama engine's thread freed the cells (t_drop - wk_us: the KILL's arrival)
            rows["kv"].append(kv[r] - (t_drop - wk_us))
            rows["kv_total"].append(kv[r] - c["t_close"])
        if r in toks and c["tokens"] is not None:
            rows["extra"].append(toks[r] - c["tokens"])
    n = len(rows["total"])
    print(f"\n{name}: {n} cancellations measured ({missing} without both log lines); decode step "
          f"{step_us / 1000:.2f} ms")
    print("| stage | p50 | p99 | max |")
    print("|---|---|---|---|")
    for key, label in (("detect", "client close → frontend abort"), ("fe", "abort → KILL written"),
                       ("wire", "KILL write → worker reads it"), ("worker", "KILL arrival → engine drop"),
                       ("total", "client close → engine drop"), ("kv", "KILL arrival → KV freed (engine thread)"),
                       ("kv_total", "client close → KV freed")):
        xs = rows[key]
        if not xs and key.startswith("kv"):
            continue
        print(f"| {label} | {pct(xs, 50):.0f} µs | {pct(xs, 99):.0f} µs | {max(xs) if xs else float('nan'):.0f} µs |")
    steps = [t / step_us for t in rows["total"]]
    print(f"| client close → engine drop, in decode steps | {pct(steps, 50):.3f} | {pct(steps, 99):.3f} | "
          f"{max(steps) if steps else float('nan'):.3f} |")
    if rows["extra"]:
        print(f"| tokens generated after the client's last read | {pct(rows['extra'], 50)} | {pct(rows['extra'], 99)} | "
              f"{max(rows['extra'])} |")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequential", type=int, default=100)
    ap.add_argument("--concurrent", type=int, default=200)
    ap.add_argument("--unary", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--engine", choices=("mocker", "llama"), default="mocker")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    bl.deadline(900, "cancel latency bench")
    env = {"DYN_LOG": "debug"}
    with bl.Cluster() as c:
        fe = c.start_frontend(env=env)
        flags = {"speedup_ratio": 1} if a.engine == "mocker" else {"engine": "llama"}
        workers = [c.start_worker(env=env, system_port=True, wait=True, **flags) for _ in range(2)]
        c.wait_workers(fe, 2)
        phases = []
        seq = []
        for i in range(a.sequential):
            seq += run_streams(fe, [(f"seq-{i}", rng.randint(5, 40))])
        phases.append(("streaming, one at a time", seq))
        conc = run_streams(fe, [(f"conc-{i}", rng.randint(5, 40)) for i in range(a.concurrent)])
        phases.append((f"streaming, {a.concurrent} at once", conc))
        una = run_unary(fe, [(f"unary-{i}", rng.uniform(0.3, 1.0)) for i in range(a.unary)])
        phases.append((f"non-streaming, {a.unary} at once", una))
        bl.wait_for(lambda: all(bl.metrics(w.system_url)["baton_worker_active_sequences"] == 0 for w in workers), 10,
                    what="workers idle")
        time.sleep(0.5)  # let the logs reach the files
        fe_log = fe.proc.log_text()
        wk_logs = [w.proc.log_text() for w in workers]
        # the step time of a lone sequence on a quiet system (the sequential phase); with more
        # sequences a step only gets longer (KV use, prefills), so step counts below are upper bounds
        step_us = statistics.median(x["itl"] for x in seq if x["itl"]) * 1e6
        for name, cl in phases:
            analyse(name, cl, fe_log, wk_logs, step_us)
        for w in workers:
            m = bl.metrics(w.system_url)
            print(f"\nworker {w.rpc_port}: baton_worker_cancel_latency_seconds count "
                  f"{m['baton_worker_cancel_latency_seconds_count']:.0f}, mean "
                  f"{m['baton_worker_cancel_latency_seconds_sum'] / max(1, m['baton_worker_cancel_latency_seconds_count']) * 1e6:.1f} µs")


main()
