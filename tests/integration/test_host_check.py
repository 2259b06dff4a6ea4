"""The Host rule against DNS rebinding (docs/security.md, "DNS rebinding"), through the real binaries.

A page on evil.example whose name its owner re-points to 127.0.0.1 makes the browser send GETs to
a server on this machine that it takes for same-origin: no Origin header, and the page reads the
answer (/v1/models, /metrics, /health, a worker's status). Those requests were all served (200).
Now:

  1. A frontend on a loopback address answers a Host that is not an IP literal, localhost or
     *.localhost with 403 host_not_allowed (OpenAI's error shape, naming --allowed-hosts), on every
     path, /live /health /metrics included, logs it at warn and counts it in
     baton_frontend_http_rejections_total{reason="host_not_allowed"}; Host localhost:PORT,
     127.0.0.1:PORT and [::1]:PORT are served, and so is HTTP/1.0 without Host (HTTP/1.1 without
     one stays a 400). An absolute-form target (GET http://evil.example/... with Host: localhost)
     is checked by its authority too.
  2. --allowed-hosts (or BATON_ALLOWED_HOSTS) lists names served besides those, ".example" a
     domain with its subdomains, "*" any; a list that is not host names is a start-up error (2).
  3. A frontend on 0.0.0.0 checks nothing unless the flag is given (behind a load balancer it gets
     any name).
  4. A worker's status server follows the same rule by its --system-host, with its own
     --allowed-hosts; `baton run` forwards the flag to its frontend and its workers.
"""

import json
import os
import re
import subprocess

import batonlib as bl

bl.deadline(150, "test_host_check")
BIN = bl.baton_bin()
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "BATON_", "NATS_", "ETCD_"))}


def get(port, path, host, version="HTTP/1.1"):
    """A GET with exactly this Host (None: no Host line); returns (status, body)."""
    data = (f"GET {path} {version}\r\n" + (f"Host: {host}\r\n" if host is not None else "") +
            "Connection: close\r\n\r\n").encode()
    out = bl.raw_exchange(port, data)
    head, _, body = out.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    return (int(parts[1]) if len(parts) > 1 else None), body


def refused(port, path, host):
    st, body = get(port, path, host)
    assert st == 403, (port, path, host, st, body[:300])
    err = json.loads(body)["error"]
    assert err["code"] == "host_not_allowed" and err["type"] == "invalid_request_error", err
    assert f"Host '{host}' is not served here" in err["message"] and "--allowed-hosts" in err["message"], err


def served(port, path, host, version="HTTP/1.1"):
    st, body = get(port, path, host, version)
    assert st == 200, (port, path, host, version, st, body[:300])
    return body


PATHS = ["/v1/models", "/metrics", "/health", "/live"]

with bl.Cluster() as c:
    # 1. loopback, no list
    fe = c.start_frontend()
    w = c.start_worker(system_port=True, system_host="127.0.0.1", wait=True)
    c.wait_workers(fe, 1)
    p = fe.port
    for path in PATHS:
        refused(p, path, "evil.example")
        refused(p, path, f"evil.example:{p}")
    refused(p, "/v1/models", "localhost.evil.example")
    refused(p, "/v1/models", "127.0.0.1.evil.example")
    body = served(p, "/v1/models", f"localhost:{p}")
    assert json.loads(body)["data"][0]["id"] == "mock-model", body
    for host in (f"127.0.0.1:{p}", "127.0.0.1", f"[::1]:{p}", "LocalHost", f"app.localhost:{p}"):
        for path in PATHS:
            served(p, path, host)
    served(p, "/v1/models", None, "HTTP/1.0")  # no browser leaves Host out
    # an absolute-form target names the host too (RFC 9112 §3.2.2: it wins over Host): checked alike
    st, body = get(p, "http://evil.example/v1/models", "localhost")
    assert st == 403 and "Host 'evil.example' is not served here" in json.loads(body)["error"]["message"], (st, body)
    served(p, f"http://localhost:{p}/v1/models", "localhost")
    served(p, f"http://127.0.0.1:{p}/v1/models", "localhost")
    st, body = get(p, "/v1/models", None)
    assert st == 400 and b"without a Host header" in body, (st, body[:200])
    # a POST too: refused before its body counts or the route is looked at
    out = bl.raw_exchange(p, (b"POST /v1/chat/completions HTTP/1.1\r\nHost: evil.example\r\nContent-Type: "
                              b"text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"))
    assert out.startswith(b"HTTP/1.1 403 ") and b"host_not_allowed" in out, out[:300]
    fe.proc.wait_log(r"WARN .*refused a request for Host 'evil\.example' \(port %d\)" % p)
    m = bl.metrics(fe.url)
    n = bl.metric_sum(m, "baton_frontend_http_rejections_total", reason="host_not_allowed")
    assert n == 2 * len(PATHS) + 4, n

    # 4. the worker's status server on loopback
    wp = w.system_port
    for path in ("/health", "/live", "/metrics"):
        refused(wp, path, "evil.example")
        served(wp, path, f"127.0.0.1:{wp}")
        served(wp, path, f"localhost:{wp}")

    # 2. names listed: the flag, its twin, a domain with its subdomains, and *
    listed = c.start_frontend(allowed_hosts="evil.example, .corp.example")
    for host in ("evil.example", f"EVIL.example:{listed.port}", "corp.example", "a.b.corp.example",
                 f"127.0.0.1:{listed.port}", "localhost"):
        served(listed.port, "/v1/models", host)
    refused(listed.port, "/v1/models", "other.example")
    refused(listed.port, "/health", "xcorp.example")
    twin = c.start_frontend(env={"BATON_ALLOWED_HOSTS": "evil.example"})
    served(twin.port, "/metrics", "evil.example")
    refused(twin.port, "/metrics", "other.example")
    star = c.start_frontend(allowed_hosts="*")
    served(star.port, "/v1/models", "other.example")
    wl = c.start_worker(system_port=True, system_host="127.0.0.1", allowed_hosts="evil.example", wait=True)
    served(wl.system_port, "/health", "evil.example")
    refused(wl.system_port, "/health", "other.example")

    # 3. on every address: no check unless asked for
    anyaddr = c.start_frontend(http_host="0.0.0.0")
    for path in PATHS:
        served(anyaddr.port, path, "evil.example")
    asked = c.start_frontend(http_host="0.0.0.0", allowed_hosts="api.example")
    served(asked.port, "/v1/models", "api.example")
    refused(asked.port, "/v1/models", "evil.example")
    wa = c.start_worker(system_port=True, wait=True)  # the worker's default --system-host, 0.0.0.0
    served(wa.system_port, "/health", "evil.example")

    # lists that are not host names
    for bad in ("http://evil.example", "evil.example:8000", "a,,b", "", "evil.example/"):
        for cmd in (["frontend", "--http-port", "0"], ["worker", "--system-port", "0"]):
            r = subprocess.run([BIN] + cmd + ["--allowed-hosts", bad], env=CLEAN_ENV, capture_output=True,
                               text=True, timeout=20)
            assert r.returncode == 2 and "--allowed-hosts (BATON_ALLOWED_HOSTS)" in r.stderr, \
                (cmd, bad, r.returncode, r.stderr[-400:])

    # `baton run` on loopback: refused by default, the flag forwarded to the frontend and workers
    run = c.start_run(workers=1, speedup_ratio=50)
    refused(run.port, "/v1/models", "evil.example")
    run2 = c.start_run(workers=1, speedup_ratio=50, allowed_hosts="evil.example")
    served(run2.port, "/v1/models", "evil.example")
    refused(run2.port, "/v1/models", "other.example")
    ports = [int(x) for x in re.findall(r"status server listening on 127\.0\.0\.1:(\d+)", run2.proc.log_text())]
    assert ports, run2.proc.log_tail()
    served(ports[0], "/health", "evil.example")
    refused(ports[0], "/health", "other.example")

print("test_host_check: ok")
