/* llsample.c — the llama engine's sampler alone: microseconds per bt_llsample draw against the
 * first implementation (tests/unit/llsample_ref.h, a qsort of the whole vocabulary by comparator
 * on every draw), at the vocabularies and top_k values given (docs/benchmarks.md).
 *
 *   baton-llsample-bench [--vocab 512,32000] [--top-k 0,40] [--top-p 1] [--temperature 1]
 *                        [--ms 300]
 *
 * Logits: 16 vectors of normally distributed values (sd 3), drawn from in turn at rising
 * positions; each side runs for about --ms milliseconds. Before the timing, 64 draws of each
 * setting are checked against the reference's on the same inputs (a difference exits 1).
 * Prints one line per vocabulary and top_k: "vocab=V top_k=K: reference R us/draw, bt_llsample
 * B us/draw (xS)", S = R / B. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/llama/llama_sample.h"
#include "llsample_ref.h"

#define N_VEC 16

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t rng_next(uint64_t *st) {
    uint64_t x = (*st += 0x9E3779B97F4A7C15ull);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* A standard normal by Box-Muller (the generator's two top-53-bit uniforms, the first kept off 0). */
static double normal(uint64_t *st) {
    double u = ((double)(rng_next(st) >> 11) + 1) / 9007199254740993.0;
    double v = (double)(rng_next(st) >> 11) / 9007199254740992.0;
    return sqrt(-2 * log(u)) * cos(2 * M_PI * v);
}

/* Comma-separated positive integers into out[] (at most 16); 0 on a malformed list. */
static int parse_list(const char *s, long *out) {
    int n = 0;
    while (*s && n < 16) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || (*end && *end != ',')) return 0;
        out[n++] = v;
        s = *end ? end + 1 : end;
    }
    return *s ? 0 : n;
}

int main(int argc, char **argv) {
    long vocabs[16] = {512, 32000}, top_ks[16] = {0, 40};
    int n_vocabs = 2, n_top_ks = 2;
    double top_p = 1, temperature = 1, ms = 300;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--vocab")) n_vocabs = parse_list(v, vocabs);
        else if (!strcmp(k, "--top-k")) n_top_ks = parse_list(v, top_ks);
        else if (!strcmp(k, "--top-p")) top_p = strtod(v, NULL);
        else if (!strcmp(k, "--temperature")) temperature = strtod(v, NULL);
        else if (!strcmp(k, "--ms")) ms = strtod(v, NULL);
        else n_vocabs = 0;
    }
    if (argc % 2 == 0 || !n_vocabs || !n_top_ks || !(ms > 0) || !(temperature > 0)) {
        fprintf(stderr, "usage: baton-llsample-bench [--vocab 512,32000] [--top-k 0,40] [--top-p 1] "
                        "[--temperature 1] [--ms 300]\n");
        return 2;
    }
    for (int vi = 0; vi < n_vocabs; vi++) {
        int32_t v = (int32_t)vocabs[vi];
        if (v <= 0) return fprintf(stderr, "baton-llsample-bench: a vocabulary needs a token\n"), 2;
        float *logits = malloc((size_t)v * N_VEC * sizeof *logits);
        bt_llsample_cand *ref_c = malloc((size_t)v * sizeof *ref_c);
        uint32_t *ref_counts = calloc((size_t)v, sizeof *ref_counts);
        bt_llsample_scratch *s = bt_llsample_scratch_new(v);
        if (!logits || !ref_c || !ref_counts || !s) return fprintf(stderr, "baton-llsample-bench: out of memory\n"), 1;
        uint64_t st = 7;
        for (size_t i = 0; i < (size_t)v * N_VEC; i++) logits[i] = (float)(3 * normal(&st));
        for (int ki = 0; ki < n_top_ks; ki++) {
            bt_llsample_params p = {
                .temperature = temperature, .top_p = top_p, .top_k = (int32_t)top_ks[ki], .seed = 1};
            for (uint64_t n = 0; n < 64; n++) {
                const float *l = logits + (n % N_VEC) * (size_t)v;
                if (bt_llsample(l, v, &p, NULL, n, s) != ref_llsample(l, v, &p, NULL, n, ref_c, ref_counts)) {
                    fprintf(stderr, "baton-llsample-bench: vocab=%d top_k=%ld: a draw differs at %llu\n", (int)v,
                            top_ks[ki], (unsigned long long)n);
                    return 1;
                }
            }
            double per[2];
            for (int side = 0; side < 2; side++) {
                uint64_t n = 0, sink = 0;
                double t0 = now_s(), t = t0;
                while (t - t0 < ms / 1000) {
                    for (int r = 0; r < 16; r++, n++) {
                        const float *l = logits + (n % N_VEC) * (size_t)v;
                        sink += (uint64_t)(side ? bt_llsample(l, v, &p, NULL, n, s)
                                                : ref_llsample(l, v, &p, NULL, n, ref_c, ref_counts));
                    }
                    t = now_s();
                }
                per[side] = (t - t0) / (double)n * 1e6;
                if (sink == UINT64_MAX) puts(""); /* keeps the draws from being optimised away */
            }
            printf("vocab=%d top_k=%ld: reference %.1f us/draw, bt_llsample %.1f us/draw (x%.1f)\n", (int)v, top_ks[ki],
                   per[0], per[1], per[0] / per[1]);
            fflush(stdout);
        }
        bt_llsample_scratch_free(s);
        free(logits);
        free(ref_c);
        free(ref_counts);
    }
    return 0;
}
