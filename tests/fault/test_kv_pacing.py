"""A large KV state leaving a worker does not hold up the token frames of the other streams on the
same connection, even when the reader keeps up (docs/protocol.md, "KV hand-off").

test_kv_frames shows the pacing with a reader that stops reading (the state backs up, and the
room check on the connection stops the pieces). Here the reader is fast: a frontend written in
Python (tests/lib/rpclib.py for the handshake) that takes the bytes as fast as the kernel gives
them, so the connection never fills and only the worker's own bound per loop turn lets its
engine's tokens in between the pieces. A mocker worker exports 256 KiB of state per token
(--mocker-kv-bytes-per-token 262144); two streams run 200 tokens each, then
POST /rebalance?streams=1 moves one (A) off with a state of 50+ MiB (200+ pieces). B must keep
streaming through the transfer, and the longest run of A's pieces with no token frame of B
between them must stay under LONGEST_RUN (4 turns' worth of pieces; measured: 32, in three runs).
Without the bound (src/worker/handoff.c, WK_PUMP_BURST) runs of 245 to 321 of the 407 pieces came
in one loop turn; with the states of a 7B-class model (docs/benchmarks.md, 512 KiB per token)
that is a stall of hundreds of milliseconds for every other stream.
"""

import socket
import struct
import sys

import batonlib as bl
import rpclib

BPT = 262144
PIECE_MAX = 256 * 1024
LONGEST_RUN = 64


def req(i, max_tokens):
    # max_tokens of the REQUEST payload (src/proto/request.h) bounds the stream; the body's is the client's
    return {"request_id": f"kvp-{i}", "api": "completion", "max_tokens": max_tokens,
            "body": {"model": "mock-model", "prompt": f"Tell me a long story number {i}", "max_tokens": max_tokens,
                     "stream": True}}


def frames_fast(conn, stop, timeout=20.0):
    """Reads frames as fast as the socket gives them (4 MiB at a time, payloads not kept beyond
    their first 16 bytes) until stop(type, stream) is true; returns [(type, stream, head)] in order."""
    out = []
    buf = bytearray(conn.buf)
    conn.buf = b""
    chunk = memoryview(bytearray(4 << 20))
    pos = 0
    conn.sock.settimeout(timeout)
    while True:
        while len(buf) - pos >= 4:
            n = struct.unpack_from(">I", buf, pos)[0]
            if len(buf) - pos < 4 + n:
                break
            ftype, _, _, stream = struct.unpack_from(">BBHI", buf, pos + 4)
            out.append((ftype, stream, bytes(buf[pos + 12:pos + 12 + min(16, n - 8)])))
            pos += 4 + n
            if stop(ftype, stream):
                return out
        if pos > (8 << 20):
            del buf[:pos]
            pos = 0
        k = conn.sock.recv_into(chunk)
        if k == 0:
            raise ConnectionError("the worker closed the connection")
        buf += chunk[:k]


def main():
    with bl.deadline(60, "test_kv_pacing"):
        with bl.Cluster() as c:
            w = c.start_worker(system_port=True, wait=True, mocker_kv_bytes_per_token=BPT, rebalance_endpoint=True,
                               speedup_ratio=5)
            conn = rpclib.Conn(w.rpc_port, hello_flags=rpclib.HELLO_KVSTATE)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            # two long streams, both past 200 tokens: whichever the rebalance moves has a large state
            ids = [conn.request(req(i, 20000)) for i in (1, 2)]
            for sid in ids:
                rpclib.read_until_tokens(conn, sid, 200)
            st, _, body = bl.request("POST", w.system_url + "/rebalance?streams=1")
            assert st == 200 and b'"moved":1' in body, (st, body)
            moved = []

            def given_back(t, s):
                if t == rpclib.KVSTATE and not moved:
                    moved.append(s)
                return bool(moved) and s == moved[0] and t in (rpclib.ERROR, rpclib.FINISH)

            frames = frames_fast(conn, given_back)
            a = moved[0]
            (b,) = [sid for sid in ids if sid != a]
            pieces = [f for f in frames if f[0] == rpclib.KVSTATE]
            assert all(f[1] == a for f in pieces), "pieces of two states"
            total = struct.unpack(">Q", pieces[0][2][:8])[0]
            assert frames[-1][0] == rpclib.ERROR, "the moved stream was not given back"
            assert len(pieces) == -(-total // PIECE_MAX) and len(pieces) >= 200, (len(pieces), total)
            # B ran through the whole transfer: it did not end, and it had a token frame after the last piece
            assert not any(f[1] == b and f[0] in (rpclib.FINISH, rpclib.ERROR) for f in frames), "B ended"
            run = longest = between = 0
            seen_piece = False
            for ftype, stream, _ in frames:
                if ftype == rpclib.KVSTATE:
                    seen_piece = True
                    run += 1
                    longest = max(longest, run)
                elif ftype == rpclib.TOKENS and stream == b and seen_piece:
                    between += 1
                    run = 0
            f = conn.read()
            while not (f.type == rpclib.TOKENS and f.stream == b):
                f = conn.read()
            conn.close()
            print(f"a state of {total} bytes in {len(pieces)} pieces read by a fast reader: {between} token frames "
                  f"of the other stream among them, longest run of pieces without one {longest}")
            assert between > 0, "no token frame of the other stream came during the transfer"
            assert longest <= LONGEST_RUN, \
                f"{longest} pieces of the state in a row with no token frame of the other stream between them"
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
