"""checks — the oracle, as pure functions from a recorded run to verdicts.

A run is a plain dictionary (what runner records and writes to run.json): the load's requests,
the probes, the fresh requests sent after recovery, the storm streams, the fault-free reference of
every request shape, the fault records, the baseline and after-run gauges, the migration count and
what happened to the processes. Each check returns {"name", "ok", "detail", "stats"}; ok is True,
False, or None when there was nothing it could check (reported as skipped, never as a pass).
Because checks see only data, tests/integration/test_chaos_checkers.py feeds each one a broken run
(a dropped token, a duplicated token, a hung request, a leaked gauge, a fault that never happened)
and sees it fail.
"""

import difflib

from . import observe


def _result(name, ok, detail, **stats):
    return {"name": name, "ok": ok, "detail": detail, "stats": stats}


def _ref_for(run, rec):
    return run["references"].get(str(rec["shape"]))


def token_diff(ref_ids, got_ids):
    """(lost, duplicated) tokens between a reference and an output: tokens of the reference
    missing from the output, and tokens of the output that the reference does not have there
    (duplicates, reorderings and wrong tokens)."""
    lost = dup = 0
    sm = difflib.SequenceMatcher(None, ref_ids, got_ids, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "delete":
            lost += i2 - i1
        elif op == "insert":
            dup += j2 - j1
        elif op == "replace":
            lost += i2 - i1
            dup += j2 - j1
    return lost, dup


def compare(ref, rec):
    """Problems of one output against its reference: [] when byte-identical. A completed request
    must equal the reference in text, token ids and finish_reason; one that ended early (error,
    cut, aborted) must be a prefix of it."""
    probs = []
    got_ids, ref_ids = rec["token_ids"] or [], ref["token_ids"] or []
    got_text, ref_text = rec["text"] or "", ref["text"] or ""
    if rec["outcome"] == "ok":
        if got_ids != ref_ids:
            lost, dup = token_diff(ref_ids, got_ids)
            probs.append(f"token ids differ ({len(got_ids)} vs {len(ref_ids)}; lost {lost}, extra {dup})")
        if got_text != ref_text:
            probs.append(f"text differs at char {_first_diff(got_text, ref_text)} "
                         f"({len(got_text)} vs {len(ref_text)} chars)")
        if rec.get("finish_reason") != ref.get("finish_reason"):
            probs.append(f"finish_reason {rec.get('finish_reason')!r} vs {ref.get('finish_reason')!r}")
        if not ref_ids and ref_text:
            probs.append("the reference has no token ids (return_token_ids unsupported?)")
    else:
        if got_ids != ref_ids[:len(got_ids)]:
            lost, dup = token_diff(ref_ids[:len(got_ids)], got_ids)
            probs.append(f"partial output is not a prefix of the reference (lost {lost}, extra {dup})")
        if not ref_text.startswith(got_text):
            probs.append(f"partial text is not a prefix of the reference (differs at char "
                         f"{_first_diff(got_text, ref_text)})")
    return probs


def _first_diff(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _outputs(run):
    for kind in ("requests", "fresh", "probes", "storm"):
        for rec in run.get(kind) or []:
            yield kind, rec


def token_accounting(run):
    """(lost, duplicated) tokens over every output, as the report's table counts them: tokens of
    the reference the client never received, and tokens it received that the reference does not
    have there. An output that ended early (error, cut, hang) is compared with its whole reference,
    so the tokens after the cut are lost, and each reference token counts once (a wrong token
    before the cut and the missing tail are one diff, not two). Two outputs lose nothing they were
    not sent: a stream the client dropped on purpose (a storm stream: only the part it read is
    compared) and a refused connection with no output (the request never reached a server)."""
    lost = dup = 0
    for _, rec in _outputs(run):
        ref = _ref_for(run, rec)
        if ref is None:
            continue
        ids, rids = rec["token_ids"] or [], ref["token_ids"] or []
        if rec["outcome"] == "refused" and not ids:
            continue
        if rec["outcome"] == "aborted":
            rids = rids[:len(ids)]
        l, d = token_diff(rids, ids)
        lost += l
        dup += d
    return lost, dup


def check_byte_exact(run, cfg):
    """Every output equals the fault-free reference of its shape (completed ones entirely, ones
    that ended early as a prefix): no lost, duplicated or reordered token, text or id."""
    if not cfg.get("byte_exact", True):
        return _result("byte_exact", None, "off")
    bad = []
    lost = dup = compared = 0
    for kind, rec in _outputs(run):
        if rec["outcome"] in ("refused", "timeout") and not rec["token_ids"] and not rec["text"]:
            continue
        ref = _ref_for(run, rec)
        if ref is None:
            bad.append(f"{kind}#{rec['seq']}: no reference for shape {rec['shape']}")
            continue
        compared += 1
        probs = compare(ref, rec)
        if probs:
            ids = rec["token_ids"] or []
            rids = ref["token_ids"] or []
            l, d = token_diff(rids if rec["outcome"] == "ok" else rids[:len(ids)], ids)
            lost += l
            dup += d
            bad.append(f"{kind}#{rec['seq']} (shape {rec['shape']}, {rec['outcome']}): {'; '.join(probs)}")
    if compared == 0:
        return _result("byte_exact", False, "no output to compare", lost=0, duplicated=0, compared=0)
    if bad:
        return _result("byte_exact", False, f"{len(bad)} outputs differ from their reference: " + " | ".join(bad[:5]),
                       lost=lost, duplicated=dup, compared=compared, mismatches=len(bad))
    return _result("byte_exact", True, f"{compared} outputs byte-identical to their references", lost=0,
                   duplicated=0, compared=compared, mismatches=0)


def _allowed_errors(cfg, n):
    kind, v = cfg.get("max_errors", ("count", 0))
    if kind == "fraction":
        return int(v * n + 1e-9)
    return int(v)


ERROR_GRACE = 2.0  # seconds after a fault's end during which its errors may still arrive


def fault_for_error(run, rec):
    """The label of a fault that explains a failed request: it ended between the fault's
    injection and ERROR_GRACE seconds after the fault ended (restart included), and, when the fault
    hit a frontend, it was sent to that frontend. None if no fault explains it."""
    for f in run.get("faults") or []:
        if f.get("t_inject") is None or rec["t_end"] is None:
            continue
        end = max(x for x in (f.get("t_end"), f.get("t_restore"), f["t_inject"]) if x is not None)
        if not (f["t_inject"] - 0.05 <= rec["t_end"] <= end + ERROR_GRACE):
            continue
        if f.get("urls") and rec.get("url") not in f["urls"]:
            continue
        return f["label"]
    return None


def check_all_ended(run, cfg):
    """Every load request ended within the bound: completed, or (where the scenario allows) an
    explicit error, a cut stream or a refused connection that a fault explains (in its time
    window, and on the frontend it hit). A timeout (hung request) or a malformed answer always
    fails."""
    if not cfg.get("all_ended", True):
        return _result("all_ended", None, "off")
    reqs = run.get("requests") or []
    if not reqs:
        return _result("all_ended", False, "the load sent no requests", requests=0)
    allow = set(cfg.get("allow") or [])
    bound = cfg.get("request_bound")
    problems = []
    counts = {}
    slowest = 0.0
    for rec in reqs:
        counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
        d = (rec["t_end"] - rec["t_send"]) if rec["t_end"] is not None and rec["t_send"] is not None else None
        if d is None:
            problems.append(f"#{rec['seq']} never ended")
            continue
        slowest = max(slowest, d)
        if rec["outcome"] in ("timeout", "protocol", None):
            problems.append(f"#{rec['seq']} {rec['outcome']} after {d:.1f} s")
        elif rec["outcome"] != "ok" and rec["outcome"] not in allow:
            problems.append(f"#{rec['seq']} ended {rec['outcome']} ({_err_text(rec)}), not allowed")
        elif rec["outcome"] != "ok" and fault_for_error(run, rec) is None:
            problems.append(f"#{rec['seq']} ended {rec['outcome']} at {rec['t_end']:.2f} s on {rec.get('url')}, "
                            f"which no fault explains ({_err_text(rec)})")
        if bound is not None and d > bound:
            problems.append(f"#{rec['seq']} took {d:.1f} s > bound {bound:.1f} s")
    errors = sum(v for k, v in counts.items() if k != "ok")
    limit = _allowed_errors(cfg, len(reqs))
    if errors > limit:
        problems.append(f"{errors} requests did not complete (at most {limit} allowed)")
    stats = dict(requests=len(reqs), completed=counts.get("ok", 0), errors=errors, outcomes=counts,
                 slowest=round(slowest, 3))
    if problems:
        return _result("all_ended", False, "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""), **stats)
    return _result("all_ended", True, f"{len(reqs)} requests ended: {counts}; slowest {slowest:.2f} s", **stats)


def _err_text(rec):
    e = rec.get("error")
    if isinstance(e, dict):
        return str(e.get("message"))[:80]
    return str(e or rec.get("exception") or "")[:80]


def check_baseline(run, cfg):
    """After the run, every gauge (in-flight requests, HTTP connections, worker streams, routable
    workers, active sequences, KV blocks, frontend connections) equals its pre-fault value, and no
    process the tool can see holds more descriptors than before."""
    if not cfg.get("baseline", True):
        return _result("baseline", None, "off")
    b = run.get("baseline")
    if not b or not b.get("before"):
        return _result("baseline", None, "no metrics endpoints to read")
    before, after = b["before"], b.get("after") or {}
    gone = set(b.get("expected_gone") or [])
    problems = []
    compared = 0
    for name, vals in before.items():
        if name in gone:
            continue
        a = after.get(name)
        if not a or not a.get("up"):
            problems.append(f"{name}: metrics unreachable after the run")
            continue
        for k, v in vals.items():
            if k in ("pid", "up", "fds", "fd_table"):
                continue
            if k not in a:
                problems.append(f"{name}.{k}: missing after the run")
                continue
            compared += 1
            if a[k] != v:
                problems.append(f"{name}.{k} = {a[k]:g}, baseline {v:g}")
        if cfg.get("fds", True) and vals.get("fds") is not None and a.get("fds") is not None \
                and vals.get("pid") == a.get("pid"):
            compared += 1
            if a["fds"] > vals["fds"]:
                new = a.get("fd_new") or observe.new_descriptors(vals.get("fd_table"), a.get("fd_table"))
                problems.append(f"{name} holds {a['fds']} descriptors, baseline {vals['fds']}"
                                + (f" (new: {'; '.join(new)})" if new else ""))
    if compared == 0:
        return _result("baseline", False, "; ".join(problems) or "no gauge could be compared", compared=0)
    waited = b.get("waited")
    if problems:
        return _result("baseline", False, "not back to baseline after "
                       f"{waited if waited is not None else '?'} s: " + "; ".join(problems[:8]), compared=compared)
    return _result("baseline", True, f"{compared} gauges back to baseline"
                   + (f" after {waited:.1f} s" if waited is not None else ""), compared=compared)


def check_fresh(run, cfg):
    """Requests sent after the fault (and after the gauges settled) all complete byte-exact."""
    n = cfg.get("fresh_requests", 0)
    if not n:
        return _result("fresh_request", None, "off")
    fresh = run.get("fresh") or []
    if len(fresh) < n:
        return _result("fresh_request", False, f"{len(fresh)} fresh requests sent, {n} expected")
    bad = []
    for rec in fresh:
        ref = _ref_for(run, rec)
        if rec["outcome"] != "ok":
            bad.append(f"#{rec['seq']} {rec['outcome']} ({_err_text(rec)})")
        elif ref is None or compare(ref, rec):
            bad.append(f"#{rec['seq']} differs from its reference")
    if bad:
        return _result("fresh_request", False, "; ".join(bad))
    return _result("fresh_request", True, f"{len(fresh)} fresh requests completed byte-exact")


def check_evidence(run, cfg):
    """Every fault was injected and left evidence that it took effect."""
    if not cfg.get("evidence", True):
        return _result("evidence", None, "off")
    faults = run.get("faults") or []
    if not faults:
        return _result("evidence", None, "no faults in this scenario")
    bad = []
    for f in faults:
        if f.get("t_inject") is None:
            bad.append(f"{f['label']}: never injected ({f.get('error') or 'no reason recorded'})")
        elif f.get("error"):
            bad.append(f"{f['label']}: {f['error']}")
        elif f.get("evidence_ok") is not True:
            missing = [e for e in f.get("evidence") or [] if not e.startswith("ok:")]
            bad.append(f"{f['label']}: " + ("; ".join(missing) if missing else "no evidence recorded"))
    if bad:
        return _result("evidence", False, " | ".join(bad))
    lines = [f"{f['label']}: " + "; ".join(e[4:] for e in f["evidence"]) for f in faults]
    return _result("evidence", True, " | ".join(lines))


def check_migrations(run, cfg):
    """The frontends' migration counters moved within [min_migrations, max_migrations]."""
    lo, hi = cfg.get("min_migrations", 0), cfg.get("max_migrations", -1)
    m = run.get("migrations")
    if lo <= 0 and hi < 0:
        return _result("migrations", None, f"not bounded ({m if m is not None else 'unknown'} migrations)",
                       migrations=m)
    if m is None:
        return _result("migrations", False, "no migration counter readable", migrations=None)
    if m < lo:
        # say why, from what the run saw: a guess that the fault hit nothing would mislead when
        # streams failed at the fault, or when the frontends could not migrate at all
        hit = sum(1 for r in run.get("requests") or [] if r["outcome"] not in ("ok", "refused")
                  and fault_for_error(run, r) is not None)
        if run.get("migration_limit") == 0:
            why = "migration is off (every frontend's --migration-limit is 0)"
            why += f"; {hit} load request{'s' if hit > 1 else ''} failed at the fault" if hit else ""
        elif hit:
            why = f"{hit} load request{'s' if hit > 1 else ''} failed at the fault instead of migrating"
        else:
            why = "no load request failed either: the fault hit no stream?"
        return _result("migrations", False, f"{m:g} migrations, at least {lo} expected: {why}", migrations=m)
    if 0 <= hi < m:
        return _result("migrations", False, f"{m:g} migrations, at most {hi} expected", migrations=m)
    return _result("migrations", True, f"{m:g} migrations (bounds {lo}..{hi if hi >= 0 else 'any'})", migrations=m)


def check_resumes(run, cfg):
    """Load requests that resumed a cut stream (re-POST with Last-Event-ID), and the frontends'
    resume counter, reached min_resumes."""
    lo = cfg.get("min_resumes", 0)
    client = sum(r.get("resumes") or 0 for r in run.get("requests") or [])
    server = run.get("resumes")
    if lo <= 0:
        return _result("resumes", None, f"not bounded ({client} resumes by the load)", resumes=client)
    if client < lo:
        return _result("resumes", False, f"{client} resumes by the load, at least {lo} expected", resumes=client)
    if server is None or server < client:
        return _result("resumes", False, f"the load resumed {client} times but the frontends counted {server}",
                       resumes=client)
    return _result("resumes", True, f"{client} resumes by the load (frontends counted {server:g}; at least {lo})",
                   resumes=client)


def worst_stall(run):
    """(seconds, request seq) of the longest wait between progress points of a completed load
    request (send, then each token event)."""
    best = (None, None)
    for rec in run.get("requests") or []:
        if rec["outcome"] != "ok" or rec["t_send"] is None:
            continue
        pts = [rec["t_send"]] + [e[0] for e in rec["events"] or []]
        for a, b in zip(pts, pts[1:]):
            if best[0] is None or b - a > best[0]:
                best = (b - a, rec["seq"])
    return best


def check_stall(run, cfg):
    bound = cfg.get("max_stall")
    w, seq = worst_stall(run)
    if bound is None:
        return _result("stall", None, f"not bounded (worst {w:.2f} s)" if w is not None else "not bounded",
                       worst=w)
    if w is None:
        return _result("stall", False, "no completed request to measure", worst=None)
    if w > bound:
        return _result("stall", False, f"request #{seq} waited {w:.2f} s between tokens > {bound:.2f} s", worst=w)
    return _result("stall", True, f"worst wait {w:.2f} s (request #{seq}) <= {bound:.2f} s", worst=w)


HEALTHY_FLOOR = 0.25  # seconds: a probe this fast is healthy whatever the pre-fault latency


def probe_healthy_bound(run):
    """A probe is healthy when it completes within this many seconds: three times the median
    duration of the probes that ended before the first fault, and at least HEALTHY_FLOOR."""
    first = min((f["t_inject"] for f in run.get("faults") or [] if f.get("t_inject") is not None), default=None)
    pre = sorted(p["t_end"] - p["t_send"] for p in run.get("probes") or []
                 if p["outcome"] == "ok" and p["t_end"] is not None and (first is None or p["t_end"] < first))
    med = pre[len(pre) // 2] if pre else 0.0
    return max(HEALTHY_FLOOR, 3.0 * med)


def recovery_times(run):
    """For each injected fault: seconds from the injection to the end of the first probe, sent at
    or after it, from which every probe up to the next fault was healthy (completed, within
    probe_healthy_bound). None: never recovered, or no probe ran. A probe that succeeded only
    after waiting out the fault (a migration after a stall timeout) is not healthy: recovery
    counts until the service answers at its normal speed again."""
    probes = sorted(run.get("probes") or [], key=lambda r: r["t_send"] if r["t_send"] is not None else 0)
    faults = sorted([f for f in run.get("faults") or [] if f.get("t_inject") is not None],
                    key=lambda f: f["t_inject"])
    bound = probe_healthy_bound(run)

    def healthy(p):
        return p["outcome"] == "ok" and p["t_end"] is not None and p["t_end"] - p["t_send"] <= bound

    def window_of(i):
        t = faults[i]["t_inject"]
        nxt = faults[i + 1]["t_inject"] if i + 1 < len(faults) else float("inf")
        return [p for p in probes if p["t_send"] is not None and t <= p["t_send"] < nxt]

    def recovered_in(window, t):
        for j, p in enumerate(window):
            if all(healthy(q) for q in window[j:]):
                return p["t_end"] - t
        return None

    out = []
    for i, f in enumerate(faults):
        t = f["t_inject"]
        window = window_of(i)
        rec = recovered_in(window, t)
        # A cascade: the next fault came while this window's last probe was still unanswered, so
        # that probe's slowness may be the next fault's doing, and no later probe could show a
        # recovery from this fault alone. Then this fault has recovered when the next one has
        # (measured from this fault's injection), and never when the next one never does.
        k = i
        while rec is None and window and k + 1 < len(faults) and \
                (window[-1]["t_end"] is None or window[-1]["t_end"] > faults[k + 1]["t_inject"]):
            k += 1
            window = window_of(k)
            rec = recovered_in(window, t)
        out.append({"label": f["label"], "recovery": rec, "probes": len(window_of(i))})
    return out


def check_recovery(run, cfg):
    bound = cfg.get("max_recovery")
    rts = recovery_times(run)
    worst = None
    never = [r["label"] for r in rts if r["recovery"] is None and r["probes"] > 0]
    vals = [r["recovery"] for r in rts if r["recovery"] is not None]
    if vals:
        worst = max(vals)
    if bound is None:
        if never:
            return _result("recovery", False, f"probes never succeeded again after: {', '.join(never)}",
                           recovery=worst)
        return _result("recovery", None, "not bounded" + (f" (worst {worst:.2f} s)" if worst is not None else ""),
                       recovery=worst)
    if not rts or never or worst is None:
        return _result("recovery", False, "no successful probe after the fault"
                       + (f" ({', '.join(never)})" if never else ""), recovery=worst)
    if worst > bound:
        return _result("recovery", False, f"recovered after {worst:.2f} s > {bound:.2f} s", recovery=worst)
    return _result("recovery", True, f"recovered within {worst:.2f} s <= {bound:.2f} s", recovery=worst)


def check_processes(run, cfg):
    """No process died unless a fault targeted it, every process the tool stopped at the end exited
    cleanly, and no log holds a sanitizer report."""
    p = run.get("processes")
    if not p:
        return _result("processes", None, "no processes started by the tool")
    bad = []
    for u in p.get("unexpected_exits") or []:
        bad.append(f"{u['name']} (pid {u['pid']}) exited with {u['status']} during the run; no fault targeted it")
    for name, st in (p.get("teardown") or {}).items():
        if st not in (0, None):
            bad.append(f"{name} exited {st} when stopped")
    for s in p.get("sanitizer") or []:
        bad.append(f"sanitizer report in {s['name']}: {s['report'].splitlines()[0][:160]}")
    if bad:
        return _result("processes", False, "; ".join(bad))
    return _result("processes", True, "no unexpected exits; clean shutdown")


ALL = (check_byte_exact, check_all_ended, check_baseline, check_fresh, check_evidence, check_migrations, check_resumes,
       check_stall, check_recovery, check_processes)


def evaluate(run, cfg):
    """Runs every check; returns (verdict 'PASS' | 'FAIL', [results])."""
    results = [c(run, cfg) for c in ALL]
    verdict = "FAIL" if any(r["ok"] is False for r in results) else "PASS"
    return verdict, results


def summarize(run, results):
    """The numbers of the report's table for one run."""
    reqs = run.get("requests") or []
    w, _ = worst_stall(run)
    rts = [r["recovery"] for r in recovery_times(run)]
    rec = None if not rts or any(r is None for r in rts) else max(rts)
    lost, dup = token_accounting(run)
    return {"requests": len(reqs), "completed": sum(1 for r in reqs if r["outcome"] == "ok"),
            "errors": sum(1 for r in reqs if r["outcome"] != "ok"), "lost": lost,
            "duplicated": dup, "migrations": run.get("migrations"), "worst_stall": w,
            "recovery": rec, "recovery_known": bool(rts)}
