"""A KV state far larger than a connection's unsent-bytes cap is relayed paced, and other streams
on the target worker's connection never wait behind it.

The mocker exports 2 MiB of state per token (four times a 7B-class model's 512 KiB), so a stream moved
after ~130 tokens carries a state of more than 260 MiB: over the 48 MiB the frontend used to
relay at most (it wrote a state to the next worker at once, below the connection's 64 MiB cap).

1. A stream on worker A is given back at a 0 s drain bound (SIGTERM): its state goes to the
   frontend and on to worker B. B imports it (imports +1, imported tokens = the state's, no
   fallback) and the stream equals its fault-free reference byte for byte.
2. While the state is being written to B (between the frontend's "relaying" and "written" log
   lines), a short request and a request then cancelled by its client go to B too (A is draining):
   the short one's first token, and the cancelled one's first token and its KILL reaching B, all
   come before the state's relay ends. Written at once, the state would be ahead of their REQUEST
   and KILL frames on the connection.
3. B prefilled exactly those two prompts, nothing for the moved stream.
4. The frontend's resident memory grows by less than the state plus 96 MiB during the relay: it
   holds the state once, not a copy per hop (not checked in a sanitizer build, whose allocator
   keeps freed memory).
5. An operator stop (POST /v1/requests/{id}/cancel) of a stream whose state is being relayed: the
   STOP waits for the REQUEST it belongs to (written before it, the worker would not know the
   stream and ignore it), so the stream ends promptly with finish_reason "cancelled", an exact
   prefix of its reference, instead of running to its length.
"""

import re
import signal
import sys
import threading
import time

import batonlib as bl
import faultlib as fl

MODEL = "mock-model"
BPT = 2 << 20
TRIGGER = 130
SHORT_PROMPT = "A short question while a large state is moving"


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_fast(proc, pattern, timeout=60):
    """Like Proc.wait_log, polling every 2 ms: the relays measured here last a few hundred ms."""
    rx, end = re.compile(pattern), time.monotonic() + timeout
    while time.monotonic() < end:
        m = rx.search(proc.log_text())
        if m:
            return m
        time.sleep(0.002)
    raise AssertionError(f"{proc.name} log did not match {pattern!r} within {timeout} s\n{proc.log_tail()}")


def long_body():
    return bl.completion_body("Tell me a very long story about a large state", max_tokens=400, model=MODEL,
                              return_token_ids=True, stream_options={"include_usage": True})


def worker(c):
    return c.start_worker(system_port=True, wait=True, graceful_shutdown_timeout=0, mocker_kv_bytes_per_token=BPT)


def main():
    with bl.deadline(120, "test_kv_large"):
        with bl.Cluster() as c:
            fe = c.start_frontend(stream_stall_timeout=60)
            a = worker(c)
            c.wait_workers(fe, 1)
            ref = bl.stream_completion(fe.url, long_body(), timeout=60, headers={"X-Request-Id": "ref"})
            ref.assert_ok("reference")

            # the long stream starts on A (alone), B joins, then A is told to stop at TRIGGER tokens
            got = {}
            reached = threading.Event()

            def on_event(st, obj):
                if len(st.token_ids) >= TRIGGER:
                    reached.set()

            t = threading.Thread(target=lambda: got.update(s=bl.stream_completion(
                fe.url, long_body(), timeout=90, on_event=on_event, headers={"X-Request-Id": "big"})))
            t.start()
            b = worker(c)
            c.wait_workers(fe, 2)
            assert reached.wait(60), "the long stream never reached its trigger"
            before = fl.kv_counters(b)
            rss0 = rss_bytes(fe.proc.pid)
            a.proc.kill(signal.SIGTERM)

            # watch the relay: its start and end in the frontend's log, the frontend's memory
            m = wait_fast(fe.proc, r"request big: relaying a KV state of (\d+) bytes to worker")
            size = int(m.group(1))
            t_relay = time.monotonic()
            assert size > 200 << 20, f"a state of {size} bytes: not larger than 200 MiB"
            side = {}

            def short():
                side["short"] = bl.stream_completion(fe.url, bl.completion_body(SHORT_PROMPT, max_tokens=5, model=MODEL,
                                                     stream_options={"include_usage": True}), timeout=60)

            def cancelled():
                side["cancel"] = bl.stream_completion(fe.url, bl.completion_body(SHORT_PROMPT, max_tokens=300,
                                                      model=MODEL), timeout=60, abort_after=1,
                                                      headers={"X-Request-Id": "kvl-cancel"})

            side_threads = [threading.Thread(target=short), threading.Thread(target=cancelled)]
            for x in side_threads:
                x.start()
            rss_max, t_written, t_killed = rss0, None, None
            written_rx = re.compile(r"request big: KV state of \d+ bytes written to worker")
            killed_rx = re.compile(r"request kvl-cancel killed")
            while time.monotonic() - t_relay < 60 and (t_written is None or t_killed is None):
                rss_max = max(rss_max, rss_bytes(fe.proc.pid))
                now = time.monotonic()
                if t_written is None and written_rx.search(fe.proc.log_text()):
                    t_written = now
                if t_killed is None and killed_rx.search(b.proc.log_text()):
                    t_killed = now
                time.sleep(0.005)
            for x in side_threads:
                x.join(60)
            t.join(90)
            assert t_written is not None, "the state's relay never ended\n" + fe.proc.log_tail()
            assert t_killed is not None, "the cancelled request was never killed on B\n" + b.proc.log_tail()
            s, sh, cn = got["s"], side["short"], side["cancel"]
            fl.assert_exact([ref], [s], "large")
            assert "request big migrated" in fe.proc.log_text(), "the long stream did not move"
            sh.assert_ok("short request")
            assert cn.aborted and cn.t_first is not None, cn.summary()
            relay_s = t_written - t_relay
            print(f"state {size / 2**20:.0f} MiB relayed to B in ~{relay_s:.2f} s; short request's first token "
                  f"{sh.t_first - t_relay:+.3f} s, cancelled one's first token {cn.t_first - t_relay:+.3f} s, its "
                  f"kill seen on B {t_killed - t_relay:+.3f} s after the relay began; frontend RSS "
                  f"{rss0 / 2**20:.0f} -> max {rss_max / 2**20:.0f} MiB")
            assert sh.t_first < t_written, "the short request's first token came after the state's relay ended"
            assert cn.t_first < t_written, "the cancelled request's first token came after the state's relay ended"
            assert t_killed < t_written, "the KILL reached B only after the state's relay ended"

            after = fl.kv_counters(b)
            assert after["imports"] - before["imports"] == 1, (before, after)
            assert sum(after["fallbacks"].values()) == sum(before["fallbacks"].values()), (before, after)
            prompt = sh.usage["prompt_tokens"]
            assert after["prefill"] - before["prefill"] == 2 * prompt, \
                f"B prefilled {after['prefill'] - before['prefill']} tokens, expected the two side prompts' {2 * prompt}"
            # (not under AddressSanitizer: its allocator's quarantine keeps freed memory resident)
            assert bl.sanitized_build() or rss_max - rss0 < size + (96 << 20), \
                f"frontend RSS grew by {(rss_max - rss0) / 2**20:.0f} MiB relaying a {size / 2**20:.0f} MiB state"

            # 5. a stop while the state is being relayed
            c2 = worker(c)
            c.wait_workers(fe, 2)
            got, reached = {}, threading.Event()

            def on_event2(st, obj):  # later than TRIGGER: a larger state, a longer relay to stop in
                if len(st.token_ids) >= 2 * TRIGGER:
                    reached.set()
            t = threading.Thread(target=lambda: got.update(s=bl.stream_completion(
                fe.url, long_body(), timeout=90, on_event=on_event2, headers={"X-Request-Id": "big2"})))
            t.start()
            assert reached.wait(60), "the second long stream never reached its trigger"
            src = next(w for w in (b, c2)
                       if bl.metric_sum(bl.metrics(w.system_url), "dynamo_component_inflight_requests") > 0)
            src.proc.kill(signal.SIGTERM)
            wait_fast(fe.proc, r"request big2: relaying a KV state of \d+ bytes to worker")
            st, _, body = bl.request("POST", fe.url + "/v1/requests/big2/cancel", body={"mode": "stop"})
            assert st == 200, (st, body)
            t.join(90)
            s2 = got["s"]
            log = fe.proc.log_text()
            i_stop, i_written = log.find("request big2: stopped by the operator"), log.find("request big2: KV state of")
            assert 0 <= i_stop < i_written, \
                f"the stop (log offset {i_stop}) did not come during the relay (ended at {i_written}): not tested"
            assert s2.done and s2.finish_reason == "cancelled", s2.summary()
            assert s2.token_ids == ref.token_ids[:len(s2.token_ids)] and len(s2.token_ids) < len(ref.token_ids), \
                s2.summary()
            print(f"stopped during the relay: ended 'cancelled' after {len(s2.token_ids)} tokens, an exact prefix")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
