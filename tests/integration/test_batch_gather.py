"""--batch-gather-us: the first step of an idle engine waits for the rest of a burst, on the real
processes (docs/engines.md, "Batch gathering").

The observable is the worker's own count of what its engine did (GET /metrics):
baton_worker_engine_steps_total (scheduler steps that computed something) and the gather's
counters (gathers, the sequences waiting when a gathered step began, the time it waited). With
max_tokens 1 a request is prefilled and answered in the step that admits it, so the number of steps
a burst took is the number of parts it was admitted in: exact, whatever the machine's speed. The
client also sees it: the first tokens of one step reach it together, those of two steps a step
(~250 ms at speedup 0.1) apart.

Every burst goes through the frontend, written in two parts 20 ms apart on connections opened
beforehand; the window is 100 ms (bound 800 ms), the mocker at speedup 0.1 (a step of ~250 ms).

  1. Flag off (today's behaviour): the burst takes at least two steps, its first tokens spread over
     more than half a step, no gather counted.
  2. Flag on: one step, one gather holding all 20 sequences, the first tokens within half a step.
  3. A lone request waits the window and no more than the bound: the gather counter says
     [window, bound], its TTFT grows over the flag-off one by at most the bound (+ slack).
  4. A trickle (a request every 30 ms for 1.2 s, longer than the bound): one gather, cut by the
     bound (longer than 2 windows, not longer than the bound + slack), not all of the trickle in it.
  5. A cancel during the gather: of two requests the one whose client went away is not in the step
     (gathered 1) and the other completes; a gather whose only request was cancelled ends without a
     step (no step, no gather counted, nothing waiting) and the next request is served.
  6. A drain (SIGTERM) during the gather: the request completes and the worker exits 0.
  7. The llama engine, if it is available: one gather of all 8 requests of a two-part burst, and
     every stream the same text as with the flag off (batching does not change its output); of two
     requests, the one cancelled during the gather is not in it.
  8. Validation: a negative, non-numeric or too large value (flag or BATON_BATCH_GATHER_US) is
     refused at start-up, exit 2, with a message naming the flag; so is an --engine-stuck-timeout
     not longer than the bound (the engine monitor would take a long gather for a stuck engine).
"""

import json
import os
import select
import signal
import socket
import subprocess
import time

import batonlib as bl

bl.deadline(300, "test_batch_gather")
BIN = bl.baton_bin()
WINDOW_US = 100_000
WINDOW = WINDOW_US / 1e6
BOUND = 8 * WINDOW
SPEEDUP = 0.1
HALF_STEP = 0.1  # a step that prefills and answers a few short prompts lasts ~250 ms at speedup 0.1
COUNTERS = {"steps": "baton_worker_engine_steps_total", "gathers": "baton_worker_engine_batch_gathers_total",
            "gathered": "baton_worker_engine_batch_gathered_sequences_total",
            "gather_s": "baton_worker_engine_batch_gather_seconds_total"}


def counters(w):
    m = bl.metrics(w.system_url)
    out = {k: bl.metric_sum(m, name) for k, name in COUNTERS.items()}
    out["waiting"] = bl.metric_sum(m, "baton_worker_waiting_requests")
    out["active"] = bl.metric_sum(m, "baton_worker_active_sequences")
    return out


def delta(after, before):
    return {k: after[k] - before[k] for k in COUNTERS}


class Client:
    def __init__(self, port, i, max_tokens):
        self.i = i
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        # greedy: the llama engine's streams are then the same whatever they are batched with
        body = json.dumps({"model": "mock-model", "prompt": f"burst {i}: once upon a time", "stream": True,
                           "temperature": 0, "max_tokens": max_tokens}).encode()
        self.req = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        self.data = b""
        self.t_sent = self.t_first = None
        self.done = self.closed = False

    def send(self):
        self.sock.setblocking(True)
        self.sock.sendall(self.req)
        self.sock.setblocking(False)
        self.t_sent = time.monotonic()

    def close(self):
        self.sock.close()
        self.closed = True

    def ttft(self):
        return self.t_first - self.t_sent

    def text(self):
        out = []
        for line in self.data.split(b"\n"):
            if line.startswith(b"data: {"):
                out.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(out)

    def check(self):
        head, _, body = self.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), f"request {self.i}: {self.data[:300]!r}"
        assert b"data: [DONE]" in body, f"request {self.i}: no [DONE]: {body[-300:]!r}"


def read_all(clients, timeout=30.0):
    """Reads every open client's response to its end; notes when its first data event arrived."""
    end = time.monotonic() + timeout
    live = {c.sock: c for c in clients if not c.closed}
    while live:
        left = end - time.monotonic()
        assert left > 0, f"responses unfinished: {[c.i for c in live.values()]}"
        ready, _, _ = select.select(list(live), [], [], left)
        now = time.monotonic()
        for s in ready:
            c = live[s]
            chunk = s.recv(65536)
            if chunk:
                c.data += chunk
                if c.t_first is None and b"data: {" in c.data:
                    c.t_first = now
            if not chunk or c.data.endswith(b"\r\n0\r\n\r\n"):
                c.done = True
                del live[s]
                s.close()
    for c in clients:
        if not c.closed:
            c.check()
            assert c.t_first is not None, f"request {c.i}: no data event"


def burst(fe, parts, pause=0.02, max_tokens=1, base=0):
    """Opens sum(parts) connections, then writes the requests part by part, `pause` s apart."""
    clients = [Client(fe.port, base + i, max_tokens) for i in range(sum(parts))]
    time.sleep(0.2)  # accepted and idle
    k = 0
    for j, n in enumerate(parts):
        if j:
            time.sleep(pause)
        for c in clients[k:k + n]:
            c.send()
        k += n
    return clients


def spread(clients):
    t = [c.t_first for c in clients if not c.closed]
    return max(t) - min(t)


def stack(c, gather_us, **flags):
    fe = c.start_frontend()
    if gather_us:
        flags["batch_gather_us"] = gather_us
    w = c.start_worker(system_port=True, wait=True, **flags)
    c.wait_workers(fe, 1)
    warm = burst(fe, [1], max_tokens=1, base=900)
    read_all(warm)
    return fe, w


def settle(w):
    """Waits until the engine holds nothing (the counters are read between bursts)."""
    bl.wait_for(lambda: (lambda m: m["waiting"] == 0 and m["active"] == 0)(counters(w)), 10,
                what="the engine idle")


def main():
    # --- 1. flag off
    with bl.Cluster() as c:
        fe, w = stack(c, 0, speedup_ratio=SPEEDUP)
        before = counters(w)
        cl = burst(fe, [10, 10])
        read_all(cl)
        d = delta(counters(w), before)
        print(f"flag off: burst of 10 + 10 (20 ms apart): {d['steps']:.0f} steps, first tokens spread "
              f"{spread(cl) * 1000:.0f} ms, gathers {d['gathers']:.0f}")
        assert d["steps"] >= 2, f"flag off: the two parts took {d['steps']} step(s), expected at least 2: {d}"
        assert spread(cl) > HALF_STEP, f"flag off: first tokens within {spread(cl):.3f} s"
        assert d["gathers"] == 0 and d["gather_s"] == 0, d
        settle(w)
        lone = burst(fe, [1], base=100)
        read_all(lone)
        ttft_off = lone[0].ttft()

    # --- 2.-6. flag on
    with bl.Cluster() as c:
        fe, w = stack(c, WINDOW_US, speedup_ratio=SPEEDUP)
        settle(w)
        before = counters(w)
        cl = burst(fe, [10, 10])
        read_all(cl)
        d = delta(counters(w), before)
        print(f"flag on ({WINDOW_US} us): burst of 10 + 10: {d['steps']:.0f} step(s), {d['gathers']:.0f} gather of "
              f"{d['gathered']:.0f} sequences after {d['gather_s'] * 1000:.1f} ms, first tokens spread "
              f"{spread(cl) * 1000:.0f} ms")
        assert d["steps"] == 1, f"flag on: the burst took {d['steps']} steps, expected 1: {d}"
        assert d["gathers"] == 1 and d["gathered"] == 20, d
        assert spread(cl) < HALF_STEP, f"flag on: first tokens spread over {spread(cl):.3f} s"

        # 3. a lone request
        settle(w)
        before = counters(w)
        lone = burst(fe, [1], base=200)
        read_all(lone)
        d = delta(counters(w), before)
        ttft_on = lone[0].ttft()
        print(f"lone request: gather {d['gather_s'] * 1000:.1f} ms, TTFT {ttft_on * 1000:.0f} ms "
              f"(flag off {ttft_off * 1000:.0f} ms)")
        assert d["gathers"] == 1 and d["gathered"] == 1 and d["steps"] == 1, d
        assert WINDOW <= d["gather_s"] <= BOUND, d
        assert ttft_on >= WINDOW, f"TTFT {ttft_on:.3f} s is shorter than the window"
        assert ttft_on - ttft_off <= BOUND + 0.5, f"TTFT grew by {ttft_on - ttft_off:.3f} s"

        # 4. a trickle longer than the bound
        settle(w)
        before = counters(w)
        n = int(1.2 / 0.03)
        cl = burst(fe, [1] * n, pause=0.03, max_tokens=20, base=300)
        read_all(cl, timeout=60)
        d = delta(counters(w), before)
        print(f"trickle of {n} requests 30 ms apart: {d['gathers']:.0f} gather of {d['gathered']:.0f} sequences "
              f"after {d['gather_s'] * 1000:.1f} ms (bound {BOUND * 1000:.0f} ms)")
        assert d["gathers"] == 1, d
        assert 2 * WINDOW < d["gather_s"] <= BOUND + 0.15, d
        assert 2 <= d["gathered"] < n, d

        # 5. cancels during the gather
        settle(w)
        before = counters(w)
        cl = burst(fe, [2])
        time.sleep(0.02)
        cl[0].close()
        read_all(cl)
        d = delta(counters(w), before)
        print(f"one of two cancelled during the gather: gathered {d['gathered']:.0f}, steps {d['steps']:.0f}")
        assert d["gathers"] == 1 and d["gathered"] == 1 and d["steps"] == 1, d
        settle(w)
        before = counters(w)
        cl = burst(fe, [1], base=400)
        time.sleep(0.02)
        cl[0].close()
        settle(w)
        time.sleep(BOUND)
        d = delta(counters(w), before)
        assert d["steps"] == 0 and d["gathers"] == 0, f"a cancelled lone request made a step: {d}"
        cl = burst(fe, [1], base=401)
        read_all(cl)
        d = delta(counters(w), before)
        assert d["gathers"] == 1 and d["gathered"] == 1 and d["steps"] == 1, d
        assert d["gather_s"] <= BOUND, d
        print(f"the only request cancelled during the gather: no step, nothing waiting; the next served "
              f"(gather {d['gather_s'] * 1000:.1f} ms)")

        # 6. a drain during the gather
        settle(w)
        cl = burst(fe, [1], max_tokens=3, base=500)
        time.sleep(0.02)
        t0 = time.monotonic()
        w.proc.kill(signal.SIGTERM)
        read_all(cl)
        rc = w.proc.wait(15)
        print(f"SIGTERM during the gather: the request completed, the worker exited {rc} after "
              f"{time.monotonic() - t0:.2f} s")
        assert rc == 0, w.proc.log_tail()

    # --- 7. the llama engine
    if os.environ.get("BATON_NO_LLAMA") == "1":
        print("llama engine: skipped (BATON_NO_LLAMA=1)")
    else:
        texts = {}
        for gather in (0, WINDOW_US):
            with bl.Cluster() as c:
                fe = c.start_frontend()
                flags = {"batch_gather_us": gather} if gather else {}
                w = c.start_worker(system_port=True, wait=True, engine="llama", **flags)
                c.wait_workers(fe, 1, timeout=60)
                before = counters(w)
                cl = burst(fe, [4, 4], max_tokens=8)
                read_all(cl, timeout=60)
                d = delta(counters(w), before)
                texts[gather] = [x.text() for x in cl]
                print(f"llama, flag {gather} us: {d['gathers']:.0f} gather(s) of {d['gathered']:.0f} sequences "
                      f"after {d['gather_s'] * 1000:.1f} ms, {d['steps']:.0f} steps")
                if gather:
                    assert d["gathers"] == 1 and d["gathered"] == 8 and WINDOW <= d["gather_s"] <= BOUND, d
                    # a cancel during the gather: the engine thread leaves that one out of the step
                    settle(w)
                    before = counters(w)
                    cl = burst(fe, [2], max_tokens=4, base=600)
                    time.sleep(0.02)
                    cl[0].close()
                    read_all(cl, timeout=60)
                    d = delta(counters(w), before)
                    print(f"llama: one of two cancelled during the gather: gathered {d['gathered']:.0f}")
                    assert d["gathers"] == 1 and d["gathered"] == 1, d
                else:
                    assert d["gathers"] == 0, d
        assert texts[0] == texts[WINDOW_US] and all(texts[0]), texts

    # --- 8. validation
    for args, env in ((["--batch-gather-us", "-1"], {}), (["--batch-gather-us", "abc"], {}),
                      (["--batch-gather-us", "1000001"], {}), ([], {"BATON_BATCH_GATHER_US": "5ms"})):
        p = subprocess.run([BIN, "worker", "--system-port", "-1"] + args, env={**os.environ, **env},
                           capture_output=True, text=True, timeout=10)
        assert p.returncode == 2, (args, env, p.returncode, p.stderr)
        assert "invalid value" in p.stderr and "--batch-gather-us" in p.stderr, p.stderr
    # the engine monitor must outlast the longest gather (8 x 500 ms = 4 s)
    p = subprocess.run([BIN, "worker", "--system-port", "-1", "--batch-gather-us", "500000", "--engine-stuck-timeout",
                        "3"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "--engine-stuck-timeout 3s is not longer than the longest batch gather" in p.stderr, \
        (p.returncode, p.stderr)
    print("invalid values: exit 2 naming --batch-gather-us; an engine monitor shorter than the bound refused")
    print("test_batch_gather: ok")


if __name__ == "__main__":
    main()
