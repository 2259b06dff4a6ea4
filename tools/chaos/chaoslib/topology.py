"""topology — the processes a scenario starts on this machine, and the handles faults act on.

A Topology starts, on loopback ports picked free: an etcd cluster (discovery = "etcd") or a private
file-discovery directory, a nats-server (event_plane = "nats"), the workers (each with its status
server, so that its gauges can be read) and the frontends; then waits until every frontend lists
every worker. Workers named in netns_workers run in their own network namespace, joined to the host
by a veth pair, so that a partition can cut them off without touching anything else.

Each process is a Member (role, index, current Proc, and every pid it has had). restart() starts a
member again with the same configuration: a frontend, etcd member or nats-server on the same ports
(clients and peers keep their addresses), a worker on fresh ports (as a rescheduled pod would).
Everything is stopped by pid in stop(), and batonlib kills what is left if the tool dies.
"""

import atexit
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

from .util import batonlib, log


class SetupError(RuntimeError):
    pass


class Member:
    def __init__(self, role, index):
        self.role = role
        self.index = index
        self.proc = None
        self.pids = []
        self.url = None          # frontend: http://host:port
        self.port = None         # frontend http port, nats port, etcd client port
        self.peer_port = None    # etcd
        self.rpc_port = None     # worker
        self.system_url = None   # worker status server
        self.host = "127.0.0.1"  # where the worker listens (its netns address when isolated)
        self.netns = None        # {"ns", "veth_host", "veth_ns", "ip_host", "ip_ns"}
        self.generation = 0
        self.etcd_name = None
        self.member_id = None
        self.monitor_port = None  # nats-server monitoring

    @property
    def name(self):
        return f"{self.role}[{self.index}]" if self.role != "nats" else "nats"

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.alive()

    def __repr__(self):
        return f"<{self.name} pid={self.pid}>"


def _port_open(host, port, timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SetupError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


class Topology:
    def __init__(self, cfg, bin_path, run_dir, tag):
        self.cfg = cfg
        self.bin = bin_path
        self.dir = run_dir
        self.tag = tag  # unique among concurrent runs on this machine (netns and veth names)
        self.logs = os.path.join(run_dir, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.discovery_dir = os.path.join(run_dir, "discovery")
        os.makedirs(self.discovery_dir, exist_ok=True)
        self.frontends = []
        self.workers = []
        self.etcd = []
        self.nats = None
        self.netns = []
        self.bl = batonlib()

    # ---- queries -------------------------------------------------------------------------------

    def members(self, role=None):
        allm = self.frontends + self.workers + self.etcd + ([self.nats] if self.nats else [])
        return [m for m in allm if role is None or m.role == role]

    def frontend_urls(self):
        return [m.url for m in self.frontends]

    def etcd_endpoints(self):
        return ",".join(f"http://127.0.0.1:{m.port}" for m in self.etcd)

    def etcd_status(self, m, timeout=1.0):
        """The member's /v3/maintenance/status JSON, or None if it does not answer."""
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{m.port}/v3/maintenance/status", data=b"{}",
                                         method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def etcd_instances(self):
        """How many keys live under v1/instances/ (worker registrations), asking each member in
        turn; None when no member answers."""
        body = json.dumps({"key": base64.b64encode(b"v1/instances/").decode(),
                           "range_end": base64.b64encode(b"v1/instances0").decode(), "count_only": True}).encode()
        for m in self.etcd:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{m.port}/v3/kv/range", data=body, method="POST")
                with urllib.request.urlopen(req, timeout=1.0) as r:
                    return int(json.loads(r.read()).get("count", 0))
            except (OSError, ValueError):
                continue
        return None

    def nats_clients(self):
        """Connections nats-server holds now (its monitoring /connz), or None."""
        if self.nats is None or not self.nats.monitor_port:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.nats.monitor_port}/connz", timeout=1.0) as r:
                return int(json.loads(r.read()).get("num_connections", 0))
        except (OSError, ValueError):
            return None

    def etcd_leader(self):
        """The etcd Member that is leader now, or None."""
        for m in self.etcd:
            st = self.etcd_status(m)
            if st and st.get("leader"):
                for x in self.etcd:
                    if x.member_id == st["leader"]:
                        return x
        return None

    # ---- start ---------------------------------------------------------------------------------

    def _log(self, m):
        return os.path.join(self.logs, f"{m.role}{m.index if m.role != 'nats' else ''}-{m.generation}.log")

    def _spawn(self, m, args, env=None):
        m.generation += 1
        m.proc = self.bl.Proc(args, env=env, log=self._log(m), name=m.name)
        m.pids.append(m.proc.pid)
        return m.proc

    def start(self):
        c = self.cfg
        t = c["start_timeout"]
        if c["discovery"] == "etcd":
            self._start_etcd(c["etcd_members"], t)
        if c["event_plane"] == "nats":
            self._start_nats(t)
        for i in c["netns_workers"]:
            self._make_netns(i)
        for i in range(c["workers"]):
            m = Member("worker", i)
            self.workers.append(m)
            self._start_worker(m)
        for i in range(c["frontends"]):
            m = Member("frontend", i)
            m.port = self.bl.free_port()
            m.url = f"http://127.0.0.1:{m.port}"
            self.frontends.append(m)
            self._start_frontend(m)
        for m in self.workers:
            self.bl.wait_http(m.system_url + "/live", m.proc, timeout=t)
        for m in self.frontends:
            self.bl.wait_http(m.url + "/live", m.proc, timeout=t)
        self.wait_routable(t)

    def wait_routable(self, timeout, n=None):
        """Waits until every live frontend's /health lists n instances (default: live workers)."""
        end = time.monotonic() + timeout
        want = n if n is not None else sum(1 for w in self.workers if w.alive())
        for m in self.frontends:
            if not m.alive():
                continue
            last = None
            while True:
                try:
                    st, _, body = self.bl.get_json(m.url + "/health", timeout=2)
                    last = body
                    if st == 200 and isinstance(body, dict) and len(body.get("instances") or []) == want:
                        break
                except OSError as e:
                    last = repr(e)
                if time.monotonic() >= end:
                    raise SetupError(f"{m.name} does not list {want} workers after {timeout:.0f} s "
                                     f"(last /health: {str(last)[:300]})")
                if not m.alive():
                    raise SetupError(f"{m.name} exited with {m.proc.returncode}; see {m.proc.log_path}")
                time.sleep(0.1)

    def _common_flags(self):
        c = self.cfg
        f = {}
        if c["discovery"] == "etcd":
            f["discovery"] = "etcd"
            f["etcd_endpoints"] = self.etcd_endpoints()
        else:
            f["discovery_dir"] = self.discovery_dir
        if c["event_plane"] == "nats":
            f["event_plane"] = "nats"
            f["nats_server"] = f"nats://127.0.0.1:{self.nats.port}"
        return f

    def _start_worker(self, m):
        c = self.cfg
        ns = self.netns_for(m.index)
        m.host = ns["ip_ns"] if ns else "127.0.0.1"
        m.netns = ns
        m.rpc_port = self.bl.free_port()
        sys_port = self.bl.free_port()
        m.system_url = f"http://{m.host}:{sys_port}"
        flags = {"rpc_host": m.host, "system_host": m.host, "speedup_ratio": c["speedup"], "model_name": c["model"]}
        flags.update(self._common_flags())
        flags.update(c["worker_flags"])
        args = [self.bin, "worker", "--rpc-port", str(m.rpc_port)] + self.bl.flags_to_args(flags)
        if ns:
            args = ["ip", "netns", "exec", ns["ns"]] + args
        self._spawn(m, args, env={"DYN_SYSTEM_PORT": str(sys_port)})

    def _start_frontend(self, m):
        c = self.cfg
        flags = {"http_host": "127.0.0.1", "migration_limit": c["migration_limit"],
                 "stream_stall_timeout": c["stream_stall_timeout"], "router_mode": c["router_mode"],
                 "active_decode_blocks_threshold": c["active_decode_blocks_threshold"],
                 "active_prefill_tokens_threshold": c["active_prefill_tokens_threshold"]}
        flags.update(self._common_flags())
        flags.update(c["frontend_flags"])
        args = [self.bin, "frontend", "--http-port", str(m.port)] + self.bl.flags_to_args(flags)
        self._spawn(m, args)

    def _start_etcd(self, n, timeout):
        if not shutil.which("etcd"):
            raise SetupError("etcd is not installed (the scenario asks for discovery = \"etcd\")")
        for i in range(n):
            m = Member("etcd", i)
            m.port = self.bl.free_port()
            m.peer_port = self.bl.free_port()
            m.etcd_name = f"e{i}"
            self.etcd.append(m)
        self._etcd_cluster = ",".join(f"{m.etcd_name}=http://127.0.0.1:{m.peer_port}" for m in self.etcd)
        for m in self.etcd:
            self._spawn_etcd(m)
        end = time.monotonic() + timeout
        for m in self.etcd:
            while True:
                st = self.etcd_status(m)
                if st and st.get("leader") and st.get("leader") != "0":
                    m.member_id = st["header"]["member_id"]
                    break
                if not m.alive():
                    raise SetupError(f"etcd member {m.etcd_name} exited; see {m.proc.log_path}")
                if time.monotonic() > end:
                    raise SetupError(f"etcd cluster did not elect a leader within {timeout:.0f} s")
                time.sleep(0.1)
        log(f"etcd: {n} members on {self.etcd_endpoints()}, leader {self.etcd_leader()}")

    def _spawn_etcd(self, m):
        data = os.path.join(self.dir, f"etcd-{m.etcd_name}")
        args = ["etcd", "--name", m.etcd_name, "--data-dir", data,
                "--listen-client-urls", f"http://127.0.0.1:{m.port}",
                "--advertise-client-urls", f"http://127.0.0.1:{m.port}",
                "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-cluster", self._etcd_cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"chaos-{self.tag}", "--heartbeat-interval", "100",
                "--election-timeout", "1000", "--logger", "zap", "--log-outputs", "stderr"]
        self._spawn(m, args, env={"ETCD_UNSUPPORTED_ARCH": None})

    def _start_nats(self, timeout):
        binp = shutil.which("nats-server")
        if not binp:
            raise SetupError("nats-server is not installed (the scenario asks for event_plane = \"nats\")")
        m = Member("nats", 0)
        m.port = self.bl.free_port()
        m.monitor_port = self.bl.free_port()
        self.nats = m
        self._spawn_nats(m)
        self.wait_port("127.0.0.1", m.port, m, timeout)

    def _spawn_nats(self, m):
        args = [shutil.which("nats-server"), "-a", "127.0.0.1", "-p", str(m.port), "-m", str(m.monitor_port)]
        if self.cfg.get("jetstream"):  # the frontends' shared stream journal
            args += ["-js", "-sd", os.path.join(self.logs, "jetstream")]
        self._spawn(m, args)

    def wait_port(self, host, port, m, timeout):
        end = time.monotonic() + timeout
        while not _port_open(host, port):
            if m is not None and not m.alive():
                raise SetupError(f"{m.name} exited with {m.proc.returncode}; see {m.proc.log_path}")
            if time.monotonic() > end:
                raise SetupError(f"{host}:{port} not open after {timeout:.0f} s")
            time.sleep(0.05)

    # ---- network namespaces --------------------------------------------------------------------

    def netns_for(self, index):
        for ns in self.netns:
            if ns["index"] == index:
                return ns
        return None

    def _make_netns(self, i):
        if os.geteuid() != 0 or not shutil.which("ip"):
            raise SetupError("network namespaces need root and iproute2 (ip)")
        name = f"bchaos-{self.tag}-w{i}"
        vh, vn = f"bc{self.tag[-5:]}{i}h", f"bc{self.tag[-5:]}{i}n"
        third = int(self.tag[-5:]) % 250
        base = 4 * (i % 60)
        ip_host, ip_ns = f"10.231.{third}.{base + 1}", f"10.231.{third}.{base + 2}"
        ns = {"index": i, "ns": name, "veth_host": vh, "veth_ns": vn, "ip_host": ip_host, "ip_ns": ip_ns}
        if not self.netns:
            atexit.register(self._remove_netns)  # also when the tool is interrupted
        self.netns.append(ns)
        try:
            _run(["ip", "netns", "add", name])
            _run(["ip", "link", "add", vh, "type", "veth", "peer", "name", vn])
            _run(["ip", "link", "set", vn, "netns", name])
            _run(["ip", "addr", "add", f"{ip_host}/30", "dev", vh])
            _run(["ip", "link", "set", vh, "up"])
            _run(["ip", "netns", "exec", name, "ip", "addr", "add", f"{ip_ns}/30", "dev", vn])
            _run(["ip", "netns", "exec", name, "ip", "link", "set", vn, "up"])
            _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        except SetupError as e:
            raise SetupError(f"network namespace for worker[{i}]: {e}") from e

    def set_partitioned(self, index, cut):
        """Cuts (or heals) worker[index]'s link: the namespace side of the veth goes down, so packets
        between the host and the worker are dropped silently, as on a real partition."""
        ns = self.netns_for(index)
        if ns is None:
            raise SetupError(f"worker[{index}] is not in a network namespace")
        _run(["ip", "netns", "exec", ns["ns"], "ip", "link", "set", ns["veth_ns"], "down" if cut else "up"])

    # ---- restart and stop ----------------------------------------------------------------------

    def restart(self, m, wait=True):
        """Starts m again with the same configuration; waits until it answers."""
        t = self.cfg["start_timeout"]
        if m.role == "worker":
            self._start_worker(m)
            if wait:
                self.bl.wait_http(m.system_url + "/live", m.proc, timeout=t)
        elif m.role == "frontend":
            self._start_frontend(m)
            if wait:
                self.bl.wait_http(m.url + "/live", m.proc, timeout=t)
        elif m.role == "etcd":
            self._spawn_etcd(m)
            if wait:
                self.wait_port("127.0.0.1", m.port, m, t)
        elif m.role == "nats":
            self._spawn_nats(m)
            if wait:
                self.wait_port("127.0.0.1", m.port, m, t)
        log(f"restarted {m.name} (pid {m.pid})")

    def stop(self, timeout=10.0):
        """One SIGTERM (and a SIGCONT) to every process at once, SIGKILL to those still running
        after timeout; removes the network namespaces. Returns {member name: exit status}. A
        second SIGTERM is never sent: baton exits at once on a second signal."""
        order = self.frontends + self.workers + ([self.nats] if self.nats else []) + self.etcd
        for m in order:
            if m.alive():
                m.proc.kill(signal.SIGTERM)
                m.proc.kill(signal.SIGCONT)
        end = time.monotonic() + timeout
        codes = {}
        for m in order:
            if m.proc is None:
                continue
            if m.proc.wait(max(0.0, end - time.monotonic())) is None:
                m.proc.kill_group()
            codes[m.name] = m.proc.returncode
        self._remove_netns()
        return codes

    def _remove_netns(self):
        for ns in self.netns:
            subprocess.run(["ip", "link", "del", ns["veth_host"]], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns["ns"]], capture_output=True)
        self.netns = []
