"""Ctrl-C of `baton run` in a terminal drains, as one SIGTERM does.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group: `baton run` and every
child it started. `baton run` forwards a SIGTERM of its own to each child, so a child that also
acted on the terminal's SIGINT saw two signals and exited at once ("second signal: exiting at
once"), cutting every running stream. Here SIGINT goes to the launcher's process group while a
stream runs: the stream must end whole (its text byte-identical to a reference run of the same
request, `[DONE]`, `finish_reason` "length", every token counted), `baton run` must exit 0 with
every child gone, and no process may log a second signal."""

import os
import signal

import batonlib as bl

bl.deadline(90, "test_run_ctrl_c")

TOKENS = 300  # about 2 s on the mocker at its real speed: the signal lands mid-stream

with bl.Cluster() as c:
    fe = c.start_run(workers=2)
    c.wait_workers(fe, 2)
    body = bl.completion_body("Ctrl-C drains", max_tokens=TOKENS, temperature=0,
                              stream_options={"include_usage": True})
    ref = bl.stream_completion(fe.url, body).assert_ok("reference stream")
    assert ref.finish_reason == "length" and ref.usage["completion_tokens"] == TOKENS, (ref.finish_reason, ref.usage)

    kids = bl.children(fe.proc.pid)
    assert len(kids) == 3, f"expected a frontend and 2 workers, found {kids}"
    # the process group a terminal would signal: the launcher leads it (its own session)
    assert os.getpgid(fe.proc.pid) == fe.proc.pid
    assert all(os.getpgid(k) == fe.proc.pid for k in kids), "the children left the launcher's process group"
    sent = []

    def ctrl_c(st, obj):
        if len(st.t_tokens) == 20 and not sent:
            os.killpg(fe.proc.pid, signal.SIGINT)
            sent.append(len(st.t_tokens))
        return False

    s = bl.stream_completion(fe.url, body, on_event=ctrl_c)
    assert sent, "the stream ended before the signal was sent"
    log = fe.proc.log_text()
    assert s.done and not s.closed_early and s.error is None, \
        f"the stream was cut by Ctrl-C (done={s.done}, error={s.error}, {len(s.t_tokens)} tokens); log:\n" \
        f"{fe.proc.log_tail(40)}"
    assert s.text == ref.text, "the drained stream differs from the reference"
    assert s.finish_reason == "length" and s.usage == ref.usage, (s.finish_reason, s.usage, ref.usage)
    rc = fe.proc.wait(40)
    assert rc == 0, f"baton run exited with {rc}"
    log = fe.proc.log_text()
    assert "second signal" not in log, "a child took the terminal's SIGINT as a second signal:\n" + log
    assert "SIGINT received: stopping the frontend and 2 workers" in log, log
    for p in kids:
        assert not os.path.exists(f"/proc/{p}") or open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", \
            f"child {p} still running"
print(f"run: Ctrl-C to the process group after {sent[0]} tokens; the stream ended whole, every process exited 0")
