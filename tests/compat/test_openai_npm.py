"""The official `openai` npm SDK, unmodified, against a baton frontend with one mocker worker, then
with one llama worker serving the bundled TinyStories model (whose greedy text must be exact).

Installs the pinned SDK once into a cache directory (reused while the version matches), starts a
cluster, runs tests/compat/openai_client.mjs with node and asserts on every check it reports:
model listing, a streamed chat completion, a non-streamed completion with exact usage, a streamed
chat with stream_options.include_usage, and the SDK's NotFoundError for an unknown model.
If the SDK cannot be installed (no registry), the test fails: it never passes without running.
"""

import json
import os
import shutil
import subprocess
import sys

import batonlib as bl
import npmlib

# The llama engine serves the bundled TinyStories model; its greedy text is known (models/README.md).
# BATON_NO_LLAMA=1 (scripts/setup fetched no llama.cpp) leaves it out.
ENGINES = ["mocker"] + ([] if os.environ.get("BATON_NO_LLAMA") == "1" else ["llama"])
STORIES_GREEDY = (", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, "
                  "red ball. She wanted to play with it, but it was too high.\nLily's mom said")
OPENAI_VERSION = "5.23.2"  # last 5.x; no dependencies, uses the built-in fetch of node >= 18
HERE = os.path.dirname(os.path.abspath(__file__))


def fail(msg):
    bl.mark_failed()
    sys.stderr.write(f"FAIL: {msg}\n")
    sys.exit(1)


def ensure_sdk():
    """Returns a directory whose node_modules/ holds openai@OPENAI_VERSION."""
    if not shutil.which("node"):
        fail("`node` is not on the PATH; scripts/setup installs Node.js and npm")
    major = subprocess.run(["node", "-p", "process.versions.node.split('.')[0]"], capture_output=True, text=True)
    if major.returncode != 0 or int(major.stdout.strip() or 0) < 18:
        fail(f"node >= 18 is needed for openai@{OPENAI_VERSION}; found {major.stdout.strip() or major.stderr}")
    try:
        return npmlib.ensure_package("openai", OPENAI_VERSION, f"openai-node-{OPENAI_VERSION}")
    except AssertionError as e:
        fail(str(e))


def main():
    bl.deadline(280)
    sdk_dir = ensure_sdk()

    for engine in ENGINES:
        run_engine(sdk_dir, engine)


def run_engine(sdk_dir, engine):
    with bl.Cluster() as c:
        # The script runs from a private directory beside a link to the cached node_modules, so
        # that `import 'openai'` resolves to the pinned SDK and nothing is written to the cache.
        work = os.path.join(c.dir, "node")
        os.makedirs(work)
        shutil.copy(os.path.join(HERE, "openai_client.mjs"), work)
        os.symlink(os.path.join(sdk_dir, "node_modules"), os.path.join(work, "node_modules"))

        fe = c.start_frontend()
        if engine == "llama":
            c.start_worker(engine="llama")
        else:
            c.start_worker(speedup_ratio=50)
        c.wait_workers(fe, 1, timeout=30)

        env = dict(os.environ, BATON_BASE_URL=f"{fe.url}/v1", BATON_MODEL="mock-model")
        if engine == "llama":
            env["BATON_EXPECT_TEXT"] = STORIES_GREEDY
        try:
            r = subprocess.run(["node", "openai_client.mjs"], cwd=work, env=env, capture_output=True, text=True,
                               timeout=180, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"the node client did not finish within 180 s; stderr: {e.stderr!r}")
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            raise AssertionError(f"node client failed (exit {r.returncode})\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
        result = json.loads(lines[-1])
        print(f"openai npm SDK {result['sdk']} against {fe.url} ({engine} engine)")
        expected = ["models.list", "chat.stream", "completions.create"]
        if engine == "llama":
            expected.append("completions.greedy_text")
        expected += ["chat.stream.include_usage", "unknown_model.404"]
        names = [ch["name"] for ch in result["checks"]]
        if names != expected:
            raise AssertionError(f"the client ran checks {names}, expected {expected}")
        failed = []
        for ch in result["checks"]:
            mark = "ok  " if ch["ok"] else "FAIL"
            print(f"  {mark} {ch['name']}: {json.dumps(ch['detail'])[:300]}")
            if not ch["ok"]:
                failed.append(ch["name"])
        if r.stderr.strip():
            print("node stderr:\n" + r.stderr)
        if failed:
            raise AssertionError(f"openai SDK checks failed: {', '.join(failed)}")
        if not fe.proc.alive():
            raise AssertionError(f"the frontend exited ({fe.proc.returncode}) during the test")


if __name__ == "__main__":
    main()
