#!/usr/bin/env python3
"""Frontend failover: how long a client whose frontend died waits for its next token, and what the
JetStream journal costs the frontend per token (docs/benchmarks.md, "Frontend failover"). Numbers
are printed, never asserted; every resumed answer is checked against an uncut run.

usage (from the repository root; BATON_BIN defaults to build/baton):
  python3 bench/failover.py gap [--rounds 6] [--streams 8] [--tokens 200] [--speedup 1]
      Two frontends (event plane NATS, journal in JetStream) behind HAProxy, two mocker workers.
      Each round starts N streams through HAProxy, waits until all run, kills one frontend with
      SIGKILL (rounds "worker dead": and a worker with it); the clients of the dead frontend
      re-POST through HAProxy with Last-Event-ID at once. Measured per resumed stream: from the
      SIGKILL to the first event the client had not received, split by how the survivor went on:
      re-attached to the stream's orphan on its worker, or migrated (its worker was dead).
  python3 bench/failover.py cost [--streams 400] [--tokens 200] [--rounds 3] [--speedup 1]
      CPU of a frontend per million streamed tokens with the JetStream journal (event plane NATS)
      and with the in-process journal (event plane direct): two frontends on the same workers,
      driven in turn by baton-sse-load with the same load; the nats-server's CPU is reported too.
"""

import argparse
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402
import natslib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perf import add_cost_parser, add_subcommand, cost_rounds, pct  # noqa: E402


def haproxy(d, backends):
    port = bl.free_port()
    cfg = os.path.join(d, "haproxy.cfg")
    servers = "\n".join(f"    server fe{i} 127.0.0.1:{p} check inter 200 fall 1 rise 2" for i, p in enumerate(backends))
    with open(cfg, "w") as f:
        f.write(f"global\n    maxconn 4096\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 60s\n"
                f"    timeout server 60s\n    retries 3\n    option redispatch\nfrontend fe\n    bind 127.0.0.1:{port}\n"
                f"    default_backend frontends\nbackend frontends\n    balance roundrobin\n    option httpchk GET /live\n"
                f"{servers}\n")
    bl.Proc(["/usr/sbin/haproxy", "-db", "-f", cfg], log=os.path.join(d, "haproxy.log"), name="haproxy")
    url = f"http://127.0.0.1:{port}"
    bl.wait_for(lambda: _up(url), 10, what="haproxy")
    return url


def _up(url):
    try:
        return bl.request("GET", url + "/live", timeout=2)[0] == 200
    except OSError:
        return False


def body(i, tokens):
    return bl.chat_body(f"failover bench {i}", max_tokens=tokens, return_token_ids=True)


def client(url, i, tokens, out):
    pieces, last = [], None
    for _ in range(6):
        s = bl.stream_chat(url, body(i, tokens), headers={"Last-Event-ID": last} if last else None, timeout=60)
        pieces.append(s)
        # a gateway error (the balancer's request reached the dying frontend) is retried like a cut
        if s.done or s.status not in (200, 502, 503, 504, None):
            break
        last = s.last_event_id or last
    out[i] = pieces


def cmd_gap(a):
    bl.deadline(3600, "failover gap")
    gaps = {"re-attached": [], "migrated": []}
    with bl.Cluster() as c:
        nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}').start()
        plane = dict(event_plane="nats", nats_server=nats.url)
        wflags = dict(speedup_ratio=a.speedup, orphan_grace=30, **plane)
        workers = [c.start_worker(system_port=True, wait=True, **wflags) for _ in range(2)]
        ports = [bl.free_port(), bl.free_port()]
        fes = [c.start_frontend(http_port=p, **plane) for p in ports]
        for fe in fes:
            c.wait_workers(fe, 2)
        lb = haproxy(c.dir, ports)
        refs = {i: bl.stream_chat(fes[1].url, body(i, a.tokens), timeout=60).assert_ok() for i in range(a.streams)}
        for rnd in range(a.rounds):
            kill_worker = rnd % 2 == 1
            out = {}
            ts = [threading.Thread(target=client, args=(lb, i, a.tokens, out)) for i in range(a.streams)]
            for t in ts:
                t.start()
            bl.wait_for(lambda: sum(bl.metric_sum(bl.metrics(w.system_url), "dynamo_component_inflight_requests")
                                    for w in workers) >= a.streams, 20, what="streams running")
            time.sleep(0.3)
            victims = [fes[0]] + ([workers[0]] if kill_worker else [])
            for v in victims:
                v.proc.kill(signal.SIGKILL)
            t_kill = time.monotonic()
            for t in ts:
                t.join(120)
            survivor_log = fes[1].proc.log_text()
            for i, pieces in out.items():
                got = "".join(p.text for p in pieces)
                if got != refs[i].text or not pieces[-1].done:
                    ids = [t for p in pieces for t in p.token_ids]
                    raise SystemExit(f"round {rnd + 1} stream {i}: inexact answer after failover: "
                                     f"{len(ids)} ids vs {len(refs[i].token_ids)}; pieces "
                                     f"{[(len(p.token_ids), p.last_event_id, p.event_ids[-2:], p.exception, p.raw[-120:]) for p in pieces]}")
                if len(pieces) < 2 or not pieces[1].t_tokens:
                    continue
                rid = pieces[1].headers.get("x-request-id", "?")
                back = any(rid in ln and "sent back to worker" in ln for ln in survivor_log.splitlines())
                how = "re-attached" if back else "migrated"
                gaps[how].append(pieces[1].t_tokens[0] - t_kill)
            print(f"round {rnd + 1} ({'frontend + worker' if kill_worker else 'frontend'} killed): "
                  f"{sum(len(p) > 1 for p in out.values())} of {a.streams} streams resumed, all exact", flush=True)
            # back to two frontends (and two workers)
            c.frontends.remove(fes[0])
            fes[0] = c.start_frontend(http_port=ports[0], **plane)
            if kill_worker:
                workers[0].proc.wait(10)
                c.workers.remove(workers[0])
                workers[0] = c.start_worker(system_port=True, wait=True, **wflags)
            for fe in fes:
                c.wait_workers(fe, 2)
            bl.wait_for(lambda: _up(lb), 10, what="haproxy")
            time.sleep(1.0)
    print()
    print(f"streams={a.streams} per round, rounds={a.rounds}, max_tokens={a.tokens}, speedup={a.speedup}; "
          f"time from SIGKILL of the frontend to the resumed client's next token, through HAProxy:")
    for how, xs in gaps.items():
        if xs:
            print(f"  {how:12s}: n={len(xs)} p50={pct(xs, 50) * 1000:.0f} ms p99={pct(xs, 99) * 1000:.0f} ms "
                  f"max={max(xs) * 1000:.0f} ms")


def cmd_cost(a):
    bl.deadline(3600, "failover cost")
    with bl.Cluster() as c:
        nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}').start()
        flags = dict(max_connections=30000, max_concurrent_requests=100000, http_idle_timeout_ms=600000)
        js = c.start_frontend(event_plane="nats", nats_server=nats.url, **flags)
        js.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
        mem = c.start_frontend(**flags)
        for _ in range(a.workers):
            c.start_worker(speedup_ratio=a.speedup, max_num_seqs=20000)
        c.wait_workers(js, a.workers)
        c.wait_workers(mem, a.workers)
        per, rows = cost_rounds(a, {"jetstream": js, "in-process": mem}, {"nats-server": nats.proc.pid})
        nats_cpu = sum(r[2]["nats-server"] for r in rows["jetstream"])
        tok = sum(r[0] for r in rows["jetstream"])
        print(f"JetStream journal cost on the frontend: {per['jetstream'] - per['in-process']:+.2f} CPU-s per 1M tokens "
              f"({(per['jetstream'] / per['in-process'] - 1) * 100:+.1f} %); nats-server: "
              f"{nats_cpu / tok * 1e6:.2f} CPU-s per 1M tokens")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_subcommand(sub, "gap", rounds=6, streams=8, tokens=200, speedup=1.0)
    add_cost_parser(sub)
    a = ap.parse_args()
    {"gap": cmd_gap, "cost": cmd_cost}[a.cmd](a)


if __name__ == "__main__":
    main()
