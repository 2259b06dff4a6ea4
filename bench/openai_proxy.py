#!/usr/bin/env python3
"""What the `openai` engine adds: one request through baton → openai worker → upstream, against the
same request sent to the upstream directly, side by side in one run.

The upstream is a baton stack (frontend + mocker worker at --speedup-ratio 1000, so the engine's
own time is a few microseconds a token); the proxy stack is a frontend with one worker running
`--engine openai --upstream <upstream frontend>`. Requests alternate direct / proxied, one at a
time, so both see the same machine. Per request: time to the first token (streamed chat) and the
whole-response time (non-streamed chat); reported as p50 / p90 / p99 in milliseconds, with the
difference of the medians as the proxy's cost.

usage: BATON_BIN=build/baton python3 bench/openai_proxy.py [--requests 300] [--tokens 16]
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import batonlib as bl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perf import pct  # noqa: E402


def row(name, xs):
    return f"| {name} | {pct(xs, 50):.2f} | {pct(xs, 90):.2f} | {pct(xs, 99):.2f} |"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=16)
    a = ap.parse_args()
    bl.deadline(600, "openai_proxy bench")
    up = bl.Cluster(tmpdir_path=bl.tmpdir("baton-bench-oa-up-"))
    px = bl.Cluster(tmpdir_path=bl.tmpdir("baton-bench-oa-px-"))
    try:
        u = up.start_frontend()
        up.start_worker(speedup_ratio=1000)
        up.wait_workers(u, 1)
        f = px.start_frontend()
        px.start_worker(engine="openai", upstream=u.url)
        px.wait_workers(f, 1)
        res = {k: [] for k in ("ttft_direct", "ttft_proxy", "unary_direct", "unary_proxy")}
        for i in range(a.requests + 10):
            body = bl.chat_body(f"bench request {i}", max_tokens=a.tokens, seed=i)
            for name, url in (("direct", u.url), ("proxy", f.url)):
                s = bl.stream_chat(url, body)
                if not s.ok:
                    raise SystemExit(f"{name} stream failed: {s.summary()}")
                t0 = time.monotonic()
                st, _, j = bl.post_json(url + "/v1/chat/completions", body)
                t1 = time.monotonic()
                if st != 200:
                    raise SystemExit(f"{name} request failed: {st} {j}")
                if i >= 10:  # warm-up excluded
                    res[f"ttft_{name}"].append((s.t_first - s.t_start) * 1000)
                    res[f"unary_{name}"].append((t1 - t0) * 1000)
        print(f"{a.requests} requests each way, {a.tokens} tokens, upstream mocker at speedup 1000\n")
        print("| ms | p50 | p90 | p99 |\n|---|---|---|---|")
        for k in ("ttft_direct", "ttft_proxy", "unary_direct", "unary_proxy"):
            print(row(k.replace("_", " "), res[k]))
        print(f"\nadded by the proxy (difference of medians): time to first token "
              f"{statistics.median(res['ttft_proxy']) - statistics.median(res['ttft_direct']):.2f} ms, "
              f"whole response {statistics.median(res['unary_proxy']) - statistics.median(res['unary_direct']):.2f} ms")
    finally:
        px.close(check_sanitizers=False)
        up.close(check_sanitizers=False)


if __name__ == "__main__":
    main()
