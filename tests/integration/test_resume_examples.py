"""The client examples of resumable streams (examples/resume_stream.py and .mjs) against a real
frontend with an API key: each drops its own connection every few events (--drop-after) and
resumes with Last-Event-ID; what it prints must equal an uncut run exactly, and it must really
have reconnected (its stderr says so, and the frontend counted the resumes)."""

import os
import shutil
import subprocess
import sys

import batonlib as bl

bl.deadline(120, "test_resume_examples")
EX = os.path.join(bl.repo_root(), "examples")


def main():
    with bl.Cluster() as c:
        fe = c.start_frontend(api_key="k3y")
        c.start_worker(speedup_ratio=5)
        c.wait_workers(fe, 1)
        auth = {"Authorization": "Bearer k3y"}
        body = bl.chat_body("Tell me a story", max_tokens=90)
        ref = bl.stream_chat(fe.url, body, headers=auth).assert_ok("reference")
        cmds = [("python", [sys.executable, os.path.join(EX, "resume_stream.py"), "--drop-after", "7"])]
        if shutil.which("node"):
            cmds.append(("node", ["node", os.path.join(EX, "resume_stream.mjs"), "--drop-after", "9"]))
        else:
            raise AssertionError("`node` is not on the PATH; scripts/setup installs Node.js")
        for name, cmd in cmds:
            before = bl.metric_sum(bl.metrics(fe.url), "baton_frontend_stream_resumes_total")
            r = subprocess.run(cmd + ["--url", fe.url, "--api-key", "k3y", "--max-tokens", "90"], capture_output=True,
                               text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, f"{name} example failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
            assert r.stdout == ref.text + "\n", f"{name} example printed {r.stdout!r}, expected {ref.text!r}"
            lost = r.stderr.count("[connection lost; resuming after ")
            resumed = bl.metric_sum(bl.metrics(fe.url), "baton_frontend_stream_resumes_total") - before
            assert lost >= 3 and resumed == lost, f"{name}: {lost} reconnections reported, {resumed} counted"
            print(f"{name} example: {len(ref.text)} characters exact across {lost} dropped connections", flush=True)


if __name__ == "__main__":
    main()
    print("test_resume_examples: OK")
