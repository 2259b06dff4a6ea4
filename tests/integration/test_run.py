"""`baton run`, the all-in-one launcher: serves at once, heals a crashed worker, stops everything
on SIGINT and cleans its private discovery directory."""

import os
import re
import signal
import time

import batonlib as bl

bl.deadline(90, "test_run")


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


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
print("test_run: ok")
