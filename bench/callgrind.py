#!/usr/bin/env python3
"""Instructions per streamed chunk: the frontend and the minimal relay under callgrind, same load.

One mocker worker; a `baton frontend` started under `valgrind --tool=callgrind`, and `baton-relay`
(bench/relay.c) under it too, both on that worker. For each: a warm-up load (one request per
stream: connections, pools), then `callgrind_control --zero`, the measured load through
`baton-sse-load` (--streams streams, --requests requests of --tokens tokens), then
`callgrind_control --dump`: the dump holds only the measured load, start-up excluded. It prints
the instructions per chunk (and per request) of each process, by library, and the functions
that cost the most per chunk, inclusive.

The load is small because valgrind is slow (~50x): 100 streams at speedup 0.05 (a token every
~0.15 s per stream) keep the frontend under callgrind up with the engine; the counts are of
instructions, which the shared machine does not blur.

With --cache-sim, valgrind also simulates the caches (its first-level data cache and its last
level, sized from the host's cpuid, or --ll-bytes: a core's own L2, say, where the host's last
level is a large shared L3) and the report adds, per chunk, the data reads and writes that
missed each level, by library and by function (self): where the memory a chunk touches is cold.

usage: BATON_BIN=build/baton python3 bench/callgrind.py [--out DIR] [--streams 100] [--requests 400]
       [--tokens 30] [--speedup 0.05] [--paths frontend,relay] [--top 40] [--cache-sim [--ll-bytes N]]
       [--frontend-flags '--access-log /tmp/access.log']
       python3 bench/callgrind.py --report DIR    (the report of an earlier run's dumps again)
Needs valgrind (callgrind_control, callgrind_annotate). Leaves the dumps in --out."""
import argparse
import collections
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402

VG = ["valgrind", "--tool=callgrind", "--compress-strings=no", "--compress-pos=no"]


def run_load(load, url, a, n):
    p = subprocess.run([load, "--url", url, "--streams", str(a.streams), "--max-tokens", str(a.tokens), "--rate", "500",
                        "--timeout", "900", "--requests", str(n)], capture_output=True, text=True, timeout=1200)
    r = json.loads(p.stdout)
    if p.returncode != 0 or r["ok"] != r["requests"]:
        raise SystemExit(f"load failed: {p.stdout[:400]} {p.stderr[:400]}")
    return r


def ctl(pid, arg):
    subprocess.run(["callgrind_control", arg, str(pid)], capture_output=True, text=True, timeout=300)


def annotate(path, inclusive, event="Ir"):
    out = subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", f"--show={event}", f"--sort={event}",
                          f"--inclusive={'yes' if inclusive else 'no'}", path], capture_output=True, text=True).stdout
    total, fns = 0, {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$", line)
        if not m:
            continue
        ir, name = int(m.group(1).replace(",", "")), m.group(2)
        if "PROGRAM TOTALS" in name:
            total = ir
        elif not re.search(r"(:main |libc-start|below main|ld-linux|uv_run|bt_frontend_main)", name):
            fns[name] = ir
    return total, fns


def library(name):
    m = re.search(r"\[(.*)\]$", name)
    lib = os.path.basename(m.group(1)) if m else "?"
    if lib.startswith("libc.so"):
        if re.search(r"malloc|free|calloc|realloc|unlink_chunk|consolidate", name):
            return "libc malloc/free"
        if re.search(r"printf|_IO_|itoa", name):
            return "libc printf"
        if re.search(r"mem|str", name):
            return "libc mem*/str*"
        return "libc other"
    return lib.split(".so")[0]


def report(name, path, chunks, requests, top):
    total, self_ = annotate(path, False)
    _, incl = annotate(path, True)
    print(f"\n{name}: {total:,} instructions for {chunks} chunks of {requests} requests: "
          f"{total / chunks:,.0f} per chunk ({total / requests:,.0f} per request, its chunks included)")
    libs = collections.Counter()
    for fn, ir in self_.items():
        libs[library(fn)] += ir
    print("  by library (self), per chunk: " + ", ".join(f"{k} {v / chunks:,.0f}" for k, v in libs.most_common()))
    print("  functions, inclusive, per chunk (unnamed library internals left out):")
    named = {}
    for fn, ir in incl.items():
        short = re.sub(r"\s*\[.*\]$", "", fn).split("/")[-1]
        if not short.startswith("???:0x"):
            named[short] = max(ir, named.get(short, 0))  # an inlined copy is listed again, without its object
    for short, ir in sorted(named.items(), key=lambda x: -x[1])[:top]:
        print(f"  {ir / chunks:9.1f}  {short}")
    for label, events in (("first-level data cache", ("D1mr", "D1mw")), ("last-level cache", ("DLmr", "DLmw"))):
        fns = collections.Counter()
        for ev in events:
            for fn, n in annotate(path, False, ev)[1].items():
                fns[fn] += n
        if not fns:
            continue  # a dump without the cache simulation
        libs = collections.Counter()
        for fn, n in fns.items():
            libs[library(fn)] += n
        print(f"  data misses in the {label}, per chunk: {sum(fns.values()) / chunks:.2f}; by library: "
              + ", ".join(f"{k} {v / chunks:.2f}" for k, v in libs.most_common(8)))
        for fn, n in fns.most_common(top // 2):
            short = re.sub(r"\s*\[.*\]$", "", fn).split("/")[-1]
            print(f"  {n / chunks:9.3f}  {short}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for the callgrind dumps (default: a new temporary one)")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--tokens", type=int, default=30)
    p.add_argument("--speedup", type=float, default=0.05)
    p.add_argument("--paths", default="frontend,relay")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--frontend-flags", default="",
                   help="more flags for the frontend, as on its command line ('--access-log /tmp/a.log')")
    p.add_argument("--cache-sim", action="store_true", help="simulate the caches too: data misses per chunk")
    p.add_argument("--ll-bytes", type=int, help="with --cache-sim: the simulated last level's size (16-way, 64 B lines)")
    p.add_argument("--report", metavar="DIR", help="only print the report of the dumps an earlier run left in DIR")
    a = p.parse_args()
    if a.report:
        for name, path, chunks, requests in json.load(open(os.path.join(a.report, "results.json"))):
            report(name, path, chunks, requests, a.top)
        return
    global VG
    if a.cache_sim:
        VG = VG + ["--cache-sim=yes"] + ([f"--LL={a.ll_bytes},16,64"] if a.ll_bytes else [])
    out = os.path.abspath(a.out or tempfile.mkdtemp(prefix="baton-callgrind-"))
    os.makedirs(out, exist_ok=True)
    real = os.path.abspath(bl.baton_bin())
    bindir = os.path.dirname(real)
    wrap = os.path.join(out, "baton-under-callgrind.sh")  # only `baton frontend` runs under valgrind
    with open(wrap, "w") as f:
        f.write(f'#!/bin/sh\nif [ "$1" = frontend ]; then exec {" ".join(VG)} '
                f'--callgrind-out-file={out}/frontend.%p.cg {real} "$@"; fi\nexec {real} "$@"\n')
    os.chmod(wrap, 0o755)
    load = os.path.join(bindir, "baton-sse-load")
    results = []
    with bl.Cluster(bin=wrap) as c:
        words = shlex.split(a.frontend_flags)
        if any(not w.startswith("--") for w in words[::2]) or len(words) % 2:
            raise SystemExit("--frontend-flags: give '--flag value' pairs")
        more = {k[2:].replace("-", "_"): v for k, v in zip(words[::2], words[1::2])}
        fe = c.start_frontend(timeout=120, max_connections=30000, max_concurrent_requests=100000,
                              http_idle_timeout_ms=600000, **more)
        w = c.start_worker(speedup_ratio=a.speedup, max_num_seqs=20000)
        c.wait_workers(fe, 1, timeout=120)
        for name in a.paths.split(","):
            if name == "frontend":
                pid, url = fe.proc.pid, fe.url  # the wrapper execs valgrind: the same pid
            else:
                port = bl.free_port()
                log = os.path.join(out, "relay.log")
                rp = bl.Proc(VG + [f"--callgrind-out-file={out}/relay.%p.cg", os.path.join(bindir, "baton-relay"),
                                   "--listen", str(port), "--worker", f"127.0.0.1:{w.rpc_port}"], name="relay", log=log)
                bl.wait_for(lambda: "connected to the worker" in open(log).read(), 120, what="the relay's worker connection")
                pid, url = rp.pid, f"http://127.0.0.1:{port}"
            run_load(load, url, a, a.streams)  # warm-up
            ctl(pid, "--zero")
            r = run_load(load, url, a, a.requests)
            ctl(pid, f"--dump={name}")
            dumps = sorted(x for x in os.listdir(out) if x.startswith(f"{name}.{pid}.cg."))
            results.append((name, os.path.join(out, dumps[-1]), r["chunks"], r["requests"]))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)
    for name, path, chunks, requests in results:
        report(name, path, chunks, requests, a.top)
    print(f"\n(dumps in {out})")


if __name__ == "__main__":
    main()
