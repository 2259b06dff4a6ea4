"""observe — what the tool reads from the system under test: Prometheus gauges and counters of
frontends and workers, process state and open descriptors from /proc, and port reachability.

Endpoints are the frontend's /metrics and each worker's status server /metrics (DYN_SYSTEM_PORT).
A Sampler polls them during a run (for the timeline and the migration count, which must survive a
frontend being killed); snapshot() reads the gauges that must return to baseline after a fault.
"""

import http.client
import os
import socket
import threading
import time
import urllib.parse

from .util import batonlib

# gauges that must return to their pre-fault value, by role
FRONTEND_GAUGES = {
    "inflight": ("dynamo_frontend_inflight_requests", {}),
    "http_connections": ("baton_frontend_http_connections", {}),
    "worker_streams": ("baton_frontend_worker_inflight", {}),
    "routable_workers": ("baton_frontend_workers", {"state": "routable"}),
}
WORKER_GAUGES = {
    "active_sequences": ("baton_worker_active_sequences", {}),
    "kv_active_blocks": ("baton_worker_kv_active_blocks", {}),
    "inflight": ("dynamo_component_inflight_requests", {}),
    "frontend_connections": ("baton_worker_frontend_connections", {}),
}
# counters the report and the checks use
FRONTEND_COUNTERS = {
    "migrations": ("dynamo_frontend_model_migration_total", {}),
    "migrations_exhausted": ("dynamo_frontend_model_migration_exhausted_total", {}),
    "migrations_unserved": ("baton_frontend_model_migration_unserved_total", {}),
    "migration_limit": ("dynamo_frontend_model_migration_limit", {}),
    "disconnected_clients": ("dynamo_frontend_disconnected_clients", {}),
    "cancellations": ("dynamo_frontend_model_cancellation_total", {}),
    "output_tokens": ("dynamo_frontend_output_tokens_total", {}),
    "resumes": ("baton_frontend_stream_resumes_total", {}),
}
WORKER_COUNTERS = {
    "tokens": ("dynamo_component_tokens_total", {}),
    "kills": ("dynamo_component_cancellation_total", {"kind": "kill"}),
    "handed_back": ("baton_worker_handed_back_total", {}),
}


def read_metrics(url, timeout=1.0):
    """Parsed samples of <url>/metrics, or None when it does not answer. Returns once the server
    has closed its end of the connection too (or `timeout` is over): after the response the
    request is half-closed and the server's close awaited. A server closes a connection only when
    its loop reads our close, so on a loaded machine its end can outlive ours by milliseconds; a
    descriptor count taken meanwhile would include the tool's own connection."""
    bl = batonlib()
    if not urllib.parse.urlsplit(url).path.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    u = urllib.parse.urlsplit(url)
    end = time.monotonic() + timeout
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("GET", u.path or "/metrics")
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            return None
        sock = conn.sock  # None when the response closed the connection
        if sock is not None:
            sock.shutdown(socket.SHUT_WR)
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                if not sock.recv(4096):
                    break  # the server closed its end
        return bl.parse_metrics(data.decode("utf-8", "replace"))
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


def has_metric(samples, name):
    for key in samples:
        if key == name or key.startswith(name + "{"):
            return True
    return False


def extract(samples, table):
    """{short name: value} for each metric of `table` that the endpoint exposes."""
    bl = batonlib()
    out = {}
    for short, (name, labels) in table.items():
        if has_metric(samples, name):
            out[short] = bl.metric_sum(samples, name, **labels)
    return out


def proc_state(pid):
    """The one-letter state of a process (R, S, D, T, t, Z...) or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2:].split()
    return rest[0] if rest else None


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
               "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
               "0B": "CLOSING"}


def _hex_addr(h):
    """'0100007F:1F90' (or the 32-digit IPv6 form) of /proc/net/tcp as 'host:port'."""
    addr, port = h.rsplit(":", 1)
    raw = bytes.fromhex(addr)
    # the kernel prints each 32-bit word in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        host = ".".join(str(b) for b in words)
    else:
        host = "[" + socket.inet_ntop(socket.AF_INET6, words) + "]"
    return f"{host}:{int(port, 16)}"


def _sockets(pid, wanted=None):
    """{socket inode: (remote port or None, description)} of the sockets in pid's network
    namespace (only the inodes in `wanted`, when given): TCP and UDP with endpoints and state, unix
    with its path. Reading these tables costs tens of milliseconds on a busy machine (thousands of
    sockets in TIME_WAIT), so callers ask only when they need it."""
    out = {}
    for fam in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{fam}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10 or (wanted is not None and parts[9] not in wanted):
                        continue
                    state = _TCP_STATES.get(parts[3], parts[3]) if fam.startswith("tcp") else ""
                    out[parts[9]] = (int(parts[2].rsplit(":", 1)[1], 16),
                                     f"{fam} {_hex_addr(parts[1])} -> {_hex_addr(parts[2])} {state}".rstrip())
        except (OSError, StopIteration, ValueError):
            continue
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 7 and (wanted is None or parts[6] in wanted):
                    out[parts[6]] = (None, "unix " + (parts[7] if len(parts) > 7 else "(unnamed)"))
    except (OSError, StopIteration):
        pass
    return out


def fd_table(pid, exclude_ports=()):
    """{descriptor number: its /proc/<pid>/fd link} of pid's open descriptors (a path, pipe:[...],
    anon_inode:[eventfd], socket:[inode]...), not counting TCP connections to exclude_ports (etcd
    and NATS: their clients keep a pool of connections that may legitimately reach another member
    after a failover). None if the process is gone. The baseline check counts these and, when a
    process holds more than before, names the new ones (new_descriptors)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    socks = None
    out = {}
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if exclude_ports and target.startswith("socket:["):
            if socks is None:
                socks = _sockets(pid)
            rport, _ = socks.get(target[8:-1], (None, None))
            if rport is not None and rport in exclude_ports:
                continue
        out[fd] = target
    return out


def new_descriptors(before, after, pid=None):
    """The entries of fd table `after` that `before` does not hold (same number, same link), as
    'fd N: what' strings; with the pid of a live process, a socket among them is named by its
    protocol, endpoints and state (e.g. 'fd 21: socket:[4711] tcp 127.0.0.1:41590 ->
    127.0.0.1:39491 ESTABLISHED')."""
    before = before or {}
    new = [(fd, what) for fd, what in sorted((after or {}).items(), key=lambda kv: int(kv[0]))
           if before.get(fd) != what]
    inodes = {what[8:-1] for _, what in new if what.startswith("socket:[")}
    socks = _sockets(pid, inodes) if pid and inodes else {}
    out = []
    for fd, what in new:
        desc = socks.get(what[8:-1], (None, None))[1] if what.startswith("socket:[") else None
        out.append(f"fd {fd}: {what} {desc}" if desc else f"fd {fd}: {what}")
    return out


def port_reachable(host, port, timeout=1.0):
    """True if a TCP connection to host:port succeeds within timeout."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Endpoint:
    """A metrics endpoint of one process: name ('frontend[0]', 'worker[1]', or an operator's
    name), role ('frontend' | 'worker'), a callable giving the current metrics URL, and one giving
    the current pid (None when unknown, e.g. a remote process)."""

    def __init__(self, name, role, url_fn, pid_fn=lambda: None):
        self.name = name
        self.role = role
        self.url_fn = url_fn
        self.pid_fn = pid_fn

    def tables(self):
        if self.role == "frontend":
            return FRONTEND_GAUGES, FRONTEND_COUNTERS
        return WORKER_GAUGES, WORKER_COUNTERS


# Held by a snapshot and by each round of a Sampler, so that they take turns: a descriptor count
# must not include the server's end of a Sampler request in flight (the baseline is read before the
# Sampler starts, the after-run snapshots while it runs). Every read_metrics returns once the
# server closed its end, so with this lock no connection of the tool's own is open at a count.
_READING = threading.Lock()


def snapshot(endpoints, with_fds=True, timeout=1.0, exclude_ports=()):
    """{endpoint name: {"pid", "up", gauge: value..., "fds", "fd_table"}} read now; exclude_ports
    as for fd_table. "fds" is the number of entries of "fd_table" (not a gauge: never compared
    for equality)."""
    with _READING:
        return _snapshot(endpoints, with_fds, timeout, exclude_ports)


def _snapshot(endpoints, with_fds, timeout, exclude_ports):
    snap = {}
    for ep in endpoints:
        gauges, _ = ep.tables()
        pid = ep.pid_fn()
        s = read_metrics(ep.url_fn(), timeout)
        entry = {"pid": pid, "up": s is not None}
        if s is not None:
            entry.update(extract(s, gauges))
        if with_fds and pid:
            table = fd_table(pid, exclude_ports)
            entry["fds"] = None if table is None else len(table)
            entry["fd_table"] = table
        snap[ep.name] = entry
    return snap


class Sampler:
    """Polls every endpoint's gauges and counters every `interval` seconds on a thread."""

    def __init__(self, endpoints, t0, interval=0.5):
        self.endpoints = endpoints
        self.t0 = t0
        self.interval = interval
        self.samples = []  # {"t", "name", "role", "pid", values...}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = None

    def sample_once(self):
        with _READING:
            self._sample_once()

    def _sample_once(self):
        t = round(time.monotonic() - self.t0, 4)  # one time per round, so rows of a round add up
        for ep in self.endpoints:
            gauges, counters = ep.tables()
            s = read_metrics(ep.url_fn(), 1.0)
            if s is None:
                continue
            row = {"t": t, "name": ep.name, "role": ep.role, "pid": ep.pid_fn()}
            row.update(extract(s, gauges))
            row.update(extract(s, counters))
            with self._lock:
                self.samples.append(row)

    def _run(self):
        while not self._stop.is_set():
            start = time.monotonic()
            self.sample_once()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - start)))

    def start(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self):
        self._stop.set()
        if self.thread:
            self.thread.join(10)
        self.sample_once()

    def latest(self, name):
        with self._lock:
            for row in reversed(self.samples):
                if row["name"] == name:
                    return row
        return None

    def _deltas(self, counter, role, baseline_pids):
        first, last = {}, {}
        with self._lock:
            rows = list(self.samples)
        for row in rows:
            if row["role"] != role or counter not in row:
                continue
            key = (row["name"], row["pid"])
            fresh = baseline_pids is not None and row["pid"] is not None and row["pid"] not in baseline_pids
            first.setdefault(key, 0.0 if fresh else row[counter])
            last[key] = row[counter]
        return {k: last[k] - first[k] for k in last}, last

    def counter_delta(self, counter, role="frontend", baseline_pids=None):
        """Sum over processes (each pid counted separately, so a restarted process adds its own
        count) of the counter's last value less its first; a process not in baseline_pids (started
        during the run) counts from 0. None if no endpoint exposes the counter."""
        d, _ = self._deltas(counter, role, baseline_pids)
        return sum(d.values()) if d else None

    def migration_limit(self, baseline_pids=None):
        """The largest --migration-limit of the frontends (their
        dynamo_frontend_model_migration_limit gauge): 0 when migration is off on every frontend;
        None when no frontend exposes it."""
        _, limit = self._deltas("migration_limit", "frontend", baseline_pids)
        return max(limit.values()) if limit else None

    def migrations_performed(self, baseline_pids=None):
        """Migrations the frontends actually attempted: dynamo_frontend_model_migration_total counts
        every failure that could have migrated, even with no budget left (as Dynamo does), so the
        exhausted ones are taken off, and so are the unserved ones (budget left, but no continuation
        was sent: no worker left, the retry budget); a frontend whose migration limit is 0 performed
        none."""
        total, _ = self._deltas("migrations", "frontend", baseline_pids)
        if not total:
            return None
        exhausted, _ = self._deltas("migrations_exhausted", "frontend", baseline_pids)
        unserved, _ = self._deltas("migrations_unserved", "frontend", baseline_pids)
        _, limit = self._deltas("migration_limit", "frontend", baseline_pids)
        out = 0.0
        for k, v in total.items():
            if limit.get(k, 1) <= 0:
                continue
            out += v - exhausted.get(k, 0.0) - unserved.get(k, 0.0)
        return out
