"""runner — one scenario from start to verdict.

  1. start the topology (or take the target deployment's URLs and processes);
  2. references: send every distinct request shape once with no fault, and check that the
     deployment is deterministic (two shapes sent again must come back identical);
  3. baseline: wait until the gauges are still, then read them (and open descriptors);
  4. the faulted run: the load, the recovery prober, the metrics sampler and one thread per fault,
     all on one clock (seconds since the load started);
  5. afterwards: wait (bounded) for the gauges to return to baseline, send fresh requests, stop
     everything, note every process that died without a fault aimed at it;
  6. evaluate the checks, write run.json and timeline.svg, return the row of the report.
Every wait is bounded, so a scenario always ends with a verdict.
"""

import json
import os
import shutil
import time
import traceback

from . import checks, faults, loadgen, observe, report
from .topology import SetupError, Topology
from .util import batonlib, log


class Unavailable(SetupError):
    """The machine lacks something the scenario needs (etcd, nats-server, root for namespaces)."""


def _needs(sc):
    if not sc.managed:
        return None
    t = sc.topology
    if t["discovery"] == "etcd" and not shutil.which("etcd"):
        return "etcd is not installed"
    if t["event_plane"] == "nats" and not shutil.which("nats-server"):
        return "nats-server is not installed"
    if t["netns_workers"] and (os.geteuid() != 0 or not shutil.which("ip")):
        return "network namespaces need root and iproute2"
    return None


def _storm_shapes(sc, model):
    out = {}
    for i, f in enumerate(sc.faults):
        if f["what"] == "client_disconnect_storm":
            body = loadgen.make_body("chat", True, f"storm {i} of dropped streams", f["output_tokens"], model,
                                     1000 + i)
            out[i] = loadgen.Shape(-100 - i, "chat", True, body)
    return out


def _first_model(url):
    bl = batonlib()
    st, _, body = bl.get_json(url.rstrip("/") + "/v1/models", timeout=10)
    if st != 200 or not isinstance(body, dict) or not body.get("data"):
        raise SetupError(f"GET {url}/v1/models -> {st}: {str(body)[:200]}; give the model with --model")
    return body["data"][0]["id"]


def _gauges_only(snap):
    return {n: {k: v for k, v in e.items() if k not in ("pid", "fds", "fd_table", "fd_new")} for n, e in snap.items()}


def _settle(endpoints, infra, timeout=10.0):
    """Waits until two consecutive readings of the gauges agree; returns the last snapshot."""
    prev = observe.snapshot(endpoints, exclude_ports=infra)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.3)
        cur = observe.snapshot(endpoints, exclude_ports=infra)
        if _gauges_only(cur) == _gauges_only(prev):
            return cur
        prev = cur
    return prev


def _back_to_baseline(before, endpoints, infra, gone, timeout, fds_check):
    """Polls until every gauge equals its baseline (and descriptors are not above it) or timeout;
    returns (after snapshot, seconds waited, what each poll that was not back found off: a list of
    [seconds, ["name.key = value (baseline b)", ...]] — the descriptors named when above)."""
    start = time.monotonic()
    polls = []
    while True:
        after = observe.snapshot(endpoints, exclude_ports=infra)
        off = []
        for name, vals in before.items():
            if name in gone:
                continue
            a = after.get(name) or {}
            if not a.get("up"):
                off.append(f"{name} down")
                continue
            for k, v in vals.items():
                if k in ("pid", "up", "fd_table"):
                    continue
                if k == "fds":
                    if fds_check and vals.get("pid") == a.get("pid") and a.get("fds") is not None and v is not None \
                            and a["fds"] > v:
                        # named now, while the process lives: the check reports them from here
                        a["fd_new"] = observe.new_descriptors(vals.get("fd_table"), a.get("fd_table"), a.get("pid"))
                        off.append(f"{name}.fds = {a['fds']} (baseline {v}; new: {'; '.join(a['fd_new'])})")
                elif a.get(k) != v:
                    off.append(f"{name}.{k} = {a.get(k)} (baseline {v})")
        waited = time.monotonic() - start
        if off:
            polls.append([round(waited, 2), off])
        if not off or waited >= timeout:
            # a long wait keeps its first and last polls: how it began and how it ended
            return after, round(waited, 2), polls if len(polls) <= 40 else polls[:20] + polls[-20:]
        time.sleep(0.25)


def run_scenario(sc, bin_path, out_dir, tag):
    """Runs one scenario; returns its report row (report.scenario_result)."""
    run_dir = os.path.join(out_dir, sc.name)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)
    svg_rel = f"{sc.name}/timeline.svg"
    logs_rel = f"{sc.name}/"
    missing = _needs(sc)
    if missing:
        log(f"{sc.name}: SKIP ({missing})")
        return report.scenario_result(sc.name, sc.description, "SKIP", None, [], None, None, reason=missing)
    try:
        run = _run(sc, bin_path, run_dir, tag)
    except SetupError as e:
        log(f"{sc.name}: ERROR: {e}")
        return report.scenario_result(sc.name, sc.description, "ERROR", None, [], None, logs_rel, reason=str(e))
    except Exception as e:  # noqa: BLE001 — a defect of the tool must not stop the other scenarios
        with open(os.path.join(run_dir, "error.txt"), "w") as f:
            f.write(traceback.format_exc())
        log(f"{sc.name}: ERROR in the tool: {e!r} (traceback in {sc.name}/error.txt)")
        return report.scenario_result(sc.name, sc.description, "ERROR", None, [], None, logs_rel,
                                      reason=f"chaos tool error: {e!r}")
    verdict, results = checks.evaluate(run, sc.checks)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"scenario": sc.to_dict(), "verdict": verdict, "checks": results, "run": run}, f, default=str)
    report.write_svg(os.path.join(run_dir, "timeline.svg"), run, f"{sc.name} — {verdict}")
    for c in results:
        log(f"{sc.name}: {c['name']}: {({True: 'pass', False: 'FAIL', None: 'skipped'})[c['ok']]} — "
            f"{c['detail'][:300]}")
    log(f"{sc.name}: {verdict}")
    return report.scenario_result(sc.name, sc.description, verdict, run, results, svg_rel, logs_rel)


def _run(sc, bin_path, run_dir, tag):
    load_cfg = sc.load
    topo = None
    processes = {}
    try:
        if sc.managed:
            if not bin_path or not os.access(bin_path, os.X_OK):
                raise SetupError(f"baton binary not found or not executable: {bin_path} (use --bin or BATON_BIN)")
            log(f"{sc.name}: starting {sc.topology['frontends']} frontend(s), {sc.topology['workers']} worker(s)"
                + (f", etcd x{sc.topology['etcd_members']}" if sc.topology["discovery"] == "etcd" else "")
                + (", nats" if sc.topology["event_plane"] == "nats" else "")
                + (f", netns {sc.topology['netns_workers']}" if sc.topology["netns_workers"] else ""))
            topo = Topology(sc.topology, bin_path, run_dir, tag)
            topo.start()
            urls = topo.frontend_urls()
            model = load_cfg["model"] or sc.topology["model"]
            endpoints = [observe.Endpoint(m.name, "frontend", lambda m=m: m.url, lambda m=m: m.pid)
                         for m in topo.frontends]
            endpoints += [observe.Endpoint(m.name, "worker", lambda m=m: m.system_url, lambda m=m: m.pid)
                          for m in topo.workers]
        else:
            tg = sc.target
            urls = tg["urls"]
            model = load_cfg["model"] or tg["model"] or _first_model(urls[0])
            processes = tg["processes"]
            endpoints = [observe.Endpoint(f"frontend[{i}]", "frontend", lambda u=u: u) for i, u in enumerate(urls)]
            endpoints += [observe.Endpoint(f"worker-metrics[{i}]", "worker", lambda u=u: u)
                          for i, u in enumerate(tg["worker_metrics"])]
            for pname, p in processes.items():
                if p.get("metrics") and p.get("role") in ("frontend", "worker"):
                    endpoints.append(observe.Endpoint(pname, p["role"], lambda u=p["metrics"]: u,
                                                      lambda n=pname, p=p: _safe_pid(n, p)))
        return _run_with(sc, topo, urls, model, endpoints, processes, run_dir)
    finally:
        if topo is not None:
            topo.stop()


def _safe_pid(name, spec):
    try:
        return faults.resolve_external(name, spec)
    except (faults.FaultError, OSError, ValueError):
        return None


def _run_with(sc, topo, urls, model, endpoints, processes, run_dir):
    load_cfg = sc.load
    timeout = load_cfg["request_timeout"]
    shapes = loadgen.make_shapes(load_cfg, model, sc.seed)
    probe = loadgen.probe_shape(model, sc.seed)
    storm = _storm_shapes(sc, model)
    every = shapes + [probe] + list(storm.values())

    # 2. references
    log(f"{sc.name}: references: {len(every)} request shapes, no fault")
    tr = time.monotonic()
    refs = loadgen.run_all(urls[0], every, tr, timeout, load_cfg["concurrency"], "reference")
    bad = [r for r in refs if r.outcome != "ok"]
    if bad:
        raise SetupError(f"{len(bad)} reference requests failed with no fault: {bad[0].summary()}")
    again = loadgen.run_all(urls[-1], shapes[:2], tr, timeout, 2, "reference")
    for a, r in zip(again, refs):
        if a.outcome != "ok" or a.token_ids != r.token_ids or a.text != r.text:
            raise SetupError(f"the deployment is not deterministic: shape {r.shape} gave two different outputs "
                             f"with no fault; byte-exact checks are impossible")
        if not r.token_ids:
            raise SetupError("responses carry no token_ids (\"return_token_ids\": true is not honoured)")
    references = {str(s.index): r.to_dict() for s, r in zip(every, refs)}

    # 3. baseline
    infra = set()
    if topo is not None:
        infra = {m.port for m in topo.etcd} | ({topo.nats.port} if topo.nats else set())
    before = _settle(endpoints, infra)
    baseline_pids = {e.get("pid") for e in before.values() if e.get("pid")}
    log(f"{sc.name}: baseline {json.dumps(_gauges_only(before))[:400]}")

    # 4. the faulted run
    t0 = time.monotonic()
    sampler = observe.Sampler(endpoints, t0)
    sampler.start()
    load = loadgen.Load(urls, shapes, load_cfg, t0)
    prober = loadgen.Prober(urls, probe, load_cfg["probe_interval"], t0, min(timeout, 30.0))
    env = faults.Env(t0, topology=topo, processes=processes, load=load, seed=sc.seed, urls=urls, storm_shapes=storm,
                     request_timeout=timeout)
    fts = [faults.Fault(f, env, i) for i, f in enumerate(sc.faults)]
    log(f"{sc.name}: load: {load_cfg['concurrency']} clients, "
        + (f"{load_cfg['duration']:g} s" if load_cfg["duration"] else f"{load_cfg['requests']} requests")
        + f"; faults: {', '.join(f['label'] for f in sc.faults) or 'none'}")
    load.start()
    prober.start()
    for f in fts:
        f.start()
    load_bound = (load_cfg["duration"] or 120) + timeout + 30
    if not load.join(load_bound):
        log(f"{sc.name}: load still running after {load_bound:.0f} s; its open requests count as hung")
    for f, spec in zip(fts, sc.faults):
        bound = (spec["at"] or 0) + spec["duration"] + spec["exit_within"] + spec["restart_after"] + 60
        f.join(max(1.0, bound - (time.monotonic() - t0)))
    env.abort.set()
    time.sleep(1.0)  # a last probe after the last fault
    prober.stop()
    log(f"{sc.name}: load done: {len(load.records)} requests, {load.tokens} tokens")

    # 5. afterwards
    gone = set()
    if topo is not None:
        gone = {m.name for m in topo.members() if not m.alive()}
        if topo.frontends and any(m.alive() for m in topo.frontends):
            try:
                topo.wait_routable(sc.checks["baseline_timeout"], n=sum(1 for w in topo.workers if w.alive()))
            except SetupError as e:
                log(f"{sc.name}: {e}")
    after, waited, polls = _back_to_baseline(before, endpoints, infra, gone, sc.checks["baseline_timeout"],
                                             sc.checks["fds"])
    fresh = []
    live = [m.url for m in topo.frontends if m.alive()] if topo is not None else urls
    for i in range(sc.checks["fresh_requests"] if live else 0):
        fresh.append(loadgen.send(live[i % len(live)], shapes[i % len(shapes)], t0, timeout, "fresh", i))
    sampler.stop()
    migrations = sampler.migrations_performed(baseline_pids)
    migration_events = sampler.counter_delta("migrations", "frontend", baseline_pids)
    migration_limit = sampler.migration_limit(baseline_pids)
    resumes = sampler.counter_delta("resumes", "frontend", baseline_pids)
    proc_info = None
    if topo is not None:
        proc_info = _process_outcomes(topo, [f.record for f in fts])
    run = {"urls": urls, "model": model, "shapes": [s.to_dict() for s in every], "references": references,
           "requests": [r.to_dict() for r in sorted(load.records, key=lambda r: r.seq)],
           "probes": [r.to_dict() for r in prober.records], "fresh": [r.to_dict() for r in fresh],
           "storm": [r.to_dict() for r in env.storm_records], "faults": [f.record for f in fts],
           "baseline": {"before": before, "after": after, "waited": waited, "expected_gone": sorted(gone),
                        "polls": polls},
           "migrations": migrations, "migration_events": migration_events,
           "migration_limit": migration_limit, "processes": proc_info, "samples": sampler.samples,
           "tokens_delivered": load.tokens, "resumes": resumes}
    return run


def _process_outcomes(topo, fault_records):
    """Processes that exited during the run without a fault aimed at them; exit status of every
    process at teardown; sanitizer reports in the logs."""
    targeted = {pid for f in fault_records for pid in f.get("pids") or []}
    unexpected = []
    teardown_procs = []
    for m in topo.members():
        for p in _generations(m):
            rc = p.returncode
            if rc is not None and p.pid not in targeted:
                unexpected.append({"name": m.name, "pid": p.pid, "status": rc})
            elif rc is None and p is m.proc:
                teardown_procs.append((m, p))
    topo.stop()
    teardown = {}
    for m, p in teardown_procs:
        if m.role in ("frontend", "worker"):
            teardown[f"{m.name} (pid {p.pid})"] = p.returncode
    sanitizer = []
    for m in topo.members():
        for p in _generations(m):
            r = p.sanitizer_report()
            if r:
                sanitizer.append({"name": f"{m.name} (pid {p.pid})", "report": r})
    return {"unexpected_exits": unexpected, "teardown": teardown, "sanitizer": sanitizer}


def _generations(m):
    bl = batonlib()
    return [p for p in bl.all_procs() if p.pid in m.pids]
