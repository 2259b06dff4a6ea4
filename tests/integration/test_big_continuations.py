"""A migration storm of large continuations onto a worker that reads slowly keeps within the
request-plane memory bound (docs/load-shedding.md, "The request-plane backlog"):

- a frontend and worker C; 22 streams run on C, each request carrying 3.9 MB in its body (a field
  the engine ignores: a continuation sends the client's body whole, whatever it holds). C is slow
  (a token every ~0.6 s): the burst's 86 MB take the client and the frontend a few seconds to
  upload and parse (tens of seconds on a loaded machine or under a sanitizer), and a stream that
  ended on C before the last one started would never migrate. The kill waits until every stream
  runs on C and has tokens, and the migration counters show that all 22 moved;
- worker A joins and is paused (SIGSTOP, well within --stream-stall-timeout: a host that stops
  reading for a while), then C is killed: the 22 streams migrate to A, about 86 MB of REQUEST
  frames for one connection whose cap is 64 MiB (67 MB);
- the frontend once sent every continuation at once: past the cap it closed A's connection ("bytes
  unsent ... past the cap"), and every stream ended with "no worker left to continue the request";
- now a continuation passes the busy mark (8 MiB) but not BT_RPC_BACKLOG_CONTINUATION (32 MiB):
  the rest wait in the frontend ("its continuation waits for one to drain") and go once A, resumed,
  takes what it was sent. Every stream completes with exactly the tokens it produces alone, and A
  stays connected.
"""

import os
import signal
import threading
import time

import batonlib as bl

STREAMS = 22
PAD = "x" * (3900 * 1000)
MAX_TOKENS = 300
# The mocker's decode step is ~5.7 ms at speedup 1: at 0.01 a stream on C takes ~170 s for its
# MAX_TOKENS, longer than BURST_S and the survivor's start together, so none ends before the kill
# however slowly the burst arrives; on the survivor (speedup 8) the rest takes well under a second.
SLOW_SPEEDUP = 0.01
BURST_S = 90  # bound on the burst reaching C and each stream's first token


def body(i):
    return bl.completion_body(f"Story number {i}:", max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                              stream=True, return_token_ids=True, padding=PAD)


def main():
    bl.deadline(200, "test_big_continuations")
    with bl.Cluster() as c:
        # the queue takes the initial burst, whose bodies fill C's link past the busy mark too
        fe = c.start_frontend(stream_stall_timeout=20, queue_max_requests=100)
        c.start_worker(speedup_ratio=SLOW_SPEEDUP)
        c.wait_workers(fe, 1)

        streams = [None] * STREAMS

        def run(i):
            streams[i] = bl.stream_completion(fe.url, body(i), timeout=150)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        victim = c.workers[0]

        def all_on_c():
            m = bl.metrics(fe.url)
            # each stream runs on C (not in the admission queue) and has streamed tokens: its
            # continuation carries them
            return (bl.metric_sum(m, "baton_frontend_worker_inflight") >= STREAMS
                    and bl.metric_sum(m, "dynamo_frontend_time_to_first_token_seconds_count") >= STREAMS)

        t0 = time.monotonic()
        bl.wait_for(all_on_c, BURST_S, what=f"{STREAMS} streams on worker C, each with its first token")
        print(f"{STREAMS} streams on C with tokens after {time.monotonic() - t0:.1f} s")
        survivor = c.start_worker(speedup_ratio=8)
        c.wait_workers(fe, 2)
        os.kill(survivor.proc.pid, signal.SIGSTOP)
        try:
            victim.proc.kill(signal.SIGKILL)
            time.sleep(4)
        finally:
            os.kill(survivor.proc.pid, signal.SIGCONT)
        for t in threads:
            t.join(160)

        log = fe.proc.log_text()
        for i, s in enumerate(streams):
            assert s is not None, f"stream {i} did not return"
            s.assert_ok(f"stream {i} across the migration")
            assert s.finish_reason == "length" and len(s.token_ids) == MAX_TOKENS, s.summary()
        assert "past the cap" not in log and "not reading" not in log, "the frontend dropped the worker"
        assert "its continuation waits for one to drain" in log, "no continuation waited for link room"
        # the waiting continuations are retried when a link drains or a worker comes or goes, a
        # few at a time, and one every 100 ms otherwise: not each of them every 5 ms (some 14,000
        # dispatches while A is stopped)
        retries = bl.metric_sum(bl.metrics(fe.url), "baton_frontend_link_wait_retries_total")
        print(f"{retries:.0f} dispatches of waiting continuations")
        assert retries < 1000, f"{retries:.0f} dispatches of waiting continuations"
        assert len(c.wait_workers(fe, 1)) == 1
        m = bl.metrics(fe.url)
        moved = bl.metric_sum(m, "dynamo_frontend_model_migration_total", migration_type="ongoing_request")
        assert moved == STREAMS, f"{moved:.0f} streams migrated with tokens, not {STREAMS}"
        assert bl.metric_sum(m, "dynamo_frontend_model_migration_total", migration_type="new_request") == 0

        # the same streams alone on the survivor: the same tokens
        for i in (0, STREAMS - 1):
            alone = bl.stream_completion(fe.url, body(i), timeout=60)
            alone.assert_ok(f"stream {i} alone")
            assert alone.token_ids == streams[i].token_ids, f"stream {i} differs from its run alone"
    print("ok")


if __name__ == "__main__":
    main()
