"""The exactness fingerprint's path through the shared stream journal (NATS JetStream), with real
processes: one nats-server -js, two frontends (A and B) journaling there, llama workers.

The frontend that begins a stream records the serving worker's exactness fingerprint in the
stream's journal record (docs/engines.md §3.4); a frontend that resumes the stream from the
journal after the first frontend died must hold a continuation to it. Each round: a long llama
stream on A, cut by its client after a few events; the worker serving it is stopped (SIGSTOP: no
more tokens), A is killed with SIGKILL, then that worker too; the client resumes on B with
Last-Event-ID. B has only the journal (fetched from JetStream) to know where and how the stream
ran.

1. Matching: the other worker has the same fingerprint (--llama-threads 1 on both). The resumed
   stream continues there and, put together with what the client had, equals the uncut answer
   byte for byte (token ids, text, finish_reason, usage); for a greedy and for a seeded
   (temperature 0.8) stream.
2. Mismatched: the other worker runs --llama-threads 2 (another fingerprint). The resume ends with
   the documented error event (code no_worker_available, the dead worker's fingerprint named), and
   the other worker never received a request.
"""

import os
import re
import signal
import sys
import time

import batonlib as bl
import faultlib as fl
import natslib

MODEL = "mock-model"
SLOW = fl.SLOW
ID_RX = re.compile(r"^([0-9a-f]{32}):(\d+)")


def body(seeded):
    extra = {"return_token_ids": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if seeded:
        extra.update(temperature=0.8, seed=9090)
    return bl.completion_body("Once upon a time, a little owl", max_tokens=1900, model=MODEL, **extra)


def fingerprint(w):
    return w.proc.wait_log(r'exactness fingerprint "([^"]+)"', timeout=20).group(1)


def requests_total(w):
    return bl.metric_sum(bl.metrics(w.system_url), "dynamo_component_requests_total")


def cut_round(c, nats, other_threads, b, with_ref):
    """One round: a 1-thread llama worker W1 and frontends A and B (journal in JetStream). With
    with_ref, the uncut answer from B first. The stream begun on A is cut by its client after 6
    events; W1 is stopped at once (SIGSTOP: the stream stays unfinished), a second worker W2
    with other_threads starts, A is killed (SIGKILL) once its journal batches had time to reach
    JetStream, then W1. Then the client resumes on B with Last-Event-ID.
    Returns (reference or None, cut stream, resumed stream, W1, W2, B, W2's requests before)."""
    plane = dict(event_plane="nats", nats_server=nats.url)
    w1 = c.start_worker(engine="llama", system_port=True, wait=True, llama_threads=1, orphan_grace=30, **plane)
    fa = c.start_frontend(**plane)
    fb = c.start_frontend(**plane)
    for fe in (fa, fb):
        fe.proc.wait_log(r"resumable streams: journal shared through NATS JetStream", timeout=15)
        c.wait_workers(fe, 1)
    ref = bl.stream_completion(fb.url, b, timeout=30 * SLOW).assert_ok("reference") if with_ref else None
    cut = bl.stream_completion(fa.url, b, abort_after=6, timeout=20 * SLOW)
    w1.proc.kill(signal.SIGSTOP)
    assert cut.aborted and cut.last_event_id and cut.token_ids, cut.summary()
    assert int(ID_RX.match(cut.last_event_id).group(2)) == len(cut.token_ids), (cut.last_event_id, cut.summary())
    w2 = c.start_worker(engine="llama", system_port=True, wait=True, llama_threads=other_threads, orphan_grace=30,
                        **plane)
    c.wait_workers(fb, 2)
    time.sleep(0.5)  # A's last journal batches reach JetStream
    fa.proc.kill(signal.SIGKILL)
    assert fa.proc.wait(10) == -signal.SIGKILL
    w1.proc.kill(signal.SIGKILL)
    assert w1.proc.wait(10) == -signal.SIGKILL
    c.wait_workers(fb, 1)
    n2 = requests_total(w2)
    rest = bl.stream_completion(fb.url, b, timeout=30 * SLOW, headers={"Last-Event-ID": cut.last_event_id})
    assert re.search(r"stream [0-9a-f]{32} fetched from JetStream", fb.proc.log_text()), \
        "B did not fetch the stream from JetStream\n" + fb.proc.log_tail()
    return ref, cut, rest, w1, w2, fb, n2


def matching(c, nats):
    for seeded in (False, True):
        kind = "seeded" if seeded else "greedy"
        ref, cut, rest, w1, w2, fb, n2 = cut_round(c, nats, 1, body(seeded), True)
        assert fingerprint(w1) == fingerprint(w2)
        assert len(ref.token_ids) == 1900, ref.summary()
        assert rest.ok and rest.done, f"{kind}: the resumed stream did not end whole: {rest.summary()}"
        assert cut.token_ids + rest.token_ids == ref.token_ids, \
            f"{kind}: cut {len(cut.token_ids)} + resumed {len(rest.token_ids)} tokens differ from the uncut answer"
        assert cut.text + rest.text == ref.text and rest.finish_reason == ref.finish_reason and \
            rest.usage == ref.usage, f"{kind}: text or end differ: {rest.summary()} vs {ref.summary()}"
        assert requests_total(w2) > n2, f"{kind}: the continuation did not run on the matching worker"
        print(f"matching: {kind} stream cut at {len(cut.token_ids)} tokens on A, resumed on B from JetStream "
              f"on the other worker, byte-exact", flush=True)
        w2.proc.stop()
        fb.proc.stop()


def mismatched(c, nats):
    _, cut, rest, w1, w2, fb, n2 = cut_round(c, nats, 2, body(False), False)
    fp1, fp2 = fingerprint(w1), fingerprint(w2)
    assert fp1 != fp2, fp1
    err = rest.error.get("error", rest.error) if isinstance(rest.error, dict) else {}
    assert err.get("code") == "no_worker_available" and fp1 in err.get("message", "") and \
        "no worker can continue this stream exactly" in err.get("message", ""), \
        f"the resume was not refused with the documented error: {rest.summary()} {rest.error}"
    assert not rest.done, rest.summary()
    assert requests_total(w2) == n2, "the worker of another fingerprint was sent the continuation"
    assert "refusing to continue" not in w2.proc.log_text()
    print(f"mismatched: resumed on B after {len(cut.token_ids)} tokens, ended with the error event naming "
          f"{fp1}; the 2-thread worker got nothing", flush=True)
    w2.proc.stop()
    fb.proc.stop()


def main():
    if fl.skip("llama") is not None:
        return 77
    with bl.deadline(60 * SLOW, "test_llama_journal_js"):
        with bl.Cluster() as c:
            nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}',
                                      name="nats-js").start()
            try:
                mismatched(c, nats)
                matching(c, nats)
            finally:
                nats.proc.stop()
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
