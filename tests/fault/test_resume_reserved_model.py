"""A stream resumed from the shared journal is held to the model-name rule of discovery
(docs/fault-tolerance.md, "Frontend failover"): a record naming a reserved model ("unknown", the
label of requests for models no worker serves) is refused with a 404, and never creates that model.

nats-server -js, one mocker worker, one frontend whose journal is shared through JetStream. A raw
NATS subscriber copies what the frontend publishes for a stream its client cut after 5 events, and
publishes the same record under two new stream ids, as another frontend of the namespace would:
one as it was, one naming the model "unknown" (a record of an older build). The first resumes and
completes the answer exactly (the copy is a record the frontend reads back); the second is refused
with 404 stream_not_found saying the name is reserved. Before, it created a model "unknown" and
sent the request there."""

import os
import secrets
import socket
import threading
import time

import batonlib as bl
import natslib

bl.deadline(120, "test_resume_reserved_model")

BODY = bl.chat_body("a record of another frontend", max_tokens=40, return_token_ids=True, seed=3, temperature=0.7)
PREFIX = "baton.journal.dynamo"


class Tap:
    """A core NATS client: subscribes to the journal's subjects and keeps every message by subject."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.f = self.s.makefile("rb")
        assert self.f.readline().startswith(b"INFO ")
        self.s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"tap"}\r\nSUB ' + PREFIX.encode() +
                       b".> 1\r\nPING\r\n")
        self.msgs = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.ready.wait(10), "no PONG from nats-server"

    def _read(self):
        try:
            while True:
                line = self.f.readline()
                if not line:
                    return
                if line.startswith(b"PONG"):
                    self.ready.set()
                elif line.startswith(b"PING"):
                    self.s.sendall(b"PONG\r\n")
                elif line.startswith(b"MSG "):
                    parts = line.split()
                    data = self.f.read(int(parts[-1]) + 2)[:-2]
                    with self.lock:
                        self.msgs.setdefault(parts[1].decode(), []).append(data)
        except OSError:
            return

    def of(self, subject):
        with self.lock:
            return list(self.msgs.get(subject, []))

    def publish(self, subject, data):
        self.s.sendall(f"PUB {subject} {len(data)}\r\n".encode() + data + b"\r\nPING\r\n")

    def close(self):
        self.s.close()


with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, name="nats-js", config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}'
                              ).start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    c.start_worker(**plane)
    fe = c.start_frontend(**plane)
    fe.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
    c.wait_workers(fe, 1)
    tap = Tap(nats.port)
    try:
        ref = bl.stream_chat(fe.url, BODY, timeout=30).assert_ok("reference")
        cut = bl.stream_chat(fe.url, BODY, abort_after=5, timeout=30)
        assert cut.aborted and cut.last_event_id, cut.summary()
        sid, pos = cut.last_event_id.split(":")[:2]
        subject = f"{PREFIX}.{sid}"
        # the record is closed (unfinished) once the frontend saw its client leave
        bl.wait_for(lambda: any(b'"close"' in m for m in tap.of(subject)), 10, what="the cut stream's close published")
        record = tap.of(subject)
        assert any(b'"model":"mock-model"' in m for m in record), record

        def copy(model):
            new = secrets.token_hex(16)
            for m in record:
                tap.publish(f"{PREFIX}.{new}", m.replace(b'"model":"mock-model"', b'"model":"' + model + b'"'))
            return new

        same, reserved = copy(b"mock-model"), copy(b"unknown")
        time.sleep(0.5)  # stored by JetStream (a core publish: no acknowledgement)

        rest = bl.stream_chat(fe.url, BODY, headers={"Last-Event-ID": f"{same}:{pos}"}, timeout=30)
        rest.assert_ok("the copied record, resumed")
        assert cut.token_ids + rest.token_ids == ref.token_ids and cut.text + rest.text == ref.text, rest.summary()

        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", dict(BODY, stream=True), timeout=30,
                                headers={"Last-Event-ID": f"{reserved}:{pos}"})
        assert st == 404 and b["error"]["code"] == "stream_not_found", (st, b)
        assert "reserved" in b["error"]["message"], b
        st, _, b = bl.get_json(fe.url + "/v1/models")
        assert [m["id"] for m in b["data"]] == ["mock-model"], b
        assert fe.proc.alive()
        print(f"a journal record naming the model 'unknown' is refused (404); the same record as it was resumed "
              f"exactly after {pos}")
    finally:
        tap.close()

print("test_resume_reserved_model: OK")
