"""A third-party EventSource client (the `eventsource` npm package, pinned, unmodified) that
reconnects by itself with Last-Event-ID, against a baton frontend whose connections to it are cut.

The client POSTs a streamed request, takes the X-Stream-Id header and drops that connection, then
reads the stream with `new EventSource(.../v1/chat/completions/{stream id}?stream=true)` through a
TCP proxy started here, which cuts each of the client's first connections after a random number
of response bytes (mid-event as often as not). The client reconnects on its own (3 s later, its
default) with the Last-Event-ID of the last whole event it got. Checked: what it received, put
together, equals an uncut run of the same request byte for byte (text, token ids, finish reason,
usage) and ends with [DONE]; it connected once per cut plus once; every reconnection carried a
Last-Event-ID of this stream, with positions that only grow; the frontend counted the resumes.
The same is done for /v1/completions. If the package cannot be installed, the test fails.
"""

import json
import os
import random
import re
import socket
import sys
import threading

import batonlib as bl
import npmlib

EVENTSOURCE_VERSION = "3.0.7"  # last 3.x: node >= 18 (4.x and later need node 20 or 22)
HERE = os.path.dirname(os.path.abspath(__file__))
rng = random.Random(77)


class CuttingProxy:
    """Forwards TCP connections to `upstream`; the first len(cuts) connections are closed after
    cuts[i] bytes of response. Records each connection's request head."""

    def __init__(self, upstream_port, cuts):
        self.upstream = ("127.0.0.1", upstream_port)
        self.cuts = list(cuts)
        self.heads = []
        self.cut_done = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                i = len(self.heads)
                self.heads.append(b"")
            threading.Thread(target=self._serve, args=(c, i), daemon=True).start()

    def _serve(self, c, i):
        u = socket.create_connection(self.upstream)
        limit = self.cuts[i] if i < len(self.cuts) else None

        def up():
            try:
                while True:
                    d = c.recv(65536)
                    if not d:
                        break
                    with self.lock:
                        if b"\r\n\r\n" not in self.heads[i]:
                            self.heads[i] += d
                    u.sendall(d)
            except OSError:
                pass

        threading.Thread(target=up, daemon=True).start()
        sent = 0
        try:
            while True:
                d = u.recv(65536)
                if not d:
                    break
                if limit is not None and sent + len(d) >= limit:
                    c.sendall(d[:limit - sent])
                    with self.lock:
                        self.cut_done.append(i)
                    break
                c.sendall(d)
                sent += len(d)
        except OSError:
            pass
        for s in (c, u):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.sock.close()


def run_client(work, fe, proxy, path, body):
    env = dict(os.environ, BATON_URL=fe.url, BATON_ES_URL=f"http://127.0.0.1:{proxy.port}", BATON_PATH=path,
               BATON_BODY=json.dumps(body))
    return npmlib.run_node(work, "eventsource_client.mjs", env, 120)[0]


def main():
    bl.deadline(280)
    try:
        pkg_dir = npmlib.ensure_package("eventsource", EVENTSOURCE_VERSION, f"eventsource-node-{EVENTSOURCE_VERSION}")
    except AssertionError as e:
        bl.mark_failed()
        sys.stderr.write(f"FAIL: {e}\n")
        sys.exit(1)

    with bl.Cluster() as c:
        work = npmlib.node_workdir(c.dir, "node", os.path.join(HERE, "eventsource_client.mjs"), pkg_dir)
        fe = c.start_frontend()
        c.start_worker(speedup_ratio=4)
        c.wait_workers(fe, 1)

        for api, path, body in (
                ("chat", "/v1/chat/completions",
                 bl.chat_body("an EventSource client", max_tokens=150, return_token_ids=True, stream=True,
                              stream_options={"include_usage": True})),
                ("completions", "/v1/completions",
                 bl.completion_body("an EventSource client", max_tokens=150, return_token_ids=True, stream=True,
                                    temperature=0.7, seed=5))):
            ref = (bl.stream_chat if api == "chat" else bl.stream_completion)(fe.url, body).assert_ok("reference")
            before = bl.metric_sum(bl.metrics(fe.url), "baton_frontend_stream_resumes_total")
            cuts = sorted(rng.sample(range(600, 20000), 2))
            proxy = CuttingProxy(fe.port, cuts)
            try:
                out = run_client(work, fe, proxy, path, body)
            finally:
                proxy.close()
            assert "error" not in out, out
            assert out["done"], f"{api}: no [DONE]: {out}"
            assert out["token_ids"] == ref.token_ids, \
                f"{api}: token ids differ: {len(out['token_ids'])} vs {len(ref.token_ids)}"
            assert out["text"] == ref.text, f"{api}: text differs"
            assert out["finish_reason"] == ref.finish_reason and out["usage"] == ref.usage, out
            assert sorted(proxy.cut_done) == [0, 1], f"{api}: the proxy cut connections {proxy.cut_done}"
            assert out["opens"] == 3, f"{api}: the client connected {out['opens']} times for 2 cuts"
            last = [re.search(rb"(?i)\r\nlast-event-id: *([^\r\n]*)", h) for h in proxy.heads]
            assert last[0] is None, f"{api}: the first GET carried a Last-Event-ID"
            positions = []
            for m in last[1:]:
                assert m, f"{api}: a reconnection without Last-Event-ID: {proxy.heads}"
                sid, pos = m.group(1).decode().split(":")[:2]
                assert sid == out["sid"], f"{api}: Last-Event-ID of another stream: {m.group(1)}"
                positions.append(int(pos))
            assert positions == sorted(positions), f"{api}: Last-Event-ID went back: {positions}"
            resumed = bl.metric_sum(bl.metrics(fe.url), "baton_frontend_stream_resumes_total") - before
            assert resumed == 3, f"{api}: the frontend counted {resumed} resumes for 3 GETs"
            print(f"eventsource@{EVENTSOURCE_VERSION} {api}: {len(ref.token_ids)} tokens exact through 2 cuts at "
                  f"{cuts} response bytes; reconnected with Last-Event-ID at positions {positions}", flush=True)


if __name__ == "__main__":
    main()
    print("test_eventsource_npm: OK")
