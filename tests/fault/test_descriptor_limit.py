"""A frontend whose descriptor limit is below --max-connections, through the real binary.

Each client connection is a descriptor. Past the process's limit accept(2) fails and libuv closes
the connections waiting with no answer: clients saw resets, nothing was counted and nothing said
why. The frontend now keeps --max-connections under the limit less the descriptors it keeps for
itself (an eighth, at least 256), so a connection past it gets the 503 too_many_connections it
documents and is counted:

  1. With the default --max-connections (20,000) under `ulimit -n 400`, the frontend says at start
     that it serves at most 144 client connections (info); 450 connections held open (more than the limit): the first
     144 are served, every later one gets a 503 too_many_connections (none is reset) and
     baton_frontend_http_rejections_total{reason="max_connections"} counts them; closed, the
     frontend serves again.
  2. --max-connections 5000 given under the same limit is a warning naming the number it serves.
"""

import os
import re
import socket
import stat
import sys
import time

import batonlib as bl

bl.deadline(120, "test_descriptor_limit")

NOFILE = 400
ROOM = NOFILE - 256  # the frontend's own reserve at this limit (frontend.c, fit_connections_to_descriptors)
HELD = 450

tmp = bl.tmpdir()
# the frontend under a descriptor limit of its own: a wrapper that lowers it and becomes baton
wrapper = os.path.join(tmp, "baton-nofile")
with open(wrapper, "w") as f:
    f.write(f"#!{sys.executable}\n"
            "import os, resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE}))\n"
            f"os.execv({bl.baton_bin()!r}, [{bl.baton_bin()!r}] + sys.argv[1:])\n")
os.chmod(wrapper, os.stat(wrapper).st_mode | stat.S_IXUSR)


def status_of(data):
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    return int(m.group(1)) if m else None


def hold(port, n):
    """n connections, each sent a GET /live: (open sockets that got 200, statuses of the rest)."""
    held, others = [], []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            s.sendall(b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
            got = s.recv(4096)
        except ConnectionResetError:
            got = b"reset"
        if status_of(got) == 200:
            held.append(s)
        else:
            others.append(got)
            s.close()
    return held, others


with bl.Cluster(bin=wrapper) as c:
    fe = c.start_frontend()
    log = fe.proc.log_text()
    assert f"at most {ROOM} client connections (--max-connections 20000 by default, but ulimit -n is {NOFILE}" \
        in log, fe.proc.log_tail()
    assert " WARN " not in "".join(ln for ln in log.splitlines(True) if "client connections" in ln)
    held, others = hold(fe.port, HELD)
    # the readiness probe's connection may still be counted when the first of these arrives
    assert ROOM - 2 <= len(held) <= ROOM, f"{len(held)} connections served, the room is {ROOM}"
    assert len(others) == HELD - len(held)
    for got in others:
        assert status_of(got) == 503 and b'"too_many_connections"' in got, got[:200]
    for s in held:
        s.close()
    bl.wait_for(lambda: bl.request("GET", fe.url + "/live")[0] == 200, 10, what="the frontend to take connections")
    samples = bl.metrics(fe.url)
    assert bl.metric_sum(samples, "baton_frontend_http_rejections_total", reason="max_connections") >= len(others)
    assert bl.metric_sum(samples, "baton_frontend_http_rejections_total", reason="no_descriptors") == 0
    assert "accept failed" not in fe.proc.log_text(), fe.proc.log_tail()
    print(f"default limit: {len(held)} served, {len(others)} refused with 503, none reset")

    fe2 = c.start_frontend(max_connections=5000)
    assert re.search(rf" WARN .*--max-connections 5000 is more than the descriptor limit allows \(ulimit -n {NOFILE}, "
                     rf"of which 256 .*serving at most {ROOM} client connections", fe2.proc.log_text()), \
        fe2.proc.log_tail()
print("test_descriptor_limit: ok")
