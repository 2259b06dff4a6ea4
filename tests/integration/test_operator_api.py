"""Operator endpoints refuse what they do not understand, and then change nothing.

  * POST /busy_threshold: active_prefill_tokens_threshold is bounded as the command-line flag is,
    [0, 1e12]. 1e300 (whose conversion to an integer is undefined, and once echoed INT64_MIN), -1
    and 1e12 + 1 answer 400 and leave the threshold as it was (GET shows it); 0 and 1e12 are
    accepted and echoed exactly. HEAD /busy_threshold is answered as GET (the same status and
    headers, no body), even with a body that a POST would apply, and changes nothing.
  * POST /v1/requests/{id}/cancel: a body that is not {"mode":"stop"|"kill"} ({}, [], {"mode":5},
    {"mode":null}, "stop", ...) answers 400 and leaves the running request alone: it ends with
    finish_reason "length" and its whole output, byte-exact against a fault-free reference, and
    the worker saw no STOP or KILL. An empty body is a stop (as documented), checked on another
    request, which then ends with finish_reason "cancelled".
"""

import json

import batonlib as bl

bl.deadline(120, "test_operator_api")

MODEL = "mock-model"


def threshold(fe):
    st, _, g = bl.get_json(fe.url + "/busy_threshold")
    assert st == 200, (st, g)
    (t,) = [t for t in g["thresholds"] if t["model"] == MODEL]
    return t["active_prefill_tokens_threshold"]


def post_threshold(fe, value):
    raw = json.dumps({"model": MODEL, "active_prefill_tokens_threshold": value}).encode()
    st, _, data = bl.request("POST", fe.url + "/busy_threshold", raw, {"Content-Type": "application/json"})
    return st, json.loads(data)


def busy_threshold(fe):
    assert threshold(fe) is None
    for bad in (1e300, -1, 1e12 + 1, -1e300):
        st, b = post_threshold(fe, bad)
        assert st == 400 and "active_prefill_tokens_threshold" in b.get("error", ""), (bad, st, b)
        assert threshold(fe) is None, f"a refused value ({bad}) changed the threshold to {threshold(fe)}"
    for good in (1000000000000, 0, 1e12, 4096):
        st, b = post_threshold(fe, good)
        assert st == 200 and b["active_prefill_tokens_threshold"] == int(good), (good, st, b)
        assert threshold(fe) == int(good)
    st, b = post_threshold(fe, 1e300)
    assert st == 400 and threshold(fe) == 4096, (st, b, threshold(fe))
    st, b = post_threshold(fe, None)
    assert st == 200 and b["active_prefill_tokens_threshold"] is None and threshold(fe) is None, (st, b)
    # HEAD is answered as GET (its head, no body), never as the POST that sets: not even with a body
    gst, gh, gbody = bl.request("GET", fe.url + "/busy_threshold")
    for body in (None, json.dumps({"model": MODEL, "active_prefill_tokens_threshold": 7}).encode()):
        hdrs = {"Content-Type": "application/json"} if body else {}
        st, h, data = bl.request("HEAD", fe.url + "/busy_threshold", body, hdrs)
        assert (st, data) == (gst, b"") and h.get("content-length") == str(len(gbody)), (st, h, data, gh)
        assert h.get("content-type") == gh.get("content-type"), (h, gh)
        assert threshold(fe) is None, f"a HEAD changed the threshold to {threshold(fe)}"
    # a fraction is echoed as the operator wrote it (jansson's default wrote 0.10000000000000001)
    raw = json.dumps({"model": MODEL, "active_decode_blocks_threshold": 0.1}).encode()
    st, _, data = bl.request("POST", fe.url + "/busy_threshold", raw, {"Content-Type": "application/json"})
    assert st == 200 and b'"active_decode_blocks_threshold":0.1' in data and b"0.1000" not in data, (st, data)
    st, _, data = bl.request("GET", fe.url + "/busy_threshold")
    assert st == 200 and b'"active_decode_blocks_threshold":0.1' in data and b"0.1000" not in data, (st, data)
    raw = json.dumps({"model": MODEL, "active_decode_blocks_threshold": None}).encode()
    st, _, data = bl.request("POST", fe.url + "/busy_threshold", raw, {"Content-Type": "application/json"})
    assert st == 200, (st, data)
    print("busy_threshold: out-of-range prefill thresholds refused with 400, nothing changed; HEAD answered as GET; "
          "0.1 echoed as 0.1")


def worker_cancels(w, kind):
    return bl.metric_sum(bl.metrics(w.system_url), "dynamo_component_cancellation_total", kind=kind)


BAD_BODIES = [b"{}", b"[]", b'{"mode":5}', b'{"mode":null}', b'{"mode":"pause"}', b'"stop"', b"null",
              b'{"Mode":"kill"}', b"{bad json"]


def cancel_bodies(fe, w):
    body = bl.chat_body("operator api", max_tokens=300, return_token_ids=True)
    ref = bl.stream_chat(fe.url, body).assert_ok("reference")
    assert len(ref.token_ids) == 300 and ref.finish_reason == "length", ref.summary()
    stops0, kills0 = worker_cancels(w, "stop"), worker_cancels(w, "kill")

    answers = []
    running = {}

    def on_event(s, ev):
        if len(s.token_ids) >= 5 and not answers:
            for raw in BAD_BODIES:
                st, _, data = bl.request("POST", fe.url + "/v1/requests/op-api-1/cancel", raw,
                                         {"Content-Type": "application/json"})
                answers.append((raw, st, data))
            # the id named a running request: a well-formed cancel would have found it (checked
            # below with the empty body), so a 400 here is the body's verdict, not a 404 in disguise
            running["tokens"] = len(s.token_ids)
        return False

    s = bl.stream_chat(fe.url, body, on_event=on_event, headers={"X-Request-Id": "op-api-1"}, timeout=30)
    assert len(answers) == len(BAD_BODIES), answers
    for raw, st, data in answers:
        b = json.loads(data)
        assert st == 400 and b["error"]["type"] == "invalid_request_error", (raw, st, data)
    s.assert_ok("the request the refused cancels named")
    assert s.finish_reason == "length" and s.token_ids == ref.token_ids and s.text == ref.text, \
        f"a refused cancel changed the request: {s.summary()}"
    assert worker_cancels(w, "stop") == stops0 and worker_cancels(w, "kill") == kills0, \
        "a refused cancel reached the worker"
    assert running["tokens"] < 300, "the refused cancels came after the request had ended"

    # an empty body is a stop
    marks = {}

    def on_event2(s, ev):
        if len(s.token_ids) >= 5 and "st" not in marks:
            st, _, data = bl.request("POST", fe.url + "/v1/requests/op-api-2/cancel", b"")
            marks["st"], marks["body"] = st, json.loads(data)
        return False

    s2 = bl.stream_chat(fe.url, body, on_event=on_event2, headers={"X-Request-Id": "op-api-2"}, timeout=30)
    assert marks["st"] == 200 and marks["body"]["mode"] == "stop", marks
    s2.assert_ok("the request stopped with an empty body")
    assert s2.finish_reason == "cancelled" and len(s2.token_ids) < 300, s2.summary()
    assert s2.token_ids == ref.token_ids[:len(s2.token_ids)]
    assert worker_cancels(w, "stop") == stops0 + 1
    print(f"cancel: {len(BAD_BODIES)} malformed bodies refused with 400 while the request ran, which then "
          f"completed byte-exact; an empty body stopped another after {len(s2.token_ids)} tokens")


def main():
    with bl.Cluster() as c:
        fe = c.start_frontend()
        w = c.start_worker(system_port=True, wait=True, speedup_ratio=1)
        c.wait_workers(fe, 1)
        busy_threshold(fe)
        cancel_bodies(fe, w)
    print("test_operator_api: ok")


main()
