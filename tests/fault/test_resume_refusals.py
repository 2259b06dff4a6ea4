"""What a resume that cannot be honoured is told, and the rules both resume forms read ids by.

- A running stream whose journal record cannot grow at --stream-retention-bytes loses its record:
  its later events carry no ids. The client already holds ids for its first events, and a resume
  from one of them is told so: 404 `stream_not_found` whose message says the record was dropped
  at --stream-retention-bytes (not "unknown, or expired", neither of which is true), for
  --stream-retention after the stream ended; then the stream is forgotten like any other.
- A position is plain decimal digits, without a sign or a leading zero, in `starting_after` as in
  `Last-Event-ID`; a query parameter given twice is refused, not read as its first value; a GET
  without `stream` streams (absent counts as true), `stream=false` is refused. A position the
  stream never sent is refused naming the one the client gave (`starting_after` or `Last-Event-ID`).
"""

import json
import time

import batonlib as bl

RETENTION = 3


def error_of(status, body, want_status, what):
    assert status == want_status, f"{what}: {status} {body[:300]!r}"
    return json.loads(body)["error"]


def check_dropped(fe):
    body = bl.completion_body(prompt="journal2", max_tokens=2000, stream=True)
    during = {}

    def resume_while_running(stream, obj):
        # past the drop, while the stream still runs: told so, and the running stream is left alone
        if len(stream.event_ids) == 600 and stream.event_ids[-1] is None:
            during["answer"] = bl.request("POST", fe.url + "/v1/completions", body,
                                          headers={"Last-Event-ID": stream.event_ids[1]})
            during["inflight"] = bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_inflight_requests")
        return False

    st = bl.stream_completion(fe.url, body, timeout=60, on_event=resume_while_running)
    st.assert_ok("the long stream")
    assert "answer" in during, "no resume was made while the stream ran"
    err = error_of(*during["answer"][::2], 404, "a resume while the dropped stream runs")
    assert "--stream-retention-bytes" in err["message"], err
    assert during["inflight"] >= 1, "the stream had ended before the resume: not a resume of a running stream"
    ids = st.event_ids
    with_id = [i for i in ids if i]
    assert with_id and ids[-1] is None, f"expected the record dropped mid-stream: {len(with_id)} of {len(ids)} ids"
    m = bl.metrics(fe.url)
    assert bl.metric_sum(m, "baton_frontend_stream_journal_evictions_total", reason="dropped_live") >= 1
    early = with_id[1]
    sid = early.split(":")[0]

    s, _, b = bl.request("POST", fe.url + "/v1/completions", body, headers={"Last-Event-ID": early})
    err = error_of(s, b, 404, "re-POST of a dropped stream")
    assert err["code"] == "stream_not_found", err
    assert "--stream-retention-bytes" in err["message"] and "unknown" not in err["message"], err
    s, _, b = bl.request("GET", fe.url + f"/v1/completions/{sid}?stream=true&starting_after=1")
    err = error_of(s, b, 404, "GET of a dropped stream")
    assert "--stream-retention-bytes" in err["message"], err
    # the three answers from the tombstone are counted apart from unknown ids
    assert bl.metric_sum(bl.metrics(fe.url), "baton_frontend_stream_resumes_total", outcome="dropped") == 3
    # another stream id: unknown, said as before
    other = "0123456789abcdef0123456789abcdef:1"
    s, _, b = bl.request("POST", fe.url + "/v1/completions", body, headers={"Last-Event-ID": other})
    assert "unknown" in error_of(s, b, 404, "an unknown stream")["message"]

    # the note is kept for --stream-retention after the stream ended, then forgotten
    time.sleep(RETENTION + 1.5)
    s, _, b = bl.request("POST", fe.url + "/v1/completions", body, headers={"Last-Event-ID": early})
    err = error_of(s, b, 404, "re-POST of a dropped stream after the retention")
    assert "unknown, or expired" in err["message"], err
    print(f"test_resume_refusals: a dropped record ({len(with_id)} of {len(ids)} events had ids) is said, "
          f"then forgotten")


def check_ids(fe):
    body = bl.completion_body(prompt="ids", max_tokens=6, stream=True)
    st = bl.stream_completion(fe.url, body, timeout=30)
    st.assert_ok("the short stream")
    sid = st.event_ids[0].split(":")[0]
    base = fe.url + f"/v1/completions/{sid}"

    s, _, b = bl.request("GET", base)  # no `stream`: counts as true
    assert s == 200 and b.count(b"data: [DONE]") == 1, (s, b[:300])
    s, _, b = bl.request("GET", base + "?starting_after=0")
    assert s == 200 and b.count(b"data: [DONE]") == 1, (s, b[:300])
    for q in ("stream=false", "stream=true&stream=false", "stream=true&stream=true",
              "starting_after=1&starting_after=5", "starting_after=+3", "starting_after=03",
              "starting_after=-0", "starting_after=%203", "starting_after=", "starting_after=4294967296"):
        s, _, b = bl.request("GET", base + "?" + q)
        assert error_of(s, b, 400, q)["code"] == "invalid_value"
    for lid in (f"{sid}:08", f"{sid}:+3", f"{sid}:"):
        s, _, b = bl.request("POST", fe.url + "/v1/completions", body, headers={"Last-Event-ID": lid})
        assert error_of(s, b, 400, lid)["code"] == "invalid_value"
        s, _, b = bl.request("GET", base, headers={"Last-Event-ID": lid})
        assert error_of(s, b, 400, "GET " + lid)["code"] == "invalid_value"
    # a position the stream never reached: the refusal names the parameter the client used
    s, _, b = bl.request("GET", base + "?starting_after=4294967295")
    msg = error_of(s, b, 400, "starting_after past the end")["message"]
    assert "starting_after" in msg and "Last-Event-ID" not in msg, msg
    s, _, b = bl.request("GET", base + "?starting_after=1", headers={"Last-Event-ID": f"{sid}:4294967295"})
    msg = error_of(s, b, 400, "Last-Event-ID past the end")["message"]
    assert "Last-Event-ID" in msg, msg
    s, _, b = bl.request("GET", base + "?starting_after=3")
    assert s == 200 and f"id: {sid}:3".encode() not in b and b.count(b"data: [DONE]") == 1, (s, b[:300])
    print("test_resume_refusals: positions read by one rule; repeated parameters refused")


def main():
    bl.deadline(150, "test_resume_refusals")
    with bl.Cluster() as c:
        fe = c.start_frontend(stream_retention_bytes=4096, stream_retention=RETENTION)
        c.start_worker()
        c.wait_workers(fe, 1)
        check_ids(fe)
        check_dropped(fe)
    print("test_resume_refusals: OK")


if __name__ == "__main__":
    main()
