"""The official `openai` npm SDK, unmodified, against baton frontends with mocker workers.

Installs each pinned SDK version once into a cache directory (reused while the version matches),
starts a cluster, runs tests/compat/openai_client.mjs with node for each version and asserts on
every check it reports: model listing and retrieval (an id with '/', Unix "created"), a streamed
chat completion, a non-streamed completion with exact usage, a streamed chat with
stream_options.include_usage, and the SDK's error class, status, type, code and param for each
error class baton answers: 404 NotFoundError (unknown model, unknown model id), 400
BadRequestError (an unsupported parameter, the context length), 401 AuthenticationError, 503
InternalServerError, and the APIError a stream raises when it fails mid-way; the SDK's stream helper
(finalChatCompletion) on chat streams with no text (max_tokens 0, a stop at the first token) and
with text: the role named in exactly one chunk.
If an SDK cannot be installed (no registry), the test fails: it never passes without running.
"""

import json
import os
import shutil
import subprocess
import sys

import batonlib as bl
import npmlib

# last 5.x and last 6.x: no dependencies, the built-in fetch of node >= 18 (7.x needs node >= 22)
OPENAI_VERSIONS = ["5.23.2", "6.30.1"]
CONTEXT = 64
HERE = os.path.dirname(os.path.abspath(__file__))


def fail(msg):
    bl.mark_failed()
    sys.stderr.write(f"FAIL: {msg}\n")
    sys.exit(1)


def ensure_sdk(version):
    """Returns a directory whose node_modules/ holds openai@version."""
    if not shutil.which("node"):
        fail("`node` is not on the PATH; scripts/setup installs Node.js and npm")
    major = subprocess.run(["node", "-p", "process.versions.node.split('.')[0]"], capture_output=True, text=True)
    if major.returncode != 0 or int(major.stdout.strip() or 0) < 18:
        fail(f"node >= 18 is needed for openai@{version}; found {major.stdout.strip() or major.stderr}")
    try:
        return npmlib.ensure_package("openai", version, f"openai-node-{version}")
    except AssertionError as e:
        fail(str(e))


EXPECTED = ["models.list", "chat.stream", "completions.create", "chat.stream.include_usage", "unknown_model.404",
            "models.retrieve", "models.retrieve.404", "bad_request.400", "context_length.400", "neutral_parameters",
            "authentication.401", "overloaded.503", "stream_error.sse", "chat.stream_helper"]


def run_client(c, sdk_dir, version, env):
    """Runs the node client with SDK `version`; returns its list of failed check names."""
    work = npmlib.node_workdir(c.dir, f"node-{version}", os.path.join(HERE, "openai_client.mjs"), sdk_dir)
    result, r = npmlib.run_node(work, "openai_client.mjs", env, 180, f"node client ({version})")
    print(f"openai npm SDK {result['sdk']}:")
    if result["sdk"] != version:
        raise AssertionError(f"the client loaded openai {result['sdk']}, expected {version}")
    names = [ch["name"] for ch in result["checks"]]
    if names != EXPECTED:
        raise AssertionError(f"the client ran checks {names}, expected {EXPECTED}")
    failed = []
    for ch in result["checks"]:
        mark = "ok  " if ch["ok"] else "FAIL"
        print(f"  {mark} {ch['name']}: {json.dumps(ch['detail'])[:300]}")
        if not ch["ok"]:
            failed.append(f"{version} {ch['name']}")
    if r.stderr.strip():
        print("node stderr:\n" + r.stderr)
    return failed


def main():
    bl.deadline(380)
    sdk_dirs = {v: ensure_sdk(v) for v in OPENAI_VERSIONS}

    with bl.Cluster() as c:
        c.start_worker(speedup_ratio=50)
        c.start_worker(speedup_ratio=50, model_name="org/model-b", context_length=CONTEXT)
        # the engine fault fires once: one faulty worker (and model) for each SDK version
        for v in OPENAI_VERSIONS:
            c.start_worker(speedup_ratio=50, model_name=f"faulty-{v}", fault_error_after_tokens=3)
        fe = c.start_frontend(migration_limit=0)
        fe_key = c.start_frontend(api_key="compat-key")
        fe_lim = c.start_frontend(max_concurrent_requests=1)
        for f in (fe, fe_key, fe_lim):
            c.wait_workers(f, 2 + len(OPENAI_VERSIONS), timeout=30)

        env = dict(os.environ, BATON_BASE_URL=f"{fe.url}/v1", BATON_MODEL="mock-model",
                   BATON_SLASHED_MODEL="org/model-b", BATON_CONTEXT=str(CONTEXT),
                   BATON_AUTH_URL=f"{fe_key.url}/v1", BATON_API_KEY="compat-key", BATON_LIMITED_URL=f"{fe_lim.url}/v1")
        failed = []
        for v in OPENAI_VERSIONS:
            failed += run_client(c, sdk_dirs[v], v, dict(env, BATON_FAULTY_MODEL=f"faulty-{v}"))
        if failed:
            raise AssertionError(f"openai SDK checks failed: {', '.join(failed)}")
        for f in (fe, fe_key, fe_lim):
            if not f.proc.alive():
                raise AssertionError(f"a frontend exited ({f.proc.returncode}) during the test")


if __name__ == "__main__":
    main()
