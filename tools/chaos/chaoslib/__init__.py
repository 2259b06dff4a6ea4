"""chaoslib — the library behind `baton chaos`, the fault-testing framework.

Modules: scenario (declarative TOML scenarios and the --fault/--load one-liners), loadgen (OpenAI
load with a per-request timeline and full output), topology (the processes a scenario starts:
frontends, workers, etcd, nats-server, network namespaces), faults (injectors, each recording the
evidence that it took effect), checks (pure functions from a recorded run to verdicts), report
(Markdown table and hand-written SVG timelines) and runner (one scenario from start to verdict).
Python 3.11 standard library only.
"""
