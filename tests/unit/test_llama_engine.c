/* test_llama_engine.c — the llama engine's threads and scheduler (src/engine/llama/llama.c) with
 * a fake llama.cpp: a function table whose "model" predicts the next token from a hash of every
 * token its KV memory holds for the sequence, and whose decode refuses a batch that does not
 * continue a sequence's memory exactly. So a wrong position, a KV edit at the wrong time or a
 * missed seq_rm shows up as a wrong token or a failed decode. Built with ThreadSanitizer by
 * scripts/tsan: the fake is instrumented (llama.cpp is not), so every hand-off between the loop
 * and the engine thread is checked for races.
 *
 * Covers: 32 sequences through 4 slots (queueing), greedy output equal to the model's, exact
 * usage; kills right after submit and from inside a token callback (no callback afterwards, KV
 * freed); stops (finish "cancelled"); continuations from carried tokens; destroying the engine
 * with sequences live (no callback after, every handle freed: ASan); load back to empty; EOS and
 * the context cap ending a sequence ("stop", "length", exact usage); prompts that wait their turn
 * for the prefill budget told so once each (on_wait), counted as waiting in the load; decodes
 * and KV edits (llama_decode, llama_memory_seq_rm) never on the loop's thread. Batch gathering
 * (--batch-gather-us), the engine thread's timed wait: a burst submitted during the wait is
 * answered in one step (the kv_stats counters: one step, one gather of exactly the sequences not
 * killed), a sequence killed during it hears nothing, the step waits the window after the last
 * arrival, the loop hears the load (the waiting sequences) during the wait, even when no sequence
 * produced or ended anything, the process sleeps through the wait (the timed wait is on CLOCK_MONOTONIC, not spinning);
 * a gather whose only sequence is killed ends without a step and leaves nothing behind for the
 * next request; a destroy during the wait wakes the thread at once (no step, no callback). The
 * prompt thread, held inside one tokenization: the prompts queued behind it count as waiting in
 * the load and are told once that they wait (queued); a stop or kill of a queued one, or of the one being tokenized, is delivered at once
 * (not after the prompts ahead), the queued ones never tokenized; a destroy does not wait for the
 * tokenization (the loop goes on, the teardown ends once it returns). */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "common/proc.h"
#include "engine/llama/llama_internal.h"

#ifdef BATON_HAVE_LLAMA

#define FV 32 /* vocabulary */
#define FSEQ 16
#define FPOS 4096

/* ---- the fake llama.cpp (engine thread only, except set-up) ---------------------------------- */

static int fake_model, fake_ctx, fake_mem, fake_vocab;
static int32_t hist[FSEQ][FPOS];
static int32_t seqmax[FSEQ];
static float *rows;
static int32_t nrows;
static uint32_t f_n_ctx, f_n_ctx_seq, f_n_batch, f_n_seq;
static bool f_unified;
static int decodes;
/* test_prefill_waits: the decode numbered gate_at holds the engine thread until the loop has
 * delivered gate_waits waits (at most 5 s). Without it, a loop thread that runs late (a loaded
 * machine, a sanitizer build) gets the waits together with the tokens that follow them, which end
 * them before they are told (bt_deliver_wait), and reads a load from after the waits. */
static int gate_at, gate_waits;
static atomic_int waits_delivered;
/* The loop's thread (set by the harness before the engine starts) and how many decodes and KV
 * edits ran on it: none may (llama.c decodes and edits the KV memory on its engine thread only). */
static pthread_t loop_thread;
static atomic_int on_loop_calls;
/* When > 0: the model's next token after position eos_at - 1 is EOS (token 2), whatever the history */
static int32_t eos_at;
static void note_thread(void) {
    if (pthread_equal(pthread_self(), loop_thread)) atomic_fetch_add(&on_loop_calls, 1);
}

static uint32_t next_of(const int32_t *toks, int32_t n) {
    uint64_t h = 1469598103934665603ull;
    for (int32_t i = 0; i < n; i++) h = (h ^ (uint64_t)toks[i]) * 1099511628211ull;
    return 3 + (uint32_t)(h % (FV - 3));
}

static void f_backend_init(void) {}
static void f_log_set(ggml_log_callback cb, void *ud) { (void)cb, (void)ud; }
static struct llama_model_params f_model_default_params(void) {
    struct llama_model_params p;
    memset(&p, 0, sizeof p);
    return p;
}
static struct llama_context_params f_context_default_params(void) {
    struct llama_context_params p;
    memset(&p, 0, sizeof p);
    return p;
}
static struct llama_model *f_model_load_from_file(const char *path, struct llama_model_params p) {
    (void)path, (void)p;
    return (struct llama_model *)(void *)&fake_model;
}
static void f_model_free(struct llama_model *m) { (void)m; }
/* llama.cpp's KV sizing (llama_context's constructor, the version baton loads): the cells asked
 * for padded up to a multiple of 256; with one stream per sequence, every stream padded up to 256
 * as well, and the cells made streams x that */
static uint32_t pad256(uint32_t n) { return (n + 255) / 256 * 256; }
static struct llama_context *f_init_from_model(struct llama_model *m, struct llama_context_params p) {
    (void)m;
    f_unified = p.kv_unified;
    f_n_ctx = pad256(p.n_ctx);
    f_n_ctx_seq = f_unified ? f_n_ctx : pad256(f_n_ctx / p.n_seq_max);
    if (!f_unified) f_n_ctx = f_n_ctx_seq * p.n_seq_max;
    f_n_batch = p.n_batch < f_n_ctx ? p.n_batch : f_n_ctx;
    f_n_seq = p.n_seq_max;
    for (int s = 0; s < FSEQ; s++) seqmax[s] = -1;
    return (struct llama_context *)(void *)&fake_ctx;
}
static void f_free(struct llama_context *c) { (void)c; }
static const struct llama_vocab *f_model_get_vocab(const struct llama_model *m) {
    (void)m;
    return (const struct llama_vocab *)(const void *)&fake_vocab;
}
static int32_t f_model_n_ctx_train(const struct llama_model *m) {
    (void)m;
    return 1024;
}
/* test_continue_final: a model template, "[role]content</>" per message, "[assistant]" to come;
 * with fake_trims it drops the content's trailing blanks, as some real templates do; with
 * fake_chatml it writes llama.cpp's ChatML instead ("<|im_start|>role\ncontent<|im_end|>\n",
 * "<|im_start|>assistant\n" to come), whose markers hold short contents such as "<" or "\n" */
static bool fake_template, fake_trims, fake_chatml;
static const char *f_model_chat_template(const struct llama_model *m, const char *name) {
    (void)m, (void)name;
    return fake_template ? "fake" : NULL;
}
static uint32_t f_n_ctx_fn(const struct llama_context *c) {
    (void)c;
    return f_n_ctx;
}
static uint32_t f_n_ctx_seq_fn(const struct llama_context *c) {
    (void)c;
    return f_n_ctx_seq;
}
static uint32_t f_n_batch_fn(const struct llama_context *c) {
    (void)c;
    return f_n_batch;
}
static uint32_t f_n_seq_max(const struct llama_context *c) {
    (void)c;
    return f_n_seq;
}
static llama_memory_t f_get_memory(const struct llama_context *c) {
    (void)c;
    return (llama_memory_t)(void *)&fake_mem;
}
static bool f_memory_seq_rm(llama_memory_t m, llama_seq_id s, llama_pos p0, llama_pos p1) {
    (void)m;
    note_thread();
    assert_true(s >= 0 && s < FSEQ);
    assert_true(p0 < 0 && p1 < 0); /* the engine only ever drops whole sequences */
    seqmax[s] = -1;
    return true;
}
static llama_pos f_memory_seq_pos_max(llama_memory_t m, llama_seq_id s) {
    (void)m;
    return seqmax[s];
}
static void f_memory_clear(llama_memory_t m, bool data) { (void)m, (void)data; }
static struct llama_batch f_batch_init(int32_t n, int32_t embd, int32_t n_seq_max) {
    (void)embd;
    struct llama_batch b;
    memset(&b, 0, sizeof b);
    b.token = calloc((size_t)n, sizeof *b.token);
    b.pos = calloc((size_t)n, sizeof *b.pos);
    b.n_seq_id = calloc((size_t)n, sizeof *b.n_seq_id);
    b.seq_id = calloc((size_t)n + 1, sizeof *b.seq_id);
    for (int32_t i = 0; i < n; i++) b.seq_id[i] = calloc((size_t)n_seq_max, sizeof **b.seq_id);
    b.logits = calloc((size_t)n, sizeof *b.logits);
    rows = calloc((size_t)n * FV, sizeof *rows);
    return b;
}
static void f_batch_free(struct llama_batch b) {
    for (int32_t i = 0; b.seq_id[i]; i++) free(b.seq_id[i]);
    free(b.token);
    free(b.pos);
    free(b.n_seq_id);
    free(b.seq_id);
    free(b.logits);
    free(rows);
    rows = NULL;
}
/* Every row must continue its sequence's memory; the logits of a row name the next token of
 * the sequence's whole history up to it. */
static int32_t f_decode(struct llama_context *c, struct llama_batch b) {
    (void)c;
    note_thread();
    decodes++;
    for (int ms = 0; gate_at && decodes == gate_at && atomic_load(&waits_delivered) < gate_waits && ms < 5000; ms++)
        uv_sleep(1);
    uv_sleep(0); /* a yield; the real decode takes a while too */
    struct timespec ts = {0, 200000};
    nanosleep(&ts, NULL);
    nrows = b.n_tokens;
    for (int32_t r = 0; r < b.n_tokens; r++) {
        llama_seq_id s = b.seq_id[r][0];
        if (b.n_seq_id[r] != 1 || s < 0 || s >= FSEQ || b.pos[r] != seqmax[s] + 1 || b.pos[r] >= FPOS) return -1;
        if (b.token[r] < 0 || b.token[r] >= FV) return -1;
        hist[s][b.pos[r]] = b.token[r];
        seqmax[s] = b.pos[r];
        float *row = rows + (size_t)r * FV;
        for (int i = 0; i < FV; i++) row[i] = 0;
        row[eos_at > 0 && b.pos[r] + 1 == eos_at ? 2 : next_of(hist[s], b.pos[r] + 1)] = 5;
    }
    return 0;
}
static float *f_get_logits_ith(struct llama_context *c, int32_t i) {
    (void)c;
    assert_true(i >= 0 && i < nrows);
    return rows + (size_t)i * FV;
}
static int32_t f_vocab_n_tokens(const struct llama_vocab *v) {
    (void)v;
    return FV;
}
static bool f_vocab_is_eog(const struct llama_vocab *v, llama_token t) {
    (void)v;
    return t == 2;
}
/* The prompt tests: while tok_gate is closed, tokenizing a prompt that starts with "slow" blocks
 * (at most 5 s), as llama_tokenize does for seconds over a long prompt; prompts that start with
 * "queued" are counted when tokenized off the loop (on the prompt thread). */
static pthread_mutex_t tok_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t tok_cv = PTHREAD_COND_INITIALIZER;
static bool tok_gate, tok_inside;
static atomic_int tok_queued;
static void tok_gate_set(bool closed) {
    pthread_mutex_lock(&tok_mu);
    tok_gate = closed;
    pthread_cond_broadcast(&tok_cv);
    pthread_mutex_unlock(&tok_mu);
}
static bool tok_gate_inside(void) {
    pthread_mutex_lock(&tok_mu);
    bool in = tok_inside;
    pthread_mutex_unlock(&tok_mu);
    return in;
}
static void tok_hold(const char *text, int32_t len) {
    bool off_loop = !pthread_equal(pthread_self(), loop_thread);
    if (off_loop && len >= 6 && memcmp(text, "queued", 6) == 0) atomic_fetch_add(&tok_queued, 1);
    if (!off_loop || len < 4 || memcmp(text, "slow", 4) != 0) return;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 5;
    pthread_mutex_lock(&tok_mu);
    tok_inside = true;
    while (tok_gate && pthread_cond_timedwait(&tok_cv, &tok_mu, &until) == 0) continue;
    tok_inside = false;
    pthread_mutex_unlock(&tok_mu);
}

static int32_t f_tokenize(const struct llama_vocab *v, const char *text, int32_t len, llama_token *out, int32_t max,
                          bool add_special, bool parse_special) {
    (void)v, (void)parse_special;
    tok_hold(text, len);
    int32_t n = len + (add_special ? 1 : 0);
    if (n > max) return -n;
    int32_t k = 0;
    if (add_special) out[k++] = 1;
    for (int32_t i = 0; i < len; i++) out[k++] = 3 + (unsigned char)text[i] % (FV - 3);
    return k;
}
static int32_t f_token_to_piece(const struct llama_vocab *v, llama_token t, char *buf, int32_t len, int32_t lstrip,
                                bool special) {
    (void)v, (void)lstrip, (void)special;
    if (t < 3 || len < 1) return 0;
    buf[0] = (char)('a' + t % 26);
    return 1;
}
static int32_t f_chat_apply_template(const char *tmpl, const struct llama_chat_message *chat, size_t n, bool add_ass,
                                     char *buf, int32_t len) {
    if (!tmpl || strcmp(tmpl, "fake") != 0) return -1;
    char out[4096];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        size_t cl = strlen(chat[i].content);
        while (fake_trims && cl && chat[i].content[cl - 1] == ' ') cl--;
        k += (size_t)snprintf(out + k, sizeof out - k, fake_chatml ? "<|im_start|>%s\n%.*s<|im_end|>\n" : "[%s]%.*s</>",
                              chat[i].role, (int)cl, chat[i].content);
    }
    if (add_ass)
        k += (size_t)snprintf(out + k, sizeof out - k, fake_chatml ? "<|im_start|>assistant\n" : "[assistant]");
    if (buf && len > 0) snprintf(buf, (size_t)len, "%s", out);
    return (int32_t)k;
}
static bool f_vocab_get_add_bos(const struct llama_vocab *v) {
    (void)v;
    return true;
}
static int32_t f_model_desc(const struct llama_model *m, char *buf, size_t size) {
    (void)m;
    return snprintf(buf, size, "fake");
}
static uint64_t f_model_size(const struct llama_model *m) {
    (void)m;
    return 0;
}
static int32_t f_n_threads(struct llama_context *c) {
    (void)c;
    return 1;
}

static const bt_llama_api fake_api = {
    .llama_backend_init = f_backend_init,
    .llama_log_set = f_log_set,
    .llama_model_default_params = f_model_default_params,
    .llama_context_default_params = f_context_default_params,
    .llama_model_load_from_file = f_model_load_from_file,
    .llama_model_free = f_model_free,
    .llama_init_from_model = f_init_from_model,
    .llama_free = f_free,
    .llama_model_get_vocab = f_model_get_vocab,
    .llama_model_n_ctx_train = f_model_n_ctx_train,
    .llama_model_chat_template = f_model_chat_template,
    .llama_n_ctx = f_n_ctx_fn,
    .llama_n_batch = f_n_batch_fn,
    .llama_n_seq_max = f_n_seq_max,
    .llama_get_memory = f_get_memory,
    .llama_memory_seq_rm = f_memory_seq_rm,
    .llama_memory_seq_pos_max = f_memory_seq_pos_max,
    .llama_memory_clear = f_memory_clear,
    .llama_batch_init = f_batch_init,
    .llama_batch_free = f_batch_free,
    .llama_decode = f_decode,
    .llama_get_logits_ith = f_get_logits_ith,
    .llama_vocab_n_tokens = f_vocab_n_tokens,
    .llama_vocab_is_eog = f_vocab_is_eog,
    .llama_tokenize = f_tokenize,
    .llama_token_to_piece = f_token_to_piece,
    .llama_chat_apply_template = f_chat_apply_template,
    .llama_vocab_get_add_bos = f_vocab_get_add_bos,
    .llama_model_desc = f_model_desc,
    .llama_model_size = f_model_size,
    .llama_n_threads = f_n_threads,
    .llama_n_ctx_seq = f_n_ctx_seq_fn,
};

/* ---- the test harness (loop thread) --------------------------------------------------------- */

#define NS 32
#define MAXG 128

typedef enum { K_NORMAL, K_KILL_NOW, K_KILL_MID, K_STOP, K_CONTINUE } kind;

typedef struct {
    int i;
    kind k;
    bt_engine_seq *seq;
    uint32_t expect[MAXG]; /* the model's greedy stream for this prompt */
    uint32_t n_expect;     /* what the request asks for in total */
    uint32_t carried;
    uint32_t got[MAXG];
    uint32_t ngot;
    char text[MAXG + 1];
    size_t ntext;
    int finishes, errors;
    bool dead; /* killed: no callback may come */
    bool stop_sent;
    uint64_t seen; /* tokens received, stored or not */
    bt_finish_reason reason;
    bt_usage usage;
    uint32_t prompt_len;
    uint64_t first_ns; /* CLOCK_MONOTONIC when its first tokens arrived (0: none yet) */
    int waits;         /* on_wait calls (test_prefill_waits) */
    bt_engine_wait wait_reason;
    bool wait_counted; /* the load read in its on_wait counted a waiting sequence */
} tseq;

static tseq S[NS];
static bt_engine *E;
static int remaining;
static bt_engine_kv_stats last_kvs; /* the engine's counters just before the last end destroyed it */

static uint64_t mono_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void expected_stream(tseq *t, const char *prompt) {
    int32_t toks[1024];
    int32_t n = f_tokenize(NULL, prompt, (int32_t)strlen(prompt), toks, 1024, true, false);
    t->prompt_len = (uint32_t)n;
    for (uint32_t g = 0; g < MAXG; g++) {
        uint32_t nx = next_of(toks, n);
        t->expect[g] = nx;
        toks[n++] = (int32_t)nx;
    }
}

static void done_one(void) {
    if (--remaining > 0) return;
    bt_engine_kv_stats_get(E, &last_kvs);
    bt_engine_destroy(E); /* from inside a callback: deferred */
}

static void on_tokens(void *ud, const uint32_t *ids, size_t n, const char *text, size_t len) {
    tseq *t = ud;
    assert_false(t->dead);
    assert_int_equal(t->finishes + t->errors, 0);
    assert_int_equal(n, len); /* one letter per token */
    if (!t->first_ns) t->first_ns = mono_ns(CLOCK_MONOTONIC);
    for (size_t i = 0; i < n; i++) {
        t->seen++;
        if (t->ngot == MAXG) continue; /* test_destroy_live: only counted */
        t->got[t->ngot++] = ids[i];
        t->text[t->ntext++] = text[i];
    }
    if (t->k == K_KILL_MID && t->ngot >= 5) {
        bt_engine_kill(E, t->seq);
        t->dead = true;
        done_one();
    } else if (t->k == K_STOP && t->ngot >= 3 && !t->stop_sent) {
        bt_engine_stop(E, t->seq);
        t->stop_sent = true;
    }
}

static void on_finish(void *ud, bt_finish_reason reason, const bt_usage *u) {
    tseq *t = ud;
    assert_false(t->dead);
    t->finishes++;
    t->reason = reason;
    t->usage = *u;
    done_one();
}

static void on_error(void *ud, bt_status code, const char *msg) {
    tseq *t = ud;
    fprintf(stderr, "sequence %d: error %s: %s\n", t->i, bt_status_name(code), msg);
    t->errors++;
    done_one();
}

static const bt_engine_sink sink = {on_tokens, on_finish, on_error, NULL};

/* test_prefill_waits, test_prompt_queue: the wait is told once, before any output, and the load the loop reads by
 * then already counts it as waiting (docs/protocol.md §4: a LOAD showing nothing waiting after a
 * WAITING ends that wait at the frontend) */
static void on_wait_rec(void *ud, bt_engine_wait reason) {
    tseq *t = ud;
    assert_false(t->dead);
    assert_int_equal(t->ngot, 0);
    t->waits++;
    atomic_fetch_add(&waits_delivered, 1);
    t->wait_reason = reason;
    bt_engine_load l;
    bt_engine_get_load(E, &l);
    t->wait_counted = l.waiting >= 1 && l.waiting + l.running == 4;
}
static const bt_engine_sink wait_sink = {on_tokens, on_finish, on_error, on_wait_rec};

/* The load reports of the gather tests: how many, and the waiting count the last one read */
static int loads;
static uint64_t load_waiting;
static void on_load_hook(void *ud) {
    (void)ud;
    bt_engine_load l;
    bt_engine_get_load(E, &l);
    loads++;
    load_waiting = l.waiting;
}
static const bt_engine_hooks gather_hooks = {.on_load = on_load_hook};

/* gather_us > 0: --batch-gather-us, with room for 8 prompts of "a prompt" (9 tokens) in one step */
static bt_engine *make_engine_with(uv_loop_t *loop, int64_t hang_after, int64_t gather_us,
                                   const bt_engine_hooks *hooks) {
    bt_llama_config cfg;
    bt_llama_config_default(&cfg);
    cfg.fault_hang_after_tokens = hang_after;
    cfg.max_num_seqs = gather_us ? 8 : 4;
    cfg.max_num_batched_tokens = gather_us ? 128 : 16;
    cfg.batch_gather_us = gather_us;
    cfg.ctx_size = 4 * 1024;
    loop_thread = pthread_self();
    atomic_store(&on_loop_calls, 0);
    char err[256];
    bt_engine *e = bt_llama_create_with_api(loop, &cfg, hooks, NULL, &fake_api, "fake.gguf", err, sizeof err);
    if (!e) fprintf(stderr, "create: %s\n", err);
    assert_non_null(e);
    return e;
}

static bt_engine *make_engine_cfg(uv_loop_t *loop, int64_t hang_after, int64_t gather_us) {
    return make_engine_with(loop, hang_after, gather_us, gather_us ? &gather_hooks : NULL);
}

static bt_engine *make_engine_hang(uv_loop_t *loop, int64_t hang_after) { return make_engine_cfg(loop, hang_after, 0); }
static bt_engine *make_engine(uv_loop_t *loop) { return make_engine_hang(loop, 0); }

static void test_sequences(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    E = make_engine(&loop);
    remaining = 0;
    json_t *bodies[NS];
    for (int i = 0; i < NS; i++) {
        tseq *t = &S[i];
        memset(t, 0, sizeof *t);
        t->i = i;
        t->k = (kind)(i % 5);
        char prompt[64];
        snprintf(prompt, sizeof prompt, "prompt number %d, which is %s", i, i % 2 ? "long enough to chunk" : "short");
        expected_stream(t, prompt);
        t->n_expect = 20 + (uint32_t)i * 3;
        bodies[i] = json_pack("{s:s}", "prompt", prompt);
        bt_engine_request rq = {0};
        rq.request_id = "t";
        rq.api = BT_API_COMPLETION;
        rq.body = bodies[i];
        rq.temperature = 0;
        rq.max_tokens = t->n_expect;
        if (t->k == K_CONTINUE) {
            t->carried = 7;
            rq.carried = t->expect;
            rq.n_carried = 7;
            rq.max_tokens = t->n_expect - 7;
        }
        char err[128];
        assert_int_equal(bt_engine_submit(E, &rq, &sink, t, &t->seq, err, sizeof err), BT_OK);
        if (t->k == K_KILL_NOW) {
            bt_engine_kill(E, t->seq);
            t->dead = true;
        } else {
            remaining++;
        }
    }
    for (int i = 0; i < NS; i++) json_decref(bodies[i]); /* submit copied what it needs */
    uv_run(&loop, UV_RUN_DEFAULT); /* ends when the last callback destroyed the engine */
    assert_true(decodes > 0);
    assert_int_equal(atomic_load(&on_loop_calls), 0); /* every decode and KV edit on the engine thread */

    int checked = 0, stopped = 0;
    for (int i = 0; i < NS; i++) {
        tseq *t = &S[i];
        assert_int_equal(t->errors, 0);
        for (uint32_t g = 0; g < t->ngot; g++) {
            assert_int_equal(t->got[g], t->expect[t->carried + g]); /* the model's stream, in order */
            assert_int_equal(t->text[g], 'a' + t->got[g] % 26);
        }
        switch (t->k) {
        case K_KILL_NOW: assert_int_equal(t->ngot + (uint32_t)t->finishes, 0); break;
        case K_KILL_MID:
            assert_int_equal(t->finishes, 0);
            assert_true(t->ngot >= 5 && t->ngot < t->n_expect);
            break;
        case K_STOP: /* the stop may arrive after the engine finished it: then it is a no-op */
            assert_int_equal(t->finishes, 1);
            if (t->reason == BT_FINISH_CANCELLED) {
                assert_true(t->ngot >= 3 && t->ngot < t->n_expect);
                stopped++;
            } else {
                assert_int_equal(t->reason, BT_FINISH_LENGTH);
                assert_int_equal(t->ngot, t->n_expect);
            }
            assert_int_equal(t->usage.completion_tokens, t->ngot);
            break;
        case K_NORMAL:
        case K_CONTINUE:
            assert_int_equal(t->finishes, 1);
            assert_int_equal(t->reason, BT_FINISH_LENGTH);
            assert_int_equal(t->ngot, t->n_expect - t->carried);
            assert_int_equal(t->usage.completion_tokens, t->n_expect); /* carried ones included */
            assert_int_equal(t->usage.prompt_tokens, t->prompt_len);
            checked++;
            break;
        }
    }
    assert_true(checked >= 12);
    assert_true(stopped >= 1);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void on_timer_destroy(uv_timer_t *tm) {
    bt_engine_destroy(E);
    for (int i = 0; i < 8; i++) S[i].dead = true; /* any callback from here on fails the test */
    uv_close((uv_handle_t *)tm, NULL);
}

/* Submits n endless (max_tokens 100000) normal completions as S[0..n) with request id rid. */
static void submit_endless(int n, const char *rid) {
    json_t *body = json_pack("{s:s}", "prompt", "a prompt");
    for (int i = 0; i < n; i++) {
        tseq *t = &S[i];
        memset(t, 0, sizeof *t);
        t->i = i;
        t->k = K_NORMAL;
        bt_engine_request rq = {0};
        rq.request_id = rid;
        rq.api = BT_API_COMPLETION;
        rq.body = body;
        rq.max_tokens = 100000;
        char err[128];
        assert_int_equal(bt_engine_submit(E, &rq, &sink, t, &t->seq, err, sizeof err), BT_OK);
    }
    json_decref(body);
}

/* Runs one greedy completion of "a prompt" (9 tokens) asking for max_tokens on a fresh engine
 * until it ends; returns its record. */
static tseq *run_one(uint32_t max_tokens) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    E = make_engine(&loop);
    remaining = 1;
    tseq *t = &S[0];
    memset(t, 0, sizeof *t);
    t->k = K_NORMAL;
    expected_stream(t, "a prompt");
    json_t *body = json_pack("{s:s}", "prompt", "a prompt");
    bt_engine_request rq = {0};
    rq.request_id = "e";
    rq.api = BT_API_COMPLETION;
    rq.body = body;
    rq.max_tokens = max_tokens;
    char err[128];
    assert_int_equal(bt_engine_submit(E, &rq, &sink, t, &t->seq, err, sizeof err), BT_OK);
    json_decref(body);
    uv_run(&loop, UV_RUN_DEFAULT); /* ends when its end destroyed the engine */
    assert_int_equal(uv_loop_close(&loop), 0);
    assert_int_equal(t->finishes, 1);
    assert_int_equal(t->errors, 0);
    return t;
}

/* How a sequence ends besides max_tokens (docs/engines.md §3.3): EOS ends it with "stop", counted
 * in usage and not delivered; the context cap (the model's trained context, 1,024 here) ends it
 * with "length" whatever max_tokens says. */
static void test_eos_and_context_cap(void **state) {
    (void)state;
    eos_at = 9 + 10; /* the prompt's 9 tokens, 10 generated, then EOS */
    tseq *t = run_one(100);
    eos_at = 0;
    assert_int_equal(t->reason, BT_FINISH_STOP);
    assert_int_equal(t->ngot, 10);
    assert_memory_equal(t->got, t->expect, 10 * sizeof *t->got);
    assert_int_equal(t->usage.prompt_tokens, 9);
    assert_int_equal(t->usage.completion_tokens, 11); /* the EOS counted */

    t = run_one(5000);
    assert_int_equal(t->reason, BT_FINISH_LENGTH);
    assert_int_equal(t->seen, 1024 - 9);
    assert_memory_equal(t->got, t->expect, MAXG * sizeof *t->got);
    assert_int_equal(t->usage.prompt_tokens, 9);
    assert_int_equal(t->usage.completion_tokens, 1024 - 9);
}

/* continue_final_message under a model's template (docs/engines.md §3.3): rendered without the
 * assistant turn to come and cut right after the final content, its end of turn dropped (after
 * the content trimmed of white space, when the template trims it); a template that writes
 * nothing of that content, or rewrites it otherwise, is refused (BT_ERR_INVALID_PARAM), as is a
 * continuation after a user message. The prompt's tokens are its bytes (and BOS) here. */
static tseq *run_chat(const char *last, bool cont, bt_status *st) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    E = make_engine(&loop);
    remaining = 1;
    tseq *t = &S[0];
    memset(t, 0, sizeof *t);
    json_t *body = json_pack("{s:[{s:s,s:s},{s:s,s:s}],s:b}", "messages", "role", "user", "content", "hi", "role",
                             last ? "assistant" : "user", "content", last ? last : "more", "continue_final_message",
                             cont);
    bt_engine_request rq = {0};
    rq.request_id = "c";
    rq.api = BT_API_CHAT;
    rq.body = body;
    rq.max_tokens = 3;
    char err[256];
    *st = bt_engine_submit(E, &rq, &sink, t, &t->seq, err, sizeof err);
    json_decref(body);
    if (*st != BT_OK) bt_engine_destroy(E);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    return t;
}

/* The prompt run_chat's sequence was given is `text`: as many tokens (and BOS), and the model's
 * greedy tokens after exactly that text (the fake's next token hashes every prompt token). */
static void assert_prompt(const tseq *t, const char *text) {
    assert_int_equal(t->finishes, 1);
    assert_int_equal(t->usage.prompt_tokens, 1 + strlen(text));
    static tseq ref;
    expected_stream(&ref, text);
    assert_int_equal(t->ngot, 3);
    assert_memory_equal(t->got, ref.expect, 3 * sizeof *t->got);
}

static void test_continue_final(void **state) {
    (void)state;
    fake_template = true;
    bt_status st;
    tseq *t = run_chat("abc", true, &st);
    assert_int_equal(st, BT_OK);
    assert_int_equal(t->finishes, 1);
    assert_int_equal(t->usage.prompt_tokens, 1 + strlen("[user]hi</>[assistant]abc"));
    t = run_chat("abc", false, &st);
    assert_int_equal(t->finishes, 1);
    assert_int_equal(t->usage.prompt_tokens, 1 + strlen("[user]hi</>[assistant]abc</>[assistant]"));
    /* "hi" is the user's message too: the cut is after the final message's "hi" */
    t = run_chat("hi", true, &st);
    assert_int_equal(t->finishes, 1);
    assert_int_equal(t->usage.prompt_tokens, 1 + strlen("[user]hi</>[assistant]hi"));
    fake_trims = true; /* "abc " written as "abc", the content trimmed: cut after what is written */
    t = run_chat("abc ", true, &st);
    assert_int_equal(t->finishes, 1);
    assert_int_equal(t->usage.prompt_tokens, 1 + strlen("[user]hi</>[assistant]abc"));
    t = run_chat(" abc ", true, &st); /* written " abc": neither as sent nor trimmed, refused */
    assert_int_equal(t->finishes, 0);
    assert_int_equal(t->errors, 1);
    t = run_chat("  ", true, &st); /* written as nothing: nothing to cut after */
    assert_int_equal(t->finishes, 0);
    assert_int_equal(t->errors, 1);
    t = run_chat("", true, &st); /* nothing to cut after */
    assert_int_equal(t->errors, 1);
    fake_trims = false;
    t = run_chat(NULL, true, &st); /* after a user message: refused at submit */
    assert_int_equal(st, BT_ERR_INVALID_PARAM);
    /* ChatML: the final content is cut at its own place, the one after the messages before it and
     * the final message's header, whatever of it the markers around it also hold */
    fake_chatml = true;
    static const char *const chatml[] = {"<",         "|",  "\n",           ">\n",        "im_end",
                                         "assistant", "hi", "<|im_start|>", "a<|im_end|>"};
    for (size_t i = 0; i < sizeof chatml / sizeof *chatml; i++) {
        char want[128];
        snprintf(want, sizeof want, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n%s", chatml[i]);
        t = run_chat(chatml[i], true, &st);
        assert_int_equal(st, BT_OK);
        assert_prompt(t, want);
    }
    fake_trims = true; /* the trailing blank dropped: cut after the "<" written, not in a marker */
    t = run_chat("< ", true, &st);
    assert_prompt(t, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<");
    t = run_chat("< \n ", true, &st); /* written "< \n": neither as sent nor trimmed, refused */
    assert_int_equal(t->finishes, 0);
    assert_int_equal(t->errors, 1);
    fake_trims = false;
    fake_chatml = false;
    fake_template = false;
    /* the plain template: the final message open, no line end and no "assistant:" */
    t = run_chat("abc", true, &st);
    assert_int_equal(t->finishes, 1);
    assert_int_equal(t->usage.prompt_tokens, 1 + strlen("user: hi\nassistant: abc"));
}

/* The KV cells llama.cpp allocates are what the configuration allows, never more (llama.c,
 * ll_kv_layout): the fake sizes its cache by llama.cpp's rule, which pads up, and the engine must ask
 * for a size it keeps as it is. The model card advertises what a sequence really gets. */
static void test_kv_layout(void **state) {
    (void)state;
    struct {
        int64_t ctx_size, seqs;
        bool unified;
        uint32_t cells, context; /* expected */
    } cases[] = {
        {3000, 4, false, 2048, 512},  /* llama.cpp alone: 3,072 */
        {0, 8, false, 8192, 1024},    /* the model's 1,024 for each */
        {0, 255, false, 65280, 256},  /* the automatic cap, 65,536 (llama.cpp alone: 130,560) */
        {1000, 4, true, 768, 768},    /* one pool (llama.cpp alone: 1,024) */
        {0, 255, true, 65536, 1024},  /* one pool at the cap, the model's context per sequence */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        uv_loop_t loop;
        uv_loop_init(&loop);
        bt_llama_config cfg;
        bt_llama_config_default(&cfg);
        cfg.ctx_size = cases[i].ctx_size;
        cfg.max_num_seqs = cases[i].seqs;
        cfg.max_num_batched_tokens = 512;
        cfg.kv_unified = cases[i].unified;
        char err[256];
        assert_int_equal(bt_llama_config_check(&cfg, err, sizeof err), BT_OK);
        bt_engine *e = bt_llama_create_with_api(&loop, &cfg, NULL, NULL, &fake_api, "fake.gguf", err, sizeof err);
        if (!e) fprintf(stderr, "create: %s\n", err);
        assert_non_null(e);
        json_t *card = json_object();
        bt_engine_card(e, card);
        fprintf(stderr, "kv layout %zu: %u cells, context %lld\n", i, f_n_ctx,
                (long long)json_integer_value(json_object_get(card, "context_length")));
        assert_int_equal(f_n_ctx, cases[i].cells);
        assert_int_equal(json_integer_value(json_object_get(card, "context_length")), cases[i].context);
        assert_int_equal(json_integer_value(json_object_get(card, "total_kv_blocks")), cases[i].cells / 16);
        json_decref(card);
        bt_engine_destroy(e);
        uv_run(&loop, UV_RUN_DEFAULT);
        assert_int_equal(uv_loop_close(&loop), 0);
    }
    /* fewer than 256 cells per sequence: refused, naming both flags */
    bt_llama_config cfg;
    bt_llama_config_default(&cfg);
    cfg.ctx_size = 1024;
    char err[256];
    assert_int_equal(bt_llama_config_check(&cfg, err, sizeof err), BT_ERR_INVALID);
    assert_non_null(strstr(err, "--ctx-size (1024) is too small for --max-num-seqs (16)"));
    cfg.kv_unified = true; /* one pool of 1,024 is whole */
    assert_int_equal(bt_llama_config_check(&cfg, err, sizeof err), BT_OK);
}

static void test_destroy_live(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    E = make_engine(&loop);
    remaining = 1000; /* never reaches 0: the timer destroys the engine */
    submit_endless(8, "d");
    uv_timer_t tm;
    uv_timer_init(&loop, &tm);
    uv_timer_start(&tm, on_timer_destroy, 30, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    uint64_t seen = 0;
    for (int i = 0; i < 8; i++) seen += S[i].seen;
    assert_true(seen > 0); /* they were running when the engine went */
    assert_int_equal(atomic_load(&on_loop_calls), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* An engine thread that hangs (inside a decode that never returns: --fault-hang-after-tokens)
 * does not keep destroy, and so the process, from ending: destroy gives it 5 s, then leaves it
 * running (not joined, its engine not freed) and closes the engine's handle, so the loop ends.
 * No callback comes after destroy. Under ThreadSanitizer (scripts/tsan) this also checks that the
 * abandoned thread and the loop share nothing unguarded. */
static void test_destroy_hung(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    E = make_engine_hang(&loop, 20);
    remaining = 1000;
    submit_endless(2, "h");
    uv_timer_t tm;
    uv_timer_init(&loop, &tm);
    uv_timer_start(&tm, on_timer_destroy, 300, 0); /* the thread hung after 20 tokens by then */
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uv_run(&loop, UV_RUN_DEFAULT);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    assert_true(S[0].seen + S[1].seen >= 1 && S[0].seen + S[1].seen <= 21); /* then nothing more */
    assert_true(secs >= 4.5 && secs < 30); /* waited for the thread, then went on */
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- batch gathering (--batch-gather-us) on the engine thread ------------------------------- */

/* Submits S[i]: the completion of `prompt`, greedy, max_tokens tokens, expected stream filled in. */
static void submit_prompt_to(int i, const char *prompt, uint32_t max_tokens, const bt_engine_sink *sk) {
    tseq *t = &S[i];
    memset(t, 0, sizeof *t);
    t->i = i;
    t->k = K_NORMAL;
    t->n_expect = max_tokens;
    expected_stream(t, prompt);
    json_t *body = json_pack("{s:s}", "prompt", prompt);
    bt_engine_request rq = {0};
    rq.request_id = "g";
    rq.api = BT_API_COMPLETION;
    rq.body = body;
    rq.max_tokens = max_tokens;
    char err[128];
    assert_int_equal(bt_engine_submit(E, &rq, sk, t, &t->seq, err, sizeof err), BT_OK);
    json_decref(body);
}

static void submit_prompt(int i, const char *prompt, uint32_t max_tokens) {
    submit_prompt_to(i, prompt, max_tokens, &sink);
}

/* S[i]: "a prompt" (9 tokens) */
static void submit_one(int i, uint32_t max_tokens) { submit_prompt(i, "a prompt", max_tokens); }

#define GATHER_US 300000 /* 300 ms: the burst 30 ms in lands well inside the window, even under TSan */
static uint64_t burst_ns;  /* CLOCK_MONOTONIC just before the last submit of the burst */
static uint64_t cpu0, wall0, cpu_ns, wall_ns; /* process CPU and wall time across a wait */

/* 30 ms into the gather (the engine thread in its timed wait): S[1..5] arrive, S[3] is killed. */
static void on_timer_burst(uv_timer_t *tm) {
    for (int i = 1; i <= 4; i++) submit_one(i, 1);
    burst_ns = mono_ns(CLOCK_MONOTONIC); /* the last arrival (S[5]) is on the thread after this */
    submit_one(5, 1);
    bt_engine_kill(E, S[3].seq);
    S[3].dead = true; /* any callback for it fails the test */
    remaining += 4;
    cpu0 = mono_ns(CLOCK_PROCESS_CPUTIME_ID);
    wall0 = burst_ns;
    uv_close((uv_handle_t *)tm, NULL);
}

/* 200 ms after the burst, still inside the window: how much CPU the process used meanwhile */
static void on_timer_cpu(uv_timer_t *tm) {
    cpu_ns = mono_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu0;
    wall_ns = mono_ns(CLOCK_MONOTONIC) - wall0;
    /* the loop heard of the waiting sequences while the step is held, not at its end (a gather may
     * last 8 s): the last load reported so far shows the five waiting */
    assert_true(loads >= 1);
    assert_int_equal(load_waiting, 5);
    assert_int_equal(S[0].ngot, 0); /* still inside the window */
    uv_close((uv_handle_t *)tm, NULL);
}

/* A burst submitted during the gather of an idle engine is prefilled and answered in one step
 * (max_tokens 1: a sequence is admitted, prefilled and sampled in the step that admits it, so the
 * number of steps is the number of parts the burst was admitted in); a sequence killed during the
 * gather is not in it and hears nothing; the step waits for the window after the last arrival;
 * the waiting sequences are reported (on_load) during the wait, not at its end; and the wait sleeps (a timed wait on the wrong clock would return at once and spin). */
static void test_gather_burst_kill(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    decodes = 0;
    loads = 0;
    load_waiting = 0;
    E = make_engine_cfg(&loop, 0, GATHER_US);
    memset(&last_kvs, 0, sizeof last_kvs);
    remaining = 1;
    submit_one(0, 1);
    uv_timer_t tb, tc;
    uv_timer_init(&loop, &tb);
    uv_timer_init(&loop, &tc);
    uv_timer_start(&tb, on_timer_burst, 30, 0);
    uv_timer_start(&tc, on_timer_cpu, 230, 0);
    uv_run(&loop, UV_RUN_DEFAULT); /* ends when the last end destroyed the engine */
    assert_int_equal(uv_loop_close(&loop), 0);
    assert_int_equal(atomic_load(&on_loop_calls), 0);

    for (int i = 0; i <= 5; i++) {
        tseq *t = &S[i];
        assert_int_equal(t->errors, 0);
        if (i == 3) {
            assert_int_equal(t->ngot + (uint32_t)t->finishes, 0); /* killed: absent */
            continue;
        }
        assert_int_equal(t->finishes, 1);
        assert_int_equal(t->reason, BT_FINISH_LENGTH);
        assert_int_equal(t->ngot, 1);
        assert_int_equal(t->got[0], t->expect[0]);
        /* held until no request had arrived for the window (the arrivals are on the engine
         * thread, after the submits returned) */
        assert_true(t->first_ns >= burst_ns + (uint64_t)GATHER_US * 1000u);
    }
    assert_int_equal(last_kvs.steps, 1);         /* one step held the whole burst */
    assert_int_equal(last_kvs.gathers, 1);       /* one gather */
    assert_int_equal(last_kvs.gathered_seqs, 5); /* the five not killed */
    assert_true(last_kvs.gather_ns >= (uint64_t)GATHER_US * 1000u);
    assert_int_equal(decodes, 5); /* ubatch 1: one prefill decode per sequence, nothing else */
    /* the process slept through the wait (0.0 ms of CPU over 200 ms here): a timed wait whose
     * deadline is read on the wrong clock returns at once and spins (199.7 ms over 199.7 ms, with
     * pthread_condattr_setclock removed from llama.c) */
    assert_true(wall_ns > 0);
    fprintf(stderr, "gather: process CPU %.1f ms over %.1f ms of the wait\n", (double)cpu_ns / 1e6,
            (double)wall_ns / 1e6);
    assert_true(cpu_ns * 4 < wall_ns);
}

static void on_timer_kill0(uv_timer_t *tm) {
    bt_engine_kill(E, S[0].seq);
    S[0].dead = true;
    uv_close((uv_handle_t *)tm, NULL);
}

/* well after the killed gather's bound: the engine is empty, and S[1] starts a gather of its own */
static void on_timer_after(uv_timer_t *tm) {
    bt_engine_load l;
    bt_engine_get_load(E, &l);
    assert_int_equal(l.waiting + l.running, 0);
    assert_int_equal(decodes, 0); /* the killed gather ran no step */
    burst_ns = mono_ns(CLOCK_MONOTONIC);
    submit_one(1, 1);
    uv_close((uv_handle_t *)tm, NULL);
}

#define GATHER_SHORT_US 50000 /* bound 400 ms */

/* The only sequence of a gather killed during it: the gather ends with no step, the engine goes
 * back to its untimed wait, and a request that comes after the dead gather's bound (8 x N after
 * its first arrival) gets a full window of its own (a gather left under way would let it start at
 * once, its bound long past). */
static void test_gather_kill_only(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    decodes = 0;
    E = make_engine_cfg(&loop, 0, GATHER_SHORT_US);
    memset(&last_kvs, 0, sizeof last_kvs);
    remaining = 1; /* S[1] */
    memset(&S[1], 0, sizeof S[1]);
    submit_one(0, 1);
    uv_timer_t tk, ta;
    uv_timer_init(&loop, &tk);
    uv_timer_init(&loop, &ta);
    uv_timer_start(&tk, on_timer_kill0, 10, 0);
    uv_timer_start(&ta, on_timer_after, 10 + 8 * GATHER_SHORT_US / 1000 + 200, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    assert_int_equal(S[0].ngot + (uint32_t)S[0].finishes + (uint32_t)S[0].errors, 0);
    assert_int_equal(S[1].finishes, 1);
    assert_int_equal(S[1].errors, 0);
    assert_int_equal(S[1].got[0], S[1].expect[0]);
    assert_true(S[1].first_ns >= burst_ns + (uint64_t)GATHER_SHORT_US * 1000u);
    assert_int_equal(last_kvs.steps, 1);
    assert_int_equal(last_kvs.gathers, 1); /* the killed gather is not counted */
    assert_int_equal(last_kvs.gathered_seqs, 1);
    assert_int_equal(decodes, 1);
}

static uint64_t destroy_ns;

static void on_timer_destroy_gather(uv_timer_t *tm) {
    /* 200 ms into the 1 s window: no sequence has produced or ended anything (no event of its own
     * to carry the load), yet the loop was told of the four waiting */
    assert_true(loads >= 1);
    assert_int_equal(load_waiting, 4);
    uint64_t t0 = mono_ns(CLOCK_MONOTONIC);
    bt_engine_destroy(E); /* joins the engine thread */
    destroy_ns = mono_ns(CLOCK_MONOTONIC) - t0;
    for (int i = 0; i < 4; i++) S[i].dead = true; /* any callback from here on fails the test */
    uv_close((uv_handle_t *)tm, NULL);
}

/* During a gather with no other event (nothing killed, nothing ended) the loop still hears the
 * load: the four waiting sequences. A destroy during the gather wakes the engine thread out of its
 * timed wait at once: it does not sleep to the deadline (1 s, the largest window), runs no step,
 * and no callback comes. */
static void test_gather_destroy(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    decodes = 0;
    loads = 0;
    load_waiting = 0;
    E = make_engine_cfg(&loop, 0, BT_GATHER_MAX_US);
    remaining = 1000;
    for (int i = 0; i < 4; i++) submit_one(i, 1);
    uv_timer_t tm;
    uv_timer_init(&loop, &tm);
    uv_timer_start(&tm, on_timer_destroy_gather, 200, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    for (int i = 0; i < 4; i++) assert_int_equal(S[i].ngot + (uint32_t)S[i].finishes + (uint32_t)S[i].errors, 0);
    assert_int_equal(decodes, 0);
    fprintf(stderr, "gather: destroy during the wait took %.1f ms\n", (double)destroy_ns / 1e6);
    assert_true(destroy_ns < (uint64_t)BT_GATHER_MAX_US * 1000u / 2); /* woken, not timed out */
}

/* Prefill budget (llama.c step, starve): four prompts of 62 tokens admitted together at
 * --max-num-batched-tokens 16 and --max-num-seqs 4 are prefilled in chunks of 12, one prompt after
 * the other; the three left out wait 5 to 15 steps each. Each is told once that it waits (queued),
 * not once per step, with the load already counting it as waiting; the first is told nothing; every
 * stream is the model's. Submitted one after the other, the three may also queue behind the first
 * on the prompt thread and be told there: that wait goes on through their admission and the steps
 * that leave them out, still one (a wait ended at admission was told twice). (Without the waits told, none was: a frontend's --stream-token-timeout
 * took the three for lost streams, tests/fault/test_llama_prefill_wait.py.) The engine is stalled
 * while they are submitted, so that all four are admitted in one step. */
static void test_prefill_waits(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    E = make_engine(&loop);
    remaining = 4;
    /* the three held prompts are each skipped in steps 1 and 2 and told at step 2: the third decode
     * waits for the three waits to reach the loop, while the engine's state is still that of the
     * waits (one running, three waiting) */
    gate_at = decodes + 3;
    gate_waits = 3;
    atomic_store(&waits_delivered, 0);
    const char *prompt = "a prompt of sixty letters, long enough for five or six chunks";
    bt_llama_inject(E, 2); /* commands are taken in order: no step before the resume below */
    for (int i = 0; i < 4; i++) {
        tseq *t = &S[i];
        memset(t, 0, sizeof *t);
        t->i = i;
        t->k = K_NORMAL;
        t->n_expect = 4;
        expected_stream(t, prompt);
        assert_int_equal(t->prompt_len, 62); /* BOS and one per letter */
        json_t *body = json_pack("{s:s}", "prompt", prompt);
        bt_engine_request rq = {0};
        rq.request_id = "p";
        rq.api = BT_API_COMPLETION;
        rq.body = body;
        rq.max_tokens = t->n_expect;
        char err[128];
        assert_int_equal(bt_engine_submit(E, &rq, &wait_sink, t, &t->seq, err, sizeof err), BT_OK);
        json_decref(body);
    }
    bt_llama_inject(E, 3);
    uv_run(&loop, UV_RUN_DEFAULT); /* ends when the last end destroyed the engine */
    assert_int_equal(uv_loop_close(&loop), 0);
    gate_at = 0;
    for (int i = 0; i < 4; i++) {
        tseq *t = &S[i];
        assert_int_equal(t->errors, 0);
        assert_int_equal(t->finishes, 1);
        assert_int_equal(t->ngot, 4);
        for (uint32_t g = 0; g < t->ngot; g++) assert_int_equal(t->got[g], t->expect[g]);
        assert_int_equal(t->waits, i ? 1 : 0);
        if (i) {
            assert_int_equal(t->wait_reason, BT_ENGINE_WAIT_QUEUED);
            assert_true(t->wait_counted);
        }
    }
    assert_true(last_kvs.steps >= 20); /* the prefills took their turns: 6 chunks each, then decodes */
}

/* ---- the prompt thread ---------------------------------------------------------------------- */

static int prompt_phase;
static uint64_t destroy_ns2;

/* Each tick until the prompt thread is inside S[0]'s tokenization (the gate holds it there). */
static void on_tick_queue(uv_timer_t *tm) {
    bt_engine_load l;
    if (prompt_phase == 0) {
        if (!tok_gate_inside()) return;
        /* S[0] on the prompt thread, S[1..3] queued behind it: four waiting, and the loop heard it */
        bt_engine_get_load(E, &l);
        assert_int_equal(l.waiting, 4);
        assert_int_equal(l.running, 0);
        assert_true(loads >= 1);
        assert_int_equal(load_waiting, 4);
        /* the three queued behind S[0] were told they wait, once, with the load counting them */
        for (int i = 0; i < 4; i++) assert_int_equal(S[i].waits, i ? 1 : 0);
        for (int i = 1; i < 4; i++) {
            assert_int_equal(S[i].wait_reason, BT_ENGINE_WAIT_QUEUED);
            assert_true(S[i].wait_counted);
        }
        bt_engine_stop(E, S[3].seq); /* queued */
        bt_engine_kill(E, S[2].seq); /* queued */
        S[2].dead = true;
        bt_engine_stop(E, S[0].seq); /* being tokenized */
        prompt_phase = 1;
        return;
    }
    if (prompt_phase == 1) {
        if (!(S[0].finishes && S[3].finishes)) return; /* the async wake-up is on its way */
        /* the prompt thread is still inside S[0]'s tokenization: the stops did not wait for it */
        assert_true(tok_gate_inside());
        for (int i = 0; i < 4; i += 3) {
            assert_int_equal(S[i].reason, BT_FINISH_CANCELLED);
            assert_int_equal(S[i].ngot, 0);
            assert_int_equal(S[i].usage.prompt_tokens, 0); /* never tokenized */
            assert_int_equal(S[i].usage.completion_tokens, 0);
        }
        bt_engine_get_load(E, &l);
        assert_int_equal(l.waiting, 1); /* S[1] alone */
        assert_int_equal(load_waiting, 1);
        assert_int_equal(atomic_load(&tok_queued), 0);
        prompt_phase = 2;
        tok_gate_set(false);
        uv_close((uv_handle_t *)tm, NULL);
    }
}

/* The prompt thread held inside one long tokenization (S[0]'s) with three prompts queued behind
 * it: the load counts all four as waiting (and the worker hears it: on_load), and the three queued
 * are told they wait (queued) once each, the load already counting them, S[1] not told again when
 * the engine thread admits it (before, no prompt queued there was told: a frontend's
 * --stream-token-timeout took them for lost streams). A stop of a queued one (S[3]) and of the one
 * being tokenized (S[0]) end them at once with "cancelled" and no prompt tokens, a kill of a queued
 * one (S[2]) at once with no callback, all while the tokenization goes on; the queued two are
 * never tokenized, and the load drops to the one left. Once the tokenization returns, S[1] runs as
 * the model says. Without the withdrawal the stops waited behind S[0]'s tokenization and S[1]'s
 * and S[2]'s, and the load showed nothing waiting. */
static void test_prompt_queue(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    loads = 0;
    load_waiting = 0;
    prompt_phase = 0;
    atomic_store(&tok_queued, 0);
    E = make_engine_with(&loop, 0, 0, &gather_hooks);
    tok_gate_set(true);
    remaining = 3; /* S[0] and S[3] stopped, S[1] finished; the last end destroys the engine */
    submit_prompt_to(0, "slow prompt", 4, &wait_sink);
    submit_prompt_to(1, "queued prompt one", 4, &wait_sink);
    submit_prompt_to(2, "queued prompt two", 4, &wait_sink);
    submit_prompt_to(3, "queued prompt three", 4, &wait_sink);
    uv_timer_t tm;
    uv_timer_init(&loop, &tm);
    uv_timer_start(&tm, on_tick_queue, 5, 5);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    assert_int_equal(prompt_phase, 2);
    assert_int_equal(S[1].errors, 0);
    assert_int_equal(S[1].finishes, 1);
    assert_int_equal(S[1].ngot, 4);
    for (uint32_t g = 0; g < S[1].ngot; g++) assert_int_equal(S[1].got[g], S[1].expect[g]);
    assert_int_equal(S[1].waits, 1); /* not told again by the step that admitted it */
    assert_int_equal(S[2].finishes + S[2].errors, 0);
    assert_int_equal(atomic_load(&tok_queued), 1); /* S[1]'s prompt alone */
    assert_int_equal(atomic_load(&on_loop_calls), 0);
}

static pthread_t gate_opener;
static uint64_t gate_open_ns; /* CLOCK_MONOTONIC when the opener opened the gate */

/* 200 ms after the destroy, the tokenization ends */
static void *open_gate_later(void *arg) {
    (void)arg;
    struct timespec d = {0, 200000000L};
    nanosleep(&d, NULL);
    gate_open_ns = mono_ns(CLOCK_MONOTONIC);
    tok_gate_set(false);
    return NULL;
}

static void on_tick_destroy(uv_timer_t *tm) {
    if (!tok_gate_inside()) return;
    uint64_t t0 = mono_ns(CLOCK_MONOTONIC);
    bt_engine_destroy(E);
    destroy_ns2 = mono_ns(CLOCK_MONOTONIC) - t0;
    S[0].dead = true; /* any callback from here on fails the test */
    assert_int_equal(pthread_create(&gate_opener, NULL, open_gate_later, NULL), 0);
    bt_proc_close_handles(tm->loop); /* as the worker does next: every handle left, the timer too */
}

/* A destroy while the prompt thread is inside a tokenization (seconds for a long prompt) does not
 * wait for it on the loop: destroy returns at once, and the teardown ends once the prompt thread
 * is out of it (200 ms later here). The loop runs until then even when, as the worker does right
 * after destroying its engine, every handle left is closed (bt_proc_close_handles): the process
 * does not exit under a tokenization, and everything is freed (ASan). Joining the prompt thread in
 * destroy blocked the loop for the whole tokenization (here the gate's 5 s). No callback comes. */
static void test_prompt_destroy(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    E = make_engine(&loop);
    tok_gate_set(true);
    remaining = 1000;
    submit_prompt(0, "slow prompt", 4);
    submit_prompt(1, "queued prompt", 4);
    S[1].dead = true; /* destroyed before its turn: no callback */
    uv_timer_t tm;
    uv_timer_init(&loop, &tm);
    uv_timer_start(&tm, on_tick_destroy, 5, 5);
    uint64_t t0 = mono_ns(CLOCK_MONOTONIC);
    uv_run(&loop, UV_RUN_DEFAULT);
    uint64_t end_ns = mono_ns(CLOCK_MONOTONIC), total_ns = end_ns - t0;
    assert_int_equal(pthread_join(gate_opener, NULL), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
    fprintf(stderr, "prompt thread: destroy took %.1f ms, the loop ended after %.1f ms\n", (double)destroy_ns2 / 1e6,
            (double)total_ns / 1e6);
    assert_true(destroy_ns2 < 1000000000ull); /* not the tokenization's 5 s */
    assert_true(end_ns >= gate_open_ns);      /* the loop lasted until the tokenization ended */
    assert_true(total_ns < 4000000000ull);    /* and no longer: the gate opened, not timed out */
    assert_int_equal(S[0].ngot + (uint32_t)S[0].finishes + (uint32_t)S[0].errors, 0);
    assert_int_equal(S[1].ngot + (uint32_t)S[1].finishes + (uint32_t)S[1].errors, 0);
    tok_gate_set(false);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sequences),
        cmocka_unit_test(test_eos_and_context_cap),
        cmocka_unit_test(test_kv_layout),
        cmocka_unit_test(test_destroy_live),
        cmocka_unit_test(test_prefill_waits),
        cmocka_unit_test(test_continue_final),
        cmocka_unit_test(test_gather_burst_kill),
        cmocka_unit_test(test_gather_kill_only),
        cmocka_unit_test(test_gather_destroy),
        cmocka_unit_test(test_prompt_queue),
        cmocka_unit_test(test_prompt_destroy),
        cmocka_unit_test(test_destroy_hung), /* last: it leaves a hung engine thread behind */
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#else

int main(void) {
    fprintf(stderr, "skipped: built without llama.cpp's headers (run scripts/setup)\n");
    return 77;
}

#endif
