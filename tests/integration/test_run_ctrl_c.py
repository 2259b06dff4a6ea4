"""Ctrl-C of `baton run` in a terminal drains, as one SIGTERM does.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group: `baton run` and every
child it started (`kill -- -PGID` and `timeout` do the same with SIGTERM). `baton run` forwards a
SIGTERM of its own to each child, so a child that also acted on the group's signal saw two signals
and exited at once ("second signal: exiting at once"), cutting every running stream. Here the
signal goes to the launcher's process group while a stream runs, once with SIGINT and once with
SIGTERM: the stream must end whole (its text byte-identical to a reference run of the same request,
`[DONE]`, `finish_reason` "length", every token counted), `baton run` must exit 0 with every child
gone, and no process may log a second signal. A second Ctrl-C still forces the stop: `baton run`
sends SIGKILL to its children (checked last, on a stream that the drain would otherwise wait for)."""

import os
import signal
import time

import batonlib as bl

gone = bl.gone

bl.deadline(120, "test_run_ctrl_c")

TOKENS = 300  # about 2 s on the mocker at its real speed: the signal lands mid-stream


def start(c):
    fe = c.start_run(workers=2)
    c.wait_workers(fe, 2)
    kids = bl.children(fe.proc.pid)
    assert len(kids) == 3, f"expected a frontend and 2 workers, found {kids}"
    # the process group a terminal would signal: the launcher leads it (its own session)
    assert os.getpgid(fe.proc.pid) == fe.proc.pid
    assert all(os.getpgid(k) == fe.proc.pid for k in kids), "the children left the launcher's process group"
    return fe, kids


body = bl.completion_body("Ctrl-C drains", max_tokens=TOKENS, temperature=0, stream_options={"include_usage": True})

for sig in (signal.SIGINT, signal.SIGTERM):
    with bl.Cluster() as c:
        fe, kids = start(c)
        ref = bl.stream_completion(fe.url, body).assert_ok("reference stream")
        assert ref.finish_reason == "length" and ref.usage["completion_tokens"] == TOKENS, (ref.finish_reason,
                                                                                            ref.usage)
        sent = []

        def to_group(st, obj):
            if len(st.t_tokens) == 20 and not sent:
                os.killpg(fe.proc.pid, sig)
                sent.append(len(st.t_tokens))
            return False

        s = bl.stream_completion(fe.url, body, on_event=to_group)
        assert sent, "the stream ended before the signal was sent"
        assert s.done and not s.closed_early and s.error is None, \
            f"{sig.name} to the group cut the stream (done={s.done}, error={s.error}, {len(s.t_tokens)} tokens); " \
            f"log:\n{fe.proc.log_tail(40)}"
        assert s.text == ref.text, "the drained stream differs from the reference"
        assert s.finish_reason == "length" and s.usage == ref.usage, (s.finish_reason, s.usage, ref.usage)
        rc = fe.proc.wait(40)
        assert rc == 0, f"baton run exited with {rc}"
        log = fe.proc.log_text()
        assert "second signal" not in log, f"a child took the group's {sig.name} as a second signal:\n" + log
        assert f"{sig.name} received: stopping the frontend and 2 workers" in log, log
        for p in kids:
            assert gone(p), f"child {p} still running"
    print(f"run: {sig.name} to the process group after {sent[0]} tokens; the stream ended whole, all exited 0")

# A second Ctrl-C forces: the children are killed although a stream still runs.
with bl.Cluster() as c:
    fe, kids = start(c)
    long_body = dict(body, max_tokens=20000)  # minutes of output: only a forced stop ends it soon
    sent = []

    def twice(st, obj):
        if len(st.t_tokens) == 20 and not sent:
            os.killpg(fe.proc.pid, signal.SIGINT)
            time.sleep(0.3)
            os.killpg(fe.proc.pid, signal.SIGINT)
            sent.append(time.monotonic())
        return False

    s = bl.stream_completion(fe.url, long_body, timeout=60, on_event=twice)
    assert sent, "the stream ended before the signals were sent"
    assert not s.done and s.closed_early, "a second Ctrl-C did not cut the stream"
    rc = fe.proc.wait(20)
    assert rc is not None, "baton run did not exit after a second Ctrl-C"
    assert time.monotonic() - sent[0] < 10, "the forced stop took more than 10 s"
    for p in kids:
        bl.wait_for(lambda: gone(p), 5, what=f"child {p} to be gone after the second Ctrl-C")
    assert "SIGINT received: stopping" in fe.proc.log_text()
print(f"run: a second Ctrl-C stopped everything at once (exit {rc})")
