"""A minimal request-plane client (docs/protocol.md) that speaks to a worker as a frontend does:
HELLO, REQUEST, TOKENS / FINISH / ERROR, KILL, PONG. For tests that need to act at the level of
frames, such as closing a frontend's connection at an exact point of a stream and re-attaching
from another connection. No request-plane secret (AUTH) support: use it with workers that have
none."""

import json
import random
import socket
import struct
import time

HELLO, REQUEST, TOKENS, FINISH, ERROR, STOP, KILL, PING, PONG, LOAD, GOAWAY = range(1, 12)
KVSTATE = 13
HELLO_KVSTATE = 0x1  # HELLO flag: this side understands KVSTATE frames
HELLO_FINISH_REASONS = 0x8  # HELLO flag: this frontend understands FINISH reasons 3 to 5
FINISH_REASONS = {0: "stop", 1: "length", 2: "cancelled", 3: "content_filter", 4: "tool_calls", 5: "function_call"}


class Frame:
    def __init__(self, ftype, stream, payload):
        self.type = ftype
        self.stream = stream
        self.payload = payload


class Conn:
    def __init__(self, port, host="127.0.0.1", instance_id=None, timeout=15.0, hello_flags=0):
        # a frontend process has one instance id; each Conn is another frontend unless told
        self.instance_id = instance_id or random.getrandbits(62) + 1
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.next_stream = 1
        self.send(HELLO, 0, struct.pack(">HHQ", 1, 1, self.instance_id), flags=hello_flags)
        f = self.read()
        assert f.type == HELLO, f"first frame from the worker is type {f.type}, not HELLO"
        self.pending = []

    def send(self, ftype, stream, payload=b"", flags=0):
        self.sock.sendall(struct.pack(">IBBHI", 8 + len(payload), ftype, flags, 0, stream) + payload)
        self.last_tx = time.monotonic()

    def read(self):
        """The next frame (PINGs are answered, and PONGs and LOADs skipped here). While reading it
        pings the worker when it has sent nothing for a second, as a frontend does: a worker that
        streams without pause sends no PING of its own, and would take a client that only answers
        PINGs for a dead one after --frontend-dead-after (5 s) of a long stream."""
        while True:
            while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack(">I", self.buf[:4])[0]:
                if time.monotonic() - self.last_tx > 1.0:
                    self.send(PING, 0, struct.pack(">Q", int(time.monotonic() * 1000)))
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the worker closed the connection")
                self.buf += chunk
            n = struct.unpack(">I", self.buf[:4])[0]
            ftype, _, _, stream = struct.unpack(">BBHI", self.buf[4:12])
            payload = self.buf[12:4 + n]
            self.buf = self.buf[4 + n:]
            if ftype == PING:
                self.send(PONG, 0, payload)
                continue
            if ftype in (LOAD, GOAWAY, PONG):
                continue
            return Frame(ftype, stream, payload)

    def request(self, payload):
        """Sends a REQUEST with a JSON payload on a new stream; returns the stream id."""
        sid = self.next_stream
        self.next_stream += 1
        self.send(REQUEST, sid, json.dumps(payload).encode())
        return sid

    def kill(self, stream):
        self.send(KILL, stream)

    def close_abruptly(self):
        """Ends the connection with a reset, as a process killed with SIGKILL leaves it."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self):
        self.sock.close()


class Result:
    """What one stream delivered: its batches (ids, text), and how it ended."""

    def __init__(self):
        self.batches = []
        self.finish = None  # (reason, prompt_tokens, completion_tokens)
        self.error = None  # (code, message)

    @property
    def ids(self):
        return [t for b in self.batches for t in b[0]]

    @property
    def text(self):
        return b"".join(b[1] for b in self.batches)

    def positions(self):
        """Token counts at the end of each batch."""
        out, n = [], 0
        for ids, _ in self.batches:
            n += len(ids)
            out.append(n)
        return out


def decode_tokens(payload):
    n = struct.unpack(">H", payload[:2])[0]
    ids = list(struct.unpack(f">{n}I", payload[2:2 + 4 * n]))
    return ids, payload[2 + 4 * n:]


def read_until_tokens(conn, stream, n):
    """Reads frames until `stream` has had n tokens in TOKENS frames (other frames are dropped)."""
    got = 0
    while got < n:
        f = conn.read()
        if f.type == TOKENS and f.stream == stream:
            got += struct.unpack(">H", f.payload[:2])[0]
    return got


def read_stream(conn, stream, until_batches=None, timeout=30.0, result=None):
    """Reads frames of `stream` (frames of other streams are an error) until FINISH or ERROR, or
    until the result holds `until_batches` batches. Returns the Result."""
    r = result or Result()
    end = time.monotonic() + timeout
    while r.finish is None and r.error is None:
        if until_batches is not None and len(r.batches) >= until_batches:
            break
        if time.monotonic() > end:
            raise AssertionError(f"stream {stream}: no end within {timeout} s ({len(r.ids)} tokens)")
        f = conn.read()
        assert f.stream == stream, f"a frame of type {f.type} for stream {f.stream} while reading {stream}"
        if f.type == TOKENS:
            r.batches.append(decode_tokens(f.payload))
        elif f.type == FINISH:
            reason, pt, ct = struct.unpack(">B3xII", f.payload)
            r.finish = (FINISH_REASONS.get(reason, reason), pt, ct)
        elif f.type == ERROR:
            code = struct.unpack(">H", f.payload[:2])[0]
            r.error = (code, f.payload[2:].decode(errors="replace"))
        else:
            raise AssertionError(f"unexpected frame type {f.type} on stream {stream}")
    return r
