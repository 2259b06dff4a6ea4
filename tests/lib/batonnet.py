"""batonnet — network-namespace helpers for baton's partition test and benchmark.

Netns makes a namespace with one end of a veth pair (10.200.X.2/30) and the other end on the host
(10.200.X.1/30, X picked so that no host address is in that /30), and cuts or restores the link by
taking the host end down or up (the namespace end then loses its carrier too: nothing passes either
way). start_netns_worker runs `baton worker` inside it through `ip netns exec`, which execs, so the
registered pid is baton's. Everything here needs root (CAP_NET_ADMIN); Netns.create raises
NetnsUnavailable when the kernel refuses, so that a caller can skip.
"""

import os
import shutil
import subprocess

import batonlib as bl

IP = shutil.which("ip") or "/usr/sbin/ip"


class NetnsUnavailable(Exception):
    pass


def ip(*args, netns=None, check=True):
    cmd = [IP] + (["netns", "exec", netns, IP] if netns else []) + [str(a) for a in args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


class Netns:
    """A namespace with a veth pair to the host; `cut()` and `restore()` toggle the host end."""

    def __init__(self):
        used = ip("-4", "addr").stdout
        for k in range(250):
            x = (os.getpid() + k) % 250 + 1
            if f"10.200.{x}." not in used:
                break
        else:
            raise AssertionError("no free 10.200.X.0/30 subnet")
        self.name = f"baton-part-{os.getpid()}"
        self.host_if, self.ns_if = f"btp{x}h{os.getpid() % 1000}", f"btp{x}w{os.getpid() % 1000}"
        self.host_ip, self.ns_ip = f"10.200.{x}.1", f"10.200.{x}.2"
        self.made = False

    def create(self):
        r = ip("netns", "add", self.name, check=False)
        if r.returncode != 0:
            if "Permission denied" in r.stderr or "Operation not permitted" in r.stderr:
                raise NetnsUnavailable(f"cannot create a network namespace: {r.stderr.strip()}")
            raise AssertionError(f"ip netns add failed: {r.stderr.strip()}")
        self.made = True
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        ip("link", "set", self.ns_if, "netns", self.name)
        ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        ip("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, netns=self.name)
        ip("link", "set", self.ns_if, "up", netns=self.name)
        ip("link", "set", "lo", "up", netns=self.name)

    def cut(self):
        ip("link", "set", self.host_if, "down")

    def restore(self):
        ip("link", "set", self.host_if, "up")

    def destroy(self):
        ip("link", "del", self.host_if, check=False)  # removes both ends
        if self.made:
            ip("netns", "del", self.name, check=False)


def start_netns_worker(c, ns, **flags):
    """Like Cluster.start_worker, inside the namespace (the pid is baton's: ip netns exec execs)."""
    rpc_port = bl.free_port()
    flags.setdefault("discovery_dir", c.discovery_dir)
    env = dict(c.env)
    env["DYN_SYSTEM_PORT"] = "-1"
    args = [IP, "netns", "exec", ns.name, c.bin, "worker", "--rpc-host", ns.ns_ip, "--rpc-port", str(rpc_port)]
    args += bl.flags_to_args(flags)
    proc = bl.Proc(args, env=env, log=c._log("worker-netns"), name=f"worker-netns:{rpc_port}")
    w = bl.Worker(proc, rpc_port, None)
    c.workers.append(w)
    return w


def resume_gap(s, carried, t_cut):
    """Seconds from the cut to the arrival of token number `carried` (0-based): the first token
    the new worker produced, `carried` being what the frontend handed over. None if it never came."""
    n = 0
    for obj, t in zip(s.events, s.t_events):
        ch = (obj.get("choices") or [{}])[0] if isinstance(obj, dict) else {}
        n += len(ch.get("token_ids") or [])
        if n > carried:
            return t - t_cut
    return None
