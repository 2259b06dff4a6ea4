/* llama_sample.c — position-keyed sampling (llama_sample.h). */
#include "engine/llama/llama_sample.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

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

/* The order every draw uses: descending logit, then ascending id, a total order, so the result
 * never depends on how the candidates are sorted. It is kept as one integer per candidate whose
 * ascending order is exactly that one: the logit's bits mapped so that a larger logit is a smaller
 * unsigned number, in the high half, the id in the low half. -0.0 maps as +0.0 (the comparison of
 * floats has them equal, so their ids decide); an adjusted logit may have rounded to an infinity,
 * which orders as the float does. NaN never gets here (bt_llsample refuses it). */
static inline uint64_t order_key(float logit, int32_t id) {
    uint32_t u;
    memcpy(&u, &logit, sizeof u);
    u &= -(uint32_t)(u << 1 != 0); /* either zero is +0.0 */
    /* without a branch: a positive logit's bits below the sign inverted (the larger, the smaller),
     * a negative one's kept (the more negative, the larger, all above the positives) */
    u ^= ~(uint32_t)((int32_t)u >> 31) & 0x7FFFFFFFu;
    return (uint64_t)u << 32 | (uint32_t)id;
}

static inline int32_t key_id(uint64_t key) { return (int32_t)(uint32_t)key; }

/* Whether the first k of n_vocab keys are found faster by a heap (near one comparison per token
 * when the logits come in no particular order, but log k per replacement and k log k to sort the
 * heap) than by sorting all of them: measured (baton-llsample-bench), the two cost the same near
 * k = 64 at 512 tokens and near k = 600 at 32,000. */
static bool select_pays(int32_t k, int32_t n_vocab) { return k < n_vocab && (k <= 64 || k <= n_vocab / 64); }

static void sift_down(uint64_t *h, int32_t n, int32_t i) {
    uint64_t x = h[i];
    for (;;) {
        int32_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && h[c + 1] > h[c]) c++;
        if (h[c] <= x) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

/* h[0..k) = the k smallest keys of l[0..n_vocab) in ascending order (0 < k < n_vocab): a max-heap of
 * the best k so far, whose root is the one a better key replaces, then sorted in place. */
static void select_first(const float *l, int32_t n_vocab, int32_t k, uint64_t *h) {
    for (int32_t i = 0; i < k; i++) h[i] = order_key(l[i], i);
    for (int32_t i = k / 2; i-- > 0;) sift_down(h, k, i);
    for (int32_t i = k; i < n_vocab; i++) {
        uint64_t x = order_key(l[i], i);
        if (x < h[0]) {
            h[0] = x;
            sift_down(h, k, 0);
        }
    }
    for (int32_t m = k - 1; m > 0; m--) {
        uint64_t top = h[0];
        h[0] = h[m];
        h[m] = top;
        sift_down(h, m, 0);
    }
}

/* A stable LSD radix sort of a[0..n) by the keys' high halves (the logits), 8 bits a pass, b the
 * second array; returns the one that holds the result. The keys come in id order, so stability
 * leaves equal logits in ascending id: the whole key's order. Hand-written rather than qsort
 * for speed, measured (baton-llsample-bench, docs/benchmarks.md): qsort through a comparator took
 * about 5.3 ms a draw at 32,000 tokens, this whole draw takes 0.49 ms. */
static uint64_t *radix_sort(uint64_t *a, uint64_t *b, int32_t n) {
    uint32_t count[4][256] = {{0}};
    for (int32_t i = 0; i < n; i++) {
        uint32_t hi = (uint32_t)(a[i] >> 32);
        count[0][hi & 0xFF]++;
        count[1][hi >> 8 & 0xFF]++;
        count[2][hi >> 16 & 0xFF]++;
        count[3][hi >> 24]++;
    }
    for (int d = 0; d < 4; d++) {
        unsigned shift = 32 + 8 * (unsigned)d;
        if (count[d][(a[0] >> shift) & 0xFF] == (uint32_t)n) continue; /* one digit for all: order kept */
        uint32_t at[256], sum = 0;
        for (int v = 0; v < 256; v++) {
            at[v] = sum;
            sum += count[d][v];
        }
        for (int32_t i = 0; i < n; i++) {
            uint64_t x = a[i];
            b[at[(x >> shift) & 0xFF]++] = x;
        }
        uint64_t *t = a;
        a = b;
        b = t;
    }
    return a;
}

static double penalty(const bt_llsample_params *p, uint32_t count) {
    return count ? (double)count * p->frequency_penalty + p->presence_penalty : 0.0;
}

/* counts[j] during a draw: j's count among the generated tokens, with this bit when j is in the
 * prompt and repetition_penalty applies (a prompt token is seen, not counted) */
#define SEEN 0x80000000u

/* 0 (a zeroed params) is off, as 1 is */
static bool rep_on(const bt_llsample_params *p) { return p->repetition_penalty > 0 && p->repetition_penalty != 1; }

/* The adjusted logit of a token with count word c (llama_sample.h), in double, rounded once. */
static float adjusted(const bt_llsample_params *p, float logit, double bias, uint32_t c) {
    double x = logit;
    if (c && rep_on(p)) x = x > 0 ? x / p->repetition_penalty : x * p->repetition_penalty;
    return (float)(x + bias - penalty(p, c & ~SEEN));
}

/* adj[j] = the adjusted logit for every j with a bias, generated, or in the prompt under a
 * repetition penalty (llama_sample.h); adj holds logits[j] elsewhere, and -inf for the eog ids
 * before min_tokens. counts is zero before and after. Two passes over the prompt and the generated
 * tokens per draw: at most the context length, no more than the pass over the vocabulary every
 * draw makes. */
static void adjust(const float *logits, const bt_llsample_params *p, const int32_t *gen, uint64_t n, float *adj,
                   uint32_t *counts) {
    bool rep = rep_on(p);
    bool pen = gen && (p->frequency_penalty != 0 || p->presence_penalty != 0 || rep);
    bool seen = p->prompt && rep;
    if (pen)
        for (uint64_t i = 0; i < n; i++) counts[gen[i]]++;
    if (seen)
        for (uint64_t i = 0; i < p->n_prompt; i++) counts[p->prompt[i]] |= SEEN;
    for (size_t i = 0; i < p->n_bias; i++) {
        int32_t j = p->bias[i].id;
        adj[j] = adjusted(p, logits[j], p->bias[i].bias, counts[j]);
        counts[j] = 0; /* done: the loops below leave it alone */
    }
    for (int pass = 0; pass < 2; pass++) {
        const int32_t *ids = pass ? p->prompt : gen;
        uint64_t m = pass ? p->n_prompt : n;
        if (!(pass ? seen : pen)) continue;
        for (uint64_t i = 0; i < m; i++) {
            int32_t j = ids[i];
            if (!counts[j]) continue;
            adj[j] = adjusted(p, logits[j], 0, counts[j]);
            counts[j] = 0;
        }
    }
    if (n < p->min_tokens)
        for (size_t i = 0; i < p->n_eog; i++) adj[p->eog[i]] = -INFINITY;
}

/* The lowest id among the largest logits. */
static int32_t argmax(const float *l, int32_t n_vocab) {
    int32_t best = 0;
    float max = l[0];
    for (int32_t i = 1; i < n_vocab; i++)
        if (l[i] > max) {
            max = l[i];
            best = i;
        }
    return best;
}

bt_llsample_scratch *bt_llsample_scratch_new(int32_t n_vocab) {
    if (n_vocab <= 0) return NULL;
    bt_llsample_scratch *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->n_vocab = n_vocab;
    s->cand = calloc((size_t)n_vocab, sizeof *s->cand);
    s->adj = calloc((size_t)n_vocab, sizeof *s->adj);
    s->key = calloc(2 * (size_t)n_vocab, sizeof *s->key);
    s->counts = calloc((size_t)n_vocab, sizeof *s->counts);
    if (!s->cand || !s->adj || !s->key || !s->counts) {
        bt_llsample_scratch_free(s);
        return NULL;
    }
    return s;
}

void bt_llsample_scratch_free(bt_llsample_scratch *s) {
    if (!s) return;
    free(s->cand);
    free(s->adj);
    free(s->key);
    free(s->counts);
    free(s);
}

int32_t bt_llsample(const float *logits, int32_t n_vocab, const bt_llsample_params *p, const int32_t *gen, uint64_t n,
                    bt_llsample_scratch *s) {
    if (n_vocab <= 0 || n_vocab > s->n_vocab) return -1;
    bool finite = true; /* one pass the compiler can vectorise, no exit at the first */
    for (int32_t i = 0; i < n_vocab; i++) finite &= isfinite(logits[i]);
    if (!finite) return -1;
    bool adj = p->n_bias || (n && (p->frequency_penalty != 0 || p->presence_penalty != 0)) ||
               (rep_on(p) && (n || (p->prompt && p->n_prompt))) || (n < p->min_tokens && p->n_eog);
    if (p->temperature <= 0 && !adj) return argmax(logits, n_vocab);

    const float *l = logits;
    if (adj) {
        memcpy(s->adj, logits, (size_t)n_vocab * sizeof *s->adj);
        adjust(logits, p, gen, n, s->adj, s->counts);
        l = s->adj;
        if (p->temperature <= 0) return argmax(l, n_vocab);
    }
    /* the first k candidates in order_key's order, all of them when top_k is off */
    int32_t k = n_vocab;
    if (p->top_k > 0 && p->top_k < k) k = p->top_k;
    const uint64_t *order;
    if (select_pays(k, n_vocab)) {
        select_first(l, n_vocab, k, s->key);
        order = s->key;
    } else {
        for (int32_t i = 0; i < n_vocab; i++) s->key[i] = order_key(l[i], i);
        order = radix_sort(s->key, s->key + n_vocab, n_vocab);
    }
    bt_llsample_cand *c = s->cand;
    for (int32_t i = 0; i < k; i++) {
        int32_t id = key_id(order[i]);
        c[i] = (bt_llsample_cand){id, l[id], 0};
    }
    /* the probabilities and sums in that order, which fixes every rounding */
    double sum = 0;
    for (int32_t i = 0; i < k; i++) {
        c[i].p = exp(((double)c[i].logit - (double)c[0].logit) / p->temperature);
        sum += c[i].p;
    }
    /* min_p: c[0].p is exp(0) = 1, the largest, so the tokens kept are those with c[i].p >= min_p,
     * a prefix of the order (c[0] always) */
    if (p->min_p > 0) {
        int32_t keep = 1;
        while (keep < k && c[keep].p >= p->min_p) keep++;
        sum = 0;
        for (int32_t i = 0; i < keep; i++) sum += c[i].p;
        k = keep;
    }
    /* top_p 0 (or below) is the smallest nucleus, as OpenAI defines it: only c[0], the most probable
     * token (lowest id on ties), so the draw equals the greedy pick. The loop does that
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
