"""--stream-token-timeout and the llama engine's prompt queue: a prompt that waits for the prompt
thread behind other prompts is kept waiting by the engine, not lost.

One llama worker runs with --fault-prompt-delay-ms 600: every prompt takes 0.6 s on the prompt
thread, as a long prompt's tokenization does on a large model (docs/engines.md §3.2). The frontend
runs at --stream-token-timeout 1.5. Six streaming completions arrive at once: one is tokenized, the
others queue behind it, the last for about 3 s before its own tokenization, twice the bound. The engine tells each prompt queued behind another that it waits (a WAITING frame,
`queued`), and the sweep does not judge a waiting stream while its worker visibly runs others
(each prompt, once tokenized, runs and streams its tokens):

  * the fault happened: the last stream's first token came later than the bound after its request;
  * every stream completes exactly as the same request run alone (text, token ids, finish reason);
  * nothing was given up (baton_frontend_stream_token_timeouts_total and the migration counters
    unchanged, no "no frame from worker" line), the worker was not quarantined, and a request
    right after succeeds;
  * the frontend counted the queued prompts' WAITING frames
    (baton_frontend_stream_waits_total{reason="queued"}: at least one per prompt queued behind
    another, N - 1).

Before, a prompt on the prompt queue got no WAITING: the worker announces BT_HELLO_WAITING, so
its silence was judged like a lost stream's, and the queued streams were given up after the bound
and migrated back to the model's only worker, where they queued again: 7 timeouts and migrations,
no WAITING counted (at --stream-token-timeout 1 with five streams, one client got the
exhausted-migration 503 after four).

Skipped when scripts/setup was told not to fetch llama.cpp (BATON_NO_LLAMA=1)."""

import os
import threading

import batonlib as bl

TIMEOUT = 1.5
DELAY_MS = 600
N = 6
MODEL = "mock-model"


def body(i):
    return bl.completion_body(f"Once upon a time, story {i}", max_tokens=16, temperature=0, stream=True,
                              return_token_ids=True)


def counters(fe):
    m = bl.metrics(fe.url)
    return {"timeouts": bl.metric_sum(m, "baton_frontend_stream_token_timeouts_total", model=MODEL),
            "migrations": bl.metric_sum(m, "dynamo_frontend_model_migration_total"),
            "queued_waits": bl.metric_sum(m, "baton_frontend_stream_waits_total", model=MODEL, reason="queued")}


def outcome(s):
    return (s.text, list(s.token_ids), s.finish_reason)


def main():
    if os.environ.get("BATON_NO_LLAMA") == "1":
        print("BATON_NO_LLAMA=1: the llama engine was not fetched; skipped")
        raise SystemExit(77)
    bl.deadline(180, "test_stream_token_timeout_prompt_queue_llama")
    with bl.Cluster() as c:
        fe = c.start_frontend(stream_token_timeout=TIMEOUT)
        w = c.start_worker(engine="llama", system_port=True, wait=True, fault_prompt_delay_ms=DELAY_MS)
        c.wait_workers(fe, 1)
        # each request alone: its prompt queues behind nothing
        refs = [bl.stream_completion(fe.url, body(i), timeout=60).assert_ok(f"reference {i}") for i in range(N)]
        before = counters(fe)

        streams = [None] * N

        def run(i):
            streams[i] = bl.stream_completion(fe.url, body(i), timeout=60, headers={"X-Request-Id": f"pq-{i}"})

        threads = [threading.Thread(target=run, args=(i,)) for i in range(N)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "a stream did not end"

        firsts = sorted(s.t_first - s.t_start for s in streams if s.t_first is not None)
        print("first token after (s): " + ", ".join(f"{x:.2f}" for x in firsts))
        for i, s in enumerate(streams):
            s.assert_ok(f"stream {i}")
        assert firsts[-1] > TIMEOUT, f"no prompt waited longer than the bound ({firsts}): nothing to judge"
        for i, s in enumerate(streams):
            assert outcome(s) == outcome(refs[i]), f"stream {i} differs from the same request run alone"
        d = {k: counters(fe)[k] - before[k] for k in before}
        print(f"counters moved: {d}")
        log = fe.proc.log_text()
        lost = [ln for ln in log.splitlines() if "no frame from worker" in ln or "quarantined" in ln]
        assert d["timeouts"] == 0 and d["migrations"] == 0 and not lost, (d, lost)
        assert d["queued_waits"] >= N - 1, f"WAITING frames counted for queued prompts: {d['queued_waits']}"
        st, _, b = bl.post_json(fe.url + "/v1/completions", bl.completion_body("after", max_tokens=4), timeout=30)
        assert st == 200, (st, b)
        assert w.proc.popen.poll() is None, "the worker exited"
    print("ok")


if __name__ == "__main__":
    main()
