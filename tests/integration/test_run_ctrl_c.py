"""Ctrl-C of `baton run` in a terminal drains, as one SIGTERM does.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group: `baton run` and every
child it started (`kill -- -PGID` and `timeout` do the same with SIGTERM). `baton run` forwards a
SIGTERM of its own to each child, so a child that also acted on the group's signal saw two signals
and exited at once ("second signal: exiting at once"), cutting every running stream. Here the
signal goes to the launcher's process group while a stream runs, once with SIGINT and once with
SIGTERM: the stream must end whole (its text byte-identical to a reference run of the same request,
`[DONE]`, `finish_reason` "length", every token counted), `baton run` must exit 0 with every child
gone, and no process may log a second signal. A second Ctrl-C still forces the stop: `baton run`
sends SIGKILL to its children (checked on a stream that the drain would otherwise wait for), and,
having cut what ran, exits 130 (128 + SIGINT), not 0 as after a drain.

A Ctrl-C during start-up, before the workers have started (they start once the frontend answers
on its port), names what `baton run` stops: the processes it started so far, not the frontend and
the --workers it was asked for. It exits 0, as after any Ctrl-C (docs/operations.md, exit
codes), starts nothing more, and every process it started is gone."""

import os
import re
import signal
import subprocess
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
    assert rc == 130, f"baton run exited {rc} after a forced stop, not 130"
    assert time.monotonic() - sent[0] < 10, "the forced stop took more than 10 s"
    for p in kids:
        bl.wait_for(lambda: gone(p), 5, what=f"child {p} to be gone after the second Ctrl-C")
    assert "SIGINT received: stopping" in fe.proc.log_text()
print(f"run: a second Ctrl-C stopped everything at once (exit {rc})")

# Ctrl-C during start-up. The signal goes as soon as "started frontend 0" is read from the
# launcher's stderr (a pipe, read line by line: no polling delay), while the frontend is still
# starting; if the workers started first all the same (a loaded machine), the attempt is repeated:
# every attempt is checked, one must have caught the launcher before its workers.
STARTED = re.compile(r"run\[\d+\]: started (frontend|worker) (\d+) \(pid (\d+)\)")
env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "BATON_PARENT"))}
early = None
for attempt in range(1, 11):
    port = bl.free_port()
    p = subprocess.Popen([bl.baton_bin(), "run", "--http-port", str(port), "--http-host", "127.0.0.1",
                          "--workers", "2"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, start_new_session=True)
    try:
        head = []
        for line in p.stderr:
            head.append(line)
            if "started frontend 0 (pid" in line:
                p.send_signal(signal.SIGINT)
                break
        out, rest = p.communicate(timeout=40)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    log = "".join(head) + rest
    lines = log.splitlines()
    at = [i for i, line in enumerate(lines) if "SIGINT received: " in line]
    assert len(at) == 1, f"attempt {attempt}: expected one 'SIGINT received' line:\n{log}"
    before = [m for m in map(STARTED.search, lines[:at[0]]) if m]
    after = [m for m in map(STARTED.search, lines[at[0]:]) if m]
    assert not after, f"attempt {attempt}: a process was started after the SIGINT:\n{log}"
    workers = [m for m in before if m.group(1) == "worker"]
    if len(workers) == 2:
        stopped = "stopping the frontend and 2 workers"
    elif workers:
        stopped = f"stopping the frontend and {len(workers)} of 2 workers"
    else:
        stopped = "stopping the frontend (no worker started yet)"
    assert f"SIGINT received: {stopped} (again to force)" in lines[at[0]], \
        f"attempt {attempt}: {len(workers)} worker(s) had started; the stop message says otherwise:\n{log}"
    assert p.returncode == 0, f"attempt {attempt}: baton run exited with {p.returncode} after SIGINT:\n{log}"
    assert "all processes stopped" in log, log
    # every process it logged, and anything else left in its process group (its children's own)
    pids = [int(m.group(3)) for m in before]
    assert pids and not [q for q in pids if not gone(q)], f"attempt {attempt}: still running of {pids}:\n{log}"
    left = bl._pgroup_members(p.pid)
    assert not left, f"attempt {attempt}: processes left in the launcher's group: {left}"
    if not workers:
        assert "serving" not in out, out
        early = attempt
        break
assert early, "in 10 attempts the workers always started before the SIGINT was handled"
print(f"run: SIGINT during start-up (attempt {early}) stops only the frontend it started; exit 0, nothing left")
