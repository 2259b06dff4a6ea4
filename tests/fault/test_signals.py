"""Signals other than SIGTERM/SIGINT, through the real binaries (docs/operations.md, "Signals").

SIGHUP (what a closed terminal sends) had its default action: the process died at once, a running
stream was cut without an error or [DONE], and `baton run` left its temporary directory behind.
SIGUSR1 and SIGUSR2 killed a server the same way. Now:

1. A frontend given SIGHUP mid-stream shuts down as on SIGTERM (test_shutdown.py): /live answers
   503 at once, a request inside the accept window is served, one after it gets the 503
   `shutting_down` error, the running streams end whole (byte-identical to a reference, [DONE]),
   and the frontend exits 0 saying why.
2. A worker given SIGHUP mid-stream drains as on SIGTERM: the stream ends whole, the worker exits 0.
3. SIGUSR1 and SIGUSR2 to a frontend and to a worker (without --fault-signals) are logged and
   ignored: both keep serving.
4. A frontend started with SIGHUP ignored (nohup) keeps ignoring it.
5. `baton run` given SIGHUP (to its pid alone, then to its whole process group as a terminal's
   hang-up does) stops its children gracefully: the running stream ends whole, it exits 0 as on
   SIGTERM, every child is gone and its temporary directory is removed. Under nohup it keeps
   serving, its children too.
"""

import os
import re
import signal
import threading
import time

import batonlib as bl

bl.deadline(150, "test_signals")

# the processes inherit this process's dispositions: a SIGHUP ignored here (a test run under nohup)
# would be kept ignored by them, which part 4 checks on purpose
signal.signal(signal.SIGHUP, signal.SIG_DFL)

HUP_LINE = "SIGHUP: shutting down as for SIGTERM"


def body(key, max_tokens):
    return bl.chat_body(f"signals {key}", max_tokens=max_tokens, return_token_ids=True)


def reference(fe, key, max_tokens):
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(key, max_tokens), timeout=60)
    assert st == 200, b
    return b["choices"][0]["token_ids"], b["choices"][0]["message"]["content"]


def check_whole(s, ref, what):
    assert s.ok, f"{what}: the stream did not end whole: {s.summary()}"
    assert (s.token_ids, s.text) == ref, f"{what}: the stream differs from its reference"


class Background:
    """One stream in a thread; `started` is set at its first token."""

    def __init__(self, fe, key, max_tokens):
        self.started, self.result = threading.Event(), None
        self.thread = threading.Thread(target=self.run, args=(fe, key, max_tokens))
        self.thread.start()

    def run(self, fe, key, max_tokens):
        self.result = bl.stream_chat(fe.url, body(key, max_tokens), timeout=60,
                                     on_event=lambda st, obj: self.started.set() if st.t_tokens else None)
        self.started.set()

    def join(self):
        self.thread.join(60)
        assert self.result is not None, "the stream did not end"
        return self.result


def serves(fe, key):
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(key, 5), timeout=20)
    return st == 200 and b["choices"][0]["finish_reason"] is not None


# ---- 1. frontend: SIGHUP mid-stream drains as SIGTERM does ---------------------------------------
WINDOW = 1.0
with bl.Cluster() as c:
    fe = c.start_frontend(shutdown_accept_window_ms=int(WINDOW * 1000), shutdown_drain_timeout=30)
    c.start_worker(speedup_ratio=0.3)
    c.wait_workers(fe, 1)
    ref = reference(fe, "fe", 150)  # ~3 s at this speed: it outlives the accept window
    late_ref = reference(fe, "late", 5)
    bg = Background(fe, "fe", 150)
    assert bg.started.wait(30), "the stream did not start"
    t0 = time.monotonic()
    fe.proc.kill(signal.SIGHUP)
    bl.wait_for(lambda: bl.get_json(fe.url + "/live", timeout=5)[0] == 503, 1.0, interval=0.01,
                what="/live to answer 503 after SIGHUP")
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body("late", 5), timeout=20)
    assert time.monotonic() - t0 < WINDOW - 0.2, "the in-window request came too late to prove anything"
    assert st == 200 and b["choices"][0]["token_ids"] == late_ref[0], (st, b)
    time.sleep(max(0.0, t0 + WINDOW + 0.3 - time.monotonic()))
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body("too late", 5), timeout=20)
    assert st == 503 and b["error"]["code"] == "shutting_down", (st, b)
    assert fe.proc.alive(), "the frontend exited with a stream running"
    rc = fe.proc.wait(30)
    s = bg.join()
    assert rc == 0, f"frontend exit code {rc} after SIGHUP; log:\n{fe.proc.log_tail(30)}"
    check_whole(s, ref, "frontend SIGHUP")
    fe.proc.wait_log(re.escape(HUP_LINE))
    fe.proc.wait_log(r"HTTP server shutdown requested \(SIGHUP\)")
    print(f"frontend: SIGHUP mid-stream drained; the stream ended whole, exit 0 after {time.monotonic() - t0:.2f}s")

# ---- 2. worker: SIGHUP mid-stream drains as SIGTERM does -----------------------------------------
with bl.Cluster() as c:
    fe = c.start_frontend(shutdown_accept_window_ms=0)
    w = c.start_worker(speedup_ratio=0.3)
    c.wait_workers(fe, 1)
    ref = reference(fe, "worker", 80)
    bg = Background(fe, "worker", 80)
    assert bg.started.wait(30), "the stream did not start"
    w.proc.kill(signal.SIGHUP)
    rc = w.proc.wait(30)
    s = bg.join()
    assert rc == 0, f"worker exit code {rc} after SIGHUP; log:\n{w.proc.log_tail(30)}"
    check_whole(s, ref, "worker SIGHUP")
    w.proc.wait_log(re.escape(HUP_LINE))
    w.proc.wait_log(r"SIGHUP received")
    print("worker: SIGHUP mid-stream drained; the stream ended whole, exit 0")

# ---- 3. SIGUSR1 / SIGUSR2 are ignored by the frontend and the worker -----------------------------
with bl.Cluster() as c:
    fe = c.start_frontend()
    w = c.start_worker(system_port=True, wait=True)
    c.wait_workers(fe, 1)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        for p in (fe.proc, w.proc):
            p.kill(sig)
            p.wait_log(rf"{sig.name} received: ignored")
    time.sleep(0.2)
    assert fe.proc.alive() and w.proc.alive(), (fe.proc.returncode, w.proc.returncode)
    assert serves(fe, "after usr"), "a request after SIGUSR1/SIGUSR2 failed"
    st, _, live = bl.get_json(fe.url + "/live", timeout=5)
    assert st == 200, (st, live)
    assert bl.get_json(w.system_url + "/health", timeout=5)[0] == 200, "the worker is no longer healthy"
    # a flood is logged a line a second, and one during the shutdown does not kill the process
    # (its handles closed, libuv would put back the default action): a clean exit, status 0
    time.sleep(1.1)
    lines_before = fe.proc.log_text().count("SIGUSR1 received")
    for _ in range(200):
        fe.proc.kill(signal.SIGUSR1)
        time.sleep(0.001)
    time.sleep(0.3)
    flood_lines = fe.proc.log_text().count("SIGUSR1 received") - lines_before
    assert 1 <= flood_lines <= 2, f"200 SIGUSR1 in 0.2 s logged {flood_lines} lines"
    # two event loops and streams to drain: the shutdown closes handles on both loops
    fe2 = c.start_frontend(threads=2)
    c.wait_workers(fe2, 1)
    refs = [reference(fe2, f"flood {i}", 60) for i in range(4)]
    bgs = [Background(fe2, f"flood {i}", 60) for i in range(4)]
    for b in bgs:
        assert b.started.wait(20), "a stream did not start"
    fe2.proc.kill(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while fe2.proc.alive() and time.monotonic() < deadline:
        fe2.proc.kill(signal.SIGUSR1)
        time.sleep(0.0005)
    rc = fe2.proc.wait(timeout=20)
    for i, b in enumerate(bgs):
        check_whole(b.join(), refs[i], f"stream {i} through the flooded shutdown")
    assert rc == 0, f"the frontend stopping under a SIGUSR1 flood exited {rc}"
    print("frontend and worker: SIGUSR1 and SIGUSR2 logged and ignored; both still serve; a flood is "
          f"{flood_lines} line(s), and one through the shutdown leaves exit 0")

# ---- 4. a SIGHUP ignored at start (nohup) stays ignored ------------------------------------------
with bl.Cluster() as c:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        fe = c.start_frontend()
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    c.start_worker()
    c.wait_workers(fe, 1)
    fe.proc.wait_log(r"SIGHUP is ignored, as it was when the process started")
    fe.proc.kill(signal.SIGHUP)
    time.sleep(0.3)
    assert fe.proc.alive() and serves(fe, "nohup"), "a frontend started under nohup stopped on SIGHUP"
    assert bl.get_json(fe.url + "/live", timeout=5)[0] == 200, "a frontend started under nohup began a shutdown"
    print("frontend under nohup: SIGHUP stays ignored")


# ---- 5. baton run ----------------------------------------------------------------------------------
def run_dir(fe):
    m = re.search(r"\(discovery in (\S+)\)", fe.proc.log_text())
    assert m, fe.proc.log_text()
    assert os.path.isdir(m.group(1)), m.group(1)
    return m.group(1)


for to_group in (False, True):
    what = "its process group" if to_group else "its pid"
    with bl.Cluster() as c:
        fe = c.start_run(workers=1)
        c.wait_workers(fe, 1)
        kids = bl.children(fe.proc.pid)
        assert len(kids) == 2, f"expected a frontend and a worker, found {kids}"
        tmp = run_dir(fe)
        ref = reference(fe, "run", 200)
        bg = Background(fe, "run", 200)
        assert bg.started.wait(30), "the stream did not start"
        if to_group:
            os.killpg(fe.proc.pid, signal.SIGHUP)
        else:
            fe.proc.kill(signal.SIGHUP)
        rc = fe.proc.wait(30)
        s = bg.join()
        log = fe.proc.log_text()
        assert rc == 0, f"baton run exited with {rc} after SIGHUP to {what}; log:\n{log[-3000:]}"
        check_whole(s, ref, f"baton run, SIGHUP to {what}")
        assert HUP_LINE in log and "SIGHUP received: stopping the frontend and 1 worker" in log, log[-3000:]
        assert "exited unexpectedly" not in log, log[-3000:]
        for p in kids:
            assert bl.gone(p), f"child {p} still running after SIGHUP to {what}"
        assert not os.path.exists(tmp), f"{tmp} left behind after SIGHUP to {what}"
    print(f"run: SIGHUP to {what} mid-stream: the stream ended whole, exit 0, children gone, {tmp} removed")

with bl.Cluster() as c:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        fe = c.start_run(workers=1)
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    c.wait_workers(fe, 1)
    kids = sorted(bl.children(fe.proc.pid))
    os.killpg(fe.proc.pid, signal.SIGHUP)
    time.sleep(0.5)
    assert fe.proc.alive() and serves(fe, "run nohup"), "baton run under nohup stopped on SIGHUP"
    assert sorted(bl.children(fe.proc.pid)) == kids and not [p for p in kids if bl.gone(p)], \
        f"a child of baton run under nohup stopped on SIGHUP; log:\n{fe.proc.log_tail(30)}"
    assert "SIGHUP:" not in fe.proc.log_text(), fe.proc.log_tail(30)
    print("run under nohup: the group's SIGHUP is ignored by the launcher and its children")
print("test_signals: ok")
