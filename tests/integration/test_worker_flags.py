"""Worker settings: the wrong engine's settings are refused, --namespace, and what --help tells.

  1. Each openai-engine setting (as a flag, and --upstream also as DYN_UPSTREAM_URL) given to a
     worker that runs the mocker or the llama engine: exit 2 at once with a message naming the
     setting and `--engine openai`, nothing registered in discovery. Each mocker setting (flag, and
     DYN_SPEEDUP_RATIO) given with --engine openai: exit 2 naming it. A setting both engines read
     (--default-max-tokens) is accepted with either. A llama worker that cannot have an engine
     (libraries missing; or a build without llama.cpp's headers) exits 2 naming scripts/setup.
  2. `baton run --engine openai --upstream URL` serves through that upstream: the launcher adds no
     mocker setting of its own.
  3. --namespace / DYN_NAMESPACE: the worker serves dyn://NS.backend.generate; the frontend of that
     namespace routes to it, the frontend of another does not. A namespace and an --endpoint in
     another namespace are refused (exit 2), as is a namespace with a '.'.
  4. --help: the worker lists --namespace with DYN_NAMESPACE; --discovery-dir's default reads
     $TMPDIR/baton_store_kv, and a worker and a frontend started without one meet there; run,
     frontend and worker list DYN_LOG and DYN_LOGGING_JSONL, which do what the help says.
  5. A llama worker without --model-name serves its model file's name without .gguf (stories260K
     for the bundled model), under `baton worker` and `baton run --engine llama` alike: /v1/models
     lists it, "baton: serving" names it, a request for it is served and "mock-model" is 404. A
     llama worker with more --llama-threads than the CPUs it may run on warns so at start."""

import json
import os
import re
import signal
import subprocess

import batonlib as bl

bl.deadline(180, "test_worker_flags")
BIN = bl.baton_bin()


children = bl.children


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read().split("\0")


def refused(c, args, env=None, rx=None):
    """Starts `baton worker args` in cluster c; asserts exit 2 within 10 s, nothing registered, and
    the message matching rx. Returns the output."""
    before = set(os.listdir(c.discovery_dir))
    p = bl.Proc([BIN, "worker", "--discovery-dir", c.discovery_dir, "--system-port", "-1"] + args,
                env=env, log=c._log("refused"), name="worker-refused")
    rc = p.wait(10)
    out = p.log_text()
    assert rc == 2, f"worker {args} {env or ''}: exit {rc} (expected 2); output:\n{out}"
    assert rx is None or re.search(rx, out), f"worker {args} {env or ''}: output does not match {rx!r}:\n{out}"
    assert set(os.listdir(c.discovery_dir)) == before, f"worker {args} registered before refusing"
    return out


# --- 1. a setting of the other engine is refused
OPENAI_ONLY = [("--upstream", "http://127.0.0.1:9"), ("--upstream-model", "m"), ("--upstream-kind", "vllm"),
               ("--upstream-api-key", "k"), ("--upstream-total-blocks", "10"), ("--upstream-health-interval", "1"),
               ("--upstream-health-failures", "2"), ("--upstream-startup-timeout", "5")]
MOCKER_ONLY = [("--num-gpu-blocks-override", "100"), ("--block-size", "16"), ("--max-num-seqs", "4"),
               ("--max-num-batched-tokens", "100"), ("--watermark", "0.1"), ("--speedup-ratio", "2"),
               ("--fault-die-after-tokens", "5"), ("--fault-stall-after-tokens", "5"),
               ("--fault-error-after-tokens", "5"), ("--fault-signals", None), ("--batch-gather-us", "500")]
with bl.Cluster() as c:
    for flag, value in OPENAI_ONLY:
        refused(c, [flag, value], rx=re.escape(flag) + r" is a setting of the openai engine, but this worker runs the "
                                                     r"mocker: add --engine openai")
        refused(c, ["--engine", "mocker", f"{flag}={value}"], rx=re.escape(flag) + r" .*--engine openai")
    refused(c, [], env={"DYN_UPSTREAM_URL": "http://127.0.0.1:9"},
            rx=r"DYN_UPSTREAM_URL is a setting of the openai engine.*add --engine openai")
    up = ["--engine", "openai", "--upstream", "http://127.0.0.1:9"]
    for flag, value in MOCKER_ONLY:
        refused(c, up + [flag] + ([value] if value else []),
                rx=re.escape(flag) + r" is a setting of the mocker engine, which this worker does not run")
    refused(c, up, env={"DYN_SPEEDUP_RATIO": "3"}, rx=r"DYN_SPEEDUP_RATIO is a setting of the mocker engine")
    # the llama engine reads no openai setting either: refused the same way, naming --engine openai
    # (a llama worker given --upstream used to ignore it in silence)
    for flag, value in OPENAI_ONLY + [("--upstream-raw-completions", None)]:
        refused(c, ["--engine", "llama", flag] + ([value] if value else []),
                rx=re.escape(flag) + r" is a setting of the openai engine, but this worker runs the llama engine "
                                     r"\(--engine llama\): add --engine openai")
    refused(c, ["--engine", "llama"], env={"DYN_UPSTREAM_URL": "http://127.0.0.1:9"},
            rx=r"DYN_UPSTREAM_URL is a setting of the openai engine, but this worker runs the llama engine")
    refused(c, ["--upstream-raw-completions"], rx=r"--upstream-raw-completions is a setting of the openai engine, "
                                                  r"but this worker runs the mocker: add --engine openai")
    # a setting both engines read is accepted with either
    dead = bl.free_port()  # nothing listens: the openai worker waits for its upstream
    w = c.start_worker(engine="openai", upstream=f"http://127.0.0.1:{dead}", default_max_tokens=5,
                       upstream_startup_timeout=60)
    w.proc.wait_log(r"openai: upstream http://127\.0\.0\.1:%d" % dead, timeout=10)
    assert w.proc.alive(), w.proc.log_tail()
    w.proc.stop()
    fe = c.start_frontend()
    c.start_worker(speedup_ratio=50, default_max_tokens=5)
    c.wait_workers(fe, 1)
print(f"wrong engine: {len(OPENAI_ONLY) * 2 + 2} openai settings refused with the mocker, {len(OPENAI_ONLY) + 2} "
      f"with llama, {len(MOCKER_ONLY) + 1} mocker settings with openai, exit 2")

# --- 1b. a llama worker that cannot have an engine is a configuration error (exit 2) naming what
# to run: in a build with llama.cpp's headers, libraries missing from --llama-lib-dir; in a build
# without them, any llama worker
with bl.Cluster() as c:
    out = refused(c, ["--engine", "llama", "--llama-lib-dir", os.path.join(c.dir, "no-such-dir")],
                  rx=r"scripts/setup")
    built_without = "built without llama.cpp's headers" in out
    print("llama engine unavailable: exit 2 naming scripts/setup "
          f"({'a build without the headers' if built_without else 'libraries missing'})")

# --- 2. baton run in front of an openai-compatible upstream
with bl.Cluster() as up:
    ufe = up.start_frontend()
    up.start_worker(speedup_ratio=50)
    up.wait_workers(ufe, 1)
    with bl.Cluster() as c:
        fe = c.start_run(workers=1, engine="openai", upstream=ufe.url)
        wargs = [a for a in (cmdline(p) for p in children(fe.proc.pid)) if a[1] == "worker"]
        assert len(wargs) == 1 and "--speedup-ratio" not in wargs[0] and ufe.url in wargs[0], wargs
        s = bl.stream_chat(fe.url, bl.chat_body("through the upstream", max_tokens=8)).assert_ok("stream via run")
        assert bl.metric_sum(bl.metrics(ufe.url), "dynamo_frontend_requests_total") >= 1
        fe.proc.kill(signal.SIGINT)
        assert fe.proc.wait(30) == 0, fe.proc.returncode
print("baton run --engine openai: served through the upstream")

# --- 3. --namespace
with bl.Cluster() as c:
    fe_b = c.start_frontend(namespace="team-b")
    fe_default = c.start_frontend()
    c.start_worker(namespace="team-b", speedup_ratio=50)
    c.start_worker(env={"DYN_NAMESPACE": "team-b"}, speedup_ratio=50)
    insts = c.wait_workers(fe_b, 2)
    assert all(i["namespace"] == "team-b" and i["component"] == "backend" and i["endpoint"] == "generate"
               for i in insts), insts
    bl.stream_chat(fe_b.url, bl.chat_body("namespaced", max_tokens=6)).assert_ok("stream in team-b")
    st, _, body = bl.get_json(fe_default.url + "/health")
    assert st == 200 and body["instances"] == [], body
    refused(c, ["--namespace", "a", "--endpoint", "dyn://b.backend.generate"],
            rx=r"--namespace 'a' and --endpoint 'dyn://b\.backend\.generate' name different namespaces")
    refused(c, ["--endpoint", "dyn://b.backend.generate"], env={"DYN_NAMESPACE": "a"},
            rx=r"DYN_NAMESPACE 'a' and --endpoint 'dyn://b\.backend\.generate' name different namespaces")
    refused(c, ["--namespace", "a.b"], rx=r"invalid --namespace 'a\.b'")
    # the same namespace in both is fine
    c.start_worker(namespace="team-b", endpoint="dyn://team-b.backend.generate", speedup_ratio=50)
    c.wait_workers(fe_b, 3)
print("--namespace: team-b workers (flag and DYN_NAMESPACE) routed by the team-b frontend only; conflicts refused")


# --- 4. --help: real defaults, logging variables
def help_of(cmd):
    return subprocess.run([BIN, cmd, "--help"], capture_output=True, text=True, timeout=10, check=True,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}).stdout


for cmd in ("run", "frontend", "worker"):
    h = help_of(cmd)
    assert re.search(r"(?m)^  DYN_LOG +level: error, warn, info, debug or trace.* \[default: info\]$", h), (cmd, h)
    assert re.search(r"(?m)^  DYN_LOGGING_JSONL +1 or true: each line one JSON object.* \[default: false\]$", h), \
        (cmd, h)
    if cmd != "run":
        assert re.search(r"(?m)^  --discovery-dir +DYN_FILE_KV +.*\[default: \$TMPDIR/baton_store_kv\]$", h), (cmd, h)
assert re.search(r"(?m)^  --namespace +DYN_NAMESPACE +.*\[default: dynamo\]$", help_of("worker"))

with bl.Cluster() as c:
    tmp = bl.tmpdir()
    env = {"DYN_FILE_KV": None, "TMPDIR": tmp}
    w = bl.Proc([BIN, "worker", "--system-port", "-1", "--speedup-ratio", "50"], env=env, log=c._log("worker"),
                name="worker-default-dir")
    c.workers.append(bl.Worker(w, 0, None))
    kv = os.path.join(tmp, "baton_store_kv")
    bl.wait_for(lambda: [n for n in os.listdir(kv) if not n.startswith(".")], 10,
                what=f"the worker registering in {kv}")
    port = bl.free_port()
    f = bl.Proc([BIN, "frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
                 "--shutdown-accept-window-ms", "0"], env=env, log=c._log("frontend"), name="frontend-default-dir")
    fe = bl.Frontend(f"http://127.0.0.1:{port}", port, f)
    c.frontends.append(fe)
    bl.wait_http(fe.url + "/live", f)
    c.wait_workers(fe, 1)

    # DYN_LOGGING_JSONL: every line one JSON object; DYN_LOG=warn: no INFO line
    j = c.start_worker(env={"DYN_LOGGING_JSONL": "1"}, speedup_ratio=50)
    q = c.start_worker(env={"DYN_LOG": "warn"}, speedup_ratio=50)
    bl.wait_for(lambda: len([n for n in os.listdir(c.discovery_dir) if not n.startswith(".")]) == 2, 10,
                what="both logging workers registered")
    j.proc.wait_log(r"serving model", timeout=10)
    for line in j.proc.log_text().splitlines():
        obj = json.loads(line)
        assert set(obj) == {"time", "level", "component", "pid", "message"} and obj["component"] == "worker", obj
    assert any(json.loads(l)["level"] == "INFO" for l in j.proc.log_text().splitlines())
    assert q.proc.alive() and not re.search(r" (INFO|DEBUG) ", q.proc.log_text()), q.proc.log_text()
print("--help: --namespace, $TMPDIR/baton_store_kv (a worker and a frontend met there), DYN_LOG, DYN_LOGGING_JSONL")
# --- 5. the name a llama worker serves: its model file's, with `baton worker` and `baton run` alike
if os.environ.get("BATON_NO_LLAMA") == "1":
    print("llama model name: skipped (BATON_NO_LLAMA=1)")
else:
    def model_ids(url):
        st, _, body = bl.get_json(url + "/v1/models")
        assert st == 200, (st, body)
        return sorted(m["id"] for m in body["data"])

    def served(url, model, want_ok):
        st, _, body = bl.post_json(url + "/v1/completions", bl.completion_body("Once upon a time", model=model,
                                                                               max_tokens=6, temperature=0))
        if want_ok:
            assert st == 200 and body["model"] == model and body["choices"][0]["text"], (model, st, body)
        else:
            assert st == 404 and body["error"]["code"] == "model_not_found", (model, st, body)

    with bl.Cluster() as c:
        fe = c.start_run(workers=1, engine="llama")
        assert re.search(r"(?m)^baton: serving 'stories260K' with 1 worker at", fe.proc.log_text()), fe.proc.log_tail()
        assert model_ids(fe.url) == ["stories260K"], model_ids(fe.url)
        served(fe.url, "stories260K", True)
        served(fe.url, "mock-model", False)
        fe.proc.kill(signal.SIGINT)
        assert fe.proc.wait(30) == 0, fe.proc.returncode
    model = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models",
                         "stories260K.gguf")
    with bl.Cluster() as c:
        renamed = os.path.join(c.dir, "tiny-tales.GGUF")
        os.symlink(model, renamed)
        fe = c.start_frontend()
        w1 = c.start_worker(engine="llama", model_name=None)  # the harness names llama workers mock-model
        w2 = c.start_worker(engine="llama", model_name=None, model=renamed)
        # more llama.cpp threads than CPUs: warned at start (its threads spin for each other)
        ncpu = len(os.sched_getaffinity(0))
        w3 = c.start_worker(engine="llama", model_name="my-name", llama_threads=min(ncpu + 1, 256))
        c.wait_workers(fe, 3)
        assert model_ids(fe.url) == ["my-name", "stories260K", "tiny-tales"], model_ids(fe.url)
        for w, name in ((w1, "stories260K"), (w2, "tiny-tales"), (w3, "my-name")):
            assert re.search(r"serving model '%s'" % name, w.proc.log_text()), (name, w.proc.log_tail())
        served(fe.url, "tiny-tales", True)
        over = r"WARN .*--llama-threads %d is more than the %d CPUs this process may use" % (ncpu + 1, ncpu)
        if ncpu + 1 <= 256:
            assert re.search(over, w3.proc.log_text()), w3.proc.log_tail()
        assert "--llama-threads" not in w1.proc.log_text() + w2.proc.log_text(), w1.proc.log_tail()
    print("llama model name: the model file's name (baton run and baton worker), --model-name overrides; "
          "--llama-threads above the CPUs warned")

print("test_worker_flags: ok")
