"""/metrics of the frontend (one event loop, and two merged) and of the worker pass Prometheus's own
checker, `promtool check metrics`, with no error and no lint warning.

The worker serves a model whose name holds a double quote, a backslash and a line feed: unescaped,
such a label value breaks the whole text for a scraper. The test sends traffic for it and for a
plain model, runs promtool on each /metrics text, and reads the counters back through the label
values (which must round-trip to the exact name). Requests refused before routing (400, 404) are
counted with status "error", under the model "unknown" when no worker serves theirs, one loop and
two merged; a model name holding U+0000 counts there too, not under the model before the NUL. A
worker announcing the model "unknown" (the reserved label) or a name longer than 127 bytes (which
would be served as its first 127) is not registered: the frontend says so in its log and the name
is a 404. A self-check first feeds promtool a broken text
to prove the check can fail. promtool comes from Debian's `prometheus` package (scripts/setup);
without it the test fails, it never passes without running.
"""

import shutil
import subprocess

import batonlib as bl
import fakeworker as fk

bl.deadline(150, "test_metrics_promtool")

WEIRD = 'we"ird\\name\nx'  # a double quote, a backslash and a line feed


def promtool(text, what):
    """Runs `promtool check metrics` on text; returns (exit code, its output)."""
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    return r.returncode, (r.stdout + r.stderr).strip()


def assert_clean(text, what):
    rc, out = promtool(text, what)
    if rc != 0 or out:
        raise AssertionError(f"promtool check metrics on {what}: exit {rc}\n{out}\n--- first 3000 bytes ---\n"
                             f"{text[:3000]}")
    print(f"  promtool: {what} clean ({len(text)} bytes, {text.count(chr(10))} lines)")


def scrape(url):
    st, _, data = bl.request("GET", url.rstrip("/") + "/metrics")
    assert st == 200, (url, st)
    return data.decode()


def check_frontend(fe, n_weird, what):
    text = scrape(fe.url)
    assert_clean(text, what)
    assert "# TYPE dynamo_frontend_disconnected_clients gauge\n" in text, "disconnected_clients is not a gauge"
    m = bl.parse_metrics(text)
    got = bl.metric_sum(m, "dynamo_frontend_requests_total", model=WEIRD, status="success")
    assert got == n_weird, f"{what}: {got} successful requests for the odd model name, expected {n_weird}"
    got = bl.metric_sum(m, "dynamo_frontend_requests_total", model="mock-model", status="success")
    assert got == 2, f"{what}: {got} successful requests for mock-model, expected 2"
    assert bl.metric_sum(m, "baton_frontend_worker_routed_total", model=WEIRD) == n_weird, what


REQ = "dynamo_frontend_requests_total"
LONG = "L" * 200  # longer than the 127 bytes a model name may have


def answer(fw, stream, payload):
    """A fake worker's whole answer: one token, then FINISH."""
    fw.send(fk.tokens(stream, [1], "x"))
    fw.send(fk.finish(stream, fk.FINISH_LENGTH, 1, 1))


def check_refused(fe, what, threads=1):
    """Requests refused before routing (400, 404) count in dynamo_frontend_requests_total with
    status "error": under their model when it is served, else under the one model "unknown" (the
    names clients send never become series); exactly those, nothing else moves."""
    before = bl.parse_metrics(scrape(fe.url))
    sent = {}  # (model, endpoint, request_type) -> refused requests sent

    def refuse(path, body, status, key, raw=None):
        if raw is not None:
            st, _, _ = bl.request("POST", fe.url + path, raw, {"Content-Type": "application/json"})
        else:
            st, _, _ = bl.post_json(fe.url + path, body)
        assert st == status, (what, path, body, raw, st)
        sent[key] = sent.get(key, 0) + 1

    chat, comp = "/v1/chat/completions", "/v1/completions"
    for i in range(4):  # fresh connections: with two loops the kernel spreads them
        bad_role = {"model": "mock-model", "max_tokens": 2, "messages": [{"role": "bot", "content": "hi"}]}
        refuse(chat, bad_role, 400, ("mock-model", "chat_completions", "unary"))
        refuse(comp, bl.completion_body(max_tokens=2, suffix="x", stream=True), 400,
               ("mock-model", "completions", "stream"))
        refuse(chat, bl.chat_body(model=f"nobody-serves-{i}"), 404, ("unknown", "chat_completions", "unary"))
        refuse(comp, {"prompt": "no model"}, 400, ("unknown", "completions", "unary"))
        refuse(chat, None, 400, ("unknown", "chat_completions", "unary"), raw=b"{not json")
        refuse(chat, bl.chat_body(model=f"nobody-serves-{i}", max_tokens=-1, stream=True), 400,
               ("unknown", "chat_completions", "stream"))
        # not mock-model's: the name is not "mock-model"
        refuse(chat, bl.chat_body(model="mock-model\u0000x"), 400, ("unknown", "chat_completions", "unary"))
        # announced by a worker, refused by the frontend: never served, never its own series
        refuse(chat, bl.chat_body(model="unknown"), 404, ("unknown", "chat_completions", "unary"))
        refuse(chat, bl.chat_body(model=LONG), 404, ("unknown", "chat_completions", "unary"))
        refuse(chat, bl.chat_body(model=LONG[:127]), 404, ("unknown", "chat_completions", "unary"))
    text = scrape(fe.url)
    assert_clean(text, what + " after refused requests")
    after = bl.parse_metrics(text)
    for (model, ep, rt), n in sent.items():
        got = (bl.metric_sum(after, REQ, model=model, endpoint=ep, request_type=rt, status="error") -
               bl.metric_sum(before, REQ, model=model, endpoint=ep, request_type=rt, status="error"))
        assert got == n, f"{what}: {got} refused requests counted for {model} {ep} {rt}, expected {n}"
    total = bl.metric_sum(after, REQ) - bl.metric_sum(before, REQ)
    assert total == sum(sent.values()), f"{what}: requests_total moved by {total}, sent {sum(sent.values())}"
    assert "nobody-serves" not in text, f"{what}: a client's model name became a series"
    if threads > 1:  # both loops refused some, and the scrape merged them
        moved = [bl.metric_sum(after, "baton_frontend_thread_requests_total", thread=str(t)) -
                 bl.metric_sum(before, "baton_frontend_thread_requests_total", thread=str(t)) for t in range(threads)]
        assert all(m > 0 for m in moved), f"{what}: refused requests per loop {moved}: one loop got none"
    print(f"  refused requests counted: {what}: {sum(sent.values())}")


def main():
    if not shutil.which("promtool"):
        raise AssertionError("promtool is not on the PATH; scripts/setup installs Debian's prometheus package")
    # the checker itself must be able to fail: an unescaped quote and a family with no HELP
    rc, out = promtool('# TYPE x_total counter\nx_total{model="a"b"} 1\n', "a broken text")
    assert rc != 0, f"promtool accepted a broken text: {out}"
    rc, out = promtool("# TYPE y gauge\ny 1\n", "a family without HELP")
    assert rc != 0 and "no help text" in out, f"promtool did not flag a missing HELP: {rc} {out}"

    with bl.Cluster() as c:
        w_odd = c.start_worker(speedup_ratio=1000, model_name=WEIRD, system_port=True, wait=True)
        c.start_worker(speedup_ratio=1000)
        fe1 = c.start_frontend()
        fe2 = c.start_frontend(threads=2)
        # workers of names the frontend must not register (another implementation's, or an older
        # baton's: a baton worker refuses to start with them)
        fakes = [fk.FakeWorker(c.discovery_dir, answer, model=name) for name in ("unknown", LONG)]
        for fe in (fe1, fe2):
            c.wait_workers(fe, 2)
            fe.proc.wait_log(r"WARN .*discovery key \S+: model name 'unknown' is reserved")
            fe.proc.wait_log(r"WARN .*discovery key \S+: model name of 200 bytes")
            # traffic on fresh connections (with two loops the kernel spreads them), an error, a 404
            for i in range(3):
                st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(f"odd {i}", model=WEIRD,
                                                                                     max_tokens=3))
                assert st == 200 and b["model"] == WEIRD, (st, b)
            for i in range(2):
                s = bl.stream_chat(fe.url, bl.chat_body(f"plain {i}", max_tokens=3, stream=True))
                s.assert_ok()
            st, _, _ = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(model="absent"))
            assert st == 404, st
            st, _, _ = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=-1))
            assert st == 400, st
        check_frontend(fe1, 3, "frontend, one event loop")
        check_frontend(fe2, 3, "frontend, --threads 2 (merged)")
        check_refused(fe1, "frontend, one event loop")
        check_refused(fe2, "frontend, --threads 2 (merged)", threads=2)
        for fw in fakes:
            assert not fw.requests, f"a worker of a refused model name got {len(fw.requests)} requests"
            fw.close()
        text = scrape(w_odd.system_url)
        assert_clean(text, "worker")
        m = bl.parse_metrics(text)
        assert bl.metric_sum(m, "dynamo_component_requests_total", model=WEIRD) >= 6, text[:2000]
    print("test_metrics_promtool: ok")


if __name__ == "__main__":
    main()
