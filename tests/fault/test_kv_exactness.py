"""A KV state is checked against the same exactness fingerprint the frontend routes by
(docs/engines.md §3.4: llama.cpp version, CPU variant, --llama-threads, ubatch, flash attention,
model file): one identity of a worker's numerics, not two.

Raw request-plane clients (tests/lib/rpclib.py) against llama workers, --llama-ubatch 1:
X (--llama-threads 2) and Y (--llama-threads 1) export states by POST /rebalance; R (--llama-threads 1)
receives them as continuations (no `exactness` field in the REQUEST: that is the frontend's check,
which would refuse the continuation before any state is sent; this tests the state's own check).

1. Y's state (same fingerprint as R): imported on R (imports +1, no prefill), the output equals
   a plain continuation on R of the same carried tokens.
2. X's state (same model, backend devices and KV layout; only the thread count differs, which the
   old device-list identity did not see): refused with fallback "mismatch", prefilled, the output
   equals the same plain continuation.
"""

import json
import struct
import sys

import batonlib as bl
import faultlib as fl
import rpclib

PIECE_MAX = 256 * 1024


def req(rid, carried=None, max_tokens=400, body_max=400, **extra):
    p = {"request_id": rid, "api": "completion",
         "body": {"model": "mock-model", "prompt": "Once upon a time, a state travelled", "max_tokens": body_max,
                  "temperature": 0, "stream": True},
         "max_tokens": max_tokens}
    if carried:
        p["carried"] = carried
    p.update(extra)
    return p


def export_state(w):
    """A stream on w, moved off after >= 40 tokens: (its delivered ids, its state)."""
    conn = rpclib.Conn(w.rpc_port, hello_flags=rpclib.HELLO_KVSTATE)
    # long enough to be still running when the rebalance comes, however fast the engine is
    sid = conn.request(req("src", max_tokens=1800, body_max=1800))
    r = rpclib.read_stream(conn, sid, until_batches=40)
    st, _, body = bl.request("POST", w.system_url + "/rebalance?streams=1")
    assert st == 200 and json.loads(body)["moved"] == 1, (st, body)
    state = b""
    while True:
        f = conn.read()
        assert f.stream == sid, f.stream
        if f.type == rpclib.TOKENS:
            r.batches.append(rpclib.decode_tokens(f.payload))
        elif f.type == rpclib.KVSTATE:
            state += f.payload[16:]
        elif f.type == rpclib.ERROR:
            break
    conn.close()
    assert len(r.ids) >= 40 and len(state) > 1000, (len(r.ids), len(state))
    return r.ids, state


def continue_on(w, carried, state=None):
    conn = rpclib.Conn(w.rpc_port, hello_flags=rpclib.HELLO_KVSTATE)
    sid = conn.next_stream
    extra = {}
    if state is not None:
        for off in range(0, len(state), PIECE_MAX):
            conn.send(rpclib.KVSTATE, sid, struct.pack(">QQ", len(state), off) + state[off:off + PIECE_MAX])
        extra["kv_state_bytes"] = len(state)
    assert conn.request(req("cont", carried, max_tokens=30, **extra)) == sid
    r = rpclib.read_stream(conn, sid)
    conn.close()
    assert r.finish, f"the continuation did not finish: {r.error}"
    return r


def main():
    if fl.skip("llama") is not None:
        return 77
    with bl.deadline(90, "test_kv_exactness"):
        with bl.Cluster() as c:
            def llama(threads, **flags):
                return c.start_worker(engine="llama", llama_ubatch=1, llama_threads=threads, system_port=True,
                                      wait=True, **flags)
            x, y, r = llama(2, rebalance_endpoint=True), llama(1, rebalance_endpoint=True), llama(1)
            fps = {n: w.proc.wait_log(r'exactness fingerprint "([^"]+)"').group(1)
                   for n, w in (("x", x), ("y", y), ("r", r))}
            assert fps["y"] == fps["r"] != fps["x"], fps

            ids_y, state_y = export_state(y)
            ids_x, state_x = export_state(x)
            ref_y, ref_x = continue_on(r, ids_y), continue_on(r, ids_x)  # plain continuations on R

            before = fl.kv_counters(r)
            got = continue_on(r, ids_y, state_y)
            mid = fl.kv_counters(r)
            assert got.ids == ref_y.ids and got.text == ref_y.text, "continuation from Y's state differs"
            assert mid["imports"] - before["imports"] == 1 and mid["prefill"] == before["prefill"], (before, mid)
            print(f"same fingerprint: Y's state of {len(state_y)} bytes imported on R, no prefill, output exact")

            got = continue_on(r, ids_x, state_x)
            after = fl.kv_counters(r)
            assert got.ids == ref_x.ids and got.text == ref_x.text, "continuation after X's refused state differs"
            assert after["fallbacks"]["mismatch"] - mid["fallbacks"]["mismatch"] == 1, (mid, after)
            assert after["imports"] == mid["imports"] and after["prefill"] > mid["prefill"], (mid, after)
            print(f"--llama-threads 2 vs 1: X's state refused (mismatch), prefilled, output exact ({fps['x']!r} vs "
                  f"{fps['r']!r})")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
