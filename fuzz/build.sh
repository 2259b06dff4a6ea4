#!/bin/sh
# build.sh — builds every libFuzzer driver fuzz/fuzz_<name>.c with clang into build-fuzz/ and,
# with --run SECONDS, runs each one for that long on its seed corpus fuzz/corpus/<name>/
# (new inputs found go to build-fuzz/corpus/<name>/, crashes to build-fuzz/crash-<name>-*).
# Usage: fuzz/build.sh [--run SECONDS] [name...]   (CC overrides the compiler, default clang)
# Exit status is non-zero if a build fails or a fuzzer finds a crash.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
CC=${CC:-clang}
run=""
if [ "${1:-}" = "--run" ]; then
    run=${2:?--run needs a number of seconds}
    shift 2
fi

# The src files each driver links; add a case when a new driver needs more than the default.
sources_for() {
    case "$1" in
    proto) echo "src/proto/proto.c src/common/*.c" ;;
    sse) echo "src/engine/openai/sse_parse.c src/engine/openai/openai_wire.c src/common/*.c -ljansson" ;;
    *) echo "src/common/*.c" ;;
    esac
}

names="$*"
if [ -z "$names" ]; then
    for f in fuzz/fuzz_*.c; do
        n=${f#fuzz/fuzz_}
        names="$names ${n%.c}"
    done
fi

mkdir -p build-fuzz
status=0
for n in $names; do
    echo "== build fuzz_$n"
    # shellcheck disable=SC2046  # the source list is a glob on purpose
    $CC -g -O1 -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -fno-omit-frame-pointer \
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Isrc \
        "fuzz/fuzz_$n.c" $(sources_for "$n") -lm -o "build-fuzz/fuzz_$n"
done

if [ -n "$run" ]; then
    for n in $names; do
        echo "== run fuzz_$n for ${run}s"
        mkdir -p "build-fuzz/corpus/$n"
        # the first directory receives new inputs; the checked-in seeds are read only
        set -- "build-fuzz/corpus/$n"
        if [ -d "fuzz/corpus/$n" ]; then set -- "$@" "fuzz/corpus/$n"; fi
        if ! "build-fuzz/fuzz_$n" -max_total_time="$run" -print_final_stats=1 \
            -artifact_prefix="build-fuzz/crash-$n-" "$@"; then
            echo "fuzz_$n: FAILED (see build-fuzz/crash-$n-*)"
            status=1
        fi
    done
fi
exit $status
