"""batonlib — the harness shared by baton's integration, fault and compatibility tests.

Standard library only. A test script imports it (CTest sets PYTHONPATH=tests/lib and
BATON_BIN=<path to baton>), arms a deadline, starts a Cluster of real baton processes on free
loopback ports, drives the frontend over HTTP/SSE and asserts on what comes back.

    import batonlib as bl
    bl.deadline(120)
    with bl.Cluster() as c:
        fe = c.start_frontend(migration_limit=3)
        c.start_worker(speedup_ratio=100)
        c.wait_workers(fe, 1)
        s = bl.stream_chat(fe.url, bl.chat_body("Hello", max_tokens=20))
        s.assert_ok()

Rules it enforces for every test:
  * Every process started through Proc is registered and killed (SIGKILL, by pid, and every
    member of its own process group) when the script exits, on SIGTERM and when the deadline
    fires. A child started from the main thread also dies if the test process is SIGKILLed
    (PR_SET_PDEATHSIG through setpriv).
  * deadline(seconds) turns a hang into a failure with a clear message and the log tails.
  * Temporary directories are removed at exit unless something failed or BATON_KEEP_TMP=1; on
    failure their paths are printed so the logs can be read.
"""

import atexit
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse

# ---------------------------------------------------------------------------------------------
# Global state: registered processes, temporary directories, failure flag.

_procs = []  # every Proc ever started, in order
_procs_lock = threading.Lock()
_tmpdirs = []  # directories to remove at exit
_state = {"failed": False, "cleaned": False}
_ports_given = set()


def mark_failed():
    """Records that the test failed: temporary directories are kept (and printed) at exit."""
    _state["failed"] = True


def _excepthook(etype, value, tb):
    mark_failed()
    _orig_excepthook(etype, value, tb)


_orig_excepthook = sys.excepthook
sys.excepthook = _excepthook


def repo_root():
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def baton_bin():
    """Path of the baton binary under test: $BATON_BIN, else <repo>/build/baton."""
    path = os.environ.get("BATON_BIN") or os.path.join(repo_root(), "build", "baton")
    if not os.access(path, os.X_OK):
        raise AssertionError(f"baton binary not found or not executable: {path} (set BATON_BIN)")
    return path


def tmpdir(prefix=None):
    """A fresh private directory for this test, removed at exit unless the test failed."""
    if prefix is None:
        prefix = "baton-" + os.path.splitext(os.path.basename(sys.argv[0] or "test"))[0] + "-"
    d = tempfile.mkdtemp(prefix=prefix)
    _tmpdirs.append(d)
    return d


_default_tmp = []


def _default_tmpdir():
    if not _default_tmp:
        _default_tmp.append(tmpdir())
    return _default_tmp[0]


# ---------------------------------------------------------------------------------------------
# Ports and deadlines.


def free_port(host="127.0.0.1"):
    """A TCP port that is free on `host` right now and was not handed out before by this process.

    The port is released before returning, so another program could take it in between; the
    kernel hands out ephemeral ports in a spread order, which makes that rare on a test machine."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port
    raise AssertionError("free_port: no fresh free port after 100 tries")


class DeadlineExceeded(AssertionError):
    pass


class _Deadline:
    def __init__(self, seconds, what):
        self.seconds = seconds
        self.what = what

    def cancel(self):
        signal.alarm(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()
        return False


def deadline(seconds, what=None):
    """Arms a hard bound on the whole test (SIGALRM, whole seconds, at least 1).

    When it fires, the test fails: a clear message and the tail of every process log go to
    stderr, every started process is killed and the script exits with status 1 (os._exit, so
    that a thread blocked on a socket cannot keep it alive). Returns an object with .cancel();
    usable as a context manager to bound a block instead. A new call re-arms the alarm."""
    what = what or os.path.basename(sys.argv[0] or "test")
    secs = max(1, int(seconds + 0.999))

    def on_alarm(signum, frame):
        mark_failed()
        sys.stderr.write(f"\nFAIL: {what}: deadline of {secs} s exceeded\n")
        sys.stderr.write("Main thread was at:\n" + "".join(traceback.format_stack(frame)))
        dump_logs()
        _kill_all()
        _print_kept_tmpdirs()
        sys.stderr.flush()
        os._exit(1)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(secs)
    return _Deadline(secs, what)


def wait_for(pred, timeout, interval=0.05, what="condition"):
    """Polls pred() until it returns a truthy value, which is returned; AssertionError after
    `timeout` seconds, naming `what` and the last exception pred raised, if any."""
    end = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 — remembered and reported
            last_exc = e
        if time.monotonic() >= end:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Processes.

_SETPRIV = shutil.which("setpriv")


def _pgroup_members(pgid):
    """Pids whose process group is `pgid` (from /proc), excluding ourselves."""
    out = []
    me = os.getpid()
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses.
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) >= 3 and rest[2] == str(pgid) and int(name) != me:
            out.append(int(name))
    return out


# ASan/LSan/UBSan/TSan reports, and valgrind memcheck's errors and error summary (under
# BATON_BIN=scripts/valgrind-baton).
_SANITIZER_RX = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error: |WARNING: ThreadSanitizer|"
                           r"SUMMARY: UndefinedBehaviorSanitizer|"
                           r"==\d+== (Invalid (read|write|free)|Conditional jump|Use of uninitialised|"
                           r"Syscall param|Mismatched free|Source and destination overlap)|"
                           r"are definitely lost in loss record|==\d+== ERROR SUMMARY: [1-9]")


def sanitized_build(bin_path=None):
    """True when the baton binary is built with AddressSanitizer (scripts/test --sanitize): its
    allocator keeps freed memory in a quarantine and ignores malloc_trim, so RSS figures mean
    nothing there."""
    path = bin_path or baton_bin()
    try:
        with open(path, "rb") as f:
            return b"__asan_init" in f.read()
    except OSError:
        return False


def gone(pid):
    """True when the process has exited (no longer exists, or a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def children(pid):
    """The pids of the processes whose parent is `pid` (read from /proc)."""
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


class Proc:
    """A child process whose stdout and stderr go to a log file.

    args: list of program and arguments. env: additions to os.environ (a value of None removes
    the variable). log: path of the log file (default: <tmpdir>/<name>.log). The child gets its own
    session (so signals from a terminal reach only the test) and, when started from the main
    thread, dies with the test process."""

    def __init__(self, args, env=None, log=None, name=None, cwd=None):
        self.args = [str(a) for a in args]
        self.name = name or os.path.basename(self.args[0])
        full_env = dict(os.environ)
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = str(v)
        self.env_added = dict(env or {})
        if log is None:
            log = os.path.join(_default_tmpdir(), f"{self.name}-{int(time.time() * 1000) % 100000000}.log")
        self.log_path = log
        argv = list(self.args)
        if _SETPRIV and threading.current_thread() is threading.main_thread():
            # PR_SET_PDEATHSIG fires when the *thread* that forked dies; only the main thread
            # lives as long as the test, so children started from other threads go without it.
            argv = [_SETPRIV, "--pdeathsig", "KILL", "--"] + argv
        with open(log, "ab") as logf:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                          env=full_env, cwd=cwd, start_new_session=True)
        self.pid = self.popen.pid
        self.started = time.monotonic()
        with _procs_lock:
            _procs.append(self)

    def __repr__(self):
        return f"<Proc {self.name} pid={self.pid} rc={self.popen.returncode}>"

    def alive(self):
        return self.popen.poll() is None

    @property
    def returncode(self):
        """Exit status (negative: killed by that signal), or None while running."""
        return self.popen.poll()

    def kill(self, sig=signal.SIGKILL):
        """Sends `sig` to the process (by pid); no-op if it already exited."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout=None):
        """Waits for exit; returns the exit status, or None if still running after `timeout`."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=10.0, sig=signal.SIGTERM):
        """SIGTERM (and SIGCONT, in case it is stopped), then SIGKILL if it has not exited within
        `timeout` seconds. Returns the exit status."""
        if self.popen.poll() is None:
            self.kill(sig)
            self.kill(signal.SIGCONT)
            if self.wait(timeout) is None:
                self.kill(signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode

    def kill_group(self):
        """SIGKILL to the process and to every process left in its process group (its own
        children that did not change group), found by pid in /proc."""
        self.kill(signal.SIGKILL)
        for pid in _pgroup_members(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def sanitizer_report(self):
        """The first AddressSanitizer / LeakSanitizer / UndefinedBehaviorSanitizer report, or
        valgrind error, in the log (up to 40 lines from it), or None. Under scripts/test --sanitize
        (or scripts/valgrind-baton) a report means a bug even when the process went on or exited 0."""
        lines = self.log_text().splitlines()
        for i, line in enumerate(lines):
            if _SANITIZER_RX.search(line):
                return "\n".join(lines[i:i + 40])
        return None

    def log_tail(self, lines=60):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, pattern, timeout=10.0):
        """Waits until the log matches the regular expression; returns the match object.
        Fails early (AssertionError with the log) if the process exits first."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while True:
            m = rx.search(self.log_text())
            if m:
                return m
            if not self.alive():
                m = rx.search(self.log_text())
                if m:
                    return m
                raise AssertionError(f"{self.name} (pid {self.pid}) exited with {self.returncode} before its log "
                                     f"matched {pattern!r}; log:\n{self.log_tail()}")
            if time.monotonic() >= end:
                raise AssertionError(f"{self.name} log did not match {pattern!r} within {timeout} s; log:\n"
                                     f"{self.log_tail()}")
            time.sleep(0.05)


def all_procs():
    with _procs_lock:
        return list(_procs)


def dump_logs(procs=None, lines=60, out=None):
    """Writes the tail of each process log (default: every registered process) to stderr."""
    out = out or sys.stderr
    for p in procs if procs is not None else all_procs():
        out.write(f"----- {p.name} (pid {p.pid}, exit {p.returncode}) {p.log_path} -----\n")
        out.write(p.log_tail(lines) + "\n")
    out.flush()


def _kill_all():
    for p in all_procs():
        try:
            p.kill_group()
        except Exception:  # noqa: BLE001 — best effort at exit
            pass


def _print_kept_tmpdirs():
    for d in _tmpdirs:
        if os.path.isdir(d):
            sys.stderr.write(f"kept test directory: {d}\n")


def _cleanup():
    if _state["cleaned"]:
        return
    _state["cleaned"] = True
    _kill_all()
    if _state["failed"] or os.environ.get("BATON_KEEP_TMP"):
        _print_kept_tmpdirs()
        return
    for d in _tmpdirs:
        shutil.rmtree(d, ignore_errors=True)


def _on_sigterm(signum, frame):
    mark_failed()
    sys.stderr.write(f"\n{os.path.basename(sys.argv[0])}: got signal {signum}, killing started processes\n")
    _cleanup()
    os._exit(128 + signum)


atexit.register(_cleanup)
signal.signal(signal.SIGTERM, _on_sigterm)
signal.signal(signal.SIGHUP, _on_sigterm)


# ---------------------------------------------------------------------------------------------
# HTTP.


def _split_url(url):
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http":
        raise ValueError(f"only http:// URLs are supported: {url}")
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    return u.hostname, u.port or 80, path


def _encode_body(body, headers):
    if body is None:
        return None
    if isinstance(body, (dict, list)):
        headers.setdefault("Content-Type", "application/json")
        return json.dumps(body).encode()
    if isinstance(body, str):
        return body.encode()
    return body


def _lower_headers(msg):
    out = {}
    for k, v in msg.items():
        k = k.lower()
        out[k] = out[k] + ", " + v if k in out else v
    return out


def request(method, url, body=None, headers=None, timeout=30.0):
    """One HTTP/1.1 request on a fresh connection. body: bytes, str, or a dict/list sent as JSON.
    Returns (status, headers with lower-case names, body bytes). Connection errors raise."""
    host, port, path = _split_url(url)
    hdrs = dict(headers or {})
    data = _encode_body(body, hdrs)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, _lower_headers(resp.headers), payload
    finally:
        conn.close()


def raw_exchange(port, data, timeout=5.0):
    """Sends bytes on a fresh connection to 127.0.0.1:port and returns everything read until the
    server closes it, resets it, or says nothing for `timeout` seconds (malformed-input tests)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def _json_or_none(data):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def post_json(url, body, headers=None, timeout=30.0):
    """POST a JSON body; returns (status, headers, parsed JSON or None)."""
    status, hdrs, data = request("POST", url, body, headers, timeout)
    return status, hdrs, _json_or_none(data)


def get_json(url, headers=None, timeout=30.0):
    """GET; returns (status, headers, parsed JSON or None)."""
    status, hdrs, data = request("GET", url, None, headers, timeout)
    return status, hdrs, _json_or_none(data)


def chat_body(content="Hello", max_tokens=20, model="mock-model", **extra):
    """A chat completion request body; extra keys are added as they are."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    body.update(extra)
    return body


def completion_body(prompt="Once upon a time", max_tokens=20, model="mock-model", **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    body.update(extra)
    return body


class Stream:
    """The result of one SSE request, filled in as events arrive.

    status      HTTP status (None if the connection failed before a response)
    headers     response headers, lower-case names
    events      parsed JSON objects of the `data:` events, in order ([DONE] not included)
    done        saw `data: [DONE]`
    error       the error object ({"message", "type", "code"}) from an SSE `data: {"error": ...}`
                event, or from a non-200 JSON body
    body        raw body of a non-200 response
    text        concatenated choices[0].delta.content (chat) or choices[0].text (completions)
    token_ids   concatenated choices[0].token_ids where present
    finish_reason   last non-null choices[0].finish_reason
    usage       last non-null `usage`
    t_start     time.monotonic() when the request was sent
    t_first     time of the first event carrying text or token ids (None if none)
    t_events    arrival time of each entry of `events`
    t_tokens    arrival time of each event carrying text or token ids
    t_end       when the stream ended (any way)
    closed_early    the connection ended (EOF or reset) without [DONE]
    aborted     the client closed it on purpose (abort_after / on_event)
    timed_out   the overall timeout ran out before the stream ended
    exception   repr of the exception that ended reading, if any
    bad_lines   data payloads that were not JSON
    after_done  data payloads that arrived after [DONE] (a protocol error)
    unterminated    [DONE] came but the response did not end within a few seconds after it
    event_ids   the SSE `id:` of each data event, [DONE] included (None for an event without one)
    last_event_id   the last `id:` received (what an SSE client sends back as Last-Event-ID)
    raw         every byte of the body as received (SSE streams; for byte-exact comparisons)
    """

    def __init__(self):
        self.status = None
        self.headers = {}
        self.events = []
        self.done = False
        self.error = None
        self.body = b""
        self.text = ""
        self.token_ids = []
        self.finish_reason = None
        self.usage = None
        self.t_start = None
        self.t_first = None
        self.t_events = []
        self.t_tokens = []
        self.t_end = None
        self.closed_early = False
        self.aborted = False
        self.timed_out = False
        self.exception = None
        self.bad_lines = []
        self.after_done = []
        self.unterminated = False
        self.t_done = None
        self.event_ids = []
        self.last_event_id = None
        self.raw = b""

    @property
    def ok(self):
        return (self.status == 200 and self.done and self.error is None and self.finish_reason is not None
                and not self.closed_early and not self.timed_out and not self.aborted and not self.after_done
                and not self.bad_lines and not self.unterminated)

    def summary(self):
        return (f"status={self.status} done={self.done} finish_reason={self.finish_reason!r} error={self.error!r} "
                f"events={len(self.events)} tokens={len(self.token_ids)} text={self.text[:80]!r} "
                f"closed_early={self.closed_early} aborted={self.aborted} timed_out={self.timed_out} "
                f"unterminated={self.unterminated} after_done={len(self.after_done)} bad_lines={len(self.bad_lines)} "
                f"exception={self.exception} body={self.body[:200]!r}")

    def __repr__(self):
        return f"<Stream {self.summary()}>"

    def assert_ok(self, what="stream"):
        """AssertionError with a summary unless the stream completed normally."""
        if not self.ok:
            raise AssertionError(f"{what} did not complete: {self.summary()}")
        return self

    def _on_data(self, payload, now):
        if payload.strip() == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            self.bad_lines.append(payload)
            return
        self.events.append(obj)
        self.t_events.append(now)
        if not isinstance(obj, dict):
            return
        if "error" in obj and obj["error"] is not None:
            err = obj["error"]
            self.error = err if isinstance(err, dict) else {"message": str(err)}
        if obj.get("usage"):
            self.usage = obj["usage"]
        choices = obj.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return
        c = choices[0]
        piece = None
        if isinstance(c.get("delta"), dict):
            piece = c["delta"].get("content")
        elif "text" in c:
            piece = c.get("text")
        ids = c.get("token_ids")
        carried = False
        if piece:
            self.text += piece
            carried = True
        if ids:
            self.token_ids.extend(ids)
            carried = True
        if carried:
            self.t_tokens.append(now)
            if self.t_first is None:
                self.t_first = now
        if c.get("finish_reason") is not None:
            self.finish_reason = c["finish_reason"]


_AFTER_DONE_S = 5.0


def stream_sse(url, path, body, timeout=60.0, abort_after=None, on_event=None, headers=None, method="POST"):
    """POSTs `body` (JSON) to url+path (or GETs url+path with method="GET" and body None) and
    reads the SSE answer incrementally.

    Never raises for what the server does: connection refused, resets, early EOF, a non-200
    answer and the overall `timeout` are all recorded on the returned Stream.
    abort_after=k closes the connection abruptly after the k-th data event.
    on_event(stream, obj) is called after each parsed data event; returning True aborts likewise
    (use it to inject a fault after a given number of tokens)."""
    st = Stream()
    base = url.rstrip("/")
    host, port, _ = _split_url(base + path)
    full_path = _split_url(base + path)[2]
    hdrs = {"Accept": "text/event-stream"}
    hdrs.update(headers or {})
    data = _encode_body(body, hdrs) if body is not None else None
    end = time.monotonic() + timeout
    conn = http.client.HTTPConnection(host, port, timeout=max(0.1, timeout))
    st.t_start = time.monotonic()
    resp = None
    sock = None
    try:
        conn.connect()
        sock = conn.sock  # kept: http.client may drop conn.sock while the response still reads it
        conn.request(method, full_path, body=data, headers=hdrs)
        resp = conn.getresponse()
        st.status = resp.status
        st.headers = _lower_headers(resp.headers)
        if resp.status != 200 or "text/event-stream" not in st.headers.get("content-type", ""):
            st.body = resp.read()
            obj = _json_or_none(st.body)
            if isinstance(obj, dict) and obj.get("error") is not None:
                err = obj["error"]
                st.error = err if isinstance(err, dict) else {"message": str(err)}
            return st
        datalines = []
        cur_id = None
        while True:
            now = time.monotonic()
            remaining = end - now
            if st.done:
                # After [DONE] read on to the end of the response (so the server does not see a
                # client disconnect), but not for long.
                remaining = min(remaining, _AFTER_DONE_S - (now - st.t_done))
                if remaining <= 0:
                    st.unterminated = True
                    break
            elif remaining <= 0:
                st.timed_out = True
                break
            sock.settimeout(remaining)
            try:
                raw = resp.readline()
            except socket.timeout:
                if st.done:
                    st.unterminated = True
                    break
                raise
            if not raw:
                break  # end of the response body
            st.raw += raw
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line == "":
                if datalines:
                    payload = "\n".join(datalines)
                    datalines = []
                    st.event_ids.append(cur_id)
                    if cur_id is not None:
                        st.last_event_id = cur_id
                    cur_id = None
                    if st.done:
                        st.after_done.append(payload)
                        continue
                    st._on_data(payload, time.monotonic())
                    if st.done:
                        st.t_done = time.monotonic()
                        continue
                    if abort_after is not None and len(st.events) >= abort_after:
                        st.aborted = True
                        break
                    if on_event is not None and st.events and on_event(st, st.events[-1]):
                        st.aborted = True
                        break
                continue
            if line.startswith(":"):
                continue  # comment / keep-alive
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "data":
                datalines.append(value)
            elif field == "id":
                cur_id = value
        if datalines and not st.aborted and not st.timed_out and not st.done:
            st._on_data("\n".join(datalines), time.monotonic())  # last event without a blank line
    except socket.timeout as e:
        st.timed_out = True
        st.exception = repr(e)
    except (OSError, http.client.HTTPException) as e:
        st.exception = repr(e)
    finally:
        st.t_end = time.monotonic()
        if st.status == 200 and not st.done and not st.aborted and not st.timed_out:
            st.closed_early = True
        _hard_close(conn, sock, resp)
    return st


def _hard_close(conn, sock, resp):
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    if resp is not None:
        try:
            resp.close()
        except Exception:  # noqa: BLE001
            pass
    conn.close()


def _with_path(url, default_path):
    """url may be the frontend's base URL or already name the endpoint."""
    p = urllib.parse.urlsplit(url).path
    if p in ("", "/"):
        return url.rstrip("/"), default_path
    return url, ""


def stream_chat(url, body, timeout=60.0, **kw):
    """Streams a chat completion (`stream` defaults to true). url: the frontend base URL."""
    body = dict(body)
    body.setdefault("stream", True)
    base, path = _with_path(url, "/v1/chat/completions")
    return stream_sse(base, path, body, timeout, **kw)


def events_up_to(st, last_id):
    """Token ids and text of a /v1/completions stream's events up to and including the one whose
    event id is last_id: what its client holds when it resumes from that id."""
    k = st.event_ids.index(last_id)
    ids, text = [], ""
    for ev in st.events[:k + 1]:
        ch = (ev.get("choices") or [{}])[0]
        ids += ch.get("token_ids") or []
        text += ch.get("text") or ""
    return ids, text


def stream_completion(url, body, timeout=60.0, **kw):
    """Streams a text completion (`stream` defaults to true). url: the frontend base URL."""
    body = dict(body)
    body.setdefault("stream", True)
    base, path = _with_path(url, "/v1/completions")
    return stream_sse(base, path, body, timeout, **kw)


# ---------------------------------------------------------------------------------------------
# Prometheus metrics.

_SAMPLE_RX = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL_RX = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_labels(text):
    """'{a="x",b="y"}' -> {'a': 'x', 'b': 'y'} (escapes \\\\, \\" and \\n undone)."""
    out = {}
    if not text:
        return out
    inner = text.strip()
    if inner.startswith("{"):
        inner = inner[1:]
    if inner.endswith("}"):
        inner = inner[:-1]
    pos = 0
    while pos < len(inner):
        m = _LABEL_RX.match(inner, pos)
        if not m:
            if inner[pos:].strip(" ,") == "":
                break
            raise ValueError(f"bad label set: {text!r}")
        # one pass, so that an escaped backslash before an "n" stays a backslash and an "n"
        out[m.group(1)] = re.sub(r'\\(.)', lambda e: "\n" if e.group(1) == "n" else e.group(1), m.group(2))
        pos = m.end()
    return out


def parse_metrics(text):
    """Prometheus text exposition -> {'name{labels}': float} ('name' alone when unlabelled)."""
    samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RX.match(line)
        if not m:
            raise ValueError(f"bad metrics line: {line!r}")
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        samples[name + labels] = float(value)
    return samples


def metrics(url, timeout=10.0):
    """GET <url>/metrics (url may already end in /metrics) and parse it. Asserts a 200."""
    if not urllib.parse.urlsplit(url).path.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    status, _, data = request("GET", url, timeout=timeout)
    if status != 200:
        raise AssertionError(f"GET {url} -> {status}: {data[:200]!r}")
    return parse_metrics(data.decode("utf-8", "replace"))


def metric_sum(samples, name, **label_filter):
    """Sum of the samples called `name` whose labels include every label_filter item
    (values compared as strings). 0.0 when none match."""
    total = 0.0
    want = {k: str(v) for k, v in label_filter.items()}
    for key, value in samples.items():
        brace = key.find("{")
        sname = key if brace < 0 else key[:brace]
        if sname != name:
            continue
        labels = parse_labels(key[brace:]) if brace >= 0 else {}
        if all(labels.get(k) == v for k, v in want.items()):
            total += value
    return total


def worker_metric(w, name, **label_filter):
    """metric_sum of one sample family on worker w's system server (started with system_port=True)."""
    return metric_sum(metrics(w.system_url), name, **label_filter)


def kill9_mid_stream(fe, body, events=5, timeout=30):
    """Streams `body` through frontend fe and kill -9s the frontend once `events` SSE events have
    arrived; returns when the client has seen the connection end."""
    got = []
    t = threading.Thread(target=lambda: stream_chat(fe.url, body, timeout=timeout,
                                                    on_event=lambda st, ev: got.append(ev)))
    t.start()
    wait_for(lambda: len(got) >= events, 10, interval=0.005, what="the stream under way")
    fe.proc.kill(signal.SIGKILL)
    t.join(timeout)


# ---------------------------------------------------------------------------------------------
# Concurrency.


def run_concurrently(fn, args_list, max_workers=None, return_exceptions=False):
    """Calls fn(*args) for each entry of args_list (a tuple, or a single non-tuple argument) on
    threads; returns the results in the order of args_list. If a call raised, the first such
    exception is re-raised once all calls have ended, unless return_exceptions=True, in which
    case the exception object takes that call's place in the list."""
    calls = [a if isinstance(a, tuple) else (a,) for a in args_list]
    if not calls:
        return []
    workers = max_workers or min(64, len(calls))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futs = [pool.submit(fn, *a) for a in calls]
        results = []
        first_exc = None
        for f in futs:
            try:
                results.append(f.result())
            except BaseException as e:  # noqa: BLE001 — re-raised below
                results.append(e)
                if first_exc is None:
                    first_exc = e
    if first_exc is not None and not return_exceptions:
        raise first_exc
    return results


# ---------------------------------------------------------------------------------------------
# Clusters of baton processes.


def flags_to_args(flags):
    """{'speedup_ratio': 100, 'router_mode': 'random', 'x': True, 'y': None} ->
    ['--speedup-ratio', '100', '--router-mode', 'random', '--x']. True gives a bare flag;
    None and False leave the flag out; a list or tuple repeats the flag."""
    args = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            for v in value:
                args += [flag, str(v)]
        else:
            args += [flag, str(value)]
    return args


class Frontend:
    def __init__(self, url, port, proc):
        self.url = url
        self.port = port
        self.proc = proc

    def __repr__(self):
        return f"<Frontend {self.url} pid={self.proc.pid}>"


class Worker:
    def __init__(self, proc, rpc_port, system_port):
        self.proc = proc
        self.rpc_port = rpc_port
        self.system_port = system_port
        self.system_url = f"http://127.0.0.1:{system_port}" if system_port else None

    def __repr__(self):
        return f"<Worker rpc={self.rpc_port} system={self.system_port} pid={self.proc.pid}>"


class Cluster:
    """Frontends and workers sharing one private file-discovery directory.

    Every process gets DYN_FILE_KV=<dir>/discovery and --discovery-dir <dir>/discovery (unless it
    is given discovery='etcd'), listens on 127.0.0.1 and logs to <dir>/<role>-<n>.log. Use it as a
    context manager: on an exception the logs are printed, and everything is stopped at the end."""

    def __init__(self, tmpdir_path=None, bin=None, env=None):
        self.dir = tmpdir_path or tmpdir()
        os.makedirs(self.dir, exist_ok=True)
        self.discovery_dir = os.path.join(self.dir, "discovery")
        os.makedirs(self.discovery_dir, exist_ok=True)
        self.bin = bin or baton_bin()
        self.env = {"DYN_FILE_KV": self.discovery_dir}
        self.env.update(env or {})
        self.frontends = []
        self.workers = []
        self.runs = []
        self._n = 0

    def __enter__(self):
        return self

    def __exit__(self, etype, value, tb):
        if etype is not None:
            mark_failed()
            sys.stderr.write(f"\ntest failed ({etype.__name__}: {value}); process logs:\n")
            self.dump_logs()
            self.close(check_sanitizers=False)
            return False
        try:
            self.close()
        except AssertionError:
            mark_failed()
            raise
        return False

    def _log(self, role):
        self._n += 1
        return os.path.join(self.dir, f"{role}-{self._n}.log")

    def _common(self, flags):
        if flags.get("discovery", "file") == "file":
            flags.setdefault("discovery_dir", self.discovery_dir)
        return flags

    def procs(self):
        return ([f.proc for f in self.frontends] + [w.proc for w in self.workers] + [r.proc for r in self.runs])

    def start_frontend(self, env=None, wait=True, timeout=20.0, **flags):
        """Starts `baton frontend` on a free --http-port (unless http_port is given), host
        127.0.0.1. Keyword flags become --flags. With wait, returns once GET /live answers."""
        port = flags.pop("http_port", None) or free_port()
        flags.setdefault("http_host", "127.0.0.1")
        # no load balancer in front of a test frontend: the 5 s default accept window after
        # SIGTERM would only slow every close (tests of the window set it themselves)
        flags.setdefault("shutdown_accept_window_ms", 0)
        flags = self._common(flags)
        args = [self.bin, "frontend", "--http-port", str(port)] + flags_to_args(flags)
        e = dict(self.env)
        e.update(env or {})
        proc = Proc(args, env=e, log=self._log("frontend"), name=f"frontend:{port}")
        fe = Frontend(f"http://127.0.0.1:{port}", port, proc)
        self.frontends.append(fe)
        if wait:
            wait_http(fe.url + "/live", proc, timeout=timeout)
        return fe

    def start_worker(self, env=None, system_port=False, wait=False, timeout=20.0, **flags):
        """Starts `baton worker` on a free --rpc-port (unless rpc_port is given), rpc host
        127.0.0.1. system_port: False turns the status server off (DYN_SYSTEM_PORT=-1, so that
        workers do not fight over the default 9090), True picks a free port, an int uses it.
        With wait (and a status server), returns once its GET /live answers."""
        rpc_port = flags.pop("rpc_port", None) or free_port()
        flags.setdefault("rpc_host", "127.0.0.1")
        # a llama worker serves its model file's name by default (stories260K); the tests name
        # one model for every engine, so a llama worker they start serves it under "mock-model"
        if flags.get("engine") == "llama":
            flags.setdefault("model_name", "mock-model")
        flags = self._common(flags)
        e = dict(self.env)
        if system_port is True:
            sp = free_port()
        elif system_port:
            sp = int(system_port)
        else:
            sp = None
        e["DYN_SYSTEM_PORT"] = str(sp) if sp else "-1"
        e.update(env or {})
        args = [self.bin, "worker", "--rpc-port", str(rpc_port)] + flags_to_args(flags)
        proc = Proc(args, env=e, log=self._log("worker"), name=f"worker:{rpc_port}")
        w = Worker(proc, rpc_port, sp)
        self.workers.append(w)
        if wait and sp:
            wait_http(w.system_url + "/live", proc, timeout=timeout)
        return w

    def start_run(self, env=None, wait=True, timeout=30.0, **flags):
        """Starts `baton run` (all-in-one) on a free --http-port; returns a Frontend for it. With wait,
        returns once `baton run` has printed "baton: serving", which it does only when its frontend
        answers and routes to every worker it started."""
        port = flags.pop("http_port", None) or free_port()
        flags.setdefault("http_host", "127.0.0.1")
        e = dict(self.env)
        e.pop("DYN_FILE_KV", None)  # `baton run` keeps its own private discovery directory
        e.update(env or {})
        args = [self.bin, "run", "--http-port", str(port)] + flags_to_args(flags)
        proc = Proc(args, env=e, log=self._log("run"), name=f"run:{port}")
        fe = Frontend(f"http://127.0.0.1:{port}", port, proc)
        self.runs.append(fe)
        if wait:
            proc.wait_log(r"(?m)^baton: serving ", timeout=timeout)
            wait_http(fe.url + "/live", proc, timeout=timeout)
        return fe

    def wait_workers(self, frontend, n, timeout=30.0):
        """Polls the frontend's GET /health until its `instances` list has exactly n entries;
        returns that list. Fails with the last body and the logs otherwise."""
        end = time.monotonic() + timeout
        last = None
        while True:
            if not frontend.proc.alive():
                raise AssertionError(f"frontend exited with {frontend.proc.returncode} while waiting for {n} "
                                     f"workers; log:\n{frontend.proc.log_tail()}")
            try:
                status, _, body = get_json(frontend.url + "/health", timeout=5)
                last = (status, body)
                if status == 200 and isinstance(body, dict):
                    inst = body.get("instances") or []
                    if len(inst) == n:
                        return inst
            except OSError as e:
                last = repr(e)
            if time.monotonic() >= end:
                self.dump_logs()
                raise AssertionError(f"frontend {frontend.url} did not list {n} instances within {timeout} s; "
                                     f"last /health: {last!r}")
            time.sleep(0.1)

    def dump_logs(self, lines=60):
        dump_logs(self.procs(), lines)

    def close(self, timeout=10.0, check_sanitizers=True):
        """Stops every process of the cluster: SIGTERM to all at once, SIGKILL to those still
        running after `timeout` s. Returns {proc name: exit status}. Then, with check_sanitizers,
        raises AssertionError if any process log holds a sanitizer report."""
        procs = self.procs()
        for p in procs:
            if p.alive():
                p.kill(signal.SIGTERM)
                p.kill(signal.SIGCONT)
        end = time.monotonic() + timeout
        for p in procs:
            if p.wait(max(0.0, end - time.monotonic())) is None:
                p.kill_group()
        for p in procs:  # children a `baton run` left behind in its group
            for pid in _pgroup_members(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        codes = {p.name: p.returncode for p in procs}
        if check_sanitizers:
            reports = [(p, p.sanitizer_report()) for p in procs]
            reports = [(p, r) for p, r in reports if r]
            if reports:
                raise AssertionError("sanitizer reports in process logs:\n" + "\n".join(
                    f"----- {p.name} (pid {p.pid}, exit {p.returncode}) {p.log_path}\n{r}" for p, r in reports))
        return codes


def wait_http(url, proc=None, timeout=20.0):
    """Waits until GET url gives any HTTP answer with status < 500; fails early, with the log, if
    `proc` exits first. Returns the status."""
    end = time.monotonic() + timeout
    last = None
    while True:
        if proc is not None and not proc.alive():
            raise AssertionError(f"{proc.name} exited with {proc.returncode} before {url} answered; log:\n"
                                 f"{proc.log_tail()}")
        try:
            status, _, body = request("GET", url, timeout=2)
            last = (status, body[:200])
            if status < 500:
                return status
        except OSError as e:
            last = repr(e)
        if time.monotonic() >= end:
            tail = f"; log:\n{proc.log_tail()}" if proc is not None else ""
            raise AssertionError(f"{url} did not answer within {timeout} s (last: {last!r}){tail}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# etcd (discovery tests).


class Etcd:
    """A real etcd cluster of n members (Debian's etcd-server) on free loopback ports, each member
    a Proc (so it is killed at exit like any other) with its data in <dir>/etcd-<name>.

        e = bl.Etcd(3).start()
        c.start_worker(discovery="etcd", etcd_endpoints=e.endpoints)
        e.kill_member(e.leader())
        e.get_prefix("v1/instances/")  # {key: (value, lease)} via etcdctl

    A stopped member restarts from its data directory with start_member(i). extra_args go to every
    member (e.g. ["--auth-token", "simple"]); etcdctl() runs the client against the live members."""

    def __init__(self, n=1, dir=None, extra_args=(), name="etcd"):
        self.etcd_bin = shutil.which("etcd") or "/usr/bin/etcd"
        self.etcdctl_bin = shutil.which("etcdctl") or "/usr/bin/etcdctl"
        for b in (self.etcd_bin, self.etcdctl_bin):
            if not os.access(b, os.X_OK):
                raise AssertionError(f"{b} not found: install etcd-server and etcd-client (scripts/setup does)")
        self.dir = dir or tmpdir()
        self.n = n
        self.name = name
        self.names = [f"{name}{i}" for i in range(n)]
        self.client_ports = [free_port() for _ in range(n)]
        self.peer_ports = [free_port() for _ in range(n)]
        self.procs = [None] * n
        self.extra = list(extra_args)
        self.cluster_token = f"{name}-{os.getpid()}-{self.client_ports[0]}"
        self.auth = None  # "user:password" for etcdctl once auth is on
        self.scheme = "http"  # of the client URLs; a TLS subclass (etcdlib.TlsEtcd) sets https
        self.ctl_args = []  # extra etcdctl flags (TLS files)

    @property
    def urls(self):
        return [f"{self.scheme}://127.0.0.1:{p}" for p in self.client_ports]

    @property
    def endpoints(self):
        """The comma-separated client URLs, in member order (ETCD_ENDPOINTS)."""
        return ",".join(self.urls)

    def endpoints_from(self, first):
        """The client URLs with member `first` first, then the others in order."""
        order = [first] + [i for i in range(self.n) if i != first]
        return ",".join(self.urls[i] for i in order)

    def _args(self, i):
        initial = ",".join(f"{self.names[j]}=http://127.0.0.1:{self.peer_ports[j]}" for j in range(self.n))
        return [self.etcd_bin, "--name", self.names[i], "--data-dir", os.path.join(self.dir, f"etcd-{self.names[i]}"),
                "--listen-client-urls", self.urls[i], "--advertise-client-urls", self.urls[i],
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", self.cluster_token] + self.extra

    def start_member(self, i):
        log = os.path.join(self.dir, f"etcd-{self.names[i]}.log")
        self.procs[i] = Proc(self._args(i), log=log, name=f"etcd:{self.names[i]}")
        return self.procs[i]

    def start(self, timeout=30.0):
        """Starts every member and waits until all of them report healthy. Returns self."""
        for i in range(self.n):
            self.start_member(i)
        self.wait_healthy(timeout=timeout)
        return self

    def alive(self, i):
        return self.procs[i] is not None and self.procs[i].alive()

    def live_members(self):
        return [i for i in range(self.n) if self.alive(i)]

    def kill_member(self, i, sig=signal.SIGKILL, timeout=10.0):
        """Sends `sig` to member i and waits for it to exit; returns its exit status."""
        p = self.procs[i]
        p.kill(sig)
        rc = p.wait(timeout)
        if rc is None:
            raise AssertionError(f"etcd member {self.names[i]} did not exit within {timeout} s of signal {sig}")
        return rc

    def stop(self):
        for i in self.live_members():
            self.kill_member(i, signal.SIGTERM)

    def etcdctl(self, *args, members=None, timeout=10.0, check=True):
        """Runs etcdctl against the given members (default: the live ones); returns stdout.
        check: raise AssertionError (with stderr) on a non-zero exit."""
        members = self.live_members() if members is None else members
        eps = ",".join(self.urls[i] for i in members) or self.urls[0]
        cmd = [self.etcdctl_bin, "--endpoints", eps, "--command-timeout", f"{max(1, int(timeout) - 1)}s"]
        if self.auth:
            cmd += ["--user", self.auth]
        cmd += self.ctl_args
        env = dict(os.environ, ETCDCTL_API="3")
        for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(k, None)
        r = subprocess.run(cmd + [str(a) for a in args], capture_output=True, timeout=timeout + 5, env=env)
        out = r.stdout.decode("utf-8", "replace")
        if check and r.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(map(str, args))} failed ({r.returncode}): "
                                 f"{r.stderr.decode('utf-8', 'replace').strip()}")
        return out

    def wait_healthy(self, members=None, timeout=30.0):
        """Waits until each given member (default: the live ones) answers `endpoint health`."""
        members = self.live_members() if members is None else members

        def healthy():
            for i in members:
                if not self.alive(i):
                    raise AssertionError(f"etcd member {self.names[i]} exited with {self.procs[i].returncode}; "
                                         f"log:\n{self.procs[i].log_tail()}")
                self.etcdctl("endpoint", "health", members=[i], timeout=3)
            return True

        return wait_for(healthy, timeout, interval=0.2, what=f"etcd members {members} healthy")

    def get_prefix(self, prefix, members=None):
        """{key: (value text, lease id or 0)} of every key starting with `prefix`."""
        import base64
        out = self.etcdctl("get", "--prefix", prefix, "-w", "json", members=members)
        kvs = json.loads(out).get("kvs") or []
        return {base64.b64decode(kv["key"]).decode(): (base64.b64decode(kv.get("value", "")).decode(),
                                                      int(kv.get("lease", 0)))
                for kv in kvs}

    def leases(self):
        """The ids of every lease etcd holds, as ints."""
        out = self.etcdctl("lease", "list")
        return {int(line.strip(), 16) for line in out.splitlines()[1:] if line.strip()}

    def leader(self):
        """Index of the current leader among the live members (AssertionError if none agrees)."""
        out = self.etcdctl("endpoint", "status", "-w", "json")
        ids = {}
        leaders = set()
        for st in json.loads(out):
            ids[st["Status"]["header"]["member_id"]] = st["Endpoint"]
            leaders.add(st["Status"]["leader"])
        if len(leaders) != 1 or next(iter(leaders)) not in ids:
            raise AssertionError(f"no agreed leader among the live members: {out}")
        return self.urls.index(ids[next(iter(leaders))])


def stream_outcome(s):
    """What a stream must reproduce exactly against a reference run: text, token ids, finish reason,
    usage (with the keys of a unary answer's, so that the two compare: unary_outcome)."""
    return {"text": s.text, "token_ids": list(s.token_ids), "finish_reason": s.finish_reason, "usage": s.usage}


def unary_outcome(b):
    """stream_outcome of a non-streamed answer's parsed body (its first choice)."""
    ch = b["choices"][0]
    return {"text": ch["message"]["content"], "token_ids": ch.get("token_ids"), "finish_reason": ch["finish_reason"],
            "usage": b["usage"]}
