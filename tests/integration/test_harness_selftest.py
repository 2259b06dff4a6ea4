"""Self-test of tests/lib/batonlib.py, without the baton binary.

The harness decides whether every other integration and fault test passes, so it is tested
itself: SSE parsing against a canned server (split lines, CRLF, comments, early close, error
events, non-200 answers, aborts that the server really sees, timeouts), Prometheus parsing,
process cleanup (at exit, on SIGTERM, on the deadline, when the test process is SIGKILLed) and the
Cluster plumbing against a fake `baton` written in Python.
"""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import unittest

import batonlib as bl

LIB_DIR = os.path.dirname(os.path.abspath(bl.__file__))


def pid_alive(pid):
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_dead(pid, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------------------------------------
# A canned SSE server.

def chat_chunk(content=None, ids=None, finish=None, role=None):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "mock-model", "choices": [choice]}


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


class Canned(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disconnects = []  # scenario names whose client went away while the server was writing

    def log_message(self, *a):
        pass

    def _chunk(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _begin(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _end(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _json(self, status, obj, extra=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/metrics":
            text = textwrap.dedent('''\
                # HELP dynamo_frontend_requests_total Requests.
                # TYPE dynamo_frontend_requests_total counter
                dynamo_frontend_requests_total{model="mock-model",status="success"} 7
                dynamo_frontend_requests_total{model="mock-model",status="error"} 2
                dynamo_frontend_requests_total{model="other",status="success"} 1
                dynamo_frontend_inflight_requests 0
                weird_total{msg="a, \\"b\\" }c",path="x\\\\y"} 3.5 1700000000000
                latency_bucket{le="+Inf"} 12
                latency_sum 1.5e-3
                nan_metric NaN
                ''')
            data = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/live":
            self._json(200, {"status": "live"}, {"X-Multi": "a"})
        else:
            self._json(404, {"error": {"message": "no route", "type": "not_found", "code": 404}})

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(n) or b"{}")
        scen = body.get("scenario", "normal")
        try:
            getattr(self, "s_" + scen)(body)
        except (BrokenPipeError, ConnectionResetError):
            Canned.disconnects.append(scen)

    def s_echo(self, body):
        self._json(200, {"got": body, "ct": self.headers.get("Content-Type"), "path": self.path})

    def s_normal(self, body):
        self._begin()
        events = [chat_chunk(role="assistant", content=""), chat_chunk("Hel", [11, 12]), chat_chunk("lo", [13]),
                  chat_chunk(" wo", [14], finish="length")]
        wire = "".join(f"data: {json.dumps(e)}\n\n" for e in events[:2])
        wire += ": keep-alive comment\n\n"
        wire += f"data: {json.dumps(events[2])}\r\n\r\n"  # CRLF line endings
        wire += f"data:{json.dumps(events[3])}\n\n"  # no space after the colon
        wire += "data: " + json.dumps({"id": "chatcmpl-1", "choices": [], "usage": USAGE}) + "\n\n"
        wire += "data: [DONE]\n\n"
        # Chunk boundaries deliberately fall inside lines and inside a multi-byte character.
        raw = wire.encode()
        for i in range(0, len(raw), 7):
            self._chunk(raw[i:i + 7])
        self._end()

    def s_multiline(self, body):
        # One event split over two data: lines (joined with a newline, as SSE says).
        self._begin()
        self._chunk('data: {"choices":[{"index":0,\ndata: "delta":{"content":"x"},"finish_reason":"stop"}]}\n\n')
        self._chunk("data: [DONE]\n\n")
        self._end()

    def s_completion(self, body):
        self._begin()
        for text, ids, fin in (("Once", [1], None), (" upon", [2, 3], None), (" é", [4], "length")):
            ev = {"object": "text_completion", "choices": [{"index": 0, "text": text, "token_ids": ids,
                                                             "finish_reason": fin}]}
            self._chunk(f"data: {json.dumps(ev, ensure_ascii=False)}\n\n")
        self._chunk("data: [DONE]\n\n")
        self._end()

    def s_early(self, body):
        self._begin()
        self._chunk(f"data: {json.dumps(chat_chunk('a', [1]))}\n\n")
        self._chunk(f"data: {json.dumps(chat_chunk('b', [2]))}\n\n")
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)  # cut: no terminating chunk, no [DONE]
        self.close_connection = True

    def s_nodone(self, body):
        self._begin()
        self._chunk(f"data: {json.dumps(chat_chunk('a', [1], finish='stop'))}\n\n")
        self._end()  # a well-formed end of the body, but no [DONE]

    def s_error(self, body):
        self._begin()
        self._chunk(f"data: {json.dumps(chat_chunk('a', [1]))}\n\n")
        self._chunk('data: {"error":{"message":"engine died","type":"internal_error","code":500}}\n\n')
        self._chunk("data: [DONE]\n\n")
        self._end()

    def s_http503(self, body):
        self._json(503, {"error": {"message": "all workers are busy", "type": "overloaded", "code": 503}},
                   {"Retry-After": "2"})

    def s_slow(self, body):
        self._begin()
        for i in range(400):  # 20 s at most; the client aborts long before
            self._chunk(f"data: {json.dumps(chat_chunk(str(i), [i]))}\n\n")
            time.sleep(0.05)
        self._chunk("data: [DONE]\n\n")
        self._end()

    def s_hang(self, body):
        self._begin()
        self._chunk(f"data: {json.dumps(chat_chunk('a', [1]))}\n\n")
        time.sleep(4)
        self._end()

    def s_after_done(self, body):
        self._begin()
        self._chunk(f"data: {json.dumps(chat_chunk('a', [1], finish='stop'))}\n\n")
        self._chunk("data: [DONE]\n\n")
        self._chunk(f"data: {json.dumps(chat_chunk('zombie', [9]))}\n\n")
        self._end()

    def s_badjson(self, body):
        self._begin()
        self._chunk("data: {not json\n\n")
        self._chunk(f"data: {json.dumps(chat_chunk('a', [1], finish='stop'))}\n\n")
        self._chunk("data: [DONE]\n\n")
        self._end()


class SSETests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canned)
        cls.server.daemon_threads = True
        cls.thread = threading.Thread(target=cls.server.serve_forever, daemon=True)
        cls.thread.start()
        cls.url = f"http://127.0.0.1:{cls.server.server_address[1]}"

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

    def chat(self, scenario, **kw):
        return bl.stream_chat(self.url, {"model": "mock-model", "scenario": scenario}, **kw)

    def test_normal_stream(self):
        s = self.chat("normal", timeout=10)
        self.assertEqual(s.status, 200)
        self.assertTrue(s.done)
        self.assertIsNone(s.error)
        self.assertEqual(s.text, "Hello wo")
        self.assertEqual(s.token_ids, [11, 12, 13, 14])
        self.assertEqual(s.finish_reason, "length")
        self.assertEqual(s.usage, USAGE)
        self.assertEqual(len(s.events), 5)  # role, 3 content, usage; [DONE] is not an event
        self.assertEqual(len(s.t_events), 5)
        self.assertEqual(len(s.t_tokens), 3)
        self.assertEqual(s.t_first, s.t_tokens[0])
        self.assertTrue(s.t_start <= s.t_first <= s.t_tokens[-1] <= s.t_end)
        self.assertFalse(s.closed_early or s.aborted or s.timed_out or s.unterminated)
        self.assertTrue(s.ok)
        s.assert_ok()

    def test_multiline_data(self):
        s = self.chat("multiline", timeout=10)
        self.assertEqual(s.text, "x")
        self.assertEqual(s.finish_reason, "stop")
        self.assertTrue(s.ok, s.summary())

    def test_completion_stream(self):
        s = bl.stream_completion(self.url, {"model": "mock-model", "scenario": "completion"}, timeout=10)
        self.assertEqual(s.text, "Once upon é")
        self.assertEqual(s.token_ids, [1, 2, 3, 4])
        self.assertEqual(s.finish_reason, "length")
        self.assertTrue(s.ok, s.summary())

    def test_closed_without_done(self):
        s = self.chat("early", timeout=10)
        self.assertEqual(s.status, 200)
        self.assertFalse(s.done)
        self.assertTrue(s.closed_early)
        self.assertEqual(s.text, "ab")
        self.assertFalse(s.ok)
        with self.assertRaises(AssertionError):
            s.assert_ok()

    def test_terminated_body_without_done(self):
        s = self.chat("nodone", timeout=10)
        self.assertTrue(s.closed_early)
        self.assertIsNone(s.exception)
        self.assertEqual(s.finish_reason, "stop")
        self.assertFalse(s.ok)

    def test_error_event(self):
        s = self.chat("error", timeout=10)
        self.assertEqual(s.error, {"message": "engine died", "type": "internal_error", "code": 500})
        self.assertTrue(s.done)
        self.assertEqual(s.text, "a")
        self.assertFalse(s.ok)

    def test_non_200(self):
        s = self.chat("http503", timeout=10)
        self.assertEqual(s.status, 503)
        self.assertEqual(s.headers.get("retry-after"), "2")
        self.assertEqual(s.error["code"], 503)
        self.assertEqual(s.events, [])
        self.assertFalse(s.closed_early)
        self.assertFalse(s.ok)

    def test_abort_after_is_seen_by_server(self):
        t0 = time.monotonic()
        s = self.chat("slow", timeout=30, abort_after=3)
        self.assertTrue(s.aborted)
        self.assertEqual(len(s.events), 3)
        self.assertEqual(s.text, "012")
        self.assertFalse(s.closed_early)
        self.assertFalse(s.ok)
        bl.wait_for(lambda: "slow" in Canned.disconnects, 5, what="the server to see the client go away")
        self.assertLess(time.monotonic() - t0, 10)

    def test_on_event_abort(self):
        seen = []

        def hook(stream, ev):
            seen.append(ev)
            return len(stream.token_ids) >= 5

        s = self.chat("slow", timeout=30, on_event=hook)
        self.assertTrue(s.aborted)
        self.assertEqual(s.token_ids, [0, 1, 2, 3, 4])
        self.assertEqual(len(seen), 5)

    def test_timeout(self):
        t0 = time.monotonic()
        s = self.chat("hang", timeout=1.0)
        took = time.monotonic() - t0
        self.assertTrue(s.timed_out, s.summary())
        self.assertFalse(s.done)
        self.assertEqual(s.text, "a")
        self.assertLess(took, 3.0)
        self.assertFalse(s.ok)

    def test_data_after_done_is_flagged(self):
        s = self.chat("after_done", timeout=10)
        self.assertTrue(s.done)
        self.assertEqual(len(s.after_done), 1)
        self.assertEqual(s.text, "a")
        self.assertFalse(s.ok)

    def test_bad_json_is_flagged(self):
        s = self.chat("badjson", timeout=10)
        self.assertEqual(s.bad_lines, ["{not json"])
        self.assertFalse(s.ok)

    def test_connection_refused(self):
        port = bl.free_port()
        s = bl.stream_chat(f"http://127.0.0.1:{port}", {"model": "m"}, timeout=5)
        self.assertIsNone(s.status)
        self.assertIn("ConnectionRefused", s.exception)
        self.assertFalse(s.ok)

    def test_request_and_post_json(self):
        status, hdrs, body = bl.post_json(self.url + "/v1/chat/completions", {"scenario": "echo", "x": [1, "é"]})
        self.assertEqual(status, 200)
        self.assertEqual(hdrs["content-type"], "application/json")
        self.assertEqual(body["got"], {"scenario": "echo", "x": [1, "é"]})
        self.assertEqual(body["ct"], "application/json")
        status, hdrs, raw = bl.request("GET", self.url + "/live")
        self.assertEqual((status, json.loads(raw)), (200, {"status": "live"}))
        self.assertEqual(hdrs["x-multi"], "a")
        status, _, body = bl.get_json(self.url + "/nowhere")
        self.assertEqual(status, 404)
        self.assertEqual(body["error"]["code"], 404)
        self.assertEqual(bl.wait_http(self.url + "/live", timeout=2), 200)

    def test_metrics(self):
        m = bl.metrics(self.url)
        self.assertEqual(m['dynamo_frontend_requests_total{model="mock-model",status="success"}'], 7.0)
        self.assertEqual(m["dynamo_frontend_inflight_requests"], 0.0)
        self.assertEqual(m['latency_bucket{le="+Inf"}'], 12.0)
        self.assertAlmostEqual(m["latency_sum"], 0.0015)
        self.assertNotEqual(m["nan_metric"], m["nan_metric"])  # NaN
        self.assertEqual(bl.metric_sum(m, "dynamo_frontend_requests_total"), 10.0)
        self.assertEqual(bl.metric_sum(m, "dynamo_frontend_requests_total", model="mock-model"), 9.0)
        self.assertEqual(bl.metric_sum(m, "dynamo_frontend_requests_total", status="success"), 8.0)
        self.assertEqual(bl.metric_sum(m, "dynamo_frontend_requests_total", model="none"), 0.0)
        self.assertEqual(bl.metric_sum(m, "dynamo_frontend_requests"), 0.0)  # no prefix matching
        self.assertEqual(bl.metric_sum(m, "weird_total", msg='a, "b" }c', path="x\\y"), 3.5)
        self.assertEqual(bl.parse_labels('{a="1",b="x,y"}'), {"a": "1", "b": "x,y"})
        with self.assertRaises(ValueError):
            bl.parse_metrics("this is not a metric line at all\n")


class HelperTests(unittest.TestCase):
    def test_free_port(self):
        ports = {bl.free_port() for _ in range(20)}
        self.assertEqual(len(ports), 20)
        for p in list(ports)[:3]:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))

    def test_flags_to_args(self):
        self.assertEqual(
            bl.flags_to_args({"speedup_ratio": 100, "router_mode": "random", "x": True, "y": None, "z": False,
                              "migration_limit": 0, "l": [1, 2]}),
            ["--speedup-ratio", "100", "--router-mode", "random", "--x", "--migration-limit", "0",
             "--l", "1", "--l", "2"])

    def test_run_concurrently(self):
        def f(a, b):
            time.sleep(0.1 * (5 - a))  # the first call ends last: results must still be in order
            return a * b

        t0 = time.monotonic()
        self.assertEqual(bl.run_concurrently(f, [(i, 10) for i in range(5)], max_workers=5), [0, 10, 20, 30, 40])
        self.assertLess(time.monotonic() - t0, 1.2)  # in parallel: 0.5 s; one after another: 1.5 s
        self.assertEqual(bl.run_concurrently(lambda x: x + 1, [1, 2]), [2, 3])

        def g(x):
            if x == 2:
                raise ValueError("two")
            return x

        with self.assertRaisesRegex(ValueError, "two"):
            bl.run_concurrently(g, [1, 2, 3])
        res = bl.run_concurrently(g, [1, 2, 3], return_exceptions=True)
        self.assertEqual(res[0], 1)
        self.assertIsInstance(res[1], ValueError)
        self.assertEqual(res[2], 3)

    def test_wait_for(self):
        t0 = time.monotonic()
        self.assertEqual(bl.wait_for(lambda: time.monotonic() - t0 > 0.1 and "yes", 2), "yes")
        with self.assertRaisesRegex(AssertionError, "the impossible"):
            bl.wait_for(lambda: False, 0.2, what="the impossible")


class ProcTests(unittest.TestCase):
    def test_log_wait_and_exit(self):
        p = bl.Proc([sys.executable, "-c", "import os,sys; print('hello', os.environ['FOO']); "
                     "print('err', file=sys.stderr); sys.exit(3)"], env={"FOO": "bar"})
        self.assertEqual(p.wait(10), 3)
        self.assertFalse(p.alive())
        self.assertIn("hello bar", p.log_text())
        self.assertIn("err", p.log_text())

    def test_env_removal(self):
        os.environ["BATONLIB_GONE"] = "1"
        try:
            p = bl.Proc([sys.executable, "-c", "import os; print('gone' if 'BATONLIB_GONE' not in os.environ "
                         "else 'there')"], env={"BATONLIB_GONE": None})
            p.wait(10)
            self.assertIn("gone", p.log_text())
        finally:
            del os.environ["BATONLIB_GONE"]

    def test_stop_escalates_to_sigkill(self):
        p = bl.Proc([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                     "print('ready', flush=True); time.sleep(60)"])
        p.wait_log("ready", 10)
        self.assertIsNone(p.wait(0.2))
        t0 = time.monotonic()
        self.assertEqual(p.stop(timeout=0.5), -signal.SIGKILL)
        self.assertLess(time.monotonic() - t0, 5)
        self.assertFalse(pid_alive(p.pid))

    def test_stop_graceful_and_stopped_process(self):
        # A process that handles SIGTERM (as baton does) cannot run its handler while stopped:
        # stop() must also send SIGCONT, or this would end in SIGKILL after the timeout.
        p = bl.Proc([sys.executable, "-c", "import os,signal,time; "
                     "signal.signal(signal.SIGTERM, lambda *a: os._exit(7)); print('ready', flush=True); "
                     "time.sleep(60)"])
        p.wait_log("ready", 10)
        p.kill(signal.SIGSTOP)
        bl.wait_for(lambda: open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", 5)
        t0 = time.monotonic()
        self.assertEqual(p.stop(timeout=5), 7)
        self.assertLess(time.monotonic() - t0, 4)

    def test_wait_log_fails_fast_when_process_exits(self):
        p = bl.Proc([sys.executable, "-c", "print('bye')"])
        t0 = time.monotonic()
        with self.assertRaisesRegex(AssertionError, "exited"):
            p.wait_log("never printed", timeout=30)
        self.assertLess(time.monotonic() - t0, 10)

    def run_script(self, body, timeout=30):
        code = "import sys, time\nsys.path.insert(0, %r)\nimport batonlib as bl\n" % LIB_DIR + textwrap.dedent(body)
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def test_cleanup_at_exit_kills_process_and_its_group(self):
        pr = self.run_script("""
            import os
            d = bl.tmpdir()
            p = bl.Proc(["sh", "-c", "sleep 100 & echo $! > %s/gc; sleep 100" % d])
            bl.wait_for(lambda: os.path.exists(d + "/gc") and open(d + "/gc").read().strip(), 10)
            print(p.pid, open(d + "/gc").read().strip(), d, flush=True)
        """)
        out, err = pr.communicate(timeout=30)
        self.assertEqual(pr.returncode, 0, err)
        pid, grandchild, d = out.split()
        self.assertTrue(wait_dead(int(pid)), "child survived the test's exit")
        self.assertTrue(wait_dead(int(grandchild)), "grandchild survived the test's exit")
        self.assertFalse(os.path.exists(d), "tmpdir of a passing test was kept")

    def test_deadline_fails_the_test_and_kills(self):
        t0 = time.monotonic()
        pr = self.run_script("""
            bl.deadline(1)
            p = bl.Proc(["sleep", "100"], name="sleeper")
            print(p.pid, flush=True)
            time.sleep(30)
        """)
        out, err = pr.communicate(timeout=30)
        self.assertEqual(pr.returncode, 1)
        self.assertIn("deadline of 1 s exceeded", err)
        self.assertIn("sleeper", err)  # the log tails are dumped
        self.assertIn("kept test directory", err)
        self.assertLess(time.monotonic() - t0, 15)
        self.assertTrue(wait_dead(int(out.split()[0])))

    def test_deadline_cancel(self):
        pr = self.run_script("""
            with bl.deadline(1):
                pass
            time.sleep(1.5)
            print("survived", flush=True)
        """)
        out, err = pr.communicate(timeout=30)
        self.assertEqual(pr.returncode, 0, err)
        self.assertIn("survived", out)

    def test_sigterm_kills_children(self):
        pr = self.run_script("""
            p = bl.Proc(["sleep", "100"])
            print(p.pid, flush=True)
            time.sleep(30)
        """)
        pid = int(pr.stdout.readline())
        pr.terminate()
        pr.wait(10)
        self.assertEqual(pr.returncode, 128 + signal.SIGTERM)
        self.assertTrue(wait_dead(pid))
        pr.stdout.close()
        pr.stderr.close()

    def test_sigkill_of_test_kills_children(self):
        # setpriv arms the parent-death signal just before it execs the program: wait for the exec
        # (a test that dies within a millisecond of starting a child can leave it behind).
        pr = self.run_script("""
            p = bl.Proc(["sleep", "100"])
            bl.wait_for(lambda: open("/proc/%d/comm" % p.pid).read().strip() == "sleep", 10)
            print(p.pid, flush=True)
            time.sleep(30)
        """)
        pid = int(pr.stdout.readline())
        self.assertTrue(pid_alive(pid))
        pr.kill()
        pr.wait(10)
        self.assertTrue(wait_dead(pid), "child outlived a SIGKILLed test (no parent-death signal)")
        pr.stdout.close()
        pr.stderr.close()


# ---------------------------------------------------------------------------------------------
# A fake `baton` for the Cluster plumbing: it records its command line and environment,
# `worker` registers a file in the discovery dir, `frontend` lists those files on /health.

FAKE_BATON = r'''
import http.server, json, os, signal, sys
args = sys.argv[1:]
role = args[0]
def flag(name, default=None):
    return args[args.index(name) + 1] if name in args else default
ddir = flag("--discovery-dir")
rec = {"args": args, "DYN_FILE_KV": os.environ.get("DYN_FILE_KV"),
       "DYN_SYSTEM_PORT": os.environ.get("DYN_SYSTEM_PORT")}
print("FAKE " + json.dumps(rec), flush=True)
def bye(*a):
    if role == "worker":
        try:
            os.unlink(os.path.join(ddir, flag("--rpc-port") + ".json"))
        except OSError:
            pass
    print("stopping", flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, bye)
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/health":
            inst = []
            for n in sorted(os.listdir(ddir)):
                with open(os.path.join(ddir, n)) as f:
                    inst.append(json.load(f))
            body = {"status": "healthy", "instances": inst}
        else:
            body = {"status": "live"}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
if role == "frontend":
    http.server.HTTPServer((flag("--http-host"), int(flag("--http-port"))), H).serve_forever()
elif role == "worker":
    with open(os.path.join(ddir, flag("--rpc-port") + ".json"), "w") as f:
        json.dump({"instance_id": int(flag("--rpc-port")), "transport": "tcp"}, f)
    sp = int(os.environ.get("DYN_SYSTEM_PORT", "-1"))
    if sp > 0:
        http.server.HTTPServer(("127.0.0.1", sp), H).serve_forever()
    signal.pause()
'''


def fake_record(proc):
    m = proc.wait_log(r"FAKE (.*)", 10)
    return json.loads(m.group(1))


class ClusterTests(unittest.TestCase):
    def setUp(self):
        d = bl.tmpdir()
        self.fake = os.path.join(d, "fake-baton")
        with open(self.fake, "w") as f:
            f.write("#!" + sys.executable + "\n" + FAKE_BATON)
        os.chmod(self.fake, 0o755)

    def test_cluster_plumbing(self):
        with bl.Cluster(bin=self.fake) as c:
            fe = c.start_frontend(migration_limit=0, router_mode="random")
            self.assertEqual(fe.url, f"http://127.0.0.1:{fe.port}")
            rec = fake_record(fe.proc)
            a = rec["args"]
            self.assertEqual(a[0], "frontend")
            self.assertEqual(a[a.index("--http-port") + 1], str(fe.port))
            self.assertEqual(a[a.index("--http-host") + 1], "127.0.0.1")
            self.assertEqual(a[a.index("--migration-limit") + 1], "0")
            self.assertEqual(a[a.index("--router-mode") + 1], "random")
            self.assertEqual(a[a.index("--discovery-dir") + 1], c.discovery_dir)
            self.assertEqual(rec["DYN_FILE_KV"], c.discovery_dir)

            w1 = c.start_worker(speedup_ratio=100, num_gpu_blocks_override=64)
            w2 = c.start_worker(system_port=True, wait=True, speedup_ratio=50)
            r1, r2 = fake_record(w1.proc), fake_record(w2.proc)
            a = r1["args"]
            self.assertEqual(a[0], "worker")
            self.assertEqual(a[a.index("--rpc-port") + 1], str(w1.rpc_port))
            self.assertEqual(a[a.index("--rpc-host") + 1], "127.0.0.1")
            self.assertEqual(a[a.index("--speedup-ratio") + 1], "100")
            self.assertEqual(a[a.index("--num-gpu-blocks-override") + 1], "64")
            self.assertEqual(r1["DYN_SYSTEM_PORT"], "-1")
            self.assertEqual(r2["DYN_SYSTEM_PORT"], str(w2.system_port))
            self.assertNotEqual(w1.rpc_port, w2.rpc_port)
            self.assertEqual(bl.get_json(w2.system_url + "/live")[0], 200)

            inst = c.wait_workers(fe, 2, timeout=10)
            self.assertEqual(sorted(i["instance_id"] for i in inst), sorted([w1.rpc_port, w2.rpc_port]))
            self.assertEqual(w1.proc.stop(), 0)
            self.assertEqual(len(c.wait_workers(fe, 1, timeout=10)), 1)
            t0 = time.monotonic()
            with self.assertRaisesRegex(AssertionError, "did not list 3 instances"):
                c.wait_workers(fe, 3, timeout=0.5)
            self.assertLess(time.monotonic() - t0, 5)
            codes = c.close()
        self.assertEqual(sorted(codes.values()), [0, 0, 0])
        for p in c.procs():
            self.assertFalse(p.alive())

    def test_close_reports_sanitizer_errors(self):
        c = bl.Cluster(bin=self.fake)
        w = c.start_worker()
        fake_record(w.proc)
        c.start_worker()
        with open(w.proc.log_path, "a") as f:  # as ASan would write it
            f.write("==4242==ERROR: AddressSanitizer: heap-use-after-free on address 0x602\n"
                    "    #0 0x55 in bt_conn_close src/rpc/conn.c:120\n")
        with self.assertRaisesRegex(AssertionError, r"(?s)sanitizer reports.*heap-use-after-free.*conn.c:120"):
            c.close()
        self.assertFalse(w.proc.alive())
        self.assertIsNone(c.workers[1].proc.sanitizer_report())
        ub = bl.Proc([sys.executable, "-c", "print('src/x.c:3:5: runtime error: signed integer overflow')"])
        ub.wait(10)
        self.assertIn("signed integer overflow", ub.sanitizer_report())

    def test_start_frontend_fails_fast_when_process_dies(self):
        with bl.Cluster(bin="/bin/false") as c:
            t0 = time.monotonic()
            with self.assertRaisesRegex(AssertionError, "exited with 1"):
                c.start_frontend(timeout=30)
            self.assertLess(time.monotonic() - t0, 10)

    def test_cluster_context_prints_logs_on_failure(self):
        code = textwrap.dedent("""
            import sys
            sys.path.insert(0, %r)
            import batonlib as bl
            with bl.Cluster(bin=%r) as c:
                fe = c.start_frontend()
                raise AssertionError("the check failed")
        """ % (LIB_DIR, self.fake))
        pr = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        self.assertNotEqual(pr.returncode, 0)
        self.assertIn("the check failed", pr.stderr)
        self.assertIn("FAKE ", pr.stderr)  # the frontend's log
        self.assertIn("kept test directory", pr.stderr)


if __name__ == "__main__":
    bl.deadline(120)
    unittest.main(verbosity=2)
