"""faults — the injectors. Each fault runs on its own thread: it waits for its trigger (a time
after the load started, or a number of tokens delivered to the clients), resolves its target,
breaks it, and records what it did and the evidence that it took effect. A fault whose evidence is
missing fails the run (checks.check_evidence): an injector that silently does nothing is a defect.

Evidence, by fault:
  kill9               the pid died (our child: exit status -9)
  sigterm             the process exited within exit_within (with expect_exit, for a worker 0)
  sigstop             /proc showed the process stopped (T), and running again after SIGCONT
  engine_death        the worker exited with expect_exit (1: engine failure) within exit_within
  engine_stall        the worker's token counter stood still while it held sequences, or the
                      engine monitor ended the worker (exit 1)
  etcd_member_kill    the member's pid died, the others elected a leader, and every live worker
                      is registered in etcd before and after
  etcd_outage         every client port refused connections; after the restart a leader exists
                      and every live worker is registered again (leases may have expired)
  nats_restart        clients were connected; the port refused connections while down, answered
                      after the restart, and as many clients connected again
  partition           the worker's request-plane port was unreachable from the host while cut,
                      and reachable again after healing
  client_disconnect_storm   the streams were dropped mid-way, and the frontend's
                      disconnected-clients counter and the workers' kill counters moved by at
                      least as many
  command             the command exited 0 (and, with `unreachable`, that port stopped answering)
"""

import os
import random
import re
import signal
import subprocess
import threading
import time

from . import loadgen, observe
from .util import log


class FaultError(RuntimeError):
    pass


def poll(fn, done, timeout, interval):
    """Calls fn until done(its value) holds or timeout seconds have passed; returns the last value."""
    end = time.monotonic() + timeout
    v = fn()
    while not done(v) and time.monotonic() < end:
        time.sleep(interval)
        v = fn()
    return v


class Handle:
    """A process a fault acts on: a Member the tool started, or an outside pid."""

    def __init__(self, name, member=None, pid=None, metrics_url=None, role=None):
        self.name = name
        self.member = member
        self._pid = pid
        self._metrics = metrics_url
        self.role = role or (member.role if member else None)
        self.proc = member.proc if member else None  # the generation this fault acts on

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else self._pid

    @property
    def metrics_url(self):
        if self.member is not None:
            return self.member.system_url if self.member.role == "worker" else self.member.url
        return self._metrics

    def alive(self):
        if self.proc is not None:
            return self.proc.alive()
        st = observe.proc_state(self._pid)
        return st is not None and st != "Z"

    def wait_exit(self, timeout):
        """(exited, exit status or None when unknown) within timeout seconds."""
        if self.proc is not None:
            rc = self.proc.wait(timeout)
            return (rc is not None, rc)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive():
                return (True, None)
            time.sleep(0.05)
        return (not self.alive(), None)

    def signal(self, sig):
        os.kill(self.pid, sig)

    def __str__(self):
        return self.name if self.name.startswith("pid ") else f"{self.name} (pid {self.pid})"


def resolve_external(name, spec):
    """The pid of a [target.processes] entry: pid, pidfile, or a regular expression matched
    against each process's command line (exactly one process must match, unless `index` picks
    the N-th of the matches in pid order)."""
    if spec.get("pid"):
        return int(spec["pid"])
    if spec.get("pidfile"):
        with open(spec["pidfile"]) as f:
            return int(f.read().strip())
    rx = re.compile(spec["match"])
    me = os.getpid()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if cmd and rx.search(cmd):
            found.append((int(d), cmd))
    found.sort()
    idx = spec.get("index")
    if idx is not None:
        if not 0 <= int(idx) < len(found):
            raise FaultError(f"process {name!r}: match {spec['match']!r} found {len(found)} processes, no index {idx}")
        return found[int(idx)][0]
    if len(found) != 1:
        raise FaultError(f"process {name!r}: match {spec['match']!r} found {len(found)} processes "
                         f"{[c for _, c in found][:5]}")
    return found[0][0]


class Env:
    """What faults share: the run's start time, the topology (or the outside processes), the load
    (token trigger), the random generator, and where storm records go."""

    def __init__(self, t0, topology=None, processes=None, load=None, seed=1, urls=(), storm_shapes=None,
                 request_timeout=60.0):
        self.t0 = t0
        self.topology = topology
        self.processes = processes or {}
        self.load = load
        self.rng = random.Random(f"faults-{seed}")
        self.urls = list(urls)
        self.storm_shapes = storm_shapes or {}
        self.storm_records = []
        self.request_timeout = request_timeout
        self.abort = threading.Event()
        self.lock = threading.Lock()

    def now(self):
        return time.monotonic() - self.t0

    def resolve(self, parsed):
        role, sel = parsed
        if role == "pid":
            return [Handle(f"pid {sel}", pid=int(sel))]
        if role == "proc":
            spec = self.processes.get(sel)
            if spec is None:
                raise FaultError(f"target {sel!r} is not in [target.processes]")
            pid = resolve_external(sel, spec)
            return [Handle(sel, pid=pid, metrics_url=spec.get("metrics"), role=spec.get("role"))]
        if role == "none":
            return []
        topo = self.topology
        if topo is None:
            raise FaultError(f"target {role}[{sel}] needs a topology the tool started; against an existing "
                             f"deployment name processes by pid or in [target.processes]")
        if role == "nats":
            return [Handle("nats", member=topo.nats)]
        members = {"worker": topo.workers, "frontend": topo.frontends, "etcd": topo.etcd}[role]
        if role == "etcd" and sel in ("leader", "follower"):
            leader = topo.etcd_leader()
            if leader is None:
                raise FaultError("etcd has no leader to target")
            pick = leader if sel == "leader" else next(m for m in members if m is not leader)
            return [Handle(pick.name, member=pick)]
        if sel == "*":
            return [Handle(m.name, member=m) for m in members]
        if sel == "random":
            live = [m for m in members if m.alive()]
            if not live:
                raise FaultError(f"no live {role} to pick")
            m = self.rng.choice(live)
            return [Handle(m.name, member=m)]
        return [Handle(members[sel].name, member=members[sel])]


class Fault(threading.Thread):
    """One fault of a scenario, run on its own thread. `record` is what the report and the checks
    read: label, what, target, t_inject, t_restore, t_end, pids, evidence (list of lines),
    evidence_ok, error, restarted."""

    def __init__(self, spec, env, index):
        super().__init__(daemon=True, name=f"fault-{index}")
        self.spec = spec
        self.env = env
        self.index = index
        self.record = {"index": index, "label": spec["label"], "what": spec["what"], "target": spec["target"],
                       "at": spec["at"], "after_tokens": spec["after_tokens"], "duration": spec["duration"],
                       "t_trigger": None, "t_inject": None, "t_restore": None, "t_end": None, "pids": [],
                       "evidence": [], "evidence_ok": None, "error": None, "restarted": [], "targets": [],
                       "urls": []}

    # ---- helpers -------------------------------------------------------------------------------

    def ev(self, ok, line):
        self.record["evidence"].append(("ok: " if ok else "MISSING: ") + line)
        if not ok:
            self.record["evidence_ok"] = False
        elif self.record["evidence_ok"] is None:
            self.record["evidence_ok"] = True

    def sleep_until(self, t_rel):
        while True:
            left = t_rel - self.env.now()
            if left <= 0:
                return True
            if self.env.abort.wait(min(left, 0.2)):
                return False

    def restart(self, h):
        spec = self.spec
        if not spec["restart"] or h.member is None or self.env.topology is None:
            return
        time.sleep(spec["restart_after"])
        self.restart_now(h)

    def restart_now(self, h, wait=True):
        self.env.topology.restart(h.member, wait=wait)
        self.record["restarted"].append({"name": h.name, "pid": h.member.pid, "t": round(self.env.now(), 4)})

    def mark(self, key):
        self.record[key] = round(self.env.now(), 4)

    # ---- the thread ----------------------------------------------------------------------------

    def run(self):
        spec = self.spec
        rec = self.record
        try:
            if spec["at"] is not None:
                if not self.sleep_until(spec["at"]):
                    raise FaultError("the run ended before the fault's time")
            else:
                load = self.env.load
                bound = (load.cfg["duration"] or 0) + load.cfg["request_timeout"] + 30 if load else 60
                if load is None or not load.wait_tokens(spec["after_tokens"], bound):
                    got = load.tokens if load else 0
                    raise FaultError(f"trigger never fired: {got} of {spec['after_tokens']} tokens delivered")
            self.mark("t_trigger")
            handles = self.env.resolve(spec["target_parsed"])
            rec["targets"] = [h.name for h in handles]
            rec["pids"] = [h.pid for h in handles]
            rec["urls"] = [h.member.url for h in handles if h.member is not None and h.member.role == "frontend"]
            getattr(self, "do_" + spec["what"])(handles)
        except Exception as e:  # noqa: BLE001 — recorded: the evidence check fails on it
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["evidence_ok"] = False
            log(f"fault {spec['label']}: {rec['error']}")
        finally:
            self.mark("t_end")

    # ---- process signals -----------------------------------------------------------------------

    def _wait_death(self, h, timeout, want_status=None, how="exited"):
        exited, rc = h.wait_exit(timeout)
        if not exited:
            self.ev(False, f"{h} still running {timeout:.0f} s after the fault")
            return False
        if want_status is not None and rc is not None and rc != want_status:
            self.ev(False, f"{h} {how} with status {rc}, expected {want_status}")
            return False
        status = "unknown (not our child)" if rc is None else str(rc)
        self.ev(True, f"{h} {how}; exit status {status}")
        return True

    def _inject_signal(self, handles, sig, what):
        """Sends sig to every target and marks the injection; `what` goes to the log."""
        for h in handles:
            h.signal(sig)
        self.mark("t_inject")
        log(f"fault: {what}")

    def _signal_exit_restart(self, handles, sig, what, timeout, want_status, how="exited"):
        """A fault that ends its targets: evidence that each exited (with want_status, when it is
        known) within timeout, then the restarts the spec asks for."""
        self._inject_signal(handles, sig, what)
        for h in handles:
            self._wait_death(h, timeout, want_status, how)
        for h in handles:
            self.restart(h)

    def do_kill9(self, handles):
        # an outside pid's status is unknown, so -9 is checked only for our children
        self._signal_exit_restart(handles, signal.SIGKILL, f"SIGKILL -> {', '.join(str(h) for h in handles)}",
                                  5.0, -9, "died")

    def do_sigterm(self, handles):
        self._signal_exit_restart(handles, signal.SIGTERM, f"SIGTERM -> {', '.join(str(h) for h in handles)}",
                                  self.spec["exit_within"], self.spec["expect_exit"])

    def do_sigstop(self, handles):
        self._inject_signal(handles, signal.SIGSTOP,
                            f"SIGSTOP -> {', '.join(h.name for h in handles)} for {self.spec['duration']} s")
        for h in handles:
            st = poll(lambda: observe.proc_state(h.pid), lambda st: st in ("T", "t"), 2.0, 0.02)
            self.ev(st in ("T", "t"), f"{h} state {st} after SIGSTOP")
        self.sleep_until(self.record["t_inject"] + self.spec["duration"])
        for h in handles:
            if observe.proc_state(h.pid) is not None:
                h.signal(signal.SIGCONT)
        self.mark("t_restore")
        time.sleep(0.3)
        for h in handles:
            st = observe.proc_state(h.pid)
            self.ev(st not in ("T", "t") and st is not None, f"{h} state {st} after SIGCONT")

    def do_engine_death(self, handles):
        self._signal_exit_restart(handles, signal.SIGUSR1,
                                  f"engine death (SIGUSR1) -> {', '.join(h.name for h in handles)}",
                                  self.spec["exit_within"], self.spec["expect_exit"], "exited after its engine died")

    def _worker_counters(self, h):
        s = observe.read_metrics(h.metrics_url, 1.0) if h.metrics_url else None
        if s is None:
            return None
        vals = observe.extract(s, observe.WORKER_COUNTERS)
        vals.update(observe.extract(s, observe.WORKER_GAUGES))
        return vals

    def do_engine_stall(self, handles):
        dur = self.spec["duration"]
        self._inject_signal(handles, signal.SIGUSR2,
                            f"engine stall (SIGUSR2) -> {', '.join(h.name for h in handles)} for {dur} s")
        window = min(0.8, max(0.3, dur / 3))
        time.sleep(0.25)
        before = {h.name: self._worker_counters(h) for h in handles}
        time.sleep(window)
        after = {h.name: self._worker_counters(h) for h in handles}
        shown = set()
        for h in handles:
            b, a = before[h.name], after[h.name]
            if b and a and "tokens" in b and a.get("tokens") == b["tokens"] and b.get("active_sequences", 0) > 0:
                self.ev(True, f"{h.name}: tokens_total stayed at {int(b['tokens'])} for {window:.1f} s with "
                              f"{int(b['active_sequences'])} sequences in the engine")
                shown.add(h.name)
        self.sleep_until(self.record["t_inject"] + dur)
        for h in handles:
            if h.alive():
                h.signal(signal.SIGUSR2)
                if h.name not in shown:
                    b = before[h.name]
                    self.ev(False, f"{h.name} did not stall visibly (counters {b} then {after[h.name]}) and is "
                                   f"still running")
            else:
                _, rc = h.wait_exit(1.0)
                self.ev(rc in (None, 1), f"{h} ended by its engine monitor during the stall; "
                                         f"exit status {rc}")
        self.mark("t_restore")
        for h in handles:
            if not h.alive():
                self.restart(h)

    # ---- etcd, nats ----------------------------------------------------------------------------

    def _registrations(self, topo, want, timeout, when):
        """Evidence that every live worker is registered in etcd (after `when`)."""
        n = poll(topo.etcd_instances, lambda n: n == want, timeout, 0.2)
        self.ev(n == want, f"{n} worker registrations in etcd {when} ({want} live workers)")

    def do_etcd_member_kill(self, handles):
        topo = self.env.topology
        n0 = topo.etcd_instances()
        self.ev(bool(n0), f"{n0} worker registrations in etcd before the fault")
        self._inject_signal(handles, signal.SIGKILL,
                            f"SIGKILL -> etcd {', '.join(h.name for h in handles)} (was leader: "
                            f"{self.spec['target_parsed'][1] == 'leader'})")
        killed = {h.member.member_id for h in handles}
        for h in handles:
            self._wait_death(h, 5.0, -9, "died")

        def elected(leader):
            return leader is not None and leader.member_id not in killed

        leader = poll(topo.etcd_leader, elected, 15, 0.1)
        self.ev(elected(leader), f"etcd leader after the kill: {leader.name if leader else None}")
        if self.spec["duration"]:
            self.sleep_until(self.record["t_inject"] + self.spec["duration"])
        if self.spec["restart"]:
            for h in handles:
                self.restart_now(h)
            self.mark("t_restore")
        self._registrations(topo, sum(1 for w in topo.workers if w.alive()), 15, "after the member kill")

    def do_etcd_outage(self, handles):
        topo = self.env.topology
        n0 = topo.etcd_instances()
        self.ev(bool(n0), f"{n0} worker registrations in etcd before the outage")
        self._inject_signal(handles, signal.SIGKILL,
                            f"etcd outage: SIGKILL -> {len(handles)} members for {self.spec['duration']} s")
        for h in handles:
            h.wait_exit(5.0)
        time.sleep(0.2)
        down = [not observe.port_reachable("127.0.0.1", h.member.port, 0.5) for h in handles]
        self.ev(all(down), f"etcd client ports refused connections during the outage: "
                           f"{sum(down)}/{len(handles)}")
        self.sleep_until(self.record["t_inject"] + self.spec["duration"])
        for h in handles:
            self.restart_now(h, wait=False)
        self.mark("t_restore")
        leader = poll(topo.etcd_leader, lambda leader: leader is not None, 20, 0.1)
        self.ev(leader is not None, f"etcd back with leader {leader.name if leader else None}")
        self._registrations(topo, sum(1 for w in topo.workers if w.alive()), 20, "after the outage")

    def do_nats_restart(self, handles):
        topo = self.env.topology
        h = handles[0]
        c0 = topo.nats_clients()
        self.ev(bool(c0), f"{c0} clients connected to nats-server before the fault")
        self._inject_signal([h], signal.SIGKILL, f"nats-server down for {self.spec['duration']} s")
        h.wait_exit(5.0)
        self.ev(not observe.port_reachable("127.0.0.1", h.member.port, 0.5),
                f"nats port {h.member.port} refused connections while down")
        self.sleep_until(self.record["t_inject"] + self.spec["duration"])
        self.restart_now(h)
        self.mark("t_restore")
        self.ev(observe.port_reachable("127.0.0.1", h.member.port, 2.0),
                f"nats port {h.member.port} answered after the restart")

        def reconnected(c1):
            return bool(c0) and c1 is not None and c1 >= c0

        c1 = poll(topo.nats_clients, reconnected, 15, 0.2)
        self.ev(reconnected(c1), f"{c1} clients reconnected to nats-server after the restart")

    # ---- network -------------------------------------------------------------------------------

    def do_partition(self, handles):
        topo = self.env.topology
        h = handles[0]
        m = h.member
        topo.set_partitioned(m.index, True)
        self.mark("t_inject")
        log(f"fault: partition of {h.name} ({m.host}) for {self.spec['duration']} s")
        self.ev(not observe.port_reachable(m.host, m.rpc_port, 1.0),
                f"{h.name} request-plane port {m.host}:{m.rpc_port} unreachable from the host while cut")
        self.sleep_until(self.record["t_inject"] + self.spec["duration"])
        topo.set_partitioned(m.index, False)
        self.mark("t_restore")
        back = poll(lambda: observe.port_reachable(m.host, m.rpc_port, 1.0), bool, 10, 0.05)
        self.ev(back, f"{h.name} request-plane port reachable again after healing")

    # ---- clients -------------------------------------------------------------------------------

    def do_client_disconnect_storm(self, handles):
        h = handles[0]
        spec = self.spec
        url = h.member.url if h.member is not None else self.env.urls[0]
        shape = self.env.storm_shapes[self.index]
        c0 = self._disconnects(url, 2.0)
        workers = [m for m in self.env.topology.workers if m.alive()] if self.env.topology is not None else []
        k0 = self._kills(workers)
        lo, hi = spec["abort_after"]
        rng = random.Random(f"storm-{self.index}")
        aborts = [rng.randint(lo, hi) for _ in range(spec["count"])]
        self.mark("t_inject")
        log(f"fault: {spec['count']} clients open streams on {h.name} and drop them")
        out = [None] * len(aborts)

        def one(i):
            out[i] = loadgen.send(url, shape, self.env.t0, self.env.request_timeout, "storm", i,
                                  abort_after=aborts[i])

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(aborts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.env.request_timeout + 5)
        recs = [r for r in out if r is not None]
        with self.env.lock:
            self.env.storm_records.extend(recs)
        n_aborted = sum(1 for r in recs if r.outcome == "aborted")
        self.ev(n_aborted == len(aborts), f"{n_aborted} of {len(aborts)} streams dropped mid-way by their clients")
        if c0 is None:
            self.ev(False, f"{h.name} exposes no dynamo_frontend_disconnected_clients counter")
            return
        def moved(v0):
            return lambda v: v is not None and v - v0 >= n_aborted

        c1 = poll(lambda: self._disconnects(url, 1.0), moved(c0), 5, 0.1)
        self.ev(moved(c0)(c1) and n_aborted > 0,
                f"{h.name} dynamo_frontend_disconnected_clients moved by "
                f"{int(c1 - c0) if c1 is not None else '?'} (dropped {n_aborted})")
        if workers and k0 is not None:
            # every dropped stream had produced tokens, so it ran on a worker that must have killed it
            k1 = poll(lambda: self._kills(workers), moved(k0), 5, 0.1)
            self.ev(moved(k0)(k1),
                    f"workers' dynamo_component_cancellation_total{{kind=\"kill\"}} moved by "
                    f"{int(k1 - k0) if k1 is not None else '?'} (dropped {n_aborted})")

    @staticmethod
    def _disconnects(url, timeout):
        """A frontend's disconnected-clients counter, or None if it does not answer or lacks it."""
        s = observe.read_metrics(url, timeout)
        return observe.extract(s, observe.FRONTEND_COUNTERS).get("disconnected_clients") if s else None

    def _kills(self, workers):
        """Sum of the workers' kill-cancellation counters, or None if one does not answer."""
        total = 0.0
        for m in workers:
            s = observe.read_metrics(m.system_url, 1.0)
            if s is None:
                return None
            total += observe.extract(s, observe.WORKER_COUNTERS).get("kills", 0.0)
        return total

    # ---- anything else -------------------------------------------------------------------------

    def do_command(self, handles):
        spec = self.spec
        self.mark("t_inject")
        log(f"fault: running {spec['run']!r}")
        r = subprocess.run(spec["run"], shell=True, capture_output=True, text=True, timeout=60)
        self.ev(r.returncode == 0, f"command exited {r.returncode}: {(r.stderr or r.stdout).strip()[:200]}")
        if spec["unreachable"]:
            host, _, port = str(spec["unreachable"]).rpartition(":")
            time.sleep(0.2)
            self.ev(not observe.port_reachable(host, int(port), 1.0), f"{spec['unreachable']} unreachable after it")
        if spec["restore"]:
            self.sleep_until(self.record["t_inject"] + spec["duration"])
            r = subprocess.run(spec["restore"], shell=True, capture_output=True, text=True, timeout=60)
            self.mark("t_restore")
            self.ev(r.returncode == 0, f"restore command exited {r.returncode}")
