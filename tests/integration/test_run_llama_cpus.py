"""`baton run --engine llama` says when its workers' decode threads together outnumber the CPUs
it may use (docs/engines.md §3.2): llama.cpp's threads spin at a barrier after every matrix
product, so two workers of 2 threads on 2 CPUs stall every step, though no single worker has more
threads than CPUs (each worker warns only about its own).

The CPUs are those of the affinity mask `baton run` inherits from this test, which narrows its
own mask to set them:
  1. one CPU, 2 workers of 1 thread (the defaults): one WARN line from run naming 2 workers x 1
     thread = 2 threads for 1 CPU and a split that fits (--workers 1 --llama-threads 1); no
     worker warns about its own threads;
  2. one CPU, 1 worker of 1 thread: no warning;
  3. two CPUs (when the machine has them), 2 workers of 2 threads: the warning names 4 threads
     for 2 CPUs and suggests --workers 2 --llama-threads 1; DYN_LLAMA_THREADS=2 in the
     environment is counted as the flag is;
  4. two CPUs, the defaults (2 workers of 1 thread, --llama-threads' default): no warning.
Each `baton run` serves before it is stopped, so a line said later would be seen too."""

import os
import sys

import batonlib as bl
import faultlib as fl

if fl.skip("llama") is not None:
    sys.exit(77)
bl.deadline(120, "test_run_llama_cpus")

WARN = "decode threads for the"
CPUS = sorted(os.sched_getaffinity(0))


def run_log(cpus, env=None, **flags):
    """The log of a `baton run --engine llama` started with this affinity mask, once it serves."""
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        with bl.Cluster() as c:
            fe = c.start_run(engine="llama", env=env, timeout=60, **flags)
            bl.stream_completion(fe.url, bl.completion_body("Once upon a time", max_tokens=4, model="stories260K",
                                                            temperature=0)).assert_ok("a completion")
            return fe.proc.log_text()
    finally:
        os.sched_setaffinity(0, mine)


def warnings(log):
    return [line for line in log.splitlines() if WARN in line]


log = run_log({CPUS[0]}, workers=2)
w = warnings(log)
assert len(w) == 1 and " WARN " in w[0] and " run[" in w[0], w or log
assert ("2 llama workers x 1 --llama-threads = 2 decode threads for the 1 CPU this process may use" in w[0]
        and "each step can take seconds" in w[0] and "(e.g. --workers 1 --llama-threads 1)" in w[0]), w[0]
assert "is more than the" not in log, "a worker warned about its own threads, which fit"
log = run_log({CPUS[0]}, workers=1)
assert not warnings(log) and "serving 'stories260K' with 1 worker at" in log, warnings(log) or log
print("run: 2 llama workers on 1 CPU are warned about, 1 is not")

if len(CPUS) >= 2:
    for env, flags in (({}, {"llama_threads": 2}), ({"DYN_LLAMA_THREADS": "2"}, {})):
        w = warnings(run_log(set(CPUS[:2]), env=env, workers=2, **flags))
        assert len(w) == 1 and "2 llama workers x 2 --llama-threads = 4 decode threads for the 2 CPUs" in w[0] and \
            "(e.g. --workers 2 --llama-threads 1)" in w[0], (env, flags, w)
    log = run_log(set(CPUS[:2]))
    assert not warnings(log) and "serving 'stories260K' with 2 workers" in log, warnings(log) or log
    print("run: 2 llama workers of 2 threads on 2 CPUs are warned about (flag or environment); the defaults are not")
else:
    print("run: the 2-CPU cases need 2 CPUs, this machine has 1")
