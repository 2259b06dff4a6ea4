"""etcdlib — pieces shared by the etcd discovery tests and bench/etcd_discovery.py.

Standard library only, on top of batonlib (whose Etcd class starts the real servers):
  * Proxy: a TCP forwarder that a test can cut like a network partition (connections are accepted
    and held, nothing answers) and restore, to cut one process off from etcd and no one else;
  * Load: steady streaming traffic on background threads, every stream checked against a
    fault-free reference (check_results, which self_check() proves can fail);
  * small helpers to name a worker's discovery key and wait for keys to come and go;
  * TLS: make_tls_certs() writes a CA, a server and a client certificate with the openssl CLI,
    and TlsEtcd is an Etcd whose client URLs are https:// and that requires client certificates.
"""

import os
import re
import select
import socket
import subprocess
import threading
import time

import batonlib as bl

PREFIX = "v1/instances/dynamo/"


# ---------------------------------------------------------------------------------------------
# A partition you can switch.


class Proxy:
    """127.0.0.1:<port> forwarding to 127.0.0.1:<target_port>.

    cut(): from now on nothing is forwarded either way, on open connections and on new ones (which
    are accepted, then held) — to the client, etcd simply stops answering, as behind a partition.
    restore(): every held connection is closed and forwarding resumes for new ones."""

    def __init__(self, target_port):
        self.target = target_port
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(128)
        self.port = self.lsock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.blocked = threading.Event()
        self.lock = threading.Lock()
        self.pairs = []
        self.accepted = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            pair = {"socks": [c], "dead": False}
            with self.lock:
                self.pairs.append(pair)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(pair, c), daemon=True).start()

    def _serve(self, pair, c):
        while self.blocked.is_set() and not pair["dead"]:
            time.sleep(0.05)
        if pair["dead"]:
            return
        try:
            s = socket.create_connection(("127.0.0.1", self.target), timeout=2)
        except OSError:
            self._kill(pair)
            return
        pair["socks"].append(s)
        if pair["dead"]:
            self._kill(pair)
            return
        threading.Thread(target=self._pump, args=(pair, c, s), daemon=True).start()
        self._pump(pair, s, c)

    def _pump(self, pair, a, b):
        while not pair["dead"]:
            if self.blocked.is_set():
                time.sleep(0.05)
                continue
            try:
                r, _, _ = select.select([a], [], [], 0.1)
                if not r:
                    continue
                data = a.recv(65536)
                if not data:
                    break
                while self.blocked.is_set() and not pair["dead"]:  # cut while we were reading: hold it
                    time.sleep(0.05)
                if pair["dead"]:
                    break
                b.sendall(data)
            except (OSError, ValueError):
                break
        self._kill(pair)

    def _kill(self, pair):
        pair["dead"] = True
        for s in pair["socks"]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def cut(self):
        self.blocked.set()

    def restore(self):
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for p in pairs:
            self._kill(p)
        self.blocked.clear()

    def close(self):
        self.closed = True
        self.restore()
        self.lsock.close()


# ---------------------------------------------------------------------------------------------
# Traffic with an oracle.

PROMPTS = [f"etcd discovery prompt {i}" for i in range(6)]
MAX_TOKENS = 24


def body(prompt):
    return bl.chat_body(prompt, max_tokens=MAX_TOKENS, return_token_ids=True)


def references(fe):
    """Fault-free token ids of every prompt, from non-streamed requests."""
    refs = {}
    for p in PROMPTS:
        st, _, b = bl.post_json(fe.url + "/v1/chat/completions", body(p))
        assert st == 200, (st, b)
        refs[p] = b["choices"][0]["token_ids"]
        assert len(refs[p]) == MAX_TOKENS, refs[p]
    return refs


def check_results(results, refs, min_count=1, what="load"):
    """Every (prompt, stream) completed and equals its reference byte for byte; at least
    min_count of them. AssertionError listing the first failures otherwise."""
    bad = []
    for prompt, s in results:
        if not s.ok:
            bad.append(f"{prompt!r}: {s.summary()}")
        elif s.token_ids != refs[prompt]:
            bad.append(f"{prompt!r}: token ids differ from the reference: {s.token_ids} != {refs[prompt]}")
    assert not bad, f"{what}: {len(bad)} of {len(results)} streams failed or differ; first: " + "; ".join(bad[:3])
    assert len(results) >= min_count, f"{what}: only {len(results)} streams ran (wanted >= {min_count})"


def self_check():
    """check_results must reject a broken run: an error, a cut stream, a different token, too few."""
    refs = {"p": [1, 2, 3]}

    def fake(ok=True, ids=(1, 2, 3)):
        s = bl.Stream()
        s.status, s.done, s.finish_reason, s.token_ids = 200, ok, "length" if ok else None, list(ids)
        if not ok:
            s.closed_early = True
        return s

    check_results([("p", fake())], refs)
    for broken, why in (([("p", fake(ok=False))], "a cut stream"), ([("p", fake(ids=(1, 2, 4)))], "a wrong token"),
                        ([("p", fake()), ("p", fake(ids=(1, 2)))], "a short stream"), ([], "no streams")):
        try:
            check_results(broken, refs, min_count=1)
        except AssertionError:
            continue
        raise AssertionError(f"check_results accepted {why}")


class Load:
    """`concurrency` threads streaming chat requests to the frontend back to back until stop();
    stop() returns every (prompt, Stream) so that check_results can judge them."""

    def __init__(self, fe, concurrency=4, timeout=60.0):
        self.fe = fe
        self.timeout = timeout
        self.results = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)]
        for t in self.threads:
            t.start()

    def _run(self, i):
        n = i
        while not self.stopping.is_set():
            p = PROMPTS[n % len(PROMPTS)]
            n += 1
            s = bl.stream_chat(self.fe.url, body(p), timeout=self.timeout)
            with self.lock:
                self.results.append((p, s))

    def count(self):
        with self.lock:
            return len(self.results)

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(self.timeout + 10)
        with self.lock:
            return list(self.results)


# ---------------------------------------------------------------------------------------------
# Workers and their keys.


def worker_id(w, timeout=20.0):
    """The instance id (hex) a worker logged at start."""
    m = w.proc.wait_log(r"worker ([0-9a-f]+) serving model", timeout=timeout)
    return m.group(1)


def key_of(wid):
    return f"{PREFIX}backend/generate/{wid}"


def wait_keys(etcd, pred, timeout, what, members=None):
    """Polls etcd's keys under PREFIX until pred(keys) holds; returns the keys ({key: (value,
    lease)}). Members that cannot answer count as 'not yet'."""
    return bl.wait_for(lambda: (lambda k: k if pred(k) else None)(etcd.get_prefix(PREFIX, members=members)),
                       timeout, interval=0.1, what=what)


def health_ids(fe):
    """Instance ids (hex) the frontend's /health lists."""
    st, _, b = bl.get_json(fe.url + "/health", timeout=5)
    assert st == 200, (st, b)
    return sorted(format(i["instance_id"], "x") for i in b["instances"])


def wait_health(fe, want, timeout, what=None):
    want = sorted(want)
    return bl.wait_for(lambda: health_ids(fe) == want, timeout, interval=0.1,
                       what=what or f"{fe.url}/health to list exactly {want}")


def log_has(proc, pattern):
    return re.search(pattern, proc.log_text()) is not None


def routed(fe, wid):
    """How many requests the frontend routed to worker wid."""
    return bl.metric_sum(bl.metrics(fe.url), "baton_frontend_worker_routed_total", worker_id=wid)


# ---------------------------------------------------------------------------------------------
# TLS.


def _openssl(*args, cwd):
    r = subprocess.run(["openssl"] + list(args), cwd=cwd, capture_output=True, timeout=30)
    if r.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed ({r.returncode}): "
                             f"{r.stderr.decode('utf-8', 'replace').strip()}")


def make_tls_certs(dir):
    """Writes into `dir`, with the openssl CLI: a CA (ca.pem), a server certificate for 127.0.0.1
    (server.pem / server.key, subjectAltName IP:127.0.0.1) and a client certificate (client.pem /
    client.key), both signed by the CA, and a second CA (other-ca.pem) that signed neither.
    The server certificate may also serve as a client one: etcd's JSON gateway dials etcd's own
    gRPC port with it when --client-cert-auth is on. Returns {name: path}."""
    os.makedirs(dir, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN=baton test {ca}", cwd=dir)
    exts = {"server": "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
            "client": "extendedKeyUsage=clientAuth\n"}
    for name, ext in exts.items():
        with open(os.path.join(dir, f"{name}.ext"), "w") as f:
            f.write(ext)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                 "/CN=127.0.0.1" if name == "server" else "/CN=baton-client", cwd=dir)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=dir)
    return {n: os.path.join(dir, f) for n, f in (("ca", "ca.pem"), ("other_ca", "other-ca.pem"),
                                                 ("server_cert", "server.pem"), ("server_key", "server.key"),
                                                 ("client_cert", "client.pem"), ("client_key", "client.key"))}


class TlsEtcd(bl.Etcd):
    """An Etcd whose client URLs are https:// with the server certificate of make_tls_certs(),
    requiring a client certificate signed by its CA (--client-cert-auth). etcdctl is run with the
    client certificate. Peers stay on plain http (loopback)."""

    def __init__(self, certs, n=1, **kw):
        super().__init__(n, **kw)
        self.certs = certs
        self.scheme = "https"
        self.extra += ["--cert-file", certs["server_cert"], "--key-file", certs["server_key"],
                       "--trusted-ca-file", certs["ca"], "--client-cert-auth"]
        self.ctl_args = ["--cacert", certs["ca"], "--cert", certs["client_cert"], "--key", certs["client_key"]]

    def tls_env(self, client_cert=True):
        """The environment that points baton at this etcd's CA (and, with client_cert, at the
        client certificate and key)."""
        env = {"ETCD_AUTH_CA": self.certs["ca"]}
        if client_cert:
            env.update(ETCD_AUTH_CLIENT_CERT=self.certs["client_cert"], ETCD_AUTH_CLIENT_KEY=self.certs["client_key"])
        return env
