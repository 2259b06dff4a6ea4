"""Request priority through the real binaries: the frontend settles it (body `priority`, else
X-Priority, bounded by the key's --priority-ceiling), the REQUEST payload carries it, and the
mocker admits its waiting sequences by (priority, arrival).

1. One saturated worker (--max-num-seqs 4): 40 priority-10 streams, then 5 priority-0 ones sent
   once the worker's queue holds the rest. The urgent ones get their first token within a third
   of the low-priority median TTFT; every request completes with all its tokens. In FIFO order
   the urgent ones would wait for all 40 (their TTFT would exceed the median).
2. The same with the urgent ones sent under a key whose ceiling is 10: they are clamped to 10 and
   wait their turn (their TTFT is past the low-priority median), while X-Priority is honoured.
3. A bad priority is a 400 naming it (body or header), and nothing is routed.
4. A malformed --priority-ceiling stops the frontend at start-up (exit 2, naming the entry): so
   does a key no Bearer token carries, or a key (or *) given twice.
"""

import statistics
import subprocess
import threading
import time

import batonlib as bl

bl.deadline(200, "test_priority")

LOW_TOKENS, HIGH_TOKENS = 120, 10
N_LOW, N_HIGH = 40, 5


def run_round(fe, high_headers, high_body_extra, low_headers):
    """Sends N_LOW low-priority streams, waits for the worker's queue to hold most of them, then
    N_HIGH urgent ones. Returns (low streams, high streams)."""
    low, high = [None] * N_LOW, [None] * N_HIGH

    def low_one(i):
        low[i] = bl.stream_chat(fe.url, bl.chat_body(f"low {i}", max_tokens=LOW_TOKENS, return_token_ids=True), timeout=120,
                                headers=low_headers)

    def high_one(i):
        high[i] = bl.stream_chat(fe.url, bl.chat_body(f"high {i}", max_tokens=HIGH_TOKENS, return_token_ids=True,
                                                        **high_body_extra),
                                 timeout=120, headers=high_headers)

    ts = [threading.Thread(target=low_one, args=(i,)) for i in range(N_LOW)]
    for t in ts:
        t.start()
    # the worker holds 4 running and the rest waiting (its load report's waiting count)
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_waiting_requests") >= N_LOW - 8, 20,
                what="the worker's waiting queue to fill")
    hs = [threading.Thread(target=high_one, args=(i,)) for i in range(N_HIGH)]
    for t in hs:
        t.start()
    for t in ts + hs:
        t.join(150)
    for s in low + high:
        assert s is not None, "a request thread did not finish"
        s.assert_ok("a prioritised request")
    for s in low:
        assert len(s.token_ids) == LOW_TOKENS and s.finish_reason == "length", s.summary()
    for s in high:
        assert len(s.token_ids) == HIGH_TOKENS and s.finish_reason == "length", s.summary()
    return low, high


def ttfts(streams):
    return [s.t_first - s.t_start for s in streams]


with bl.Cluster() as c:
    fe = c.start_frontend(priority_ceiling="lowkey=10")
    c.start_worker(max_num_seqs=4, speedup_ratio=1)
    c.wait_workers(fe, 1)

    # --- 1. urgent requests overtake the waiting ones: body priority 0 against X-Priority 10
    low, high = run_round(fe, None, {"priority": 0}, {"X-Priority": "10"})
    med = statistics.median(ttfts(low))
    worst_high = max(ttfts(high))
    print(f"priority: low median TTFT {med:.2f}s, urgent TTFTs {[round(x, 2) for x in ttfts(high)]}")
    assert med > 1.0, f"the worker was not saturated (low-priority median TTFT {med:.2f}s)"
    assert worst_high <= med / 3, f"urgent TTFT {worst_high:.2f}s is over a third of the low median {med:.2f}s"

    # --- 2. a key whose ceiling is 10 cannot jump the queue by asking for 0
    low, high = run_round(fe, {"Authorization": "Bearer lowkey"}, {"priority": 0}, {"X-Priority": "10"})
    med = statistics.median(ttfts(low))
    best_high = min(ttfts(high))
    print(f"ceiling: low median TTFT {med:.2f}s, clamped TTFTs {[round(x, 2) for x in ttfts(high)]}")
    assert best_high > med, f"a clamped request ({best_high:.2f}s) overtook the median low one ({med:.2f}s)"

    # --- 3. a bad priority is refused before anything is routed
    routed0 = bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_routed_total")
    for body, headers, param in ((bl.chat_body("x", priority="1"), None, "priority"),
                                 (bl.chat_body("x", priority=1.5), None, "priority"),
                                 (bl.chat_body("x", priority=1000001), None, "priority"),
                                 (bl.chat_body("x"), {"X-Priority": "soon"}, None),
                                 (bl.chat_body("x"), {"X-Priority": "-1000001"}, None)):
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body, headers=headers)
        assert st == 400, (body, headers, st, b)
        err = b["error"]
        assert err["code"] == "invalid_value" and err["param"] == param and "riority" in err["message"], err
    assert bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_routed_total") == routed0, \
        "a refused request was routed"
    # the edge of the range is accepted (and the body wins over the header)
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("x", priority=-1000000, max_tokens=2),
                            headers={"X-Priority": "junk-ignored"})
    assert st == 200, b
# --- 4. a malformed ceiling is a start-up error naming the entry by its place, never its key
for spec, bad in (("secretk=soon", "entry 1: 'soon'"), ("=3", "entry 1 is not"),
                  ("secretk=1,*=2000000", "entry 2: '2000000'"), ("secretk", "entry 1 is not"),
                  ("secret k=1", "entry 1: the key holds a blank"), ("*=1, *=2", "entry 2 repeats the key of entry 1"),
                  ("secretk = 1, secretk=2", "entry 2 repeats the key of entry 1")):
    p = subprocess.run([bl.baton_bin(), "frontend", "--priority-ceiling", spec, "--http-port", "0"],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "--priority-ceiling" in p.stderr and bad in p.stderr, (spec, p.returncode, p.stderr)
    assert "secretk" not in p.stderr + p.stdout, p.stderr
# with --api-key, only that key opens the API: a ceiling for another key is refused (test_cli_errors);
# without one, a key allowed more urgent work than '*' can be claimed by any caller: said at start
with bl.Cluster() as c:
    open_fe = c.start_frontend(priority_ceiling="vipkey=-10,*=0")
    open_fe.proc.wait_log(r"1 key\(s\) may ask for more urgent work than every other caller, but without --api-key")
    keyed = c.start_frontend(priority_ceiling="vipkey=-10,*=0", api_key="vipkey")
    assert "may ask for more urgent work" not in keyed.proc.log_text()
    assert "vipkey" not in open_fe.proc.log_text() + keyed.proc.log_text(), "a key was logged"
print("test_priority: ok")
