/* check.h — the invariant check of the fuzz drivers. CHECK(cond) aborts when cond is false,
 * after naming the driver, the condition and its line, so that libFuzzer reports a violated
 * invariant like a crash (and keeps the input that caused it). */
#ifndef BT_FUZZ_CHECK_H
#define BT_FUZZ_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                                                    \
    do {                                                                                               \
        if (!(cond)) {                                                                                 \
            fprintf(stderr, "%s: invariant failed: %s (line %d)\n", __FILE__, #cond, __LINE__);       \
            abort();                                                                                   \
        }                                                                                              \
    } while (0)

#endif
