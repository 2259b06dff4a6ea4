"""Runs one fault scenario of tests/lib/faultlib.py on one engine, through the real binaries:

    python3 tests/fault/faults.py ENGINE SCENARIO

ENGINE is a profile of faultlib.PROFILES (mocker, llama), SCENARIO one of faultlib.SCENARIOS.
CMake registers every pair as fault/test_faults_<engine>_<scenario>; the scenarios and their
oracle are described in faultlib. Exit 77 (skipped) when the engine is not in this build.
"""

import sys

import batonlib as bl
import faultlib as fl


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in fl.PROFILES or sys.argv[2] not in fl.SCENARIOS:
        print(f"usage: faults.py {{{','.join(fl.PROFILES)}}} {{{','.join(fl.SCENARIOS)}}}", file=sys.stderr)
        return 2
    engine, scenario = sys.argv[1], sys.argv[2]
    if scenario in fl.ENGINE_ONLY and fl.ENGINE_ONLY[scenario] not in fl.PROFILES[engine]:
        print(f"{scenario} does not apply to the {engine} engine", file=sys.stderr)
        return 2
    skipped = fl.skip(engine)
    if skipped is not None:
        return skipped
    # a bound on a hang, not a speed test: the llama scenarios took 57-84 s in a fresh-clone CI
    # run (two tests at a time) and 104-112 s with builds and other suites beside them; a
    # sanitized build decodes several times slower (the oracle is the same)
    with bl.deadline(180 * (4 if bl.sanitized_build() else 1), f"test_faults_{engine}_{scenario}"):
        with bl.Cluster() as c:
            fl.SCENARIOS[scenario](c, fl.PROFILES[engine])
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
