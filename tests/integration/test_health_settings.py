"""The worker's health settings from Dynamo, through the real binary:
DYN_SYSTEM_STARTING_HEALTH_STATUS (--system-starting-health-status) and
DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS (--system-use-endpoint-health-status).

The rule (docs/operations.md, "Worker status server"): /health answers 200 "ready" while the
endpoint is ready (serving, not draining, canary passed). Before the endpoint is first ready it
answers the starting status instead (default notready), unless the endpoint list names the
endpoint: then the endpoint alone decides from the start. Once the endpoint has been ready, the
starting status no longer applies. Routing (BT_LOAD_READY, baton_worker_ready) always follows the
endpoint, never the starting status.

1. Before/after ready: workers whose first canary takes seconds (a slow mocker) are probed inside
   that window (proven by a canary success count of 0 after the probe) and again once ready:
   default → 503 then 200; starting ready → 200 (endpoint still notready, not routed) then 200;
   starting ready with the list ["generate"] → 503 then 200; explicit notready and [] → default.
2. After ready the starting status is gone: a starting-ready worker whose engine stalls turns 503
   and comes back when it resumes.
3. A list naming this worker's own endpoint (not "generate") works; a name it does not serve and
   every malformed value of either variable fail at start-up (exit 2, a message naming the
   variable, nothing announced in discovery); --help lists both settings.

The checker is run once more against doctored input and must fail.
"""

import json
import os
import signal
import subprocess
import time

import batonlib as bl

bl.deadline(150, "test_health_settings")

STARTING = "DYN_SYSTEM_STARTING_HEALTH_STATUS"
LISTED = "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS"


def check_health(status, body, ready, endpoint_ready, ep="generate"):
    """/health: the code and "status" follow `ready`; "endpoints" holds the one endpoint's own state."""
    word = "ready" if ready else "notready"
    ep_word = "ready" if endpoint_ready else "notready"
    assert status == (200 if ready else 503), f"/health answered {status}, expected {200 if ready else 503}: {body!r}"
    assert isinstance(body, dict) and body.get("status") == word, f"/health status is not {word!r}: {body!r}"
    assert body.get("endpoints") == {ep: ep_word}, f"/health endpoints are not {{{ep!r}: {ep_word!r}}}: {body!r}"
    up = body.get("uptime")
    assert isinstance(up, dict) and isinstance(up.get("secs"), int) and isinstance(up.get("nanos"), int), body
    assert body.get("state") in ("registering", "ready"), f"unexpected state in {body!r}"


def self_check():
    good = {"status": "ready", "endpoints": {"generate": "notready"}, "uptime": {"secs": 0, "nanos": 1},
            "state": "ready"}
    check_health(200, good, True, False)
    broken = [
        (503, good, True, False),
        (200, dict(good, status="notready"), True, False),
        (200, dict(good, endpoints={"generate": "ready"}), True, False),
        (200, dict(good, endpoints={"generate": "notready", "other": "ready"}), True, False),
        (200, dict(good, state="draining"), True, False),
        (200, {"status": "ready", "endpoints": {"generate": "notready"}, "state": "ready"}, True, False),
        (200, good, False, False),
    ]
    for st, b, r, e in broken:
        try:
            check_health(st, b, r, e)
        except AssertionError:
            continue
        raise AssertionError(f"check_health accepted {st} {b} (ready={r}, endpoint_ready={e})")


self_check()


def health(w, path="/health"):
    return bl.get_json(w.system_url + path, timeout=5)[::2]


def canary_successes(w):
    m = bl.metrics(w.system_url)
    return bl.metric_sum(m, "baton_worker_canary_total", result="success") + \
        bl.metric_sum(m, "baton_worker_canary_total", result="late_success"), m


def instances(fe):
    st, _, b = bl.get_json(fe.url + "/health", timeout=5)
    assert st == 200, (st, b)
    return len(b["instances"])


# ---- 1. before and after the endpoint is ready -------------------------------------------------
# The mocker at speedup 0.005 answers the first canary after ~4.5 s (0.01: 2.3 s, 0.003: 7.5 s on
# the test machine); no second canary runs during the test (wait 60 s).
SLOW = {"DYN_HEALTH_CHECK_ENABLED": "true", "DYN_CANARY_WAIT_TIME": "60", "DYN_HEALTH_CHECK_REQUEST_TIMEOUT": "60"}
with bl.Cluster() as c:
    fe = c.start_frontend()
    cases = {  # name: (env, flags, /health ready before, /health ready after)
        "default": ({}, {}, False),
        "starting ready": ({STARTING: "ready"}, {}, True),
        "explicit notready and []": ({STARTING: "notready", LISTED: "[]"}, {}, False),
        "starting ready, listed (flags)": ({}, {"system_starting_health_status": "ready",
                                               "system_use_endpoint_health_status": '["generate"]'}, False),
        "listed twice, starting ready (env)": ({STARTING: "ready", LISTED: '["generate", "generate"]'}, {}, False),
    }
    workers = {}
    for name, (env, flags, _) in cases.items():
        workers[name] = c.start_worker(system_port=True, speedup_ratio=0.005, env=dict(SLOW, **env), **flags)
    for name, w in workers.items():
        bl.wait_http(w.system_url + "/live", w.proc)
    for name, w in workers.items():
        before = cases[name][2]
        st, body = health(w)
        n, m = canary_successes(w)
        assert n == 0, f"{name}: the first canary answered before the probe; the window was missed ({n})"
        check_health(st, body, ready=before, endpoint_ready=False)
        assert m["baton_worker_ready"] == 0, f"{name}: routable before its first canary: {m['baton_worker_ready']}"
        print(f"{name}: before ready /health {st} {body['status']} (endpoint notready)")
    assert instances(fe) == 0, "the frontend routes to a worker whose endpoint is not ready yet"
    logs = {name: w.proc.log_text() for name, w in workers.items()}
    assert "reports ready until endpoint generate is first ready" in logs["starting ready"], logs["starting ready"]
    assert "follows endpoint generate from the start" in logs["starting ready, listed (flags)"]

    for name, w in workers.items():
        # with a starting status of ready, /health is 200 before the endpoint is: wait for the endpoint
        bl.wait_for(lambda: health(w)[1].get("endpoints") == {"generate": "ready"}, 30, interval=0.05,
                    what=f"{name}: the endpoint ready after the canary")
        st, body = health(w)
        check_health(st, body, ready=True, endpoint_ready=True)
        n, m = canary_successes(w)
        assert n >= 1 and m["baton_worker_ready"] == 1, (name, n, m["baton_worker_ready"])
        print(f"{name}: after ready /health {st}")
    c.wait_workers(fe, len(workers), timeout=15)

# ---- 2. once ready, the starting status no longer applies ----------------------------------------
with bl.Cluster() as c:
    w = c.start_worker(system_port=True, wait=True, speedup_ratio=50, fault_signals=True,
                       env={"DYN_HEALTH_CHECK_ENABLED": "true", "DYN_CANARY_WAIT_TIME": "0.3",
                            "DYN_HEALTH_CHECK_REQUEST_TIMEOUT": "0.5", STARTING: "ready"})
    bl.wait_for(lambda: canary_successes(w)[0] >= 1, 15, what="the first canary")
    check_health(*health(w), ready=True, endpoint_ready=True)
    w.proc.kill(signal.SIGUSR2)  # the engine stalls: the next canary times out
    bl.wait_for(lambda: health(w)[0] == 503, 10, interval=0.02, what="/health 503 after a failed canary")
    check_health(*health(w), ready=False, endpoint_ready=False)
    assert bl.get_json(w.system_url + "/live")[0] == 200
    w.proc.kill(signal.SIGUSR2)  # resume
    bl.wait_for(lambda: health(w)[0] == 200, 10, interval=0.02, what="/health 200 after the resume")
    check_health(*health(w), ready=True, endpoint_ready=True)
    print("starting ready: a stalled engine after the first ready still turns /health 503")

# ---- 3. its own endpoint name; start-up errors; --help -------------------------------------------
with bl.Cluster() as c:
    own = c.start_worker(system_port=True, wait=True, speedup_ratio=50, endpoint="dyn://dynamo.backend.prefill",
                         env={LISTED: '["prefill"]'})
    bl.wait_for(lambda: health(own)[0] == 200, 10, what="a worker listing its own endpoint 'prefill' to be ready")
    check_health(*health(own), ready=True, endpoint_ready=True, ep="prefill")

    keys_before = sorted(os.listdir(c.discovery_dir))
    bad = [
        ({STARTING: "Ready"}, {}, [STARTING, "'Ready'", "expected ready or notready"]),
        ({STARTING: "healthy"}, {}, [STARTING, "'healthy'", "expected ready or notready"]),
        ({}, {"system_starting_health_status": "not_ready"}, [STARTING, "--system-starting-health-status",
                                                              "'not_ready'"]),
        ({LISTED: "generate"}, {}, [LISTED, "'generate'", "expected a JSON list of endpoint names"]),
        ({LISTED: '"generate"'}, {}, [LISTED, "expected a JSON list of endpoint names"]),
        ({LISTED: '{"generate": "ready"}'}, {}, [LISTED, "expected a JSON list of endpoint names"]),
        ({LISTED: "[1]"}, {}, [LISTED, "expected a JSON list of endpoint names"]),
        ({LISTED: '["generate", null]'}, {}, [LISTED, "expected a JSON list of endpoint names"]),
        ({LISTED: '["generate"'}, {}, [LISTED, "expected a JSON list of endpoint names"]),
        ({}, {"system_use_endpoint_health_status": "[generate]"}, [LISTED, "--system-use-endpoint-health-status"]),
        ({LISTED: '["prefill"]'}, {}, [LISTED, "names endpoint 'prefill'", "does not serve", "serves 'generate'"]),
        ({LISTED: '["generate", "clear_kv_blocks"]'}, {}, [LISTED, "names endpoint 'clear_kv_blocks'"]),
    ]
    procs = [(c.start_worker(speedup_ratio=50, env=env, **flags), env, flags, want) for env, flags, want in bad]
    for w, env, flags, want in procs:
        rc = w.proc.wait(15)
        log = w.proc.log_text()
        assert rc == 2, f"{env or flags}: exit {rc}, expected 2; log:\n{log[-600:]}"
        for s in want:
            assert s in log, f"{env or flags}: {s!r} not in the start-up error:\n{log[-600:]}"
        assert "serving model" not in log and "status server listening" not in log, f"{env or flags} started:\n{log}"
    assert sorted(os.listdir(c.discovery_dir)) == keys_before, "a worker with a bad health setting was announced"
    print(f"start-up errors: {len(bad)} bad values refused with exit 2")

    out = subprocess.run([c.bin, "worker", "--help"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out
    lines = out.stdout.splitlines()
    for flag, env in (("--system-starting-health-status", STARTING), ("--system-use-endpoint-health-status", LISTED)):
        assert any(ln.split()[:2] == [flag, env] for ln in lines), f"{flag} {env} not in --help:\n{out.stdout}"
print("test_health_settings: ok")
