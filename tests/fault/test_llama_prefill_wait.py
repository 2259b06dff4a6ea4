"""--stream-token-timeout and the llama engine's prefill budget: a running sequence that the steps
leave out while the sequences admitted before it prefill their prompts is waiting, not lost.

One llama worker (the bundled stories260K model) at --max-num-seqs 10 and --max-num-batched-tokens
26: a step prefills one chunk of 16 prompt tokens (26 less 10, src/engine/llama/llama.c step), so
prompts admitted together are prefilled one after the other, the first admitted first. Ten greedy
completions whose prompts are 600 token ids each arrive at once: all ten are admitted (running),
and the last one hears nothing until the nine before it are through their prompts, about two
seconds, while each prompt's own prefill takes 0.2 s.

1. Reference: the ten at once through a frontend without --stream-token-timeout.
2. The same ten through a frontend whose --stream-token-timeout is half the longest wait of the
   reference (at least 0.5 s): the last streams then wait twice the bound, however fast this
   build steps (a sanitized baton is slower in its own code, not in llama.cpp's), on the same
   worker:
   * the fault happened: some stream's first token came at least the bound after it was sent;
   * every stream equals its reference byte for byte (text, token ids, finish reason, usage);
   * nothing was given up: baton_frontend_stream_token_timeouts_total and the migration counter
     unchanged, no "no frame from worker" or quarantine line in the frontend's log;
   * the worker told the waits (WAITING frames, docs/protocol.md §4):
     baton_frontend_stream_waits_total{reason="queued"} at least 1, and at most one per stream
     (the engine tells a wait once, not once per step it leaves the sequence out: the prefills
     here take hundreds of steps);
   * the worker is still routable: a request right after succeeds.

Before the engine told these waits, the streams left out for more than the bound were given up:
five of ten timed out and migrated (measured), their worker quarantined; their continuations came
out exact, so only the counters showed it."""

import time

import batonlib as bl
import faultlib as fl

if fl.skip("llama") is not None:  # scripts/setup was told not to fetch llama.cpp
    raise SystemExit(77)

SLOW = fl.SLOW
bl.deadline(60 * SLOW, "test_llama_prefill_wait")

MODEL = "mock-model"
N, PROMPT, TOKENS = 10, 600, 16


def body(i):
    # token ids of the model's vocabulary (0..511), after BOS, different for every stream
    ids = [1] + [(37 * j + 11 * i) % 500 + 5 for j in range(PROMPT - 1)]
    return bl.completion_body(ids, max_tokens=TOKENS, model=MODEL, temperature=0, return_token_ids=True,
                              stream_options={"include_usage": True})


def counters(fe):
    m = bl.metrics(fe.url)
    return {"timeouts": bl.metric_sum(m, "baton_frontend_stream_token_timeouts_total"),
            "migrations": bl.metric_sum(m, "dynamo_frontend_model_migration_total"),
            "queued": bl.metric_sum(m, "baton_frontend_stream_waits_total", reason="queued"),
            "preempted": bl.metric_sum(m, "baton_frontend_stream_waits_total", reason="preempted")}


def burst(fe):
    t0 = time.monotonic()
    runs = fl.run_all(bl.stream_completion, fe.url, [body(i) for i in range(N)], timeout=30 * SLOW,
                      what="a prefill-bound stream")
    return runs, [s.t_first - t0 for s in runs]


with bl.Cluster() as c:
    fe0 = c.start_frontend()
    w = c.start_worker(engine="llama", system_port=True, wait=True, max_num_seqs=N, max_num_batched_tokens=N + 16)
    c.wait_workers(fe0, 1)

    refs, ref_ttft = burst(fe0)
    for s in refs:
        assert s.finish_reason == "length" and len(s.token_ids) == TOKENS, s.summary()
    print(f"reference first tokens after {[round(t, 2) for t in ref_ttft]} s", flush=True)
    TIMEOUT = round(max(0.5, max(ref_ttft) / 2), 2)
    fe = c.start_frontend(stream_token_timeout=TIMEOUT)
    c.wait_workers(fe, 1)

    before = counters(fe)
    runs, ttft = burst(fe)
    d = {k: counters(fe)[k] - before[k] for k in before}
    print(f"--stream-token-timeout {TIMEOUT}: first tokens after {[round(t, 2) for t in ttft]} s; {d}", flush=True)
    assert max(ttft) >= TIMEOUT, \
        f"no stream waited the bound ({max(ttft):.2f} s < {TIMEOUT} s): the test shows nothing"
    fl.assert_exact(refs, runs, "prefill-bound")
    assert d["timeouts"] == 0 and d["migrations"] == 0, f"streams were given up: {d}"
    assert 1 <= d["queued"] <= N, f"WAITING frames: {d} (want 1..{N} queued: one per wait, not one per step)"
    log = fe.proc.log_text()
    bad = [ln for ln in log.splitlines() if "no frame from worker" in ln or "quarantined" in ln]
    assert not bad, bad
    st, _, b = bl.post_json(fe.url + "/v1/completions", bl.completion_body("Once upon a time", max_tokens=4,
                                                                           model=MODEL), timeout=30)
    assert st == 200 and b["usage"]["completion_tokens"] == 4, (st, b)
    print("prefill-bound streams kept: told waiting, none given up, every one exact")
print("ok")
