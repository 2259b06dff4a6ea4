"""KVSTATE frames on the wire, seen from a frontend written in Python (tests/lib/rpclib.py)
talking to a mocker worker whose streams export large states (--mocker-kv-bytes-per-token
131072: a state of a few hundred tokens is tens of MiB, more than the kernel buffers hold).

1. A frontend that does not announce BT_HELLO_KVSTATE in its HELLO (an older one) never receives
   a KVSTATE frame, nor the new code BT_ERR_MOVED it would not know: a stream moved off by
   POST /rebalance ends with ERROR BT_ERR_DISCONNECTED (8) alone.
2. One that announces it receives the state in pieces of at most 256 KiB, in order, covering the
   whole state, then the ERROR. The frontend reads nothing for a while after the rebalance, so the
   state backs up in the worker: TOKENS frames of another stream on the same connection must still
   come between its pieces (the worker paces the pieces behind the token frames: no head-of-line
   blocking). Written all at once, every piece would precede them.
3. The receiving side: a REQUEST announcing kv_state_bytes whose state arrived incomplete is
   served by ordinary prefill (fallback "missing"); one whose state is whole but altered is
   refused by the engine (fallback "corrupt"); either way the stream's output equals a plain
   request's.
4. Three states sent interleaved piece by piece on one connection (as a frontend relaying
   several in turns writes them), then their three REQUESTs: all three are imported (a worker
   keeping one arriving state per connection would drop all but the last).
"""

import struct
import sys
import time

import batonlib as bl
import rpclib

PIECE_MAX = 256 * 1024
BPT = 131072


def req(i):
    return {"request_id": f"kvf-{i}", "api": "completion",
            "body": {"model": "mock-model", "prompt": f"Tell me a long story number {i}", "max_tokens": 5000,
                     "stream": True}}


def main():
    with bl.deadline(60, "test_kv_frames"):
        with bl.Cluster() as c:
            w = c.start_worker(system_port=True, wait=True, mocker_kv_bytes_per_token=BPT, rebalance_endpoint=True,
                               speedup_ratio=2)

            # 1. no capability announced: no KVSTATE
            old = rpclib.Conn(w.rpc_port, hello_flags=0)
            sid = old.request(req(0))
            rpclib.read_until_tokens(old, sid, 20)
            st, _, body = bl.request("POST", w.system_url + "/rebalance?streams=1")
            assert st == 200 and b'"moved":1' in body, (st, body)
            while True:
                f = old.read()
                assert f.type != rpclib.KVSTATE, "a frontend without BT_HELLO_KVSTATE received a KVSTATE frame"
                if f.stream == sid and f.type in (rpclib.ERROR, rpclib.FINISH):
                    break
            assert f.type == rpclib.ERROR and struct.unpack(">H", f.payload[:2])[0] == 8, (f.type, f.payload)
            old.close()
            print("no HELLO_KVSTATE: the moved stream ended with ERROR 8 (DISCONNECTED) and no KVSTATE frame")

            # 2. pieces, order, completeness, and token frames of another stream between them
            new = rpclib.Conn(w.rpc_port, hello_flags=rpclib.HELLO_KVSTATE)
            a = new.request(req(1))
            rpclib.read_until_tokens(new, a, 150)
            b = new.request(req(2))
            rpclib.read_until_tokens(new, b, 5)
            st, _, body = bl.request("POST", w.system_url + "/rebalance?streams=1")
            assert st == 200 and b'"moved":1' in body, (st, body)
            time.sleep(1.0)  # read nothing: the state backs up in the worker
            moved, pieces, between, total, have = None, 0, 0, None, 0
            while True:
                f = new.read()
                if f.type == rpclib.KVSTATE:
                    t, off = struct.unpack(">QQ", f.payload[:16])
                    n = len(f.payload) - 16
                    if moved is None:
                        moved, total = f.stream, t
                    assert f.stream == moved and t == total and off == have, (f.stream, moved, t, total, off, have)
                    assert 0 < n <= PIECE_MAX, n
                    have += n
                    pieces += 1
                elif f.type == rpclib.TOKENS and moved is not None and have < total and f.stream != moved:
                    between += 1
                elif f.type == rpclib.ERROR and f.stream == moved:
                    break
                elif f.type == rpclib.ERROR:
                    raise AssertionError(f"stream {f.stream} failed before the moved one's ERROR: {f.payload!r}")
            assert struct.unpack(">H", f.payload[:2])[0] == 20
            assert have == total and total > 20 * (1 << 20), (have, total)
            assert pieces == -(-total // PIECE_MAX), (pieces, total)
            assert between > 0, "no token frame of the other stream came between the state's pieces"
            new.close()
            print(f"HELLO_KVSTATE: a state of {total} bytes in {pieces} pieces, in order, then ERROR 20; "
                  f"{between} token frames of the other stream came between its pieces")
            # 3. states that cannot be used: incomplete, altered
            plain = rpclib.Conn(w.rpc_port, hello_flags=rpclib.HELLO_KVSTATE)
            short = dict(req(3), body=dict(req(3)["body"], max_tokens=40))
            sid = plain.request(short)
            ref = rpclib.read_stream(plain, sid)
            assert ref.finish, "the plain request did not finish"
            # an exported state of this very request, taken from a rebalance of a longer run of it
            longer = dict(req(3), body=dict(req(3)["body"], max_tokens=5000))
            sid = plain.request(longer)
            rpclib.read_until_tokens(plain, sid, 10)
            st, _, body = bl.request("POST", w.system_url + "/rebalance?streams=1")
            assert st == 200 and b'"moved":1' in body, (st, body)
            state = b""
            while True:
                f = plain.read()
                if f.type == rpclib.KVSTATE and f.stream == sid:
                    state += f.payload[16:]
                elif f.type == rpclib.ERROR and f.stream == sid:
                    break
            assert len(state) > 48, len(state)

            def send_state(conn, data, total, stream):
                for off in range(0, len(data), PIECE_MAX):
                    conn.send(rpclib.KVSTATE, stream, struct.pack(">QQ", total, off) + data[off:off + PIECE_MAX])

            before = {r: bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_handoff_fallbacks_total", reason=r)
                      for r in ("missing", "corrupt")}
            # incomplete: half the state, the REQUEST claims all of it
            sid = plain.next_stream
            send_state(plain, state[:len(state) // 2], len(state), sid)
            assert plain.request(dict(short, kv_state_bytes=len(state))) == sid
            got = rpclib.read_stream(plain, sid)
            assert got.finish and got.ids == ref.ids and got.text == ref.text, "incomplete state: output differs"
            # whole but altered (one byte of the filler flipped): the checksum fails
            bad = bytearray(state)
            bad[-1] ^= 0x5A
            sid = plain.next_stream
            send_state(plain, bytes(bad), len(bad), sid)
            assert plain.request(dict(short, kv_state_bytes=len(bad))) == sid
            got = rpclib.read_stream(plain, sid)
            assert got.finish and got.ids == ref.ids and got.text == ref.text, "altered state: output differs"
            after = {r: bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_handoff_fallbacks_total", reason=r)
                     for r in ("missing", "corrupt")}
            assert after["missing"] - before["missing"] == 1 and after["corrupt"] - before["corrupt"] == 1, \
                (before, after)
            print("an incomplete state (fallback missing) and an altered one (fallback corrupt): "
                  "served by prefill, output equal to a plain request's")

            # 4. states interleaved piece by piece on one connection (a frontend relays several in
            # turns): each is kept apart by stream id and imported with its REQUEST
            imports0 = bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_handoff_imports_total")
            sids = [plain.next_stream, plain.next_stream + 1, plain.next_stream + 2]
            for off in range(0, len(state), PIECE_MAX):
                for sid in sids:
                    plain.send(rpclib.KVSTATE, sid, struct.pack(">QQ", len(state), off) + state[off:off + PIECE_MAX])
            for sid in sids:
                assert plain.request(dict(short, kv_state_bytes=len(state))) == sid
            res = {sid: rpclib.Result() for sid in sids}
            while any(r.finish is None and r.error is None for r in res.values()):
                f = plain.read()
                r = res[f.stream]
                if f.type == rpclib.TOKENS:
                    r.batches.append(rpclib.decode_tokens(f.payload))
                elif f.type == rpclib.FINISH:
                    r.finish = struct.unpack(">B3xII", f.payload)
                elif f.type == rpclib.ERROR:
                    r.error = f.payload
            for sid, got in res.items():
                assert got.finish and got.ids == ref.ids and got.text == ref.text, f"stream {sid}: output differs"
            imports = bl.metric_sum(bl.metrics(w.system_url), "baton_worker_kv_handoff_imports_total") - imports0
            assert imports == len(sids), f"{imports} of {len(sids)} interleaved states imported"
            assert -(-len(state) // PIECE_MAX) > 1, "the state fits one piece: nothing was interleaved"
            plain.close()
            print(f"{len(sids)} states interleaved piece by piece on one connection: all imported, outputs exact")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
