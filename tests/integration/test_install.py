"""`cmake --install` into a temporary prefix, then every command run from there, away from the
source tree: the installed tree holds the binary, the chaos tool (with its scenarios and the
harness it imports), the systemd units naming the installed binary, the docs and any bundled model;
`baton --help`, `baton run` serving requests, and `baton chaos` (list, validate and a real
scenario run) all work from the installed location, also after the whole prefix has been moved;
a binary copied without its data directory says where it looked; a DESTDIR staging install writes
units that name the final prefix, not the staging directory; the runtime component (what the image
installs) is the binary and the models alone; a configure without options does not turn warnings
into errors, and one with -DBATON_WERROR=ON does, and the binary (the core library and the entry
point) builds so in Release."""

import filecmp
import glob
import os
import re
import shutil
import signal
import subprocess

import batonlib as bl

bl.deadline(300, "test_install")

src = bl.repo_root()
build = os.environ.get("BATON_BUILD_DIR") or os.path.dirname(os.path.realpath(bl.baton_bin()))
assert os.path.isfile(os.path.join(build, "cmake_install.cmake")), \
    f"{build} is not a CMake build directory (set BATON_BUILD_DIR)"
tmp = bl.tmpdir()


def install(prefix, destdir=None, component=None):
    env = dict(os.environ)
    env.pop("DESTDIR", None)
    if destdir:
        env["DESTDIR"] = destdir
    extra = ["--component", component] if component else []
    r = subprocess.run(["cmake", "--install", build, "--prefix", prefix] + extra, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"cmake --install failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"


# A clean environment: nothing that could point a command back at the source or build tree.
clean_env = {k: v for k, v in os.environ.items()
             if not (k.startswith("BATON_") or k.startswith("DYN_") or k in ("PYTHONPATH", "ETCD_ENDPOINTS"))}
clean_env["PYTHONDONTWRITEBYTECODE"] = "1"


def cmd(args, rc=0, timeout=120, cwd=None):
    r = subprocess.run(args, env=clean_env, cwd=cwd or tmp, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == rc, f"{' '.join(args)}: exit {r.returncode}, expected {rc}\n{r.stdout}\n{r.stderr}"
    return r


# ---- 1. what the install writes --------------------------------------------------------------
p1 = os.path.join(tmp, "p1")
install(p1)
binp = os.path.join(p1, "bin", "baton")
assert os.access(binp, os.X_OK), f"{binp} not installed or not executable"
chaos = os.path.join(p1, "share", "baton", "chaos")
same = [("tools/chaos/chaos.py", "chaos.py"), ("tests/lib/batonlib.py", "lib/batonlib.py")]
same += [(os.path.relpath(f, src), os.path.join("chaoslib", os.path.basename(f)))
         for f in glob.glob(os.path.join(src, "tools/chaos/chaoslib/*.py"))]
scenario_files = sorted(glob.glob(os.path.join(src, "tools/chaos/scenarios/*.toml")))
assert len(scenario_files) >= 3, scenario_files
same += [(os.path.relpath(f, src), os.path.join("scenarios", os.path.basename(f))) for f in scenario_files]
for s, d in same:
    dst = os.path.join(chaos, d)
    assert os.path.isfile(dst), f"{d} is not installed in {chaos}"
    assert filecmp.cmp(os.path.join(src, s), dst, shallow=False), f"installed {d} differs from {s}"
docdir = os.path.join(p1, "share", "doc", "baton")
for f in ["README.md"] + [os.path.join("docs", os.path.basename(d)) for d in glob.glob(os.path.join(src, "docs/*.md"))]:
    assert os.path.isfile(os.path.join(docdir, os.path.basename(f))), f"{f} is not installed in {docdir}"
# every relative link of the installed pages leads to an installed file (README.md's docs/X.md
# links are rewritten, since the docs are its siblings there)
broken = []
for page in glob.glob(os.path.join(docdir, "*.md")):
    with open(page) as fh:
        for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", fh.read()):
            target = m.group(1)
            if not re.match(r"[a-z]+:", target) and not os.path.exists(os.path.join(docdir, target)):
                broken.append(f"{os.path.basename(page)} -> {target}")
assert not broken, f"installed docs link to files that are not installed: {broken}"
assert "](operations.md" in open(os.path.join(docdir, "README.md")).read()
for f in ("examples/systemd/frontend.env", "examples/systemd/worker.env", "examples/kubernetes/frontend.yaml",
          "examples/kubernetes/worker.yaml", "examples/kubernetes/etcd.yaml", "examples/Containerfile"):
    assert os.path.isfile(os.path.join(docdir, f)), f"{f} is not installed in {docdir}"
unitdir = os.path.join(p1, "lib", "systemd", "system")
for unit, role in (("baton-frontend.service", "frontend"), ("baton-worker@.service", "worker")):
    text = open(os.path.join(unitdir, unit)).read()
    assert re.search(rf"^ExecStart={re.escape(binp)} {role}$", text, re.M), f"{unit} does not start {binp}:\n{text}"
    m = re.search(r"^Documentation=file://(\S+)$", text, re.M)
    assert m and os.path.isfile(m.group(1)), f"{unit}: Documentation= names no installed file:\n{text}"
    # the rest of the unit is the one in deploy/systemd, unchanged
    orig = open(os.path.join(src, "deploy", "systemd", unit)).read()
    strip = lambda t: [ln for ln in t.splitlines() if not ln.startswith(("ExecStart=", "Documentation="))]
    assert strip(text) == strip(orig), f"{unit} differs from deploy/systemd/{unit} beyond its paths"
# The installed units load (systemd-analyze verify also checks that ExecStart's binary exists) and
# their sandboxing scores at most 3.0 ("OK"; docs/operations.md has the measured scores).
analyze = shutil.which("systemd-analyze")
scores = []
if analyze:
    for unit, inst in (("baton-frontend.service", "baton-frontend.service"), ("baton-worker@.service", "baton-worker@0.service")):
        path = os.path.join(tmp, inst)
        shutil.copy(os.path.join(unitdir, unit), path)
        r = subprocess.run([analyze, "verify", path], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and not r.stderr.strip(), f"systemd-analyze verify {unit}:\n{r.stdout}{r.stderr}"
        r = subprocess.run([analyze, "security", "--offline=true", "--threshold=30", path], capture_output=True,
                           text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
        assert m, f"systemd-analyze security {unit} printed no score ({r.returncode}):\n{r.stdout}{r.stderr}"
        assert r.returncode == 0 and float(m.group(1)) <= 3.0, f"{unit} scores {m.group(1)} (> 3.0):\n{r.stdout}"
        scores.append(f"{unit} {m.group(1)}")
        os.unlink(path)
else:
    print("systemd-analyze not installed: unit verification and scores not checked")
models = sorted(glob.glob(os.path.join(src, "models", "*.gguf")))
modeldir = os.path.join(p1, "share", "baton", "models")
for m in models:
    dst = os.path.join(modeldir, os.path.basename(m))
    assert os.path.isfile(dst) and filecmp.cmp(m, dst, shallow=False), f"model {m} is not installed as {dst}"
if not models:
    assert not os.path.exists(modeldir), f"{modeldir} installed although the tree has no models/*.gguf"

# ---- 2. every command from the installed location, after moving the prefix -------------------
# Moving the tree proves the binary finds its data relative to itself, not at a path fixed when
# it was built; the commands run with the temporary directory as working directory.
p2 = os.path.join(tmp, "moved")
os.rename(p1, p2)
binp = os.path.join(p2, "bin", "baton")

out = cmd([binp, "--help"]).stdout
for c in ("run", "frontend", "worker", "chaos"):
    assert re.search(rf"^\s+{c}\s", out, re.M), f"`baton --help` does not list {c}:\n{out}"
for c in ("run", "frontend", "worker"):
    out = cmd([binp, c, "--help"]).stdout
    assert "--" in out and ("baton " + c) in out, f"`baton {c} --help` printed:\n{out}"

with bl.Cluster(bin=binp, env={"PYTHONPATH": None}) as c:
    fe = c.start_run(workers=1, speedup_ratio=50)
    c.wait_workers(fe, 1)
    s = bl.stream_chat(fe.url, bl.chat_body("Hello from the installed tree", max_tokens=16)).assert_ok("stream")
    assert len(s.text.split()) >= 8, s.text
    status, _, body = bl.post_json(fe.url + "/v1/chat/completions", bl.chat_body("unary", max_tokens=8))
    assert status == 200 and body["choices"][0]["message"]["content"], (status, body)
    fe.proc.kill(signal.SIGINT)
    rc = fe.proc.wait(30)
    assert rc == 0, f"installed `baton run` exited with {rc}\n{fe.proc.log_tail()}"

out = cmd([binp, "chaos", "--help"]).stdout
assert "usage: baton chaos" in out, out
names = [re.search(r'^name\s*=\s*"([^"]+)"', open(f).read(), re.M).group(1) for f in scenario_files]
out = cmd([binp, "chaos", "list"]).stdout
listed = re.findall(r"^(\S+?)(?: \[quick\])?: ", out, re.M)
assert sorted(listed) == sorted(names), f"`baton chaos list` listed {listed}, the tree ships {names}"
out = cmd([binp, "chaos", "validate"]).stdout
assert out.startswith(f"{len(names)} scenario(s) valid"), out
# a real scenario: the installed tool starts the installed binary, kills a worker and checks
# every stream byte for byte
rep = os.path.join(tmp, "chaos-report")
r = cmd([binp, "chaos", "run", "--only", "worker-kill9", "--set", "load.duration=3s", "--out", rep, "--quiet"],
        timeout=180)
report = open(os.path.join(rep, "report.md")).read()
assert re.search(r"^\| worker-kill9 \|.*\*\*PASS\*\*", report, re.M), f"scenario did not pass:\n{r.stdout}\n{report}"
assert f"- binary: `{binp}`" in report, f"the scenario did not run the installed binary:\n{report}"

# ---- 3. a binary without its data directory says where it looked ------------------------------
lone = os.path.join(tmp, "lone", "bin")
os.makedirs(lone)
shutil.copy2(binp, lone)
r = cmd([os.path.join(lone, "baton"), "chaos", "list"], rc=2)
want = os.path.join(tmp, "lone", "bin", "..", "share", "baton", "chaos")
assert want in r.stderr and "BATON_CHAOS_DIR" in r.stderr, r.stderr

# ---- 4. a staged install (DESTDIR) names the final prefix -------------------------------------
stage = os.path.join(tmp, "stage")
install("/opt/baton", destdir=stage)
unit = open(os.path.join(stage, "opt/baton/lib/systemd/system/baton-frontend.service")).read()
assert "ExecStart=/opt/baton/bin/baton frontend" in unit and stage not in unit, unit
assert os.access(os.path.join(stage, "opt/baton/bin/baton"), os.X_OK)

# ---- 5. the runtime component alone (what the image installs): the binary and the models ---------
rt = os.path.join(tmp, "runtime")
install(rt, component="runtime")
got = sorted(os.path.relpath(os.path.join(d, f), rt) for d, _, fs in os.walk(rt) for f in fs)
want = sorted(["bin/baton"] + [f"share/baton/models/{os.path.basename(m)}" for m in models]
              + [f"share/baton/models/{os.path.basename(n)}" for n in
                 (glob.glob(os.path.join(src, "models", "*.md")) + glob.glob(os.path.join(src, "models", "LICENSE*"))
                  if models else [])])
assert got == want, f"--component runtime installed {got}, expected {want}"

# ---- 6. warnings are errors only when asked for ---------------------------------------------
# A user's configure (no options) must not add -Werror; BATON_WERROR=ON (scripts/setup, CI) must.
for opt, want_werror in (([], False), (["-DBATON_WERROR=ON"], True)):
    scratch = os.path.join(tmp, "configure-" + ("werror" if want_werror else "plain"))
    r = subprocess.run(["cmake", "-S", src, "-B", scratch, "-DCMAKE_BUILD_TYPE=Release"] + opt, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"cmake configure {opt} failed:\n{r.stdout}\n{r.stderr}"
    flags = open(os.path.join(scratch, "CMakeFiles", "batoncore.dir", "flags.make")).read()
    cflags = re.search(r"^C_FLAGS = (.*)$", flags, re.M).group(1).split()
    assert "-Wall" in cflags and "-Wextra" in cflags, cflags
    assert ("-Werror" in cflags) == want_werror, f"configure {opt or '(no options)'}: C_FLAGS {cflags}"
    if want_werror:
        # and the code compiles so: a Release build keeps scripts/setup's BATON_WERROR=ON when it
        # reuses build/ (README's install command), where -O3 warns where -O2 does not
        r = subprocess.run(["cmake", "--build", scratch, "-j2", "--target", "baton"], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"the Release build with -DBATON_WERROR=ON fails:\n{r.stdout[-4000:]}\n{r.stderr}"
    shutil.rmtree(scratch)

print(f"install: {len(same)} tool files, {len(names)} scenarios, units ({', '.join(scores) or 'not scored'}) and docs "
      f"installed; run, chaos list/validate/run worked from a moved prefix; {len(models)} model(s)")
