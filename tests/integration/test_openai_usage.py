"""Usage through carried tokens, on the mocker and through the `openai` engine, with the real
binaries (docs/engines.md §2.6):

1. A baton upstream U (frontend + mocker) given `carried_token_ids` bills the run they continue:
   the same prompt_tokens and completion_tokens as the uninterrupted run (max_tokens counts new
   tokens only), and carried_tokens naming the carried ones; whole and streamed (include_usage),
   ending on max_tokens and on a stop string.
2. An outer frontend F0 whose three workers run `--engine openai` against U: the worker serving a
   stream is killed (-9) at 100 of its 300 tokens, and the worker serving a whole (unary) chat
   answer mid-way. The continuation reaches U with the delivered ids as carried_token_ids; each
   answer must equal U's own for the same body: text, ids, and usage (completion_tokens 300, not
   300 less the carried tokens).
"""

import signal
import sys
import threading
import time

import batonlib as bl

SPEEDUP = 1.0  # the upstream mocker: ~6 ms a token


def msum(url, name, **labels):
    return bl.metric_sum(bl.metrics(url), name, **labels)


def unary(url, path, body):
    st, _, b = bl.post_json(url + path, body, timeout=30)
    assert st == 200, (st, b)
    return b


def check_upstream(u):
    run = lambda **kw: bl.completion_body("carry me along", return_token_ids=True, seed=7, **kw)
    full = unary(u.url, "/v1/completions", run(max_tokens=40))
    ids = full["choices"][0]["token_ids"]
    words = full["choices"][0]["text"].split()
    stop = [words[len(words) * 2 // 3]]
    for st in (None, stop):
        extra = {"stop": st} if st else {}
        ref = unary(u.url, "/v1/completions", run(max_tokens=40, **extra))
        n = len(ref["choices"][0]["token_ids"]) // 2 if st else 10
        body = run(max_tokens=40 - n, carried_token_ids=ids[:n], **extra)
        got = unary(u.url, "/v1/completions", body)
        want = dict(ref["usage"], carried_tokens=n)
        assert got["usage"] == want, f"stop {st}: usage {got['usage']}, want {want}"
        assert got["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"][n:], (got, ref)
        s = bl.stream_completion(u.url, dict(body, stream=True, stream_options={"include_usage": True}), timeout=30)
        s.assert_ok("streamed continuation")
        assert s.usage == want and s.token_ids == got["choices"][0]["token_ids"], (s.summary(), s.usage, want)
        print(f"upstream, {n} carried, stop {st}: usage {got['usage']} (whole and streamed), the run's {ref['usage']}")


def serving(ps):
    busy = [p for p in ps if p.proc.alive() and msum(p.system_url, "baton_worker_active_sequences") > 0]
    return busy[0] if len(busy) == 1 else None


def check_migrated(u, f0, ps):
    body = bl.completion_body("a long story", max_tokens=300, seed=11, return_token_ids=True)
    ref = unary(u.url, "/v1/completions", body)
    killed = {}

    def kill(st, obj):
        if len(st.token_ids) >= 100 and not killed:
            p = serving(ps)
            if p:
                killed["at"] = len(st.token_ids)
                p.proc.kill(signal.SIGKILL)
        return False

    s = bl.stream_completion(f0.url, dict(body, stream=True, stream_options={"include_usage": True}), timeout=60,
                             on_event=kill)
    s.assert_ok("migrated stream")
    assert killed, "the openai worker serving the stream was not found"
    assert s.text == ref["choices"][0]["text"] and s.token_ids == ref["choices"][0]["token_ids"], s.summary()
    assert s.usage == ref["usage"], f"migrated stream usage {s.usage}, want {ref['usage']}"
    print(f"stream moved at {killed['at']} tokens: usage {s.usage}")


def check_migrated_unary(u, f0, ps):
    chat = bl.chat_body("a long chat", max_tokens=300, seed=12, return_token_ids=True)
    ref = unary(u.url, "/v1/chat/completions", chat)
    out = {}
    th = threading.Thread(target=lambda: out.update(r=unary(f0.url, "/v1/chat/completions", chat)))
    th.start()
    victim = None
    deadline = time.monotonic() + 10
    while victim is None and time.monotonic() < deadline:
        victim = serving(ps)
        time.sleep(0.05)
    assert victim, "the openai worker serving the whole answer was not found"
    time.sleep(0.8)  # about 130 of its 300 tokens
    victim.proc.kill(signal.SIGKILL)
    th.join(60)
    r = out["r"]
    assert r["choices"][0]["message"] == ref["choices"][0]["message"], (r, ref)
    assert r["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
    assert r["usage"] == ref["usage"], f"migrated unary usage {r['usage']}, want {ref['usage']}"
    print(f"whole chat answer moved: usage {r['usage']}")


def main():
    bl.deadline(60, "test_openai_usage")
    up = bl.Cluster(tmpdir_path=bl.tmpdir("baton-oau-up-"))
    outer = bl.Cluster(tmpdir_path=bl.tmpdir("baton-oau-outer-"))
    try:
        u = up.start_frontend()
        up.start_worker(wait=True, speedup_ratio=SPEEDUP)
        up.wait_workers(u, 1)
        check_upstream(u)
        f0 = outer.start_frontend(migration_limit=3)
        ps = [outer.start_worker(engine="openai", upstream=u.url, system_port=True) for _ in range(3)]
        outer.wait_workers(f0, 3)
        mig0 = msum(f0.url, "dynamo_frontend_model_migration_total")
        check_migrated(u, f0, ps)
        check_migrated_unary(u, f0, ps)
        moved = msum(f0.url, "dynamo_frontend_model_migration_total") - mig0
        assert moved == 2, f"{moved} migrations, want 2"
    except BaseException:
        bl.mark_failed()
        up.dump_logs(40)
        outer.dump_logs(40)
        raise
    finally:
        outer.close()
        up.close()
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
