"""A fake worker on the request plane (docs/protocol.md), for tests of what a frontend does with a
broken or hostile worker: it registers itself in file discovery as a worker of a model, answers
the frontend's HELLO and PINGs, and hands every REQUEST to a test-supplied function that sends
whatever frames it likes (tokens past max_tokens, frames for streams never opened, ...).

    fw = FakeWorker(cluster.discovery_dir, on_request=lambda fw, stream, payload: ...)
    ...
    fw.close()

on_request runs on the fake worker's connection thread; it sends with fw.send(frame bytes), built
with tokens(), finish(), error(), load(), kvstate(); sent from on_request, frames go to the
connection the REQUEST came on (several frontends, or one with --threads N, each have their own),
sent from elsewhere to every connection. fw.silent is an on_request that sends nothing: the
connection stays alive (PONGs) while the stream never hears a frame. fw.frames records the REQUEST,
STOP and KILL frames with the connection they came on, and fw.request_of(request_id) finds a
REQUEST by its request id. No request-plane secret (AUTH): use it with frontends that have none.

hello_flags are the flags of its HELLO (0 by default: a worker that announces nothing, as an
older build; HELLO_WAITING says it tells its streams' waits with WAITING frames), and after_hello
bytes it sends right behind its HELLO, in the same write (a LOAD, say). fw.frontend_flags() is the
flags of the frontend's HELLO on the connection whose on_request runs.

Beside a real mocker worker, a test compares what the client gets when the fake worker misbehaves
with the mocker's own answer to the same request:

    fe, ref, ref_u, first = start_with_reference(cluster, body, 5, migration_limit=3)
    fw = FakeWorker.joined(cluster, fe, on_request, 2)  # it may send `first`, then misbehave
    rid, result, (conn, stream), others = fw.first_routed("x", lambda rid: ...)
"""

import itertools
import json
import os
import random
import socket
import struct
import threading
import time

import batonlib as bl

HELLO, REQUEST, TOKENS, FINISH, ERROR, STOP, KILL, PING, PONG, LOAD, GOAWAY = range(1, 12)
KVSTATE = 13
WAITING = 14
HELLO_KVSTATE, HELLO_WAITING = 0x1, 0x2
WAIT_QUEUED, WAIT_PREEMPTED = 0, 1
FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = 0, 1, 2


def frame(ftype, stream, payload=b"", flags=0):
    return struct.pack(">IBBHI", 8 + len(payload), ftype, flags, 0, stream) + payload


def tokens(stream, ids, text):
    body = struct.pack(">H", len(ids)) + b"".join(struct.pack(">I", i) for i in ids)
    return frame(TOKENS, stream, body + (text.encode() if isinstance(text, str) else text))


def finish(stream, reason, prompt_tokens, completion_tokens):
    return frame(FINISH, stream, struct.pack(">BxxxII", reason, prompt_tokens, completion_tokens))


def load(total_blocks=16384, active_blocks=0, waiting=0, running=0, ready=True):
    """A LOAD frame (stream 0): the worker's load report, ready unless told."""
    return frame(LOAD, 0, struct.pack(">QQQQQQI", active_blocks, total_blocks, 0, waiting, running, 8192,
                                      1 if ready else 0))


def kvstate(stream, total, offset, data=b""):
    """A KVSTATE frame: one piece of a KV state of `total` bytes."""
    return frame(KVSTATE, stream, struct.pack(">QQ", total, offset) + data)


def waiting(stream, reason=WAIT_QUEUED):
    """A WAITING frame: the worker's engine keeps the stream waiting until its next TOKENS."""
    return frame(WAITING, stream, struct.pack(">B", reason))


def error(stream, code, msg):
    return frame(ERROR, stream, struct.pack(">H", code) + msg.encode())


def start_with_reference(cluster, body, first_n, **frontend_opts):
    """A mocker worker and a frontend (frontend_opts) of cluster, and the mocker's answers to one
    request, body(True) streamed and body(False) whole: what a test whose fake worker gets the same
    request compares the client's answer with. Returns (frontend, stream outcome, unary outcome,
    the stream's first first_n token events as (ids, text), each of one id: what a fake worker sends
    to look like the mocker before it misbehaves). The stream and the whole answer agree."""
    cluster.start_worker()
    fe = cluster.start_frontend(**frontend_opts)
    cluster.wait_workers(fe, 1)
    s = bl.stream_chat(fe.url, body(True), timeout=30).assert_ok("reference stream")
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(False), timeout=30)
    assert st == 200, (st, b)
    ref, ref_u = bl.stream_outcome(s), bl.unary_outcome(b)
    assert ref["text"] == ref_u["text"] and ref["token_ids"] == ref_u["token_ids"], (ref, ref_u)
    first = []
    for ev in s.events:
        ch = (ev.get("choices") or [{}])[0]
        if ch.get("token_ids"):
            first.append((ch["token_ids"], ch["delta"].get("content") or ""))
    assert sum(len(ids) for ids, _ in first) == len(ref["token_ids"]), (first, ref)
    first = first[:first_n]
    assert [len(ids) for ids, _ in first] == [1] * first_n, first
    return fe, ref, ref_u, first


class Replay:
    """The mocker's streamed answer to one request, taken once through frontend fe (whose worker is
    slow enough, e.g. speedup_ratio 0.3, that the client sees one event per token), for a fake
    worker to send back event by event: .outcome (bl.stream_outcome), .events ((ids, text) of each
    token event, every one of one id), and answer(), which sends it from where a REQUEST's carried
    tokens end, so that a client's answer, migrated or not, compares byte for byte with .outcome."""

    def __init__(self, fe, body, min_events):
        s = bl.stream_chat(fe.url, body, timeout=30).assert_ok("the reference, on the mocker")
        self.outcome = bl.stream_outcome(s)
        self.events = []
        for ev in s.events:
            ch = (ev.get("choices") or [{}])[0]
            if ch.get("token_ids"):
                self.events.append((ch["token_ids"], ch["delta"].get("content") or ""))
        assert all(len(ids) == 1 for ids, _ in self.events), self.events
        assert len(self.events) == len(self.outcome["token_ids"]) > min_events, self.events
        self.reason = {"length": FINISH_LENGTH, "stop": FINISH_STOP}[self.outcome["finish_reason"]]

    def answer(self, send, stream_id, payload, delay=0.0, pace=0.0):
        """On a thread: after delay seconds, the events after the payload's carried tokens, pace
        seconds apart, then FINISH, each through send (FakeWorker.sender())."""
        carried = payload.get("carried") or []
        ref, usage = self.outcome, self.outcome["usage"]
        assert carried == ref["token_ids"][:len(carried)], f"carried {carried} is not the reference's start"

        def go():
            time.sleep(delay)
            for ids, text in self.events[len(carried):]:
                time.sleep(pace)
                send(tokens(stream_id, ids, text))
            send(finish(stream_id, self.reason, usage["prompt_tokens"], usage["completion_tokens"]))
        threading.Thread(target=go, daemon=True).start()


def stream_async(fe, body, rid, timeout=30):
    """bl.stream_chat(fe, body) with X-Request-Id rid on a thread: (thread, box), box["s"] its
    result once the thread has ended."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault(
        "s", bl.stream_chat(fe.url, body, timeout=timeout, headers={"X-Request-Id": rid})))
    t.start()
    return t, box


_rids = itertools.count(1)  # request ids of first_routed, unique in the test process


class FakeWorker:
    def __init__(self, discovery_dir, on_request, model="mock-model", namespace="dynamo", hello_flags=0,
                 after_hello=b""):
        self.on_request = on_request
        self.hello_flags = hello_flags
        self.after_hello = after_hello
        self._fe_flags = {}  # connection number -> flags of the frontend's HELLO
        self.instance_id = random.getrandbits(62) + 1
        self.requests = []  # (stream id, payload bytes) of every REQUEST, in order
        self.control = []  # (frame type, stream id) of every STOP and KILL
        # (connection number, frame type, stream id, payload) of every REQUEST, STOP and KILL;
        # connections are numbered from 1 in the order they were accepted
        self.frames = []
        self._local = threading.local()  # .conn: the connection whose on_request is running
        self._lock = threading.Lock()
        self._conns = []
        self.accepted = 0  # connections the frontend opened, over time
        self._closed = False
        self._ls = socket.socket()
        self._ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._ls.bind(("127.0.0.1", 0))
        self._ls.listen(16)
        self.port = self._ls.getsockname()[1]
        value = {"type": "Endpoint", "namespace": namespace, "component": "backend", "endpoint": "generate",
                 "instance_id": self.instance_id, "transport": {"tcp": f"127.0.0.1:{self.port}"},
                 "model": {"name": model, "total_kv_blocks": 16384, "block_size": 64, "context_length": 100000,
                           "max_num_seqs": 256, "max_num_batched_tokens": 8192},
                 "pid": os.getpid()}
        # the file backend's key encoding ('/' as %2F), written atomically (temp file + rename)
        name = f"v1%2Finstances%2F{namespace}%2Fbackend%2Fgenerate%2F{self.instance_id:x}"
        self.path = os.path.join(discovery_dir, name)
        tmp = os.path.join(discovery_dir, f".tmp.fake.{os.getpid()}.{self.instance_id:x}")
        with open(tmp, "w") as f:
            f.write(json.dumps(value))
        os.rename(tmp, self.path)
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._keep_alive, daemon=True).start()

    def _keep_alive(self):
        """The file backend's readers expire a key whose mtime is older than its TTL (10 s by
        default): touched every second, as a worker keeps its own keys alive."""
        while not self._closed:
            time.sleep(1.0)
            try:
                os.utime(self.path)
            except OSError:
                pass

    @staticmethod
    def silent(fw, stream, payload):
        """An on_request that never answers: the stream hears nothing while PINGs still get PONGs."""

    @classmethod
    def joined(cls, cluster, fe, on_request, listed, **kw):
        """A FakeWorker(on_request) in cluster's discovery directory, once frontend fe is connected to
        it and lists `listed` workers, this one among them (closed if that never comes)."""
        fw = cls(cluster.discovery_dir, on_request, **kw)
        try:
            fw.wait_connected()
            cluster.wait_workers(fe, listed)
        except BaseException:
            fw.close()
            raise
        return fw

    def first_routed(self, prefix, send, tries=8):
        """Sends requests (send(rid) -> result) until one's first attempt lands on this worker (the
        frontend spreads them over its workers; the others are answered by the mocker and returned
        too, for checking). Returns (rid, the result of that one, (conn, stream) here, [(rid,
        result) of the others])."""
        others = []
        for _ in range(tries):
            rid = f"{prefix}-{next(_rids)}-{int(time.time() * 1000)}"
            res = send(rid)
            got = self.request_of(rid)
            if got:
                conn, stream, payload = got
                assert not payload.get("carried"), f"{rid}: the fake worker got a continuation first: {payload}"
                return rid, res, (conn, stream), others
            others.append((rid, res))
        raise AssertionError(f"{tries} requests and none was routed to the fake worker")

    def request_of(self, request_id):
        """(connection number, stream id, payload as JSON) of the last REQUEST with that request_id, or None."""
        for conn, ftype, stream, payload in reversed(list(self.frames)):
            if ftype == REQUEST:
                try:
                    body = json.loads(payload)
                except ValueError:
                    continue
                if body.get("request_id") == request_id:
                    return conn, stream, body
        return None

    def frontend_flags(self):
        """The flags of the frontend's HELLO on the connection whose on_request is running."""
        return self._fe_flags.get(getattr(self._local, "number", None), 0)

    def sender(self):
        """From on_request: a function that sends bytes on that request's connection, later and from
        any thread (fw.send from another thread goes to every connection)."""
        own = getattr(self._local, "conn", None)

        def send(data):
            try:
                own.sendall(data)
            except (OSError, AttributeError):
                pass
        return send

    def handshaken(self):
        """How many connections have received the frontend's HELLO (and sent this worker's)."""
        return len(self._fe_flags)

    def control_for(self, conn, stream):
        """The STOP and KILL frame types received for that stream of that connection, in order."""
        return [ftype for c, ftype, s, _ in list(self.frames) if c == conn and s == stream and ftype in (STOP, KILL)]

    def send(self, data):
        own = getattr(self._local, "conn", None)
        if own is not None:
            try:
                own.sendall(data)
            except OSError:
                pass
            return
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # one frontend in these tests: its one connection
            try:
                c.sendall(data)
            except OSError:
                pass

    def _accept(self):
        while not self._closed:
            try:
                c, _ = self._ls.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(c)
                self.accepted += 1
                number = self.accepted
            threading.Thread(target=self._serve, args=(c, number), daemon=True).start()

    def _serve(self, c, number):
        self._local.conn = c
        self._local.number = number
        try:
            self._read(c)
        finally:
            with self._lock:
                if c in self._conns:
                    self._conns.remove(c)

    def _read(self, c):
        buf = b""
        while True:
            try:
                d = c.recv(65536)
            except OSError:
                return
            if not d:
                return
            buf += d
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                n = struct.unpack(">I", buf[:4])[0]
                ftype, flags, _, stream = struct.unpack(">BBHI", buf[4:12])
                payload = buf[12:4 + n]
                buf = buf[4 + n:]
                if ftype == HELLO:
                    self._fe_flags[self._local.number] = flags
                    c.sendall(frame(HELLO, 0, struct.pack(">HHQ", 1, 2, self.instance_id), flags=self.hello_flags) +
                              self.after_hello)
                elif ftype == PING:
                    c.sendall(frame(PONG, 0, payload))
                elif ftype == REQUEST:
                    self.requests.append((stream, payload))
                    self.frames.append((self._local.number, ftype, stream, payload))
                    self.on_request(self, stream, payload)
                elif ftype in (STOP, KILL):
                    self.control.append((ftype, stream))
                    self.frames.append((self._local.number, ftype, stream, payload))

    def close(self):
        self._closed = True
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self._ls.close()
        with self._lock:
            for c in self._conns:
                c.close()
            self._conns = []

    def wait_connected(self, timeout=20.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with self._lock:
                if self._conns:
                    return
            time.sleep(0.05)
        raise AssertionError("the frontend never connected to the fake worker")
