/* llama_sample.c — position-keyed sampling (llama_sample.h). */
#include "engine/llama/llama_sample.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

double bt_llsample_uniform(uint64_t seed, uint64_t n) {
    uint64_t x = splitmix64(splitmix64(seed) ^ splitmix64(n + 0x632BE59BD9B4E019ull));
    return (double)(x >> 11) * (1.0 / 9007199254740992.0);
}

/* Descending logit, then ascending id: a total order, so the result never depends on qsort. */
static int cand_cmp(const void *a, const void *b) {
    const bt_llsample_cand *x = a, *y = b;
    if (x->logit > y->logit) return -1;
    if (x->logit < y->logit) return 1;
    return (x->id > y->id) - (x->id < y->id);
}

static double penalty(const bt_llsample_params *p, uint32_t count) {
    return count ? (double)count * p->frequency_penalty + p->presence_penalty : 0.0;
}

/* c[j].logit = logits[j] + bias[j] - penalty(c[j]) for every j with a bias or generated (llama_sample.h);
 * c is in id order. counts is zero before and after. Two passes over the generated tokens per
 * draw: at most the context length, no more than the pass over the vocabulary every draw makes. */
static void adjust(const float *logits, const bt_llsample_params *p, const int32_t *gen, uint64_t n,
                   bt_llsample_cand *c, uint32_t *counts) {
    bool pen = gen && (p->frequency_penalty != 0 || p->presence_penalty != 0);
    if (pen)
        for (uint64_t i = 0; i < n; i++) counts[gen[i]]++;
    for (size_t i = 0; i < p->n_bias; i++) {
        int32_t j = p->bias[i].id;
        c[j].logit = (float)((double)logits[j] + p->bias[i].bias - penalty(p, counts[j]));
        counts[j] = 0; /* done: the loop below leaves it alone */
    }
    if (pen)
        for (uint64_t i = 0; i < n; i++) {
            int32_t j = gen[i];
            if (!counts[j]) continue;
            c[j].logit = (float)((double)logits[j] - penalty(p, counts[j]));
            counts[j] = 0;
        }
}

int32_t bt_llsample(const float *logits, int32_t n_vocab, const bt_llsample_params *p, const int32_t *gen, uint64_t n,
                    bt_llsample_cand *c, uint32_t *counts) {
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
        adjust(logits, p, gen, n, c, counts);
        if (p->temperature <= 0) { /* argmax of the adjusted logits, lowest id on ties */
            best = 0;
            for (int32_t i = 1; i < n_vocab; i++)
                if (c[i].logit > c[best].logit) best = i;
            return best;
        }
    }
    qsort(c, (size_t)n_vocab, sizeof *c, cand_cmp);
    int32_t k = n_vocab;
    if (p->top_k > 0 && p->top_k < k) k = p->top_k;
    double sum = 0;
    for (int32_t i = 0; i < k; i++) {
        c[i].p = exp(((double)c[i].logit - (double)c[0].logit) / p->temperature);
        sum += c[i].p;
    }
    /* top_p 0 (or below) is the smallest nucleus, as OpenAI defines it: only c[0], the most probable
     * token (lowest id on ties, by cand_cmp), so the draw equals the greedy pick. The loop does that
     * by itself: c[0] alone already reaches any cum >= top_p when top_p <= 0. NaN is treated as 1. */
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
