"""When nats-server drops a baton process, the log says why the server gave, not just "socket
closed": a real nats-server (pinging its clients every second, a client stale after 2 unanswered
pings), one frontend and one worker on the NATS event plane.

1. Both baton processes paused (SIGSTOP) for 5 s, longer than the server's 1 s x 2 pings: the
   server logs "Stale Client Connection", sends -ERR 'Stale Connection' and closes. Resumed, each
   process logs "NATS connection to … lost (closed by the server after -ERR 'Stale Connection')"
   (a server restart still reads "socket closed", test_log_lines), and reconnects.
2. The server's configuration reloaded (SIGHUP) with a token the processes do not have: it drops
   them with -ERR 'Authorization Violation', and each logs the loss with that text; nats.c then
   gives up on the server, and the line saying so names the refusal.
3. A worker whose user may not publish gets -ERR 'Permissions Violation for Publish …' for each
   load report, and stays connected (the server does not close for it). Its server then killed and
   started again: the loss reads "socket closed", not "closed by the server after -ERR
   'Permissions Violation …'": an -ERR names a loss only when the end of the stream follows it.
"""

import json
import re
import signal
import urllib.request

import batonlib as bl
import natslib

bl.deadline(90, "test_nats_server_errors")

PINGS = "ping_interval: \"1s\"\nping_max: 2\n"
LOST = r"NATS connection to nats://127\.0\.0\.1:\d+ lost \({}\)"


def closed(nats):
    """The server's closed connections (its /connz?state=closed), each with the reason it gave."""
    with urllib.request.urlopen(f"http://127.0.0.1:{nats.http_port}/connz?state=closed", timeout=5) as r:
        return json.loads(r.read()).get("connections") or []


def lines(proc, pattern):
    return re.findall(r"(?m)^.*" + pattern + r".*$", proc.log_text())


with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, config=PINGS).start()
    common = dict(event_plane="nats", nats_server=nats.url)
    fe = c.start_frontend(**common)
    w = c.start_worker(**common)
    c.wait_workers(fe, 1)
    procs = (fe, w)
    for p in procs:
        p.proc.wait_log(r"NATS connected to ", timeout=10)

    # --- 1. stale: the processes, not the server, stopped answering
    for p in procs:
        p.proc.kill(signal.SIGSTOP)
    try:
        # every client of the two processes gone (the frontend's journal has one too), all as stale
        bl.wait_for(lambda: nats.connz() == [], 15, what="nats-server dropping the paused clients")
        stale = [x for x in closed(nats) if x.get("reason") == "Stale Connection"]
        assert len(stale) >= 2, closed(nats)
    finally:
        for p in procs:
            p.proc.kill(signal.SIGCONT)
    for p in procs:
        p.proc.wait_log(LOST.format(re.escape("closed by the server after -ERR 'Stale Connection'")), timeout=10)
        bl.wait_for(lambda: len(lines(p.proc, r"NATS connected to ")) == 2, 15, what="the reconnect after SIGCONT")
        lost = lines(p.proc, r"NATS connection to \S+ lost \(")
        assert len(lost) == 1, lost  # the eviction only, not also told as a closed socket

    # --- 2. authorization revoked under a connected client
    with open(nats.conf_path, "a") as f:
        f.write('authorization { token: "not-what-baton-has" }\n')
    nats.proc.kill(signal.SIGHUP)
    for p in procs:
        p.proc.wait_log(LOST.format(re.escape("closed by the server after -ERR 'Authorization Violation'")),
                        timeout=15)
        p.proc.wait_log(r"the client gave up on nats://\S+ \([^)]*[Aa]uthorization [Vv]iolation[^)]*\) after the "
                        r"server refused its credentials", timeout=15)
    # the processes serve on, with the request-plane load reports
    st, _, b = bl.post_json(fe.url + "/v1/completions", bl.completion_body("after NATS", max_tokens=8))
    assert st == 200, (st, b)
    print("test_nats_server_errors: a stale eviction and a revoked authorization each logged with the server's -ERR")

    # --- 3. a non-fatal -ERR, then an unrelated close
    perms = natslib.NatsServer(c.dir, name="nats-perms", config=(
        'authorization { users = [ { user: "baton", password: "pw", permissions: { publish: { deny: ">" } } } ] }\n'
    )).start()
    wp = c.start_worker(env={"NATS_AUTH_USERNAME": "baton", "NATS_AUTH_PASSWORD": "pw"}, event_plane="nats",
                        nats_server=perms.url)
    wp.proc.wait_log(r"NATS connected to ", timeout=10)
    wp.proc.wait_log(r"Permissions Violation for Publish", timeout=10)
    perms.kill()
    wp.proc.wait_log(r"NATS connection to \S+ lost \(", timeout=10)
    lost = lines(wp.proc, r"NATS connection to \S+ lost \(")
    assert len(lost) == 1 and "socket closed" in lost[0] and "Permissions" not in lost[0], lost
    perms.start()
    wp.proc.wait_log(r"NATS connected to .*\n(?s:.*)NATS connected to ", timeout=15)

print("test_nats_server_errors: ok")
