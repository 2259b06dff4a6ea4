"""A process that did not run is not evidence that its peers died: SIGSTOP of the frontend, and
SIGSTOP of a worker, each for 2.5 s (longer than the silence after which the paused side would
declare its peer dead) while 20 streams run on 2 healthy workers, through the real binaries.

When a stopped process resumes, its event loop runs due timers before it reads its sockets. The
peers kept talking during the pause, so their frames are waiting in the socket; a heartbeat that
judged before reading them, or that counted the pause as the peer's silence, would declare every
healthy peer dead and fail (or needlessly migrate) every stream. Here every stream must complete
byte for byte as its fault-free reference, nothing may migrate, no side may log a dead-peer
verdict, and both workers stay connected.

  frontend-pause  --stream-stall-timeout 2 (the frontend judges a worker dead after 1.8 s of
                  silence); the frontend is stopped for 2.5 s.
  worker-pause    --frontend-dead-after 2 on the workers (a worker judges a frontend dead after
                  2 s of silence) and --stream-stall-timeout 4 on the frontend (so that the
                  frontend rightly waits out a 2.5 s stall); one worker is stopped for 2.5 s.

Evidence that each fault happened: the process is seen in state T, and the streams show a gap of
at least 2 s between two tokens (frontend: every stream; worker: those it served). That a stopped
worker is still declared dead within the stall bound is checked by test_migration.py
(scenario_sigstop) and test_health.py. Helpers and the checkers (self-tested there) come from
test_migration.py.
"""

import signal
import time

import batonlib as bl
from test_migration import (Load, assert_no_problems, check_baseline, counters, delta, make_reqs, migrations,
                            proc_state, references, worker_gauge, worker_ids)

N = 20
PAUSE = 2.5
# Slow enough that every stream (250-350 tokens) is still generating when the pause ends.
SPEEDUP = 0.25
DEAD_RX = "peer declared dead"


def pause(proc, seconds):
    """SIGSTOP proc for `seconds`, checking it really was stopped; returns the resume time."""
    proc.kill(signal.SIGSTOP)
    try:
        bl.wait_for(lambda: proc_state(proc.pid) == "T", 5, 0.005, f"pid {proc.pid} to be stopped")
        time.sleep(seconds)
        assert proc_state(proc.pid) == "T", f"pid {proc.pid} was resumed early"
    finally:
        proc.kill(signal.SIGCONT)
    return time.monotonic()


def max_gap(stream):
    t = stream.t_tokens
    return max((b - a for a, b in zip(t, t[1:])), default=0.0)


def check_no_verdict(c, fe, what):
    """No process logged a dead-peer verdict or a lost connection, nothing migrated."""
    for p in c.procs():
        log = p.log_text()
        assert DEAD_RX not in log, f"{what}: {p.name} declared a healthy peer dead:\n{p.log_tail(30)}"
    fe_log = fe.proc.log_text()
    assert " lost with " not in fe_log, f"{what}: the frontend lost a worker:\n{fe.proc.log_tail(30)}"
    for w in c.workers:
        assert "disconnected (" not in w.proc.log_text(), \
            f"{what}: worker {w.rpc_port} lost its frontend:\n{w.proc.log_tail(30)}"


def scenario(refs, prefix, fe_flags, worker_flags, stop_frontend):
    with bl.Cluster() as c:
        fe = c.start_frontend(**fe_flags)
        ws = [c.start_worker(speedup_ratio=SPEEDUP, **worker_flags) for _ in range(2)]
        ids = worker_ids(c.wait_workers(fe, 2))
        before = counters(fe)
        load = Load(fe, make_reqs(prefix, range(N), True))
        load.wait_tokens(20)
        inflight = worker_gauge(fe, "inflight")
        assert all(inflight.get(ids[w.rpc_port], 0) > 0 for w in ws), f"a worker serves nothing: {inflight}"
        victim = fe.proc if stop_frontend else ws[0].proc
        t_resume = pause(victim, PAUSE)
        reqs = load.join()
        d = delta(counters(fe), before)
        assert_no_problems(reqs, refs, f"{prefix}: SIGSTOP of the {'frontend' if stop_frontend else 'worker'}")
        streams = [r.stream_obj for r in reqs]
        gaps = sorted(max_gap(s) for s in streams)
        print(f"{prefix}: {N}/{N} streams exact; inflight before the pause {inflight}; token gaps "
              f"{gaps[0]:.2f} .. {gaps[-1]:.2f} s; tokens after the resume in "
              f"{sum(1 for s in streams if s.t_tokens and s.t_tokens[-1] > t_resume)} streams; deltas {d}")
        # the pause was felt: every stream (frontend) or the victim's share (worker) stalled
        stalled = [g for g in gaps if g >= PAUSE - 0.5]
        want = N if stop_frontend else int(inflight[ids[ws[0].rpc_port]])
        assert len(stalled) >= want, f"{len(stalled)} streams saw the pause, want {want}: gaps {gaps}"
        assert all(s.t_tokens[-1] > t_resume for s in streams), "a stream had ended before the pause did"
        assert migrations(fe, prefix) == [], f"{prefix}: streams migrated: {migrations(fe, prefix)[:3]}"
        assert d["ongoing"] == 0 and d["new"] == 0 and d["exhausted"] == 0, d
        check_no_verdict(c, fe, prefix)
        assert len(c.wait_workers(fe, 2)) == 2
        check_baseline(c, fe, refs, 2, prefix)
        check_no_verdict(c, fe, prefix + " (after the fresh requests)")


def main():
    bl.deadline(200, "test_pause")
    t0 = time.monotonic()
    refs = references(range(N), [100])
    print(f"references: {len(refs)} in {time.monotonic() - t0:.1f} s")
    scenario(refs, "fepause", {"stream_stall_timeout": 2.0}, {}, stop_frontend=True)
    scenario(refs, "wkpause", {"stream_stall_timeout": 4.0}, {"frontend_dead_after": 2}, stop_frontend=False)
    print(f"test_pause: ok in {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
