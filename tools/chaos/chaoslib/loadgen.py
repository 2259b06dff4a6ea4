"""loadgen — OpenAI load with a full record of every request.

Request shapes are a pure function of the scenario seed: the same scenario sends the same bodies,
so a fault-free replay of each shape is the reference its faulted runs must equal. Every body asks
for "return_token_ids": true, so outputs are compared as token ids as well as text.

A Record keeps, for one request: when it was sent, each event that carried tokens (arrival time
and how many), when it ended and how (outcome), the HTTP status, the error the client read, the
full text and token ids, finish_reason and usage. Outcomes:
  ok        completed normally ([DONE] and a finish_reason, or a 200 JSON body with one)
  error     ended with an explicit error the client can read (an SSE error event or a JSON error)
  cut       the connection ended without [DONE] and without an error (a dropped stream)
  refused   the connection was refused: the request never reached a server
  timeout   the client's bound ran out: a hung request
  protocol  malformed answer (non-JSON data line, data after [DONE], non-JSON error page)
  aborted   the client dropped it on purpose (disconnect storms)

With load.resume, a streaming client whose connection ends without [DONE] (cut by a fault, or by
the client itself with load.client_cuts) resumes it: it POSTs the same body again with the
Last-Event-ID of the last event it received, up to load.resume_attempts times, and the Record is
the whole answer put together (`resumes` says how many times it reconnected).
"""

import http.client
import json
import random
import socket
import threading
import time

from .util import batonlib

_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
          "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river mountain cloud stone ember "
          "harbor lantern meadow orbit prism quartz signal timber valley willow anchor beacon cinder drift "
          "falcon glacier horizon island jasper kernel ledger marble nebula oracle pilot relay summit thunder "
          "vector wander zenith").split()

OUTCOMES = ("ok", "error", "cut", "refused", "timeout", "protocol", "aborted")


class Shape:
    """One request: api ('chat' | 'completions'), stream flag and the JSON body."""

    def __init__(self, index, api, stream, body):
        self.index = index
        self.api = api
        self.stream = stream
        self.body = body
        self.key = json.dumps(body, sort_keys=True)

    @property
    def path(self):
        return "/v1/chat/completions" if self.api == "chat" else "/v1/completions"

    def to_dict(self):
        return {"index": self.index, "api": self.api, "stream": self.stream, "body": self.body}


def make_body(api, stream, prompt, max_tokens, model, seed):
    body = {"model": model, "max_tokens": max_tokens, "return_token_ids": True, "seed": seed, "stream": stream}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def make_shapes(load, model, seed):
    """The scenario's `distinct` request shapes, deterministic in (load settings, model, seed)."""
    rng = random.Random(f"baton-chaos-{seed}")
    shapes = []
    for i in range(load["distinct"]):
        api = load["api"] if load["api"] != "mixed" else ("chat" if rng.random() < 0.5 else "completions")
        stream = load["stream"] if load["stream"] != "mixed" else rng.random() < 0.7
        nwords = rng.randint(*load["prompt_words"])
        prompt = " ".join(rng.choice(_WORDS) for _ in range(nwords))
        max_tokens = rng.randint(*load["output_tokens"])
        shapes.append(Shape(i, api, stream, make_body(api, stream, prompt, max_tokens, model, rng.randint(1, 1 << 30))))
    return shapes


def probe_shape(model, seed):
    """The small streaming request the prober sends during a run."""
    return Shape(-1, "chat", True, make_body("chat", True, "probe of recovery", 8, model, seed))


class Record:
    __slots__ = ("kind", "seq", "shape", "api", "stream", "url", "t_send", "t_first", "t_end", "events", "status",
                 "outcome", "error", "text", "token_ids", "finish_reason", "usage", "request_id", "exception",
                 "resumes")

    def __init__(self, kind, seq, shape, url):
        self.kind = kind
        self.seq = seq
        self.shape = shape.index if shape is not None else None
        self.api = shape.api if shape is not None else None
        self.stream = shape.stream if shape is not None else None
        self.url = url
        self.t_send = self.t_first = self.t_end = None
        self.events = []  # [t, ntokens] per event that carried tokens
        self.status = None
        self.outcome = None
        self.error = None
        self.text = ""
        self.token_ids = []
        self.finish_reason = None
        self.usage = None
        self.request_id = None
        self.exception = None
        self.resumes = 0

    def to_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, d):
        r = cls.__new__(cls)
        for k in cls.__slots__:
            setattr(r, k, d.get(k, [] if k in ("events", "token_ids") else "" if k == "text" else
                                0 if k == "resumes" else None))
        return r

    @property
    def duration(self):
        if self.t_send is None or self.t_end is None:
            return None
        return self.t_end - self.t_send

    def worst_gap(self):
        """Longest wait between consecutive progress points (send, each token event)."""
        if self.t_send is None:
            return None
        pts = [self.t_send] + [e[0] for e in self.events]
        return max((b - a for a, b in zip(pts, pts[1:])), default=None)

    def summary(self):
        err = self.error.get("message") if isinstance(self.error, dict) else self.error
        return (f"{self.kind}#{self.seq} shape={self.shape} {self.api}/{'sse' if self.stream else 'json'} "
                f"outcome={self.outcome} status={self.status} tokens={len(self.token_ids)} "
                f"finish={self.finish_reason} err={str(err)[:120] if err else None} exc={self.exception}")


def _is_refused(exc_text):
    return exc_text is not None and ("ConnectionRefused" in exc_text or "Errno 111" in exc_text)


def _tokens_in(obj):
    if not isinstance(obj, dict):
        return 0, False
    ch = obj.get("choices") or []
    if not ch or not isinstance(ch[0], dict):
        return 0, False
    c = ch[0]
    ids = c.get("token_ids") or []
    piece = (c.get("delta") or {}).get("content") if isinstance(c.get("delta"), dict) else c.get("text")
    return len(ids), bool(ids or piece)


def send(url, shape, t0, timeout, kind="load", seq=0, on_tokens=None, abort_after=None, resume=0, cut_at=None,
         resume_urls=None):
    """Sends one request and returns its Record (times relative to t0). Never raises for what the
    server or the network does. on_tokens(n) is called as tokens arrive; abort_after=k drops the
    connection after k events. resume=n: a stream cut without [DONE] is resumed with Last-Event-ID
    up to n times; cut_at=k: the client cuts its first connection after k events itself (and
    resumes); resume_urls: the frontends resumes go to, in turn (default: url)."""
    rec = Record(kind, seq, shape, url)
    if shape.stream:
        _send_stream(rec, url, shape, t0, timeout, on_tokens, abort_after, resume, cut_at, resume_urls)
    else:
        _send_unary(rec, url, shape, t0, timeout, on_tokens)
    return rec


def _resumable(st):
    """A piece of a stream that ended without [DONE] and without an error it could read: its
    connection was cut (or refused, while a frontend restarts)."""
    if st.done or st.error is not None or st.timed_out:
        return False
    return st.aborted or st.closed_early or st.status is None


def _send_stream(rec, url, shape, t0, timeout, on_tokens, abort_after, resume=0, cut_at=None, resume_urls=None):
    bl = batonlib()

    def on_event(st, obj):
        n, carried = _tokens_in(obj)
        if carried and on_tokens is not None and n:
            on_tokens(n)
        return False

    end = time.monotonic() + timeout
    pieces = []
    last_id = None
    while True:
        first = not pieces
        hdrs = {"Last-Event-ID": last_id} if last_id else None
        k = abort_after if first and cut_at is None else cut_at if first else None
        u = resume_urls[(len(pieces) - 1) % len(resume_urls)] if resume_urls and pieces else url
        st = bl.stream_sse(u, shape.path, shape.body, timeout=max(0.1, end - time.monotonic()), abort_after=k,
                           on_event=on_event, headers=hdrs)
        pieces.append(st)
        last_id = st.last_event_id or last_id
        planned = first and cut_at is not None and st.aborted
        if not (resume and len(pieces) <= resume and last_id and (planned or _resumable(st))):
            break
        if not planned and abort_after is not None and first:
            break  # a disconnect storm's drop is the outcome itself
        if time.monotonic() >= end:
            break
        time.sleep(0.05 if st.status is not None else 0.2)
    st = pieces[-1]
    rec.resumes = len(pieces) - 1
    rec.t_send = pieces[0].t_start - t0 if pieces[0].t_start is not None else None
    rec.t_end = st.t_end - t0 if st.t_end is not None else None
    rec.status = st.status
    rec.error = st.error
    rec.text = "".join(p.text for p in pieces)
    rec.token_ids = [t for p in pieces for t in p.token_ids]
    rec.finish_reason = next((p.finish_reason for p in reversed(pieces) if p.finish_reason), None)
    rec.usage = next((p.usage for p in reversed(pieces) if p.usage), None)
    rec.request_id = next((p.headers.get("x-request-id") for p in pieces if p.headers), None)
    rec.exception = st.exception
    for p in pieces:
        for obj, t in zip(p.events, p.t_events):
            n, carried = _tokens_in(obj)
            if carried:
                rec.events.append([round(t - t0, 6), n])
    rec.t_first = rec.events[0][0] if rec.events else None
    if st.aborted:
        rec.outcome = "aborted"
    elif st.status is None:
        rec.outcome = "timeout" if st.timed_out else "refused" if _is_refused(st.exception) else "cut"
    elif st.timed_out:
        rec.outcome = "timeout"
    elif st.bad_lines or st.after_done or st.unterminated:
        rec.outcome = "protocol"
    elif st.error is not None and st.error.get("message"):
        rec.outcome = "error"
    elif st.status != 200:
        rec.outcome = "protocol"  # an error status without a readable JSON error
    elif st.ok:
        rec.outcome = "ok"
    elif st.closed_early:
        rec.outcome = "cut"
    else:
        rec.outcome = "protocol"


def _send_unary(rec, url, shape, t0, timeout, on_tokens):
    bl = batonlib()
    host, port, base_path = bl._split_url(url.rstrip("/") + shape.path)
    data = json.dumps(shape.body).encode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    rec.t_send = time.monotonic() - t0
    end = time.monotonic() + timeout
    try:
        conn.connect()
        conn.sock.settimeout(max(0.1, end - time.monotonic()))
        conn.request("POST", base_path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        rec.status = resp.status
        rec.request_id = resp.getheader("x-request-id")
        payload = resp.read()
        now = time.monotonic() - t0
        try:
            obj = json.loads(payload)
        except ValueError:
            obj = None
        if resp.status == 200 and isinstance(obj, dict) and obj.get("choices"):
            c = obj["choices"][0]
            rec.text = (c.get("message") or {}).get("content") or "" if shape.api == "chat" else c.get("text") or ""
            rec.token_ids = list(c.get("token_ids") or [])
            rec.finish_reason = c.get("finish_reason")
            rec.usage = obj.get("usage")
            if rec.token_ids or rec.text:
                rec.events.append([round(now, 6), len(rec.token_ids)])
                rec.t_first = now
                if on_tokens is not None and rec.token_ids:
                    on_tokens(len(rec.token_ids))
            rec.outcome = "ok" if rec.finish_reason is not None else "protocol"
        elif isinstance(obj, dict) and isinstance(obj.get("error"), dict) and obj["error"].get("message"):
            rec.error = obj["error"]
            rec.outcome = "error"
        else:
            rec.error = {"message": payload[:200].decode("utf-8", "replace")}
            rec.outcome = "protocol"
    except socket.timeout as e:
        rec.outcome = "timeout"
        rec.exception = repr(e)
    except (OSError, http.client.HTTPException) as e:
        rec.exception = repr(e)
        rec.outcome = "refused" if _is_refused(rec.exception) else "cut"
    finally:
        rec.t_end = time.monotonic() - t0
        conn.close()


class Load:
    """Closed-loop clients: `concurrency` threads, each sending the next shape (cycling through the
    pool) to the next frontend URL until the load's duration has passed or its request count is
    reached. Counts delivered tokens so that faults can trigger after N tokens."""

    def __init__(self, urls, shapes, load, t0):
        self.urls = list(urls)
        self.shapes = shapes
        self.cfg = load
        self.t0 = t0
        self.records = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._next = 0
        self.open = {}  # seq -> (shape, url, t_send) of requests in flight
        self.tokens = 0
        self.started = False
        self.finished = False
        self.stop_flag = False
        self.threads = []

    def add_tokens(self, n):
        with self._cond:
            self.tokens += n
            self._cond.notify_all()

    def wait_tokens(self, n, timeout):
        """Blocks until n tokens were delivered (True), the load ended or timeout passed (False)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self.tokens < n:
                left = end - time.monotonic()
                if left <= 0 or self.finished:
                    return self.tokens >= n
                self._cond.wait(min(left, 0.2))
            return True

    def _take(self):
        with self._lock:
            if self.stop_flag:
                return None
            if self.cfg["requests"] and self._next >= self.cfg["requests"]:
                return None
            if self.cfg["duration"] and time.monotonic() - self.t0 >= self.cfg["duration"]:
                return None
            i = self._next
            self._next += 1
            return i

    def _client(self):
        while True:
            i = self._take()
            if i is None:
                return
            shape = self.shapes[i % len(self.shapes)]
            url = self.urls[i % len(self.urls)]
            with self._lock:
                self.open[i] = (shape, url, time.monotonic() - self.t0)
            cut_at = None
            if shape.stream and self.cfg.get("client_cuts"):
                rng = random.Random(f"baton-chaos-cut-{i}")
                if rng.random() < self.cfg["client_cuts"]:
                    cut_at = rng.randint(*self.cfg["client_cut_events"])
            resume = self.cfg["resume_attempts"] if self.cfg.get("resume") else 0
            # resumes go to the other frontends first, as a balancer whose first choice died would send them
            others = None
            if self.cfg.get("resume_elsewhere") and len(self.urls) > 1:
                k = self.urls.index(url)
                others = self.urls[k + 1:] + self.urls[:k + 1]
            rec = send(url, shape, self.t0, self.cfg["request_timeout"], "load", i, on_tokens=self.add_tokens,
                       resume=resume, cut_at=cut_at, resume_urls=others)
            with self._lock:
                if self.open.pop(i, None) is None:
                    return  # join() gave up on this request and recorded it as hung
                self.records.append(rec)
            if rec.outcome != "ok":
                time.sleep(0.1)  # a client backs off after a failure instead of spinning on a dead port

    def start(self):
        self.started = True
        for _ in range(self.cfg["concurrency"]):
            t = threading.Thread(target=self._client, daemon=True)
            t.start()
            self.threads.append(t)

    def join(self, timeout):
        """Waits for the clients; requests still open after timeout are recorded as hung
        (outcome timeout). Returns True when every client finished."""
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        with self._cond:
            self.finished = True
            self.stop_flag = True
            for i, (shape, url, t_send) in sorted(self.open.items()):
                rec = Record("load", i, shape, url)
                rec.t_send = t_send
                rec.outcome = "timeout"
                rec.exception = f"still open when the load was given up after {timeout:.0f} s"
                self.records.append(rec)
            self.open.clear()
            self._cond.notify_all()
        return not any(t.is_alive() for t in self.threads)


class Prober:
    """Sends the probe shape every `interval` seconds, one at a time, round-robin over the URLs,
    until stopped. Its records measure recovery: they are not part of the load."""

    def __init__(self, urls, shape, interval, t0, timeout):
        self.urls = list(urls)
        self.shape = shape
        self.interval = interval
        self.t0 = t0
        self.timeout = timeout
        self.records = []
        self._stop = threading.Event()
        self.thread = None

    def _run(self):
        n = 0
        while not self._stop.is_set():
            start = time.monotonic()
            rec = send(self.urls[n % len(self.urls)], self.shape, self.t0, self.timeout, "probe", n)
            self.records.append(rec)
            n += 1
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - start)))

    def start(self):
        if self.interval and self.interval > 0:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def stop(self):
        self._stop.set()
        if self.thread:
            self.thread.join(self.timeout + 5)


def run_all(url, shapes, t0, timeout, concurrency, kind):
    """Sends each shape once (concurrently) and returns the records in shape order."""
    bl = batonlib()
    return bl.run_concurrently(lambda s: send(url, s, t0, timeout, kind, s.index), [(s,) for s in shapes],
                               max_workers=max(1, concurrency))
