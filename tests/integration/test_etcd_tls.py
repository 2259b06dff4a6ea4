"""Discovery over etcd with TLS and client certificates (ETCD_AUTH_CA, ETCD_AUTH_CLIENT_CERT,
ETCD_AUTH_CLIENT_KEY and their flags --etcd-ca, --etcd-client-cert, --etcd-client-key).

A real etcd serves its clients on https:// only, with a server certificate for 127.0.0.1 and
--client-cert-auth; the CA and the certificates are made here with the openssl CLI
(etcdlib.make_tls_certs):
  * a frontend (files given as flags) and a worker (files given as environment variables) with the
    client certificate register, see each other, and serve chat completions end to end, streamed
    and not, byte for byte alike; SIGTERM revokes the lease over TLS (the key goes at once);
  * a worker without a client certificate, and one that trusts another CA, never register: they
    stay up, retrying, and log why (etcd's TLS alert; libcurl's verification failure);
   * start-up errors, exit code 2 (a setting to fix) and a message naming the variable: a CA file that does not exist,
    a directory given as a certificate, a certificate without its key.
"""

import os
import signal
import time

import batonlib as bl
import etcdlib as el

bl.deadline(150, "test_etcd_tls")
el.self_check()

TTL = 3
WORKER = dict(discovery="etcd", discovery_ttl=TTL, speedup_ratio=50)
NO_CERT = "tls: client didn't provide a certificate"  # etcd's log line for a refused client


def phase_serving(c, etcd):
    """With the client certificate: registered, routed, served; SIGTERM revokes over TLS."""
    tls = etcd.tls_env()
    fe = c.start_frontend(discovery="etcd", etcd_endpoints=etcd.endpoints, etcd_ca=tls["ETCD_AUTH_CA"],
                          etcd_client_cert=tls["ETCD_AUTH_CLIENT_CERT"], etcd_client_key=tls["ETCD_AUTH_CLIENT_KEY"])
    w = c.start_worker(etcd_endpoints=etcd.endpoints, env=tls, **WORKER)
    wid = el.worker_id(w)
    el.wait_health(fe, [wid], 20, "the frontend to see the worker through etcd over TLS")
    w.proc.wait_log(r"etcd: registered " + el.key_of(wid), timeout=5)
    keys = etcd.get_prefix(el.PREFIX)
    assert sorted(keys) == [el.key_of(wid)], keys
    assert keys[el.key_of(wid)][1] != 0, "the key was written without a lease"
    for p in (fe.proc, w.proc):
        assert el.log_has(p, r"discovery\(etcd\): endpoints https://127\.0\.0\.1:\d+, .*CA " +
                          etcd.certs["ca"]), p.log_tail()
        assert el.log_has(p, r"TLS client certificate " + etcd.certs["client_cert"]), p.log_tail()
    refs = el.references(fe)
    for p in el.PROMPTS[:3]:
        s = bl.stream_chat(fe.url, el.body(p), timeout=30)
        el.check_results([(p, s)], refs, what="streamed over TLS discovery")
        assert s.text and s.finish_reason == "length", (s.text, s.finish_reason)
    return fe, w, wid


def phase_refused(c, etcd, fe, wid):
    """No client certificate, or the wrong CA: no registration, an error in the log, no exit."""
    refusals = etcd.procs[0].log_text().count(NO_CERT)
    nocert = c.start_worker(etcd_endpoints=etcd.endpoints, env=etcd.tls_env(client_cert=False), **WORKER)
    wrongca = c.start_worker(etcd_endpoints=etcd.endpoints, env=dict(etcd.tls_env(),
                                                                     ETCD_AUTH_CA=etcd.certs["other_ca"]), **WORKER)
    nid, xid = el.worker_id(nocert), el.worker_id(wrongca)
    nocert.proc.wait_log(r"WARN .*etcd: lease grant via https://127\.0\.0\.1:\d+ failed \(.+\); retrying", timeout=10)
    # With TLS 1.3 etcd refuses after the handshake, so libcurl's reason varies from one attempt to
    # the next (the alert, or only the closed connection); etcd's own log says why.
    bl.wait_for(lambda: etcd.procs[0].log_text().count(NO_CERT) > refusals, 5,
                what=f"etcd to log {NO_CERT!r} for the worker without a certificate")
    m = wrongca.proc.wait_log(r"etcd: lease grant via https://127\.0\.0\.1:\d+ failed \((.*)\)", timeout=10)
    assert "certificate" in m.group(1), f"not a certificate verification failure: {m.group(1)}"
    time.sleep(TTL + 1)  # several retries' worth
    for w, i in ((nocert, nid), (wrongca, xid)):
        assert w.proc.alive(), f"worker {i} exited with {w.proc.returncode}: {w.proc.log_tail()}"
        assert not el.log_has(w.proc, r"etcd: registered "), w.proc.log_tail()
    assert sorted(etcd.get_prefix(el.PREFIX)) == [el.key_of(wid)], "a worker without valid TLS registered"
    assert el.health_ids(fe) == [wid]
    for w in (nocert, wrongca):
        w.proc.kill(signal.SIGTERM)
        assert w.proc.wait(15) == 0, f"exit {w.proc.returncode}"


def phase_sigterm(etcd, fe, w, wid):
    t0 = time.monotonic()
    w.proc.kill(signal.SIGTERM)
    # not el.wait_keys: with no key left, its result ({}) would read as "not yet"
    bl.wait_for(lambda: el.key_of(wid) not in etcd.get_prefix(el.PREFIX), 2.0, interval=0.05,
                what="the SIGTERMed worker's key to go at once")
    print(f"TLS: SIGTERM, key deleted {time.monotonic() - t0:.3f} s after the signal (TTL {TTL} s)")
    assert w.proc.wait(10) == 0, f"worker exited with {w.proc.returncode}"
    assert el.log_has(w.proc, r"etcd: lease [0-9a-f]+ revoked"), w.proc.log_tail()
    el.wait_health(fe, [], 5)


def phase_startup_errors(c, etcd, certdir):
    """Unusable TLS settings stop the process at start-up with a message that names them."""
    missing = os.path.join(certdir, "no-such-ca.pem")
    cases = [
        ("worker", dict(etcd.tls_env(), ETCD_AUTH_CA=missing),
         r"ETCD_AUTH_CA \(--etcd-ca\) '" + missing + r"' cannot be read: No such file or directory"),
        ("worker", dict(etcd.tls_env(), ETCD_AUTH_CLIENT_CERT=certdir),
         r"ETCD_AUTH_CLIENT_CERT \(--etcd-client-cert\) '" + certdir + r"' cannot be read: Is a directory"),
        ("worker", {"ETCD_AUTH_CLIENT_CERT": etcd.certs["client_cert"]},
         r"etcd client TLS needs both a certificate and its key: ETCD_AUTH_CLIENT_KEY \(--etcd-client-key\) is not set"),
        ("frontend", dict(etcd.tls_env(), ETCD_AUTH_CLIENT_KEY=missing),
         r"ETCD_AUTH_CLIENT_KEY \(--etcd-client-key\) '" + missing + r"' cannot be read"),
    ]
    failed = set()
    for role, env, pattern in cases:
        if role == "worker":
            p = c.start_worker(etcd_endpoints=etcd.endpoints, env=env, **WORKER).proc
        else:
            p = c.start_frontend(discovery="etcd", etcd_endpoints=etcd.endpoints, env=env, wait=False).proc
        rc = p.wait(15)
        assert rc == 2, f"{role} with {env}: exit {rc}, expected 2; log:\n{p.log_tail()}"
        p.wait_log(r"discovery: " + pattern, timeout=1)
        failed.add(p.name)
    return failed


with bl.Cluster() as c:
    certdir = os.path.join(c.dir, "certs")
    certs = el.make_tls_certs(certdir)
    etcd = el.TlsEtcd(certs, name="tls").start()
    assert etcd.endpoints.startswith("https://127.0.0.1:"), etcd.endpoints
    fe, w, wid = phase_serving(c, etcd)
    phase_refused(c, etcd, fe, wid)
    phase_sigterm(etcd, fe, w, wid)
    failed = phase_startup_errors(c, etcd, certdir)
    codes = c.close()
    etcd.stop()
    bad = {k: v for k, v in codes.items() if v != (2 if k in failed else 0)}
    assert not bad, f"processes exited badly: {bad}"
print("test_etcd_tls: OK")
