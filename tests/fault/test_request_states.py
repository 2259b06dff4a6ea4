"""The request's life on the frontend, read from its log: every state change is one line
`request <id>: <from> -> <to> (<reason>)` (docs/architecture.md, "The request's life"), written by
the one transition function, and the lines of a request form one unbroken chain from `admitted`
to `done`.

A frontend at DYN_LOG=debug and two mocker workers. Four requests, each with its own
X-Request-Id:
  plain      answered: admitted -> routing -> streaming -> done (answered)
  migrated   kill -9 of its worker A after 10 events: ... streaming -> migrating (<why>) ->
             streaming (first token from the other, B) -> done (answered), its output equal to the
             fault-free run of the same body
  cancelled  the client leaves mid-stream: ... streaming -> done (cancelled)
  nonstream  a non-streaming request, answered by B (the only one left)
For each, the test checks the exact list of (from, to) pairs, that each line's `from` is the
previous line's `to` (no change is skipped or logged twice), that the routing and first-token
reasons name the worker that really served it, and that the migrating reason is the failure. A
self-check first feeds the chain checker a chain with a missing, a duplicated and a skipped
change and sees each rejected.
"""

import re
import signal

import batonlib as bl

bl.deadline(90, "test_request_states")

LINE = re.compile(r"request (\S+): (admitted|routing|streaming|migrating|done) -> "
                  r"(admitted|routing|streaming|migrating|done) \((.*)\)$")


def changes(log, rid):
    """The state changes the log holds for request rid, in order: [(from, to, reason)]."""
    out = []
    for line in log.splitlines():
        m = LINE.search(line)
        if m and m.group(1) == rid:
            out.append((m.group(2), m.group(3), m.group(4)))
    return out


def check_chain(ch, want, what):
    """ch must be exactly the (from, to) pairs of `want`, starting at admitted, ending at done,
    each change leaving the state the previous one entered. Raises AssertionError otherwise."""
    pairs = [(a, b) for a, b, _ in ch]
    if pairs != want:
        raise AssertionError(f"{what}: state changes {pairs}, want {want}\n{ch}")
    if not pairs or pairs[0][0] != "admitted" or pairs[-1][1] != "done":
        raise AssertionError(f"{what}: the chain does not run from admitted to done: {pairs}")
    for (_, prev_to), (frm, _) in zip(pairs, pairs[1:]):
        if frm != prev_to:
            raise AssertionError(f"{what}: a change from {frm} follows one to {prev_to}: {pairs}")
    for a, b in pairs:
        if a == b:
            raise AssertionError(f"{what}: a change to the same state {a}: {pairs}")


def self_check():
    good = [("admitted", "routing", "x"), ("routing", "streaming", "y"), ("streaming", "done", "answered")]
    want = [("admitted", "routing"), ("routing", "streaming"), ("streaming", "done")]
    check_chain(good, want, "self-check")
    broken = {
        "missing": good[:1] + good[2:],
        "duplicated": good[:2] + [good[1]] + good[2:],
        "skipped": [("admitted", "routing", "x"), ("streaming", "done", "answered")],
    }
    for name, ch in broken.items():
        try:
            check_chain(ch, want, "self-check")
        except AssertionError:
            continue
        raise AssertionError(f"self-check: the chain checker accepted a {name} change")
    # the checker of the exact pairs also refuses a consistent chain that is not the one wanted
    try:
        check_chain(good, want[:1] + [("routing", "done")], "self-check")
    except AssertionError:
        pass
    else:
        raise AssertionError("self-check: the chain checker accepted the wrong chain")
    print("self-check: missing, duplicated, skipped and wrong chains are rejected")


def hexid(inst):
    return format(inst["instance_id"], "x")


def main():
    self_check()
    with bl.Cluster() as c:
        fe = c.start_frontend(env={"DYN_LOG": "debug"})
        workers = [c.start_worker(speedup_ratio=1) for _ in range(2)]
        by_id = dict(zip(sorted(hexid(i) for i in c.wait_workers(fe, 2)), [None, None]))

        def served_by(rid):
            """The worker the request's first attempt was sent to, from its routing line."""
            ch = changes(fe.proc.log_text(), rid)
            m = re.fullmatch(r"sent to worker ([0-9a-f]+)", ch[0][2]) if ch else None
            assert m, (rid, ch)
            return m.group(1)

        body = bl.chat_body("the life of a request", max_tokens=300, seed=7, return_token_ids=True)
        plain = bl.stream_chat(fe.url, body, headers={"X-Request-Id": "st-plain"})
        assert plain.status == 200 and plain.done and plain.finish_reason == "length", plain.__dict__
        assert len(plain.token_ids) == 300, len(plain.token_ids)

        cancelled = bl.stream_chat(fe.url, bl.chat_body("a cancelled request", max_tokens=400),
                                   headers={"X-Request-Id": "st-cancel"}, abort_after=5)
        assert cancelled.aborted, cancelled.__dict__

        # the migrated one: the worker it was sent to dies (kill -9) after 10 events
        killed = []

        def on_event(st, obj):
            if len(st.events) == 10:
                victim = served_by("st-mig")
                # the worker whose own log lines carry that instance id
                for w in workers:
                    if f"worker {victim}: " in w.proc.log_text():
                        w.proc.kill(signal.SIGKILL)
                        w.proc.wait(10)
                        killed.append((victim, w))
                        break
            return False

        mig = bl.stream_chat(fe.url, body, headers={"X-Request-Id": "st-mig"}, on_event=on_event)
        assert killed, "the fault was never injected"
        id_a, wa = killed[0]
        assert not wa.proc.alive(), "the killed worker still runs"
        assert mig.status == 200 and mig.done, mig.__dict__
        assert (mig.text, mig.token_ids, mig.finish_reason) == (plain.text, plain.token_ids, plain.finish_reason), \
            "the migrated stream differs from the fault-free one"
        (id_b,) = [k for k in by_id if k != id_a]
        c.wait_workers(fe, 1, timeout=20)

        st, _, nb = bl.post_json(fe.url + "/v1/chat/completions", dict(body, stream=False),
                                 headers={"X-Request-Id": "st-nonstream"})
        assert st == 200 and nb["choices"][0]["finish_reason"] == "length", (st, nb)

        # a request's last line is written as it ends, which may come just after its client has read
        # the answer: wait for each one's end
        for rid in ("st-plain", "st-cancel", "st-mig", "st-nonstream"):
            bl.wait_for(lambda: any(ch[1] == "done" for ch in changes(fe.proc.log_text(), rid)), 10,
                        what=f"the end of {rid} in the frontend's log")
        log = fe.proc.log_text()
        seq = [("admitted", "routing"), ("routing", "streaming"), ("streaming", "done")]
        for rid, worker in (("st-plain", served_by("st-plain")), ("st-nonstream", id_b)):
            ch = changes(log, rid)
            check_chain(ch, seq, rid)
            assert ch[0][2] == f"sent to worker {worker}", (rid, ch)
            assert ch[1][2] == f"first token from worker {worker}", (rid, ch)
            assert ch[2][2] == "answered", (rid, ch)
        ch = changes(log, "st-cancel")
        check_chain(ch, seq, "st-cancel")
        assert ch[2][2] == "cancelled", ch
        ch = changes(log, "st-mig")
        check_chain(ch, [("admitted", "routing"), ("routing", "streaming"), ("streaming", "migrating"),
                         ("migrating", "streaming"), ("streaming", "done")], "st-mig")
        assert ch[0][2] == f"sent to worker {id_a}" and ch[1][2] == f"first token from worker {id_a}", ch
        assert ch[3][2] == f"first token from worker {id_b}", ch
        assert ch[4][2] == "answered", ch
        # the failure is the reason: A's connection was lost or A was declared dead
        assert ch[2][2], ch
        for rid in ("st-plain", "st-cancel", "st-mig", "st-nonstream"):
            print(f"{rid}: " + " | ".join(f"{x} -> {y} ({r})" for x, y, r in changes(log, rid)))
    print("ok")


if __name__ == "__main__":
    main()
