/* llama_loop.c — the llama engine's ceiling: the same model decoded by a minimal llama.cpp loop in
 * one process, with the settings of `baton worker --engine llama` (bench/llama.py runs both and
 * prints them side by side; docs/benchmarks.md).
 *
 *   baton-llama-loop [--model PATH] [--lib-dir DIR] [--streams N] [--tokens T] [--threads 1]
 *                    [--ubatch 1] [--max-num-batched-tokens 512]
 *
 * N greedy sequences ("Once upon a time <i>") of up to T new tokens each, in one context built as
 * the engine builds it (llama.c: N streams of the trained context, at most 65,536 cells in all,
 * each a multiple of 256; n_batch 512; n_ubatch --ubatch; flash attention off; --threads threads),
 * and fed as the engine feeds it: with --ubatch 1 each sequence gets its own llama_decode per step
 * (its prompt in one call, then one token per step); with more, one llama_decode per step holds the
 * next token of every sequence. A sequence ends at an end-of-generation token or at T tokens.
 * Nothing else: no threads, no queues, no text, no sampling beyond argmax. The libraries are loaded
 * by the engine's own loader (llama_lib.h), so both use the same files and the same CPU variant.
 * Prints one line: "loop streams=N tokens=T: G tokens in S s = R tok/s" (G = tokens output, S
 * from before the first prefill to after the last decode). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/llama/llama.h"
#include "engine/llama/llama_lib.h"

#ifndef BATON_HAVE_LLAMA
int main(void) {
    fprintf(stderr, "baton-llama-loop: built without llama.cpp's headers (run scripts/setup)\n");
    return 1;
}
#else

#define MAX_STREAMS 256

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static llama_token argmax(const float *logits, int32_t n) {
    llama_token best = 0;
    for (int32_t i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

int main(int argc, char **argv) {
    const char *model = NULL, *lib_dir = NULL;
    long streams = 1, tokens = 1000, threads = 1, ubatch = 1, nbatch = 512;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--model")) model = v;
        else if (!strcmp(k, "--lib-dir")) lib_dir = v;
        else if (!strcmp(k, "--streams")) streams = strtol(v, NULL, 10);
        else if (!strcmp(k, "--tokens")) tokens = strtol(v, NULL, 10);
        else if (!strcmp(k, "--threads")) threads = strtol(v, NULL, 10);
        else if (!strcmp(k, "--ubatch")) ubatch = strtol(v, NULL, 10);
        else if (!strcmp(k, "--max-num-batched-tokens")) nbatch = strtol(v, NULL, 10);
        else {
            fprintf(stderr,
                    "usage: %s [--model PATH] [--lib-dir DIR] [--streams N] [--tokens T] [--threads K] "
                    "[--ubatch U] [--max-num-batched-tokens B]\n",
                    argv[0]);
            return 2;
        }
    }
    if (streams < 1 || streams > MAX_STREAMS || tokens < 1 || threads < 1 || ubatch < 1 || nbatch <= streams) {
        fprintf(stderr,
                "baton-llama-loop: --streams 1..%d, --tokens, --threads, --ubatch >= 1, "
                "--max-num-batched-tokens > --streams\n",
                MAX_STREAMS);
        return 2;
    }
    char err[512];
    int rc = 1;
    const bt_llama_api *L = bt_llama_lib_open(lib_dir, err, sizeof err);
    if (!L) {
        fprintf(stderr, "baton-llama-loop: %s\n", err);
        return 1;
    }
    if (!model) model = bt_llama_default_model();
    struct llama_model_params mp = L->llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *m = L->llama_model_load_from_file(model, mp);
    struct llama_context *ctx = NULL;
    struct llama_batch batch = {0};
    bool batch_ok = false;
    llama_token *tok = NULL;
    long *n_gen = NULL, *n_past = NULL;
    bool *done = NULL;
    if (!m) {
        fprintf(stderr, "baton-llama-loop: cannot load %s\n", model);
        goto out;
    }
    const struct llama_vocab *vocab = L->llama_model_get_vocab(m);
    int32_t n_vocab = L->llama_vocab_n_tokens(vocab);
    /* the engine's automatic layout (llama.c, ll_kv_layout_auto): a stream of the trained context
     * rounded up to 256 cells per sequence, at most 65,536 cells in all, each stream a multiple of
     * 256 (what llama.cpp keeps as it is) */
    uint64_t per = ((uint64_t)L->llama_model_n_ctx_train(m) + 255) / 256 * 256;
    if (per * (uint64_t)streams > 65536) per = 65536 / (uint64_t)streams / 256 * 256;
    uint64_t n_ctx = per * (uint64_t)streams;
    struct llama_context_params cp = L->llama_context_default_params();
    cp.n_ctx = (uint32_t)n_ctx;
    cp.n_batch = (uint32_t)nbatch;
    cp.n_ubatch = (uint32_t)(ubatch < nbatch ? ubatch : nbatch);
    cp.n_seq_max = (uint32_t)streams;
    cp.n_threads = cp.n_threads_batch = (int32_t)threads;
    cp.kv_unified = false;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    ctx = L->llama_init_from_model(m, cp);
    batch = L->llama_batch_init((int32_t)nbatch, 0, 1);
    batch_ok = true;
    tok = calloc((size_t)streams, sizeof *tok);
    n_gen = calloc((size_t)streams, sizeof *n_gen);
    n_past = calloc((size_t)streams, sizeof *n_past);
    done = calloc((size_t)streams, sizeof *done);
    if (!ctx || !tok || !n_gen || !n_past || !done) {
        fprintf(stderr, "baton-llama-loop: cannot create the context\n");
        goto out;
    }
    double t0 = now_s();
    long total = 0;
    /* prefill: each prompt in its own llama_decode, its last row's logits sampled */
    for (long s = 0; s < streams; s++) {
        char prompt[64];
        llama_token ptok[64];
        snprintf(prompt, sizeof prompt, "Once upon a time %ld", s);
        int32_t n = L->llama_tokenize(vocab, prompt, (int32_t)strlen(prompt), ptok, 64, true, false);
        if (n <= 0) goto out;
        batch.n_tokens = 0;
        for (int32_t i = 0; i < n; i++) {
            batch.token[i] = ptok[i];
            batch.pos[i] = i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = (llama_seq_id)s;
            batch.logits[i] = i == n - 1;
        }
        batch.n_tokens = n;
        if (L->llama_decode(ctx, batch) != 0) goto out;
        n_past[s] = n;
        tok[s] = argmax(L->llama_get_logits_ith(ctx, n - 1), n_vocab);
    }
    /* decode: one token per live sequence per step */
    for (long live = streams; live > 0;) {
        long ids[MAX_STREAMS];
        int nb = 0;
        for (long s = 0; s < streams; s++) {
            if (done[s]) continue;
            n_gen[s]++; /* taken as the engine takes it: an end-of-generation token is not output */
            if (L->llama_vocab_is_eog(vocab, tok[s])) {
                done[s] = true, live--;
                continue;
            }
            total++;
            if (n_gen[s] >= tokens) {
                done[s] = true, live--;
                continue;
            }
            ids[nb++] = s;
        }
        if (ubatch == 1) { /* one llama_decode per sequence, as the engine's exact mode */
            for (int k = 0; k < nb; k++) {
                long s = ids[k];
                batch.n_tokens = 1;
                batch.token[0] = tok[s];
                batch.pos[0] = (llama_pos)n_past[s];
                batch.n_seq_id[0] = 1;
                batch.seq_id[0][0] = (llama_seq_id)s;
                batch.logits[0] = 1;
                if (L->llama_decode(ctx, batch) != 0) goto out;
                n_past[s]++;
                tok[s] = argmax(L->llama_get_logits_ith(ctx, 0), n_vocab);
            }
        } else if (nb) { /* every sequence's token in one llama_decode */
            for (int k = 0; k < nb; k++) {
                long s = ids[k];
                batch.token[k] = tok[s];
                batch.pos[k] = (llama_pos)n_past[s];
                batch.n_seq_id[k] = 1;
                batch.seq_id[k][0] = (llama_seq_id)s;
                batch.logits[k] = 1;
            }
            batch.n_tokens = nb;
            if (L->llama_decode(ctx, batch) != 0) goto out;
            for (int k = 0; k < nb; k++) {
                n_past[ids[k]]++;
                tok[ids[k]] = argmax(L->llama_get_logits_ith(ctx, k), n_vocab);
            }
        }
    }
    double dt = now_s() - t0;
    printf("loop streams=%ld tokens=%ld: %ld tokens in %.2f s = %.0f tok/s\n", streams, tokens, total, dt,
           (double)total / dt);
    rc = 0;
out:
    if (rc) fprintf(stderr, "baton-llama-loop: a decode failed\n");
    free(tok);
    free(n_gen);
    free(n_past);
    free(done);
    if (batch_ok) L->llama_batch_free(batch);
    if (ctx) L->llama_free(ctx);
    if (m) L->llama_model_free(m);
    return rc;
}
#endif
