"""A resume from an error event's id stays possible after the stream has moved on
(docs/fault-tolerance.md, "Resumable streams"): an EventSource client stores the id of every event
it receives, the error event's too, and reconnects with it as often as its connection drops.

1. Every worker is killed mid-stream: the client gets the error event (no_worker_available) with
   the id "<stream id>:<n>:error", n the tokens it had.
2. A worker comes back. A resume with Last-Event-ID "<stream id>:<n>:error" continues the stream,
   and its client drops the connection after 3 events: the stream has moved past n.
3. The same id again: 200, and the events after position n (replayed from the journal, then live)
   are exactly the rest of a fault-free run, ending with [DONE]. It used to be refused (400 "a
   position this stream never sent") once the stream had gone past n.
4. Once the stream has finished, the GET form with that Last-Event-ID replays the same bytes, and
   one with "<stream id>:<total>:error" (an error at the end of a stream that finished) the tail.
5. Ids the stream never sent are still refused (400): an error, or a position, past its end.
"""

import signal
import sys

import batonlib as bl

MAX_TOKENS = 120
CUT_AT = 20


def body():
    return bl.completion_body("an error event to resume from", max_tokens=MAX_TOKENS, return_token_ids=True)


def worker(c):
    return c.start_worker(system_port=True, wait=True)


def main():
    with bl.deadline(90, "test_resume_error_id"):
        with bl.Cluster() as c:
            fe = c.start_frontend(migration_limit=3)
            w = worker(c)
            c.wait_workers(fe, 1)
            ref = bl.stream_completion(fe.url, body(), timeout=60).assert_ok("reference")
            assert len(ref.token_ids) == MAX_TOKENS, ref.summary()

            # 1. every worker killed mid-stream: the error event and its id
            def kill_at(st, obj):
                if len(st.token_ids) >= CUT_AT and w.proc.alive():
                    w.proc.kill(signal.SIGKILL)
                return False

            cut = bl.stream_completion(fe.url, body(), timeout=30, on_event=kill_at)
            assert cut.error and cut.error.get("code") == "no_worker_available", cut.summary()
            sid = cut.headers["x-stream-id"]
            n = len(cut.token_ids)
            err_id = f"{sid}:{n}:error"
            assert cut.last_event_id == err_id, (cut.last_event_id, err_id)
            assert 0 < n < MAX_TOKENS and cut.token_ids == ref.token_ids[:n], cut.summary()
            print(f"workers killed after {n} tokens: error event no_worker_available, id {err_id}", flush=True)

            # 2. a worker back; the resume continues, and its connection drops after 3 events
            w = worker(c)
            c.wait_workers(fe, 1)
            hdr = {"Last-Event-ID": err_id}
            first = bl.stream_completion(fe.url, body(), timeout=30, abort_after=3, headers=hdr)
            assert first.status == 200 and first.aborted and first.token_ids, first.summary()
            assert first.token_ids == ref.token_ids[n:n + len(first.token_ids)], first.summary()
            print(f"resumed from {err_id}: {len(first.token_ids)} tokens more, then the connection dropped",
                  flush=True)

            # 3. the same id again, once the stream has gone past it
            again = bl.stream_completion(fe.url, body(), timeout=30, headers=hdr)
            assert again.ok, f"a resume from {err_id} after the stream moved on: {again.summary()}"
            assert again.token_ids == ref.token_ids[n:] and again.finish_reason == ref.finish_reason, again.summary()
            print(f"resumed from {err_id} again after the stream moved on: the rest of the answer, exact", flush=True)

            # 4. the finished stream: the GET form replays the same bytes; an error at its end, the tail
            path = f"/v1/completions/{sid}?stream=true"
            replay = bl.stream_sse(fe.url, path, None, method="GET", headers=hdr)
            assert replay.status == 200 and replay.raw == again.raw, replay.summary()
            end_id = f"{sid}:{MAX_TOKENS}:error"
            tail = bl.stream_sse(fe.url, path, None, method="GET", headers={"Last-Event-ID": end_id})
            assert tail.ok and not tail.token_ids and tail.finish_reason == ref.finish_reason, tail.summary()
            print("finished: the GET form replays the same bytes from the error event's id", flush=True)

            # 5. ids the stream never sent: still refused, and nothing generated
            for bad in (f"{sid}:{MAX_TOKENS + 5}:error", f"{sid}:{MAX_TOKENS + 5}"):
                s = bl.stream_completion(fe.url, body(), timeout=10, headers={"Last-Event-ID": bad})
                assert s.status == 400 and s.error and s.error["code"] == "invalid_value", (bad, s.summary())
            print("ids the stream never sent: 400", flush=True)
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
