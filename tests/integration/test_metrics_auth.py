"""GET /metrics behind the API key, on demand (--metrics-api-key-required), through the real binary.

  1. By default /metrics is open even with --api-key (load balancers and Prometheus set-ups rely
     on it), while the API needs the key.
  2. With --metrics-api-key-required (or its twin BATON_METRICS_API_KEY_REQUIRED with DYN_API_KEY),
     GET and HEAD /metrics without the key, or with another, get the API's 401 (OpenAI's error
     body, code invalid_api_key, WWW-Authenticate: Bearer); with `Authorization: Bearer KEY`
     (the scheme in any case, as Prometheus's bearer auth sends it) the Prometheus text. The
     probes /live and /health stay open.
  3. The flag without --api-key is a start-up error naming both (exit 2), for `baton frontend` and
     for `baton run`, which checks its frontend's flags before it starts anything.
"""

import json
import os
import subprocess

import batonlib as bl

bl.deadline(90, "test_metrics_auth")
BIN = bl.baton_bin()
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "BATON_", "NATS_", "ETCD_"))}
KEY = "sk-metrics-key"


def get(fe, path, headers=None, method="GET"):
    return bl.request(method, fe.url + path, headers=headers)


def check_401(fe, headers, what):
    st, hdrs, data = get(fe, "/metrics", headers)
    assert st == 401, f"{what}: GET /metrics -> {st}: {data[:200]!r}"
    err = json.loads(data)["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error", (what, err)
    assert hdrs.get("www-authenticate", "").startswith("Bearer"), (what, hdrs)
    assert b"baton_frontend_" not in data, what
    st, _, data = get(fe, "/metrics", headers, method="HEAD")
    assert st == 401 and data == b"", f"{what}: HEAD /metrics -> {st} {data[:100]!r}"


def check_open(fe, headers, what):
    st, hdrs, data = get(fe, "/metrics", headers)
    assert st == 200 and hdrs.get("content-type", "").startswith("text/plain"), f"{what}: {st} {hdrs}"
    assert b"# TYPE dynamo_frontend_requests_total counter" in data, f"{what}: not the metrics text: {data[:200]!r}"


with bl.Cluster() as c:
    c.start_worker()
    default = c.start_frontend(api_key=KEY)
    flag = c.start_frontend(api_key=KEY, metrics_api_key_required=True)
    twin = c.start_frontend(env={"DYN_API_KEY": KEY, "BATON_METRICS_API_KEY_REQUIRED": "1"})
    for fe in (default, flag, twin):
        c.wait_workers(fe, 1)

    # 1. default: open, the API is not
    check_open(default, None, "default, no key")
    st, _, _ = bl.post_json(default.url + "/v1/chat/completions", bl.chat_body(max_tokens=2))
    assert st == 401, f"the API without the key answered {st}"
    print("default: /metrics open with --api-key set, the API refused without the key")

    # 2. required: the key, and only it
    for fe, how in ((flag, "--metrics-api-key-required"), (twin, "BATON_METRICS_API_KEY_REQUIRED=1")):
        check_401(fe, None, f"{how}, no Authorization")
        check_401(fe, {"Authorization": "Bearer wrong-key"}, f"{how}, another key")
        check_401(fe, {"Authorization": f"Basic {KEY}"}, f"{how}, another scheme")
        check_open(fe, {"Authorization": f"Bearer {KEY}"}, f"{how}, the key")
        check_open(fe, {"Authorization": f"bearer {KEY}"}, f"{how}, the key, scheme in lower case")
        for probe in ("/live", "/health"):
            st, _, data = get(fe, probe)
            assert st == 200, f"{how}: {probe} without the key -> {st} {data[:200]!r}"
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=2),
                                headers={"Authorization": f"Bearer {KEY}"})
        assert st == 200, (how, st, b)
    print("required (flag and twin): 401 without the key or with another, 200 with it; /live, /health open")

# 3. the flag needs --api-key
for args, env, what in ((["frontend", "--metrics-api-key-required"], None, "frontend flag"),
                        (["frontend"], {"BATON_METRICS_API_KEY_REQUIRED": "true"}, "frontend twin"),
                        (["run", "--metrics-api-key-required"], None, "baton run")):
    e = dict(CLEAN_ENV)
    e.update(env or {})
    p = subprocess.run([BIN] + args + ["--http-port", str(bl.free_port())], env=e, capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 2, f"{what}: exit {p.returncode}, expected 2\n{p.stderr}"
    assert "--metrics-api-key-required" in p.stderr and "--api-key" in p.stderr, f"{what}: {p.stderr}"
print("--metrics-api-key-required without --api-key: exit 2 naming both")
print("test_metrics_auth: OK")
