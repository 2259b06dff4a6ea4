/* llama_sample.h — token sampling for the llama engine, keyed by position so it resumes exactly.
 *
 * Greedy (argmax, lowest id on ties) at temperature 0; otherwise top_k, then temperature and
 * softmax, then top_p over the tokens sorted by probability (top_p 0 keeps only the most probable
 * one, so the draw is the greedy pick), then one draw. The draw for the
 * token at generated position n is a pure function of (seed, n): a counter-based generator
 * (splitmix64 of seed and n), not a stream. A sequence continued after a migration from n carried
 * tokens therefore draws exactly what the uninterrupted one would have, with no generator state
 * to carry or replay (llama.cpp's own dist sampler would have to be advanced by n draws). Pure C,
 * no llama.cpp dependency: unit-tested alone.
 *
 * Before any of that (greedy included) the logits are adjusted as OpenAI defines it: token j's
 * logit + logit_bias[j] - (c[j] * frequency_penalty + (c[j] > 0) * presence_penalty), c[j] the
 * count of j among the tokens generated so far (not the prompt), in double, rounded to float once.
 * The counts are taken from the generated tokens at every draw, not kept: a continuation has them
 * in its carried tokens, so it penalises exactly as the uninterrupted run did with nothing to
 * rebuild. llama.cpp's penalties sampler keeps its own ring of the last penalty_last_n accepted
 * tokens (a window, not "so far") and its logit-bias sampler rounds the bias to float apart from
 * the penalty; one expression here keeps a bias of -x exactly equal to a penalty of x, which the
 * tests use as their reference.
 *
 * vLLM's repetition_penalty r comes first: the logit x of a token that is in the prompt or among the
 * generated ones becomes x / r when x > 0, x * r otherwise, in the same double expression (a token
 * of the prompt is counted as seen, never in c[j]). Its prompt is the rendered prompt, which a
 * continuation renders the same, so it too penalises as the uninterrupted run did. While fewer than
 * min_tokens tokens are generated, the end-of-generation ids (eog) are excluded (their logit
 * -inf), as vLLM's min_tokens. min_p keeps, after temperature, the tokens whose probability is at
 * least min_p times the most probable one's, before top_p.
 *
 * The order is descending (adjusted) logit, then ascending id: a total order, and the probabilities
 * are summed in it, so it alone fixes every rounding. How it is found does not change a draw: the
 * first top_k by a bounded heap when top_k is small, otherwise every token by a radix sort (the
 * unit tests compare both with a plain qsort by that order on many random vocabularies). */
#ifndef BATON_LLAMA_SAMPLE_H
#define BATON_LLAMA_SAMPLE_H

/* The version of what this sampler computes, in the llama engine's exactness fingerprint (llama.h):
 * raised whenever a request could draw another token from the same logits. 2: logit_bias and the
 * penalties are applied (1 ignored them, so a penalised stream would continue otherwise there). */
#define BT_LLSAMPLE_VERSION 4 /* 3: min_p, repetition_penalty and min_tokens are applied; 4: stop_token_ids */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    int32_t id; /* a token of the vocabulary */
    double bias;
} bt_llsample_bias;

typedef struct {
    double temperature; /* 0 = greedy */
    double top_p;       /* [0, 1]; 1 = off, 0 = the most probable token only (greedy) */
    int32_t top_k;      /* 0 = off */
    uint64_t seed;
    double frequency_penalty, presence_penalty; /* 0 = off */
    const bt_llsample_bias *bias;               /* n_bias entries, distinct ids < n_vocab */
    size_t n_bias;
    double min_p;              /* [0, 1]; 0 = off */
    double repetition_penalty; /* > 0; 1 (or 0) = off */
    const int32_t *prompt;     /* n_prompt ids < n_vocab: the prompt, read only for repetition_penalty */
    uint64_t n_prompt;
    uint64_t min_tokens;       /* the eog ids are excluded at draws n < min_tokens */
    const int32_t *eog;        /* n_eog distinct ids < n_vocab */
    size_t n_eog;
} bt_llsample_params;

typedef struct {
    int32_t id;
    float logit;
    double p;
} bt_llsample_cand;

/* What bt_llsample works in for a vocabulary of up to n_vocab tokens, made once and reused from
 * draw to draw (the engine keeps one for its thread; one draw at a time). The fields are the
 * sampler's own between draws; counts is all zeros then. */
typedef struct {
    int32_t n_vocab;
    bt_llsample_cand *cand; /* n_vocab: the candidates kept, in order, with their probabilities */
    float *adj;             /* n_vocab: the adjusted logits, when a bias or a penalty applies */
    uint64_t *key;          /* 2 × n_vocab: the order's keys, and the radix sort's second array */
    uint32_t *counts;       /* n_vocab: each token's count among the generated ones, during a draw */
} bt_llsample_scratch;

/* NULL when out of memory (or n_vocab <= 0); bt_llsample_scratch_free(NULL) is a no-op. */
bt_llsample_scratch *bt_llsample_scratch_new(int32_t n_vocab);
void bt_llsample_scratch_free(bt_llsample_scratch *s);

/* The uniform draw in [0, 1) for generated position n. */
double bt_llsample_uniform(uint64_t seed, uint64_t n);
/* Picks the next token from logits[0..n_vocab), the tokens generated so far being gen[0..n) (ids
 * < n_vocab; read only when a penalty is set), working in s (made for at least n_vocab tokens).
 * Returns -1 when a logit is NaN or infinite (a broken engine: the caller fails), or when s is too
 * small. */
int32_t bt_llsample(const float *logits, int32_t n_vocab, const bt_llsample_params *p, const int32_t *gen, uint64_t n,
                    bt_llsample_scratch *s);

#endif
