#!/usr/bin/env python3
"""Frontend performance: proxy-tier CPU per streamed token against nginx and HAProxy, latency the
frontend adds, memory per stream at 10,000 streams, and the throughput ceiling.

Every run starts baton and its anchor side by side and drives them with baton-sse-load
(bench/sse_load.c, built beside baton by CMake), a C client on libuv that holds thousands of SSE
streams cheaply; CPU is read from /proc (the sum of every thread's run time, in ns) over the load
only; memory is VmRSS. Each phase also checks exactness: every request must end properly and the
digest of all streamed text must be the same through every path (direct, nginx, HAProxy, the
worker's own request plane). Numbers are printed, never asserted (docs/benchmarks.md, Performance).

usage (from the repository root; BATON_BIN defaults to build/baton):
  BATON_BIN=build/baton python3 bench/perf.py cost     [--streams 400] [--tokens 200] [--rounds 3]
        [--speedup 1] [--anchors nginx,haproxy] [--compare-bin OTHER_BUILD/baton]
      a. CPU-seconds per million tokens of the baton frontend (client -> frontend -> workers)
         and of nginx / HAProxy relaying the same SSE stream (client -> proxy -> frontend ->
         workers; only the proxy process is counted), same streams, tokens and token rate.
         --compare-bin adds a frontend of another build on the same workers (before/after).
  BATON_BIN=build/baton python3 bench/perf.py latency  [--concurrency 1,100,1000] [--tokens 30]
        [--speedup 0.2] [--anchor nginx] [--pin 0:1] [--no-relay] [--compare-bin OTHER/baton] [--jetstream]
        [--interleave 2] [--relay-frontend-bytes]
      b. TTFT and per-token delay p50/p99 through the frontend and straight at the worker's
         request plane (the same engine, one worker), and the difference. The per-token delay is
         measured against a probe stream on the request plane that runs through every phase.
         The anchor row is nginx proxying to the frontend: what one plain proxy hop adds. The
         "minimal relay" row is bench/relay.c (baton-relay): only the work a frontend cannot avoid
         (read the worker's multiplexed stream, write each chunk to its client socket), the floor.
         --pin puts baton on one CPU and the load generators on the other. --compare-bin adds
         a frontend of another build on the same worker, as the row "frontend, compared build".
         --jetstream adds a frontend whose stream journal is shared through NATS JetStream (a
         nats-server -js started here), as the row "frontend, journal in JetStream".
         --interleave N runs each path N times per level, taking turns (default 2); the percentiles
         pool the N runs, and each run's added p99 and its ratio to the relay's are printed too.
         --relay-frontend-bytes adds the relay writing the frontend's bytes per event (its SSE id
         line and the OpenAI chunk's id, object, created and model: ~300 bytes against ~100), as the
         row "minimal relay, frontend's bytes". CPU per chunk is printed with the share of it spent
         in the kernel.
  BATON_BIN=build/baton python3 bench/perf.py burst    [--concurrency 100,1000] [--repeats 5]
        [--speedup 0.2] [--tokens 10] [--paths direct,relay,frontend] [--threads 2] [--batched-tokens N]
        [--batch-gather-us N] [--compare-bin OTHER/baton]
      b'. burst TTFT: N streaming requests written at once (baton-sse-load --burst: the N connections
         are opened first, then one request is written on each in one pass; on the request plane the
         N REQUEST frames in one write), TTFT per request from its own write; p50/p99 straight at the
         worker, through the minimal relay and through the frontend, the paths in a rotating order,
         --repeats times; medians over the repeats, added over direct and ratios to direct.
         --compare-bin adds a frontend of another build on the same worker ("frontend, compared build").
         --arrival times each first token on the HTTP paths by its arrival at the client's socket
         (the kernel's receive time) rather than by the client's read, which comes only after the
         client has written the whole burst; an upper bound (segments merged in the socket keep the
         newest time). Direct is read as it arrives on its one connection and is timed as before.
         --batch-gather-us gives the worker that flag (the first step of an idle engine waits for the
         rest of a burst; docs/engines.md, "Batch gathering").
  BATON_BIN=build/baton python3 bench/perf.py scale    [--streams 10000] [--workers 4]
        [--tokens 50] [--speedup 0.02] [--repeat 1] [--idle 5]
      c. N concurrent slow streams; RSS growth of the frontend and of the workers per stream,
         frontend CPU per token; --streams 10,100,1000,10000 gives the curve, --repeat N runs the
         load N times in one cluster (does the RSS after a run plateau?), RSS read --idle s after each.
  BATON_BIN=build/baton python3 bench/perf.py ceiling  [--configs 100000:200:20000,10:2000:300]
      d. tokens/s and chunks/s one frontend delivers with the mocker far faster than real time
         (speedup:streams:max_tokens): large chunks (many tokens per chunk) and small ones.
  BATON_BIN=build/baton python3 bench/perf.py profile  [--streams 400] [--tokens 200] [--speedup 1]
      perf record (cpu-clock) of the frontend under the `cost` load; prints the top symbols.
      --allocs counts its malloc/calloc/realloc calls per chunk and per request instead (uprobes).
nginx and haproxy must be installed for `cost` and nginx for `latency`'s anchor, perf for `profile`
(Debian: apt-get install nginx-light haproxy linux-perf).
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402
import natslib  # noqa: E402

MAX_SEQS = 20000  # the mocker's sequence cap, raised so that the engine never queues here


def load_bin():
    path = os.path.join(os.path.dirname(bl.baton_bin()), "baton-sse-load")
    if not os.access(path, os.X_OK):
        raise SystemExit(f"{path} not found: build it (cmake --build <dir> --target baton-sse-load)")
    return path


def cpu_ns(pid):
    """CPU time of every thread of pid, in ns (schedstat: more precise than /proc/pid/stat ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def minflt(pid):
    """Minor page faults of pid so far (/proc/pid/stat field 10): memory touched for the first time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (FileNotFoundError, ProcessLookupError):
        return 0


def kernel_ticks(pid):
    """(user, kernel) CPU clock ticks of pid so far, all its threads (/proc/pid/stat fields 14, 15)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12])
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


CLIENT_CPU = None  # --pin: the CPU the load generator runs on
CHILDREN = []  # subprocess.Popen children that are not bl.Proc (probe streams, perf): killed at exit


def popen(args, **kw):
    p = subprocess.Popen(args, **kw)
    CHILDREN.append(p)
    return p


def proc_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return None


def stop_everything():
    """Stops every process this bench started and reports any that outlived it. bl.Proc children
    (baton, nginx, HAProxy, the relay) get SIGTERM first, so that they exit cleanly, then SIGKILL
    with the rest of their process group; plain children (probe streams, perf) get SIGKILL and are
    reaped. Then the process groups they led are checked in /proc: a member still there (a child
    that outlived its parent) is printed and killed. Runs in main's finally, before batonlib's exit
    handler."""
    procs = bl.all_procs()
    for p in procs:
        if p.alive():
            p.kill(signal.SIGTERM)
    end = time.monotonic() + 5
    for p in procs:
        if p.wait(max(0.0, end - time.monotonic())) is None:
            p.kill_group()
    for p in CHILDREN:
        if p.poll() is None:
            p.kill()
        p.wait()
    left = set()  # (every started process is reaped by now; what can outlive it is its group)
    for pid in [p.pid for p in procs] + [p.pid for p in CHILDREN]:
        left.update(bl._pgroup_members(pid))
    for pid in sorted(left):
        cmd = proc_cmdline(pid)
        if cmd:
            print(f"left running after the bench: pid {pid}: {cmd}; killing it", file=sys.stderr)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def pin_client():
    if CLIENT_CPU is not None:
        os.sched_setaffinity(0, {CLIENT_CPU})


def run_load(target, streams, tokens, requests=None, rate=5000, timeout=600, ready_file=None, rpc=False,
             timestamps=None, extra=()):
    args = [load_bin(), "--rpc" if rpc else "--url", target, "--streams", str(streams), "--max-tokens",
            str(tokens), "--rate", str(rate), "--timeout", str(timeout)] + list(extra)
    if timestamps:
        args += ["--timestamps", timestamps]
    if requests:
        args += ["--requests", str(requests)]
    if ready_file:
        args += ["--ready-file", ready_file]
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 30, preexec_fn=pin_client)
    try:
        res = json.loads(p.stdout)
    except ValueError:
        raise SystemExit(f"baton-sse-load printed no result (exit {p.returncode}): {p.stdout!r} {p.stderr!r}")
    res["exit"] = p.returncode
    return res


def check(res, what, digest=None):
    """Fails loudly on a run that lost a request or whose text differs from the reference."""
    if res["exit"] != 0 or res["failed"] or res["ok"] != res["requests"]:
        raise SystemExit(f"{what}: {res['failed']} of {res['requests']} requests failed: {res['errors']}")
    if digest is not None and res["digest"] != digest:
        raise SystemExit(f"{what}: streamed text differs from the reference (digest {res['digest']} != {digest})")


class Meter:
    """CPU of a set of processes over a window."""

    def __init__(self, pids):
        self.pids = dict(pids)
        self.t0 = {k: cpu_ns(p) for k, p in self.pids.items()}
        self.f0 = {k: minflt(p) for k, p in self.pids.items()}
        self.k0 = {k: kernel_ticks(p) for k, p in self.pids.items()}
        self.faults = 0  # minor page faults over the window, all the processes (set by stop)
        self.ticks = (0, 0)  # (user, kernel) clock ticks over the window, all the processes (set by stop)

    def stop(self):
        # a process gone by now reads 0: counted as none rather than negative
        self.faults = sum(max(0, minflt(p) - self.f0[k]) for k, p in self.pids.items())
        now = {k: kernel_ticks(p) for k, p in self.pids.items()}
        self.ticks = tuple(sum(max(0, now[k][i] - self.k0[k][i]) for k in self.pids) for i in (0, 1))
        return {k: (cpu_ns(p) - self.t0[k]) / 1e9 for k, p in self.pids.items()}


def pct(xs, p):
    """The p-th percentile (0-100) of xs, nearest rank; NaN when xs is empty."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


# The frontend's migration log lines (the instants at debug level: CLOCK_MONOTONIC in us, the clock of
# time.monotonic(), comparable across local processes).
SEEN_RX = re.compile(r"request (\S+): failure seen at t=(\d+) us, re-dispatched at t=(\d+) us")
NEXT_RX = re.compile(r"request (\S+): first token after the migration at t=(\d+) us")
MIG_RX = re.compile(r"request (\S+) migrated from worker ([0-9a-f]+) to worker ([0-9a-f]+) with (\d+) tokens")


def migration_instants(log):
    """From a frontend's log: {request id: (failure seen, re-dispatched)} and {request id: first token
    after the migration}, in seconds of CLOCK_MONOTONIC."""
    seen = {m.group(1): (int(m.group(2)) / 1e6, int(m.group(3)) / 1e6) for m in SEEN_RX.finditer(log)}
    nxt = {m.group(1): int(m.group(2)) / 1e6 for m in NEXT_RX.finditer(log)}
    return seen, nxt


def cost_rounds(a, fes, others=None):
    """CPU per streamed token of frontends that differ in one setting: a.rounds rounds, each running
    the same load (a.streams concurrent streams, twice as many requests of a.tokens tokens) on each
    frontend of fes ({path name: frontend}) in turn, every answer checked against the first run's.
    others ({name: pid}) are processes whose CPU is measured alongside. Prints each run and the
    CPU-s per million tokens of each path; returns ({path: CPU-s per 1M tokens},
    {path: [(tokens, chunks, {"frontend" or an others name: CPU-s})]})."""
    for fe in fes.values():
        check(run_load(fe.url, 10, 10), "warm-up")
    rows = {name: [] for name in fes}
    ref = None
    requests = a.streams * 2
    for rnd in range(a.rounds):
        for name, fe in fes.items():
            m = Meter({"frontend": fe.proc.pid, **(others or {})})
            res = run_load(fe.url, a.streams, a.tokens, requests=requests, rate=5000)
            cpu = m.stop()
            check(res, f"{name} round {rnd + 1}", ref)
            ref = ref or res["digest"]
            rows[name].append((res["tokens"], res["chunks"], cpu))
            print(f"round {rnd + 1} {name:10s}: {res['tokens']} tokens, {res['chunks']} chunks in "
                  f"{res['wall_s']:.2f} s; " + ", ".join(f"{k} {v:.2f} CPU-s" for k, v in cpu.items()), flush=True)
    print()
    print(f"streams={a.streams} requests={requests} per round, max_tokens={a.tokens}, speedup={a.speedup}, "
          f"workers={a.workers}, rounds={a.rounds}; both paths streamed identical text")
    per = {}
    for name, rs in rows.items():
        tok = sum(r[0] for r in rs)
        chunks = sum(r[1] for r in rs)
        cpu = sum(r[2]["frontend"] for r in rs)
        per[name] = cpu / tok * 1e6
        print(f"{name:10s}: {per[name]:.2f} CPU-s per 1M tokens ({cpu / chunks * 1e6:.2f} us per chunk)")
    return per, rows


def add_subcommand(sub, name, **defaults):
    """A subcommand whose flags are the keyword arguments, in order: --flag-name of the type of its
    default."""
    p = sub.add_parser(name)
    for k, v in defaults.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    return p


def add_cost_parser(sub):
    """The "cost" subcommand of a script whose cost_rounds compare two frontends."""
    return add_subcommand(sub, "cost", streams=400, tokens=200, rounds=3, speedup=1.0, workers=2)


def start_cluster(c, workers, speedup, **wflags):
    fe = c.start_frontend(max_connections=30000, max_concurrent_requests=100000, http_idle_timeout_ms=600000)
    ws = [c.start_worker(speedup_ratio=speedup, max_num_seqs=MAX_SEQS, **wflags) for _ in range(workers)]
    c.wait_workers(fe, workers)
    return fe, ws


def pct_row(res, key):
    d = res[key]
    return d.get("p50", float("nan")), d.get("p99", float("nan"))


# ---------------------------------------------------------------------------------------------
# a. proxy-tier cost

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 19000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream baton {{ server 127.0.0.1:{upstream}; keepalive 4096; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://baton;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;  # the client's 127.0.0.1:port: a loopback frontend refuses a name
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""

HAPROXY_CONF = """
global
    nbthread 1
    maxconn 9000
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 600s
frontend clients
    bind 127.0.0.1:{port}
    default_backend baton
backend baton
    http-reuse always
    server fe 127.0.0.1:{upstream}
"""


def start_anchor(kind, d, upstream):
    port = bl.free_port()
    if kind == "nginx":
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=d, upstream=upstream, port=port))
        p = bl.Proc([shutil.which("nginx") or "/usr/sbin/nginx", "-p", d, "-c", conf, "-e", d + "/nginx-error.log"],
                    name="nginx", log=os.path.join(d, "nginx.log"))
    else:
        conf = os.path.join(d, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(HAPROXY_CONF.format(upstream=upstream, port=port))
        p = bl.Proc([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", conf], name="haproxy",
                    log=os.path.join(d, "haproxy.log"))
    bl.wait_http(f"http://127.0.0.1:{port}/live", p, timeout=20)
    return p, f"http://127.0.0.1:{port}"


def start_relay(d, rpc, frontend_bytes=False):
    """bench/relay.c: the minimal relay (the frontend's unavoidable work only) on the worker `rpc`;
    frontend_bytes: its events carry the frontend's bytes (SSE id, the chunk's id/object/created/model)."""
    exe = os.path.join(os.path.dirname(bl.baton_bin()), "baton-relay")
    if not os.path.exists(exe):
        raise SystemExit(f"{exe} not found: build it (cmake --build <dir> --target baton-relay)")
    port = bl.free_port()
    log = os.path.join(d, "relay-fb.log" if frontend_bytes else "relay.log")
    p = bl.Proc([exe, "--listen", port, "--worker", rpc] + (["--frontend-bytes"] if frontend_bytes else []),
                name="relay", log=log)
    bl.wait_for(lambda: "connected to the worker" in open(log).read(), 20, what="the relay's worker connection")
    return p, f"http://127.0.0.1:{port}"


def cmd_cost(a):
    bl.deadline(3600, "perf cost")
    anchors = [x for x in a.anchors.split(",") if x]
    with bl.Cluster() as c:
        fe, ws = start_cluster(c, a.workers, a.speedup)
        procs = {}
        for kind in anchors:
            procs[kind] = start_anchor(kind, c.dir, fe.port)
        paths = [("baton", fe.url)]
        other = None
        if a.compare_bin:  # a second frontend from another build, on the same workers
            own, c.bin = c.bin, a.compare_bin
            other = c.start_frontend(max_connections=30000, max_concurrent_requests=100000,
                                     http_idle_timeout_ms=600000)
            c.bin = own
            c.wait_workers(other, a.workers)
            paths.append(("compare", other.url))
        check(run_load(fe.url, 10, 10), "warm-up")
        if other:
            check(run_load(other.url, 10, 10), "warm-up")
        paths += [(k, procs[k][1]) for k in anchors]
        rows = {k: [] for k, _ in paths}
        ref = None
        requests = a.streams * a.requests_per_stream
        for rnd in range(a.rounds):
            for name, url in paths:
                pids = {"frontend": (other if name == "compare" else fe).proc.pid}
                pids.update({f"worker{i}": w.proc.pid for i, w in enumerate(ws)})
                if name not in ("baton", "compare"):
                    pids[name] = procs[name][0].pid
                m = Meter(pids)
                res = run_load(url, a.streams, a.tokens, requests=requests, rate=a.rate)
                cpu = m.stop()
                check(res, f"{name} round {rnd + 1}", ref)
                ref = ref or res["digest"]
                rows[name].append((res, cpu))
                tok = res["tokens"]
                print(f"round {rnd + 1} {name:8s}: {tok} tokens in {res['wall_s']:.2f} s "
                      f"({tok / res['wall_s']:,.0f} tok/s, {tok / max(res['chunks'], 1):.2f} tok/chunk); "
                      + ", ".join(f"{k} {v:.2f} s" for k, v in cpu.items()), flush=True)
    print()
    print(f"streams={a.streams} requests={requests} max_tokens={a.tokens} speedup={a.speedup} workers={a.workers} "
          f"rounds={a.rounds}; every request complete and identical on every path")
    per_m = {}
    for name, rs in rows.items():
        proc_name = "frontend" if name in ("baton", "compare") else name
        tok = sum(r["tokens"] for r, _ in rs)
        cpu = sum(cpu[proc_name] for _, cpu in rs)
        wall = sum(r["wall_s"] for r, _ in rs)
        chunks = sum(r["chunks"] for r, _ in rs)
        per_m[name] = cpu / tok * 1e6
        fe_cpu = sum(cpu["frontend"] for _, cpu in rs)
        gaps = [r["gap_us"]["p99"] for r, _ in rs]
        print(f"{name:8s}: {per_m[name]:6.2f} CPU-s per 1M tokens ({cpu / wall * 100:.0f}% of a core; "
              f"{cpu / chunks * 1e6:.2f} us per chunk; {tok / wall:,.0f} tok/s; {tok / chunks:.2f} tok/chunk; "
              f"client gap p99 {max(gaps)} us)"
              + (f"; the baton frontend behind it: {fe_cpu / tok * 1e6:.2f} CPU-s per 1M tokens"
                 if proc_name != "frontend" else ""))
    for k in anchors + (["compare"] if a.compare_bin else []):
        print(f"ratio baton / {k}: {per_m['baton'] / per_m[k]:.2f}")
    return 0


# ---------------------------------------------------------------------------------------------
# b. added latency

def read_ts(path):
    with open(path) as f:
        return [int(x) for x in f.read().split()]


def pctl(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * (len(xs) - 1)))] if xs else float("nan")


def transit(probe, arrivals):
    """Per-token transit relative to the probe: every engine step delivers the tokens of all its
    running sequences at once, so a chunk that arrives d after the probe's token of the same step
    took d longer to come than the probe's did. Arrivals more than half a step after the last
    probe token (the probe between two of its requests) are left out."""
    import bisect
    gaps = sorted(b - a for a, b in zip(probe, probe[1:]))
    if not gaps:
        return [], 0
    limit = gaps[len(gaps) // 2] / 2
    out, unmatched = [], 0
    for t in arrivals:
        i = bisect.bisect_right(probe, t) - 1
        if i < 0 or t - probe[i] > limit:
            unmatched += 1
        else:
            out.append((t - probe[i]) / 1000.0)
    return out, unmatched


def cmd_latency(a):
    global CLIENT_CPU
    if a.interleave < 1:
        raise SystemExit("perf latency: --interleave must be at least 1")
    bl.deadline(3600, "perf latency")
    levels = [int(x) for x in a.concurrency.split(",")]
    out = []
    with bl.Cluster() as c:
        fe, ws = start_cluster(c, 1, a.speedup)
        w = ws[0]
        rpc = f"127.0.0.1:{w.rpc_port}"
        paths = [("direct", rpc, True), ("frontend", fe.url, False)]
        anchor = None
        if a.anchor:
            anchor = start_anchor(a.anchor, c.dir, fe.port)
            paths.append((a.anchor, anchor[1], False))
        extra, multi = [], []  # more frontends on the same worker, measured as more paths
        relay = None
        if a.relay:  # the floor: only the work a frontend cannot avoid, against direct like the rest
            relay = start_relay(c.dir, rpc)
            multi.append("minimal relay")
            paths.append((multi[-1], relay[1], False))
        relay_fb = None
        if a.relay_frontend_bytes:  # the same floor writing the frontend's bytes per event
            relay_fb = start_relay(c.dir, rpc, frontend_bytes=True)
            multi.append("minimal relay, frontend's bytes")
            paths.append((multi[-1], relay_fb[1], False))
        if a.threads > 1:  # one frontend process with N event loops
            t = c.start_frontend(max_connections=30000, max_concurrent_requests=100000, http_idle_timeout_ms=600000,
                                 threads=a.threads)
            c.wait_workers(t, 1)
            extra.append(t)
            multi.append(f"frontend --threads {a.threads}")
            paths.append((multi[-1], t.url, False))
        if a.compare_bin:  # a frontend of another build on the same worker: before/after in one run
            own, c.bin = c.bin, a.compare_bin
            t = c.start_frontend(max_connections=30000, max_concurrent_requests=100000, http_idle_timeout_ms=600000)
            c.bin = own
            c.wait_workers(t, 1)
            extra.append(t)
            multi.append("frontend, compared build")
            paths.append((multi[-1], t.url, False))
        if a.frontends > 1:  # N frontend processes; one client spreads its connections over them
            procs = [c.start_frontend(max_connections=30000, max_concurrent_requests=100000,
                                      http_idle_timeout_ms=600000) for _ in range(a.frontends - 1)]
            for f in procs:
                c.wait_workers(f, 1)
            extra += procs
            multi.append(f"{a.frontends} frontend processes")
            paths.append((multi[-1], ",".join([fe.url] + [f.url for f in procs]), False))
        jsfe = None
        if a.jetstream:  # a frontend whose stream journal is shared through NATS JetStream
            nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}').start()
            jsfe = c.start_frontend(event_plane="nats", nats_server=nats.url, max_connections=30000,
                                    max_concurrent_requests=100000, http_idle_timeout_ms=600000)
            jsfe.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
            c.wait_workers(jsfe, 1)
            multi.append("frontend, journal in JetStream")
            paths.append((multi[-1], jsfe.url, False))
        if a.pin:
            baton_cpu, CLIENT_CPU = (int(x) for x in a.pin.split(":"))
            for p in ([fe.proc, w.proc] + [f.proc for f in extra] + ([jsfe.proc] if jsfe else []) + ([anchor[0]] if anchor else [])
                      + ([relay[0]] if relay else []) + ([relay_fb[0]] if relay_fb else [])):
                os.sched_setaffinity(p.pid, {baton_cpu})
        # the process(es) between the client and the worker on each path: their CPU per chunk
        cpu_pids = {"frontend": {"fe": fe.proc.pid}}
        if anchor:
            cpu_pids[a.anchor] = {"anchor": anchor[0].pid, "fe": fe.proc.pid}
        if relay:
            cpu_pids["minimal relay"] = {"relay": relay[0].pid}
        if relay_fb:
            cpu_pids["minimal relay, frontend's bytes"] = {"relay": relay_fb[0].pid}
        if a.threads > 1:
            cpu_pids[f"frontend --threads {a.threads}"] = {"fe": extra[0].proc.pid}
        if a.compare_bin:
            cpu_pids["frontend, compared build"] = {"fe": extra[1 if a.threads > 1 else 0].proc.pid}
        if jsfe:
            cpu_pids["frontend, journal in JetStream"] = {"fe": jsfe.proc.pid}
        if a.frontends > 1:
            skip = (1 if a.threads > 1 else 0) + (1 if a.compare_bin else 0)
            cpu_pids[f"{a.frontends} frontend processes"] = {f"fe{i}": f.proc.pid for i, f in
                                                             enumerate([fe] + extra[skip:])}
        check(run_load(fe.url, 10, 10), "warm-up")
        check(run_load(rpc, 10, 10, rpc=True), "warm-up (request plane)")
        for n in levels:
            requests = max(n * a.rounds, a.min_requests)
            res = {"unmatched": 0}
            for name, _, _ in paths:
                res[name], res["transit_" + name] = [], []
            res["rounds"] = []  # per round: path -> its transit list (per-round p99s and their ratios)
            for rnd in range(a.interleave):  # direct, frontend, direct, frontend: drift shows as a difference
                res["rounds"].append({})
                for name, target, is_rpc in paths:
                    # the probe: one request-plane stream on the same worker, running throughout
                    pts, lts, ready = (os.path.join(c.dir, x) for x in ("probe.ts", "load.ts", "probe.ready"))
                    for f in (pts, lts, ready):
                        if os.path.exists(f):
                            os.unlink(f)
                    probe = popen([load_bin(), "--rpc", rpc, "--streams", "1", "--max-tokens", "1000000",
                                              "--timestamps", pts, "--ready-file", ready], stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, preexec_fn=pin_client)
                    bl.wait_for(lambda: os.path.exists(ready), 30, what="the probe stream's first token")
                    time.sleep(0.2)
                    serving = cpu_pids.get(name, {})
                    m = Meter(serving)
                    r = run_load(target, n, a.tokens, requests=requests // 2, rpc=is_rpc, rate=2000,
                                 timestamps=lts)
                    r["serving_cpu_s"] = sum(m.stop().values())
                    r["serving_faults"] = m.faults
                    r["serving_ticks"] = m.ticks
                    probe.send_signal(2)
                    pout, perr = probe.communicate(timeout=30)
                    if probe.returncode != 0:
                        raise SystemExit(f"probe failed: {pout} {perr}")
                    check(r, f"{name} at {n} streams", res.get("digest"))
                    res.setdefault("digest", r["digest"])
                    res[name].append(r)
                    tr, um = transit(read_ts(pts), read_ts(lts))
                    res["transit_" + name] += tr
                    res["rounds"][-1][name] = tr
                    if name != "direct":
                        res["unmatched"] += um
            out.append((n, requests // 2 * a.interleave, res))
            print(f"{n} streams done", flush=True)
    print()
    print(f"speedup={a.speedup} max_tokens={a.tokens}, one worker"
          + (f", baton on CPU {a.pin.split(':')[0]} and the clients on CPU {a.pin.split(':')[1]}" if a.pin else "")
          + "; every request complete and identical on every path")
    print("| streams | requests per path | TTFT p50 direct / frontend / added | TTFT p99 direct / frontend / added "
          "| per-token delay p50 direct / frontend / added | p99 direct / frontend / added | gap p99 direct / frontend |")
    print("|---|---|---|---|---|---|---|")
    for n, requests, res in out:
        def merged(name, key, p):
            vals = [r[key][p] for r in res[name]]
            return sum(vals) / len(vals)
        cells = []
        for key, p in (("ttft_us", "p50"), ("ttft_us", "p99")):
            d, f = merged("direct", key, p), merged("frontend", key, p)
            cells.append(f"{d / 1000:.2f} ms / {f / 1000:.2f} ms / {(f - d):+.0f} us")
        for p in (0.5, 0.99):
            d, f = pctl(res["transit_direct"], p), pctl(res["transit_frontend"], p)
            cells.append(f"{d:.0f} / {f:.0f} / {f - d:+.0f} us")
        cells.append(f"{merged('direct', 'gap_us', 'p99') / 1000:.2f} / {merged('frontend', 'gap_us', 'p99') / 1000:.2f} ms")
        print(f"| {n} | {requests} | " + " | ".join(cells) + " |")
        # the same load on N event loops (against direct), and one more proxy hop in front of the
        # frontend (against the frontend alone)
        rows = [(k, "direct", k, "direct") for k in multi]
        if a.anchor:
            rows.append((a.anchor, "frontend", f"{a.anchor} hop in front", "the frontend"))
        for k, base, label, base_name in rows:
            d, f = merged(base, "ttft_us", "p50"), merged(k, "ttft_us", "p50")
            t50 = pctl(res["transit_" + k], 0.5) - pctl(res["transit_" + base], 0.5)
            t99 = pctl(res["transit_" + k], 0.99) - pctl(res["transit_" + base], 0.99)
            print(f"| {n}, {label} | {requests} | TTFT p50 {f / 1000:.2f} ms ({f - d:+.0f} us over {base_name})"
                  f" | | per-token p50 {pctl(res['transit_' + k], 0.5):.0f} us ({t50:+.0f} us over {base_name}) "
                  f"| p99 {pctl(res['transit_' + k], 0.99):.0f} us ({t99:+.0f} us) | |")
    for n, requests, res in out:
        parts = []
        for name in ["frontend"] + multi + ([a.anchor] if a.anchor else []):
            rs = res.get(name) or []
            cpu = sum(r.get("serving_cpu_s", 0) for r in rs)
            chunks = sum(r["chunks"] for r in rs)
            if cpu and chunks:
                faults = sum(r.get("serving_faults", 0) for r in rs)
                user = sum(r.get("serving_ticks", (0, 0))[0] for r in rs)
                kern = sum(r.get("serving_ticks", (0, 0))[1] for r in rs)
                share = f", {100 * kern / (user + kern):.0f} % in the kernel" if user + kern else ""
                parts.append(f"{name} {cpu / chunks * 1e6:.2f} us ({faults / chunks:.3f} page faults{share})")
        if parts:
            print(f"CPU per chunk of the process(es) between client and worker at {n} streams: " + ", ".join(parts)
                  + (f" (the {a.anchor} path: nginx plus the frontend behind it)" if a.anchor else ""))
    for n, requests, res in out:
        if len(res["rounds"]) < 2:
            continue
        # each round's added p99 (path - direct, same round) and its ratio to the relay's: how much
        # one run's figure moves with the machine, beside the pooled percentiles above
        added = {}
        for rd in res["rounds"]:
            d99 = pctl(rd["direct"], 0.99)
            for name, tr in rd.items():
                if name != "direct":
                    added.setdefault(name, []).append(pctl(tr, 0.99) - d99)
        for name, xs in added.items():
            print(f"added per-token p99 at {n} streams, per round, {name}: " + ", ".join(f"{x:+.0f}" for x in xs) + " us")
        for floor in ("minimal relay", "minimal relay, frontend's bytes"):
            if floor not in added:
                continue
            for name, xs in added.items():
                if name.startswith("minimal relay"):
                    continue
                rs = [x / y for x, y in zip(xs, added[floor]) if y > 0]
                if rs:
                    lo, hi = median_ci(rs)
                    print(f"  {name} / {floor}, per round: median {median(rs):.3f} (range {min(rs):.3f}-{max(rs):.3f}; "
                          f"95 % bootstrap interval of the median {lo:.3f}-{hi:.3f}), "
                          f"above 1.1 in {sum(r > 1.1 for r in rs)} of {len(rs)}")
    print(f"(TTFT: mean over {a.interleave} interleaved runs of each path. Per-token delay: arrival of each token chunk minus "
          "the arrival of the same engine step's token of a probe stream on the worker's request plane, over "
          + ", ".join(f"{len(res['transit_frontend'])} chunks at {n}" for n, _, res in out)
          + "; 'added' = frontend - direct)")
    return 0


# ---------------------------------------------------------------------------------------------
# b'. burst TTFT

def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2) if xs else float("nan")


def median_ci(xs, draws=10000, seed=1):
    """A 95 % percentile-bootstrap interval of the median of xs (independent rounds): how far the
    median of this many rounds can move with the machine's noise. The seed only fixes the resampling."""
    rng = random.Random(seed)
    ms = sorted(median(rng.choices(xs, k=len(xs))) for _ in range(draws))
    return ms[int(0.025 * draws)], ms[int(0.975 * draws) - 1]


def cmd_burst(a):
    """N requests at once on each path, a.repeats times; TTFT per request from its own write."""
    bl.deadline(3600, "perf burst")
    levels = [int(x) for x in a.concurrency.split(",")]
    names = [x for x in a.paths.split(",") if x]
    out = []
    with bl.Cluster() as c:
        wflags = {"max_num_batched_tokens": a.batched_tokens} if a.batched_tokens else {}
        if a.batch_gather_us:
            wflags["batch_gather_us"] = a.batch_gather_us
        fe, ws = start_cluster(c, 1, a.speedup, **wflags)
        rpc = f"127.0.0.1:{ws[0].rpc_port}"
        targets = {"direct": (rpc, True), "frontend": (fe.url, False)}
        serving = {"frontend": fe.proc.pid}  # the process between the client and the worker: its CPU
        if "relay" in names:
            rl = start_relay(c.dir, rpc)
            targets["relay"] = (rl[1], False)
            serving["relay"] = rl[0].pid
        if a.threads > 1:
            t = c.start_frontend(max_connections=30000, max_concurrent_requests=100000, http_idle_timeout_ms=600000,
                                 threads=a.threads)
            c.wait_workers(t, 1)
            names.append(f"frontend --threads {a.threads}")
            targets[names[-1]] = (t.url, False)
            serving[names[-1]] = t.proc.pid
        if a.compare_bin:  # a frontend of another build on the same worker: before/after in one run
            own, c.bin = c.bin, a.compare_bin
            t = c.start_frontend(max_connections=30000, max_concurrent_requests=100000, http_idle_timeout_ms=600000)
            c.bin = own
            c.wait_workers(t, 1)
            names.append("frontend, compared build")
            targets[names[-1]] = (t.url, False)
            serving[names[-1]] = t.proc.pid
        for name in names:
            if name not in targets:
                raise SystemExit(f"unknown path {name!r} (direct, relay, frontend)")
            check(run_load(targets[name][0], 10, 10, rpc=targets[name][1]), f"warm-up ({name})")
        for n in levels:
            runs = {name: [] for name in names}
            digest = None
            for rep_i in range(a.repeats):
                k = rep_i % len(names)  # a rotating order: no path always runs first or after another
                for name in names[k:] + names[:k]:
                    target, is_rpc = targets[name]
                    time.sleep(a.pause)  # the engine idle, the previous burst's sockets closed
                    m = Meter({"p": serving[name]} if name in serving else {})
                    r = run_load(target, n, a.tokens, rpc=is_rpc, rate=2000,
                                 extra=["--burst"] + (["--arrival"] if a.arrival else []))
                    r["serving_cpu_s"] = sum(m.stop().values())
                    check(r, f"{name}, burst of {n}, repeat {rep_i + 1}", digest)
                    digest = digest or r["digest"]
                    runs[name].append(r)
                    print(f"{n} streams, repeat {rep_i + 1}, {name:>10s}: TTFT p50 {r['ttft_us']['p50'] / 1000:8.2f} ms, "
                          f"p99 {r['ttft_us']['p99'] / 1000:8.2f} ms, max {r['ttft_us']['max'] / 1000:8.2f} ms; "
                          + (f"to the client's read p50 {r['ttft_read_us']['p50'] / 1000:.2f} ms, "
                             f"p99 {r['ttft_read_us']['p99'] / 1000:.2f} ms; " if a.arrival else "")
                          + f"the client's writes spread over {r['send_spread_us'] / 1000:.2f} ms", flush=True)
            out.append((n, runs))
    print()
    print(f"speedup={a.speedup} max_tokens={a.tokens}, one worker, {a.repeats} bursts per path and level"
          + (f", max_num_batched_tokens={a.batched_tokens}" if a.batched_tokens else "")
          + (f", batch_gather_us={a.batch_gather_us}" if a.batch_gather_us else "")
          + "; every request complete and identical on every path")
    print("| streams | path | TTFT p50 | TTFT p99 | p50 added over direct | p99 added over direct "
          "| p50 / direct | client's write spread |")
    print("|---|---|---|---|---|---|---|---|")
    for n, runs in out:
        d = runs["direct"] if "direct" in runs else None
        for name in names:
            rs = runs[name]
            p50 = [r["ttft_us"]["p50"] / 1000 for r in rs]
            p99 = [r["ttft_us"]["p99"] / 1000 for r in rs]
            cells = [f"{median(p50):.2f} ms ({min(p50):.2f}–{max(p50):.2f})",
                     f"{median(p99):.2f} ms ({min(p99):.2f}–{max(p99):.2f})"]
            if d and name != "direct":
                # differences and ratios within a repeat (the paths of one repeat ran back to back)
                a50 = [x["ttft_us"]["p50"] / 1000 - y["ttft_us"]["p50"] / 1000 for x, y in zip(rs, d)]
                a99 = [x["ttft_us"]["p99"] / 1000 - y["ttft_us"]["p99"] / 1000 for x, y in zip(rs, d)]
                q = [x["ttft_us"]["p50"] / y["ttft_us"]["p50"] for x, y in zip(rs, d)]
                cells += [f"{median(a50):+.2f} ms ({min(a50):+.2f} – {max(a50):+.2f})",
                          f"{median(a99):+.2f} ms ({min(a99):+.2f} – {max(a99):+.2f})",
                          f"{median(q):.3f}"]
            else:
                cells += ["", "", ""]
            cells.append(f"{median([r['send_spread_us'] / 1000 for r in rs]):.2f} ms")
            print(f"| {n} | {name} | " + " | ".join(cells) + " |")
    print("(each cell: the median over the bursts, with the range; 'added' and '/ direct' are taken within each "
          "repeat, then the median; the write spread is from the client's first request write to its last)")
    for n, runs in out:
        parts = []
        for name in names:
            if name in serving:
                v = [r["serving_cpu_s"] / n * 1e6 for r in runs[name]]
                parts.append(f"{name} {median(v):.1f} us ({min(v):.1f}–{max(v):.1f})")
        # ratios within a repeat (the paths of one repeat ran back to back), then the median
        base = "frontend" if "frontend" in runs else None
        for other in [x for x in names if x in serving and x != base] if base else []:
            q = [x["serving_cpu_s"] / y["serving_cpu_s"] for x, y in zip(runs[base], runs[other]) if y["serving_cpu_s"]]
            if q:
                parts.append(f"frontend / {other} {median(q):.2f} ({min(q):.2f}–{max(q):.2f})")
        print(f"CPU per request of the process between client and worker, whole burst ({n} streams, "
              f"{a.tokens} tokens each; connects included): " + ", ".join(parts))
    return 0


# ---------------------------------------------------------------------------------------------
# c. scale

def scale_level(a, n, tokens):
    """One cluster, a.repeat runs of n concurrent streams; RSS sampled throughout."""
    with bl.Cluster() as c:
        fe, ws = start_cluster(c, a.workers, a.speedup, num_gpu_blocks_override=a.blocks)
        check(run_load(fe.url, 100, 10), "warm-up")
        time.sleep(0.5)
        pids = {"frontend": fe.proc.pid}
        pids.update({f"worker{i}": w.proc.pid for i, w in enumerate(ws)})
        base = {k: rss_kib(p) for k, p in pids.items()}
        runs = []
        for rnd in range(a.repeat):
            ready = os.path.join(c.dir, f"ready-{n}-{rnd}")
            peak = dict(base)
            at_ready = {}
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    for k, p in pids.items():
                        try:
                            peak[k] = max(peak[k], rss_kib(p))
                        except OSError:
                            pass
                    if not at_ready and os.path.exists(ready):
                        at_ready.update({k: rss_kib(p) for k, p in pids.items()})
                    stop.wait(0.2)

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            m = Meter(pids)
            res = run_load(fe.url, n, tokens, rate=a.rate, ready_file=ready, timeout=900)
            cpu = m.stop()
            stop.set()
            th.join()
            after = {k: rss_kib(p) for k, p in pids.items()}
            check(res, f"{n} streams, run {rnd + 1}")
            if not at_ready:
                raise SystemExit(f"{n} streams: never all running at once (raise --tokens or lower --speedup)")
            mi = Meter(pids)
            t_idle = time.monotonic()
            time.sleep(a.idle)  # the frontend idle: what it keeps, or gives back, and its idle CPU rate
            idle_cpu = mi.stop()["frontend"] / (time.monotonic() - t_idle)
            idle = {k: rss_kib(p) for k, p in pids.items()}
            runs.append({"res": res, "cpu": cpu, "peak": peak, "at_ready": at_ready, "after": after, "idle": idle,
                         "net": cpu["frontend"] - idle_cpu * res["wall_s"]})
            print(f"{n} streams, run {rnd + 1}: {res['ok']} ok, {res['tokens']} tokens in {res['wall_s']:.1f} s; "
                  f"frontend CPU {cpu['frontend']:.2f} s, RSS all running {at_ready['frontend'] / 1024:.1f} MiB, "
                  f"at the end {after['frontend'] / 1024:.1f} MiB, {a.idle:g} s later {idle['frontend'] / 1024:.1f} MiB",
                  flush=True)
    return base, pids, runs


def cmd_scale(a):
    bl.deadline(3600, "perf scale")
    levels = [int(x) for x in str(a.streams).split(",")]
    out = []
    for n in levels:
        base, pids, runs = scale_level(a, n, a.tokens)
        out.append((n, base, pids, runs))
    print()
    print(f"workers={a.workers} max_tokens={a.tokens} speedup={a.speedup} blocks/worker={a.blocks} "
          f"runs per level={a.repeat} idle wait={a.idle:g} s; every request complete")
    for n, base, pids, runs in out:
        r0 = runs[0]
        res = r0["res"]
        print(f"{n} streams: TTFT p50 {res['ttft_us']['p50'] / 1000:.1f} ms p99 {res['ttft_us']['p99'] / 1000:.1f} ms; "
              f"gap p50 {res['gap_us']['p50'] / 1000:.1f} ms p99 {res['gap_us']['p99'] / 1000:.1f} ms")
        print("| process | RSS idle | RSS, all streams running | peak RSS | per stream (at all running) "
              "| per stream (peak) | RSS after | CPU during the run |")
        print("|---|---|---|---|---|---|---|---|")
        per_worker = n / a.workers
        for k in pids:
            m = n if k == "frontend" else per_worker
            print(f"| {k} | {base[k] / 1024:.1f} MiB | {r0['at_ready'][k] / 1024:.1f} MiB | {r0['peak'][k] / 1024:.1f} MiB "
                  f"| {(r0['at_ready'][k] - base[k]) / m:.2f} KiB | {(r0['peak'][k] - base[k]) / m:.2f} KiB "
                  f"| {r0['after'][k] / 1024:.1f} MiB | {r0['cpu'][k]:.1f} s |")
    print()
    print("| streams | frontend CPU per 1M tokens (each run) | the same less the idle CPU rate x the run's time "
          "| frontend CPU per request | frontend RSS per stream, all running (each run) "
          "| frontend RSS idle before / after each run, once idle |")
    print("|---|---|---|---|---|---|")
    for n, base, pids, runs in out:
        cpu_m = " / ".join(f"{r['cpu']['frontend'] / r['res']['tokens'] * 1e6:.2f} s" for r in runs)
        cpu_m += " | " + " / ".join(f"{r['net'] / r['res']['tokens'] * 1e6:.2f} s" for r in runs)
        cpu_r = " / ".join(f"{r['cpu']['frontend'] / r['res']['requests'] * 1e6:.0f} us" for r in runs)
        rss = " / ".join(f"{(r['at_ready']['frontend'] - base['frontend']) / n:.2f} KiB" for r in runs)
        idle = " / ".join(f"{r['idle']['frontend'] / 1024:.1f}" for r in runs)
        print(f"| {n} | {cpu_m} | {cpu_r} | {rss} | {base['frontend'] / 1024:.1f} MiB / {idle} MiB |")
    return 0


# ---------------------------------------------------------------------------------------------
# d. throughput ceiling

def cmd_ceiling(a):
    bl.deadline(1800, "perf ceiling")
    for conf in a.configs.split(","):
        speedup, streams, tokens = (float(x) for x in conf.split(":"))
        streams, tokens = int(streams), int(tokens)
        with bl.Cluster() as c:
            fe, ws = start_cluster(c, a.workers, speedup)
            # one frontend per --threads value, all on the same workers, measured in turn
            fes = {}
            for n in (int(x) for x in a.threads.split(",")):
                fes[n] = fe if n == 1 and 1 not in fes else c.start_frontend(
                    max_connections=30000, max_concurrent_requests=100000, http_idle_timeout_ms=600000, threads=n)
                c.wait_workers(fes[n], a.workers)
                check(run_load(fes[n].url, 10, 10), "warm-up")
            for rnd in range(a.rounds):
                for n, f in fes.items():
                    pids = {"frontend": f.proc.pid}
                    pids.update({f"worker{i}": w.proc.pid for i, w in enumerate(ws)})
                    m = Meter(pids)
                    res = run_load(f.url, streams, tokens, requests=streams * a.requests_per_stream)
                    cpu = m.stop()
                    check(res, "ceiling")
                    wall = res["wall_s"]
                    print(f"speedup {speedup:g}, {streams} streams x {a.requests_per_stream} requests x {tokens} tokens, "
                          f"frontend --threads {n}, "
                          f"round {rnd + 1}: {res['tokens']:,} tokens in {wall:.2f} s = {res['tokens'] / wall:,.0f} tokens/s, "
                          f"{res['chunks'] / wall:,.0f} chunks/s ({res['tokens'] / res['chunks']:.1f} tok/chunk), "
                          f"{res['bytes'] / wall / 1e6:.0f} MB/s; frontend CPU {cpu['frontend']:.2f} s "
                          f"({cpu['frontend'] / wall * 100:.0f}% of a core, "
                          f"{cpu['frontend'] / res['chunks'] * 1e6:.2f} us per chunk); workers "
                          + ", ".join(f"{cpu[k]:.2f} s" for k in pids if k != "frontend")
                          + f"; client {res['client_cpu_s']:.2f} s", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# profile of the frontend under the `cost` load

def cmd_profile(a):
    bl.deadline(1800, "perf profile")
    perf = shutil.which("perf")
    if not perf:
        raise SystemExit("perf not found (Debian: apt-get install linux-perf)")
    with bl.Cluster() as c:
        fe, ws = start_cluster(c, a.workers, a.speedup)
        check(run_load(fe.url, 10, 10), "warm-up")
        data = a.output or os.path.join(c.dir, "perf.data")
        if a.allocs:  # count malloc/calloc/realloc calls of the frontend with uprobes instead of sampling
            libc = "/lib/x86_64-linux-gnu/libc.so.6"
            for fn in ("malloc", "calloc", "realloc"):
                subprocess.run([perf, "probe", "-q", "-x", libc, "--add", fn], capture_output=True)
            rec = popen([perf, "stat", "-x", ",", "-o", data + ".stat", "-e",
                                    "probe_libc:malloc,probe_libc:calloc,probe_libc:realloc", "-p", str(fe.proc.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        else:
            rec = popen([perf, "record", "-e", "cpu-clock", "-F", "4999", "-o", data] +
                                   (["--call-graph", "dwarf"] if a.call_graph else []) + ["-p", str(fe.proc.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        m = Meter({"frontend": fe.proc.pid})
        res = run_load(fe.url, a.streams, a.tokens, requests=a.streams * 2, rate=2000)
        cpu = m.stop()
        rec.send_signal(2)
        rec.wait(60)
        check(res, "profile load")
        print(f"{res['tokens']} tokens, {res['chunks']} chunks, {res['requests']} requests; frontend "
              f"{cpu['frontend']:.2f} s = {cpu['frontend'] / res['chunks'] * 1e6:.2f} us per chunk")
        if a.allocs:
            subprocess.run([perf, "probe", "-q", "--del", "probe_libc:*"], capture_output=True)
            with open(data + ".stat") as f:
                counts = {ln.split(",")[2]: int(ln.split(",")[0]) for ln in f
                          if ln.count(",") > 2 and ln.split(",")[0].isdigit()}
            total = sum(counts.values())
            print(", ".join(f"{k.split(':')[1]} {v}" for k, v in counts.items())
                  + f": {total / res['chunks']:.3f} allocations per chunk, {total / res['requests']:.1f} per request "
                  "(the load and the 0.5 s before it)")
            return 0
        rep = subprocess.run([perf, "report", "-i", data, "--no-children", "--sort", "dso,symbol", "--stdio",
                              "--percent-limit", str(a.percent_limit)], capture_output=True, text=True)
        lines = [ln for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
        print("\n".join(lines[:a.top]))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cost")
    p.add_argument("--streams", type=int, default=400)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--anchors", default="nginx,haproxy")
    p.add_argument("--compare-bin", help="also run a frontend of this baton binary (before/after figures)")
    p = sub.add_parser("latency")
    p.add_argument("--concurrency", default="1,100,1000")
    p.add_argument("--tokens", type=int, default=30)
    p.add_argument("--speedup", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=2, help="requests per stream")
    p.add_argument("--interleave", type=int, default=2,
                   help="runs of each path per level, taking turns; percentiles pool them (more: steadier)")
    p.add_argument("--min-requests", type=int, default=40)
    p.add_argument("--anchor", default="nginx", help="also measure this proxy in front of the frontend ('' = none)")
    p.add_argument("--pin", help="BATON_CPU:CLIENT_CPU, e.g. 0:1: pin baton (and the anchor) and the clients")
    p.add_argument("--threads", type=int, default=1,
                   help="also measure a frontend with this many event loops (--threads)")
    p.add_argument("--frontends", type=int, default=1,
                   help="also measure the load spread over this many frontend processes (one event loop each)")
    p.add_argument("--compare-bin", help="also measure a frontend of this baton binary (before/after in one run)")
    p.add_argument("--jetstream", action="store_true",
                   help="also measure a frontend whose stream journal is shared through NATS JetStream "
                        "(a nats-server -js started here)")
    p.add_argument("--relay-frontend-bytes", action="store_true",
                   help="latency: also measure the minimal relay writing the frontend's bytes per event (baton-relay "
                        "--frontend-bytes: SSE id line, the chunk's id/object/created/model, usage null)")
    p.add_argument("--no-relay", dest="relay", action="store_false",
                   help="do not measure the minimal relay (bench/relay.c), the floor under the frontend")
    p = sub.add_parser("burst")
    p.add_argument("--concurrency", default="100,1000")
    p.add_argument("--repeats", type=int, default=5, help="bursts per path and level")
    p.add_argument("--tokens", type=int, default=10)
    p.add_argument("--speedup", type=float, default=0.2)
    p.add_argument("--paths", default="direct,relay,frontend")
    p.add_argument("--threads", type=int, default=1, help="also measure a frontend with this many event loops")
    p.add_argument("--pause", type=float, default=0.3, help="seconds between two bursts")
    p.add_argument("--batched-tokens", type=int, default=0,
                   help="the worker's --max-num-batched-tokens (0: its default)")
    p.add_argument("--batch-gather-us", type=int, default=0,
                   help="the worker's --batch-gather-us (0: off, its default)")
    p.add_argument("--compare-bin", help="also measure a frontend of this baton binary (before/after in one run)")
    p.add_argument("--arrival", action="store_true",
                   help="time each first token by its arrival at the client's socket, not by the client's read")
    p = sub.add_parser("scale")
    p.add_argument("--streams", default="10000", help="concurrent streams; a comma-separated list is a curve")
    p.add_argument("--repeat", type=int, default=1, help="runs of the load per level, in the same cluster")
    p.add_argument("--idle", type=float, default=5.0, help="seconds idle after each run before RSS is read")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--speedup", type=float, default=0.02)
    p.add_argument("--blocks", type=int, default=65536)
    p.add_argument("--rate", type=int, default=2000)
    p = sub.add_parser("ceiling")
    p.add_argument("--threads", default="1", help="comma-separated --threads values of the frontends to compare")
    p.add_argument("--configs", default="100000:200:20000,10:2000:300",
                   help="speedup:streams:max_tokens, comma-separated")
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("profile")
    p.add_argument("--streams", type=int, default=400)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--percent-limit", type=float, default=0.5)
    p.add_argument("--call-graph", action="store_true")
    p.add_argument("--output", help="keep perf.data here")
    p.add_argument("--allocs", action="store_true", help="count the frontend's allocations (uprobes) instead")
    a = ap.parse_args()
    try:
        return {"cost": cmd_cost, "latency": cmd_latency, "burst": cmd_burst, "scale": cmd_scale, "ceiling": cmd_ceiling,
                "profile": cmd_profile}[a.cmd](a)
    finally:
        stop_everything()


if __name__ == "__main__":
    sys.exit(main())
