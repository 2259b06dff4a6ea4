"""Self-test of `baton chaos`'s checkers, injectors' evidence, scenario parser and report.

A checker that cannot fail is a defect, so each one is fed a correct run (it must pass) and broken
ones (it must fail): a dropped token, a duplicated token, reordered tokens, changed text, a partial
output that is not a prefix, a hung request, a request over its bound, an error the scenario does
not allow or no fault explains, a leaked gauge, a grown descriptor table, a fault that never
happened, a fault without evidence, migrations out of bounds, a failed fresh request, no recovery,
an unexpected process exit, a sanitizer report. The descriptor count is checked against real
processes: the new descriptors are named, and the tool's own /metrics connections (the snapshot's,
the Sampler's) are never counted, even from a server that closes its end late. The fault
injectors are run against throw-away `sleep` processes to see that their evidence records a real
effect and reports a missing one.
No baton process is started (the metrics servers are small Python processes).
"""

import copy
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

import batonlib as bl

bl.deadline(60, "test_chaos_checkers")
sys.path.insert(0, os.path.join(bl.repo_root(), "tools", "chaos"))

from chaoslib import checks, faults, observe, report, runner, scenario  # noqa: E402

REF = [101, 7, 7, 42, 9, 13, 8, 77, 5, 3]
TEXT = "".join(f"t{i} " for i in REF)


def rec(seq, kind="requests", outcome="ok", ids=None, text=None, t_send=1.0, t_end=2.0, shape=0, url="http://fe0",
        finish="length"):
    ids = list(REF if ids is None else ids)
    return {"kind": kind, "seq": seq, "shape": shape, "api": "chat", "stream": True, "url": url, "t_send": t_send,
            "t_first": t_send + 0.1, "t_end": t_end,
            "events": [[t_send + 0.1 + 0.05 * i, 1] for i in range(len(ids))], "status": 200, "outcome": outcome,
            "error": {"message": "worker lost"} if outcome == "error" else None,
            "text": "".join(f"t{i} " for i in ids) if text is None else text, "token_ids": ids,
            "finish_reason": finish if outcome == "ok" else None, "usage": None, "request_id": f"r{seq}",
            "exception": None}


def good_run():
    fault = {"index": 0, "label": "kill9 worker[0]", "what": "kill9", "target": "worker[0]", "t_trigger": 2.0,
             "t_inject": 2.0, "t_restore": None, "t_end": 3.0, "pids": [111], "urls": [],
             "evidence": ["ok: worker[0] (pid 111) died; exit status -9"], "evidence_ok": True, "error": None,
             "restarted": [{"name": "worker[0]", "pid": 112, "t": 3.0}]}
    gauges = {"frontend[0]": {"pid": 10, "up": True, "inflight": 0.0, "http_connections": 1.0, "fds": 20},
              "worker[0]": {"pid": 111, "up": True, "kv_active_blocks": 0.0, "active_sequences": 0.0, "fds": 12}}
    after = copy.deepcopy(gauges)
    after["worker[0]"]["pid"] = 112  # restarted: descriptors not compared, gauges are
    after["worker[0]"]["fds"] = 15
    return {
        "references": {"0": rec(0, "reference", t_send=0, t_end=1), "-1": rec(0, "reference", ids=REF[:3])},
        "requests": [rec(i, t_send=1.0 + i * 0.5, t_end=2.0 + i * 0.5) for i in range(8)],
        "probes": [dict(rec(i, "probe", ids=REF[:3], shape=-1, t_send=0.5 * i, t_end=0.5 * i + 0.1)) for i in
                   range(10)],
        "fresh": [rec(i, "fresh", t_send=10.0, t_end=10.5) for i in range(2)],
        "storm": [],
        "faults": [fault],
        "baseline": {"before": gauges, "after": after, "waited": 0.5, "expected_gone": []},
        "migrations": 3,
        "processes": {"unexpected_exits": [], "teardown": {"frontend[0]": 0}, "sanitizer": []},
    }


CFG = scenario.build({"load": {}, "topology": {}, "checks": {"min_migrations": 1, "fresh_requests": 2,
                                                           "max_stall": "5s", "max_recovery": "5s"}}).checks


def verdict(run, cfg=CFG):
    v, results = checks.evaluate(run, cfg)
    return v, {r["name"]: r for r in results}


def expect_fail(name, mutate, check, cfg=CFG):
    run = good_run()
    mutate(run)
    v, res = verdict(run, cfg)
    r = res[check]
    assert r["ok"] is False and v == "FAIL", f"{name}: {check} did not fail: {r}"
    print(f"ok - broken run '{name}' fails {check}: {r['detail'][:110]}")
    return r


def test_good_run_passes():
    v, res = verdict(good_run())
    assert v == "PASS", {k: r for k, r in res.items() if r["ok"] is False}
    for name in ("byte_exact", "all_ended", "baseline", "fresh_request", "evidence", "migrations", "stall",
                 "recovery", "processes"):
        assert res[name]["ok"] is True, (name, res[name])
    print("ok - a correct run passes every check")


def test_byte_exact():
    r = expect_fail("dropped token", lambda run: run["requests"][3]["token_ids"].pop(4), "byte_exact")
    assert r["stats"]["lost"] == 1 and r["stats"]["duplicated"] == 0, r["stats"]
    r = expect_fail("duplicated token", lambda run: run["requests"][5]["token_ids"].insert(6, REF[5]), "byte_exact")
    assert r["stats"]["duplicated"] == 1 and r["stats"]["lost"] == 0, r["stats"]

    def reorder(run):
        ids = run["requests"][1]["token_ids"]
        ids[2], ids[3] = ids[3], ids[2]
    expect_fail("reordered tokens", reorder, "byte_exact")
    expect_fail("text differs, ids equal", lambda run: run["requests"][0].update(text=TEXT.replace("t42", "t24")),
                "byte_exact")
    expect_fail("wrong finish_reason", lambda run: run["requests"][2].update(finish_reason="stop"), "byte_exact")
    expect_fail("probe output differs", lambda run: run["probes"][4]["token_ids"].append(1), "byte_exact")
    expect_fail("fresh output differs", lambda run: run["fresh"][1]["token_ids"].pop(), "byte_exact")

    # a request that ended early must be a prefix of its reference
    cfg = dict(CFG, allow=["error"], max_errors=("count", 1))

    def partial_ok(run):
        run["requests"][2] = rec(2, outcome="error", ids=REF[:4], t_send=1.9, t_end=2.1)
    run = good_run()
    partial_ok(run)
    _, res = verdict(run, cfg)
    assert res["byte_exact"]["ok"] is True and res["all_ended"]["ok"] is True, (res["byte_exact"], res["all_ended"])
    expect_fail("partial output not a prefix",
                lambda run: run["requests"].__setitem__(2, rec(2, outcome="error", ids=REF[:2] + [REF[3]],
                                                               t_send=1.9, t_end=2.1)), "byte_exact", cfg)
    expect_fail("storm stream not a prefix",
                lambda run: run["storm"].append(rec(0, "storm", outcome="aborted", ids=[REF[0], 55])), "byte_exact")
    assert checks.token_diff([1, 2, 3, 4], [1, 2, 2, 3, 4]) == (0, 1)
    assert checks.token_diff([1, 2, 3, 4], [1, 3, 4]) == (1, 0)
    print("ok - byte_exact counts lost and duplicated tokens")


def test_token_accounting():
    """The table's lost / dup: every reference token an output never received, counted once."""
    assert checks.token_accounting(good_run()) == (0, 0)
    run = good_run()
    run["requests"][2] = rec(2, outcome="cut", ids=REF[:3], t_send=1.9, t_end=2.1)  # a cut stream: its tail is lost
    run["requests"][3] = rec(3, outcome="error", ids=REF[:2] + [55], t_send=1.9, t_end=2.1)  # a wrong token, then cut
    run["requests"][4] = rec(4, outcome="timeout", ids=[], t_send=1.9, t_end=61.0)  # hung before its first token
    run["probes"][5] = rec(5, "probe", outcome="cut", ids=REF[:1], shape=-1, t_send=2.5, t_end=2.6)
    assert checks.token_accounting(run) == (7 + 8 + 10 + 2, 1), checks.token_accounting(run)
    # nothing the client did not ask for or that never reached a server is lost: a storm stream
    # it dropped on purpose (only what it read is compared), a refused connection with no output
    run = good_run()
    run["storm"].append(rec(0, "storm", outcome="aborted", ids=REF[:2]))
    run["requests"][6] = rec(6, outcome="refused", ids=[], text="", t_send=2.0, t_end=2.0)
    assert checks.token_accounting(run) == (0, 0), checks.token_accounting(run)
    run["storm"].append(rec(1, "storm", outcome="aborted", ids=[REF[0], 55]))
    assert checks.token_accounting(run) == (1, 1), checks.token_accounting(run)
    # a resumed stream is one output: complete, it lost nothing; resumed with a repeated token, dup
    run["requests"][0]["token_ids"].insert(4, REF[3])
    assert checks.token_accounting(run) == (1, 2), checks.token_accounting(run)
    print("ok - lost / dup count a cut stream's undelivered tail once, and no client-dropped or refused output")


def test_all_ended():
    expect_fail("hung request", lambda run: run["requests"][4].update(outcome="timeout", t_end=61.0), "all_ended")
    expect_fail("over its bound", lambda run: run["requests"][4].update(t_end=run["requests"][4]["t_send"] + 31),
                "all_ended")
    expect_fail("never ended", lambda run: run["requests"][4].update(t_end=None), "all_ended")
    expect_fail("protocol error", lambda run: run["requests"][4].update(outcome="protocol"), "all_ended")
    expect_fail("error not allowed", lambda run: run["requests"].__setitem__(
        2, rec(2, outcome="error", ids=REF[:3], t_send=1.9, t_end=2.1)), "all_ended")
    cfg = dict(CFG, allow=["error"], max_errors=("count", 5))
    expect_fail("cut when only errors are allowed", lambda run: run["requests"].__setitem__(
        2, rec(2, outcome="cut", ids=REF[:3], t_send=1.9, t_end=2.1)), "all_ended", cfg)
    expect_fail("error no fault explains", lambda run: run["requests"].__setitem__(
        2, rec(2, outcome="error", ids=REF[:3], t_send=0.2, t_end=0.5)), "all_ended", cfg)

    def other_frontend(run):
        run["faults"][0]["urls"] = ["http://fe1"]
        run["requests"][2] = rec(2, outcome="error", ids=REF[:3], t_send=1.9, t_end=2.1, url="http://fe0")
    expect_fail("error on a frontend the fault did not hit", other_frontend, "all_ended", cfg)
    cfg1 = dict(CFG, allow=["error"], max_errors=("count", 1))

    def two_errors(run):
        for i in (2, 3):
            run["requests"][i] = rec(i, outcome="error", ids=REF[:3], t_send=1.9, t_end=2.1)
    expect_fail("more errors than allowed", two_errors, "all_ended", cfg1)
    cfgf = dict(CFG, allow=["error"], max_errors=("fraction", 0.25))
    run = good_run()
    two_errors(run)
    assert verdict(run, cfgf)[1]["all_ended"]["ok"] is True  # 2 of 8 = 25 %
    expect_fail("no requests at all", lambda run: run.update(requests=[]), "all_ended")
    print("ok - all_ended rejects hangs, overruns, unexplained and excess errors")


def test_baseline():
    expect_fail("leaked in-flight gauge", lambda run: run["baseline"]["after"]["frontend[0]"].update(inflight=1.0),
                "baseline")
    expect_fail("leaked KV blocks", lambda run: run["baseline"]["after"]["worker[0]"].update(kv_active_blocks=3.0),
                "baseline")
    expect_fail("leaked connection", lambda run: run["baseline"]["after"]["frontend[0]"].update(http_connections=2.0),
                "baseline")
    expect_fail("descriptor leak", lambda run: run["baseline"]["after"]["frontend[0]"].update(fds=21), "baseline")

    # with the descriptor tables, the failure names the new descriptor (same count, another
    # connection in a reused slot, is no leak; a slot that now holds something else is named)
    def leak_named(run):
        fe = run["baseline"]
        fe["before"]["frontend[0]"]["fd_table"] = {"3": "anon_inode:[eventpoll]",
                                                   "12": "socket:[7] tcp 127.0.0.1:4000 -> 127.0.0.1:5000 ESTABLISHED"}
        fe["before"]["frontend[0]"]["fds"] = 2
        fe["after"]["frontend[0]"]["fd_table"] = {"3": "anon_inode:[eventpoll]",
                                                  "12": "socket:[9] tcp 127.0.0.1:4001 -> 127.0.0.1:5000 ESTABLISHED",
                                                  "13": "anon_inode:[timerfd]"}
        fe["after"]["frontend[0]"]["fds"] = 3
    r = expect_fail("descriptor leak, named", leak_named, "baseline")
    assert "new: fd 12: socket:[9] tcp 127.0.0.1:4001 -> 127.0.0.1:5000 ESTABLISHED; fd 13: anon_inode:[timerfd]" \
        in r["detail"], r["detail"]
    expect_fail("endpoint down after the run", lambda run: run["baseline"]["after"]["worker[0]"].update(up=False),
                "baseline")
    expect_fail("gauge missing after the run", lambda run: run["baseline"]["after"]["worker[0]"].pop(
        "active_sequences"), "baseline")
    run = good_run()
    run["baseline"]["after"]["worker[0]"] = {"up": False}
    run["baseline"]["expected_gone"] = ["worker[0]"]
    assert verdict(run)[1]["baseline"]["ok"] is True
    print("ok - baseline catches leaked gauges and descriptors")


def test_fd_table():
    """observe.fd_table and new_descriptors on a real process (this one): descriptors opened since
    a table are named, a TCP connection by its endpoints and state, and a connection to an
    excluded port (etcd, NATS) is not counted."""
    before = observe.fd_table(os.getpid())
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    acc, _ = srv.accept()
    rd, wr = os.pipe()
    try:
        t = observe.fd_table(os.getpid())
        cport = cli.getsockname()[1]
        assert len(t) == len(before) + 5, (before, t)
        assert t[str(rd)].startswith("pipe:[") and t[str(srv.fileno())].startswith("socket:["), t
        new = observe.new_descriptors(before, t, os.getpid())
        want = {srv.fileno(): f" tcp 127.0.0.1:{port} -> 0.0.0.0:0 LISTEN",
                cli.fileno(): f" tcp 127.0.0.1:{cport} -> 127.0.0.1:{port} ESTABLISHED",
                acc.fileno(): f" tcp 127.0.0.1:{port} -> 127.0.0.1:{cport} ESTABLISHED",
                rd: t[str(rd)], wr: t[str(wr)]}
        assert len(new) == 5, new
        for fd, tail in want.items():
            assert any(n.startswith(f"fd {fd}: ") and n.endswith(tail) for n in new), (fd, tail, new)
        # without a pid (the process is gone), the links alone
        assert f"fd {cli.fileno()}: {t[str(cli.fileno())]}" in observe.new_descriptors(before, t), t
        ex = observe.fd_table(os.getpid(), exclude_ports={port})
        assert str(cli.fileno()) not in ex and str(acc.fileno()) in ex and len(ex) == len(t) - 1, (t, ex)
        assert observe.fd_table(2 ** 22 + 1) is None  # no such process
    finally:
        for s in (cli, acc, srv):
            s.close()
        os.close(rd)
        os.close(wr)
    print("ok - fd_table and new_descriptors name the descriptors a process opened")


def test_back_to_baseline_names_descriptors():
    """The runner's wait for the baseline, against a metrics endpoint in this process: a pipe
    opened after the baseline keeps it from being back, each poll records it by name, and the
    after snapshot carries the names for the check; closed again, it is back."""
    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"baton_worker_active_sequences 0\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        ep = [observe.Endpoint("worker[0]", "worker", lambda: f"http://127.0.0.1:{httpd.server_port}", os.getpid)]
        before = observe.snapshot(ep)
        assert before["worker[0]"]["up"] and before["worker[0]"]["active_sequences"] == 0.0, before
        rd, wr = os.pipe()
        try:
            after, waited, polls = runner._back_to_baseline(before, ep, set(), set(), 0.6, True)
        finally:
            os.close(rd)
            os.close(wr)
        named = f"fd {rd}: pipe:["
        assert waited >= 0.6 and polls, (waited, polls)
        assert all(any(named in o for o in off) for _, off in polls), polls
        assert any(n.startswith(named) for n in after["worker[0]"]["fd_new"]), after
        run = {"baseline": {"before": before, "after": after, "waited": waited, "expected_gone": []}}
        r = checks.check_baseline(run, CFG)
        assert r["ok"] is False and named in r["detail"], r
        # (a poll may still see the server thread's socket of its own request: it polls again)
        after, waited, polls = runner._back_to_baseline(before, ep, set(), set(), 5.0, True)
        assert waited < 5.0 and "fd_new" not in after["worker[0]"], (waited, polls, after)
    finally:
        httpd.shutdown()
        httpd.server_close()
    print("ok - the wait for the baseline names the descriptors that keep it from being back")


SLOW_METRICS = r"""
import socket, threading, time
# As baton's servers: one connection per thread; the request waits 0.2 s (a request of the tool is
# in flight most of the time), the answer keeps the connection, which closes when the client's
# close is read; a thread wakes a little late on a busy machine, as this one always does.
def serve(c):
    c.recv(65536)
    time.sleep(0.2)
    body = b"baton_worker_active_sequences 0\n"
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    while c.recv(65536):
        pass
    time.sleep(0.02)
    c.close()
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""


def test_snapshot_not_counting_sampler():
    """A descriptor count after the run must not include the server's end of a request of the
    tool's own Sampler (which runs then, and not when the baseline is read): against a metrics
    server (a separate process) whose every request takes 0.2 s, with a Sampler polling it
    continuously, no snapshot counts more descriptors in the server than the baseline did."""
    p = subprocess.Popen([sys.executable, "-c", SLOW_METRICS], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(p.stdout.readline())}"
        ep = [observe.Endpoint("worker[0]", "worker", lambda: url, lambda: p.pid)]
        before = observe.snapshot(ep)
        assert before["worker[0]"]["up"] and before["worker[0]"]["fds"], before
        sampler = observe.Sampler(ep, time.monotonic(), interval=0.0)
        sampler.start()
        try:
            snaps = []
            for _ in range(8):
                time.sleep(0.05)  # as the wait for the baseline pauses between polls: the Sampler starts one
                snaps.append(observe.snapshot(ep)["worker[0]"])
        finally:
            sampler.stop()
        assert len(sampler.samples) >= 8, len(sampler.samples)  # the Sampler did run meanwhile
        above = [observe.new_descriptors(before["worker[0]"]["fd_table"], a["fd_table"], p.pid) for a in snaps
                 if a["fds"] > before["worker[0]"]["fds"]]
        assert not above, (before["worker[0]"], above)
    finally:
        p.kill()
        p.wait()
    print(f"ok - a snapshot does not count the Sampler's requests ({len(sampler.samples)} samples meanwhile)")


def test_evidence():
    expect_fail("fault never happened", lambda run: run["faults"][0].update(t_inject=None, evidence=[],
                                                                              evidence_ok=None), "evidence")
    expect_fail("evidence missing", lambda run: run["faults"][0].update(
        evidence=["MISSING: worker[0] (pid 111) still running 5 s after the fault"], evidence_ok=False), "evidence")
    expect_fail("no evidence recorded", lambda run: run["faults"][0].update(evidence=[], evidence_ok=None), "evidence")
    expect_fail("injector error", lambda run: run["faults"][0].update(error="FaultError: no live worker"), "evidence")
    print("ok - evidence fails a fault that did not happen")


def test_migrations_fresh_recovery_processes():
    expect_fail("no migration where one is needed", lambda run: run.update(migrations=0), "migrations")
    expect_fail("migration counter unreadable", lambda run: run.update(migrations=None), "migrations")
    expect_fail("migrations where none may happen", lambda run: None, "migrations", dict(CFG, max_migrations=0))
    # why a migration is missing, from what the run saw: migration off, streams failed, or nothing hit
    r = expect_fail("migration off", lambda run: run.update(migrations=0, migration_limit=0), "migrations")
    assert "migration is off" in r["detail"] and "hit no stream" not in r["detail"], r["detail"]

    def cut_at_fault(run, limit):
        run.update(migrations=0, migration_limit=limit)
        for i in (2, 3):
            run["requests"][i] = rec(i, outcome="cut", ids=REF[:3], t_send=1.9, t_end=2.2)
    r = expect_fail("migration off, streams cut", lambda run: cut_at_fault(run, 0), "migrations")
    assert "migration is off" in r["detail"] and "2 load requests failed at the fault" in r["detail"], r["detail"]
    r = expect_fail("streams cut, not migrated", lambda run: cut_at_fault(run, 3), "migrations")
    assert "2 load requests failed at the fault instead of migrating" in r["detail"], r["detail"]
    r = expect_fail("the fault hit nothing", lambda run: run.update(migrations=0, migration_limit=3), "migrations")
    assert "hit no stream" in r["detail"], r["detail"]
    expect_fail("fresh request failed", lambda run: run["fresh"][0].update(outcome="error"), "fresh_request")
    expect_fail("fresh request missing", lambda run: run["fresh"].pop(), "fresh_request")

    def never_recovers(run):
        for p in run["probes"]:
            if p["t_send"] >= 2.0:
                p["outcome"] = "cut"
    expect_fail("never recovers", never_recovers, "recovery")

    def slow(run):
        for p in run["probes"]:
            if 2.0 <= p["t_send"] < 4.0:
                p["outcome"] = "error"
    r = expect_fail("recovers too slowly", slow, "recovery", dict(CFG, max_recovery=1.0))
    assert abs(r["stats"]["recovery"] - 2.1) < 1e-6, r

    def slow_but_ok(run):  # probes that only succeed after waiting out the fault are not recovery
        for p in run["probes"]:
            if 2.0 <= p["t_send"] < 3.0:
                p["t_end"] = p["t_send"] + 1.5
    r = expect_fail("probes succeed only slowly", slow_but_ok, "recovery", dict(CFG, max_recovery=1.0))
    assert abs(r["stats"]["recovery"] - 1.1) < 1e-6, r
    # a cascade: a second fault 0.5 s after the first, while the one probe sent between them is
    # still slowed by the first; recovery from the first is measured through the second
    def cascade(run, second_heals=True):
        second = dict(copy.deepcopy(run["faults"][0]), index=1, label="kill9 worker[1]", target="worker[1]",
                      t_trigger=2.5, t_inject=2.5)
        run["faults"].append(second)
        for p in run["probes"]:
            if p["t_send"] == 2.0:
                p["t_end"] = 2.6  # unhealthy, and unanswered when the second fault came
            elif p["t_send"] >= 2.5 and not second_heals:
                p["outcome"] = "error"
    run = good_run()
    cascade(run)
    v, res = verdict(run)
    assert res["recovery"]["ok"] is True and abs(res["recovery"]["stats"]["recovery"] - 0.6) < 1e-6, res["recovery"]
    expect_fail("a cascade that never recovers", lambda run: cascade(run, second_heals=False), "recovery")

    def isolated(run):  # the slow probe was answered before the second fault: no merging
        cascade(run)
        for p in run["probes"]:
            if p["t_send"] == 2.0:
                p["t_end"] = 2.45
    run = good_run()
    isolated(run)
    v, res = verdict(run)
    assert res["recovery"]["ok"] is False and "kill9 worker[0]" in res["recovery"]["detail"], res["recovery"]
    expect_fail("stall over its bound", lambda run: run["requests"][0]["events"][5].__setitem__(0, 9.0), "stall")
    expect_fail("unexpected exit", lambda run: run["processes"]["unexpected_exits"].append(
        {"name": "frontend[0]", "pid": 10, "status": -11}), "processes")
    expect_fail("unclean shutdown", lambda run: run["processes"]["teardown"].update({"worker[1]": 1}), "processes")
    expect_fail("sanitizer report", lambda run: run["processes"]["sanitizer"].append(
        {"name": "worker[1]", "report": "ERROR: AddressSanitizer: heap-use-after-free"}), "processes")
    print("ok - migrations, fresh requests, recovery, stall and processes fail when broken")


def test_resumes():
    cfg = dict(CFG, min_resumes=3)

    def resumed(run, n_client=3, n_server=3):
        for i, r in enumerate(run["requests"]):
            r["resumes"] = 1 if i < n_client else 0
        run["resumes"] = n_server
    run = good_run()
    resumed(run)
    v, res = verdict(run, cfg)
    assert res["resumes"]["ok"] is True and v == "PASS", res["resumes"]
    expect_fail("fewer resumes than required", lambda run: resumed(run, 2, 2), "resumes", cfg)
    expect_fail("resumes the frontends did not count", lambda run: resumed(run, 3, 1), "resumes", cfg)
    expect_fail("resume counter unreadable", lambda run: resumed(run, 3, None), "resumes", cfg)
    print("ok - resumes fail when the load resumed too little or the frontends did not see it")


def _sleeper(ignore_usr1=False):
    code = "import signal,time\n"
    if ignore_usr1:
        code += "signal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
    code += "print('ready', flush=True)\ntime.sleep(60)\n"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    p.stdout.readline()
    return p


def _fault(spec_raw, pid):
    spec = scenario.from_cli(["http://127.0.0.1:9"], [spec_raw.format(pid=pid)], None, None, None, "m").faults[0]
    env = faults.Env(time.monotonic(), seed=1)
    f = faults.Fault(spec, env, 0)
    f.start()
    f.join(20)
    return f.record


def test_injector_evidence():
    p = _sleeper()
    r = _fault("kill9 pid={pid} at=0s", p.pid)
    p.wait(5)
    assert r["evidence_ok"] is True and r["t_inject"] is not None, r
    print(f"ok - kill9 evidence: {r['evidence']}")
    p = _sleeper()
    r = _fault("sigstop pid={pid} at=0s duration=0.3s", p.pid)
    assert r["evidence_ok"] is True and any("state T" in e for e in r["evidence"]), r
    p.kill()
    p.wait()
    print(f"ok - sigstop evidence: {r['evidence']}")
    # engine death of a process that ignores SIGUSR1: nothing happens, and the evidence says so
    p = _sleeper(ignore_usr1=True)
    r = _fault("engine_death pid={pid} at=0s exit_within=1s", p.pid)
    assert r["evidence_ok"] is False, r
    assert verdict(dict(good_run(), faults=[r]))[1]["evidence"]["ok"] is False
    p.kill()
    p.wait()
    print(f"ok - a fault with no effect is reported: {r['evidence']}")
    # a target that does not exist: never injected
    r = _fault("kill9 pid={pid} at=0s", 2 ** 22 + 12345)
    assert r["t_inject"] is None and r["error"], r
    print(f"ok - a fault on a missing pid is reported: {r['error']}")
    p.stdout.close()


def test_scenario_parser():
    def bad(raw, what):
        try:
            scenario.build(raw)
        except (scenario.ScenarioError, ValueError) as e:
            print(f"ok - rejects {what}: {e}")
            return
        raise AssertionError(f"accepted {what}: {raw}")
    bad({"load": {"concurency": 3}}, "a misspelt key")
    bad({"faults": [{"what": "kill9"}]}, "a fault without a time")
    bad({"faults": [{"what": "melt", "at": "1s"}]}, "an unknown fault")
    bad({"topology": {}, "faults": [{"what": "partition", "target": "worker[random]", "at": "1s", "duration": "1s"}]},
        "a partition of a random worker")
    bad({"topology": {"workers": 2}, "faults": [{"what": "kill9", "target": "worker[2]", "at": "1s"}]},
        "a target beyond the topology")
    bad({"topology": {}, "faults": [{"what": "etcd_outage", "at": "1s", "duration": "2s"}]},
        "an etcd fault without etcd")
    bad({"topology": {}, "faults": [{"what": "sigstop", "at": "1s"}]}, "a sigstop without duration")
    bad({"topology": {}, "target": {"url": "http://x"}}, "both topology and target")
    bad({"checks": {"allow": ["oops"]}}, "an unknown outcome kind")
    sc = scenario.from_cli(["http://h:8000/"], ["kill9 pid=1234 at=2s", "sigstop target=w1 at=3s duration=500ms"],
                           "concurrency=4 duration=10s stream=false", 'allow=["cut"] max_errors=3', None, None)
    assert sc.target["urls"] == ["http://h:8000"]
    f0, f1 = sc.faults
    assert f0["what"] == "kill9" and f0["target_parsed"] == ("pid", 1234) and f0["at"] == 2.0, f0
    assert f1["target_parsed"] == ("proc", "w1") and f1["duration"] == 0.5, f1
    assert sc.load["concurrency"] == 4 and sc.load["duration"] == 10.0 and sc.load["stream"] is False
    assert sc.checks["allow"] == ["cut"] and sc.checks["max_errors"] == ("count", 3)
    raw = {"topology": {"workers": 2}, "faults": [{"what": "engine_death", "at": "1s"}]}
    scenario.apply_overrides(raw, ["topology.workers=3", "faults.0.at=4s", "load.stream=false"])
    sc = scenario.build(raw)
    assert sc.topology["workers"] == 3 and sc.faults[0]["at"] == 4.0 and sc.load["stream"] is False
    assert sc.topology["worker_flags"].get("fault_signals") is True  # engine faults turn the hook on
    for path in sorted(os.listdir(os.path.join(bl.repo_root(), "tools", "chaos", "scenarios"))):
        full = os.path.join(bl.repo_root(), "tools", "chaos", "scenarios", path)
        sc = scenario.load_file(full)
        assert "engine" not in sc.topology["worker_flags"], (path, sc.topology["worker_flags"])
        # --engine llama: every worker of every shipped scenario runs the llama engine; a --set
        # still applies on top of it
        sc = scenario.load_file(full, ["topology.worker_flags.llama_threads=1"], engine="llama")
        assert sc.topology["worker_flags"]["engine"] == "llama" and \
            sc.topology["worker_flags"]["llama_threads"] == 1, (path, sc.topology["worker_flags"])
    sig = os.path.join(bl.repo_root(), "tools", "chaos", "scenarios", "worker-sigterm.toml")
    assert scenario.load_file(sig).load["output_tokens"] == [200, 400]
    assert scenario.load_file(sig, engine="llama").load["output_tokens"] == [1000, 1600]  # [engines.llama]
    assert scenario.load_file(sig, ["load.output_tokens=[5, 6]"], engine="llama").load["output_tokens"] == [5, 6]
    try:
        scenario.load_file(full, engine="vllm")
        raise AssertionError("accepted --engine vllm")
    except scenario.ScenarioError as e:
        print(f"ok - rejects an unknown engine: {e}")
    print("ok - scenario parser: one-liners, overrides, --engine and every shipped scenario")


def test_set_errors():
    """A --set that names nothing a scenario has, or gives a value of the wrong kind, is a usage
    error (exit 2, one line naming the override and what it takes), under run and validate alike."""
    scen = os.path.join(bl.repo_root(), "tools", "chaos", "scenarios", "worker-kill9.toml")
    env = dict(os.environ, BATON_CHAOS_DIR=os.path.join(bl.repo_root(), "tools", "chaos"))
    cases = [("faults.3.at=3s", "no fault '3': the scenario has 1 fault (faults.0)"),
             ("load.concurrency=abc", "expected an integer, got 'abc'"),
             ("load.concurrency=2.5", "expected an integer, got 2.5"),
             ("faults.0.at=soon", "expected a duration"),
             ("faults.0.restart=yes", "expected true or false, got 'yes'"),
             ("checks.max_errors=lots", "expected a count, a fraction below 1, or a percentage"),
             ("load.concurency=4", "load has no key 'concurency'"),
             ("faults.0.when=2s", "a fault has no key 'when'"),
             ("load.concurrency.x=1", "load.concurrency has no keys below it"),
             ("nosuch=1", "unknown key 'nosuch'"),
             ("load.concurrency", "expected key=value")]
    for cmd in ("validate", "run"):
        for ov, want in cases:
            args = [bl.baton_bin(), "chaos", cmd, scen, "--set", ov]
            if cmd == "run":
                args += ["--out", bl.tmpdir("chaos-set"), "--quiet"]
            p = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env)
            assert p.returncode == 2 and "Traceback" not in p.stderr, (cmd, ov, p.returncode, p.stderr[-2000:])
            assert p.stderr.startswith(f"baton chaos: --set {ov}") and want in p.stderr, (cmd, ov, p.stderr)
            assert p.stderr.count("\n") == 1, p.stderr
    print(f"ok - bad --set values exit 2 naming the key: {p.stderr.strip()}")
    # the same kinds hold in a scenario file and in the one-liners of a deployment
    try:
        scenario.build({"load": {"concurrency": "abc"}})
        raise AssertionError("accepted concurrency = \"abc\"")
    except scenario.ScenarioError as e:
        assert str(e) == "load.concurrency: expected an integer, got 'abc'", e
    p = subprocess.run([bl.baton_bin(), "chaos", "validate", "--url", "http://127.0.0.1:9", "--load", "duration=soon"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 2 and "load.duration: expected a duration" in p.stderr, (p.returncode, p.stderr)
    # good overrides still apply, a fault's key by its index included
    sc = scenario.load_file(scen, ["faults.0.at=3s", "load.concurrency=4", "checks.allow=[cut,refused]",
                                   "topology.worker_flags.llama_threads=1"])
    assert sc.faults[0]["at"] == 3.0 and sc.load["concurrency"] == 4 and sc.checks["allow"] == ["cut", "refused"]
    print("ok - scenario files and --load one-liners are held to the same kinds")


def test_report():
    run = good_run()
    run["requests"][2] = rec(2, outcome="cut", ids=REF[:3], t_send=1.9, t_end=2.1)
    svg = report.timeline_svg(run, "t <&> title")
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg"), root.tag
    assert "kill9 worker[0]" in svg and "restart worker[0]" in svg and "t &lt;&amp;&gt; title" in svg
    v, results = checks.evaluate(run, CFG)
    row = report.scenario_result("demo", "", v, run, results, "demo/timeline.svg", "demo/")
    md = report.table([row, {"name": "etcd", "verdict": "SKIP", "reason": "etcd is not installed"}])
    lines = md.splitlines()
    assert lines[0].startswith("| scenario | requests | completed | errors | lost / dup tokens | migrations |"), md
    # the cut stream is counted once in errors and its 7 undelivered reference tokens in lost
    assert "| demo | 8 | 7 | 1 | 7 / 0 | 3 |" in md and "**FAIL**" in md and "**SKIP**" in md, md
    print("ok - report: table row and well-formed SVG with fault markers")


test_good_run_passes()
test_byte_exact()
test_token_accounting()
test_all_ended()
test_baseline()
test_fd_table()
test_back_to_baseline_names_descriptors()
test_snapshot_not_counting_sampler()
test_evidence()
test_migrations_fresh_recovery_processes()
test_resumes()
test_injector_evidence()
test_scenario_parser()
test_set_errors()
test_report()
print("test_chaos_checkers: all passed")
