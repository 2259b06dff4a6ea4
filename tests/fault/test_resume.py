"""Resumable streams through the real binaries: a client that loses its connection gets exactly the
rest of its answer (docs/fault-tolerance.md, "Resumable streams").

Scenarios:
  * ids: every event of a stream has an `id:` "<stream id>:<position>", the position being the
    number of tokens delivered up to that event, then ":end", ":usage", ":done";
  * random cuts: 40 concurrent streams (chat and completions, greedy and seeded sampling, usage
    on or off), each cut by its client at 1..3 random points and resumed each time by a re-POST
    with Last-Event-ID; every resumed answer, put together, equals an uncut run byte for byte
    (text, token ids, finish_reason, usage, the chunks' id and created) and ends with [DONE]; the
    cuts kill their requests on the engine at once (KILL counters, the workers idle while no client
    is connected);
  * the GET form (EventSource): a full replay of a finished stream equals the original body byte
    for byte, starting_after and Last-Event-ID give exact suffixes, :end / :usage replay the tail,
    :done answers 204;
  * refusals: unknown id and an id of another endpoint -> 404; malformed id, different body, a
    position never sent -> 400; none of them generates anything (the workers' request counters do
    not move); with --api-key a resume without the key -> 401 and with it succeeds;
  * expiry: --stream-retention 2: a resume 2.6 s after the cut -> 404, counted as expired;
  * the size cap: --stream-retention-bytes evicts the oldest ended streams, the journal stays under
    its cap, an evicted stream -> 404, the newest still resumes exactly;
  * a resume after the worker died too: the stream is cut, its worker killed with SIGKILL, and the
    resume continues on the other worker from the journal's tokens, byte-exact;
  * a client that vanished silently (its socket still open, not reading): a resume from another
    connection supersedes the old request (killed on its worker), and the answer is exact;
  * two event loops (--threads 2): silent clients superseded whichever loop their resume lands on
    (until at least two resumes had to wait for the other loop), and 16 concurrent cut streams
    resumed exactly, with no 409;
  * the re-POSTed body may be serialized differently (key order, spacing);
  * self-test: the exactness check rejects doctored answers (a token dropped or duplicated, a
    missing [DONE], different text), so it cannot pass a wrong system.
"""

import json
import os
import random
import re
import socket
import sys
import time

import batonlib as bl

bl.deadline(300, "test_resume")

rng = random.Random(2020)
WORKER = dict(speedup_ratio=3)
ID_RX = re.compile(r"^([0-9a-f]{32}):(\d+)(?::(end|usage|done|error))?$")


def body_for(i, max_tokens=None):
    mt = max_tokens or 60 + (i * 37) % 90
    extra = {"return_token_ids": True}
    if i % 3 == 1:
        extra.update(temperature=0.8, seed=1000 + i)
    if i % 4 == 2:
        extra["stream_options"] = {"include_usage": True}
    if i % 2:
        return "completion", bl.completion_body(f"resume prompt {i}", max_tokens=mt, **extra)
    return "chat", bl.chat_body(f"resume prompt {i}", max_tokens=mt, **extra)


def stream(fe, api, body, **kw):
    return (bl.stream_chat if api == "chat" else bl.stream_completion)(fe.url, body, **kw)


def chunk_meta(s):
    """(id, created) of the stream's chunks: one value, or the set of all when they differ."""
    vals = {(e.get("id"), e.get("created")) for e in s.events if isinstance(e, dict) and "choices" in e}
    return vals


class Joined:
    """What a client that resumed saw, put together from its pieces (the Stream of each connection)."""

    def __init__(self, pieces):
        self.pieces = pieces
        self.text = "".join(p.text for p in pieces)
        self.token_ids = [t for p in pieces for t in p.token_ids]
        self.done = bool(pieces) and pieces[-1].done
        self.finish_reason = next((p.finish_reason for p in reversed(pieces) if p.finish_reason), None)
        self.usage = next((p.usage for p in reversed(pieces) if p.usage), None)
        self.meta = set().union(*(chunk_meta(p) for p in pieces)) if pieces else set()
        self.errors = [p.error for p in pieces if p.error]


def check_exact(got, ref):
    """None if `got` (a Joined) is exactly the uncut `ref` (a Stream), else why not."""
    if got.errors:
        return f"errors {got.errors}"
    if not got.done:
        return "no [DONE] at the end"
    if got.token_ids != ref.token_ids:
        n = next((k for k, (a, b) in enumerate(zip(got.token_ids, ref.token_ids)) if a != b),
                 min(len(got.token_ids), len(ref.token_ids)))
        return f"token ids differ at {n}: {len(got.token_ids)} vs {len(ref.token_ids)} tokens"
    if got.text != ref.text:
        return "text differs"
    if got.finish_reason != ref.finish_reason:
        return f"finish_reason {got.finish_reason!r} vs {ref.finish_reason!r}"
    if got.usage != ref.usage:
        return f"usage {got.usage!r} vs {ref.usage!r}"
    if len(got.meta) != 1:
        return f"the pieces' chunks disagree on id/created: {got.meta}"
    return None


def check_ids(s, what):
    """Every event of a finished stream has an id; token events name the position after them."""
    assert None not in s.event_ids, f"{what}: an event without an id: {s.event_ids}"
    sids = set()
    pos = 0
    marks = []
    # event_ids has one more entry than events: [DONE] is not in events
    for ev, eid in zip(s.events + [None], s.event_ids):
        m = ID_RX.match(eid)
        assert m, f"{what}: malformed id {eid!r}"
        sids.add(m.group(1))
        if m.group(3):
            marks.append(m.group(3))
            assert int(m.group(2)) == pos, f"{what}: {eid} after {pos} tokens"
            continue
        assert not marks, f"{what}: a token event after the tail: {s.event_ids}"
        pos += len(ev["choices"][0].get("token_ids") or [])
        assert int(m.group(2)) == pos, f"{what}: id {eid} but {pos} tokens delivered"
    assert len(sids) == 1 and s.headers.get("x-stream-id") in sids, f"{what}: stream ids {sids}"
    want = ["end"] + (["usage"] if s.usage else []) + ["done"]
    assert marks == want, f"{what}: tail ids {marks}, expected {want}"


def resume_with_cuts(fe, api, body, cuts, timeout=60):
    """Streams `body`, cutting the connection after each count of events in `cuts` and resuming
    with Last-Event-ID; returns the pieces."""
    pieces = []
    last = None
    for k in list(cuts) + [None]:
        hdrs = {"Last-Event-ID": last} if last else None
        s = stream(fe, api, body, abort_after=k, headers=hdrs, timeout=timeout)
        pieces.append(s)
        if k is None or not s.aborted:
            break
        last = s.last_event_id or last
        time.sleep(rng.uniform(0, 0.1))
    return pieces


def worker_requests(workers):
    total = 0
    for w in workers:
        m = bl.metrics(w.system_url)
        total += bl.metric_sum(m, "dynamo_component_requests_total")
    return total


def worker_active(w):
    return int(bl.metrics(w.system_url)["baton_worker_active_sequences"])


def jstat(fe, name, **labels):
    return bl.metric_sum(bl.metrics(fe.url), name, **labels)


def resumes(fe, outcome):
    return jstat(fe, "baton_frontend_stream_resumes_total", outcome=outcome)


def silent_client(fe, api, b):
    """Starts a stream on a raw socket, reads its first events and goes silent: it reads nothing
    more and never closes. Returns the socket and the id of the last whole event it received."""
    data = json.dumps(dict(b, stream=True)).encode()
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    s = socket.create_connection(("127.0.0.1", fe.port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall((f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(data)}\r\n\r\n").encode() + data)
    got = b""
    while got.count(b"\nid: ") < 3:
        got += s.recv(1)
    _, _, rest_bytes = got.partition(b"\r\n\r\n")
    ids = re.findall(rb"\nid: (\S+)\n", b"\n" + rest_bytes)
    return s, ids[-2].decode()  # the last event received whole


def assert_closed(s):
    """The silent client's response was ended by the frontend (EOF), without [DONE]."""
    s.settimeout(10)
    tail = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break  # EOF: the old response was closed after what was queued
            tail += chunk
    except ConnectionResetError:
        pass  # closed with data unread: also closed
    except socket.timeout:
        raise AssertionError("the superseded request's connection was not closed")
    s.close()
    assert b"data: [DONE]" not in tail, "the superseded request ran to its end"


def selftest(refs):
    """The exactness check must catch each kind of wrong answer."""
    api, ref = refs[0]
    good = Joined([ref])
    assert check_exact(good, ref) is None, check_exact(good, ref)

    class Fake:
        def __init__(self, text, ids, done=True):
            self.text, self.token_ids, self.done = text, ids, done
            self.finish_reason, self.usage, self.error = ref.finish_reason, ref.usage, None
            self.events = ref.events

    cut = len(ref.token_ids) // 2
    bad = {
        "dropped token": Joined([Fake(ref.text, ref.token_ids[:cut] + ref.token_ids[cut + 1:])]),
        "duplicated token": Joined([Fake(ref.text, ref.token_ids[:cut] + ref.token_ids[cut - 1:])]),
        "no [DONE]": Joined([Fake(ref.text, ref.token_ids, done=False)]),
        "different text": Joined([Fake(ref.text + "x", ref.token_ids)]),
    }
    for what, j in bad.items():
        assert check_exact(j, ref) is not None, f"self-test: the check passed an answer with a {what}"
    print("self-test: the exactness check rejects", ", ".join(bad), flush=True)


def main():
    with bl.Cluster() as c:
        fe = c.start_frontend(migration_limit=3)
        ws = [c.start_worker(system_port=True, wait=True, **WORKER) for _ in range(2)]
        c.wait_workers(fe, 2)

        # ---- references and the id lines
        n = 40
        plan = [body_for(i) for i in range(n)]
        refs = bl.run_concurrently(lambda api, b: (api, stream(fe, api, b).assert_ok("reference")), plan)
        for i, (api, s) in enumerate(refs):
            check_ids(s, f"reference {i}")
        selftest(refs)
        print(f"ids: {n} reference streams carry well-formed ids", flush=True)

        # ---- random cuts, resumed by re-POST
        kills0 = sum(bl.metric_sum(bl.metrics(w.system_url), "dynamo_component_cancellation_total", kind="kill")
                     for w in ws)
        cont0 = resumes(fe, "continued")
        jobs = []
        for i, (api, b) in enumerate(plan):
            nev = len(refs[i][1].events)
            ncut = rng.randint(1, 3)
            cuts = sorted(rng.sample(range(1, max(2, nev - 2)), min(ncut, max(1, nev - 3))))
            # abort_after counts events per connection: turn absolute cut points into per-piece counts
            per = [cuts[0]] + [b2 - a for a, b2 in zip(cuts, cuts[1:])]
            jobs.append((api, b, per))
        got = bl.run_concurrently(lambda api, b, per: resume_with_cuts(fe, api, b, per), jobs)
        ncuts = 0
        for i, pieces in enumerate(got):
            why = check_exact(Joined(pieces), refs[i][1])
            assert why is None, f"stream {i} cut at {jobs[i][2]}: {why}; pieces: {[p.summary() for p in pieces]}"
            for p in pieces[1:]:
                assert p.status == 200, p.summary()
            ncuts += sum(1 for p in pieces if p.aborted)
        kills = sum(bl.metric_sum(bl.metrics(w.system_url), "dynamo_component_cancellation_total", kind="kill")
                    for w in ws) - kills0
        cont = resumes(fe, "continued") + resumes(fe, "replayed") - cont0
        # a cut that lands after the last token was generated has nothing left to kill on the engine
        assert kills >= ncuts * 0.5 and kills <= ncuts, f"{kills} KILL frames for {ncuts} cuts"
        assert cont == ncuts, f"{cont} resumes counted for {ncuts} cuts"
        print(f"random cuts: {n} streams cut {ncuts} times, every answer exact; {kills} cuts killed a running "
              f"request on its engine", flush=True)
        bl.wait_for(lambda: all(worker_active(w) == 0 for w in ws), 5, what="workers idle")

        # ---- the disconnect still kills at once; nothing runs while the client is away
        api, b = body_for(100, max_tokens=400)
        ref_long = stream(fe, api, b).assert_ok("long reference")
        cut = stream(fe, api, b, abort_after=5)
        t_cut = cut.t_end
        bl.wait_for(lambda: all(worker_active(w) == 0 for w in ws), 1.0, interval=0.01,
                    what="the cut request gone from the engine within 1 s")
        print(f"cancel: the engine dropped the cut request {1000 * (time.monotonic() - t_cut):.0f} ms after the cut "
              f"(bound 1000 ms)", flush=True)
        time.sleep(0.3)
        # the re-POST may serialize the same body differently: key order and spacing do not matter
        same = json.dumps(dict(reversed(list(dict(b, stream=True).items()))), indent=2)
        rest = bl.stream_sse(fe.url, "/v1/chat/completions" if api == "chat" else "/v1/completions", same,
                             headers={"Last-Event-ID": cut.last_event_id, "Content-Type": "application/json"})
        assert check_exact(Joined([cut, rest]), ref_long) is None, check_exact(Joined([cut, rest]), ref_long)

        # ---- resumes of a finished answer; the GET form
        api, ref = refs[4]
        sid = ref.headers["x-stream-id"]
        path = ("/v1/chat/completions/" if api == "chat" else "/v1/completions/") + sid
        full = bl.stream_sse(fe.url, path + "?stream=true", None, method="GET")
        assert full.raw == ref.raw, "GET replay of a finished stream differs from the original bytes"
        for k in (1, len(ref.events) // 2, len(ref.events) - 1):
            eid = ref.event_ids[k - 1]
            pos = ID_RX.match(eid).group(2)
            want = ref.raw[ref.raw.index(f"id: {eid}\n".encode()):]
            want = want[want.index(b"\n\n") + 2:]
            for how, s in (("POST", stream(fe, api, plan[4][1], headers={"Last-Event-ID": eid})),
                           ("GET starting_after", bl.stream_sse(fe.url, f"{path}?starting_after={pos}", None,
                                                                method="GET")),
                           ("GET Last-Event-ID", bl.stream_sse(fe.url, f"{path}?starting_after=0", None, method="GET",
                                                               headers={"Last-Event-ID": eid}))):
                assert s.status == 200 and s.raw == want, f"{how} after {eid}: {s.summary()}"
        tail_end = stream(fe, api, plan[4][1], headers={"Last-Event-ID": f"{sid}:{len(ref.token_ids)}:end"})
        assert tail_end.done and not tail_end.events or tail_end.events == [e for e in ref.events if e.get("usage")], \
            tail_end.summary()
        done = bl.request("GET", fe.url + path, headers={"Last-Event-ID": f"{sid}:{len(ref.token_ids)}:done"})
        assert done[0] == 204, done
        print("finished answers: the GET replay equals the original bytes; POST/GET resumes give exact suffixes; "
              ":done answers 204", flush=True)

        # ---- refusals: 404 and 400, and they generate nothing
        before = worker_requests(ws)
        api, b = plan[0]
        sid0 = refs[0][1].headers["x-stream-id"]
        other = "/v1/completions/" if api == "chat" else "/v1/chat/completions/"
        cases = [
            ("unknown id", 404, lambda: stream(fe, api, b, headers={"Last-Event-ID": "0" * 32 + ":3"})),
            ("unknown id (GET)", 404, lambda: bl.stream_sse(fe.url, "/v1/chat/completions/" + "f" * 32, None,
                                                            method="GET")),
            ("id of another endpoint (GET)", 404, lambda: bl.stream_sse(fe.url, other + sid0, None, method="GET")),
            ("malformed id", 400, lambda: stream(fe, api, b, headers={"Last-Event-ID": "hello"})),
            ("different body", 400, lambda: stream(fe, api, dict(b, max_tokens=b["max_tokens"] + 1),
                                                   headers={"Last-Event-ID": refs[0][1].event_ids[2]})),
            ("position never sent", 400, lambda: stream(fe, api, b, headers={"Last-Event-ID": f"{sid0}:999999"})),
            # body_for(0) does not ask for usage: its stream never had a :usage event
            ("a tail the stream never had", 400, lambda: stream(fe, api, b, headers={
                "Last-Event-ID": f"{sid0}:{len(refs[0][1].token_ids)}:usage"})),
            ("an error past the end", 400, lambda: stream(fe, api, b, headers={
                "Last-Event-ID": f"{sid0}:{len(refs[0][1].token_ids) + 1}:error"})),
        ]
        for what, status, fn in cases:
            s = fn()
            assert s.status == status and s.error and not s.events, f"{what}: {s.summary()}"
        time.sleep(0.2)
        assert worker_requests(ws) == before, "a refused resume reached a worker"
        print("refusals: " + ", ".join(f"{w} -> {st}" for w, st, _ in cases) + "; no worker saw a request",
              flush=True)

        # ---- a resume after the worker died too
        api, b = body_for(200, max_tokens=300)
        ref = stream(fe, api, b).assert_ok("reference for the worker kill")
        counts0 = [worker_requests([w]) for w in ws]
        cut = stream(fe, api, b, abort_after=8)
        # the worker that served the cut stream: the one whose request counter moved
        moved = [w for w, n0 in zip(ws, counts0) if worker_requests([w]) > n0]
        assert len(moved) == 1, f"the cut stream ran on {len(moved)} workers"
        victim = moved[0]
        victim.proc.kill()
        victim.proc.wait(5)
        bl.wait_for(lambda: len([i for i in bl.get_json(fe.url + "/health")[2]["instances"]]) == 1, 10,
                    what="the frontend to drop the killed worker")
        rest = stream(fe, api, b, headers={"Last-Event-ID": cut.last_event_id})
        why = check_exact(Joined([cut, rest]), ref)
        assert why is None, f"resume after the worker died: {why}; {rest.summary()}"
        print("worker killed with SIGKILL while the client was away: the resume continued on the other worker "
              "from the journal's tokens, exact", flush=True)
        ws.remove(victim)
        ws.append(c.start_worker(system_port=True, wait=True, **WORKER))
        c.wait_workers(fe, 2)

        # ---- a client that vanished silently: superseded
        api, b = body_for(300, max_tokens=400)
        ref = stream(fe, api, b).assert_ok("reference for the supersede")
        sup0 = resumes(fe, "superseded")
        s, last = silent_client(fe, api, b)
        rest = stream(fe, api, b, headers={"Last-Event-ID": last})
        assert rest.ok, rest.summary()
        pos = int(ID_RX.match(last).group(2))
        assert ref.token_ids[pos:] == rest.token_ids, "superseded: the resumed tokens are not the rest of the answer"
        assert resumes(fe, "superseded") - sup0 == 1, "the resume did not supersede the silent client's request"
        assert_closed(s)
        print("superseded: a silent client's stream resumed on a new connection, exact; the old connection "
              "was closed", flush=True)
        bl.wait_for(lambda: all(worker_active(w) == 0 for w in ws), 5, what="workers idle")
        m = bl.metrics(fe.url)
        assert bl.metric_sum(m, "dynamo_frontend_inflight_requests") == 0
        assert bl.metric_sum(m, "baton_frontend_stream_journal_streams", state="live") == 0

    # ---- two event loops: a resume may land on the other loop than the request it supersedes
    with bl.Cluster() as c:
        fe = c.start_frontend(threads=2)
        ws = [c.start_worker(system_port=True, wait=True, **WORKER) for _ in range(2)]
        c.wait_workers(fe, 2)
        sup0 = resumes(fe, "superseded")
        # the kernel spreads connections over the loops by their addresses: go on until a resume
        # has waited for the other loop at least twice (and at least 6 trials)
        n = 0
        for t in range(40):
            cross = len(re.findall(r"waits for thread \d to end the request", fe.proc.log_text()))
            if cross >= 2 and n >= 6:
                break
            n += 1
            api, b = body_for(400 + t, max_tokens=300)
            ref = stream(fe, api, b).assert_ok("reference on two loops")
            s, last = silent_client(fe, api, b)
            rest = stream(fe, api, b, headers={"Last-Event-ID": last})
            pos = int(ID_RX.match(last).group(2))
            assert rest.ok and rest.token_ids == ref.token_ids[pos:], f"two loops, silent client {t}: {rest.summary()}"
            assert_closed(s)
        sup = resumes(fe, "superseded") - sup0
        assert sup == n, f"{sup} of {n} resumes superseded a silent client's request"
        assert resumes(fe, "conflict") == 0
        # clients that cut and reconnect at once, concurrently: whichever loop sees what first
        plan = [body_for(500 + i, max_tokens=120) for i in range(16)]
        refs2 = [stream(fe, api, b).assert_ok("reference") for api, b in plan]
        got = bl.run_concurrently(lambda api, b, k: resume_with_cuts(fe, api, b, [k]),
                                  [(api, b, rng.randint(1, 20)) for api, b in plan])
        for i, pieces in enumerate(got):
            why = check_exact(Joined(pieces), refs2[i])
            assert why is None, f"two loops, stream {i}: {why}"
        bl.wait_for(lambda: all(worker_active(w) == 0 for w in ws), 5, what="workers idle")
        assert cross >= 2, f"in {n} trials no resume landed on the other loop than its silent client"
        print(f"two event loops: {n} silent clients superseded ({cross} across loops), 16 cut streams resumed "
              "exact, no 409", flush=True)

    # ---- expiry, the size cap, the API key
    with bl.Cluster() as c:
        fe = c.start_frontend(stream_retention=2, stream_retention_bytes=60000, api_key="sekrit")
        w = c.start_worker(system_port=True, wait=True, **WORKER)
        c.wait_workers(fe, 1)
        auth = {"Authorization": "Bearer sekrit"}
        api, b = body_for(0, max_tokens=100)
        ref = stream(fe, api, b, headers=auth).assert_ok("reference with a key")
        cut = stream(fe, api, b, abort_after=4, headers=auth)
        no_key = stream(fe, api, b, headers={"Last-Event-ID": cut.last_event_id})
        assert no_key.status == 401, no_key.summary()
        wrong = stream(fe, api, b, headers={"Last-Event-ID": cut.last_event_id, "Authorization": "Bearer nope"})
        assert wrong.status == 401, wrong.summary()
        rest = stream(fe, api, b, headers={"Last-Event-ID": cut.last_event_id, **auth})
        assert check_exact(Joined([cut, rest]), ref) is None, rest.summary()
        # the same key in another spelling the API accepts (scheme case, spaces) is the same credential
        cut = stream(fe, api, b, abort_after=4, headers=auth)
        rest = stream(fe, api, b, headers={"Last-Event-ID": cut.last_event_id, "Authorization": "bEARER   sekrit"})
        assert rest.status == 200 and check_exact(Joined([cut, rest]), ref) is None, rest.summary()
        print("api key: a resume without the key or with a wrong one -> 401; with it, in any accepted spelling, "
              "exact", flush=True)

        cut = stream(fe, api, b, abort_after=4, headers=auth)
        exp0 = jstat(fe, "baton_frontend_stream_journal_evictions_total", reason="expired")
        time.sleep(2.6)
        before = worker_requests([w])
        late = stream(fe, api, b, headers={"Last-Event-ID": cut.last_event_id, **auth})
        assert late.status == 404 and not late.events, late.summary()
        assert worker_requests([w]) == before, "an expired resume reached a worker"
        assert jstat(fe, "baton_frontend_stream_journal_evictions_total", reason="expired") > exp0
        print("expiry: a resume 2.6 s after the cut with --stream-retention 2 -> 404, counted as expired",
              flush=True)

        # the size cap: 60000 bytes hold a few of these streams, not all (a second frontend on the
        # same worker, with the default retention)
        fe = c.start_frontend(stream_retention_bytes=60000, api_key="sekrit")
        c.wait_workers(fe, 1)
        outs = [stream(fe, *body_for(i, max_tokens=400), headers=auth) for i in range(12)]
        for o in outs:
            o.assert_ok("stream under the cap")
        m = bl.metrics(fe.url)
        held = bl.metric_sum(m, "baton_frontend_stream_journal_bytes")
        assert 0 < held <= 60000, f"journal holds {held} bytes, cap 60000"
        assert bl.metric_sum(m, "baton_frontend_stream_journal_evictions_total", reason="size") > 0
        first = outs[0]
        gone = stream(fe, *body_for(0, max_tokens=400), headers={"Last-Event-ID": first.event_ids[1], **auth})
        assert gone.status == 404, f"the oldest stream was not evicted: {gone.summary()}"
        last = outs[-1]
        pos = int(ID_RX.match(last.event_ids[1]).group(2))
        again = stream(fe, *body_for(11, max_tokens=400), headers={"Last-Event-ID": last.event_ids[1], **auth})
        assert again.ok and again.token_ids == last.token_ids[pos:], again.summary()
        print(f"size cap: the journal holds {held:.0f} of 60000 bytes after 12 streams of 400 tokens; the oldest "
              f"-> 404, the newest resumes exactly", flush=True)


if __name__ == "__main__":
    main()
    print("test_resume: OK")
    sys.exit(0)
