"""The frontend gives memory back once idle: 2,000 concurrent streams grow its heap by several MiB
(connections, requests, bodies, SSE and token buffers); a few seconds after the last one ends its
RSS must be back near where it was before the burst, not held by the allocator for the next one
(it stayed at 56 MiB after 10,000 streams, against 9 MiB before, until the frontend trimmed its heap
when idle). Twice, so that the trim happens once per idle period, not once per process; every
request of both bursts must complete (baton-sse-load checks [DONE] after the usage chunk).
The stream journal is off here (--stream-retention 0): by design it keeps every ended stream for
its retention window (docs/fault-tolerance.md, Resumable streams), which is memory held on purpose,
bounded by --stream-retention-bytes; this test is about everything else the frontend allocates.
Then once more with two event loops (--threads 2): each loop keeps the memory of its ended
connections and requests for the next ones and must free it itself once idle.
"""

import json
import os
import subprocess
import time

import batonlib as bl

if bl.sanitized_build():
    print("AddressSanitizer build: its allocator ignores malloc_trim and holds freed memory in a quarantine; "
          "skipped")
    raise SystemExit(77)

STREAMS = 2000


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def burst(fe, d, n, tokens, tag):
    """n concurrent streams; returns the frontend's peak RSS while they ran (KiB)."""
    exe = os.path.join(os.path.dirname(bl.baton_bin()), "baton-sse-load")
    ready = os.path.join(d, f"ready-{tag}")
    p = subprocess.Popen([exe, "--url", fe.url, "--streams", str(n), "--requests", str(n), "--max-tokens",
                          str(tokens), "--rate", "4000", "--timeout", "120", "--ready-file", ready],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    try:
        while p.poll() is None:
            peak = max(peak, rss_kib(fe.proc.pid))
            time.sleep(0.05)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    res = json.loads(out)
    assert p.returncode == 0 and res["ok"] == n and not res["failed"], f"{tag}: {res['errors']} {err[-500:]}"
    assert os.path.exists(ready), f"{tag}: the {n} streams never ran at the same time"
    return peak


def scenario(threads, rounds):
    with bl.Cluster() as c:
        flags = {"threads": threads} if threads > 1 else {}
        fe = c.start_frontend(env={"DYN_LOG": "debug"}, max_connections=5000, max_concurrent_requests=5000,
                              stream_retention=0, **flags)
        # slow enough that the first streams are still running when the last ones start (the
        # frontend sends each request to its worker at once)
        c.start_worker(speedup_ratio=0.5, max_num_seqs=STREAMS + 100)
        c.wait_workers(fe, 1)
        burst(fe, c.dir, 10, 5, "warm-up")
        time.sleep(3)  # the warm-up's own trim, if any
        base = rss_kib(fe.proc.pid)
        trims0 = fe.proc.log_text().count("idle: malloc_trim released memory")
        for rnd in range(1, rounds + 1):
            tag = f"--threads {threads}, burst {rnd}"
            peak = burst(fe, c.dir, STREAMS, 40, tag)
            grown = peak - base
            assert grown > 4096, f"{tag}: the heap grew by only {grown} KiB (the test measures nothing)"
            limit = base + grown // 4
            t0 = time.monotonic()
            bl.wait_for(lambda: rss_kib(fe.proc.pid) <= limit, 10, 0.1,
                        f"{tag}: RSS back under {limit} KiB (before {base}, peak {peak}, now "
                        f"{rss_kib(fe.proc.pid)} KiB)")
            trims = fe.proc.log_text().count("idle: malloc_trim released memory") - trims0
            print(f"{tag}: RSS {base} KiB before, {peak} KiB peak, {rss_kib(fe.proc.pid)} KiB "
                  f"{time.monotonic() - t0:.1f} s after; {trims} trims")
            if threads == 1:
                assert trims == rnd, f"{trims} trims after {rnd} idle periods"
            else:  # shard 0 trims; another shard too when it freed the connections and requests it kept
                assert rnd <= trims <= rnd * threads, f"{trims} trims after {rnd} idle periods"


def main():
    bl.deadline(300, "test_idle_memory")
    scenario(1, 2)
    # Each event loop keeps the memory of its ended connections and requests for reuse
    # (src/common/pool.c) and frees it itself when idle; with two loops the second one's must come
    # back too, not only shard 0's.
    scenario(2, 1)
    print("test_idle_memory: ok")


if __name__ == "__main__":
    main()
