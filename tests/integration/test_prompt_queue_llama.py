"""Prompts queued for the llama engine's prompt thread (docs/engines.md, "The prompt thread"):
they count in the load the worker reports, and a cancelled one leaves the queue at once.

The worker runs with --fault-prompt-delay-ms 3000: each prompt takes 3 s more on the prompt
thread, as a long prompt's tokenization does on a large model (the bundled stories260K's context
bounds its prompts to a few milliseconds of llama_tokenize). Four streaming completions are sent
one after the other, so that one is being tokenized and three wait behind it:

- the worker's waiting count (baton_worker_waiting_requests, the load its LOAD frames and event
  plane reports carry, which the frontend routes by) shows all four. Before, a worker with
  prompts queued reported nothing waiting: it looked idle;
- the client of the last one disconnects. The engine drops that sequence within a second (its
  worker log line is timed on the monotonic clock the test reads), while the prompts ahead of it
  are still being tokenized, and the waiting count drops by one. Before, the kill waited behind
  every prompt ahead of it and behind its own tokenization: about 10 s here;
- the three others complete normally;
- the worker is stopped (SIGTERM, drain bound 0) while a fifth prompt is being tokenized. The
  stream is handed back (with its KV state, --kv-handoff): that hand-off does not wait for the
  tokenization either (nothing to export: the worker is drained in 0.2 s, 2.5 s before). Its
  engine's destroy then does not wait for the tokenization on the loop: the worker closes down (its
  log's `draining -> gone`, written once the event loop has closed its connections and planes)
  right after `closing`, and the process exits 0 once the tokenization is over;
- the same with a second worker handing streams back without KV state (--kv-handoff false), whose
  drain does not wait for the engine: before, its loop was blocked in destroy until the
  tokenization was over (about 2.5 s between the two lines).

Skipped when scripts/setup was told not to fetch llama.cpp (BATON_NO_LLAMA=1).
"""

import datetime
import json
import os
import re
import signal
import socket
import threading
import time

import batonlib as bl

DELAY_MS = 3000
N = 4
RID = "prompt-queue-cancel-1"
DROP_RX = re.compile(r"request " + re.escape(RID) + r": llama engine (?:dropped the sequence before its prompt "
                     r"reached the engine thread|freed the sequence's KV cells) \(t=(\d+) us\)")


def now_us():
    return time.monotonic_ns() / 1000.0  # CLOCK_MONOTONIC, the clock of the worker's t= values


def waiting(w):
    return bl.worker_metric(w, "baton_worker_waiting_requests")


def log_time(w, pattern):
    m = w.proc.wait_log(r"(?m)^(\S+Z) .*" + pattern, timeout=30)
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%fZ")


def stop_during_tokenization(w, fe):
    """SIGTERM while a prompt is on the prompt thread: the drain, the destroy and the loop's closing
    do not wait for the tokenization; the process exits 0 once it is over."""
    late = threading.Thread(target=bl.stream_completion, args=(fe.url, bl.completion_body("Once more", max_tokens=8)),
                            kwargs={"timeout": 30})
    late.start()
    bl.wait_for(lambda: waiting(w) == 1, DELAY_MS / 1000.0 * 0.5, interval=0.02, what="a prompt queued")
    t_term = time.monotonic()
    os.kill(w.proc.pid, signal.SIGTERM)
    m = w.proc.wait_log(r"drained in ([\d.]+) ms; closing", timeout=30)
    drained = float(m.group(1)) / 1000.0
    closing = log_time(w, r"drained in [\d.]+ ms; closing")
    gone = log_time(w, r"draining -> gone")
    gap = (gone - closing).total_seconds()
    print(f"drained in {drained * 1000:.0f} ms, closing -> gone in {gap * 1000:.0f} ms, while the prompt thread "
          f"was tokenizing")
    assert drained < 1.0, f"the drain waited {drained:.2f}s for the prompt thread"
    assert gap < 1.0, f"the worker's loop waited {gap:.2f}s for the prompt thread at destroy"
    w.proc.popen.wait(30)
    print(f"the worker exited {w.proc.popen.returncode} {time.monotonic() - t_term:.2f}s after SIGTERM")
    assert w.proc.popen.returncode == 0
    late.join(30)


def main():
    if os.environ.get("BATON_NO_LLAMA") == "1":
        print("BATON_NO_LLAMA=1: the llama engine was not fetched; skipped")
        raise SystemExit(77)
    bl.deadline(120, "test_prompt_queue_llama")
    with bl.Cluster() as c:
        fe = c.start_frontend()
        w = c.start_worker(engine="llama", system_port=True, wait=True, fault_prompt_delay_ms=DELAY_MS,
                           graceful_shutdown_timeout=0, env={"DYN_LOG": "debug"})
        c.wait_workers(fe, 1)

        streams = [None] * (N - 1)

        def run_stream(i):
            body = bl.completion_body(f"Once upon a time, story {i}", max_tokens=8, temperature=0, stream=True)
            streams[i] = bl.stream_completion(fe.url, body, timeout=60)

        t_first = time.monotonic()
        threads = []
        for i in range(N - 1):  # in order: stream 0's prompt is tokenized first
            t = threading.Thread(target=run_stream, args=(i,))
            t.start()
            threads.append(t)
            time.sleep(0.15)
        data = json.dumps(bl.completion_body("Once upon a time, the last story", max_tokens=8, stream=True)).encode()
        sk = socket.create_connection(("127.0.0.1", fe.port), timeout=30)
        sk.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    f"X-Request-Id: {RID}\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data)

        # all four in the load while stream 0's prompt is still on the prompt thread
        seen = []
        while time.monotonic() < t_first + DELAY_MS / 1000.0 * 0.8:
            seen.append(waiting(w))
            if seen[-1] == N:
                break
            time.sleep(0.05)
        print(f"waiting sequences the worker reported while the prompts queued: {seen}")
        assert seen and seen[-1] == N, f"the worker's load did not count the {N} queued prompts: {seen}"

        t_close = now_us()
        sk.close()
        m = w.proc.wait_log(DROP_RX, timeout=30)
        dt = (int(m.group(1)) - t_close) / 1e6
        print(f"the engine dropped the cancelled sequence {dt * 1000:.0f} ms after its client disconnected")
        assert dt < 1.0, f"the cancelled prompt's end reached the engine {dt:.2f}s after the disconnect"
        # the three ahead of it are still queued or being tokenized: the count drops by one alone
        after = waiting(w)
        assert after == N - 1, f"waiting after the cancel: {after}, expected {N - 1}"
        assert time.monotonic() < t_first + DELAY_MS / 1000.0, "too late to tell: the first prompt was through"

        for t in threads:
            t.join(60)
        for i, s in enumerate(streams):
            s.assert_ok(f"stream {i}")
            assert s.text, f"stream {i} produced no text: {s.summary()}"
        assert waiting(w) == 0

        stop_during_tokenization(w, fe)
        # the same without KV hand-off: the drain hands the stream back with a kill
        w2 = c.start_worker(engine="llama", system_port=True, wait=True, fault_prompt_delay_ms=DELAY_MS,
                            graceful_shutdown_timeout=0, env={"DYN_LOG": "debug", "DYN_KV_HANDOFF": "false"})
        c.wait_workers(fe, 1)
        stop_during_tokenization(w2, fe)

    print("ok")


if __name__ == "__main__":
    main()
