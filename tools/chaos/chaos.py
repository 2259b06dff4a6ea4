#!/usr/bin/env python3
"""chaos.py — `baton chaos`: runs fault scenarios against baton and writes a report.

    baton chaos run tools/chaos/scenarios/*.toml --out /tmp/chaos-report
    baton chaos run --engine llama --out /tmp/chaos-llama
    baton chaos run --url http://10.0.0.5:8000 --fault 'kill9 pid=4242 at=3s' --load 'duration=10s'
    baton chaos list tools/chaos/scenarios/*.toml
    baton chaos validate my-scenario.toml

Exit status: 0 when every scenario passed (skipped ones too, unless --strict), 1 when one failed
or could not run, 2 on a usage or scenario error, 130 on Ctrl-C. docs/chaos.md is the user guide.
"""

import argparse
import datetime
import glob
import os
import select
import sys
import time

if sys.version_info < (3, 11):
    sys.exit("baton chaos: needs Python 3.11 or newer (tomllib); this is " + sys.version.split()[0])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chaoslib import report, runner, scenario  # noqa: E402
from chaoslib.util import log, repo_root, set_quiet  # noqa: E402


def _first_sentence(text):
    one = " ".join((text or "").split())
    cut = one.find(". ")
    return one if cut < 0 else one[:cut + 1]


def _default_scenarios():
    return sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenarios", "*.toml")))


def _load(args):
    if args.url and args.engine:
        raise scenario.ScenarioError("--engine applies to the workers a scenario starts, not to a deployment (--url)")
    if args.url:
        return [scenario.from_cli(args.url, args.fault, args.load, args.checks, args.worker_metrics, args.model,
                                  name=args.name or "deployment")]
    if args.fault or args.load or args.checks or args.worker_metrics:
        raise scenario.ScenarioError("--fault, --load, --checks and --worker-metrics go with --url")
    paths = args.scenarios or _default_scenarios()
    out = []
    for p in paths:
        sc = scenario.load_file(p, args.set, engine=args.engine)
        if args.only and sc.name not in args.only:
            continue
        if args.quick and not sc.quick:
            continue
        out.append(sc)
    if not out:
        raise scenario.ScenarioError("no scenario selected")
    names = [s.name for s in out]
    dups = {n for n in names if names.count(n) > 1}
    if dups:
        raise scenario.ScenarioError(f"two scenarios share a name: {', '.join(sorted(dups))}")
    return out


def _bin(args):
    return args.bin or os.environ.get("BATON_BIN") or os.path.join(repo_root(), "build", "baton")


def cmd_run(args):
    scs = _load(args)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    binp = os.path.abspath(_bin(args))
    tag = f"{os.getpid() % 100000:05d}"
    start = time.monotonic()
    results = []
    for sc in scs:
        t = time.monotonic()
        log(f"=== {sc.name}: {_first_sentence(sc.description)}")
        r = runner.run_scenario(sc, binp, out, tag)
        r["wall"] = round(time.monotonic() - t, 1)
        results.append(r)
        report.write(out, results, _header(args, binp, start, done=False))
    path = report.write(out, results, _header(args, binp, start, done=True))
    bad = [r for r in results if r["verdict"] in ("FAIL", "ERROR") or (args.strict and r["verdict"] == "SKIP")]
    global _verdict
    _verdict = 1 if bad else 0  # the exit status, even if the reader of the table goes away
    print(report.table(results))
    print(f"\nreport: {path}")
    return _verdict


def _header(args, binp, start, done):
    wall = time.monotonic() - start
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "baton chaos " + " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])
    return [f"- date: {now}", f"- command: `{cmd}`", f"- binary: `{binp}`",
            f"- machine: {os.cpu_count()} CPUs", f"- wall time: {wall:.0f} s" + ("" if done else " (running)")]


def cmd_list(args):
    for sc in _load(args):
        where = "starts its own processes" if sc.managed else f"against {', '.join(sc.target['urls'])}"
        q = " [quick]" if sc.quick else ""
        print(f"{sc.name}{q}: {_first_sentence(sc.description)}")
        print(f"    {where}; load {sc.load['concurrency']} clients, "
              + (f"{sc.load['duration']:g} s" if sc.load["duration"] else f"{sc.load['requests']} requests"))
        for f in sc.faults:
            when = f"at {f['at']:g} s" if f["at"] is not None else f"after {f['after_tokens']} tokens"
            print(f"    fault: {f['label']} {when}" + (f" for {f['duration']:g} s" if f["duration"] else ""))
    return 0


def cmd_validate(args):
    scs = _load(args)
    print(f"{len(scs)} scenario(s) valid: {', '.join(s.name for s in scs)}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="baton chaos", description="Fault scenarios against baton, checked "
                                 "byte for byte against fault-free references; see docs/chaos.md.")
    # not required=True: argparse would then report a missing command before an unknown option
    # (`baton chaos --nosuch`), hiding the real mistake; the command's absence is checked below
    sub = ap.add_subparsers(dest="cmd", metavar="{run,list,validate}")
    parsers = {}
    for name, helptext in (("run", "run scenarios and write a report"), ("list", "describe scenarios"),
                           ("validate", "check scenario files")):
        p = parsers[name] = sub.add_parser(name, help=helptext)
        p.add_argument("scenarios", nargs="*", help="scenario files (default: the shipped matrix)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a scenario value, e.g. load.concurrency=4 or faults.0.at=3s")
        p.add_argument("--engine", choices=scenario.ENGINES,
                       help="run every worker the scenarios start on this engine (llama: llama.cpp with the bundled "
                            "model; default: each scenario's own, the mocker)")
        p.add_argument("--only", type=lambda s: s.split(","), help="run only these scenario names (comma list)")
        p.add_argument("--quick", action="store_true", help="only scenarios marked quick = true")
        p.add_argument("--url", action="append", help="an existing deployment's frontend URL (repeatable)")
        p.add_argument("--fault", action="append", help="with --url: e.g. 'kill9 pid=1234 at=2s' (repeatable)")
        p.add_argument("--load", help="with --url: e.g. 'concurrency=8 duration=10s stream=true'")
        p.add_argument("--checks", help="with --url: e.g. 'allow=[\"cut\"] max_errors=3'")
        p.add_argument("--worker-metrics", action="append", help="with --url: a worker status server URL")
        p.add_argument("--model", help="with --url: the model name (default: the first of /v1/models)")
        p.add_argument("--name", help="with --url: the scenario's name in the report")
        if name == "run":
            p.add_argument("--out", default="chaos-report", help="report directory (default ./chaos-report)")
            p.add_argument("--bin", help="baton binary (default $BATON_BIN, else <repo>/build/baton)")
            p.add_argument("--strict", action="store_true", help="a skipped scenario fails the run")
            p.add_argument("--quiet", action="store_true", help="no progress lines")
    args, unknown = ap.parse_known_args(argv)
    if unknown:  # exit 2, with the usage of the command they came with (`baton chaos run --nosuch`)
        parsers.get(args.cmd, ap).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.cmd is None:
        ap.error("the following arguments are required: {run,list,validate}")
    global _command
    _command = args.cmd
    set_quiet(getattr(args, "quiet", False))
    try:
        return {"run": cmd_run, "list": cmd_list, "validate": cmd_validate}[args.cmd](args)
    except scenario.ScenarioError as e:
        sys.stderr.write(f"baton chaos: {e}\n")
        return 2


# The subcommand being run, once the arguments are parsed (None while argparse prints --help),
# and a run's exit status once its verdicts are in (its report written, its table not yet printed).
_command = None
_verdict = None


def _stdout_gone():
    """True when stdout is a pipe whose reader has gone (`baton chaos list | head`): Linux reports
    POLLERR on the write end of a pipe without readers."""
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


class _StdoutError(Exception):
    """A write to stdout failed for a reason other than a reader that went away (a full device:
    `baton chaos list > /dev/full`). Not an OSError, so that no handler meant for other files (nor
    argparse, which drops OSErrors of its own output) takes it for theirs."""

    def __init__(self, err):
        super().__init__(err.strerror or str(err))


class _GuardedStdout:
    """stdout, whose failed writes and flushes raise _StdoutError (BrokenPipeError stays itself:
    a reader that stopped early is handled on its own below)."""

    def __init__(self, f):
        self._f = f

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise _StdoutError(e) from None

    def write(self, s):
        return self._call(self._f.write, s)

    def flush(self):
        return self._call(self._f.flush)

    def __getattr__(self, name):
        return getattr(self._f, name)


if __name__ == "__main__":
    sys.stdout = _GuardedStdout(sys.stdout)
    try:
        try:
            rc = main()
        except SystemExit as e:
            # argparse's --help (0) and usage errors (2): its output may still sit in stdout's
            # buffer, flushed below where a reader that went away is handled, not at exit
            rc = e.code
        sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # another pipe or socket: a real error
        # the reader stopped early, as `head` does: no traceback; stdout goes to /dev/null so that
        # the interpreter's own flush at exit does not fail again. A listing (list, validate,
        # --help) whose reader stopped reading did all that was asked of it: exit 0, as `baton
        # --help | head -1` does. A run prints only its final table to stdout (progress goes to
        # stderr): its report is written and its verdict stands; 1 if it had none yet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 0 if _command != "run" else (_verdict if _verdict is not None else 1)
    except _StdoutError as e:
        # the output is lost: say so in one line and fail, as `baton --help > /dev/full` does;
        # stdout goes to /dev/null so that the interpreter's flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.stderr.write(f"baton chaos: cannot write to standard output: {e}\n")
        rc = 1
    except KeyboardInterrupt:
        # Ctrl-C: the scenario's clean-up (its processes stopped) ran on the way here; no traceback
        sys.stderr.write("baton chaos: interrupted: the processes it started are stopped; the scenario that was "
                         "running has no verdict\n")
        rc = 130
    sys.exit(rc)
