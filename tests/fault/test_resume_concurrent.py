"""Concurrent resumes of one stream on a --threads 2 frontend take it over from each other as on
one thread: each is answered 200 and the last to claim the stream keeps it; no 409 stream_busy
(docs/fault-tolerance.md, "Resuming").

One frontend with --threads 2 (in-process journal), one mocker worker. Each round, a 300-token
stream is cut by its client after 5 events, then four clients resume it at once from that event
(re-POST with Last-Event-ID). Checked per round: all four get 200; exactly one reaches [DONE], and
what it received after the cut is exactly the rest of the answer; every other one ends without
[DONE] (superseded) after a prefix of that rest. Before, a resume waiting on one loop asked the
other loop once to end the request holding the stream; when another resume had claimed it
meanwhile, nobody asked that one to end, and the waiting resume got 409 after a second (2 of 3
rounds in a probe).
"""

import threading

import batonlib as bl

bl.deadline(180, "test_resume_concurrent")

ROUNDS = 5
N = 4

with bl.Cluster() as c:
    c.start_worker()
    fe = c.start_frontend(threads=2)
    c.wait_workers(fe, 1)
    busy = 0
    for rnd in range(ROUNDS):
        body = bl.chat_body(f"round {rnd} of concurrent resumes", max_tokens=300, return_token_ids=True, seed=rnd)
        ref = bl.stream_chat(fe.url, body, timeout=60).assert_ok("reference")
        cut = bl.stream_chat(fe.url, body, abort_after=5, timeout=30)
        assert cut.aborted and cut.last_event_id, cut.summary()
        rest_ids, rest_text = ref.token_ids[len(cut.token_ids):], ref.text[len(cut.text):]
        assert cut.token_ids == ref.token_ids[:len(cut.token_ids)]
        go = threading.Barrier(N)

        def resume(_):
            go.wait(10)
            return bl.stream_chat(fe.url, body, headers={"Last-Event-ID": cut.last_event_id}, timeout=60)
        res = bl.run_concurrently(resume, list(range(N)))
        statuses = [r.status for r in res]
        busy += statuses.count(409)
        assert statuses == [200] * N, f"round {rnd}: statuses {statuses}: " + \
            "; ".join(r.summary() for r in res if r.status != 200)
        done = [r for r in res if r.done]
        assert len(done) == 1, f"round {rnd}: {len(done)} resumes reached [DONE]: " + "; ".join(r.summary() for r in res)
        win = done[0]
        assert win.ok and win.token_ids == rest_ids and win.text == rest_text, f"round {rnd}: {win.summary()}"
        for r in res:
            if r is win:
                continue
            assert r.closed_early and not r.error, f"round {rnd}: a superseded resume: {r.summary()}"
            assert r.token_ids == rest_ids[:len(r.token_ids)] and rest_text.startswith(r.text), \
                f"round {rnd}: a superseded resume's events are not a prefix of the answer"
        print(f"round {rnd}: 4 concurrent resumes: all 200, one to [DONE] exactly, "
              f"{sorted(len(r.token_ids) for r in res if r is not win)} tokens to the superseded", flush=True)
    fe.proc.wait_log(r"resume of stream [0-9a-f]{32} waits for thread \d to end the request that streams it",
                     timeout=5)  # the rounds did cross the loops

print("test_resume_concurrent: ok")
