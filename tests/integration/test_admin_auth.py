"""The operator endpoints behind --admin-api-key, through the real binaries.

  1. With --api-key and --admin-api-key (the flags, or their twins DYN_API_KEY and
     BATON_ADMIN_API_KEY): GET, HEAD and POST /busy_threshold and /admission without a key, with
     the API key, with another key or another scheme get the API's 401 (OpenAI's error body, code
     invalid_api_key, WWW-Authenticate: Bearer) and change nothing (GET with the admin key shows
     the values as they were); with `Authorization: Bearer ADMIN` (the scheme in any case) they
     answer and POST sets. The admin key does not open the API (chat, /v1/models: 401); the API
     key does. POST /v1/requests/{id}/cancel takes either key (an unknown id: 404 request_not_found,
     past the check) and nothing else (401); the admin key stops a running request of an API
     client, which ends with finish_reason "cancelled".
  2. /metrics under --metrics-api-key-required takes either key, nothing else.
  3. Without --admin-api-key, as before: the API key opens /busy_threshold and /admission, no key
     does not. With --admin-api-key and no --api-key the API is open and the operator endpoints
     need the admin key.
  4. `baton run` forwards --admin-api-key to its frontend: there too the API key is refused on
     /busy_threshold and the admin key accepted.
  6. Who may cancel: with --trust-tenant-header a caller is its X-Tenant, and a cancel names only
     its caller's requests. Tenant B naming tenant A's running request (its client-chosen id)
     gets 404 and A's request runs on; with no X-Tenant, 404 too; A's own cancel stops it. Two
     tenants running requests with the same id: A's cancel stops A's only, B's ends with its 300
     tokens (finish_reason "length"). The admin key, without X-Tenant, stops B's.
  7. Without --trust-tenant-header an X-Tenant a client sends says nothing: a cancel with another
     X-Tenant (and the API key) stops the request, and no tenant label in /metrics is the header's.
  5. The same key for both is a start-up error (exit 2) for `baton frontend` and `baton run`.
     --metrics-api-key-required with only --admin-api-key starts, and /metrics then needs that key.
"""

import json
import os
import subprocess
import threading

import batonlib as bl

bl.deadline(150, "test_admin_auth")
BIN = bl.baton_bin()
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "BATON_", "NATS_", "ETCD_"))}
KEY = "sk-api-key"
ADMIN = "sk-admin-key"
MODEL = "mock-model"


def auth(k):
    return {"Authorization": f"Bearer {k}"}


def check_401(st, hdrs, data, what):
    assert st == 401, f"{what}: {st} {data[:200]!r}"
    err = json.loads(data)["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error", (what, err)
    assert hdrs.get("www-authenticate", "").startswith("Bearer"), (what, hdrs)


def threshold(fe, headers):
    st, _, g = bl.get_json(fe.url + "/busy_threshold", headers)
    assert st == 200, (st, g)
    (t,) = [t for t in g["thresholds"] if t["model"] == MODEL]
    return t["active_prefill_tokens_threshold"]


def admission(fe, headers):
    st, _, g = bl.get_json(fe.url + "/admission", headers)
    assert st == 200, (st, g)
    return g


def set_threshold(fe, headers, value):
    return bl.request("POST", fe.url + "/busy_threshold", {"model": MODEL, "active_prefill_tokens_threshold": value},
                      headers)


def set_admission(fe, headers, value):
    return bl.request("POST", fe.url + "/admission", {"queue_timeout": value}, headers)


def operator_refused(fe, headers, what):
    """Every operator endpoint refuses `headers` with the 401, and nothing changes."""
    t0, a0 = threshold(fe, auth(ADMIN)), admission(fe, auth(ADMIN))
    for method, path in (("GET", "/busy_threshold"), ("GET", "/admission")):
        check_401(*bl.request(method, fe.url + path, None, headers), f"{what}: {method} {path}")
        st, _, data = bl.request("HEAD", fe.url + path, None, headers)
        assert st == 401 and data == b"", f"{what}: HEAD {path} -> {st}"
    check_401(*set_threshold(fe, headers, 1234), f"{what}: POST /busy_threshold")
    check_401(*set_admission(fe, headers, 7), f"{what}: POST /admission")
    assert threshold(fe, auth(ADMIN)) == t0 and admission(fe, auth(ADMIN)) == a0, f"{what}: a refused POST changed"


def operator_opened(fe, headers, what, value):
    st, _, data = set_threshold(fe, headers, value)
    assert st == 200 and json.loads(data)["active_prefill_tokens_threshold"] == value, (what, st, data)
    assert threshold(fe, headers) == value, what
    st, _, data = set_admission(fe, headers, value % 100 + 1)
    assert st == 200, (what, st, data)
    assert admission(fe, headers)["queue_timeout"] == value % 100 + 1, (what, admission(fe, headers))
    st, _, data = bl.request("HEAD", fe.url + "/admission", None, headers)
    assert st == 200 and data == b"", (what, st)


def both_keys(c, fe, w, how):
    for headers, what in ((None, "no key"), (auth(KEY), "the API key"), (auth("wrong"), "another key"),
                          ({"Authorization": f"Basic {ADMIN}"}, "the admin key as Basic")):
        operator_refused(fe, headers, f"{how}, {what}")
    operator_opened(fe, auth(ADMIN), f"{how}, the admin key", 4096)
    operator_opened(fe, {"Authorization": f"bearer  {ADMIN}"}, f"{how}, the admin key, lower-case scheme", 2048)
    st, _, _ = set_threshold(fe, auth(ADMIN), None)
    assert st == 200
    # the admin key does not open the API; the API key does
    st, hdrs, data = bl.request("POST", fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=2), auth(ADMIN))
    check_401(st, hdrs, data, f"{how}: chat with the admin key")
    check_401(*bl.request("GET", fe.url + "/v1/models", None, auth(ADMIN)), f"{how}: /v1/models, admin key")
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=2), auth(KEY))
    assert st == 200, (how, st, b)
    # cancel: either key reaches the endpoint (404 for an id that runs nowhere), nothing else does
    for k in (KEY, ADMIN):
        st, _, b = bl.post_json(fe.url + "/v1/requests/no-such-request/cancel", {"mode": "stop"}, auth(k))
        assert st == 404 and b["error"]["code"] == "request_not_found", (how, k, st, b)
    for headers in (None, auth("wrong")):
        check_401(*bl.request("POST", fe.url + "/v1/requests/no-such-request/cancel", {"mode": "stop"}, headers),
                  f"{how}: cancel with {headers}")
    print(f"{how}: operator endpoints need the admin key (401 otherwise, nothing changed); the admin key "
          f"does not open the API; cancel takes either key")


def admin_cancels(fe):
    rid = "admin-cancel-1"
    marks = {}

    def on_event(s, ev):
        if len(s.token_ids) >= 3 and "st" not in marks:
            marks["st"], _, marks["body"] = bl.post_json(fe.url + f"/v1/requests/{rid}/cancel", {"mode": "stop"},
                                                         auth(ADMIN))
        return False

    s = bl.stream_chat(fe.url, bl.chat_body("admin cancel", max_tokens=300, return_token_ids=True),
                       on_event=on_event, headers={"X-Request-Id": rid, **auth(KEY)}, timeout=30)
    assert marks.get("st") == 200 and marks["body"]["status"] == "cancelling", marks
    s.assert_ok("the request the admin key stopped")
    assert s.finish_reason == "cancelled" and len(s.token_ids) < 300, s.summary()
    print(f"the admin key stopped an API client's request after {len(s.token_ids)} tokens")


def cancel(fe, rid, headers):
    st, _, b = bl.post_json(fe.url + f"/v1/requests/{rid}/cancel", {"mode": "stop"}, headers)
    return st, b


def tenant_cancels(fe):
    body = bl.chat_body("tenant cancel", max_tokens=300, return_token_ids=True)
    a_hdrs = {"X-Tenant": "tenant-a", **auth(KEY)}
    b_hdrs = {"X-Tenant": "tenant-b", **auth(KEY)}
    # B (and a caller without X-Tenant) name A's running request: 404, it runs on; A stops it
    marks = {}

    def on_event(s, ev):
        if len(s.token_ids) >= 3 and "b" not in marks:
            marks["b"] = cancel(fe, "shared-1", b_hdrs)
            marks["none"] = cancel(fe, "shared-1", auth(KEY))
            marks["at"] = len(s.token_ids)
        if len(s.token_ids) >= marks.get("at", 10**9) + 10 and "a" not in marks:
            marks["a"] = cancel(fe, "shared-1", a_hdrs)
        return False

    s = bl.stream_chat(fe.url, body, on_event=on_event, headers={"X-Request-Id": "shared-1", **a_hdrs}, timeout=30)
    for who in ("b", "none"):
        st, b = marks[who]
        assert st == 404 and b["error"]["code"] == "request_not_found", (who, st, b)
    assert marks.get("a", (None,))[0] == 200, marks
    s.assert_ok("A's request")
    assert s.finish_reason == "cancelled" and marks["at"] + 10 <= len(s.token_ids) < 300, s.summary()
    print(f"tenant B's cancel of A's request: 404, A's went on to {len(s.token_ids)} tokens and A's own stopped it")

    # the same id in two tenants: A's cancel stops A's only; the admin key stops B's
    results = {}
    started = {}

    def run(name, hdrs, rid):
        def ev(s, e):
            if len(s.token_ids) >= 3:
                started[name] = True
            return False
        results[name] = bl.stream_chat(fe.url, body, on_event=ev, headers={"X-Request-Id": rid, **hdrs}, timeout=30)

    tb = threading.Thread(target=run, args=("b", b_hdrs, "dup-1"))
    ta = threading.Thread(target=run, args=("a", a_hdrs, "dup-1"))
    tb.start()
    ta.start()
    bl.wait_for(lambda: started.get("a") and started.get("b"), timeout=20, what="both streams running")
    st, b = cancel(fe, "dup-1", a_hdrs)
    assert st == 200, (st, b)
    ta.join(30)
    tb.join(30)
    ra, rb = results["a"], results["b"]
    ra.assert_ok("A's dup-1")
    rb.assert_ok("B's dup-1")
    assert ra.finish_reason == "cancelled" and len(ra.token_ids) < 300, ra.summary()
    assert rb.finish_reason == "length" and len(rb.token_ids) == 300, f"A's cancel reached B's request: {rb.summary()}"
    # the operator: any caller's request
    marks = {}

    def on_admin(s, ev):
        if len(s.token_ids) >= 3 and "st" not in marks:
            marks["st"] = cancel(fe, "b-2", auth(ADMIN))
        return False

    s = bl.stream_chat(fe.url, body, on_event=on_admin, headers={"X-Request-Id": "b-2", **b_hdrs}, timeout=30)
    assert marks["st"][0] == 200, marks
    assert s.finish_reason == "cancelled" and len(s.token_ids) < 300, s.summary()
    print("the same id in two tenants: A's cancel stopped A's only (B's ran to 300 tokens); the admin key stopped B's")


def untrusted_tenant(fe):
    """fe: without --trust-tenant-header. The header is ignored: one caller, labels by the key."""
    marks = {}

    def on_event(s, ev):
        if len(s.token_ids) >= 3 and "st" not in marks:
            marks["st"] = cancel(fe, "untrusted-1", {"X-Tenant": "tenant-b", **auth(KEY)})
        return False

    s = bl.stream_chat(fe.url, bl.chat_body("untrusted tenant", max_tokens=300, return_token_ids=True),
                       on_event=on_event, headers={"X-Request-Id": "untrusted-1", "X-Tenant": "tenant-a", **auth(KEY)},
                       timeout=30)
    assert marks.get("st", (None,))[0] == 200, f"a cancel with another X-Tenant, untrusted: {marks}"
    s.assert_ok("the request sent with an untrusted X-Tenant")
    assert s.finish_reason == "cancelled" and len(s.token_ids) < 300, s.summary()
    st, _, data = bl.request("GET", fe.url + "/metrics")
    text = data.decode()
    assert st == 200 and 'tenant="key-' in text and "tenant-a" not in text and "tenant-b" not in text, \
        (st, [line for line in text.splitlines() if "tenant=" in line])
    print("without --trust-tenant-header X-Tenant is ignored: another tenant's cancel stopped the request; "
          "labels by the key")


def metrics_either(fe):
    for k in (KEY, ADMIN):
        st, _, data = bl.request("GET", fe.url + "/metrics", None, auth(k))
        assert st == 200 and b"dynamo_frontend_requests_total" in data, (k, st, data[:200])
    for headers in (None, auth("wrong")):
        check_401(*bl.request("GET", fe.url + "/metrics", None, headers), f"/metrics with {headers}")
    print("/metrics under --metrics-api-key-required: either key, nothing else")


with bl.Cluster() as c:
    w = c.start_worker(speedup_ratio=1)
    flag = c.start_frontend(api_key=KEY, admin_api_key=ADMIN)
    twin = c.start_frontend(env={"DYN_API_KEY": KEY, "BATON_ADMIN_API_KEY": ADMIN, "BATON_METRICS_API_KEY_REQUIRED": "1"})
    legacy = c.start_frontend(api_key=KEY)
    admin_only = c.start_frontend(admin_api_key=ADMIN, metrics_api_key_required=True)
    # two threads: a cancel asks every shard (shards.c), with the caller it names
    tenants = c.start_frontend(api_key=KEY, admin_api_key=ADMIN, trust_tenant_header=True, threads=2)
    for fe in (flag, twin, legacy, admin_only, tenants):
        c.wait_workers(fe, 1)

    # 1, 2
    both_keys(c, flag, w, "--admin-api-key")
    both_keys(c, twin, w, "BATON_ADMIN_API_KEY")
    admin_cancels(flag)
    untrusted_tenant(flag)  # 7
    metrics_either(twin)

    # 3. without the admin key, the API key opens the operator endpoints (as before the flag)
    st, hdrs, data = set_threshold(legacy, None, 99)
    check_401(st, hdrs, data, "legacy: no key")
    st, _, data = set_threshold(legacy, auth(KEY), 99)
    assert st == 200 and threshold(legacy, auth(KEY)) == 99, (st, data)
    st, _, data = set_admission(legacy, auth(KEY), 9)
    assert st == 200 and admission(legacy, auth(KEY))["queue_timeout"] == 9, (st, data)
    # the admin key alone: the API open, the operator endpoints not
    st, _, b = bl.post_json(admin_only.url + "/v1/chat/completions", bl.chat_body(max_tokens=2))
    assert st == 200, (st, b)
    operator_refused(admin_only, None, "admin key only, no key")
    operator_opened(admin_only, auth(ADMIN), "admin key only, the admin key", 512)
    check_401(*bl.request("GET", admin_only.url + "/metrics"), "admin key only: /metrics without a key")
    st, _, data = bl.request("GET", admin_only.url + "/metrics", None, auth(ADMIN))
    assert st == 200 and b"dynamo_frontend_requests_total" in data, (st, data[:200])
    print("without --admin-api-key the API key opens the operator endpoints; with it alone the API is open and "
          "they are not")

    # 6. tenants cancel their own requests only
    tenant_cancels(tenants)

    # 4. baton run forwards the flag
    run = c.start_run(workers=1, speedup_ratio=50, api_key=KEY, admin_api_key=ADMIN, system_port=-1)
    check_401(*set_threshold(run, auth(KEY), 5), "baton run: the API key on /busy_threshold")
    st, _, data = set_threshold(run, auth(ADMIN), 5)
    assert st == 200 and threshold(run, auth(ADMIN)) == 5, (st, data)
    print("baton run: --admin-api-key reaches the frontend")

# 5. start-up checks
for args, env, what in ((["frontend", "--api-key", "same", "--admin-api-key", "same"], None, "frontend flags"),
                        (["frontend"], {"DYN_API_KEY": "same", "BATON_ADMIN_API_KEY": "same"}, "frontend twins"),
                        (["run", "--api-key", "same", "--admin-api-key", "same"], None, "baton run")):
    e = dict(CLEAN_ENV)
    e.update(env or {})
    p = subprocess.run([BIN] + args + ["--http-port", str(bl.free_port())], env=e, capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 2, f"{what}: exit {p.returncode}, expected 2\n{p.stderr}"
    assert "--admin-api-key" in p.stderr and "must differ" in p.stderr, f"{what}: {p.stderr}"
print("the same key for --api-key and --admin-api-key: exit 2")
print("test_admin_auth: OK")
