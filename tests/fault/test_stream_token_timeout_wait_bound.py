"""--stream-token-timeout bounds the wait of a stream its worker reported WAITING (docs/fault-tolerance.md,
"Silent streams"), and the only worker that can continue a timed-out stream is not ejected by that
timeout's own latency sample.

Fake workers (tests/lib/fakeworker.py) answer with the mocker's own answer to the same request (the
reference, taken first through a frontend with a real mocker worker), token by token, so every
answer can be compared byte for byte. The frontends run at --stream-token-timeout 1.

  1. A worker that announces BT_HELLO_WAITING streams one request slowly for 5 times the bound (its
     engine visibly runs) and answers another with WAITING (queued), then a LOAD showing nothing
     waiting, then nothing: the wait is over at that LOAD, and the stream is given up about the
     bound after it (KILL) and completes exactly on a second worker, while the slow one completes
     untouched. Before, the WAITING exempted the stream for good: its client gave up.
  2. A worker that announces the flag answers one request with 5 tokens and another with WAITING,
     then sends nothing at all while its LOAD shows a sequence waiting and none running:
     both streams are given up about the bound after its last token and complete exactly on a
     second worker. Before, the waiting one was never judged.
  2b. A worker that announces the flag answers with WAITING and then sends this frontend no token
     for 4 times the bound while its LOAD reports, every 0.3 s, sequences running (another
     frontend's): the stream is not judged, then completes exactly there. A rule that counted only
     the tokens this frontend sees cut it.
  3. Two workers of different exactness fingerprints, --outlier-factor 100 --outlier-min-samples 1:
     the stream's worker sends 5 tokens, then nothing. The other cannot continue the stream, so the
     continuation goes back to it; the timeout is not sampled, so the worker is not ejected and the
     client gets one exact stream. Before, that sample ejected it and the request failed at once
     with budget left ("no worker can continue this stream exactly").
  4. Two mocker workers, one of them hanging after 5 tokens (--fault-stall-after-tokens 5,
     --max-num-seqs 1, its engine monitor off) with a second stream queued behind the first: every
     request, the queued one and the 6 sent after it one by one (each routed to the hung worker in
     turn), completes exactly within the bound plus a margin. Before, the queued stream waited for
     good (the worker had told its wait)."""

import json
import os
import time

import batonlib as bl
import fakeworker as fk

bl.deadline(240, "test_stream_token_timeout_wait_bound")

TIMEOUT = 1.0
MARGIN = 2.5
K = 5
MODEL = "mock-model"


def body():
    b = bl.chat_body("Waits that end and engines that hang", max_tokens=30, return_token_ids=True,
                     seed=7, temperature=0.7)
    b["stream"] = True
    b["stream_options"] = {"include_usage": True}
    return b


def timeouts(fe):
    return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_stream_token_timeouts_total", model=MODEL)


def stream(fe, rid, timeout=20):
    return fk.stream_async(fe, body(), rid, timeout)


def set_exactness(fw, fp):
    """Rewrites the fake worker's discovery record with an exactness fingerprint (atomically)."""
    with open(fw.path) as f:
        v = json.load(f)
    v["model"]["exactness"] = fp
    tmp = fw.path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(v, f)
    os.rename(tmp, fw.path)


with bl.Cluster() as c:
    c.start_worker(speedup_ratio=0.3)  # slow enough that the client sees one event per token
    fe_ref = c.start_frontend()
    c.wait_workers(fe_ref, 1)
    rp = fk.Replay(fe_ref, body(), K + 5)
    ref, events, answer = rp.outcome, rp.events, rp.answer

    def answers(fw, stream_id, raw):
        answer(fw.sender(), stream_id, json.loads(raw))

    def check_exact(s, what):
        s.assert_ok(what)
        assert bl.stream_outcome(s) == ref, f"{what}: {bl.stream_outcome(s)} != reference {ref}"

    fakes = []
    try:
        # --- 1. a LOAD after the WAITING shows nothing waiting: the wait is over
        d1 = bl.tmpdir("wb-idle")
        t_load = {}

        def on_a(fw, stream_id, raw):
            payload = json.loads(raw)
            if payload["request_id"] == "wb-busy":
                answer(fw.sender(), stream_id, payload, pace=5 * TIMEOUT / len(events))
            elif payload["request_id"] == "wb-lost":
                fw.send(fk.waiting(stream_id, fk.WAIT_QUEUED))
                time.sleep(0.3)  # a later LOAD: the sequence ran, or the worker lost it
                fw.send(fk.load(waiting=0, running=1))
                t_load["t"] = time.monotonic()

        fa = fk.FakeWorker(d1, on_a, hello_flags=fk.HELLO_WAITING, after_hello=fk.load(waiting=1, running=1))
        fakes.append(fa)
        fb = fk.FakeWorker(d1, answers, after_hello=fk.load(ready=False))  # routable only once told
        fakes.append(fb)
        fe1 = c.start_frontend(discovery_dir=d1, stream_token_timeout=TIMEOUT)
        c.wait_workers(fe1, 1)
        bl.wait_for(lambda: fb.handshaken() >= 1, 20, what="the frontend's handshake with the second worker")
        time.sleep(0.3)
        tb, bb = stream(fe1, "wb-busy")
        bl.wait_for(lambda: fa.request_of("wb-busy"), 10, what="wb-busy on the first worker")
        tl, blost = stream(fe1, "wb-lost")
        bl.wait_for(lambda: fa.request_of("wb-lost"), 10, what="wb-lost on the first worker")
        fb.send(fk.load())  # ready: the lost stream's continuation can go there
        tl.join(30)
        tb.join(30)
        lost, busy = blost["s"], bb["s"]
        check_exact(lost, "the stream lost after its WAITING")
        since = lost.t_first - t_load["t"]
        assert TIMEOUT * 0.8 <= since < TIMEOUT + MARGIN, f"the lost stream's first token {since:.2f} s after the LOAD"
        conn, sid, _ = fa.request_of("wb-lost")
        bl.wait_for(lambda: fa.control_for(conn, sid) == [fk.KILL], 10, what="the KILL for the lost stream")
        assert fb.request_of("wb-lost"), "the continuation did not go to the second worker"
        check_exact(busy, "the stream that ran all along")
        conn, sid, _ = fa.request_of("wb-busy")
        assert fa.control_for(conn, sid) == [], "the running stream was cut"
        assert busy.t_tokens[-1] - lost.t_first > TIMEOUT, "the worker was not busy when the lost stream was judged"
        assert timeouts(fe1) == 1
        print(f"WAITING, then a LOAD with nothing waiting on a busy worker: judged {since:.2f} s after the LOAD, "
              f"exact elsewhere")

        # --- 2. WAITING, then the whole worker falls silent (a hung engine)
        d2 = bl.tmpdir("wb-hung")
        t_last = {}

        def on_c(fw, stream_id, raw):
            payload = json.loads(raw)
            if payload["request_id"] == "wb-run":
                for ids, text in events[:K]:
                    fw.send(fk.tokens(stream_id, ids, text))
                t_last["t"] = time.monotonic()
            elif payload["request_id"] == "wb-queued":
                fw.send(fk.waiting(stream_id, fk.WAIT_QUEUED))

        # its load shows the queue and nothing running: an engine whose queue does not move
        fc = fk.FakeWorker(d2, on_c, hello_flags=fk.HELLO_WAITING, after_hello=fk.load(waiting=1, running=0))
        fakes.append(fc)
        fd = fk.FakeWorker(d2, answers, after_hello=fk.load(ready=False))
        fakes.append(fd)
        fe2 = c.start_frontend(discovery_dir=d2, stream_token_timeout=TIMEOUT)
        c.wait_workers(fe2, 1)
        bl.wait_for(lambda: fd.handshaken() >= 1, 20, what="the frontend's handshake with the second worker")
        time.sleep(0.3)
        tq, bq = stream(fe2, "wb-queued")
        bl.wait_for(lambda: fc.request_of("wb-queued"), 10, what="wb-queued on the hung worker")
        tr, br = stream(fe2, "wb-run")
        bl.wait_for(lambda: fc.request_of("wb-run"), 10, what="wb-run on the hung worker")
        fd.send(fk.load())
        tq.join(30)
        tr.join(30)
        for rid, box in (("wb-queued", bq), ("wb-run", br)):
            s = box["s"]
            check_exact(s, rid)
            conn, sid, _ = fc.request_of(rid)
            bl.wait_for(lambda: fc.control_for(conn, sid) == [fk.KILL], 10, what=f"the KILL for {rid}")
            assert fd.request_of(rid), f"{rid}: the continuation did not go to the second worker"
        took = bq["s"].t_first - t_last["t"]
        assert TIMEOUT * 0.8 <= took < TIMEOUT + MARGIN, f"the waiting stream judged {took:.2f} s after the last token"
        assert timeouts(fe2) == 2
        print(f"WAITING, then no token from the worker at all: the waiting stream judged {took:.2f} s after its "
              f"worker's last token, exact elsewhere")

        # --- 2b. WAITING on a worker whose engine runs only another frontend's streams: this frontend
        # hears no token from it, but its load reports show sequences running; the wait is real
        d2b = bl.tmpdir("wb-other")
        state = {"sid": None}

        def on_o(fw, stream_id, raw):
            if json.loads(raw)["request_id"] == "wb-behind":
                fw.send(fk.waiting(stream_id, fk.WAIT_QUEUED))
                state["sid"], state["send"] = stream_id, fw.sender()

        fo = fk.FakeWorker(d2b, on_o, hello_flags=fk.HELLO_WAITING, after_hello=fk.load(waiting=1, running=1))
        fakes.append(fo)
        fe2b = c.start_frontend(discovery_dir=d2b, stream_token_timeout=TIMEOUT)
        c.wait_workers(fe2b, 1)
        tb, bb = stream(fe2b, "wb-behind", timeout=30)
        bl.wait_for(lambda: state["sid"] is not None, 10, what="wb-behind on the busy worker")
        t_end = time.monotonic() + 4 * TIMEOUT  # the other frontend's sequences run this long
        while time.monotonic() < t_end:
            fo.send(fk.load(waiting=1, running=1))  # as a worker reports while its engine runs
            time.sleep(0.3)
        answer(state["send"], state["sid"], {})
        tb.join(30)
        check_exact(bb["s"], "the stream queued behind another frontend's")
        conn, sid, _ = fo.request_of("wb-behind")
        assert fo.control_for(conn, sid) == [], "the queued stream was cut"
        assert timeouts(fe2b) == 0, timeouts(fe2b)
        print(f"WAITING behind sequences this frontend does not see: waited {4 * TIMEOUT:.0f} s while the "
              f"worker reported them running, not judged, exact")

        # --- 3. the only worker of its fingerprint is not ejected by the timeout's own sample
        d3 = bl.tmpdir("wb-eject")

        def on_w1(fw, stream_id, raw):
            payload = json.loads(raw)
            if payload["request_id"].startswith("wb-x") and not payload.get("carried"):
                for ids, text in events[:K]:  # then nothing
                    fw.send(fk.tokens(stream_id, ids, text))
                return
            answer(fw.sender(), stream_id, payload)

        w1 = fk.FakeWorker(d3, on_w1, hello_flags=fk.HELLO_WAITING)
        fakes.append(w1)
        w2 = fk.FakeWorker(d3, answers, hello_flags=fk.HELLO_WAITING)
        fakes.append(w2)
        set_exactness(w1, "fp-A")
        set_exactness(w2, "fp-B")
        fe3 = c.start_frontend(discovery_dir=d3, stream_token_timeout=TIMEOUT, outlier_factor=100,
                               outlier_min_samples=1)
        c.wait_workers(fe3, 2)
        # latency samples on both workers, tokens all at once: few, so that one silence of the bound
        # among them is far over 100 times the other worker's median (it ejected the worker before)
        for i in range(2):
            check_exact(bl.stream_chat(fe3.url, body(), timeout=20, headers={"X-Request-Id": f"wb-warm-{i}"}),
                        "warm-up")
        for i in range(6):
            rid = f"wb-x-{i}"
            s = bl.stream_chat(fe3.url, body(), timeout=20, headers={"X-Request-Id": rid})
            if w1.request_of(rid):
                break
            check_exact(s, rid)
        else:
            raise AssertionError("no request reached the first worker")
        check_exact(s, "the stream continued on the only worker of its fingerprint")
        gap = s.t_tokens[K] - s.t_tokens[K - 1]
        assert TIMEOUT * 0.9 <= gap < TIMEOUT + MARGIN, f"gap after token {K}: {gap:.2f} s"
        mine = [(n, sid, json.loads(p)) for n, t, sid, p in list(w1.frames)
                if t == fk.REQUEST and json.loads(p)["request_id"] == rid]
        assert len(mine) == 2 and mine[1][2]["carried"] == ref["token_ids"][:K], mine
        log = fe3.proc.log_text()
        assert "no other worker can take its continuation" in log, "the return to the worker was not logged"
        assert "ejected from routing" not in log, [ln for ln in log.splitlines() if "ejected" in ln]
        print(f"the only worker of its fingerprint lost a stream after {K} tokens: not ejected, continued on it exactly")

        # --- 4. a hung mocker (review: every other request hung until the client gave up)
        d4 = bl.tmpdir("wb-mocker")
        fe4 = c.start_frontend(discovery_dir=d4, stream_token_timeout=TIMEOUT)
        c.start_worker(discovery_dir=d4, fault_stall_after_tokens=K, max_num_seqs=1, speedup_ratio=0.1,
                       engine_stuck_timeout=0)
        c.wait_workers(fe4, 1)
        c.start_worker(discovery_dir=d4)
        c.wait_workers(fe4, 2)
        t0 = time.monotonic()
        burst = [stream(fe4, f"wb-burst-{i}", timeout=15) for i in range(4)]  # two on each worker
        for t, _ in burst:
            t.join(30)
        for i, (_, box) in enumerate(burst):
            check_exact(box["s"], f"burst request {i}")
            took = box["s"].t_done - t0
            assert took < 2 * TIMEOUT + 2 * MARGIN, f"burst request {i} took {took:.2f} s"
        after = []
        for i in range(6):
            t1 = time.monotonic()
            s = bl.stream_chat(fe4.url, body(), timeout=15, headers={"X-Request-Id": f"wb-next-{i}"})
            check_exact(s, f"request {i} after the hang")
            after.append(time.monotonic() - t1)
            assert after[-1] < TIMEOUT + MARGIN, f"request {i} after the hang took {after[-1]:.2f} s"
        assert timeouts(fe4) >= 3, timeouts(fe4)  # the running stream, the queued one, and later ones
        # the queued stream was told waiting: the case the bound is for
        assert bl.metric_sum(bl.metrics(fe4.url), "baton_frontend_stream_waits_total", model=MODEL,
                             reason="queued") >= 1
        print(f"a hung mocker worker: the burst of 4 and 6 requests after it all exact, the slowest after it "
              f"{max(after):.2f} s; {timeouts(fe4):.0f} timeouts")

        for f in (fe_ref, fe1, fe2, fe2b, fe3, fe4):
            assert f.proc.alive(), "a frontend died"
    finally:
        for f in fakes:
            f.close()

print("test_stream_token_timeout_wait_bound: OK")
