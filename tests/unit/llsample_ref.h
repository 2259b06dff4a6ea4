/* llsample_ref.h — the llama sampler as it was first written (a qsort of the whole vocabulary by
 * descending logit, then ascending id, on every draw), kept as the reference that bt_llsample must
 * equal draw for draw: test_llama_text.c compares the two on random vocabularies and
 * bench/llsample.c times them side by side. Same inputs as bt_llsample; c holds n_vocab candidates
 * and counts n_vocab zeros (zeros again on return). Header-only so that both can include it. */
#ifndef BATON_LLSAMPLE_REF_H
#define BATON_LLSAMPLE_REF_H

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

#include "engine/llama/llama_sample.h"

static int ref_cand_cmp(const void *a, const void *b) {
    const bt_llsample_cand *x = a, *y = b;
    if (x->logit > y->logit) return -1;
    if (x->logit < y->logit) return 1;
    return (x->id > y->id) - (x->id < y->id);
}

static double ref_penalty(const bt_llsample_params *p, uint32_t count) {
    return count ? (double)count * p->frequency_penalty + p->presence_penalty : 0.0;
}

static void ref_adjust(const float *logits, const bt_llsample_params *p, const int32_t *gen, uint64_t n,
                       bt_llsample_cand *c, uint32_t *counts) {
    bool pen = gen && (p->frequency_penalty != 0 || p->presence_penalty != 0);
    if (pen)
        for (uint64_t i = 0; i < n; i++) counts[gen[i]]++;
    for (size_t i = 0; i < p->n_bias; i++) {
        int32_t j = p->bias[i].id;
        c[j].logit = (float)((double)logits[j] + p->bias[i].bias - ref_penalty(p, counts[j]));
        counts[j] = 0;
    }
    if (pen)
        for (uint64_t i = 0; i < n; i++) {
            int32_t j = gen[i];
            if (!counts[j]) continue;
            c[j].logit = (float)((double)logits[j] - ref_penalty(p, counts[j]));
            counts[j] = 0;
        }
}

static int32_t ref_llsample(const float *logits, int32_t n_vocab, const bt_llsample_params *p, const int32_t *gen,
                            uint64_t n, bt_llsample_cand *c, uint32_t *counts) {
    if (n_vocab <= 0) return -1;
    int32_t best = 0;
    for (int32_t i = 0; i < n_vocab; i++) {
        if (!isfinite(logits[i])) return -1;
        if (logits[i] > logits[best]) best = i;
    }
    bool adjusted = p->n_bias || (n && (p->frequency_penalty != 0 || p->presence_penalty != 0));
    if (p->temperature <= 0 && !adjusted) return best;
    for (int32_t i = 0; i < n_vocab; i++) c[i] = (bt_llsample_cand){i, logits[i], 0};
    if (adjusted) {
        ref_adjust(logits, p, gen, n, c, counts);
        if (p->temperature <= 0) {
            best = 0;
            for (int32_t i = 1; i < n_vocab; i++)
                if (c[i].logit > c[best].logit) best = i;
            return best;
        }
    }
    qsort(c, (size_t)n_vocab, sizeof *c, ref_cand_cmp);
    int32_t k = n_vocab;
    if (p->top_k > 0 && p->top_k < k) k = p->top_k;
    double sum = 0;
    for (int32_t i = 0; i < k; i++) {
        c[i].p = exp(((double)c[i].logit - (double)c[0].logit) / p->temperature);
        sum += c[i].p;
    }
    if (p->top_p < 1) {
        double cum = 0;
        int32_t keep = k;
        for (int32_t i = 0; i < k; i++) {
            cum += c[i].p / sum;
            if (cum >= p->top_p) {
                keep = i + 1;
                break;
            }
        }
        sum = 0;
        for (int32_t i = 0; i < keep; i++) sum += c[i].p;
        k = keep;
    }
    double u = bt_llsample_uniform(p->seed, n) * sum;
    double cum = 0;
    for (int32_t i = 0; i < k; i++) {
        cum += c[i].p;
        if (u < cum) return c[i].id;
    }
    return c[k - 1].id;
}

#endif
