/* llama_sample.h — token sampling for the llama engine, keyed by position so it resumes exactly.
 *
 * Greedy (argmax, lowest id on ties) at temperature 0; otherwise top_k, then temperature and
 * softmax, then top_p over the tokens sorted by probability (top_p 0 keeps only the most probable
 * one, so the draw is the greedy pick), then one draw. The draw for the
 * token at generated position n is a pure function of (seed, n): a counter-based generator
 * (splitmix64 of seed and n), not a stream. A sequence continued after a migration from n carried
 * tokens therefore draws exactly what the uninterrupted one would have, with no generator state
 * to carry or replay (llama.cpp's own dist sampler would have to be advanced by n draws). Pure C,
 * no llama.cpp dependency: unit-tested alone. */
#ifndef BATON_LLAMA_SAMPLE_H
#define BATON_LLAMA_SAMPLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    double temperature; /* 0 = greedy */
    double top_p;       /* [0, 1]; 1 = off, 0 = the most probable token only (greedy) */
    int32_t top_k;      /* 0 = off */
    uint64_t seed;
} bt_llsample_params;

typedef struct {
    int32_t id;
    float logit;
    double p;
} bt_llsample_cand;

/* The uniform draw in [0, 1) for generated position n. */
double bt_llsample_uniform(uint64_t seed, uint64_t n);
/* Picks the next token from logits[0..n_vocab). `scratch` holds n_vocab candidates (caller-owned,
 * reused). Returns -1 when a logit is NaN or infinite (a broken engine: the caller fails). */
int32_t bt_llsample(const float *logits, int32_t n_vocab, const bt_llsample_params *p, uint64_t n,
                    bt_llsample_cand *scratch);

#endif
