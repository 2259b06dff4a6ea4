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

# Every driver links the whole of src/ (libbatoncore, as the baton binary does, minus
# src/cli/main.c), built by CMake with clang in build-fuzz/core with coverage instrumentation and
# the same sanitizers: a driver can reach any module, and rebuilding after a change is incremental.
sanflags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
echo "== build libbatoncore (clang, fuzzer instrumentation) in build-fuzz/core"
mkdir -p build-fuzz
log=build-fuzz/core-build.log
cmake -S . -B build-fuzz/core -DCMAKE_C_COMPILER="$CC" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBATON_WERROR=ON \
    -DCMAKE_C_FLAGS="-fsanitize=fuzzer-no-link $sanflags" >"$log" 2>&1 &&
    cmake --build build-fuzz/core --target batoncore -j"$(nproc 2>/dev/null || echo 2)" >>"$log" 2>&1 || {
    tail -n 40 "$log"
    echo "build.sh: building libbatoncore failed (log: $log)"
    exit 1
}
libs="build-fuzz/core/libbatoncore.a $(pkg-config --libs libuv jansson libcurl libnats libcrypto) -lhttp_parser -lm -lpthread"

names="$*"
if [ -z "$names" ]; then
    for f in fuzz/fuzz_*.c; do
        n=${f#fuzz/fuzz_}
        names="$names ${n%.c}"
    done
fi

status=0
for n in $names; do
    echo "== build fuzz_$n"
    # shellcheck disable=SC2086  # $sanflags and $libs are lists of words
    $CC -g -O1 -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -fsanitize=fuzzer $sanflags -Isrc \
        "fuzz/fuzz_$n.c" $libs -o "build-fuzz/fuzz_$n"
done

if [ -n "$run" ]; then
    for n in $names; do
        echo "== run fuzz_$n for ${run}s"
        mkdir -p "build-fuzz/corpus/$n"
        # the first directory receives new inputs; the checked-in seeds are read only
        set -- "build-fuzz/corpus/$n"
        if [ -d "fuzz/corpus/$n" ]; then set -- "$@" "fuzz/corpus/$n"; fi
        # -timeout: an input running this long is a hang, reported like a crash
        if ! "build-fuzz/fuzz_$n" -max_total_time="$run" -timeout=30 -print_final_stats=1 \
            -artifact_prefix="build-fuzz/crash-$n-" "$@"; then
            echo "fuzz_$n: FAILED (see build-fuzz/crash-$n-*)"
            status=1
        fi
    done
fi
exit $status
