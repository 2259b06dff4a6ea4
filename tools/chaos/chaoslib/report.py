"""report — writes what a chaos run found: report.md (one summary table, then each scenario's
faults, checks and timeline) and, per scenario, timeline.svg: tokens per second, requests in
flight, errors and fault markers on one time axis. The SVG is written by hand (a few rectangles,
polylines and text), so the report needs nothing but a browser to read.
"""

import html
import math
import os

from . import checks

BIN = 0.25  # seconds per bar of the throughput panel


def _fmt_num(v):
    if v is None:
        return "—"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _fmt_s(v):
    return "—" if v is None else f"{v:.2f} s"


def table(results):
    """The Markdown summary table: one row per scenario."""
    lines = ["| scenario | requests | completed | errors | lost / dup tokens | migrations | worst stall | recovery "
             "| verdict |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        s = r.get("summary") or {}
        if r["verdict"] in ("ERROR", "SKIP"):
            lines.append(f"| {r['name']} | — | — | — | — | — | — | — | **{r['verdict']}**: "
                         f"{_md(r.get('reason', ''))[:120]} |")
            continue
        rec = _fmt_s(s.get("recovery")) if s.get("recovery_known") else "—"
        if s.get("recovery_known") and s.get("recovery") is None:
            rec = "never"
        lines.append(f"| {r['name']} | {s.get('requests', 0)} | {s.get('completed', 0)} | {s.get('errors', 0)} | "
                     f"{s.get('lost', 0)} / {s.get('duplicated', 0)} | {_fmt_num(_int(s.get('migrations')))} | "
                     f"{_fmt_s(s.get('worst_stall'))} | {rec} | **{r['verdict']}** |")
    return "\n".join(lines)


def _int(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _md(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def write(out_dir, results, header_lines=()):
    """Writes out_dir/report.md; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    parts = ["# baton chaos report", ""]
    parts += list(header_lines)
    parts += ["", table(results), ""]
    for r in results:
        parts += [f"## {r['name']} — {r['verdict']}", ""]
        if r.get("description"):
            parts += [r["description"].strip(), ""]
        if r.get("reason"):
            parts += [f"Reason: {_md(r['reason'])}", ""]
        for f in r.get("faults") or []:
            when = f"at {f['t_inject']:.2f} s" if f.get("t_inject") is not None else "not injected"
            extra = f", restored at {f['t_restore']:.2f} s" if f.get("t_restore") is not None else ""
            extra += "".join(f", {x['name']} restarted at {x['t']:.2f} s" for x in f.get("restarted") or [])
            parts.append(f"- fault `{f['label']}` {when}{extra}" + (f" (error: {_md(f['error'])})" if f.get("error")
                                                                      else ""))
        if r.get("faults"):
            parts.append("")
        for c in r.get("checks") or []:
            mark = {True: "pass", False: "**FAIL**", None: "skipped"}[c["ok"]]
            parts.append(f"- {c['name']}: {mark} — {_md(c['detail'])}")
        if r.get("checks"):
            parts.append("")
        if r.get("svg"):
            parts += [f"![timeline of {r['name']}]({r['svg']})", ""]
        if r.get("logs"):
            parts += [f"Logs and raw records: `{r['logs']}`", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return path


# ---- SVG --------------------------------------------------------------------------------------

W, H = 960, 420
ML, MR, MT = 60, 20, 34
PANELS = (("tokens / s", 150), ("requests in flight", 110), ("errors", 46))
GAP = 22


def _esc(s):
    return html.escape(str(s), quote=True)


def _nice_max(v):
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= v (an axis top)."""
    if v <= 0:
        return 1
    p = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * p >= v - 1e-9:
            return m * p
    return 10 * p


def timeline_svg(run, title):
    """The SVG text of one run's timeline."""
    reqs = (run.get("requests") or []) + (run.get("storm") or [])
    faults = run.get("faults") or []
    samples = run.get("samples") or []
    t_max = 1.0
    for r in reqs:
        if r.get("t_end") is not None:
            t_max = max(t_max, r["t_end"])
    for f in faults:
        for k in ("t_inject", "t_restore", "t_end"):
            if f.get(k) is not None:
                t_max = max(t_max, f[k])
    t_max = t_max * 1.02 + 0.2
    pw = W - ML - MR

    def x(t):
        return ML + pw * max(0.0, min(t, t_max)) / t_max

    nb = int(t_max / BIN) + 1
    tok = [0.0] * nb
    for r in reqs:
        for t, n in r.get("events") or []:
            if 0 <= t < t_max:
                tok[int(t / BIN)] += n / BIN
    # client-side in flight: +1 at send, -1 at end
    evs = []
    for r in run.get("requests") or []:
        if r.get("t_send") is not None:
            evs.append((r["t_send"], 1))
            evs.append((r["t_end"] if r.get("t_end") is not None else t_max, -1))
    evs.sort()
    infl = []
    cur = 0
    for t, d in evs:
        infl.append((t, cur))
        cur += d
        infl.append((t, cur))
    server = {}
    for s in samples:
        if s.get("role") == "frontend" and "inflight" in s:
            server[s["t"]] = server.get(s["t"], 0.0) + s["inflight"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>',
           f'<text x="{ML}" y="18" font-size="14" font-weight="bold">{_esc(title)}</text>']
    y = MT
    boxes = []
    for label, h in PANELS:
        boxes.append((label, y, h))
        y += h + GAP
    # fault durations shaded behind the panels; lines and labels drawn over them at the end
    marks = []
    for f in faults:
        if f.get("t_inject") is None:
            continue
        x0 = x(f["t_inject"])
        t1 = f.get("t_restore")
        if t1 is not None and t1 > f["t_inject"]:
            out.append(f'<rect x="{x0:.1f}" y="{MT}" width="{max(1.0, x(t1) - x0):.1f}" height="{y - GAP - MT}" '
                       f'fill="#f4a261" fill-opacity="0.25"/>')
        marks.append(f'<line x1="{x0:.1f}" y1="{MT - 4}" x2="{x0:.1f}" y2="{y - GAP}" stroke="#d62828" '
                     f'stroke-width="1.5"/>')
        marks.append(f'<text x="{x0 + 3:.1f}" y="{MT + 10}" fill="#d62828" stroke="#ffffff" stroke-width="3" '
                     f'paint-order="stroke">{_esc(f["label"])}</text>')
        for rs in f.get("restarted") or []:
            xr = x(rs["t"])
            marks.append(f'<line x1="{xr:.1f}" y1="{MT}" x2="{xr:.1f}" y2="{y - GAP}" stroke="#6a4c93" '
                         f'stroke-dasharray="4,3"/>')
            marks.append(f'<text x="{xr + 3:.1f}" y="{MT + 24}" fill="#6a4c93" stroke="#ffffff" stroke-width="3" '
                         f'paint-order="stroke">restart {_esc(rs["name"])}</text>')
    # panel 1: tokens/s bars
    label, py, ph = boxes[0]
    top = _nice_max(max(tok) if tok else 1)
    out += _frame(label, py, ph, top)
    bw = pw * BIN / t_max
    for i, v in enumerate(tok):
        if v <= 0:
            continue
        bh = ph * v / top
        out.append(f'<rect x="{x(i * BIN):.1f}" y="{py + ph - bh:.1f}" width="{max(0.5, bw - 0.3):.1f}" '
                   f'height="{bh:.1f}" fill="#2a6f97"/>')
    # panel 2: in flight (client side solid, frontends' gauge dashed)
    label, py, ph = boxes[1]
    top = _nice_max(max([v for _, v in infl] + list(server.values()) + [1]))
    out += _frame(label, py, ph, top)
    if infl:
        pts = " ".join(f"{x(t):.1f},{py + ph - ph * v / top:.1f}" for t, v in infl)
        out.append(f'<polyline points="{pts}" fill="none" stroke="#2d6a4f" stroke-width="1.5"/>')
    if server:
        pts = " ".join(f"{x(t):.1f},{py + ph - ph * v / top:.1f}" for t, v in sorted(server.items()))
        out.append(f'<polyline points="{pts}" fill="none" stroke="#888888" stroke-dasharray="3,2"/>')
    out.append(f'<text x="{W - MR - 260}" y="{py - 4}" fill="#2d6a4f">clients</text>'
               f'<text x="{W - MR - 200}" y="{py - 4}" fill="#888888">frontend gauge (sampled)</text>')
    # panel 3: errors (load requests not ok: red; probes not ok: orange)
    label, py, ph = boxes[2]
    out += _frame(label, py, ph, None)
    for r in run.get("requests") or []:
        if r["outcome"] != "ok" and r.get("t_end") is not None:
            xe = x(r["t_end"])
            out.append(f'<line x1="{xe:.1f}" y1="{py + 4}" x2="{xe:.1f}" y2="{py + ph / 2 - 2}" stroke="#d62828" '
                       f'stroke-width="2"><title>{_esc(r["outcome"])} #{r["seq"]}</title></line>')
    for r in run.get("probes") or []:
        if r["outcome"] != "ok" and r.get("t_end") is not None:
            xe = x(r["t_end"])
            out.append(f'<line x1="{xe:.1f}" y1="{py + ph / 2 + 2}" x2="{xe:.1f}" y2="{py + ph - 4}" '
                       f'stroke="#f77f00" stroke-width="2"/>')
    out.append(f'<text x="{W - MR - 260}" y="{py - 4}" fill="#d62828">load requests</text>'
               f'<text x="{W - MR - 170}" y="{py - 4}" fill="#f77f00">recovery probes</text>')
    out += marks
    # time axis
    ax = y - GAP
    step = _nice_max(t_max / 10)
    t = 0.0
    while t <= t_max:
        out.append(f'<line x1="{x(t):.1f}" y1="{ax}" x2="{x(t):.1f}" y2="{ax + 4}" stroke="#333"/>')
        out.append(f'<text x="{x(t):.1f}" y="{ax + 15}" text-anchor="middle">{t:g}</text>')
        t += step
    out.append(f'<text x="{ML + pw / 2:.1f}" y="{ax + 30}" text-anchor="middle">seconds since the load started</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _frame(label, py, ph, top):
    pw = W - ML - MR
    out = [f'<rect x="{ML}" y="{py}" width="{pw}" height="{ph}" fill="none" stroke="#bbbbbb"/>',
           f'<text x="{ML}" y="{py - 4}" font-weight="bold">{_esc(label)}</text>']
    if top is not None:
        out.append(f'<text x="{ML - 4}" y="{py + 10}" text-anchor="end">{top:g}</text>')
        out.append(f'<text x="{ML - 4}" y="{py + ph}" text-anchor="end">0</text>')
    return out


def write_svg(path, run, title):
    with open(path, "w") as f:
        f.write(timeline_svg(run, title))


def scenario_result(name, description, verdict, run, results, svg_rel, logs_rel, reason=None):
    return {"name": name, "description": description, "verdict": verdict,
            "summary": checks.summarize(run, results) if run is not None else None,
            "faults": (run or {}).get("faults"), "checks": results, "svg": svg_rel, "logs": logs_rel,
            "reason": reason}
