"""Descriptor pressure on the frontend must not drop healthy workers from file discovery.

A frontend and one worker share a discovery directory. The frontend's RLIMIT_NOFILE is lowered
(prlimit) to what it has open plus K, and K - 1 idle client connections are opened to it: it is
left with one free descriptor. Each discovery scan then opens the directory (the last descriptor)
and fails to open the worker's key with EMFILE. A failed open is not a deleted key: the worker must
stay known (no "left discovery" in the log), the error must be logged once (the evidence that
scans really ran out of descriptors), and once the connections close the worker serves at once,
with no rejoin. Fails on the code from before the fix, where the EMFILE read as a deletion.
"""

import os
import re
import resource
import socket
import time

import batonlib as bl

bl.deadline(90, "test_fd_pressure")

K = 40
PRESSURE_S = 3.0  # several scans: one per second, plus one per refresh of the worker's key


def nfds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def main():
    with bl.Cluster() as c:
        fe = c.start_frontend()
        c.start_worker(speedup_ratio=100, discovery_ttl=3)  # its key is refreshed every second
        c.wait_workers(fe, 1)
        body = bl.chat_body("fd pressure", max_tokens=8, return_token_ids=True)
        ref = bl.stream_chat(fe.url, body).assert_ok("reference")
        pid = fe.proc.pid
        time.sleep(0.3)  # the reference's connection closed on the frontend's side too
        base = nfds(pid)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (base + K, hard))
        conns = []
        try:
            for _ in range(K - 1):
                conns.append(socket.create_connection(("127.0.0.1", fe.port), timeout=5))
            bl.wait_for(lambda: nfds(pid) == base + K - 1, 5,
                        what=f"the frontend holding {base + K - 1} descriptors (limit {base + K})")
            m = fe.proc.wait_log(r"discovery\(file\): cannot read \d+ key\(s\) in .*Too many open files", 5)
            t_fault = time.monotonic()
            time.sleep(PRESSURE_S)
            held = nfds(pid)
        finally:
            for s in conns:
                s.close()
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        log = fe.proc.log_text()
        print(f"frontend: {base} descriptors, limit set to {base + K}, {K - 1} idle connections; "
              f"'{m.group(0)}' then {PRESSURE_S} s under pressure ({held} descriptors held)", flush=True)
        assert held == base + K - 1, f"the frontend's descriptors changed under pressure: {held}"
        assert "left discovery" not in log, "a healthy worker left discovery under descriptor pressure:\n" + \
            "\n".join(l for l in log.splitlines() if "discovery" in l)
        assert len(re.findall(r"cannot read \d+ key\(s\)", log)) == 1, "the read error was not logged once"
        fe.proc.wait_log(r"every key in .* can be read again", 5)
        # the worker is served at once: it never left, so there is nothing to rejoin
        assert len(c.wait_workers(fe, 1, timeout=2)) == 1
        s = bl.stream_chat(fe.url, body).assert_ok("request after the pressure")
        assert s.token_ids == ref.token_ids and s.text == ref.text
        assert fe.proc.log_text().count("discovered worker") == 1, "the worker was discovered again"
        print(f"no worker left discovery; served again {time.monotonic() - t_fault:.1f} s after the fault began",
              flush=True)
    print("test_fd_pressure: ok")


main()
