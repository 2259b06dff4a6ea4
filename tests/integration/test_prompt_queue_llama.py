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
- the three others complete normally.

Skipped when scripts/setup was told not to fetch llama.cpp (BATON_NO_LLAMA=1).
"""

import json
import os
import re
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


def main():
    if os.environ.get("BATON_NO_LLAMA") == "1":
        print("BATON_NO_LLAMA=1: the llama engine was not fetched; skipped")
        raise SystemExit(77)
    bl.deadline(120, "test_prompt_queue_llama")
    with bl.Cluster() as c:
        fe = c.start_frontend()
        w = c.start_worker(engine="llama", system_port=True, wait=True, fault_prompt_delay_ms=DELAY_MS,
                           env={"DYN_LOG": "debug"})
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

    print("ok")


if __name__ == "__main__":
    main()
