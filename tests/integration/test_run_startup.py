"""`baton run` start-up: it says "serving" only when it is, and it does not loop on a failure.

  1. The HTTP port is held by another program (an HTTP server that even answers GET /health):
     `baton run` exits non-zero within 5 s, names the error (address already in use), never prints
     "serving", starts the frontend once (no restart loop), leaves no child and no directory behind,
     and the other program still serves.
  2. A configuration error of a child (frontend: --router-mode nonsense; worker: --upstream
     without --engine openai, a llama worker's model file missing) makes `baton run` exit 2 before
     it starts anything; one the child finds only once it runs (llama.cpp's libraries missing)
     makes it exit 2 without "serving" and without a restart.
  3. "baton: serving" is printed after the frontend has connected to every worker: at that moment
     GET /health lists exactly the workers `baton run` started (matched by pid through their
     discovery records), and in the shared log the line comes after the frontend's
     "connecting -> ready" of each of them.
  4. --http-host 127.0.0.1 holds for everything `baton run` starts: every listening socket of the
     frontend and of each worker (request plane and status server) is on 127.0.0.1.
  5. Restarts are bounded: once serving, the frontend is killed and another program takes its port;
     the restarted frontend fails 4 times in a row (delays 1, 2, 4, 8 s) and `baton run` gives up
     with exit 1, stopping every child. That group is started with BATON_WORKERS=1 and an invalid
     DYN_MIGRATION_LIMIT that --migration-limit 2 overrides: the flag wins, so the bad variable is
     not an error (for `baton run`, nor for its frontend, which inherits it), the frontend's limit
     is 2, and the lines say "1 worker", not "1 workers"."""

import http.client
import http.server
import json
import os
import re
import signal
import socket
import threading
import time

import batonlib as bl

bl.deadline(150, "test_run_startup")


class Squatter:
    """Another program on the port: an HTTP server answering every GET with 200 and a /health-like
    body that lists no instance."""

    def __init__(self, port):
        body = json.dumps({"status": "healthy", "endpoints": [], "instances": []}).encode()
        self.hits = 0
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


children = bl.children
gone = bl.gone


def started_pids(log):
    return [int(p) for p in re.findall(r"started (?:frontend|worker) \d+ \(pid (\d+)\)", log)]


def run_dir(log):
    m = re.search(r"discovery in (\S+?)\)", log)
    assert m, f"baton run did not name its discovery directory:\n{log}"
    return m.group(1)


def _addr(hexaddr, v6):
    b = bytes.fromhex(hexaddr)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, b[::-1])
    return socket.inet_ntop(socket.AF_INET6, b"".join(b[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening(pid):
    """(address, port) of every TCP socket `pid` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for name, v6 in (("tcp", False), ("tcp6", True)):
        with open(f"/proc/{pid}/net/{name}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    a, p = fields[1].split(":")
                    out.append((_addr(a, v6), int(p, 16)))
    return out


# --- 1. the port is taken by another program
with bl.Cluster() as c:
    port = bl.free_port()
    sq = Squatter(port)
    t0 = time.monotonic()
    fe = c.start_run(wait=False, http_port=port, workers=2, speedup_ratio=50)
    rc = fe.proc.wait(5)
    took = time.monotonic() - t0
    log = fe.proc.log_text()
    assert rc is not None, f"baton run still running 5 s after start with its port taken; log:\n{log}"
    assert rc != 0, f"baton run exited 0 with its port taken; log:\n{log}"
    assert "baton: serving" not in log, f"baton run claimed to serve at a port another program holds:\n{log}"
    assert re.search(r"ERROR +frontend\[\d+\]: cannot listen on 127\.0\.0\.1:%d: address already in use; choose "
                     r"another --http-port \(DYN_HTTP_PORT\)" % port, log), log
    assert re.search(r"ERROR +run\[\d+\]: frontend 0 exited during start-up \(status 1; .*nothing is serving at "
                     r"http://127\.0\.0\.1:%d" % port, log), log
    assert log.count("started frontend") == 1, f"the frontend was restarted:\n{log}"
    pids = started_pids(log)
    # the workers start once something answers on the frontend's port: here only if the squatter
    # answered the launcher's probe before the frontend exited; then they are stopped with it
    assert len(pids) in (1, 3), pids
    bl.wait_for(lambda: all(gone(p) for p in pids), 5, what="every child of the failed baton run gone")
    assert not os.path.exists(run_dir(log)), "discovery directory left behind"
    st, _, body = bl.get_json(f"http://127.0.0.1:{port}/health")
    assert st == 200 and body == {"status": "healthy", "endpoints": [], "instances": []}, (st, body)
    sq.close()
print(f"port taken: baton run exited {rc} after {took:.2f} s, no 'serving', frontend started once")

# --- 2. a configuration error in a child: exit 2, no restart. What the children's argument checks
# refuse, `baton run` refuses before it starts any child (it runs those checks itself)
for what, flags, rx in [
        ("frontend", {"router_mode": "nonsense"}, r"unknown --router-mode 'nonsense'"),
        ("worker", {"upstream": "http://127.0.0.1:9"}, r"--upstream is a setting of the openai engine.*--engine openai"),
        ("worker", {"engine": "llama", "model": "/nonexistent/model.gguf"},
         r"model file /nonexistent/model\.gguf \(--model\): No such file or directory")]:
    with bl.Cluster() as c:
        fe = c.start_run(wait=False, workers=2, speedup_ratio=50, **flags)
        rc = fe.proc.wait(10)
        log = fe.proc.log_text()
        assert rc == 2 and re.search(rx, log), f"{what} configuration error: baton run exited {rc}; log:\n{log}"
        assert re.search(r"\(as passed on to `baton %s`, which refuses it\); nothing was started" % what, log), log
        assert "started" not in log.replace("nothing was started", ""), log
# what a child finds only once it runs (llama.cpp's libraries not where --llama-lib-dir says: the
# worker exits 2 at start-up) stops the group the same way
for what, flags, rx in [
        ("worker", {"engine": "llama", "llama_lib_dir": "/nonexistent"},
         r"llama\.cpp library /nonexistent/\S+ not found")]:
    with bl.Cluster() as c:
        fe = c.start_run(wait=False, workers=2, speedup_ratio=50, **flags)
        rc = fe.proc.wait(10)
        log = fe.proc.log_text()
        assert rc == 2, f"{what} configuration error: baton run exited {rc}; log:\n{log}"
        assert re.search(rx, log), log
        assert re.search(r"ERROR +run\[\d+\]: %s \d+ exited with status 2: a configuration error" % what, log), log
        assert "baton: serving" not in log and "restarting" not in log, log
        assert log.count(f"started {what} 0 ") == 1, log
        pids = started_pids(log)
        bl.wait_for(lambda: all(gone(p) for p in pids), 5, what="every child gone")
print("configuration errors: baton run exited 2 without serving or restarting")

# --- 3 and 4. "serving" only once every worker is routable; everything on --http-host
with bl.Cluster() as c:
    fe = c.start_run(workers=3, speedup_ratio=50)  # waits for the "baton: serving" line
    assert re.search(r"(?m)^baton: serving '[^']+' with 3 workers at ", fe.proc.log_text())
    st, _, body = bl.get_json(fe.url + "/health")
    assert st == 200, (st, body)
    listed = {i["instance_id"] for i in body["instances"]}
    log = fe.proc.log_text()
    ddir = run_dir(log)
    kids = children(fe.proc.pid)
    wpids = {p for p in kids if "\0worker\0" in open(f"/proc/{p}/cmdline").read()}
    assert len(wpids) == 3, (kids, wpids)
    registered = {}
    for name in os.listdir(ddir):
        if not name.startswith("."):
            with open(os.path.join(ddir, name)) as f:
                v = json.load(f)
            registered[v["instance_id"]] = v["pid"]
    ours = {i for i, p in registered.items() if p in wpids}
    assert len(ours) == 3 and listed == ours, \
        f"at 'serving' /health listed {listed}, the workers of baton run are {ours} ({registered})"
    lines = log.splitlines()
    serving_at = next(i for i, l in enumerate(lines) if l.startswith("baton: serving"))
    ready_ids = {m.group(1) for l in lines[:serving_at]
                 for m in [re.search(r"frontend\[\d+\]: worker ([0-9a-f]+) \(.*\): connecting -> ready", l)] if m}
    assert {format(i, "x") for i in ours} <= ready_ids, \
        f"'serving' came before the frontend had connected to every worker:\n" + "\n".join(lines[:serving_at + 1])
    # everything baton run started listens on 127.0.0.1 only
    fpids = [p for p in kids if p not in wpids]
    assert len(fpids) == 1
    socks = {p: listening(p) for p in kids}
    for p in wpids:
        assert len(socks[p]) >= 2, f"worker {p}: expected the request plane and a status server, got {socks[p]}"
    wide = {p: s for p, s in socks.items() if any(a != "127.0.0.1" for a, _ in s)}
    assert not wide, f"--http-host 127.0.0.1, yet these children listen elsewhere: {wide}"
    assert (("127.0.0.1", fe.port)) in socks[fpids[0]], socks
    def answers_live(port):
        try:
            return bl.request("GET", f"http://127.0.0.1:{port}/live", timeout=3)[0] == 200
        except (OSError, http.client.HTTPException):
            return False  # the request-plane port does not speak HTTP

    for p in wpids:  # the status server is among them, and answers there
        assert any(answers_live(port) for _, port in socks[p]), f"worker {p}: no status server in {socks[p]}"
    bl.stream_chat(fe.url, bl.chat_body("Hello", max_tokens=8)).assert_ok("stream")
    fe.proc.kill(signal.SIGINT)
    assert fe.proc.wait(30) == 0, fe.proc.returncode
print("serving: printed after the frontend connected to all 3 workers; every listener on 127.0.0.1")

# --- 5. bounded restarts: a frontend that cannot start again is given up on
with bl.Cluster() as c:
    fe = c.start_run(env={"BATON_WORKERS": "1", "DYN_MIGRATION_LIMIT": "abc"}, migration_limit=2, speedup_ratio=50)
    c.wait_workers(fe, 1)
    lim = bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_model_migration_limit")
    assert lim == 2, f"--migration-limit 2 over DYN_MIGRATION_LIMIT=abc: the frontend's limit is {lim}"
    log = fe.proc.log_text()
    assert "starting a frontend on http://127.0.0.1:" in log and " and 1 worker (discovery in " in log, log
    assert re.search(r"(?m)^baton: serving '[^']+' with 1 worker at ", log), log
    assert "1 workers" not in log, log
    fpid = [p for p in children(fe.proc.pid) if "\0frontend\0" in open(f"/proc/{p}/cmdline").read()]
    assert len(fpid) == 1, fpid
    os.kill(fpid[0], signal.SIGKILL)
    bl.wait_for(lambda: gone(fpid[0]), 5, what="the frontend to die")
    sq = bl.wait_for(lambda: Squatter(fe.port), 1, interval=0.01, what="taking the frontend's port")
    t0 = time.monotonic()
    rc = fe.proc.wait(60)
    took = time.monotonic() - t0
    log = fe.proc.log_text()
    assert rc == 1, f"baton run exited {rc}; log:\n{log}"
    delays = [int(d) for d in re.findall(r"frontend 0 exited unexpectedly \([^)]*\); restarting it in (\d+) s", log)]
    assert delays == [1, 2, 4, 8], f"restart delays {delays}; log:\n{log}"
    assert log.count("started frontend 0 ") == 5, log
    assert log.count("address already in use") == 4, log
    assert re.search(r"ERROR +run\[\d+\]: frontend 0 exited before it was ready 4 times in a row \(last: status 1\); "
                     r"giving up; stopping", log), log
    pids = started_pids(log)
    bl.wait_for(lambda: all(gone(p) for p in pids), 10, what="every child gone")
    sq.close()
print(f"bounded restarts: gave up after 4 failed restarts (delays 1, 2, 4, 8 s) in {took:.1f} s, exit 1")
print("test_run_startup: ok")
