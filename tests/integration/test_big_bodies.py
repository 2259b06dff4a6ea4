"""A burst of large but legal request bodies costs no healthy worker and no running stream
(docs/load-shedding.md, "Request-plane backlog"; docs/security.md, limits):

- a frontend, two mocker workers (context 4096 tokens), a few long streams running; then 48
  concurrent POSTs of a prompt of almost --max-body-bytes (4 MiB) each, far beyond the model's
  context. The workers are paused (SIGSTOP) for a few seconds while the bodies arrive, well within
  --stream-stall-timeout: a worker that reads slower than clients send (a busy core, a long GC-like
  pause of its host) is what lets the bytes pile up, and a test cannot count on loopback speeds;
- the frontend once queued every such body towards the workers at once, past the 64 MiB a
  request-plane connection may hold, declared both workers "not reading" and dropped them: every
  running stream ended with "no worker left to continue the request", the large requests got 503;
- now a connection with BT_RPC_BACKLOG_BUSY unsent bytes makes its worker busy for new requests:
  each large request is answered 400 context_length_exceeded by the worker it reached, or 503 with a
  Retry-After while every link is backlogged; the running streams complete with exactly the tokens
  they have alone, and both workers stay connected throughout.
"""

import os
import signal
import threading
import time

import batonlib as bl

STREAMS = 4
BIG = 48
PROMPT = "Once upon a time there was a girl. " * 110000  # 3.85 MB, under the 4 MiB body cap


def big_post(url, i):
    body = {"model": "mock-model", "prompt": PROMPT, "max_tokens": 4}
    return bl.post_json(url + "/v1/completions", body, timeout=120)


def stream_body(i):
    return bl.completion_body(f"Story number {i}:", max_tokens=400, temperature=0, stream=True, stream_options={"include_usage": True},
                              ignore_eos=True)


def main():
    bl.deadline(150, "test_big_bodies")
    with bl.Cluster() as c:
        fe = c.start_frontend(stream_stall_timeout=15)
        c.start_worker(speedup_ratio=2, context_length=4096)
        c.start_worker(speedup_ratio=2, context_length=4096)
        c.wait_workers(fe, 2)

        streams = [None] * STREAMS

        def run_stream(i):
            streams[i] = bl.stream_completion(fe.url, stream_body(i), timeout=120)

        threads = [threading.Thread(target=run_stream, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # every stream has started generating

        answered = []

        def post(i):
            r = big_post(fe.url, i)
            answered.append(i)
            return r

        t0 = time.monotonic()
        for w in c.workers:
            os.kill(w.proc.pid, signal.SIGSTOP)
        try:
            burst = {}
            bt = threading.Thread(target=lambda: burst.update(
                r=bl.run_concurrently(post, list(range(BIG)), max_workers=BIG, return_exceptions=True)))
            bt.start()
            # every body is in (those routed wait for the paused workers, the others are answered)
            end = time.monotonic() + 8
            while time.monotonic() < end and len(answered) < BIG - 8:
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            for w in c.workers:
                os.kill(w.proc.pid, signal.SIGCONT)
        bt.join(120)
        results = burst["r"]
        burst_s = time.monotonic() - t0
        for t in threads:
            t.join(150)

        codes = {}
        for r in results:
            assert not isinstance(r, BaseException), f"large request failed: {r!r}"
            status, headers, body = r
            codes[status] = codes.get(status, 0) + 1
            if status == 400:
                code = (body or {}).get("error", {}).get("code")
                assert code == "context_length_exceeded", f"400 with {body!r}"
            elif status == 503:
                assert "retry-after" in headers, f"503 without Retry-After: {headers!r} {body!r}"
                msg = str(body)
                assert "no worker" not in msg, f"a worker was lost: {body!r}"
            else:
                raise AssertionError(f"large request answered {status}: {body!r}")
        print(f"burst of {BIG} large bodies in {burst_s:.1f}s: {codes}")
        assert codes.get(400, 0) > 0, f"no large request reached a worker's context check: {codes}"

        for i, s in enumerate(streams):
            s.assert_ok(f"stream {i} during the burst")
            assert s.finish_reason == "length" and s.usage["completion_tokens"] == 400, s.summary()

        log = fe.proc.log_text()
        assert "not reading" not in log and "bytes unsent" not in log, "the frontend dropped a worker"
        health = c.wait_workers(fe, 2)
        assert len(health) == 2

        # the same streams alone: the tokens are the same (nothing was migrated or cut)
        alone = bl.run_concurrently(lambda i: bl.stream_completion(fe.url, stream_body(i), timeout=120),
                                    list(range(STREAMS)))
        for i, (s, a) in enumerate(zip(streams, alone)):
            a.assert_ok(f"stream {i} alone")
            assert s.text == a.text, f"stream {i} differs from its run alone"
    print("ok")


if __name__ == "__main__":
    main()
