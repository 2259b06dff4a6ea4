"""The worker's --default-max-tokens is the one default of a request that sets no limit.

  * one worker started with --default-max-tokens 37 behind a frontend: requests without a limit
    (chat and completions, streaming and not) get exactly 37 tokens and finish_reason "length"
    (the frontend used to send its own 256, so the worker's flag did nothing behind it); an
    explicit max_tokens or max_completion_tokens still wins;
  * migration: two workers with --default-max-tokens 300; a stream without a limit is cut by
    kill -9 of its worker after at least 20 tokens; the continuation on the other worker stops at
    300 tokens in all, byte-exact against a fault-free run: the carried tokens count against the
    default, which is the request's whole budget.
"""

import signal

import batonlib as bl

bl.deadline(150, "test_default_max_tokens")


def no_limit(body):
    body.pop("max_tokens", None)
    return body


def defaults(c):
    fe = c.start_frontend()
    c.start_worker(default_max_tokens=37, speedup_ratio=100)
    c.wait_workers(fe, 1)
    for api in ("chat", "completion"):
        mk = bl.chat_body if api == "chat" else bl.completion_body
        stream = bl.stream_chat if api == "chat" else bl.stream_completion
        b = no_limit(mk(f"default budget {api}", return_token_ids=True))
        s = stream(fe.url, dict(b, stream=True)).assert_ok(f"{api} stream without max_tokens")
        assert len(s.token_ids) == 37 and s.finish_reason == "length", s.summary()
        path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
        st, _, r = bl.post_json(fe.url + path, b)
        assert st == 200, (st, r)
        assert r["usage"]["completion_tokens"] == 37 and r["choices"][0]["finish_reason"] == "length", r
        assert r["choices"][0]["token_ids"] == s.token_ids, "unary and streaming outputs differ"
        # an explicit limit still wins, in either spelling
        st, _, r = bl.post_json(fe.url + path, dict(b, max_tokens=5))
        assert st == 200 and r["usage"]["completion_tokens"] == 5, r
    st, _, r = bl.post_json(fe.url + "/v1/chat/completions",
                            no_limit(bl.chat_body("mct", max_completion_tokens=6)))
    assert st == 200 and r["usage"]["completion_tokens"] == 6, r
    print("a request without max_tokens gets the worker's --default-max-tokens (37), streaming and not")


def active(w):
    return bl.metric_sum(bl.metrics(w.system_url, timeout=5), "baton_worker_active_sequences")


def migration(c):
    fe = c.start_frontend(migration_limit=3)
    ws = [c.start_worker(system_port=True, wait=True, default_max_tokens=300, speedup_ratio=1) for _ in range(2)]
    c.wait_workers(fe, 2)
    body = no_limit(bl.chat_body("default budget across a migration", return_token_ids=True))
    ref = bl.stream_chat(fe.url, dict(body, stream=True)).assert_ok("reference")
    assert len(ref.token_ids) == 300 and ref.finish_reason == "length", ref.summary()
    mig0 = bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_model_migration_total")
    killed = {}

    def on_event(s, ev):
        if len(s.token_ids) >= 20 and not killed:
            (victim,) = [w for w in ws if active(w) == 1]
            victim.proc.kill(signal.SIGKILL)
            killed["w"], killed["at"] = victim, len(s.token_ids)
        return False

    s = bl.stream_chat(fe.url, dict(body, stream=True), on_event=on_event, timeout=60)
    assert killed, "the stream ended before the kill"
    victim = killed["w"]
    victim.proc.wait(5)
    assert not victim.proc.alive(), "the serving worker did not die"
    assert bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_model_migration_total") - mig0 == 1, "no migration"
    s.assert_ok("stream across the migration")
    assert killed["at"] < 300
    assert len(s.token_ids) == 300, f"{len(s.token_ids)} tokens after a migration at {killed['at']} " \
                                    f"(the default of 300 is the whole budget): {s.summary()}"
    assert s.finish_reason == "length" and s.token_ids == ref.token_ids and s.text == ref.text, s.summary()
    print(f"migration after {killed['at']} tokens: 300 in all, byte-exact (the carried tokens count against "
          f"the default)")


def main():
    for part in (defaults, migration):  # each on a cluster of its own
        with bl.Cluster() as c:
            part(c)
    print("test_default_max_tokens: ok")


main()
