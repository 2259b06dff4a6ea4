"""TLS of the NATS connections given by flags (--nats-tls-ca, --nats-tls-cert, --nats-tls-key;
docs/security.md): the event plane and the frontend's stream journal in JetStream both take them
through the shared options builder (src/events/nats_client.h), with no SSL_CERT_FILE.

One nats-server -js that requires TLS and verifies client certificates (certificates made by
etcdlib.make_tls_certs), listening at a nats:// URL (the flags alone make the client use TLS):

  1. a frontend and a worker given the CA and the client certificate connect: the frontend says it
     journals in JetStream, both event planes connect, and the server lists the frontend's journal
     connection and the event-plane connections, each over TLS;
  2. a frontend given another CA (and the client certificate) is refused: neither its journal nor
     its event plane connects;
  3. a frontend given the right CA but no client certificate is refused by the server's
     verification likewise (so the certificate flags are what admitted the first);
  4. `baton run` passes the three flags to its frontend and its workers: all connect;
  5. start-up errors (exit 2): a CA file that does not exist, a certificate without its key.
"""

import json
import os
import re
import socket
import subprocess

import batonlib as bl
import etcdlib
import natslib

bl.deadline(150, "test_nats_tls")

# OpenSSL's default trust must not be what makes the connection work
os.environ.pop("SSL_CERT_FILE", None)
os.environ.pop("SSL_CERT_DIR", None)


# the event plane's two ways of saying that its first connect failed (nats.c reports a failed TLS
# handshake either as a server not reachable or as a refused connection it gives up on)
NOT_CONNECTED = r"NATS server nats://\S+ is not reachable yet|the client gave up on nats://"


def names_over_tls(nats):
    """{client name: TLS version} of the server's connections."""
    return {c.get("name", ""): c.get("tls_version", "") for c in nats.connz() or []}


with bl.Cluster() as c:
    certs = etcdlib.make_tls_certs(os.path.join(c.dir, "tls"))
    nats = natslib.NatsServer(c.dir, name="nats-tls", config=(
        f'tls {{ cert_file: "{certs["server_cert"]}", key_file: "{certs["server_key"]}", '
        f'ca_file: "{certs["ca"]}", verify: true }}\n'
        f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}\n')).start()
    # the server requires TLS of every client (so a connection below means TLS was used)
    with socket.create_connection(("127.0.0.1", nats.port), timeout=5) as s:
        info = s.makefile("rb").readline()
    assert info.startswith(b"INFO ") and json.loads(info[5:]).get("tls_required") is True, info

    good = dict(nats_tls_ca=certs["ca"], nats_tls_cert=certs["client_cert"], nats_tls_key=certs["client_key"])

    # -- 1. the right CA and a client certificate: journal and event planes connect over TLS
    fe = c.start_frontend(event_plane="nats", nats_server=nats.url, **good)
    fe.proc.wait_log(r"journal shared through NATS JetStream at nats://127\.0\.0\.1:\d+", timeout=15)
    fe.proc.wait_log(r"NATS connected to nats://", timeout=15)
    w = c.start_worker(event_plane="nats", nats_server=nats.url, **good)
    w.proc.wait_log(r"NATS connected to nats://", timeout=15)
    c.wait_workers(fe, 1)
    journal_name = f"baton-frontend-journal-{fe.proc.pid}"
    bl.wait_for(lambda: journal_name in names_over_tls(nats), 10, what="the journal's connection on the server")
    conns = names_over_tls(nats)
    assert all(v.startswith("1.") for v in conns.values()), f"a connection without TLS: {conns}"
    assert any(n.startswith("baton-frontend-") and n != journal_name for n in conns), conns
    assert any(n.startswith("baton-worker-") for n in conns), conns
    st, _, b = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("tls", max_tokens=5))
    assert st == 200, b
    print(f"right CA and client certificate: connected over TLS {sorted(conns)}", flush=True)

    # -- 2. another CA: the server's certificate is not trusted, nothing connects
    fo = c.start_frontend(event_plane="nats", nats_server=nats.url,
                          **dict(good, nats_tls_ca=certs["other_ca"]))
    fo.proc.wait_log(r"cannot use JetStream at nats://\S+ \(SSL Error", timeout=15)
    fo.proc.wait_log(NOT_CONNECTED, timeout=15)

    # -- 3. the right CA without a client certificate: the server's verification refuses it
    fn = c.start_frontend(event_plane="nats", nats_server=nats.url, nats_tls_ca=certs["ca"])
    fn.proc.wait_log(r"cannot use JetStream at nats://\S+ \(", timeout=15)
    fn.proc.wait_log(NOT_CONNECTED, timeout=15)
    for f in (fo, fn):
        assert "NATS connected" not in f.proc.log_text(), f"a refused frontend's event plane connected: {f.url}"
        assert not any(n.endswith(f"-{f.proc.pid}") for n in names_over_tls(nats)), names_over_tls(nats)
    print("another CA, or no client certificate: refused (journal and event plane)", flush=True)

    # -- 4. `baton run` gives the flags to its frontend and to its workers alike
    for f in (fe, fo, fn):
        f.proc.stop()
        c.frontends.remove(f)
    r = c.start_run(event_plane="nats", nats_server=nats.url, workers=1, **good)
    r.proc.wait_log(r"frontend\[\d+\]: .*journal shared through NATS JetStream", timeout=15)
    bl.wait_for(lambda: sum(n.startswith("baton-worker-") for n in names_over_tls(nats)) >= 2, 15,
                what="the worker of baton run on the TLS server")
    assert all(v.startswith("1.") for v in names_over_tls(nats).values()), names_over_tls(nats)
    r.proc.stop()
    c.runs.remove(r)
    print("baton run: frontend and worker connected over TLS with the flags", flush=True)

    # -- 5. start-up errors
    for extra, want in ((["--nats-tls-ca", os.path.join(c.dir, "no-such-ca.pem")], r"--nats-tls-ca"),
                        (["--nats-tls-ca", certs["ca"], "--nats-tls-cert", certs["client_cert"]],
                         r"--nats-tls-cert and --nats-tls-key go together")):
        p = subprocess.run([bl.baton_bin(), "frontend", "--http-port", "0", "--event-plane", "nats", "--nats-server",
                            nats.url] + extra, capture_output=True, text=True, timeout=20)
        assert p.returncode == 2 and re.search(want, p.stderr + p.stdout), (extra, p.returncode, p.stderr[-800:])
    print("test_nats_tls: ok")
