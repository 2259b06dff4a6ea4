"""`baton run`, the all-in-one launcher: serves at once, heals a crashed worker, stops everything
on SIGINT and cleans its private discovery directory; with --event-plane nats --nats-server URL,
the frontend and every worker (a restarted one too) connect to that NATS server and the workers'
load reports reach the frontend over it."""

import os
import re
import signal
import time

import batonlib as bl
import natslib

bl.deadline(120, "test_run")


children = bl.children


with bl.Cluster() as c:
    fe = c.start_run(workers=2, speedup_ratio=50)
    c.wait_workers(fe, 2)
    s = bl.stream_chat(fe.url, bl.chat_body("Hello", max_tokens=20)).assert_ok("first stream")
    assert len(s.text.split()) >= 10, s.text
    log = fe.proc.log_text()
    m = re.search(r"discovery in (\S+)\)", log)
    assert m, "run did not print its discovery directory"
    ddir = m.group(1)
    assert os.path.isdir(ddir)
    # the workers start only once the frontend holds its port: a worker's status server binds any
    # free port and could otherwise take the one chosen for the frontend (which then exits)
    listen = re.search(r"(?m)^.* frontend\[\d+\]: frontend listening on .*$", log)
    first_worker = re.search(r"(?m)^.* run\[\d+\]: started worker 0 .*$", log)
    assert listen and first_worker, log
    assert listen.start() < first_worker.start(), \
        f"a worker was started before the frontend listened:\n{listen.group(0)}\n{first_worker.group(0)}"
    kids = children(fe.proc.pid)
    assert len(kids) == 3, f"expected a frontend and 2 workers, found {kids}"
    # a worker that dies is restarted
    wpids = [p for p in kids if "worker" in open(f"/proc/{p}/cmdline").read()]
    assert len(wpids) == 2, wpids
    os.kill(wpids[0], signal.SIGKILL)
    fe.proc.wait_log(r"worker \d+ exited unexpectedly.*restarting", timeout=10)
    bl.wait_for(lambda: len(children(fe.proc.pid)) == 3, 15, what="the crashed worker to be restarted")
    c.wait_workers(fe, 2, timeout=20)
    bl.stream_chat(fe.url, bl.chat_body("after restart", max_tokens=10)).assert_ok("stream after restart")
    # Ctrl-C stops everything and removes the directory
    kids = children(fe.proc.pid)
    fe.proc.kill(signal.SIGINT)
    rc = fe.proc.wait(30)
    assert rc == 0, f"baton run exited with {rc}"
    for p in kids:
        assert not os.path.exists(f"/proc/{p}") or open(f"/proc/{p}/stat").read().split()[2] == "Z", \
            f"child {p} still running"
    assert not os.path.exists(ddir), f"{ddir} left behind"
print("run: served, healed a worker, stopped cleanly")

# --- the event plane options reach the frontend and every worker
with bl.Cluster() as c:
    ns = natslib.NatsServer(c.dir).start()
    fe = c.start_run(workers=2, speedup_ratio=50, event_plane="nats", nats_server=ns.url)
    ids = {i["instance_id"] for i in c.wait_workers(fe, 2)}

    def nats_clients():
        return {n for n in ns.clients() if n.startswith("baton-")}

    def expect(ids):
        return {f"baton-worker-{i:x}" for i in ids}

    bl.wait_for(lambda: len(nats_clients()) == 3 and expect(ids) <= nats_clients(), 20,
                what="the frontend and both workers of `baton run` connected to the NATS server")
    assert sum(n.startswith("baton-frontend-") for n in nats_clients()) == 1, nats_clients()
    assert bl.metric_sum(bl.metrics(fe.url), "baton_frontend_event_plane_connected", plane="nats") == 1

    def reports(wid):
        return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_load_reports_total", worker_id=format(wid, "x"),
                             source="event_plane")

    for i in range(4):
        bl.stream_chat(fe.url, bl.chat_body(f"nats {i}", max_tokens=10)).assert_ok(f"stream {i} over NATS")
    bl.wait_for(lambda: all(reports(w) > 0 for w in ids), 15, what="load reports of both workers over NATS")
    # a restarted worker gets the same flags
    wpids = [p for p in children(fe.proc.pid) if "worker" in open(f"/proc/{p}/cmdline").read()]
    assert len(wpids) == 2, wpids
    for p in wpids:
        args = open(f"/proc/{p}/cmdline").read().split("\0")
        assert args[args.index("--event-plane") + 1] == "nats" and args[args.index("--nats-server") + 1] == ns.url, args
    os.kill(wpids[0], signal.SIGKILL)
    fe.proc.wait_log(r"worker \d+ exited unexpectedly.*restarting", timeout=10)
    new_ids = set()

    def replaced():
        new_ids.clear()
        new_ids.update(i["instance_id"] for i in c.wait_workers(fe, 2, timeout=20))
        return new_ids != ids

    bl.wait_for(replaced, 20, what="the crashed worker to be replaced")
    bl.wait_for(lambda: nats_clients() == expect(new_ids) | {n for n in nats_clients() if "frontend" in n}, 20,
                what="the restarted worker connected to NATS, the dead one gone")
    fe.proc.kill(signal.SIGINT)
    assert fe.proc.wait(30) == 0, f"baton run exited with {fe.proc.returncode}"
    bl.wait_for(lambda: not nats_clients(), 10, what="every NATS client of `baton run` gone")
print("run --event-plane nats: frontend and workers on the NATS server")
# --- flags for the frontend and for both: --namespace, --threads, --max-concurrent-requests
with bl.Cluster() as c:
    fe = c.start_run(workers=2, speedup_ratio=50, namespace="team-a", threads=2, max_concurrent_requests=1)
    insts = c.wait_workers(fe, 2)
    assert all(i["namespace"] == "team-a" for i in insts), insts
    bl.stream_chat(fe.url, bl.chat_body("namespaced", max_tokens=8)).assert_ok("stream in namespace team-a")
    m = bl.metrics(fe.url)
    assert {k for k in m if k.startswith("baton_frontend_thread_requests_total{")} == {
        'baton_frontend_thread_requests_total{thread="0"}', 'baton_frontend_thread_requests_total{thread="1"}'}, m
    second = []

    def during_first(st, ev):  # while the first stream runs, a second request is over the limit
        if not second:
            second.append(bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("second", max_tokens=4)))
        return False

    bl.stream_chat(fe.url, bl.chat_body("long", max_tokens=400), on_event=during_first).assert_ok("first")
    assert second and second[0][0] == 503, second  # --max-concurrent-requests 1 reached the frontend
    fe.proc.kill(signal.SIGINT)
    assert fe.proc.wait(30) == 0, f"baton run exited with {fe.proc.returncode}"
print("run --namespace/--threads/--max-concurrent-requests: forwarded")
print("test_run: ok")
