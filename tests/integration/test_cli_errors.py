"""Wrong usage of the `baton` commands is refused at once, with a message that names the problem.

  1. Every flag of `baton run`, `baton frontend` and `baton worker` --help has an environment
     twin (README: "every flag has an environment twin"), and the twins added for the mocker's,
     the default-max-tokens and the test-hook flags and for `baton run --workers` are read: an
     invalid value in each is refused naming the variable (exit 2). The flag wins: with the flag
     given a valid value on the command line, the same invalid variable is not read, and the
     command goes on to the next check (an unknown --discovery, or `baton run --http-host
     localhost`: exit 2 naming that instead).
  2. A flag followed by another flag has no value: `baton frontend --api-key --http-port P` is
     refused ("--api-key needs a value", exit 2) instead of starting with the API key
     "--http-port" and nothing on P; likewise a string flag of the worker and a number of `baton
     run`. `--flag=--value` still passes a value that starts with "--".
  3. An invalid value reads "baton CMD: invalid value 'V' for --FLAG (expected ...)"; a DYN_LOG
     that names no level is reported (it used to leave the level at info in silence), and so is a
     DYN_LOGGING_JSONL that is neither 1/true nor 0/false; `baton run
     --http-host localhost` is refused before any child starts (exit 2), as is a fixed worker port
     (--system-port, --rpc-port, DYN_TCP_RPC_PORT) with more than one worker. A frontend's or a
     worker's listen address that is not numeric (--http-host, --rpc-host, --system-host) and an
     unknown --discovery, an etcd endpoint that is not http:// or https://, are usage errors (exit
     2, the flag or its twin named), not failed starts;
     a value from an environment twin is named by the variable (DYN_ROUTER_MODE, DYN_EVENT_PLANE);
     so is a --nats-server that is not a nats:// or tls:// URL with the NATS event plane.
     `baton run` also refuses, before it starts any child, every argument a child would refuse:
     an unknown flag (passed on to the workers), a bad value of a frontend flag, an unknown
     engine, an openai setting with --engine llama, a llama setting (--model) without it, the openai
     engine without --upstream, a llama value out of range, a --ctx-size below
     --max-num-batched-tokens (which llama.cpp would abort on) or below 256 cells per sequence
     (which llama.cpp would round up), --default-max-tokens 0, a --model-name
     that is "unknown" (the metrics' reserved model label), empty or past 127 bytes, a canary payload that is not JSON
     (exit 2, "nothing was started", no directory made, nothing listening). An --upstream-api-key
     (openai engine) given empty, flag or twin, or holding a blank, a control character or a
     non-ASCII byte is exit 2 for `baton worker` and `baton run`, the key never printed.
  4. `baton run --help` says how to get llama.cpp workers (--engine llama). `baton help` prints
     the usage `baton --help` prints (on stdout; after a usage error, `baton nope`, `baton help
     nope` or no command at all, on stderr with exit 2); `baton help CMD` what `baton CMD --help` prints; `baton
     --version` (or `baton version`) prints one line, the version, and refuses an argument after it
     (exit 2, naming it); `baton chaos --nosuch` (and `baton chaos run --nosuch`) names the unknown
     flag (exit 2), not a missing command. `baton chaos list` (validate,
     --help) and the C commands' --help and --version into a pipe whose reader is gone exit 0,
     saying nothing (`baton chaos list | head -1`); into a full device, the C commands and
     `baton chaos` exit 1 and say so in one line (no traceback). A write that fails before the
     last one (strace injects EIO) is named by its reason, and nothing is written after it. Ctrl-C during `baton chaos run` exits 130 without a traceback, its processes stopped.
  5. A file discovery directory this user cannot read (frontend, worker) or write in (worker) is a
     start-up error (exit 1, the directory and the reason named), not a process that runs and
     never finds, or is never found by, anyone. Run as an unprivileged user (setpriv to nobody when
     the test runs as root, whom permissions do not stop).
  6. A port held by another program (the frontend's, a worker's request plane) is a start-up error
     (exit 1) naming the flag that chooses another; a listen address this machine does not have
     names the host flag instead. A NATS TLS file that cannot be read is named
     with its flag and the reason (exit 2).
  7. A worker with its status server off (DYN_SYSTEM_PORT -1) starts whatever DYN_SYSTEM_HOST says;
     a canary payload that is given is checked with health checks off (exit 2 when malformed).
  8. A FIFO (no writer: opening it would wait for ever), a device or a directory given where a file
     is expected (--nats-tls-ca/-cert/-key, NATS_AUTH_CREDENTIALS_FILE, --rpc-secret-file,
     --health-check-payload @file, --model, --etcd-ca) is refused at once, naming the setting, the
     path and what it is; a regular secret file is still read, but not one that holds a NUL byte
     or a secret over 4096 bytes (exit 2); the newline and the blank lines and blanks that end it
     are not part of the secret nor counted against the 4096.
  9. `baton run` says what is wrong with DYN_LOG and DYN_LOGGING_JSONL once, not once per child.
 10. --api-key-file and --admin-api-key-file (DYN_API_KEY_FILE, BATON_ADMIN_API_KEY_FILE) read the
     keys from files, one trailing newline and a leading byte order mark removed; a missing, empty,
     several-line file, a key with a blank, a control character or a non-ASCII byte (on the command
     line too: no client could present it), a key given both ways, or a key or key file given
     empty (flag or twin: that is not "no key") is exit 2 (`baton frontend` and `baton run`); the
     keys read are enforced. The blank lines after a key of 4096 bytes are refused as lines, not
     counted as bytes.
 11. --priority-ceiling-file (BATON_PRIORITY_CEILING_FILE) reads the ceilings, one KEY=N a line with
     blank lines and # comments: a file that cannot be read, a malformed line (named by the file
     and its line number, never by its key), a key no Bearer token carries, a key given twice, a
     NUL byte, a file over 1 MiB, the ceilings given both ways (flag and file), or either form given
     empty (flag or twin: that is not "no ceilings") is exit 2 for
     `baton frontend` and `baton run` (the --priority-ceiling form alike, by entry number); with a
     good file the keys are not on either's command line, and the REQUEST a (fake) worker gets
     carries the priority as the ceilings bound it, whatever blanks surround keys and numbers.
Each command must exit within 10 s and leave nothing listening."""

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time

import batonlib as bl
import fakeworker as fk

bl.deadline(120, "test_cli_errors")
BIN = bl.baton_bin()
ROW = re.compile(r"^  (--[a-z0-9-]+)\s+([A-Z0-9_]*)\s+(.*) \[default: (.*)\]$")
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "BATON_", "NATS_", "ETCD_"))}


def baton(args, env=None, prefix=(), timeout=10):
    e = dict(CLEAN_ENV)
    e.update(env or {})
    t0 = time.monotonic()
    p = subprocess.run(list(prefix) + [BIN] + args, capture_output=True, text=True, env=e, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def listening(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- 1. environment twins
for cmd in ("run", "frontend", "worker"):
    rc, out, _ = baton([cmd, "--help"])
    assert rc == 0, out
    rows = [ROW.match(line) for line in out.splitlines() if line.startswith("  --")]
    assert rows and all(rows), f"`baton {cmd} --help` has a line the row pattern does not read:\n{out}"
    missing = [m.group(1) for m in rows if not m.group(2)]
    assert not missing, f"`baton {cmd}` flags without an environment twin: {missing}"
twins = [("worker", "DYN_NUM_GPU_BLOCKS_OVERRIDE", "--num-gpu-blocks-override", "0"),
         ("worker", "DYN_BLOCK_SIZE", "--block-size", "1"),
         ("worker", "DYN_WATERMARK", "--watermark", "2"),
         ("worker", "DYN_DEFAULT_MAX_TOKENS", "--default-max-tokens", "-1"),
         ("worker", "BATON_FAULT_DIE_AFTER_TOKENS", "--fault-die-after-tokens", "x"),
         ("worker", "BATON_FAULT_STALL_AFTER_TOKENS", "--fault-stall-after-tokens", "x"),
         ("worker", "BATON_FAULT_ERROR_AFTER_TOKENS", "--fault-error-after-tokens", "x"),
         ("worker", "BATON_FAULT_IGNORE_KILL", "--fault-ignore-kill", "maybe"),
         ("run", "BATON_WORKERS", "--workers", "0"),
         ("frontend", "BATON_STREAM_TOKEN_TIMEOUT", "--stream-token-timeout", "soon"),
         ("frontend", "BATON_STREAM_TOKEN_TIMEOUT", "--stream-token-timeout", "0x10")]
for cmd, env, flag, bad in twins:
    rc, out, took = baton([cmd], env={env: bad})
    assert rc == 2 and f"baton {cmd}: {env}: invalid value '{bad}' for {flag}" in out, (env, rc, out)
    assert took < 10, (env, took)
good = {"--num-gpu-blocks-override": "64", "--block-size": "16", "--watermark": "0.01",
        "--default-max-tokens": "100", "--fault-die-after-tokens": "0", "--fault-stall-after-tokens": "0",
        "--fault-error-after-tokens": "0", "--fault-ignore-kill": "false", "--workers": "1",
        "--stream-token-timeout": "0"}
overridden = [t for t in twins if t[1] != "BATON_STREAM_TOKEN_TIMEOUT" or t[3] == "soon"] + \
    [("run", "DYN_MIGRATION_LIMIT", "--migration-limit", "abc"),
     ("frontend", "DYN_MIGRATION_LIMIT", "--migration-limit", "abc"),
     ("frontend", "DYN_HTTP_PORT", "--http-port", "http")]
good.update({"--migration-limit": "2", "--http-port": str(bl.free_port())})
# the next check each command makes once its flags are read: a refusal that names its value
later = {"run": ("--http-host", "localhost"), "frontend": ("--discovery", "consul"), "worker": ("--discovery", "consul")}
for cmd, env, flag, bad in overridden:
    for given in ([flag, good[flag]], [f"{flag}={good[flag]}"]):
        rc, out, took = baton([cmd] + given + list(later[cmd]), env={env: bad})
        assert rc == 2 and env not in out and later[cmd][1] in out, (env, given, rc, out)
print(f"cli: every flag has an environment twin; {len(twins)} new twins read; "
      f"{len(overridden)} invalid twins overridden by their flag are not read")

# --- 2. a flag is not the value of the flag before it
port = bl.free_port()
cases = [(["frontend", "--api-key", "--http-port", str(port)], "baton frontend: --api-key needs a value"),
         (["worker", "--model-name", "--system-port", "-1"], "baton worker: --model-name needs a value"),
         (["run", "--http-port", "--workers", "3"], "baton run: --http-port needs a value"),
         (["frontend", "--http-port", str(port), "--max-connections"], "baton frontend: --max-connections needs a value")]
for args, want in cases:
    rc, out, took = baton(args)
    assert rc == 2 and want in out, (args, rc, out)
    assert took < 10, (args, took)
    assert not listening(port), f"something listens on {port} after {args}"
# with '=' a value may start with "--": the key is taken and the frontend starts (stopped at once)
fe = bl.Proc([BIN, "frontend", "--http-port", str(port), "--http-host", "127.0.0.1", "--api-key=--k",
              "--discovery-dir", bl.tmpdir("cli-disc"), "--shutdown-accept-window-ms", "0"], env={"DYN_LOG": "info"},
             name="frontend-eq")
bl.wait_http(f"http://127.0.0.1:{port}/live", fe, timeout=10)
st, _, body = bl.post_json(f"http://127.0.0.1:{port}/v1/completions", bl.completion_body(),
                           headers={"Authorization": "Bearer --k"})
assert st != 401, (st, body)
st, _, body = bl.post_json(f"http://127.0.0.1:{port}/v1/completions", bl.completion_body(),
                           headers={"Authorization": "Bearer wrong"})
assert st == 401, (st, body)
assert fe.stop(10) == 0
print("cli: a flag followed by a flag is refused; --flag=--value is a value")

# --- 3. invalid values
for args, want in [(["run", "--http-port", "-5"],
                    "baton run: invalid value '-5' for --http-port (expected an integer from 1 to 65535)"),
                   (["frontend", "--threads", "abc"], "baton frontend: invalid value 'abc' for --threads"),
                   (["worker", "--speedup-ratio", "0"], "baton worker: invalid value '0' for --speedup-ratio"),
                   (["frontend", "--stream-token-timeout", "-1"],
                    "baton frontend: invalid value '-1' for --stream-token-timeout"),
                   (["frontend", "--stream-token-timeout", "1s"],
                    "baton frontend: invalid value '1s' for --stream-token-timeout"),
                   # a number is written in decimal: strtod's hex, infinity and NaN (and the blanks
                   # it skips) are refused, not read as 16 seconds, or as no bound at all
                   (["frontend", "--stream-token-timeout", "0x10"],
                    "baton frontend: invalid value '0x10' for --stream-token-timeout"),
                   (["frontend", "--stream-token-timeout", "1e1x"],
                    "baton frontend: invalid value '1e1x' for --stream-token-timeout"),
                   (["frontend", "--stream-token-timeout", " 5"],
                    "baton frontend: invalid value ' 5' for --stream-token-timeout"),
                   (["frontend", "--stream-retention", "infinity"],
                    "baton frontend: invalid value 'infinity' for --stream-retention"),
                   (["frontend", "--stream-retention", "nan"],
                    "baton frontend: invalid value 'nan' for --stream-retention"),
                   (["worker", "--speedup-ratio", "0X1p4"], "baton worker: invalid value '0X1p4' for --speedup-ratio"),
                   (["frontend", "--threads", " 2"], "baton frontend: invalid value ' 2' for --threads"),
                   # "unknown" is the metrics' label of requests for models no worker serves; a
                   # name past 127 bytes would be registered by a frontend as its first 127
                   (["worker", "--model-name", "unknown"],
                    "baton worker: --model-name: model name 'unknown' is reserved (the model label of requests "
                    "for models no worker serves)"),
                   (["worker", "--model-name", "m" * 128],
                    "baton worker: --model-name: model name of 128 bytes (1 to 127 allowed)"),
                   (["worker", "--model-name", ""], "baton worker: --model-name: model name of 0 bytes (1 to 127 allowed)")]:
    rc, out, took = baton(args)
    assert rc == 2 and want in out and "argument:" not in out, (args, rc, out)
print("cli: invalid values name the flag and the range")

# DYN_LOG with no level in it is said, not ignored; a level (any case, with a filter after it) is not
rc, out, _ = baton(["frontend", "--http-port", "-5"], env={"DYN_LOG": "verbose"})
assert rc == 2 and "baton frontend: DYN_LOG='verbose' names no level" in out, out
for ok in ("Debug", "warning", "info,baton=trace"):
    rc, out, _ = baton(["frontend", "--http-port", "-5"], env={"DYN_LOG": ok})
    assert rc == 2 and "DYN_LOG" not in out, (ok, out)
# likewise DYN_LOGGING_JSONL: a value that is neither on nor off is said; 1/true/0/false are not
rc, out, _ = baton(["frontend", "--http-port", "-5"], env={"DYN_LOGGING_JSONL": "yes"})
assert rc == 2 and ("baton frontend: DYN_LOGGING_JSONL='yes' is neither 1/true nor 0/false; logging plain text"
                    in out), out
for ok in ("1", "TRUE", "0", "false"):
    rc, out, _ = baton(["frontend", "--http-port", "-5"], env={"DYN_LOGGING_JSONL": ok})
    assert rc == 2 and "DYN_LOGGING_JSONL" not in out, (ok, out)

# baton run's --http-host is checked before anything starts (each child would fail on its own bind,
# a worker naming its status-server port as the culprit)
for host in ("localhost", "10.0.0.300"):
    rc, out, took = baton(["run", "--http-host", host, "--http-port", str(port)])
    assert rc == 2 and f"baton run: --http-host '{host}' is not a numeric IPv4 or IPv6 address" in out, (host, rc, out)
    assert "started" not in out and took < 10, out

# the listen addresses, the discovery backend and the event plane of `baton frontend` and `baton
# worker` are usage errors too (exit 2, naming the flag or its twin), not start-up failures (exit 1)
# that a supervisor would restart forever; `baton run` refuses them before it starts anything
for args, env, want in [
        (["frontend", "--http-port", str(port), "--http-host", "localhost"], {},
         "baton frontend: --http-host 'localhost' is not a numeric IPv4 or IPv6 address"),
        (["frontend", "--http-port", str(port)], {"DYN_HTTP_HOST": "example.com"},
         "baton frontend: DYN_HTTP_HOST (--http-host) 'example.com' is not a numeric IPv4 or IPv6 address"),
        (["frontend", "--http-port", str(port), "--discovery", "consul"], {},
         "baton frontend: unknown --discovery 'consul' (file or etcd)"),
        (["frontend", "--http-port", str(port)], {"DYN_DISCOVERY_BACKEND": "consul"},
         "baton frontend: unknown DYN_DISCOVERY_BACKEND (--discovery) 'consul' (file or etcd)"),
        (["worker", "--system-port", "-1", "--rpc-host", "localhost"], {},
         "baton worker: --rpc-host 'localhost' is not a numeric IPv4 or IPv6 address"),
        (["worker", "--system-port", str(port)], {"DYN_SYSTEM_HOST": "localhost"},
         "baton worker: DYN_SYSTEM_HOST (--system-host) 'localhost' is not a numeric IPv4 or IPv6 address"),
        (["run", "--http-port", str(port), "--rpc-host", "localhost"], {},
         "baton run: --rpc-host 'localhost' is not a numeric IPv4 or IPv6 address"),
        (["run", "--http-port", str(port), "--system-host", "localhost"], {},
         "baton run: --system-host 'localhost' is not a numeric IPv4 or IPv6 address"),
        (["run", "--http-port", str(port)], {"DYN_HTTP_HOST": "localhost"},
         "baton run: DYN_HTTP_HOST (--http-host) 'localhost' is not a numeric IPv4 or IPv6 address"),
        (["run", "--http-port", str(port)], {"DYN_EVENT_PLANE": "kafka"},
         "baton run: unknown DYN_EVENT_PLANE (--event-plane) 'kafka' (direct or nats)"),
        (["frontend", "--http-port", str(port), "--event-plane", "kafka"], {},
         "baton frontend: unknown --event-plane 'kafka' (direct or nats)"),
        (["worker", "--system-port", "-1"], {"DYN_EVENT_PLANE": "kafka"},
         "baton worker: unknown DYN_EVENT_PLANE (--event-plane) 'kafka' (direct or nats)"),
        (["run", "--http-port", str(port), "--event-plane", "nats", "--nats-server", "localhost:4222"], {},
         "baton run: --nats-server: invalid NATS server URL 'localhost:4222'"),
        (["worker", "--system-port", "-1", "--event-plane", "nats"], {"NATS_SERVER": "nats-host:4222"},
         "baton worker: NATS_SERVER (--nats-server): invalid NATS server URL 'nats-host:4222'"),
        # a discovery setting found wrong when discovery starts is a usage error too (exit 2, not 1)
        (["frontend", "--http-port", str(port), "--discovery", "etcd", "--etcd-endpoints", "ftp://x"], {},
         "discovery: etcd endpoint 'ftp://x': only http:// and https:// are supported"),
        (["worker", "--system-port", "-1", "--discovery", "etcd"], {"ETCD_ENDPOINTS": "unix:///run/etcd.sock"},
         "discovery: etcd endpoint 'unix:///run/etcd.sock'"),
        (["frontend", "--http-port", str(port)], {"DYN_ROUTER_MODE": "fastest"},
         "baton frontend: unknown DYN_ROUTER_MODE (--router-mode) 'fastest' (round-robin, random, least-loaded)")]:
    rc, out, took = baton(args, env=dict(env, DYN_LOG="info"))
    assert rc == 2 and want in out, (args, env, rc, out)
    assert "start" not in out.replace("nothing was started", "") and took < 10, (args, env, out)
    assert not listening(port), (args, env)

# a fixed worker port given to `baton run` with several workers: refused before anything starts
for args, env, want in [(["--system-port", "9090"], {}, "baton run: --system-port 9090 would give all 2 workers"),
                        (["--workers", "3", "--rpc-port=7000"], {}, "baton run: --rpc-port 7000 would give all 3 workers"),
                        ([], {"DYN_TCP_RPC_PORT": "7000"}, "baton run: DYN_TCP_RPC_PORT=7000 would give all 2 workers")]:
    rc, out, took = baton(["run", "--http-port", str(port)] + args, env=env)
    assert rc == 2 and want in out and "started" not in out, (args, env, rc, out)

# an argument a child would refuse is refused by `baton run` itself, before it starts anything: an
# unknown flag (passed on to the workers), a bad value of a frontend flag it passes on, an openai
# setting with the llama engine. Nothing is started: no "started" line, no discovery directory made
# under TMPDIR, nothing on the port. Each frontend flag with a number or boolean default reaches the
# frontend's check (none is passed to the workers, which would refuse it as unknown).
run_tmp = bl.tmpdir("cli-run-tmp")
fe_rows = [ROW.match(line) for line in baton(["frontend", "--help"])[1].splitlines() if line.startswith("  --")]
run_own = {m.group(1) for m in (ROW.match(line) for line in baton(["run", "--help"])[1].splitlines()
                                if line.startswith("  --")) if m}
fe_checked = [m.group(1) for m in fe_rows if m.group(1) not in run_own and not m.group(1).startswith("--discovery")
              and not m.group(1).startswith("--etcd") and re.fullmatch(r"-?[0-9.]+|true|false", m.group(4))]
assert len(fe_checked) >= 20, fe_checked
refusals = [(["--bogus"], "baton run: unknown argument '--bogus'", "baton worker"),
            (["--bogus", "3", "--workers", "1"], "baton run: unknown argument '--bogus'", "baton worker"),
            (["--engine", "bogus"], "baton run: unknown --engine 'bogus' (mocker, openai or llama)", "baton worker"),
            (["--model-name", "unknown"], "baton run: --model-name: model name 'unknown' is reserved", "baton worker"),
            (["--engine", "llama", "--upstream", "http://127.0.0.1:9"],
             "baton run: --upstream is a setting of the openai engine, but this worker runs the llama engine "
             "(--engine llama): add --engine openai", "baton worker"),
            # a model file without --engine llama would serve the mocker's mock-model in silence
            (["--model", "models/stories260K.gguf"],
             "baton run: --model is a setting of the llama engine, but this worker runs the mocker: add --engine llama",
             "baton worker"),
            # an engine's own configuration checks: the openai engine without an upstream, a llama
            # setting out of the llama engine's range
            (["--engine", "openai"], "baton run: invalid openai engine configuration: the openai engine needs "
             "--upstream", "baton worker"),
            (["--engine", "llama", "--max-num-seqs", "1000"], "baton run: invalid llama engine configuration: "
             "--max-num-seqs must be 1..256 for the llama engine", "baton worker"),
            # fewer KV cells than a step's batch: llama.cpp asserts (SIGABRT, a backtrace) while
            # creating the context (fewer than --max-num-seqs) or at the first long prompt; refused
            # as configuration instead (512: the llama engine's default --max-num-batched-tokens)
            (["--engine", "llama", "--ctx-size", "15"], "baton run: invalid llama engine configuration: "
             "--ctx-size (15) must be 0 (auto) or at least --max-num-batched-tokens (512)", "baton worker"),
            (["--engine", "llama", "--ctx-size", "64", "--max-num-batched-tokens", "100"], "baton run: invalid llama "
             "engine configuration: --ctx-size (64) must be 0 (auto) or at least --max-num-batched-tokens (100)",
             "baton worker"),
            # fewer than 256 cells per sequence: llama.cpp would round every sequence's stream up to
            # 256 and allocate 4x what was asked
            (["--engine", "llama", "--ctx-size", "1024"], "baton run: invalid llama engine configuration: "
             "--ctx-size (1024) is too small for --max-num-seqs (16): llama.cpp gives each sequence its own "
             "multiple of 256 KV cells, so at least 4096", "baton worker"),
            # refused by the flag's own range, which is the engines' (not as an "invalid mocker
            # configuration" of a range the flag did not announce)
            (["--engine", "llama", "--default-max-tokens", "0"], "baton run: invalid value '0' for --default-max-tokens "
             "(expected an integer from 1 to 10000000)", "baton worker"),
            # a canary payload that is not usable: found before the workers start, not by each
            (["--health-check-enabled", "true", "--health-check-payload", "{bad"],
             "baton run: health check: DYN_HEALTH_CHECK_PAYLOAD (--health-check-payload) is not JSON", "baton worker")]
refusals += [([f"{flag}=bogus"], f"baton run: invalid value 'bogus' for {flag}", "baton frontend")
             for flag in fe_checked]
for args, want, child in refusals:
    rc, out, took = baton(["run", "--http-port", str(port)] + args, env={"TMPDIR": run_tmp, "DYN_LOG": "info"})
    assert rc == 2 and want in out, (args, rc, out)
    assert f"(as passed on to `{child}`, which refuses it); nothing was started" in out, (args, out)
    assert "start" not in out.replace("nothing was started", ""), f"{args}: something started:\n{out}"
    assert os.listdir(run_tmp) == [], (args, os.listdir(run_tmp))
    assert took < 10 and not listening(port), (args, took)
for env, want in [({"DYN_CTX_SIZE": "4096"}, "baton worker: DYN_CTX_SIZE is a setting of the llama engine, but this "
                                           "worker runs the mocker: add --engine llama"),
                  ({"DYN_ENGINE": "openai", "DYN_UPSTREAM_URL": "http://127.0.0.1:9", "DYN_LLAMA_THREADS": "2"},
                   "baton worker: DYN_LLAMA_THREADS is a setting of the llama engine, but this worker runs the openai "
                   "engine (--engine openai)")]:
    rc, out, _ = baton(["worker", "--system-port", "-1"], env=env)
    assert rc == 2 and want in out, (env, rc, out)
# the openai engine sends --upstream-api-key as "Authorization: Bearer KEY": one given empty is not
# "no key" (flag or twin, as --api-key), and one with a blank, a control character (a CR LF would end
# the header and begin another) or a byte outside ASCII is no Bearer token; the key is never printed
upstream = ["--engine", "openai", "--upstream", "http://127.0.0.1:9"]
bad_token = ("invalid openai engine configuration: --upstream-api-key holds a blank, a control character or a "
             "byte outside ASCII, which no Bearer token carries")
for args, env, want in [
        (["--upstream-api-key", ""], {},
         "--upstream-api-key (DYN_UPSTREAM_API_KEY) is given empty: leave it out to run without an upstream key"),
        (["--upstream-api-key="], {}, "--upstream-api-key (DYN_UPSTREAM_API_KEY) is given empty"),
        ([], {"DYN_UPSTREAM_API_KEY": ""},
         "DYN_UPSTREAM_API_KEY (--upstream-api-key) is set but empty: unset it to run without an upstream key"),
        (["--upstream-api-key", "sk-up 1"], {}, bad_token),
        ([], {"DYN_UPSTREAM_API_KEY": " sk-up-1"}, bad_token),
        ([], {"DYN_UPSTREAM_API_KEY": "sk-up-1\r\nX-Extra: 1"}, bad_token),
        (["--upstream-api-key", "sk-up-1\t"], {}, bad_token),
        (["--upstream-api-key", "sk-up-1\u00e9"], {}, bad_token)]:
    for cmd in ("worker", "run"):
        where = ["--system-port", "-1"] if cmd == "worker" else ["--http-port", str(port)]
        rc, out, _ = baton([cmd] + where + upstream + args, env=dict(env, TMPDIR=run_tmp))
        assert rc == 2 and f"baton {cmd}: {want}" in out, (cmd, args, env, rc, out)
        assert "sk-up" not in out, f"the key was printed: {out}"
        assert os.listdir(run_tmp) == [] and not listening(port), (cmd, args)
rc, out, _ = baton(["worker", "--system-port", "-1"], env={"DYN_ENGINE": "vllm"})
assert rc == 2 and "baton worker: unknown DYN_ENGINE 'vllm' (mocker, openai or llama)" in out, (rc, out)
# the checks run in baton run's own process: a DYN_LOG typo is still reported once, not per check
rc, out, _ = baton(["run", "--http-port", str(port), "--bogus"], env={"TMPDIR": run_tmp, "DYN_LOG": "verbose"})
assert rc == 2 and out.count("DYN_LOG='verbose' names no level") == 1, (rc, out)
print(f"cli: baton run refuses what its children would ({len(refusals)} cases, {len(fe_checked)} frontend flags) "
      "before starting anything")

# --- 4. baton run --help and llama; baton help
rc, out, _ = baton(["run", "--help"])
assert rc == 0 and "--engine llama" in out, out
rc, usage, _ = baton(["--help"])
assert rc == 0 and "usage: baton <command>" in usage, usage
rc, out, _ = baton(["help"])
assert rc == 0 and out == usage, (rc, out)
for cmd in ("run", "frontend", "worker"):
    rc, want, _ = baton([cmd, "--help"])
    rc2, out, _ = baton(["help", cmd])
    assert rc == rc2 == 0 and out == want and f"usage: baton {cmd}" in out, (cmd, rc2, out[:200])
rc, out, _ = baton(["help", "nope"])
assert rc == 2 and "baton help: unknown command 'nope'" in out, (rc, out)
# after a usage error (exit 2) the usage goes to stderr with the message, stdout stays empty; asked
# for (--help, help) it goes to stdout
for args, msg in ((["nope"], "baton: unknown command 'nope'\n"), (["help", "nope"], "baton help: unknown command"),
                  ([], "")):
    p = subprocess.run([BIN] + args, capture_output=True, text=True, env=CLEAN_ENV, timeout=10,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.startswith(msg) and \
        "usage: baton <command>" in p.stderr, (args, p.returncode, p.stdout[:200], p.stderr[:200])
for args in (["--help"], ["-h"], ["help"]):
    p = subprocess.run([BIN] + args, capture_output=True, text=True, env=CLEAN_ENV, timeout=10,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and p.stdout.startswith("usage: baton <command>") and p.stderr == "", (args, p.stderr)
for form in ("--version", "version"):
    rc, out, _ = baton([form])  # stdout and stderr together: the version line and nothing else
    assert rc == 0 and re.fullmatch(r"baton \d+\.\d+\.\d+\n", out), (form, rc, out)
    # it takes no argument: a stray one is a usage error, as `baton frontend extra` is
    p = subprocess.run([BIN, form, "extra"], capture_output=True, text=True, env=CLEAN_ENV, timeout=10,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and p.stdout == "" and \
        p.stderr == f"baton {form}: unknown argument 'extra' (see --help)\n", (form, p.returncode, p.stdout, p.stderr)
print("cli: baton help prints the usage, baton help CMD the command's --help; baton --version the version")

# `baton chaos list | head -1`: a reader that stops early ends a listing quietly, with exit 0 (it
# got what it wanted), and no Python traceback; likewise the C commands' --help and --version.
# The pipe's read end is closed before the command writes anything, so every write fails (EPIPE).
# Python's stdout is buffered, or not with PYTHONUNBUFFERED (then argparse's --help meets the
# error itself): both ways.
for args, unbuffered in [(a, u) for a in (["chaos", "list"], ["chaos", "validate"], ["chaos", "--help"],
                                          ["chaos", "list", "--help"]) for u in (False, True)] + \
        [(a, False) for a in (["--help"], ["help"], ["frontend", "--help"], ["worker", "--help"], ["run", "--help"],
                              ["--version"])]:
    env = {k: v for k, v in CLEAN_ENV.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    rfd, wfd = os.pipe()
    os.close(rfd)
    p = subprocess.run([BIN] + args, stdout=wfd, stderr=subprocess.PIPE, text=True, env=env,
                       stdin=subprocess.DEVNULL, timeout=30)
    os.close(wfd)
    assert p.returncode == 0 and p.stderr == "", (args, unbuffered, p.returncode, p.stderr)
# an output that cannot be written for another reason (a full device) is an error, not a success
for args in (["--help"], ["frontend", "--help"], ["--version"]):
    with open("/dev/full", "w") as full:
        p = subprocess.run([BIN] + args, stdout=full, stderr=subprocess.PIPE, text=True, env=CLEAN_ENV,
                           stdin=subprocess.DEVNULL, timeout=30)
    assert p.returncode == 1 and "baton: cannot write to standard output: No space left on device" in p.stderr, \
        (args, p.returncode, p.stderr)
# A failed write that is not the last one (an output past stdout's buffer): its reason is named
# (by the final flush its errno was gone: "write error"), and nothing is written after it (one more
# byte was written to ask the device why, and the writes after the failed one went on, leaving a
# hole): the reader got a prefix of the output. strace fails the process's Nth write(2) with EIO.
strace = shutil.which("strace")
if strace:
    whole = subprocess.run([BIN, "frontend", "--help"], capture_output=True, env=CLEAN_ENV, timeout=30,
                           stdin=subprocess.DEVNULL).stdout
    assert len(whole) > 8192, f"`baton frontend --help` is {len(whole)} bytes: its first write is its last"
    # LeakSanitizer cannot run under ptrace (scripts/test --sanitize): it would fail the process
    traced_env = dict(CLEAN_ENV, ASAN_OPTIONS="detect_leaks=0")
    for n in (1, 2):
        with tempfile.TemporaryFile() as out:
            p = subprocess.run([strace, "-qq", "-o", "/dev/null", "-e", "trace=write", "-e",
                                f"inject=write:error=EIO:when={n}", BIN, "frontend", "--help"], stdout=out,
                               stderr=subprocess.PIPE, text=True, env=traced_env, stdin=subprocess.DEVNULL,
                               timeout=30)
            out.seek(0)
            got = out.read()
        assert p.returncode == 1 and p.stderr == "baton: cannot write to standard output: Input/output error\n", \
            (n, p.returncode, p.stderr)
        assert len(got) < len(whole) and whole.startswith(got), \
            f"write {n} failed, and the reader got {len(got)} bytes that are not a prefix of the output: {got[-40:]!r}"
else:
    print("cli: strace not installed (scripts/setup installs it): a failed write before the last one not checked")
# and so for baton chaos (a Python program): one line, exit 1, no traceback; buffered or not
for args, unbuffered in [(a, u) for a in (["chaos", "list"], ["chaos", "validate"], ["chaos", "--help"])
                         for u in (False, True)]:
    env = {k: v for k, v in CLEAN_ENV.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    with open("/dev/full", "w") as full:
        p = subprocess.run([BIN] + args, stdout=full, stderr=subprocess.PIPE, text=True, env=env,
                           stdin=subprocess.DEVNULL, timeout=30)
    assert p.returncode == 1 and p.stderr == "baton chaos: cannot write to standard output: No space left on device\n", \
        (args, unbuffered, p.returncode, p.stderr)
rc, out, _ = baton(["chaos", "list"])
assert rc == 0 and out.count("starts its own processes") >= 10, (rc, out[:300])
rc, out, _ = baton(["chaos"])
assert rc == 2 and "the following arguments are required: {run,list,validate}" in out, (rc, out)
# an unknown flag is named as one, before a command too (not reported as the command missing),
# with the usage of the command it came with
for args, prog in ((["chaos", "--nosuch"], "baton chaos"), (["chaos", "run", "--nosuch"], "baton chaos run"),
                   (["chaos", "list", "--nosuch"], "baton chaos list")):
    p = subprocess.run([BIN] + args, capture_output=True, text=True, env=CLEAN_ENV, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.startswith(f"usage: {prog} ") and \
        p.stderr.endswith(f"\n{prog}: error: unrecognized arguments: --nosuch\n") and "required" not in p.stderr, \
        (args, p.returncode, p.stdout, p.stderr)
print("cli: listings into a closed pipe end quietly with exit 0, into a full device with exit 1; a missing chaos "
      "command is named, and so is an unknown flag")


def descendants(pid):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


# Ctrl-C during `baton chaos run`: exit 130 with one line, no traceback, and every process the tool
# started is gone (SIGINT is set to its default first: a background job inherits it ignored)
out_dir = bl.tmpdir("cli-chaos-int")
p = subprocess.Popen([BIN, "chaos", "run", "--only", "worker-kill9", "--out", out_dir], stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True, env=CLEAN_ENV, stdin=subprocess.DEVNULL,
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
lines = []
for line in p.stdout:
    lines.append(line)
    if "load:" in line:  # the topology runs and the load has started
        break
kids = descendants(p.pid)
assert len(kids) >= 3, (kids, "".join(lines))
p.send_signal(signal.SIGINT)
rest, _ = p.communicate(timeout=60)
out = "".join(lines) + rest
assert p.returncode == 130 and "Traceback" not in out and "baton chaos: interrupted" in out, (p.returncode, out[-2000:])
bl.wait_for(lambda: all(not os.path.exists(f"/proc/{k}") or open(f"/proc/{k}/stat").read().split()[2] == "Z"
                        for k in kids), 10, what="every process baton chaos started gone")
print(f"cli: Ctrl-C stops baton chaos run (exit 130, no traceback, its {len(kids)} processes gone)")

# --- 5. discovery directories this user cannot use
base = bl.tmpdir("cli-perm")
os.chmod(base, 0o755)
noread = os.path.join(base, "noread")
nowrite = os.path.join(base, "nowrite")
os.mkdir(noread)
os.mkdir(nowrite)
as_user = ()
if os.geteuid() == 0:
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run as an unprivileged user"
    as_user = (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")
    # the unprivileged user must reach the binary; a build in a private home cannot be tested so
    rc, out, _ = baton(["--help"], prefix=as_user)
    assert rc == 0, f"the binary cannot run as nobody: {out}"
    for d in (noread, nowrite):
        os.chown(d, 0, 0)
os.chmod(noread, 0)
os.chmod(nowrite, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
port = bl.free_port()
for args, want in [
        (["frontend", "--http-port", str(port), "--discovery-dir", noread],
         f"cannot read discovery directory {noread}: Permission denied"),
        (["worker", "--system-port", "-1", "--discovery-dir", noread],
         f"cannot read discovery directory {noread}: Permission denied"),
        (["worker", "--system-port", "-1", "--discovery-dir", nowrite],
         f"in {nowrite}: Permission denied")]:
    rc, out, took = baton(args, prefix=as_user)
    assert rc == 1 and want in out, (args, rc, out)
    assert took < 10, (args, took)
    assert "serving model" not in out, f"the worker announced itself although it cannot register:\n{out}"
assert not listening(port)
os.chmod(noread, 0o755)
print("cli: unreadable and unwritable discovery directories are start-up errors")

# A llama worker that cannot start for a reason no restart fixes is a configuration error (exit 2,
# docs/operations.md): a missing model, a file that is not GGUF or is cut short, libraries that are
# not there.
notgguf = os.path.join(base, "not-a-model.gguf")
with open(notgguf, "w") as f:
    f.write("this is not a model\n")
# a GGUF file cut short (a copy interrupted): its magic is right, its tensors run past its end
cut = os.path.join(base, "cut-short.gguf")
with open(os.path.join(bl.repo_root(), "models", "stories260K.gguf"), "rb") as src, open(cut, "wb") as f:
    f.write(src.read(100000))
for args, want in [(["--model", os.path.join(base, "missing.gguf")],
                    "missing.gguf (--model): No such file or directory"),
                   (["--model", notgguf], "not-a-model.gguf (--model) is not a GGUF file"),
                   (["--model", cut], "llama.cpp cannot load the model %s" % cut),
                   (["--llama-lib-dir", base], "not found: run scripts/setup")]:
    rc, out, took = baton(["worker", "--engine", "llama", "--system-port", "-1"] + args)
    assert rc == 2 and want in out, (args, rc, out)
    assert took < 10, (args, took)
# `baton run` checks its llama workers' model before it starts anything (a typo in --model used to
# start the frontend, then the workers, then stop them all)
port = bl.free_port()
for args, env, want in [(["--model", os.path.join(base, "missing.gguf")], {},
                         "baton run: llama engine: model file %s (--model): No such file or directory"
                         % os.path.join(base, "missing.gguf")),
                        ([], {"DYN_MODEL_PATH": notgguf},
                         "baton run: llama engine: model file %s (DYN_MODEL_PATH) is not a GGUF file" % notgguf),
                        (["--model", cut], {}, "baton run: llama engine: llama.cpp cannot load the model %s" % cut)]:
    rc, out, took = baton(["run", "--engine", "llama", "--http-port", str(port)] + args, env=dict(env, DYN_LOG="info"))
    assert rc == 2 and want in out and "nothing was started" in out, (args, env, rc, out)
    assert "start" not in out.replace("nothing was started", "") and took < 10 and not listening(port), (args, out)
print("cli: a llama worker without a usable model or libraries exits 2 at once")

# A port held by another program is a start-up error (exit 1) that says which flag picks another
with socket.socket() as held:
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    for args, want in [
            (["frontend", "--http-host", "127.0.0.1", "--http-port", str(taken)],
             f"cannot listen on 127.0.0.1:{taken}: address already in use; choose another --http-port (DYN_HTTP_PORT)"),
            (["worker", "--system-port", "-1", "--rpc-port", str(taken), "--discovery-dir", bl.tmpdir("cli-rpc")],
             f"cannot listen on 127.0.0.1:{taken}: address already in use; choose another --rpc-port "
             "(DYN_TCP_RPC_PORT), or 0 for a free one")]:
        rc, out, took = baton(args)
        assert rc == 1 and want in out, (args, rc, out)
        assert took < 10 and "serving model" not in out, (args, took, out)
# an address this machine does not have (192.0.2.1, TEST-NET-1) is the host flag's fault, not the port's
for args, want in [(["frontend", "--http-host", "192.0.2.1", "--http-port", str(bl.free_port()), "--discovery-dir",
                     bl.tmpdir("cli-noaddr")],
                    "address not available; this machine has no such address: choose another --http-host "
                    "(DYN_HTTP_HOST)"),
                   (["worker", "--system-port", "-1", "--rpc-host", "192.0.2.1", "--discovery-dir",
                     bl.tmpdir("cli-noaddr-rpc")],
                    "address not available; this machine has no such address: choose another --rpc-host "
                    "(DYN_TCP_RPC_HOST)"),
                   (["worker", "--system-port", "0", "--system-host", "192.0.2.1", "--discovery-dir",
                     bl.tmpdir("cli-noaddr-status")],
                    "cannot start the status server (DYN_SYSTEM_HOST=192.0.2.1): cannot listen on 192.0.2.1:0: "
                    "address not available; this machine has no such address: choose another DYN_SYSTEM_HOST "
                    "(--system-host)")]:
    rc, out, took = baton(args)
    assert rc == 1 and want in out and "choose another --http-port" not in out and "--rpc-port" not in out \
        and "choose another port" not in out, (args, rc, out)
    assert took < 10, (args, took)
print("cli: a port in use names the flag that chooses another; an address not on this machine, the host flag")

# A NATS TLS file that cannot be read is named with its flag and the reason (nats.c alone says
# "…: (null)"): exit 2, as for any configuration error
for args, want in [(["worker", "--system-port", "-1", "--event-plane", "nats", "--nats-tls-ca", "/nonexistent/ca.pem"],
                    "--nats-tls-ca '/nonexistent/ca.pem' cannot be read: No such file or directory"),
                   (["worker", "--system-port", "-1", "--event-plane", "nats", "--nats-tls-ca", base],
                    f"--nats-tls-ca '{base}' cannot be read: Is a directory"),
                   (["frontend", "--http-port", str(bl.free_port()), "--event-plane", "nats", "--nats-tls-cert",
                     "/nonexistent/c.pem", "--nats-tls-key", "/nonexistent/k.pem"],
                    "--nats-tls-cert '/nonexistent/c.pem' cannot be read: No such file or directory")]:
    rc, out, took = baton(args, env={"NATS_SERVER": "nats://127.0.0.1:1"})
    assert rc == 2 and want in out and "(null)" not in out, (args, rc, out)
    assert took < 10, (args, took)
print("cli: an unreadable NATS TLS file is named with its flag and the reason")

# --- 7. settings that matter only to a part that is off are not refused; a payload is checked anyway
# A worker whose status server is off (DYN_SYSTEM_PORT -1) does not listen on DYN_SYSTEM_HOST: a
# host name there (left over from another deployment) is no reason to refuse to start. A canary
# payload that is given is checked even with health checks off (the default), so that the mistake
# shows now, not on the day the checks are turned on; a good one passes.
good_payload = os.path.join(base, "payload.json")
with open(good_payload, "w") as f:
    f.write('{"prompt": "ping"}\n')
for args, env in [(["--system-port", "-1", "--health-check-payload", "@" + good_payload],
                   {"DYN_SYSTEM_HOST": "localhost"}),
                  (["--system-port=-1", "--system-host", "not-an-address"], {})]:
    w = bl.Proc([BIN, "worker", "--discovery-dir", bl.tmpdir("cli-sys-off")] + args, env=dict(env, DYN_LOG="info"),
                name="worker-status-off")
    w.wait_log(r"status server off", timeout=10)
    w.wait_log(r"serving model", timeout=10)
    assert w.stop(10) == 0, w.log_tail()
for args, env, want in [
        (["worker", "--system-port", "-1", "--health-check-payload", "{bad"], {},
         "baton worker: health check: DYN_HEALTH_CHECK_PAYLOAD (--health-check-payload) is not JSON"),
        (["worker", "--system-port", "-1"], {"DYN_HEALTH_CHECK_PAYLOAD": '{"max_tokens": 1}'},
         "baton worker: health check: DYN_HEALTH_CHECK_PAYLOAD (--health-check-payload) needs \"messages\", "
         "\"prompt\" or \"token_ids\""),
        (["worker", "--system-port", "-1", "--health-check-payload", "@" + os.path.join(base, "missing.json")], {},
         "DYN_HEALTH_CHECK_PAYLOAD (--health-check-payload) file %s: No such file or directory"
         % os.path.join(base, "missing.json")),
        (["run", "--http-port", str(port), "--health-check-payload", "[1]"], {},
         "baton run: health check: DYN_HEALTH_CHECK_PAYLOAD (--health-check-payload) must be a JSON object")]:
    rc, out, took = baton(args, env=env)
    assert rc == 2 and want in out and "serving model" not in out, (args, env, rc, out)
    assert took < 10 and not listening(port), (args, took)
print("cli: DYN_SYSTEM_HOST is not checked with the status server off; a canary payload is checked with checks off")

# --- 8. a file setting that names a FIFO, a device or a directory is refused at once
# Opening a FIFO for reading waits for a writer (none comes here), and /dev/zero never ends: each
# file a flag names must be a regular file, refused otherwise with the flag (or its variable), the
# path and what it is. timeout=10 makes a start-up that blocks fail this test instead of hanging it.
fifo = os.path.join(base, "fifo")
os.mkfifo(fifo)
regular = os.path.join(base, "regular.pem")
with open(regular, "w") as f:
    f.write("not checked before the type\n")
nats_env = {"NATS_SERVER": "nats://127.0.0.1:1"}
notreg = "cannot be read: a FIFO, not a regular file"
secret_msg = "cannot read the secret file %s (DYN_RPC_SECRET_FILE, --rpc-secret-file): %s"
# a secret file is text of at most 4096 bytes: one holding a NUL was cut short there (to nothing
# when the NUL came first: an empty key for the HMAC) and one over 4096 bytes cut to its first
# 4096, a secret that no DYN_RPC_SECRET holding the whole could match
secret_nul = os.path.join(base, "secret-nul")
with open(secret_nul, "wb") as f:
    f.write(b"\x00shared-1\n")
secret_big = os.path.join(base, "secret-big")
with open(secret_big, "wb") as f:
    f.write(b"s" * 4097)
# the newline that ends a line is not part of the secret: 4097 bytes before it are still too many
secret_big_nl = os.path.join(base, "secret-big-nl")
with open(secret_big_nl, "wb") as f:
    f.write(b"s" * 4097 + b"\n")
# nor are the blank lines and blanks that end the file
secret_big_blank = os.path.join(base, "secret-big-blank")
with open(secret_big_blank, "wb") as f:
    f.write(b"s" * 4097 + b"\n\n \t\r\n\n")
fe_port = bl.free_port()
for args, env, code, want in [
        (["worker", "--system-port", "-1", "--event-plane", "nats", "--nats-tls-ca", fifo], nats_env, 2,
         f"--nats-tls-ca '{fifo}' {notreg}"),
        (["frontend", "--http-port", str(fe_port), "--event-plane", "nats", "--nats-tls-cert", regular,
          "--nats-tls-key", fifo], nats_env, 2, f"--nats-tls-key '{fifo}' {notreg}"),
        (["frontend", "--http-port", str(fe_port), "--event-plane", "nats", "--nats-tls-cert", "/dev/zero",
          "--nats-tls-key", regular], nats_env, 2,
         "--nats-tls-cert '/dev/zero' cannot be read: a character device, not a regular file"),
        (["worker", "--system-port", "-1", "--event-plane", "nats"], dict(nats_env, NATS_AUTH_CREDENTIALS_FILE=fifo), 2,
         f"NATS_AUTH_CREDENTIALS_FILE '{fifo}' {notreg}"),
        (["frontend", "--http-port", str(fe_port), "--rpc-secret-file", fifo], {}, 2,
         secret_msg % (fifo, "a FIFO, not a regular file")),
        (["worker", "--system-port", "-1", "--rpc-secret-file", fifo], {}, 2,
         secret_msg % (fifo, "a FIFO, not a regular file")),
        # /dev/zero read as a secret was 4,096 NUL bytes: the empty string, taken as the secret
        (["worker", "--system-port", "-1"], {"DYN_RPC_SECRET_FILE": "/dev/zero"}, 2,
         secret_msg % ("/dev/zero", "a character device, not a regular file")),
        (["frontend", "--http-port", str(fe_port), "--rpc-secret-file", base], {}, 2,
         secret_msg % (base, "Is a directory")),
        (["worker", "--system-port", "-1", "--rpc-secret-file", secret_nul], {}, 2,
         f"the secret file {secret_nul} holds a NUL byte"),
        (["frontend", "--http-port", str(fe_port)], {"DYN_RPC_SECRET_FILE": secret_big}, 2,
         f"the secret file {secret_big} is over 4096 bytes"),
        (["worker", "--system-port", "-1", "--rpc-secret-file", secret_big_nl], {}, 2,
         f"the secret file {secret_big_nl} is over 4096 bytes"),
        (["frontend", "--http-port", str(fe_port), "--rpc-secret-file", secret_big_blank], {}, 2,
         f"the secret file {secret_big_blank} is over 4096 bytes"),
        (["worker", "--system-port", "-1", "--health-check-payload", "@" + fifo], {}, 2,
         f"DYN_HEALTH_CHECK_PAYLOAD (--health-check-payload) file {fifo}: a FIFO, not a regular file"),
        (["worker", "--system-port", "-1", "--engine", "llama", "--model", fifo], {}, 2,
         f"llama engine: model file {fifo} (--model): a FIFO, not a regular file"),
        (["run", "--http-port", str(fe_port), "--engine", "llama", "--model", fifo], {}, 2,
         f"baton run: llama engine: model file {fifo} (--model): a FIFO, not a regular file"),
        # etcd's TLS files are checked when discovery starts: a setting to fix, exit 2 (test_etcd_tls)
        (["frontend", "--http-port", str(fe_port), "--discovery", "etcd", "--etcd-endpoints", "https://127.0.0.1:1",
          "--etcd-ca", fifo], {}, 2, f"ETCD_AUTH_CA (--etcd-ca) '{fifo}' {notreg}")]:
    try:
        rc, out, took = baton(args, env=dict(env, DYN_LOG="info"))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{args} {env}: still running after 10 s (blocked on the FIFO?)")
    assert rc == code and want in out, (args, env, rc, out)
    assert "serving model" not in out and not listening(fe_port), (args, out)
    assert "shared-1" not in out and "s" * 64 not in out, f"a secret was printed: {out}"
# a regular secret file is still read, its trailing newline removed: the worker requires the
# secret (a frontend without it is refused), and a frontend that proves it routes there
secret_file = os.path.join(base, "rpc-secret")
with open(secret_file, "w") as f:
    f.write("shared-1\n")
with bl.Cluster() as c:
    c.start_worker(speedup_ratio=1000, rpc_secret_file=secret_file)
    good = c.start_frontend(env={"DYN_RPC_SECRET": "shared-1"})
    none = c.start_frontend()
    c.wait_workers(good, 1)
    st, _, body = bl.post_json(good.url + "/v1/chat/completions", bl.chat_body(max_tokens=3))
    assert st == 200, (st, body)
    none.proc.wait_log(r"requires a shared secret", timeout=10)
    st, _, body = bl.get_json(none.url + "/health")
    assert body["instances"] == [], body
# a secret of the largest size (4096 bytes, `openssl rand -hex 2048 > file`) with the newline that
# ends its line, "\n" or "\r\n": read as the 4096 bytes (both were refused as over 4096 bytes); and
# with more blank lines and blanks after it (an editor's, a template's), which are not part of the
# secret either (they were counted against the 4096 bytes, and the file refused)
secret_max_lf, secret_max_crlf = os.path.join(base, "secret-max-lf"), os.path.join(base, "secret-max-crlf")
secret_max_blank = os.path.join(base, "secret-max-blank")
with open(secret_max_lf, "wb") as f:
    f.write(b"m" * 4096 + b"\n")
with open(secret_max_crlf, "wb") as f:
    f.write(b"m" * 4096 + b"\r\n")
with open(secret_max_blank, "wb") as f:
    f.write(b"m" * 4096 + b"\n\n \t\r\n\n\n")
with bl.Cluster() as c:
    c.start_worker(speedup_ratio=1000, rpc_secret_file=secret_max_lf)
    by_file = c.start_frontend(rpc_secret_file=secret_max_crlf)
    by_blank_file = c.start_frontend(rpc_secret_file=secret_max_blank)
    by_env = c.start_frontend(env={"DYN_RPC_SECRET": "m" * 4096})
    wrong = c.start_frontend(env={"DYN_RPC_SECRET": "m" * 4095})
    for fe in (by_file, by_blank_file, by_env):
        c.wait_workers(fe, 1)
        st, _, body = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body(max_tokens=3))
        assert st == 200, (st, body)
    c.workers[0].proc.wait_log(r"failed authentication", timeout=10)  # the secret is all 4096 bytes
print("cli: a FIFO, a device or a directory given as a file is refused at once, naming the flag and the path; "
      "so is a secret file with a NUL byte or over 4096 bytes; a regular secret file is read, one of 4096 bytes "
      "and a newline or blank lines too")

# --- 9. `baton run` says what is wrong with DYN_LOG and DYN_LOGGING_JSONL once, not once per process
# Its frontend and workers inherit the environment; each used to repeat the launcher's warning.
# A standalone worker still says it (as the frontend does, section 3). With its status servers off,
# the workers of this group do not care about the --system-host that is no address (section 7).
rc, out, _ = baton(["worker", "--speedup-ratio", "0"], env={"DYN_LOGGING_JSONL": "json"})
assert rc == 2 and "baton worker: DYN_LOGGING_JSONL='json' is neither 1/true nor 0/false" in out, (rc, out)
with bl.Cluster() as c:
    fe = c.start_run(workers=2, speedup_ratio=50, system_port=-1, system_host="localhost",
                     env={"DYN_LOGGING_JSONL": "yes", "DYN_LOG": "verbose,baton=debug"})
    c.wait_workers(fe, 2)
    fe.proc.kill(signal.SIGINT)
    assert fe.proc.wait(30) == 0, fe.proc.log_tail()
    log = fe.proc.log_text()
    assert len(re.findall(r"run\[\d+\]: started worker", log)) == 2, log
    for want in ("DYN_LOGGING_JSONL='yes' is neither 1/true nor 0/false",
                 "DYN_LOG='verbose,baton=debug' names no level"):
        assert log.count(want) == 1, f"{want!r} said {log.count(want)} times:\n{log}"
        assert f"baton run: {want}" in log, log
print("cli: baton run says what is wrong with DYN_LOG and DYN_LOGGING_JSONL once")

# --- 10. API keys from files (--api-key-file, --admin-api-key-file: a key on the command line
# shows in ps), and 11. priority ceilings from a file (--priority-ceiling-file: --priority-ceiling
# puts API keys on the command line too). A key file is read once at start-up, one trailing newline
# removed; a file that cannot be read, an empty one, one of several lines, or a key given both ways
# is a usage error (exit 2) naming the flag, its twin and the file, for `baton frontend` and
# (checked before any child starts) `baton run`; so is a ceiling file that cannot be read, holds a
# NUL or a malformed line (named by its number, never by its key) or is over 1 MiB, or ceilings
# given both ways. No key of any file is printed.
keys = bl.tmpdir("cli-keys")


def key_file(name, content):
    p = os.path.join(keys, name)
    with open(p, "wb") as f:
        f.write(content)
    return p


api_file, admin_file = key_file("api", b"sk-file-1\n"), key_file("admin", b"adm-2\r\n")
same_file = key_file("same", b"sk-file-1")
missing = os.path.join(keys, "missing")
kfifo = os.path.join(keys, "fifo")
os.mkfifo(kfifo)
k_port = bl.free_port()
ceil_good = key_file("ceilings", b"# ceilings of the batch keys\n\nsk-ceil-a=10\r\n   # indented comment\n"
                                 b"  sk-ceil-b=-5\t\n*=3\n")
api_flag, admin_flag = "--api-key-file (DYN_API_KEY_FILE)", "--admin-api-key-file (BATON_ADMIN_API_KEY_FILE)"
cflag = "--priority-ceiling-file (BATON_PRIORITY_CEILING_FILE)"
for cmd in ("frontend", "run"):
    for args, env, want in [
            (["--api-key-file", missing], {}, f"{api_flag}: cannot read {missing}: No such file or directory"),
            (["--api-key-file", keys], {}, f"{api_flag}: cannot read {keys}: Is a directory"),
            ([], {"BATON_ADMIN_API_KEY_FILE": kfifo}, f"{admin_flag}: cannot read {kfifo}: a FIFO, not a regular file"),
            (["--api-key-file", key_file("empty", b"")], {}, "is empty: it must hold the key alone"),
            (["--admin-api-key-file", key_file("newline", b"\n")], {}, "is empty: it must hold the key alone"),
            (["--api-key-file", key_file("two", b"k\n\n")], {}, "holds more than one line"),
            # the blank lines after a key of the largest size are what is wrong, not its size (they
            # are not counted against the 4096 bytes)
            (["--api-key-file", key_file("max-lines", b"k" * 4096 + b"\n\n\n")], {}, "holds more than one line"),
            (["--admin-api-key-file", key_file("max-blank", b"k" * 4096 + b" \n")], {},
             "has a blank before or after the key"),
            (["--api-key-file", key_file("max-over", b"k" * 4097 + b"\n\n")], {}, "is over 4096 bytes"),
            (["--api-key-file", key_file("nul", b"k\x00k")], {}, "holds a NUL byte"),
            # a key no client can present: the Authorization parser drops blanks around a token, and
            # the key is compared whole, so every request would get 401
            (["--api-key-file", key_file("lead", b" sk-file-1\n")], {},
             f"{api_flag}: {keys}/lead has a blank before or after the key, which no Authorization header carries"),
            (["--admin-api-key-file", key_file("trail", b"adm-2\t\r\n")], {}, "has a blank before or after the key"),
            (["--api-key-file", key_file("inner", b"sk-file 1\n")], {},
             "holds a blank, a control character or a byte outside ASCII in the key"),
            (["--api-key-file", key_file("utf8", "sk-file-1\u00e9\n".encode())], {}, "a byte outside ASCII"),
            (["--api-key-file", key_file("bom-only", b"\xef\xbb\xbf\n")], {}, "is empty"),
            (["--api-key", " sk-file-1"], {},
             "--api-key (DYN_API_KEY): the key holds a blank, a control character or a byte outside ASCII"),
            ([], {"BATON_ADMIN_API_KEY": "adm-2 "}, "--admin-api-key (BATON_ADMIN_API_KEY): the key holds a blank"),
            # an empty key is not "no key": a template or secret store that left it empty would
            # otherwise serve an open API without a word
            (["--api-key", ""], {}, "--api-key (DYN_API_KEY) is given empty: leave it out to run without an API key"),
            # the same for the secrets: empty would mean an open request plane, random tenant labels
            (["--rpc-secret-file", ""], {},
             "--rpc-secret-file (DYN_RPC_SECRET_FILE) is given empty: leave it out to run without a request-plane secret"),
            ([], {"DYN_RPC_SECRET_FILE": ""}, "DYN_RPC_SECRET_FILE (--rpc-secret-file) is set but empty"),
            ([], {"DYN_RPC_SECRET": ""}, "DYN_RPC_SECRET is set but empty: unset it to run without a request-plane secret"),
            (["--tenant-label-secret-file="], {},
             "--tenant-label-secret-file (BATON_TENANT_LABEL_SECRET_FILE) is given empty"),
            (["--admin-api-key="], {},
             "--admin-api-key (BATON_ADMIN_API_KEY) is given empty: leave it out to run without an operator key"),
            ([], {"DYN_API_KEY": ""}, "DYN_API_KEY (--api-key) is set but empty: unset it to run without an API key"),
            ([], {"BATON_ADMIN_API_KEY": ""}, "BATON_ADMIN_API_KEY (--admin-api-key) is set but empty"),
            ([], {"DYN_API_KEY_FILE": ""}, "DYN_API_KEY_FILE (--api-key-file) is set but empty"),
            (["--admin-api-key-file", ""], {}, "--admin-api-key-file (BATON_ADMIN_API_KEY_FILE) is given empty"),
            (["--api-key-file", api_file], {"DYN_API_KEY": ""}, "DYN_API_KEY (--api-key) is set but empty"),
            (["--api-key", "k", "--api-key-file", api_file], {},
             "--api-key (DYN_API_KEY) and --api-key-file (DYN_API_KEY_FILE) are both given"),
            (["--api-key-file", api_file], {"DYN_API_KEY": "k"}, "are both given: give the key one way"),
            (["--admin-api-key", "a"], {"BATON_ADMIN_API_KEY_FILE": admin_file},
             "--admin-api-key (BATON_ADMIN_API_KEY) and --admin-api-key-file (BATON_ADMIN_API_KEY_FILE) are both given"),
            # the keys read from the files are the keys: the same one twice is refused as on the command line
            (["--api-key-file", api_file, "--admin-api-key-file", same_file], {},
             "--admin-api-key (BATON_ADMIN_API_KEY) must differ from --api-key (DYN_API_KEY)"),
            # --priority-ceiling-file
            (["--priority-ceiling-file", missing], {}, f"{cflag}: cannot read {missing}: No such file or directory"),
            (["--priority-ceiling-file", keys], {}, f"{cflag}: cannot read {keys}: Is a directory"),
            ([], {"BATON_PRIORITY_CEILING_FILE": kfifo}, f"{cflag}: cannot read {kfifo}: a FIFO, not a regular file"),
            (["--priority-ceiling-file", key_file("c-value", b"# c\nsecretk=1\n\nsecretk2=soon\n")], {},
             f"{cflag}: {keys}/c-value line 4: 'soon' is not an integer from -1000000 to 1000000"),
            (["--priority-ceiling-file", key_file("c-range", b"secretk=1\n*=2000000\n")], {},
             f"{cflag}: {keys}/c-range line 2: '2000000' is not an integer"),
            (["--priority-ceiling-file", key_file("c-noeq", b"\n\nsecretk\n")], {},
             f"{cflag}: {keys}/c-noeq line 3 is not KEY=N"),
            (["--priority-ceiling-file", key_file("c-nokey", b"=3\n")], {}, f"{keys}/c-nokey line 1 is not KEY=N"),
            (["--priority-ceiling-file", key_file("c-nul", b"secretk=1\x00\n")], {}, "holds a NUL byte"),
            (["--priority-ceiling-file", key_file("c-big", b"# secretk\n" * 120000)], {}, "is over 1048576 bytes"),
            (["--priority-ceiling", "secretk=1", "--priority-ceiling-file", ceil_good], {},
             "--priority-ceiling (BATON_PRIORITY_CEILING) and --priority-ceiling-file (BATON_PRIORITY_CEILING_FILE) "
             "are both given: give the ceilings one way"),
            (["--priority-ceiling", "secretk=1"], {"BATON_PRIORITY_CEILING_FILE": ceil_good}, "are both given"),
            # a key no Bearer token carries would never be matched, and a second entry for a key would
            # never be read (or, for *, silently replace the first): either leaves a caller at another
            # ceiling than the operator wrote
            (["--priority-ceiling-file", key_file("c-inner", b"secretk x=1\n")], {},
             f"{cflag}: {keys}/c-inner line 1: the key holds a blank, a control character or a byte outside ASCII"),
            (["--priority-ceiling-file", key_file("c-utf8", "# c\nsecretk\u00e9=1\n".encode())], {},
             f"{keys}/c-utf8 line 2: the key holds"),
            (["--priority-ceiling-file", key_file("c-dup", b"secretk=1\n# c\n secretk = 2\n")], {},
             f"{cflag}: {keys}/c-dup line 3 repeats the key of line 1: give each key once"),
            (["--priority-ceiling-file", key_file("c-dup-star", b"*=1\nsecretk=0\n* = 4\n")], {},
             f"{keys}/c-dup-star line 3 repeats the key of line 1"),
            (["--priority-ceiling-file", key_file("c-blank-num", b"secretk = \n")], {},
             f"{keys}/c-blank-num line 1: '' is not an integer"),
            (["--priority-ceiling", "secretk=1, secretk =2"], {},
             "--priority-ceiling: entry 2 repeats the key of entry 1: give each key once"),
            ([], {"BATON_PRIORITY_CEILING": "*=1,secretk\tx=2"}, "--priority-ceiling: entry 2: the key holds a blank"),
            # an empty list is not "no ceilings": a template or secret store that left it empty
            # would otherwise let every key ask for any priority without a word (as an empty key
            # would open the API)
            (["--priority-ceiling", ""], {},
             "--priority-ceiling (BATON_PRIORITY_CEILING) is given empty: leave it out to run without priority "
             "ceilings"),
            (["--priority-ceiling="], {}, "--priority-ceiling (BATON_PRIORITY_CEILING) is given empty"),
            ([], {"BATON_PRIORITY_CEILING": ""},
             "BATON_PRIORITY_CEILING (--priority-ceiling) is set but empty: unset it to run without priority ceilings"),
            (["--priority-ceiling-file", ""], {},
             "--priority-ceiling-file (BATON_PRIORITY_CEILING_FILE) is given empty: leave it out"),
            ([], {"BATON_PRIORITY_CEILING_FILE": ""},
             "BATON_PRIORITY_CEILING_FILE (--priority-ceiling-file) is set but empty"),
            (["--priority-ceiling", ""], {"BATON_PRIORITY_CEILING_FILE": ceil_good},
             "--priority-ceiling (BATON_PRIORITY_CEILING) is given empty"),
            ([], {"BATON_PRIORITY_CEILING": "secretk=1,*=0,*=2"}, "entry 3 repeats the key of entry 2"),
            # only the --api-key opens the API: a ceiling for any other key could never apply
            (["--api-key", "sk-file-1", "--priority-ceiling", "sk-file-1=1,secretk=2,*=0"], {},
             "--priority-ceiling: entry 2 names a key other than the --api-key: only the --api-key opens the API"),
            (["--api-key-file", api_file, "--priority-ceiling-file", key_file("c-other", b"*=0\nsecretk=1\n")], {},
             "--priority-ceiling-file: line 2 names a key other than the --api-key")]:
        try:
            rc, out, took = baton([cmd, "--http-port", str(k_port)] + args, env=env)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{cmd} {args} {env}: still running after 10 s")
        assert rc == 2 and want in out and f"baton {cmd}" in out, (cmd, args, env, rc, out)
        printed = [k for k in ("sk-file-1", "adm-2", "secretk", "sk-ceil") if k in out]
        assert not printed, f"a key was printed: {out}"
        assert not listening(k_port), (cmd, args)
print("cli: bad --api-key-file, --admin-api-key-file and --priority-ceiling-file files (and their twins) are "
      "usage errors")

# a frontend started with the key files requires exactly those keys
for how in ("frontend", "run"):
    with bl.Cluster() as c:
        if how == "frontend":
            c.start_worker(speedup_ratio=1000)
            fe = c.start_frontend(api_key_file=api_file, env={"BATON_ADMIN_API_KEY_FILE": admin_file})
        else:
            fe = c.start_run(workers=1, speedup_ratio=1000, system_port=-1, api_key_file=api_file,
                             admin_api_key_file=admin_file)
        c.wait_workers(fe, 1)
        # the newline that ends each file is not part of its key ("\r\n" for the admin key's)
        for key, want in (("sk-file-1", 200), ("adm-2", 401), ("wrong", 401), (None, 401)):
            hdrs = {"Authorization": f"Bearer {key}"} if key else {}
            st, _, body = bl.post_json(fe.url + "/v1/completions", bl.completion_body(max_tokens=2), headers=hdrs)
            assert st == want, (how, key, st, body)
        for key, want in (("adm-2", 200), ("sk-file-1", 401)):
            st, _, body = bl.get_json(fe.url + "/admission", {"Authorization": f"Bearer {key}"})
            assert st == want, (how, "admission", key, st, body)
        with open(f"/proc/{fe.proc.pid}/cmdline", "rb") as f:
            assert b"sk-file-1" not in f.read(), how
print("cli: --api-key-file and --admin-api-key-file (and their twins) give the keys")

# a byte order mark (which some editors write first) is not part of the key
with bl.Cluster() as c:
    c.start_worker(speedup_ratio=1000)
    fe = c.start_frontend(api_key_file=key_file("bom", b"\xef\xbb\xbfsk-bom-3\r\n"))
    c.wait_workers(fe, 1)
    for key, want in (("sk-bom-3", 200), ("\u00ef\u00bb\u00bfsk-bom-3", 401), (None, 401)):
        hdrs = {"Authorization": f"Bearer {key}"} if key else {}
        st, _, body = bl.post_json(fe.url + "/v1/completions", bl.completion_body(max_tokens=2), headers=hdrs)
        assert st == want, (key, st, body)
print("cli: a key file's byte order mark is not part of its key")

# --- 11. with a good ceiling file the keys are not on the command line, and the REQUEST a (fake)
# worker gets carries the priority as the file's ceilings bound it. Blanks around a key, its '=' and
# its number are not part of them, nor is a byte order mark that starts the file; the same for the
# --priority-ceiling form (given here as its environment twin, which keeps the keys out of ps too),
# blanks after its commas included.
ceil_spaced = key_file("ceilings-spaced", b"\xef\xbb\xbfsk-ceil-a = 10\n\tsk-ceil-b\t=\t-5\n* =3\n")
for how, kw in (("file", {"priority_ceiling_file": ceil_good}),
                ("spaced file", {"priority_ceiling_file": ceil_spaced}),
                ("flag", {"env": {"BATON_PRIORITY_CEILING": "sk-ceil-a = 10, sk-ceil-b=-5 , *= 3"}})):
    with bl.Cluster() as c:
        fe = c.start_frontend(**kw)
        fw = fk.FakeWorker(c.discovery_dir, lambda w, stream, p: (w.send(fk.tokens(stream, [1], " a")),
                                                                  w.send(fk.finish(stream, fk.FINISH_STOP, 3, 1))))
        try:
            fw.wait_connected()
            c.wait_workers(fe, 1)
            with open(f"/proc/{fe.proc.pid}/cmdline", "rb") as f:
                assert b"sk-ceil" not in f.read(), "a key on the frontend's command line"
            # (key, asked, settled): a key may ask for its ceiling or anything less urgent; asking for
            # more urgent gets the ceiling; callers not listed (and callers with no key) get *=3's
            for i, (key, asked, want) in enumerate((("sk-ceil-a", 0, 10), ("sk-ceil-a", 20, 20),
                                                     ("sk-ceil-b", -100, -5), ("sk-ceil-b", -2, -2), (None, -1, 3),
                                                     ("other-key", 0, 3), (None, 7, 7))):
                rid = f"ceil-{i}-{int(time.time() * 1000)}"
                hdrs = {"X-Request-Id": rid}
                if key:
                    hdrs["Authorization"] = f"Bearer {key}"
                st, _, body = bl.post_json(fe.url + "/v1/chat/completions",
                                           bl.chat_body("x", max_tokens=4, priority=asked), headers=hdrs, timeout=20)
                assert st == 200 and body["choices"][0]["message"]["content"] == " a", (how, key, asked, st, body)
                got = fw.request_of(rid)
                assert got, f"{rid}: no REQUEST reached the fake worker"
                assert got[2].get("priority", 0) == want, (how, key, asked, want, got[2].get("priority"))
        finally:
            fw.close()
with bl.Cluster() as c:  # `baton run` hands the file to its frontend, not to its workers
    fe = c.start_run(workers=1, speedup_ratio=1000, system_port=-1, priority_ceiling_file=ceil_good)
    c.wait_workers(fe, 1)
    st, _, body = bl.post_json(fe.url + "/v1/completions", bl.completion_body(max_tokens=2, priority=0),
                               headers={"Authorization": "Bearer sk-ceil-a"})
    assert st == 200, body
    with open(f"/proc/{fe.proc.pid}/cmdline", "rb") as f:
        assert b"sk-ceil" not in f.read(), "a key on baton run's command line"
print("cli: --priority-ceiling-file and --priority-ceiling (and their twins) give the ceilings, blanks around "
      "keys and numbers and a byte order mark aside; bad files are usage errors naming the line")
