"""Scripted OpenAI-compatible servers for the openai engine's tests: what they share.

FakeHandler is an HTTP/1.1 request handler without an access log that answers JSON (or text) and
streams SSE events on a chunked response; a test subclasses it with the answers of its own
(do_POST, and do_GET when GET /health and GET /v1/models with one model are not enough).
serve_in_thread runs one in the test's own process; a server whose process the test kills runs it
with serve_forever in a process of its own.
"""

import http.server
import json
import threading


class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    model_id = "mock-model"  # the one model of GET /v1/models
    owned_by = "acme"  # its owned_by, which --upstream-kind auto reads (vllm, llamacpp, baton, ...)

    def log_message(self, *a):
        pass

    def read_json(self):
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")

    def send_json(self, code, obj, ctype="application/json"):
        data = (json.dumps(obj) if not isinstance(obj, str) else obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self.send_json(200, "", "text/plain")
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                             "owned_by": self.owned_by}]})
        else:
            self.send_json(404, {"error": {"message": "not found"}})

    def start_sse(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, obj):
        """One SSE event: a JSON object, or raw bytes (b"[DONE]", or a payload already encoded)."""
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunks(self):
        """The end of the chunked response."""
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def end_sse(self):
        self.chunk(b"[DONE]")
        self.end_chunks()


def serve(handler, port):
    """Serves handler on 127.0.0.1:port until the process ends (a server process of its own)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    srv.daemon_threads = True
    srv.serve_forever()


def serve_in_thread(handler):
    """Serves handler on a free port of 127.0.0.1 from a daemon thread; returns (server, base URL).
    server.shutdown() stops it."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"
