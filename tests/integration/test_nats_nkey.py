"""NATS nkey authentication of the event plane (NATS_AUTH_NKEY = a user seed "SU…"), through the
real binaries and a real nats-server that admits only one user nkey.

The key pairs are made here: ed25519 keys from the `openssl` CLI, written in the nkey text form by
natslib (checked by decoding them back, and by the server accepting the configuration and the
client that signs with the seed). Checked, in order:

  1. the server demands credentials: a client without them is refused;
  2. a frontend and a worker given the right seed connect; the server lists both under the
     configured public key; the worker's load reports are published and reach the frontend over
     the event plane;
  3. a worker given a well-formed seed of another key is refused: an error naming NATS_AUTH_NKEY
     and the server's "Authorization Violation" is logged, its event plane never connects and
     publishes nothing, the server does not list it — yet it serves over the request plane;
  4. Dynamo's priority order: with NATS_AUTH_TOKEN also set, the token is what is sent (and
     refused here), not the seed;
  5. a malformed seed stops the worker at start with an error that says what is wrong;
  6. no seed ever appears in a log.
"""

import os

import batonlib as bl
import natslib

bl.deadline(150, "test_nats_nkey")

WORKER = dict(speedup_ratio=8, num_gpu_blocks_override=64, block_size=16)


def worker_metric(w, name, **labels):
    return bl.metric_sum(bl.metrics(w.system_url), name, **labels)


def fe_reports(fe, wid, source):
    return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_load_reports_total", worker_id=format(wid, "x"),
                         source=source)


def flip(key, i):
    """key with its i-th character changed (not the last: its low bits are padding)."""
    return key[:i] + ("A" if key[i] != "A" else "B") + key[i + 1:]


def self_checks(seed, pub):
    """The nkey decoder used to vouch for the generated keys must reject doctored ones."""
    for bad in (flip(seed, 30), flip(seed, 10), flip(pub, 40),  # checksum
                natslib.encode([natslib.PREFIX_SEED, 0], natslib.decode(seed)[1]),  # an account seed
                natslib.encode([0], natslib.decode(pub)[1])):  # an account public key
        try:
            natslib.decode(bad)
        except ValueError:
            continue
        raise AssertionError(f"natslib.decode accepted {bad!r}")


with bl.Cluster() as c:
    seed, pub = natslib.user_nkey(c.dir, "user")
    other_seed, other_pub = natslib.user_nkey(c.dir, "other")
    assert seed.startswith("SU") and len(seed) == 58 and pub.startswith("U") and len(pub) == 56, (seed, pub)
    assert other_pub != pub
    self_checks(seed, pub)
    ns = natslib.NatsServer(c.dir, config='authorization { users = [ { nkey: "%s" } ] }' % pub).start()
    plane = dict(event_plane="nats", nats_server=ns.url)

    # --- 1. the server refuses a client without credentials
    reply = natslib.raw_connect(ns.port)
    assert reply.startswith(b"-ERR") and b"Authorization Violation" in reply, reply
    print("server demands credentials")

    # --- 2. the right seed: connected, listed under the public key, events flow
    env = {"NATS_AUTH_NKEY": seed}
    fe = c.start_frontend(env=env, **plane)
    w1 = c.start_worker(env=env, system_port=True, wait=True, **WORKER, **plane)
    (inst,) = c.wait_workers(fe, 1)
    wid1 = inst["instance_id"]
    bl.wait_for(lambda: bl.metric_sum(bl.metrics(fe.url), "baton_frontend_event_plane_connected", plane="nats") == 1,
                20, what="frontend connected to NATS with the nkey")
    bl.wait_for(lambda: worker_metric(w1, "baton_worker_event_plane_connected", plane="nats") == 1, 20,
                what="worker connected to NATS with the nkey")
    w1.proc.wait_log(r"NATS connected to nats://127\.0\.0\.1:\d+ \(publishing on namespace\.dynamo\.kv_metrics\)", 10)
    clients = ns.clients()
    fe_names = [n for n in clients if n.startswith("baton-frontend-")]
    assert len(fe_names) == 1 and clients[fe_names[0]] == pub, clients
    assert clients.get(f"baton-worker-{wid1:x}") == pub, clients
    before = fe_reports(fe, wid1, "event_plane")
    for i in range(3):
        s = bl.stream_chat(fe.url, bl.chat_body(f"nkey {i}", max_tokens=40)).assert_ok(f"stream {i}")
    bl.wait_for(lambda: fe_reports(fe, wid1, "event_plane") > before, 15,
                what="load reports of the worker reaching the frontend over NATS")
    assert worker_metric(w1, "baton_worker_event_plane_load_reports_total", result="published") > 0
    assert worker_metric(w1, "baton_worker_event_plane_load_reports_total", result="dropped") == 0
    print(f"right seed: frontend and worker connected as {pub[:8]}…, {fe_reports(fe, wid1, 'event_plane'):.0f} "
          "reports over NATS")

    # --- 3. a seed the server does not know: refused, error logged, never connected, still serving
    w2 = c.start_worker(env={"NATS_AUTH_NKEY": other_seed}, system_port=True, wait=True, **WORKER, **plane)
    # (the first connect's own error line, "refused this client's credentials (NATS_AUTH_NKEY:
    # Authorization Violation)", races with nats.c's reconnect thread; the give-up line does not)
    w2.proc.wait_log(r"ERROR .*the client gave up on nats://127\.0\.0\.1:\d+ .*after the server refused its "
                     r"credentials \(NATS_AUTH_NKEY\)", 15)
    insts = c.wait_workers(fe, 2)
    wid2 = next(i["instance_id"] for i in insts if i["instance_id"] != wid1)
    with open(ns.log) as f:
        assert f"authentication error - Nkey \"{other_pub}\"" in f.read(), "nats-server did not see the other key"
    for i in range(4):
        bl.stream_chat(fe.url, bl.chat_body(f"other {i}", max_tokens=20)).assert_ok(f"stream {i} with two workers")
    bl.wait_for(lambda: fe_reports(fe, wid2, "request_plane") > 0, 15, what="the refused worker serving")
    m2 = bl.metrics(w2.system_url)
    assert bl.metric_sum(m2, "baton_worker_event_plane_connected", plane="nats") == 0, "refused worker connected"
    assert bl.metric_sum(m2, "baton_worker_event_plane_connects_total") == 0
    assert bl.metric_sum(m2, "baton_worker_event_plane_load_reports_total", result="published") == 0
    assert fe_reports(fe, wid2, "event_plane") == 0, "event-plane reports from the refused worker"
    assert f"baton-worker-{wid2:x}" not in ns.clients(), ns.clients()
    print("other seed: refused, logged, not connected, still serving")

    # --- 4. priority: a token comes before the seed (the right seed would have been admitted)
    w3 = c.start_worker(env={"NATS_AUTH_NKEY": seed, "NATS_AUTH_TOKEN": "not-the-token"}, system_port=True,
                        wait=True, **WORKER, **plane)
    w3.proc.wait_log(r"ERROR .*the client gave up on .*after the server refused its credentials \(NATS_AUTH_TOKEN\)",
                     15)
    m3 = bl.metrics(w3.system_url)
    assert bl.metric_sum(m3, "baton_worker_event_plane_connects_total") == 0, "connected with the seed, not the token"
    assert "NATS connected" not in w3.proc.log_text()
    w3.proc.stop()
    print("token before nkey: the token is used")

    # --- 5. a malformed seed stops the worker with a clear error
    broken = flip(seed, 30)
    w4 = c.start_worker(env={"NATS_AUTH_NKEY": broken}, **WORKER, **plane)
    rc = w4.proc.wait(15)
    assert rc == 2, f"a worker with a malformed seed must stop with exit code 2 (a configuration error): {rc}"
    log4 = w4.proc.log_text()
    assert "event plane: NATS_AUTH_NKEY: not an nkey seed: the checksum does not match" in log4, log4
    assert "NATS connected" not in log4, log4
    w5 = c.start_worker(env={"NATS_AUTH_NKEY": pub}, **WORKER, **plane)
    assert w5.proc.wait(15) == 2
    assert "NATS_AUTH_NKEY: this is a user public key" in w5.proc.log_text(), w5.proc.log_text()
    print("malformed seeds: refused at start")

    # --- 6. no secret in any log; the connected ones still are
    for p in c.procs():
        text = p.log_text()
        for secret in (seed, other_seed, broken):
            assert secret not in text, f"{p.name} logged a seed"
    assert ns.clients().get(f"baton-worker-{wid1:x}") == pub, ns.clients()
    for w in (w1, w2):
        w.proc.stop()
print("test_nats_nkey: ok")
