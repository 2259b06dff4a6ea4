"""The openai engine before an upstream whose answers are unusual but legal, or plainly wrong, with
the real binaries (docs/engines.md §2.2, §2.4):

1. Usage after a raw-completion migration: a server of its own that streams one word per chunk and
   counts words as tokens (a prompt of 3 words: usage 3 / 60 / 63). Two workers behind one
   frontend; the one serving is killed (-9) at 16 chunks, and the stream continues as a raw
   completion of prompt + delivered text on the other. The usage must be the run's, 3 / 60 / 63,
   streamed and whole, completion and chat (llama.cpp's /apply-template), not the delivered text
   counted in the prompt too.
2. A content string holding U+0000 reaches the client as it was sent (\\u0000 in the JSON); an
   event that is not JSON ends that request with an error, and both workers stay in service: a
   new request right after succeeds on each.
3. An HTTP 400 whose error names a `param` reaches the client with that param.
4. An upstream that holds its connection open after [DONE]: the client's stream ends at [DONE].
"""

import json
import os
import signal
import sys
import threading
import time

import batonlib as bl
from fakeupstream import FakeHandler, serve

DELAY = 0.02  # seconds between chunks
HOLD = 3.0  # seconds the server holds a connection open after [DONE] ("hold" prompts)


def quirk_server(port):
    """Raw completions of words: the text continues the prompt, " w<k>" with k a function of the
    word count, so prompt + delivered text continues exactly. Usage counts words. A chat renders as
    "user: <content> assistant:" (/apply-template answers that, owned_by llamacpp). Prompts that
    hold a marker word change the answer: "nul" puts U+0000 in the 3rd chunk, "malformed" sends a
    broken event after 5 chunks, "badparam" is a 400 naming temperature, "hold" keeps the
    connection open after [DONE]."""

    def render(msgs):
        return "".join(f"{m.get('role')}: {m.get('content')}\n" for m in msgs) + "assistant:"

    class H(FakeHandler):
        model_id = "quirk"
        owned_by = "llamacpp"

        def do_POST(self):
            body = self.read_json()
            if self.path == "/apply-template":
                return self.send_json(200, {"prompt": render(body.get("messages") or [])})
            chat = self.path == "/v1/chat/completions"
            prompt = render(body.get("messages") or []) if chat else str(body.get("prompt"))
            words = prompt.split()
            if "badparam" in words:
                return self.send_json(400, {"error": {"message": "temperature must be at most 2", "type":
                                                      "invalid_request_error", "param": "temperature",
                                                      "code": "invalid_value"}})
            n = int(body.get("max_tokens") or 16)
            head = {"id": "q", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1,
                    "model": "quirk"}
            self.start_sse()
            try:
                for k in range(n):
                    w = f" w{(len(words) + k) * 7 % 101}"
                    if "nul" in words and k == 2:
                        w = " a\u0000b"
                    if "malformed" in words and k == 5:
                        self.chunk(b"{not json")
                    c = {"index": 0, "finish_reason": None if k < n - 1 else "length"}
                    if chat:
                        c["delta"] = {"content": w}
                    else:
                        c["text"] = w
                    self.chunk(dict(head, choices=[c]))
                    time.sleep(DELAY)
                self.chunk(dict(head, choices=[], usage={"prompt_tokens": len(words), "completion_tokens": n,
                                                         "total_tokens": len(words) + n}))
                if "hold" in words:
                    self.chunk(b"[DONE]")
                    time.sleep(HOLD)
                    self.close_connection = True
                    return
                self.end_sse()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    serve(H, port)


def msum(url, name):
    return bl.metric_sum(bl.metrics(url), name)


def serving(ws):
    busy = [w for w in ws if w.proc.alive() and msum(w.system_url, "baton_worker_active_sequences") > 0]
    return busy[0] if len(busy) == 1 else None


def migrated_usage(fe, ws, api, stream):
    """Kills the serving worker at 16 chunks; the usage must be the run's."""
    want = {"prompt_tokens": 3, "completion_tokens": 60, "total_tokens": 63}
    body = (bl.chat_body("usage", max_tokens=60) if api == "chat"
            else bl.completion_body("usage run one", max_tokens=60))
    killed = {}
    if stream:
        def kill(st, obj):
            if len(st.t_tokens) >= 16 and not killed:
                w = serving(ws)
                if w:
                    killed["w"] = w
                    w.proc.kill(signal.SIGKILL)
            return False
        fn = bl.stream_chat if api == "chat" else bl.stream_completion
        s = fn(fe.url, dict(body, stream_options={"include_usage": True}), timeout=30, on_event=kill)
        s.assert_ok(f"{api} stream")
        usage, text = s.usage, s.text
    else:
        out = {}
        path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
        th = threading.Thread(target=lambda: out.update(r=bl.post_json(fe.url + path, body, timeout=30)))
        th.start()
        deadline = time.monotonic() + 10
        while "w" not in killed and time.monotonic() < deadline:
            w = serving(ws)
            if w:
                time.sleep(16 * DELAY)
                killed["w"] = w
                w.proc.kill(signal.SIGKILL)
            time.sleep(0.01)
        th.join(30)
        st, _, r = out["r"]
        assert st == 200, (st, r)
        usage = r["usage"]
        ch = r["choices"][0]
        text = ch["message"]["content"] if api == "chat" else ch["text"]
    assert killed, "the worker serving the request was not found"
    words = len(text.split())
    assert words == 60, f"{api} stream={stream}: {words} words, want 60: {text!r}"
    usage = {k: usage[k] for k in want}
    assert usage == want, f"{api} stream={stream} after a migration: usage {usage}, want {want}"
    print(f"{api}, stream={stream}: migrated, usage {usage}")


def check_usage(c, fe, ws, api, stream):
    """One migrated request; a new worker then takes the killed one's place, whatever the outcome."""
    try:
        migrated_usage(fe, ws, api, stream)
    finally:
        for w in [w for w in ws if not w.proc.alive()]:
            ws.remove(w)
            ws.append(c.start_worker(engine="openai", upstream=fe.upstream, upstream_raw_completions=True,
                                     system_port=True, wait=True))
        c.wait_workers(fe, 2)


def check_nul(fe, ws):
    """U+0000 in a content string, streamed and whole."""
    s = bl.stream_completion(fe.url, bl.completion_body("nul please", max_tokens=6), timeout=30)
    s.assert_ok("a stream with U+0000")
    assert "\u0000" in s.text and b"\\u0000" in s.raw, s.summary()
    st, _, r = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("nul", max_tokens=6))
    assert st == 200 and "a\u0000b" in r["choices"][0]["message"]["content"], (st, r)


def check_malformed(fe, ws):
    """A broken event: an error for that request, no worker out of service."""
    s = bl.stream_completion(fe.url, bl.completion_body("malformed please", max_tokens=20),
                             timeout=30)
    assert s.error and not s.done and len(s.t_tokens) == 5, s.summary()
    for _ in range(4):  # least-loaded routing spreads them over both workers
        ok = bl.stream_completion(fe.url, bl.completion_body("fine", max_tokens=4), timeout=10)
        ok.assert_ok("a request right after a malformed answer")
    assert "quarantined" not in fe.proc.log_text(), "a worker was quarantined for its upstream's malformed answer"


def check_param(fe, ws):
    """The param of an upstream 400."""
    st, _, r = bl.post_json(fe.url + "/v1/completions", bl.completion_body("badparam", max_tokens=4))
    assert st == 400 and r["error"]["param"] == "temperature", (st, r)
    s = bl.stream_chat(fe.url, bl.chat_body("badparam", max_tokens=4), timeout=10)
    assert s.status == 400 and s.error["param"] == "temperature", s.summary()


def check_hold(fe, ws):
    """[DONE] on a connection the server holds open ends the client's stream."""
    s = bl.stream_completion(fe.url, bl.completion_body("hold it", max_tokens=4), timeout=30)
    s.assert_ok("a stream whose upstream holds its connection after [DONE]")
    assert s.t_end - s.t_tokens[-1] < 1.0, f"the stream ended {s.t_end - s.t_tokens[-1]:.2f} s after its last token"
    print("a stream whose upstream holds its connection after [DONE] ended at [DONE]")


def main():
    bl.deadline(120, "test_openai_upstream_quirks")
    port = bl.free_port()
    srv = bl.Proc([sys.executable, os.path.abspath(__file__), "--server", str(port)], name=f"quirk:{port}")
    url = f"http://127.0.0.1:{port}"
    c = bl.Cluster(tmpdir_path=bl.tmpdir("baton-oa-quirk-"))
    try:
        bl.wait_http(url + "/health", srv, timeout=20)
        fe = c.start_frontend(migration_limit=3)
        fe.upstream = url
        ws = [c.start_worker(engine="openai", upstream=url, upstream_raw_completions=True, system_port=True,
                             wait=True) for _ in range(2)]
        c.wait_workers(fe, 2)
        # every check runs, so that one failing does not hide another
        checks = [(f.__name__, lambda f=f: f(fe, ws)) for f in (check_nul, check_malformed, check_param, check_hold)]
        checks += [(f"usage {api} stream={stream}", lambda a=api, s=stream: check_usage(c, fe, ws, a, s))
                   for api in ("completion", "chat") for stream in (True, False)]
        only = os.environ.get("QUIRK_CHECKS")  # a comma-separated subset, for debugging one alone
        if only:
            checks = [(n, f) for n, f in checks if any(n.startswith(o) for o in only.split(","))]
        failed = []
        for name, fn in checks:
            try:
                fn()
            except AssertionError as e:
                print(f"FAILED {name}: {e}")
                failed.append(name)
        assert not failed, f"failed: {failed}"
    except BaseException:
        bl.mark_failed()
        c.dump_logs(40)
        raise
    finally:
        c.close()
        srv.kill(signal.SIGKILL)
    print("ok")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--server":
        quirk_server(int(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
