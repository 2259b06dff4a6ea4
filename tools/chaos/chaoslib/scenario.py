"""scenario — reads a chaos scenario (a small TOML file, or command-line one-liners) into a
validated Scenario with every default filled in.

A scenario has four parts (docs/chaos.md is the reference): [load] what the clients send;
[topology] the processes the tool starts on this machine, or [target] an existing deployment;
[[faults]] what to break, where, when and for how long; [checks] the oracle's bounds. Unknown keys
are errors, so that a typo cannot silently turn a check off.
"""

import copy
import os
import shlex
import tomllib

from .util import seconds

FAULT_KINDS = ("kill9", "sigterm", "sigstop", "engine_death", "engine_stall", "etcd_member_kill", "etcd_outage",
               "nats_restart", "partition", "client_disconnect_storm", "command")
# which faults need which target role
_TARGET_ROLES = {"kill9": ("worker", "frontend", "etcd", "nats", "pid", "proc"),
                 "sigterm": ("worker", "frontend", "etcd", "nats", "pid", "proc"),
                 "sigstop": ("worker", "frontend", "etcd", "nats", "pid", "proc"),
                 "engine_death": ("worker", "pid", "proc"),
                 "engine_stall": ("worker", "pid", "proc"),
                 "etcd_member_kill": ("etcd",),
                 "etcd_outage": ("etcd",),
                 "nats_restart": ("nats",),
                 "partition": ("worker",),
                 "client_disconnect_storm": ("frontend",),
                 "command": ("none",)}

LOAD_DEFAULTS = {
    "duration": 6.0,          # seconds during which new requests start (0: use `requests`)
    "requests": 0,            # fixed request count (0: as many as `duration` allows); caps `duration`
    "concurrency": 8,         # closed-loop clients
    "distinct": 24,           # distinct request shapes; requests cycle through them
    "api": "chat",            # chat | completions | mixed
    "stream": True,           # true | false | "mixed"
    "prompt_words": [8, 48],  # inclusive range
    "output_tokens": [48, 160],
    "request_timeout": 60.0,  # client-side bound on one request
    "probe_interval": 0.25,   # seconds between recovery probes (0: no prober)
    "model": None,            # default: the topology's model, or the first of GET /v1/models
    "resume": False,          # a streaming client whose connection ends without [DONE] resumes
                              # (re-POST with Last-Event-ID), up to resume_attempts times
    "resume_attempts": 5,
    "client_cuts": 0.0,       # fraction of streaming requests whose client cuts its own connection
    "client_cut_events": [1, 40],  # ... after this many events (inclusive range); needs resume
    "resume_elsewhere": False,  # a resume goes to the next frontend (as through a load balancer
                                # whose first choice died); needs resume
}

TOPOLOGY_DEFAULTS = {
    "workers": 2,
    "frontends": 1,
    "speedup": 4.0,
    "migration_limit": 3,
    "stream_stall_timeout": 1.0,
    "router_mode": None,
    "active_decode_blocks_threshold": None,
    "active_prefill_tokens_threshold": None,
    "discovery": "file",      # file | etcd
    "etcd_members": 3,
    "event_plane": "direct",  # direct | nats
    "jetstream": False,       # nats-server runs with JetStream (-js): frontends share their stream journal
    "netns_workers": [],      # worker indexes placed in their own network namespace
    "model": "mock-model",
    "worker_flags": {},
    "frontend_flags": {},
    "start_timeout": 30.0,
}

CHECK_DEFAULTS = {
    "byte_exact": True,
    "all_ended": True,
    "request_bound": 30.0,    # seconds from send to end for every request
    "allow": [],              # non-ok outcomes allowed: "error", "cut", "refused"
    "max_errors": 0,          # how many non-ok requests at most (an int, or a fraction like "5%")
    "baseline": True,
    "baseline_timeout": 15.0,
    "fds": True,              # open descriptors of processes the tool can see return to baseline
    "fresh_requests": 4,      # requests sent after recovery; all must succeed byte-exact (0: off)
    "evidence": True,
    "min_migrations": 0,
    "max_migrations": -1,     # -1: no upper bound
    "min_resumes": 0,         # resumed load requests at least (client side, and the frontends' counter)
    "max_stall": None,        # seconds; worst gap between two tokens of a completed stream
    "max_recovery": None,     # seconds from the fault to the first stable successful probe
}

FAULT_DEFAULTS = {
    "what": None,
    "target": None,
    "at": None,              # seconds after load start
    "after_tokens": None,    # or: once this many tokens reached the clients
    "duration": 0.0,         # stop/stall/outage/partition/downtime length
    "restart": False,        # start the process again (processes the tool started)
    "restart_after": 0.5,    # seconds after the kill (or after the exit, for sigterm)
    "expect_exit": None,     # sigterm/engine_*: exit status the process must end with
    "exit_within": 30.0,     # how long to wait for that exit
    "count": 32,             # client_disconnect_storm: streams opened and dropped
    "abort_after": [1, 6],   # client_disconnect_storm: drop after this many events (range)
    "output_tokens": 400,    # client_disconnect_storm: max_tokens of the dropped streams
    "pid": None,             # pid target (existing deployments)
    "run": None,             # command: shell command run at the fault time
    "restore": None,         # command: shell command run after `duration`
    "unreachable": None,     # command: host:port that must refuse or time out after `run`
    "label": None,
}

_TOP = {"name", "description", "seed", "load", "topology", "target", "faults", "checks", "quick"}
TARGET_DEFAULTS = {"url": None, "urls": [], "model": None, "worker_metrics": [], "processes": {}}


class ScenarioError(ValueError):
    pass


# What each key holds, so that a value of the wrong type, in a file or a --set, is an error that
# names the key and what it takes, not a traceback from deep in build(). A kind is (what the
# message says it expects, a test of a given value). TOML has no null: a key left at a None
# default is never tested.
def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_duration(v):
    try:
        return seconds(v) is not None
    except ValueError:
        return False


def _is_scalar(v):
    return isinstance(v, (str, int, float, bool))


INT = ("an integer", _is_int)
NUMBER = ("a number", _is_num)
DURATION = ("a duration (seconds, or a string such as \"2s\", \"500ms\", \"1m\")", _is_duration)
BOOL = ("true or false", lambda v: isinstance(v, bool))
STRING = ("a string", lambda v: isinstance(v, str))
RANGE = ("[min, max] (two integers), one integer, or \"min-max\"", lambda v: _is_int(v) or isinstance(v, str) or (
    isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)))
STRINGS = ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
INTS = ("a list of integers", lambda v: isinstance(v, list) and all(_is_int(x) for x in v))
FLAGS = ("a table of flag values, e.g. { graceful_shutdown_timeout = 1 }",
         lambda v: isinstance(v, dict) and all(_is_scalar(x) for x in v.values()))
TABLE = ("a table", lambda v: isinstance(v, dict))
ONE_OF_STREAM = ("true, false or \"mixed\"", lambda v: isinstance(v, bool) or v == "mixed")
MAX_ERRORS = ("a count, a fraction below 1, or a percentage such as \"25%\"",
              lambda v: (_is_int(v) and v >= 0) or (isinstance(v, float) and 0 < v < 1)
              or (isinstance(v, str) and v.endswith("%") and _is_num_text(v[:-1])))


def _is_num_text(t):
    try:
        return float(t) >= 0
    except ValueError:
        return False


LOAD_KINDS = {"duration": DURATION, "requests": INT, "concurrency": INT, "distinct": INT, "api": STRING,
              "stream": ONE_OF_STREAM, "prompt_words": RANGE, "output_tokens": RANGE, "request_timeout": DURATION,
              "probe_interval": DURATION, "model": STRING, "resume": BOOL, "resume_attempts": INT,
              "client_cuts": NUMBER, "client_cut_events": RANGE, "resume_elsewhere": BOOL}
TOPOLOGY_KINDS = {"workers": INT, "frontends": INT, "speedup": NUMBER, "migration_limit": INT,
                  "stream_stall_timeout": NUMBER, "router_mode": STRING, "active_decode_blocks_threshold": NUMBER,
                  "active_prefill_tokens_threshold": NUMBER, "discovery": STRING, "etcd_members": INT,
                  "event_plane": STRING, "jetstream": BOOL, "netns_workers": INTS, "model": STRING,
                  "worker_flags": FLAGS, "frontend_flags": FLAGS, "start_timeout": DURATION}
CHECK_KINDS = {"byte_exact": BOOL, "all_ended": BOOL, "request_bound": DURATION, "allow": STRINGS,
               "max_errors": MAX_ERRORS, "baseline": BOOL, "baseline_timeout": DURATION, "fds": BOOL,
               "fresh_requests": INT, "evidence": BOOL, "min_migrations": INT, "max_migrations": INT,
               "min_resumes": INT, "max_stall": DURATION, "max_recovery": DURATION}
FAULT_KINDS_OF_KEYS = {"what": STRING, "target": STRING, "at": DURATION, "after_tokens": INT, "duration": DURATION,
                       "restart": BOOL, "restart_after": DURATION, "expect_exit": INT, "exit_within": DURATION,
                       "count": INT, "abort_after": RANGE, "output_tokens": INT, "pid": INT, "run": STRING,
                       "restore": STRING, "unreachable": STRING, "label": STRING}
TARGET_KINDS = {"url": STRING, "urls": STRINGS, "model": STRING, "worker_metrics": STRINGS, "processes": TABLE}
TOP_KINDS = {"name": STRING, "description": STRING, "seed": INT, "quick": BOOL, "load": TABLE, "topology": TABLE,
             "target": TABLE, "checks": TABLE,
             "faults": ("a list of tables", lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v))}
_SECTION_KINDS = {"load": LOAD_KINDS, "topology": TOPOLOGY_KINDS, "checks": CHECK_KINDS, "target": TARGET_KINDS}


def _check_kind(key, value, kind):
    what, ok = kind
    if not ok(value):
        raise ScenarioError(f"{key}: expected {what}, got {value!r}")


class Scenario:
    """A validated scenario. Attributes: name, description, seed, path, load, topology (dict or
    None), target (dict or None), faults (list of dicts), checks (dict)."""

    def __init__(self, name, description, seed, load, topology, target, faults, checks, path=None, quick=False):
        self.name = name
        self.description = description
        self.seed = seed
        self.load = load
        self.topology = topology
        self.target = target
        self.faults = faults
        self.checks = checks
        self.path = path
        self.quick = quick

    @property
    def managed(self):
        """True when the tool starts the processes itself."""
        return self.target is None

    def to_dict(self):
        return {"name": self.name, "description": self.description, "seed": self.seed, "load": self.load,
                "topology": self.topology, "target": self.target, "faults": self.faults, "checks": self.checks,
                "path": self.path}


def _merge(defaults, given, where, kinds):
    if given is not None and not isinstance(given, dict):
        raise ScenarioError(f"{where}: expected a table, got {given!r}")
    out = copy.deepcopy(defaults)
    for k, v in (given or {}).items():
        if k not in defaults:
            raise ScenarioError(f"{where}: unknown key {k!r} (known: {', '.join(sorted(defaults))})")
        _check_kind(f"{where}.{k}", v, kinds[k])
        out[k] = v
    return out


def _range(v, where):
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    if isinstance(v, str) and "-" in v:
        a, _, b = v.partition("-")
        try:
            v = [int(a), int(b)]
        except ValueError:
            raise ScenarioError(f"{where}: expected [min, max] with 0 < min <= max, got {v!r}") from None
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v) and 0 < v[0] <= v[1]):
        raise ScenarioError(f"{where}: expected [min, max] with 0 < min <= max, got {v!r}")
    return v


def parse_target(t):
    """'worker[0]' -> ('worker', 0); 'worker[random]' -> ('worker', 'random'); 'frontend' ->
    ('frontend', 0); 'etcd[leader]'; 'workers' / 'worker[*]' -> ('worker', '*'); 'pid:1234' ->
    ('pid', 1234); any other word -> ('proc', name) (a [target.processes] entry)."""
    if t is None:
        return None
    t = str(t).strip()
    if t.startswith("pid:"):
        return ("pid", int(t[4:]))
    role, sel = t, None
    if "[" in t and t.endswith("]"):
        role, sel = t[:-1].split("[", 1)
    if role == "workers":
        role, sel = "worker", "*"
    if role == "frontends":
        role, sel = "frontend", "*"
    if role not in ("worker", "frontend", "etcd", "nats"):
        return ("proc", t)
    if sel is None:
        sel = "leader" if role == "etcd" else 0
    elif sel.isdigit():
        sel = int(sel)
    elif sel not in ("random", "*", "leader", "follower"):
        raise ScenarioError(f"bad target selector {t!r} (use [N], [random], [*], etcd[leader])")
    return (role, sel)


def _fault(f, i, managed, topology):
    where = f"faults[{i}]"
    f = _merge(FAULT_DEFAULTS, f, where, FAULT_KINDS_OF_KEYS)
    if f["what"] not in FAULT_KINDS:
        raise ScenarioError(f"{where}: what = {f['what']!r}; one of {', '.join(FAULT_KINDS)}")
    what = f["what"]
    for k in ("at", "duration", "restart_after", "exit_within"):
        f[k] = seconds(f[k], f"{where}.{k}")
    if f["at"] is None and f["after_tokens"] is None:
        raise ScenarioError(f"{where}: say when: at = \"2s\" or after_tokens = N")
    if f["pid"] is not None:
        f["target"] = f"pid:{int(f['pid'])}"
    if f["target"] is None:
        f["target"] = {"etcd_member_kill": "etcd[leader]", "etcd_outage": "etcd[*]", "nats_restart": "nats",
                       "client_disconnect_storm": "frontend[0]", "command": None}.get(what, "worker[0]")
    f["target_parsed"] = parse_target(f["target"]) if f["target"] else ("none", None)
    role = f["target_parsed"][0]
    if role not in _TARGET_ROLES[what]:
        raise ScenarioError(f"{where}: {what} cannot target {f['target']!r}")
    if what in ("sigstop", "engine_stall", "etcd_outage", "partition", "nats_restart") and not f["duration"]:
        raise ScenarioError(f"{where}: {what} needs a duration")
    if what == "command" and not f["run"]:
        raise ScenarioError(f"{where}: command needs run = \"...\"")
    if managed and role in ("pid", "proc"):
        raise ScenarioError(f"{where}: target {f['target']!r} names an outside process, but the scenario "
                            f"starts its own ([topology]); use worker[N], frontend[N], etcd[...], nats")
    if managed:
        if role == "etcd" and topology["discovery"] != "etcd":
            raise ScenarioError(f"{where}: {what} needs topology.discovery = \"etcd\"")
        if role == "nats" and topology["event_plane"] != "nats":
            raise ScenarioError(f"{where}: {what} needs topology.event_plane = \"nats\"")
        sel = f["target_parsed"][1]
        n = {"worker": topology["workers"], "frontend": topology["frontends"],
             "etcd": topology["etcd_members"]}.get(role)
        if isinstance(sel, int) and n is not None and sel >= n:
            raise ScenarioError(f"{where}: {f['target']} but the topology has {n}")
        if what == "partition" and not isinstance(sel, int):
            raise ScenarioError(f"{where}: partition needs one worker by index, e.g. worker[1]")
    if what == "partition" and not managed:
        raise ScenarioError(f"{where}: partition works on workers the tool starts in a network namespace")
    if f["expect_exit"] is None:
        f["expect_exit"] = {"sigterm": 0 if role == "worker" else None, "engine_death": 1}.get(what)
    f["abort_after"] = _range(f["abort_after"], f"{where}.abort_after")
    f["label"] = f["label"] or (f"{what} {f['target']}" if f["target"] else what)
    return f


def _max_errors(v):
    if isinstance(v, str) and v.endswith("%"):
        return ("fraction", float(v[:-1]) / 100.0)
    if isinstance(v, float) and 0 < v < 1:
        return ("fraction", v)
    return ("count", int(v))


def build(raw, path=None, name=None):
    """Validates a scenario dictionary (as read from TOML) and returns a Scenario."""
    unknown = set(raw) - _TOP
    if unknown:
        raise ScenarioError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
    for k, v in raw.items():
        _check_kind(k, v, TOP_KINDS[k])
    name = raw.get("name") or name or (os.path.splitext(os.path.basename(path))[0] if path else "scenario")
    if "topology" in raw and "target" in raw:
        raise ScenarioError("give [topology] (the tool starts processes) or [target] (an existing deployment), "
                            "not both")
    load = _merge(LOAD_DEFAULTS, raw.get("load"), "load", LOAD_KINDS)
    for k in ("duration", "request_timeout", "probe_interval"):
        load[k] = seconds(load[k], f"load.{k}")
    load["prompt_words"] = _range(load["prompt_words"], "load.prompt_words")
    load["output_tokens"] = _range(load["output_tokens"], "load.output_tokens")
    load["client_cut_events"] = _range(load["client_cut_events"], "load.client_cut_events")
    if not 0 <= load["client_cuts"] <= 1:
        raise ScenarioError("load.client_cuts: a fraction from 0 to 1")
    if load["client_cuts"] and not load["resume"]:
        raise ScenarioError("load.client_cuts needs load.resume = true (a cut stream is resumed)")
    if load["resume_elsewhere"] and not load["resume"]:
        raise ScenarioError("load.resume_elsewhere needs load.resume = true")
    if load["resume_attempts"] < 1:
        raise ScenarioError("load.resume_attempts must be >= 1")
    if load["api"] not in ("chat", "completions", "mixed"):
        raise ScenarioError("load.api: chat, completions or mixed")
    if load["stream"] not in (True, False, "mixed"):
        raise ScenarioError("load.stream: true, false or \"mixed\"")
    if load["concurrency"] < 1 or load["distinct"] < 1:
        raise ScenarioError("load.concurrency and load.distinct must be >= 1")
    if not load["duration"] and not load["requests"]:
        raise ScenarioError("load: give duration or requests")
    topology = target = None
    if "target" in raw:
        target = _merge(TARGET_DEFAULTS, raw["target"], "target", TARGET_KINDS)
        urls = list(target["urls"]) + ([target["url"]] if target["url"] else [])
        if not urls:
            raise ScenarioError("target: url (or urls) of the frontend(s) is required")
        target["urls"] = [u.rstrip("/") for u in urls]
        for pname, p in target["processes"].items():
            if not isinstance(p, dict) or not (p.get("pid") or p.get("match") or p.get("pidfile")):
                raise ScenarioError(f"target.processes.{pname}: give pid, pidfile or match")
            bad = set(p) - {"pid", "pidfile", "match", "index", "metrics", "role"}
            if bad:
                raise ScenarioError(f"target.processes.{pname}: unknown keys {', '.join(sorted(bad))}")
    else:
        topology = _merge(TOPOLOGY_DEFAULTS, raw.get("topology"), "topology", TOPOLOGY_KINDS)
        if topology["discovery"] not in ("file", "etcd"):
            raise ScenarioError("topology.discovery: file or etcd")
        if topology["event_plane"] not in ("direct", "nats"):
            raise ScenarioError("topology.event_plane: direct or nats")
        if topology["workers"] < 1 or topology["frontends"] < 1:
            raise ScenarioError("topology needs at least one worker and one frontend")
        topology["start_timeout"] = seconds(topology["start_timeout"], "topology.start_timeout")
    faults = [_fault(f, i, target is None, topology) for i, f in enumerate(raw.get("faults") or [])]
    if topology is not None:
        nets = set(topology["netns_workers"])
        nets.update(f["target_parsed"][1] for f in faults if f["what"] == "partition")
        topology["netns_workers"] = sorted(nets)
        if any(f["what"] in ("engine_death", "engine_stall") for f in faults):
            topology["worker_flags"].setdefault("fault_signals", True)
    checks = _merge(CHECK_DEFAULTS, raw.get("checks"), "checks", CHECK_KINDS)
    for k in ("request_bound", "baseline_timeout", "max_stall", "max_recovery"):
        checks[k] = seconds(checks[k], f"checks.{k}")
    bad = set(checks["allow"]) - {"error", "cut", "refused"}
    if bad:
        raise ScenarioError(f"checks.allow: unknown outcome kinds {sorted(bad)} (error, cut, refused)")
    checks["max_errors"] = _max_errors(checks["max_errors"])
    return Scenario(name, raw.get("description", ""), int(raw.get("seed", 1)), load, topology, target, faults, checks,
                    path=path, quick=bool(raw.get("quick", False)))


ENGINES = ("mocker", "llama")


def load_file(path, overrides=(), engine=None):
    """Reads and validates a TOML scenario; overrides are 'section.key=value' (TOML value syntax).
    engine (mocker, llama) runs every worker the scenario starts on that engine (--engine of
    `baton chaos`); a scenario against an existing deployment ([target]) is left as it is."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"{path}: {e}") from e
    # [engines.<name>] set = ["key=value", ...]: what a scenario changes for one engine (a real
    # engine's streams are faster or slower than the mocker's), applied with --engine <name>
    per_engine = raw.pop("engines", None) or {}
    if not isinstance(per_engine, dict) or any(e not in ENGINES or not isinstance(v, dict) or set(v) - {"set"}
                                               for e, v in per_engine.items()):
        raise ScenarioError(f"{path}: [engines.<name>] takes one key, set, for the engines {', '.join(ENGINES)}")
    if engine is not None:
        if engine not in ENGINES:
            raise ScenarioError(f"--engine {engine!r}: one of {', '.join(ENGINES)}")
        if "target" not in raw:
            raw.setdefault("topology", {}).setdefault("worker_flags", {})["engine"] = engine
            apply_overrides(raw, (per_engine.get(engine) or {}).get("set") or (), f"{path}: [engines.{engine}] set")
    apply_overrides(raw, overrides)
    try:
        return build(raw, path=path)
    except (ScenarioError, ValueError) as e:
        raise ScenarioError(f"{path}: {e}") from e


def _toml_value(text):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text.startswith("[") and text.endswith("]"):  # [cut,refused]: the shell ate the quotes
            return [_toml_value(w.strip().strip("'\"")) for w in text[1:-1].split(",") if w.strip()]
        return text  # a bare word is a string


def _override_kind(raw, parts):
    """The kind of value the override path `parts` (['faults', '0', 'at']) takes, or a
    ScenarioError naming the path and what would be right. Checked before raw is touched, so that
    a path that leads nowhere (a fault the scenario does not have, a key no section knows) is a
    usage error, not an IndexError or a silently ignored key."""
    top = parts[0]
    if top not in TOP_KINDS:
        raise ScenarioError(f"unknown key {top!r} (known: {', '.join(sorted(TOP_KINDS))})")
    if len(parts) == 1:
        return TOP_KINDS[top]
    if top in _SECTION_KINDS:
        kinds = _SECTION_KINDS[top]
        if parts[1] not in kinds:
            raise ScenarioError(f"{top} has no key {parts[1]!r} (known: {', '.join(sorted(kinds))})")
        if len(parts) == 2:
            return kinds[parts[1]]
        if top == "topology" and parts[1] in ("worker_flags", "frontend_flags") and len(parts) == 3:
            return ("a flag value (a string, a number or true)", _is_scalar)
        if top == "target" and parts[1] == "processes" and len(parts) in (3, 4):
            return TABLE if len(parts) == 3 else ("a string or a number", lambda v: isinstance(v, (str, int)))
        raise ScenarioError(f"{top}.{parts[1]} has no keys below it")
    if top == "faults":
        faults = raw.get("faults") or []
        n = len(faults) if isinstance(faults, list) else 0
        if not parts[1].isdigit() or int(parts[1]) >= n:
            have = "the scenario has no faults" if n == 0 else \
                f"the scenario has {n} fault{'s' if n > 1 else ''} (faults.0" + (f" to faults.{n - 1})" if n > 1 else ")")
            raise ScenarioError(f"no fault {parts[1]!r}: {have}")
        if len(parts) == 2:
            return TABLE
        if len(parts) == 3 and parts[2] in FAULT_KINDS_OF_KEYS:
            return FAULT_KINDS_OF_KEYS[parts[2]]
        raise ScenarioError(f"a fault has no key {'.'.join(parts[2:])!r} "
                            f"(known: {', '.join(sorted(FAULT_KINDS_OF_KEYS))})")
    raise ScenarioError(f"{top} has no keys below it")


def apply_overrides(raw, overrides, where="--set"):
    """'topology.workers=3', 'checks.max_errors=2', 'faults.0.at=3s', 'seed=7' edit raw in place.
    The path must name a key a scenario has (a fault by the index it has in the scenario) and the
    value must be of that key's kind: a ScenarioError names the override and what it takes."""
    for ov in overrides or ():
        key, eq, val = ov.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            raise ScenarioError(f"{where} {ov}: expected key=value, e.g. load.concurrency=4 or faults.0.at=3s")
        try:
            value = _toml_value(val.strip())
            what, ok = _override_kind(raw, parts)
            if not ok(value):
                raise ScenarioError(f"expected {what}, got {value!r}")
        except ScenarioError as e:
            raise ScenarioError(f"{where} {ov}: {e}") from None
        node = raw
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise ScenarioError(f"{where} {ov}: {p} is not a table in the scenario")
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value


def parse_kv_words(text, where):
    """'kill9 pid=1234 at=2s' -> ('kill9', {'pid': 1234, 'at': '2s'}); values in TOML syntax or
    bare words."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ScenarioError(f"{where} {text!r}: {e}") from e
    head = None
    kv = {}
    for w in words:
        k, eq, v = w.partition("=")
        if not eq:
            if head is not None:
                raise ScenarioError(f"{where} {text!r}: unexpected word {w!r}")
            head = w
            continue
        kv[k.replace("-", "_")] = _toml_value(v)
    return head, kv


def from_cli(urls, fault_specs, load_spec, checks_spec, worker_metrics, model, name="cli"):
    """A scenario against an existing deployment from command-line one-liners:
    --url URL (repeatable), --fault 'kill9 pid=1234 at=2s' (repeatable), --load 'concurrency=8
    duration=10s stream=true', --checks 'allow=["cut"] max_errors=3', --worker-metrics URL."""
    raw = {"name": name, "target": {"urls": list(urls), "worker_metrics": list(worker_metrics or [])}}
    if model:
        raw["target"]["model"] = model
    faults = []
    for spec in fault_specs or ():
        what, kv = parse_kv_words(spec, "--fault")
        if what is None:
            raise ScenarioError(f"--fault {spec!r}: name the fault first, e.g. 'kill9 pid=1234 at=2s'")
        kv["what"] = what
        faults.append(kv)
    raw["faults"] = faults
    if load_spec:
        head, kv = parse_kv_words(load_spec, "--load")
        if head:
            raise ScenarioError(f"--load {load_spec!r}: key=value words only")
        raw["load"] = kv
    if checks_spec:
        head, kv = parse_kv_words(checks_spec, "--checks")
        if head:
            raise ScenarioError(f"--checks {checks_spec!r}: key=value words only")
        raw["checks"] = kv
    try:
        return build(raw, name=name)
    except (ScenarioError, ValueError) as e:  # seconds() says ValueError: a usage error all the same
        raise ScenarioError(str(e)) from e
