/* llama.c — the llama engine (llama.h): loop-side handles, the engine thread, the scheduler.
 *
 * Threads and ownership. The loop side owns the bt_engine_seq handles (what the worker holds);
 * the engine thread owns the ll_seq state (tokens, KV slot, text filter) and everything of
 * llama.cpp. They meet only in two queues under one mutex: commands (loop → thread: submit,
 * stop, kill, quit; a condition variable wakes the thread) and events (thread → loop: tokens,
 * end, dead; uv_async_send wakes the loop). On the loop side the shared delivery module
 * (engine/deliver.h) owns the sinks and the handles' liveness: the async callback stages each
 * event's output and ending there and drains it, so sinks are called only from that callback and
 * the re-entrancy rules (a sink may kill, stop, submit or destroy) are the module's. Every handle
 * gets exactly one END event; a handle's memory goes once both the module has released it
 * (ops.free_seq) and its END has been taken off the queue (or the thread was joined), since the
 * thread may name a killed handle until then. A kill of a sequence that already ended is ignored
 * by the thread (its END is on its way), and commands are processed in order, so a handle
 * address is never confused with a later one. KV edits (llama_memory_seq_rm) happen only on the
 * engine thread, between decodes.
 *
 * A third thread, the prompt thread, renders and tokenizes each new sequence's prompt before the
 * engine thread sees it: llama_tokenize takes about half a second per megabyte, and on the engine
 * thread that is a pause of every running stream. A SUBMIT goes to the prompt queue (under the
 * same mutex) and on to the commands once its tokens are ready (bt_engine_seq.prepped). A stop,
 * kill or hand-off of a handle whose SUBMIT has not gone on yet withdraws it instead (ll_withdraw):
 * the SUBMIT leaves the queue, or the prompt thread drops the one it holds, and the ending (if
 * any) is delivered from the loop at once, not after every prompt queued ahead of it. So only
 * SUBMITs are in the prompt queue, and a handle's commands reach the engine thread after its
 * SUBMIT. Queued prompts count as waiting sequences in the load (ll_get_load). The prompt thread
 * reads only what is fixed at creation (vocabulary, chat template, context cap) and the sequence
 * it holds; at destroy the loop does not wait for the prompt it is tokenizing (ll_destroy_now). */
#include "engine/llama/llama.h"

#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/jstr.h"
#include "common/log.h"
#include "common/paths.h"
#include "common/util.h"
#include "engine/deliver.h"
#include "engine/llama/llama_internal.h"
#include "engine/llama/llama_kv.h"
#include "engine/llama/llama_lib.h"
#include "engine/llama/llama_sample.h"
#include "engine/llama/llama_text.h"
#include "engine/params.h"

#ifndef BATON_MODELS_DIR
#define BATON_MODELS_DIR "models"
#endif

#define LL_BLOCK 16        /* KV cells per reported block */
#define LL_MAX_SEQS 256    /* llama.cpp's sequence limit (LLAMA_MAX_SEQ) */
#define LL_AUTO_CTX 65536u /* --ctx-size 0: at most this many cells (40 MiB for stories260K) */
#define LL_KV_PAD 256u     /* llama.cpp's KV granularity: a KV stream holds a multiple of this many cells */

/* The KV cells the context holds and each sequence's share of them. llama.cpp (llama_context's
 * constructor, in the version baton loads) rounds the cells asked for UP to a multiple of 256 and,
 * with one KV stream per sequence (not kv_unified), rounds every stream UP to a multiple of 256 as
 * well and allocates n_seq_max such streams: --ctx-size 1024 for 16 sequences became 4,096 cells,
 * the automatic 65,536 for 255 sequences 130,560. So the layout is decided here, rounding DOWN, and
 * handed over already whole (n_seq_max x a multiple of 256, or a multiple of 256 when unified), a
 * size llama.cpp keeps as it is: the memory is what the flags allow, never more. */
typedef struct {
    uint32_t n_ctx;     /* KV cells in all */
    uint32_t n_ctx_seq; /* cells one sequence may fill: its stream, or the whole pool when unified */
} ll_kv_layout;

/* At most `cells` cells in all for n_seq sequences; false when not even 256 per stream fit. */
static bool ll_kv_layout_of(uint64_t cells, uint32_t n_seq, bool unified, ll_kv_layout *out) {
    uint64_t per = unified ? cells : cells / n_seq;
    per -= per % LL_KV_PAD;
    if (per == 0) return false;
    out->n_ctx_seq = (uint32_t)per;
    out->n_ctx = (uint32_t)(unified ? per : per * n_seq);
    return true;
}

void bt_llama_config_default(bt_llama_config *c) {
    memset(c, 0, sizeof *c);
    c->max_num_seqs = 16;
    c->max_num_batched_tokens = 512;
    c->threads = 1;
    c->ubatch = 1;
    c->default_max_tokens = 256;
}

bt_status bt_llama_config_check(const bt_llama_config *c, char *err, size_t errlen) {
    if (c->max_num_seqs < 1 || c->max_num_seqs > LL_MAX_SEQS)
        return snprintf(err, errlen, "--max-num-seqs must be 1..%d for the llama engine", LL_MAX_SEQS),
               BT_ERR_INVALID;
    if (c->max_num_batched_tokens <= c->max_num_seqs)
        return snprintf(err, errlen, "--max-num-batched-tokens (%lld) must be more than --max-num-seqs (%lld)",
                        (long long)c->max_num_batched_tokens, (long long)c->max_num_seqs),
               BT_ERR_INVALID;
    if (c->ctx_size < 0 || c->ctx_size > (1 << 24))
        return snprintf(err, errlen, "--ctx-size must be 0 (auto) .. 16777216"), BT_ERR_INVALID;
    /* llama.cpp cuts its batch to the cells asked for (n_batch = min(n_ctx, n_batch)) and asserts,
     * aborting the process, on a decode larger than that (a step's batch of up to
     * --max-num-batched-tokens) or, creating the context, when it cannot hold one output per
     * sequence (fewer cells than --max-num-seqs) */
    if (c->ctx_size > 0 && c->ctx_size < c->max_num_batched_tokens)
        return snprintf(err, errlen,
                        "--ctx-size (%lld) must be 0 (auto) or at least --max-num-batched-tokens (%lld): a step "
                        "decodes up to that many tokens at once",
                        (long long)c->ctx_size, (long long)c->max_num_batched_tokens),
               BT_ERR_INVALID;
    /* what llama.cpp would make of it (ll_kv_layout): a stream of 256 cells per sequence at least */
    ll_kv_layout kv = {0, 0};
    if (c->ctx_size > 0 && !ll_kv_layout_of((uint64_t)c->ctx_size, (uint32_t)c->max_num_seqs, c->kv_unified, &kv)) {
        if (c->kv_unified)
            return snprintf(err, errlen,
                            "--ctx-size (%lld) must be 0 (auto) or at least %u: llama.cpp allocates KV cells in "
                            "multiples of %u",
                            (long long)c->ctx_size, LL_KV_PAD, LL_KV_PAD),
                   BT_ERR_INVALID;
        return snprintf(err, errlen,
                        "--ctx-size (%lld) is too small for --max-num-seqs (%lld): llama.cpp gives each sequence its "
                        "own multiple of %u KV cells, so at least %lld (or fewer sequences, or --kv-unified)",
                        (long long)c->ctx_size, (long long)c->max_num_seqs, LL_KV_PAD,
                        (long long)c->max_num_seqs * LL_KV_PAD),
               BT_ERR_INVALID;
    }
    if (c->ctx_size > 0 && kv.n_ctx < c->max_num_batched_tokens)
        return snprintf(err, errlen,
                        "--ctx-size (%lld) holds %u KV cells once rounded down to %s of %u cells, fewer than "
                        "--max-num-batched-tokens (%lld)",
                        (long long)c->ctx_size, kv.n_ctx, c->kv_unified ? "a multiple" : "a stream per sequence",
                        LL_KV_PAD, (long long)c->max_num_batched_tokens),
               BT_ERR_INVALID;
    if (c->threads < 1 || c->threads > 256)
        return snprintf(err, errlen, "--llama-threads must be 1..256"), BT_ERR_INVALID;
    if (c->batch_gather_us < 0 || c->batch_gather_us > BT_GATHER_MAX_US)
        return snprintf(err, errlen, "--batch-gather-us must be 0 (off) .. %d", BT_GATHER_MAX_US), BT_ERR_INVALID;
    return BT_OK;
}

const char *bt_llama_default_model(void) {
    static char path[4200];
    char self[4000], dir[4096];
    /* installed: <prefix>/share/baton/models; from a build tree: <source>/models (paths.h) */
    if (bt_paths_self(self, sizeof self) && bt_paths_data_dir(self, "models", "models", dir, sizeof dir)) {
        snprintf(path, sizeof path, "%s/stories260K.gguf", dir);
        if (access(path, R_OK) == 0) return path;
    }
    snprintf(path, sizeof path, "%s/stories260K.gguf", BATON_MODELS_DIR);
    return path;
}

#ifndef BATON_HAVE_LLAMA

/* no llama engine can exist in this build */
void bt_llama_inject(bt_engine *e, int fault) { (void)e, (void)fault; }

bt_engine *bt_llama_create(uv_loop_t *loop, const bt_llama_config *cfg, const bt_engine_hooks *hooks, void *hooks_ud,
                           char *err, size_t errlen) {
    (void)loop, (void)cfg, (void)hooks, (void)hooks_ud;
    snprintf(err, errlen,
             "this baton was built without llama.cpp's headers: run scripts/setup (it fetches llama.cpp into "
             "~/.cache/baton) and rebuild");
    return NULL;
}

bool bt_llama_model_loads(const bt_llama_config *cfg, char *err, size_t errlen) {
    (void)cfg, (void)err, (void)errlen;
    return true;
}

#else

#include <pthread.h>

bool bt_llama_model_loads(const bt_llama_config *cfg, char *err, size_t errlen) {
    char why[512];
    const bt_llama_api *L = bt_llama_lib_open(cfg->lib_dir, why, sizeof why);
    if (!L) return true;
    const char *path = cfg->model_path && cfg->model_path[0] ? cfg->model_path : bt_llama_default_model();
    /* vocab_only: llama.cpp still reads every tensor's description and checks that its data lies
     * within the file, but maps and reads no weights */
    struct llama_model_params mp = L->llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.vocab_only = true;
    struct llama_model *m = L->llama_model_load_from_file(path, mp);
    if (!m) return snprintf(err, errlen, "llama.cpp cannot load the model %s (cut short, or not a model it reads)", path), false;
    L->llama_model_free(m);
    return true;
}

/* --ctx-size 0: the model's trained context for every sequence, at most LL_AUTO_CTX cells in all
 * (a multiple of 256 x LL_MAX_SEQS, so that every sequence count gets its 256 cells at least). */
static ll_kv_layout ll_kv_layout_auto(uint32_t n_ctx_train, uint32_t n_seq, bool unified) {
    uint64_t per = n_ctx_train ? n_ctx_train : LL_AUTO_CTX;
    per = (per + LL_KV_PAD - 1) / LL_KV_PAD * LL_KV_PAD;
    uint64_t cells = per * n_seq;
    if (cells > LL_AUTO_CTX) cells = LL_AUTO_CTX;
    ll_kv_layout l = {0, 0};
    ll_kv_layout_of(cells, n_seq, unified, &l);
    return l;
}

/* ---- messages ------------------------------------------------------------------------------- */

typedef enum { CMD_SUBMIT, CMD_STOP, CMD_KILL, CMD_DIE, CMD_STALL, CMD_RESUME, CMD_HANDOFF } ll_cmd_kind;
typedef enum { EV_TOKENS, EV_END, EV_DEAD, EV_HANDOFF, EV_WAIT } ll_ev_kind;
typedef enum { END_FINISH, END_ERROR, END_KILLED } ll_end_kind;

typedef struct ll_seq ll_seq;

typedef struct ll_cmd {
    STAILQ_ENTRY(ll_cmd) link; /* ll_engine.cmds */
    ll_cmd_kind kind;
    bt_engine_seq *h;
    ll_seq *seq; /* CMD_SUBMIT: the prepared state, handed to the thread */
    bt_engine_handoff_cb hcb; /* CMD_HANDOFF */
    void *hud;
} ll_cmd;

typedef struct ll_ev {
    STAILQ_ENTRY(ll_ev) link; /* ll_engine.evs */
    ll_ev_kind kind;
    bt_engine_seq *h;
    uint32_t *ids;
    size_t n;
    char *text;
    size_t text_len;
    ll_end_kind end;
    bt_finish_reason reason;
    bt_engine_wait wait; /* EV_WAIT: why the sequence waits */
    bt_usage usage;
    bt_status code;
    char msg[320];            /* room for OpenAI's context-length message with large counts */
    bt_engine_handoff_cb hcb; /* EV_HANDOFF: the exported state (NULL: none) goes to hcb */
    void *hud;
    uint8_t *state;
    size_t state_len;
} ll_ev;

typedef struct ll_engine ll_engine;

STAILQ_HEAD(ll_cmd_q, ll_cmd);

#define LL_TEXT_CAP ((size_t)1 << 30) /* hard cap on a sequence's staged text */
#define LL_JOIN_WAIT_S 5 /* seconds the engine thread has to stop at destroy before it counts as hung */

/* Loop-side handle. */
struct bt_engine_seq {
    bt_deliver_seq ds; /* sink and liveness (deliver.h) */
    bool stop_sent;
    bool released;      /* the delivery module let go of it (ops.free_seq) */
    bool thread_done;   /* its END event was taken off the queue, or it never reached the engine
                         * thread (withdrawn): no thread names it any more */
    bool prepped;       /* under mu: its SUBMIT left the prompt queue for the commands */
    bool withdrawn;     /* its SUBMIT was withdrawn before it was prepped (ll_withdraw) */
    uint32_t n_carried; /* the request's carried tokens: the usage of a withdrawn sequence's stop */
};

/* Engine-thread state of one sequence. */
typedef enum { LS_WAITING, LS_RUNNING } ll_state;
struct ll_seq {
    TAILQ_ENTRY(ll_seq) link; /* ll_engine.waiting or .running */
    bt_engine_seq *h;
    ll_state state;
    int slot;          /* llama seq_id while running, -1 otherwise */
    uint64_t admitted; /* admission order, for preemption (latest first) */
    int32_t priority;  /* lower is admitted sooner (engine.h) */
    bool prio_held;    /* preempted for priority and no token since: not preempted for priority again */
    /* held without being computed, and its wait was told (an EV_WAIT posted, or staged at submit
     * for a prompt queued behind another, send_submit): in the prompt queue, in the waiting queue,
     * or admitted but left out of the steps for want of budget; cleared by the step that computes
     * it (starve_end), and counted as waiting in the load until then (update_load, ll_get_load) */
    bool wait_told;
    uint32_t starved; /* running: consecutive steps that left it out for want of budget (step) */
    /* body, rendered on the thread */
    bt_api api;
    json_t *body;
    /* tokens: prompt, then carried, then generated; n_past of them are in the KV cache */
    llama_token *tok;
    size_t n_tok, cap_tok;
    size_t n_prompt;
    uint32_t n_carried, n_gen, max_new;
    bool max_asked; /* the client's body sets max_tokens (or max_completion_tokens) */
    size_t n_past;
    bt_llsample_params sp;
    bt_lltext text;
    llama_token *car; /* the carried ids until the thread puts them behind the prompt */
    bt_llsample_bias *bias; /* sp.bias: the request's logit_bias, NULL when none */
    bt_gen_params gp;       /* min_p, repetition_penalty, ignore_eos, min_tokens, continue_final_message */
    uint8_t *kv;      /* a KV state to import when admitted (llama_kv.h), NULL when none */
    size_t kv_len;
    char rid[80];     /* the request id, for the log */
    /* the prompt thread's outcome: tokens in tok (n_tok), or why not (seq_arrive ends it) */
    bt_status prompt_st;
    char prompt_err[320];
};

typedef struct {
    TAILQ_HEAD(, ll_seq) q;
    size_t n;
} ll_list;

struct ll_engine {
    bt_engine base;
    uv_loop_t *loop;
    uv_async_t async;
    bt_engine_hooks hooks;
    void *hooks_ud;
    bt_llama_config cfg;
    const bt_llama_api *L;

    /* shared, under mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct ll_cmd_q cmds;
    STAILQ_HEAD(, ll_ev) evs;
    struct ll_cmd_q prompts; /* SUBMITs for the prompt thread */
    pthread_cond_t prompt_cv;
    /* the SUBMIT whose prompt the prompt thread is preparing (NULL: none); its h is set to NULL
     * when it is withdrawn meanwhile, and the prompt thread then drops it */
    ll_cmd *prompt_cur;
    /* SUBMITs that the published load does not count yet: in the prompt queue, on the prompt
     * thread, or in the commands and not yet in a load the engine thread published (ll_get_load
     * adds them to the waiting ones) */
    uint64_t n_prompts;
    bool prompt_quit;
    bool quit;
    /* no more wake-ups: the loop gave up waiting for the engine thread, or closed the async handle
     * before the prompt thread's join (ll_destroy_now) */
    bool abandoned;
    bt_engine_load load;
    bool load_changed;

    pthread_t thread;
    bool thread_started;
    pthread_t prompt_thread;
    bool prompt_started;

    /* loop side */
    bt_deliver dl;
    bool destroyed;
    /* a destroy during a tokenization (ll_destroy_now): the prompt thread is joined on the thread
     * pool (join_req), and the teardown ends once that and the async handle's close are done */
    uv_work_t join_req;
    int teardown_parts;
    bool prompt_joined;

    /* engine thread only */
    uint64_t n_arrived; /* SUBMITs run since the load was last published (update_load) */
    struct llama_model *model;
    struct llama_context *ctx;
    const struct llama_vocab *vocab;
    char *chat_template; /* the model's, NULL when it has none */
    uint32_t n_ctx, n_ctx_train, n_batch, n_vocab;
    uint32_t n_cap; /* tokens one sequence may hold (prompt + carried + generated) */
    uint32_t max_piece; /* bytes of the longest vocabulary entry (special tokens' text included) */
    struct llama_batch batch;
    bool batch_ok;
    bool slots[LL_MAX_SEQS];
    ll_list waiting, running;
    uint64_t admit_counter;
    uint64_t total_emitted;
    bool dead;
    bool stalled; /* fault injection: no steps until resumed */
    bt_engine_gather gather; /* --batch-gather-us: the first step of an idle engine waits (engine.h) */
    bt_llsample_scratch *sample; /* the engine thread's, for every draw */
    int32_t *eog;                /* the vocabulary's end-of-generation ids, excluded before min_tokens */
    size_t n_eog;
    char model_desc[128];
    ll_kv_ident kv_ident;     /* what a KV state must match to be imported here */
    bt_engine_kv_stats kvs;   /* under mu */
    char exactness[256]; /* the fingerprint (llama.h), fixed at creation; read by ll_card */
};

/* ---- lists ---------------------------------------------------------------------------------- */

static void list_push_back(ll_list *l, ll_seq *s) {
    TAILQ_INSERT_TAIL(&l->q, s, link);
    l->n++;
}

/* Into the waiting queue in (priority, arrival) order: after every waiting sequence of s's
 * priority or a more urgent one (a new arrival), or before every one of its priority (a preempted
 * sequence, which arrived before them). */
static void list_insert_waiting(ll_list *l, ll_seq *s, bool preempted) {
    ll_seq *at = TAILQ_FIRST(&l->q);
    while (at && (preempted ? at->priority < s->priority : at->priority <= s->priority)) at = TAILQ_NEXT(at, link);
    if (at) TAILQ_INSERT_BEFORE(at, s, link);
    else TAILQ_INSERT_TAIL(&l->q, s, link);
    l->n++;
}

static void list_remove(ll_list *l, ll_seq *s) {
    TAILQ_REMOVE(&l->q, s, link);
    l->n--;
}

/* ---- thread → loop -------------------------------------------------------------------------- */

/* The wake-up is sent under mu: once ll_destroy_now has set `abandoned` (under mu), no thread
 * touches the async handle any more. */
static void post(ll_engine *e, ll_ev *ev) {
    pthread_mutex_lock(&e->mu);
    STAILQ_INSERT_TAIL(&e->evs, ev, link);
    if (!e->abandoned) uv_async_send(&e->async);
    pthread_mutex_unlock(&e->mu);
}

static void seq_free(ll_seq *s) {
    if (!s) return;
    json_decref(s->body);
    free(s->tok);
    free(s->car);
    free(s->bias);
    free(s->kv);
    bt_lltext_free(&s->text);
    free(s);
}

/* Drops a sequence's KV cells and slot (engine thread). */
static void seq_release_kv(ll_engine *e, ll_seq *s) {
    if (s->slot >= 0) {
        e->L->llama_memory_seq_rm(e->L->llama_get_memory(e->ctx), s->slot, -1, -1);
        e->slots[s->slot] = false;
        s->slot = -1;
    }
    s->n_past = 0;
}

/* Posts the released output of s (if any) as one EV_TOKENS. */
static bool post_tokens(ll_engine *e, ll_seq *s) {
    bt_lltext *t = &s->text;
    if (!t->out_n) return true;
    ll_ev *ev = calloc(1, sizeof *ev);
    if (!ev) return false;
    ev->kind = EV_TOKENS;
    ev->h = s->h;
    ev->n = t->out_n;
    ev->ids = t->out;
    ev->text = bt_buf_steal(&t->out_text, &ev->text_len);
    t->out = NULL;
    t->out_n = t->out_cap = 0;
    post(e, ev);
    return true;
}

static void update_load(ll_engine *e);

/* Tells the loop that s waits (bt_engine_sink.on_wait): posted after its output so far. The load
 * snapshot the loop reads is refreshed first, so that it counts s as waiting before the loop can
 * write the WAITING: a frontend takes a LOAD written after a stream's WAITING that shows nothing
 * waiting as the end of the wait (docs/protocol.md §4), and the snapshot of the step before would
 * show that while s waits. */
static void post_wait(ll_engine *e, ll_seq *s, bt_engine_wait why) {
    s->wait_told = true;
    update_load(e);
    ll_ev *ev = calloc(1, sizeof *ev);
    if (!ev) return; /* its stream is judged as a silent one: no worse than an engine that tells nothing */
    ev->kind = EV_WAIT;
    ev->h = s->h;
    ev->wait = why;
    post(e, ev);
}

/* Ends a sequence: its output so far, then END; frees its state (engine thread). */
static void seq_end(ll_engine *e, ll_seq *s, ll_end_kind kind, bt_finish_reason reason, bt_status code,
                    const char *msg) {
    if (kind == END_FINISH) post_tokens(e, s);
    ll_ev *ev = calloc(1, sizeof *ev);
    if (ev) {
        ev->kind = EV_END;
        ev->h = s->h;
        ev->end = kind;
        ev->reason = reason;
        ev->code = code;
        ev->usage.prompt_tokens = (uint32_t)s->n_prompt;
        ev->usage.completion_tokens = s->n_carried + s->n_gen;
        snprintf(ev->msg, sizeof ev->msg, "%s", msg ? msg : "");
    }
    seq_release_kv(e, s);
    list_remove(s->state == LS_RUNNING ? &e->running : &e->waiting, s);
    seq_free(s);
    if (ev) post(e, ev);
    else BT_ERROR("llama engine: out of memory posting a sequence end");
}

static void engine_die(ll_engine *e, const char *why) {
    if (e->dead) return;
    e->dead = true;
    BT_ERROR("llama engine failed: %s", why);
    ll_ev *ev = calloc(1, sizeof *ev);
    if (ev) {
        ev->kind = EV_DEAD;
        snprintf(ev->msg, sizeof ev->msg, "%s", why);
        post(e, ev);
    }
}

/* ---- prompt rendering (engine thread) ------------------------------------------------------- */

static bt_status tok_reserve(ll_seq *s, size_t need) {
    if (need <= s->cap_tok) return BT_OK;
    size_t n = s->cap_tok ? s->cap_tok : 64;
    while (n < need) n *= 2;
    llama_token *p = realloc(s->tok, n * sizeof *p);
    if (!p) return BT_ERR_NOMEM;
    s->tok = p;
    s->cap_tok = n;
    return BT_OK;
}

static bt_status tokenize_append(ll_engine *e, ll_seq *s, const char *text, size_t len, bool special) {
    if (len > INT32_MAX / 2) return BT_ERR_TOO_LARGE;
    size_t room = len + 8;
    if (tok_reserve(s, s->n_tok + room) != BT_OK) return BT_ERR_NOMEM;
    int32_t n = e->L->llama_tokenize(e->vocab, text, (int32_t)len, s->tok + s->n_tok, (int32_t)room, true, special);
    if (n < 0) return BT_ERR_INVALID;
    s->n_tok += (size_t)n;
    return BT_OK;
}

/* No token covers more bytes of the text than the longest vocabulary entry, so a prompt longer
 * than n_cap such entries holds more than n_cap tokens: refused as the context check below would,
 * without tokenizing it (megabytes take llama_tokenize seconds, on the thread every stream steps
 * on). Runs before each tokenization of a prompt; false with the 400's message. */
static bool prompt_may_fit(const ll_engine *e, const ll_seq *s, size_t len, char *err, size_t errlen) {
    if (!e->max_piece || (uint64_t)len <= (uint64_t)e->n_cap * e->max_piece) return true;
    /* in OpenAI's words (clients match them), with the least number of tokens the text can be */
    const char *what = s->api == BT_API_CHAT ? "messages" : "prompt";
    uint64_t least = ((uint64_t)len + e->max_piece - 1) / e->max_piece, want = s->max_asked ? s->max_new : 1;
    snprintf(err, errlen,
             "This model's maximum context length is %u tokens. However, you requested %llu tokens or more (%llu or "
             "more in the %s, %llu in the completion): %zu bytes hold at least %llu tokens, none longer than %u "
             "bytes. Please reduce the length of the %s.",
             e->n_cap, (unsigned long long)(least + want), (unsigned long long)least, what, (unsigned long long)want,
             len, (unsigned long long)least, e->max_piece, what);
    return false;
}

/* Content of a chat message: a string, or the words of an array of parts (bt_jstr_part_text: text
 * and refusal parts). */
static bt_status message_text(json_t *content, bt_buf *out) {
    if (json_is_string(content)) return bt_buf_append(out, json_string_value(content), json_string_length(content));
    if (json_is_array(content)) {
        size_t i;
        json_t *part;
        json_array_foreach(content, i, part) {
            const json_t *t = bt_jstr_part_text(part);
            if (t) {
                bt_status st = bt_buf_append(out, json_string_value(t), json_string_length(t));
                if (st != BT_OK) return st;
            }
        }
    }
    return BT_OK;
}

/* The chat rendered with the model's template into out (emptied first): false when it is not,
 * out then holding no text and, when the buffer could not grow, its error. */
static bool apply_template(ll_engine *e, const struct llama_chat_message *cm, size_t n, bool add_ass, bt_buf *out) {
    bt_buf_reset(out);
    int32_t need = e->L->llama_chat_apply_template(e->chat_template, cm, n, add_ass, NULL, 0);
    if (need < 0 || bt_buf_reserve(out, (size_t)need + 1) != BT_OK) return false;
    if (e->L->llama_chat_apply_template(e->chat_template, cm, n, add_ass, out->data, need + 1) != need) return false;
    out->len = (size_t)need;
    return true;
}

/* Stands for the final message's content in a second rendering: text none of llama.cpp's
 * built-in templates writes (control characters), with no blank at either end that a trimming
 * template would drop, so that where it appears is where the template writes the content. */
#define FINAL_MARK "\001baton-final-message\002"

/* What llama.cpp's templates trim off a message's content: isspace() of the C locale, written out
 * so that no locale of the process changes where a final message is cut */
static bool trimmed_blank(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/* continue_final_message under the model's template: the length of the prompt cut right after the
 * final message's content, or 0 when that place is not known. The content cannot be looked for
 * in the rendering itself: the end of turn and the final message's own header hold short text
 * too ("<" and "|" in "<|im_end|>", "\n" and "assistant" before ChatML's content), so that a last
 * or a first occurrence lands in a marker, a prompt no error shows. The chat is rendered once
 * more with FINAL_MARK as the final content: the template writes everything before that mark
 * (the earlier messages, the header) and after it (the end of turn) for any content, so the
 * rendering with the real content must be exactly that text with the content where the mark
 * was, and the cut goes right after it. What the template wrote there must be the content as sent
 * or, for a template that trims it (llama.cpp's Llama 3, Gemma, Command R: white space at both
 * ends dropped, as their Jinja's `| trim`), the content trimmed, not empty: the cut then goes
 * after the text as written, where vLLM (Hugging Face's continue_final_message) cuts such a
 * rendering, so that a final message ending in a blank ("The answer is ") continues there rather
 * than being refused. A template that rewrites the content fails the comparison. */
static size_t final_content_end(ll_engine *e, struct llama_chat_message *cm, size_t n, const bt_buf *full,
                                const bt_buf *last, bt_status *st) {
    size_t cl = last->len - 1, ml = sizeof FINAL_MARK - 1, cut = 0;
    /* the content trimmed as llama.cpp's trim() does it: isspace() of the C locale, both ends */
    size_t lead = 0, tl = cl;
    while (lead < tl && trimmed_blank(last->data[lead])) lead++;
    while (tl > lead && trimmed_blank(last->data[tl - 1])) tl--;
    tl -= lead;
    const char *content = cm[n - 1].content;
    bt_buf marked;
    bt_buf_init(&marked, (size_t)64 << 20);
    cm[n - 1].content = FINAL_MARK;
    bool ok = apply_template(e, cm, n, false, &marked);
    cm[n - 1].content = content;
    if (!ok) {
        *st = bt_buf_status(&marked);
        goto out;
    }
    /* the last mark: the earlier messages come before the final one and may hold its text */
    const char *at = NULL;
    for (const char *p = marked.data; (p = memmem(p, marked.len - (size_t)(p - marked.data), FINAL_MARK, ml)); p++)
        at = p;
    if (!at) goto out;
    size_t before = (size_t)(at - marked.data), after = marked.len - before - ml;
    if (full->len < before + after || memcmp(full->data, marked.data, before) ||
        memcmp(full->data + full->len - after, at + ml, after))
        goto out;
    size_t wl = full->len - before - after; /* what the template wrote for the content */
    const char *w = full->data + before;
    if ((wl == cl && cl && !memcmp(w, last->data, cl)) || (wl == tl && tl && !memcmp(w, last->data + lead, tl)))
        cut = before + wl;
out:
    bt_buf_free(&marked);
    return cut;
}

/* The prompt tokens of a chat: the model's template through llama_chat_apply_template when it
 * has one llama.cpp knows, else the plain template "role: content\n" per message + "assistant:".
 * continue_final_message (the final message is an assistant's, engine/params.c) leaves that
 * message open: the plain template ends with its content; the model's is rendered without the
 * assistant's turn to come (add_ass false) and cut right after the final content, where the
 * template writes it (final_content_end), dropping the end of turn it writes behind it, as vLLM
 * does. A template that does not write that content as sent (it trims or rewrites it), or an
 * empty one, cannot be cut there: refused rather than continued from some other text. */
static bt_status render_chat(ll_engine *e, ll_seq *s, char *err, size_t errlen) {
    json_t *msgs = json_object_get(s->body, "messages");
    size_t n = json_array_size(msgs);
    bt_status st = BT_OK;
    bt_buf *texts = calloc(n ? n : 1, sizeof *texts);
    struct llama_chat_message *cm = calloc(n ? n : 1, sizeof *cm);
    bt_buf prompt;
    bt_buf_init(&prompt, (size_t)64 << 20);
    if (!texts || !cm) {
        st = BT_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(msgs, i);
        bt_buf_init(&texts[i], (size_t)64 << 20);
        if ((st = message_text(json_object_get(m, "content"), &texts[i])) != BT_OK) goto out;
        if ((st = bt_buf_append(&texts[i], "", 1)) != BT_OK) goto out; /* NUL-terminated */
        const char *role = json_string_value(json_object_get(m, "role"));
        cm[i].role = role ? role : "user";
        cm[i].content = texts[i].data;
    }
    /* Content keeps U+0000 (the frontend accepts it in free text). llama_chat_apply_template
     * reads C strings and would cut a message there, so the model's template refuses it rather
     * than answer a prompt the client did not send; the plain template writes it whole. */
    for (size_t i = 0; e->chat_template && i < n; i++) {
        if (memchr(texts[i].data, '\0', texts[i].len - 1)) {
            snprintf(err, errlen,
                     "messages[%zu].content holds U+0000, which this model's chat template cannot carry", i);
            st = BT_ERR_INVALID_PROMPT;
            goto out;
        }
    }
    bool special = false, open_last = s->gp.continue_final && n > 0;
    if (e->chat_template && !(special = apply_template(e, cm, n, !open_last, &prompt)) &&
        (st = bt_buf_status(&prompt)) != BT_OK)
        goto out;
    if (special && open_last) {
        size_t cut = final_content_end(e, cm, n, &prompt, &texts[n - 1], &st);
        if (st != BT_OK) goto out;
        if (!cut) {
            snprintf(err, errlen,
                     "'continue_final_message': this model's chat template writes nothing of the final message, "
                     "or rewrites it, so it cannot be continued");
            st = BT_ERR_INVALID_PARAM;
            goto out;
        }
        prompt.len = cut;
    }
    if (!special) { /* no template llama.cpp knows: the plain one, content by its length */
        for (size_t i = 0; i < n && st == BT_OK; i++) {
            st = bt_buf_appendf(&prompt, "%s: ", cm[i].role);
            if (st == BT_OK) st = bt_buf_append(&prompt, texts[i].data, texts[i].len - 1);
            if (st == BT_OK && !(open_last && i + 1 == n)) st = bt_buf_append(&prompt, "\n", 1);
        }
        if (st == BT_OK && !open_last) st = bt_buf_append_str(&prompt, "assistant:");
        if (st != BT_OK) goto out;
    }
    if (!prompt_may_fit(e, s, prompt.len, err, errlen)) {
        st = BT_ERR_CONTEXT_LENGTH;
        goto out;
    }
    st = tokenize_append(e, s, prompt.data ? prompt.data : "", prompt.len, special);
    if (st != BT_OK) snprintf(err, errlen, "cannot tokenize the chat prompt");
out:
    if (texts)
        for (size_t i = 0; i < n; i++) bt_buf_free(&texts[i]);
    free(texts);
    free(cm);
    bt_buf_free(&prompt);
    if (st == BT_ERR_NOMEM) snprintf(err, errlen, "out of memory");
    return st;
}

static bt_status render_prompt(ll_engine *e, ll_seq *s, char *err, size_t errlen) {
    if (s->api == BT_API_CHAT) return render_chat(e, s, err, errlen);
    json_t *p = json_object_get(s->body, "prompt");
    if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0))) p = json_array_get(p, 0);
    if (json_is_string(p)) {
        if (!prompt_may_fit(e, s, json_string_length(p), err, errlen)) return BT_ERR_CONTEXT_LENGTH;
        bt_status st = tokenize_append(e, s, json_string_value(p), json_string_length(p), false);
        if (st != BT_OK) snprintf(err, errlen, "cannot tokenize the prompt");
        return st;
    }
    if (json_is_array(p) && json_array_size(p) > 0) { /* token ids */
        size_t i;
        json_t *v;
        if (tok_reserve(s, json_array_size(p)) != BT_OK) return snprintf(err, errlen, "out of memory"), BT_ERR_NOMEM;
        json_array_foreach(p, i, v) {
            json_int_t id = json_integer_value(v);
            /* BT_ERR_INVALID_PROMPT: the frontend's 400 then names "prompt", as for a negative id */
            if (!json_is_integer(v))
                return snprintf(err, errlen, "prompt[%zu] is not an integer token id", i), BT_ERR_INVALID_PROMPT;
            if (id < 0 || id >= (json_int_t)e->n_vocab)
                return snprintf(err, errlen, "prompt[%zu] = %" JSON_INTEGER_FORMAT
                                " is not a token id of this model (vocabulary 0..%u)", i, id, e->n_vocab - 1),
                       BT_ERR_INVALID_PROMPT;
            s->tok[s->n_tok++] = (llama_token)id;
        }
        return BT_OK;
    }
    snprintf(err, errlen, "prompt must be a string or an array of token ids");
    return BT_ERR_INVALID;
}

/* The text of one token as generated (special tokens render as nothing). */
static size_t piece(ll_engine *e, llama_token t, char *buf, size_t cap) {
    int32_t n = e->L->llama_token_to_piece(e->vocab, t, buf, (int32_t)cap, 0, false);
    return n > 0 ? (size_t)n : 0;
}

/* A new sequence arrives on the thread: render its prompt, append the carried tokens, queue it. */
static void seq_arrive(ll_engine *e, ll_seq *s) {
    char err[320];
    memcpy(err, s->prompt_err, sizeof err);
    bt_status st = s->prompt_st; /* rendered on the prompt thread (prompt_thread) */
    s->n_prompt = s->n_tok;
    list_insert_waiting(&e->waiting, s, false);
    s->state = LS_WAITING;
    if (st != BT_OK) {
        seq_end(e, s, END_ERROR, BT_FINISH_STOP, st, err);
        return;
    }
    if (s->n_tok == 0) {
        seq_end(e, s, END_ERROR, BT_FINISH_STOP, BT_ERR_INVALID, "empty prompt");
        return;
    }
    /* carried tokens: context for the model, and their text context for stop strings (the text
     * the client has; carried ids always end at a character boundary, see llama_text.h) */
    if (s->n_carried) {
        bt_buf raw, text;
        char buf[2048]; /* longer than any token piece of a real vocabulary */
        bt_buf_init(&raw, (size_t)256 << 20);
        bt_buf_init(&text, (size_t)256 << 20);
        st = tok_reserve(s, s->n_tok + s->n_carried);
        for (uint32_t i = 0; i < s->n_carried && st == BT_OK; i++) {
            if (s->car[i] < 0 || (uint32_t)s->car[i] >= e->n_vocab) {
                st = BT_ERR_INVALID;
                snprintf(err, sizeof err, "carried token [%u] = %d is not a token id of this model (vocabulary 0..%u)",
                         i, (int)s->car[i], e->n_vocab - 1);
                break;
            }
            s->tok[s->n_tok++] = s->car[i];
            size_t n = piece(e, s->car[i], buf, sizeof buf);
            st = bt_buf_append(&raw, buf, n);
        }
        if (st == BT_OK && s->text.stops.n) st = bt_lltext_decode_all(raw.data ? raw.data : "", raw.len, &text);
        if (st == BT_OK && s->text.stops.n) st = bt_lltext_context(&s->text, text.data ? text.data : "", text.len);
        bt_buf_free(&raw);
        bt_buf_free(&text);
        free(s->car);
        s->car = NULL;
        if (st != BT_OK) {
            seq_end(e, s, END_ERROR, BT_FINISH_STOP, st, err[0] ? err : "out of memory");
            return;
        }
    }
    /* max_tokens 0 (or a continuation with nothing left): the prompt's usage and no completion,
     * as the mocker answers it, for a prompt the context holds; a longer one is refused below */
    if (s->max_new == 0 && s->n_tok <= e->n_cap) {
        seq_end(e, s, END_FINISH, BT_FINISH_LENGTH, BT_OK, NULL);
        return;
    }
    /* The context length as OpenAI and vLLM apply it (and the mocker, and the frontend for prompts
     * of token ids): a prompt (with the carried tokens, which count as completion) that leaves no
     * room for one token, or that leaves less than the max_tokens the client asked for, is their
     * 400 context_length_exceeded, in their words, so that a client trimming its history on that
     * code works here too. Without an explicit max_tokens the default is cut to what is left: the
     * sequence ends with "length" at the context. */
    if (s->n_tok >= e->n_cap || (s->max_asked && (uint64_t)s->n_tok + s->max_new > e->n_cap)) {
        const char *what = s->api == BT_API_CHAT ? "messages" : "prompt";
        /* Without a max_tokens of the client's the default would have been cut to what is left:
         * the request asked for the least completion, one new token, and the message says so
         * rather than the default it never got. */
        uint64_t want = s->max_asked ? s->max_new : 1;
        snprintf(err, sizeof err,
                 "This model's maximum context length is %u tokens. However, you requested %llu tokens (%zu in "
                 "the %s, %llu in the completion). Please reduce the length of the %s or completion.",
                 e->n_cap, (unsigned long long)(s->n_tok + want), s->n_prompt, what,
                 (unsigned long long)((s->n_tok - s->n_prompt) + want), what);
        seq_end(e, s, END_ERROR, BT_FINISH_STOP, BT_ERR_CONTEXT_LENGTH, err);
        return;
    }
    /* it waits: on an idle engine (nothing admitted) it starts or extends a batch gather */
    bt_engine_gather_arrive(&e->gather, bt_now_ns(), TAILQ_EMPTY(&e->running.q));
}

/* ---- KV hand-off (engine thread; the format and checks are llama_kv.c's) ------------------- */

static ll_seq *find_seq(ll_engine *e, bt_engine_seq *h);

static void kv_count(ll_engine *e, uint64_t *counter, uint64_t n) {
    pthread_mutex_lock(&e->mu);
    *counter += n;
    pthread_mutex_unlock(&e->mu);
}

/* A sequence with a state to import was just given its (empty) slot: load the state, so that only
 * the tokens after it are computed; on any mismatch it is prefilled as usual. */
static void kv_import(ll_engine *e, ll_seq *s) {
    size_t n_past = 0;
    bt_kv_fallback why = BT_KV_FB_IMPORT;
    bool ok = ll_kv_import(e->L, e->ctx, s->slot, s->tok, s->n_tok, s->kv, s->kv_len, &e->kv_ident, &n_past, &why);
    free(s->kv);
    s->kv = NULL;
    if (ok) {
        s->n_past = n_past;
        kv_count(e, &e->kvs.imports, 1);
        kv_count(e, &e->kvs.imported_tokens, n_past);
        BT_INFO("llama engine: KV state of %zu tokens imported (sequence of %zu tokens): no prefill", n_past, s->n_tok);
    } else {
        kv_count(e, &e->kvs.fallbacks[why], 1);
        BT_WARN("llama engine: KV state not imported (%s): prefilling %zu tokens instead", bt_kv_fallback_name(why),
                s->n_tok);
    }
}

/* CMD_HANDOFF: export the sequence's cached positions, hand them to the loop, end the sequence
 * silently (its handle is dead: the worker called bt_engine_handoff). A sequence that already
 * ended, is waiting or holds nothing gives no state. */
static void kv_handoff(ll_engine *e, ll_cmd *c) {
    ll_ev *ev = calloc(1, sizeof *ev);
    ll_seq *s = find_seq(e, c->h);
    if (s && ev && !e->dead && s->state == LS_RUNNING)
        ev->state = ll_kv_export(e->L, e->ctx, s->slot, s->tok, s->n_past, &e->kv_ident, e->cfg.fault_kv_corrupt,
                                 &ev->state_len);
    if (s) seq_end(e, s, END_KILLED, BT_FINISH_CANCELLED, BT_OK, NULL);
    if (!ev) {
        BT_ERROR("llama engine: out of memory handing a sequence off");
        return; /* the worker's hand-off waits for its bound */
    }
    if (ev->state) {
        pthread_mutex_lock(&e->mu);
        e->kvs.exports++;
        e->kvs.export_bytes += ev->state_len;
        pthread_mutex_unlock(&e->mu);
    }
    ev->kind = EV_HANDOFF;
    ev->hcb = c->hcb;
    ev->hud = c->hud;
    post(e, ev);
}

/* ---- the scheduler (engine thread) ---------------------------------------------------------- */

/* The victim of a preemption: the most recently admitted running sequence among the least urgent
 * (the largest priority value). For a priority preemption (for_priority: a waiting sequence of
 * priority `prio` cannot be admitted) only one strictly less urgent than prio, and never one
 * preempted for priority that has not produced a token since (so a sequence always makes progress
 * between two such preemptions, and equal priorities never preempt each other). NULL: none. */
static ll_seq *pick_victim(ll_engine *e, bool for_priority, int32_t prio) {
    ll_seq *victim = NULL;
    for (ll_seq *s = TAILQ_FIRST(&e->running.q); s; s = TAILQ_NEXT(s, link)) {
        if (for_priority && (s->priority <= prio || s->prio_held)) continue;
        if (!victim || s->priority > victim->priority ||
            (s->priority == victim->priority && s->admitted > victim->admitted))
            victim = s;
    }
    return victim;
}

/* Preempts `victim` (running): its KV is dropped and it waits again before every waiting one of
 * its priority, to be recomputed from its tokens (the output it already released stays released;
 * its text filter and sampler positions, which count its generated tokens, are unaffected).
 * The one path for both reasons: the KV cache is full, or a more urgent sequence waits. */
static void preempt(ll_engine *e, ll_seq *victim, bool for_priority) {
    BT_DEBUG("llama engine: preempting %s, priority %d, %zu tokens (%s)", victim->rid, (int)victim->priority,
             victim->n_tok, for_priority ? "priority: a more urgent sequence waits" : "KV full");
    kv_count(e, for_priority ? &e->kvs.preempted_priority : &e->kvs.preempted_kv, 1);
    victim->prio_held = for_priority;
    seq_release_kv(e, victim);
    list_remove(&e->running, victim);
    victim->state = LS_WAITING;
    list_insert_waiting(&e->waiting, victim, true);
    post_wait(e, victim, BT_ENGINE_WAIT_PREEMPTED); /* its stream hears nothing until readmitted */
}

static bool preempt_one(ll_engine *e) {
    ll_seq *victim = pick_victim(e, false, 0);
    if (victim) preempt(e, victim, false);
    return victim != NULL;
}

static void admit(ll_engine *e) {
    size_t reserved = 0; /* cells the running sequences will hold after their next step */
    for (ll_seq *s = TAILQ_FIRST(&e->running.q); s; s = TAILQ_NEXT(s, link)) reserved += s->n_tok + 1;
    ll_seq *s;
    while ((s = TAILQ_FIRST(&e->waiting.q)) != NULL) {
        int slot = -1;
        for (int i = 0; i < LL_MAX_SEQS && i < (int)e->cfg.max_num_seqs; i++)
            if (!e->slots[i]) {
                slot = i;
                break;
            }
        /* unified: one pool of cells for all; otherwise every slot has its own n_cap cells */
        bool kv_short = e->cfg.kv_unified && reserved + s->n_tok + 1 > e->n_ctx;
        if (slot < 0 || e->running.n >= (size_t)e->cfg.max_num_seqs || kv_short) {
            /* Priority preemption, one victim at a time, only when s could run here at all; the
             * victim waits again behind s (it is less urgent). */
            bool could = !e->cfg.kv_unified || s->n_tok + 1 <= e->n_ctx;
            ll_seq *v = could ? pick_victim(e, true, s->priority) : NULL;
            if (!v) break;
            reserved -= v->n_tok + 1;
            preempt(e, v, true);
            continue;
        }
        list_remove(&e->waiting, s);
        /* A wait it was told (queued, here or on the prompt queue; preempted) goes on until a step
         * computes it (starve_end, in this very step unless the budget leaves it out): admitted and
         * left out, it is still the same wait, neither told again nor shown running in the load
         * meanwhile (update_load). */
        s->starved = 0;
        e->slots[slot] = true;
        s->slot = slot;
        s->n_past = 0;
        s->state = LS_RUNNING;
        s->admitted = ++e->admit_counter;
        if (s->kv) kv_import(e, s);
        list_push_back(&e->running, s);
        reserved += s->n_tok + 1;
    }
}

static void update_load(ll_engine *e) {
    bt_engine_load l = {0};
    llama_memory_t mem = e->L->llama_get_memory(e->ctx);
    uint64_t cells = 0;
    /* a running sequence told it waits (starved of budget, step) is counted as waiting until a
     * step computes it again: a LOAD written after its WAITING that shows nothing waiting would
     * end its wait at the frontend (docs/protocol.md §4) */
    uint64_t starved = 0;
    for (ll_seq *s = TAILQ_FIRST(&e->running.q); s; s = TAILQ_NEXT(s, link)) {
        llama_pos p = s->slot >= 0 ? e->L->llama_memory_seq_pos_max(mem, s->slot) : -1;
        cells += (uint64_t)(p + 1);
        if (s->n_past + 1 < s->n_tok) l.active_prefill_tokens += s->n_tok - s->n_past;
        if (s->wait_told) starved++;
    }
    l.active_decode_blocks = (cells + LL_BLOCK - 1) / LL_BLOCK;
    l.total_blocks = e->n_ctx / LL_BLOCK;
    l.waiting = e->waiting.n + starved;
    l.running = e->running.n - starved;
    l.max_num_batched_tokens = (uint64_t)e->cfg.max_num_batched_tokens;
    for (ll_seq *s = TAILQ_FIRST(&e->waiting.q); s; s = TAILQ_NEXT(s, link)) l.active_prefill_tokens += s->n_tok;
    /* What pick_victim would offer a more urgent arrival (engine.h): the running sequences of the
     * least urgent priority not preempted for priority since their last token, less the waiting
     * ones more urgent than them (in priority order: the walk stops at the first that is not) */
    int32_t vp = 0;
    for (ll_seq *s = TAILQ_FIRST(&e->running.q); s; s = TAILQ_NEXT(s, link)) {
        if (s->prio_held) continue;
        if (!l.victims || s->priority > vp) vp = s->priority, l.victims = 0;
        if (s->priority == vp) l.victims++;
    }
    for (ll_seq *s = TAILQ_FIRST(&e->waiting.q); s && l.victims && s->priority < vp; s = TAILQ_NEXT(s, link))
        l.victims--;
    l.victim_priority = l.victims ? vp : 0;
    pthread_mutex_lock(&e->mu);
    if (memcmp(&l, &e->load, sizeof l) != 0) {
        e->load = l;
        e->load_changed = true;
    }
    /* the SUBMITs run since the last one are in this load (waiting) or ended: no longer added to it */
    if (e->n_arrived) {
        e->n_prompts -= e->n_arrived;
        e->n_arrived = 0;
        e->load_changed = true;
    }
    pthread_mutex_unlock(&e->mu);
}

/* Takes one sampled token into a sequence; returns false when it ended. */
static bool seq_take(ll_engine *e, ll_seq *s, llama_token t) {
    char buf[2048]; /* longer than any token piece of a real vocabulary */
    s->n_gen++;
    s->prio_held = false;
    e->total_emitted++;
    /* counted in usage, not delivered; with ignore_eos an ordinary token (its piece is empty) */
    if (!s->gp.ignore_eos && e->L->llama_vocab_is_eog(e->vocab, t)) {
        if (bt_lltext_finish(&s->text) != BT_OK) goto nomem;
        seq_end(e, s, END_FINISH, BT_FINISH_STOP, BT_OK, NULL);
        return false;
    }
    if (tok_reserve(s, s->n_tok + 1) != BT_OK) goto nomem;
    s->tok[s->n_tok++] = t;
    size_t n = piece(e, t, buf, sizeof buf);
    if (bt_lltext_push(&s->text, (uint32_t)t, buf, n) != BT_OK) goto nomem;
    if (s->text.stopped) {
        seq_end(e, s, END_FINISH, BT_FINISH_STOP, BT_OK, NULL);
        return false;
    }
    if (bt_gen_params_stops_at(&s->gp, (uint32_t)t)) { /* stop_token_ids: the token is delivered, as vLLM's */
        if (bt_lltext_finish(&s->text) != BT_OK) goto nomem;
        seq_end(e, s, END_FINISH, BT_FINISH_STOP, BT_OK, NULL);
        return false;
    }
    if (s->n_gen >= s->max_new || s->n_tok >= e->n_cap) {
        if (bt_lltext_finish(&s->text) != BT_OK) goto nomem;
        seq_end(e, s, END_FINISH, BT_FINISH_LENGTH, BT_OK, NULL);
        return false;
    }
    post_tokens(e, s);
    return true;
nomem:
    seq_end(e, s, END_ERROR, BT_FINISH_STOP, BT_ERR_NOMEM, "out of memory");
    return false;
}

/* Decodes one batch: `n` sequences, sequence i fed take[i] tokens from its n_past, logits for
 * the last one when that reaches the end of its tokens; then samples those. Returns false when
 * the engine died. A batch llama.cpp cannot place (no free KV slot) is back-pressure: the most
 * recently admitted sequence is preempted and the step ends. */
static bool run_batch(ll_engine *e, ll_seq **seqs, const size_t *take, int n) {
    struct llama_batch *b = &e->batch;
    /* zeroed: only the first nout are read, which gcc -O3 cannot see (-Wmaybe-uninitialized
     * broke the Release build with BATON_WERROR, as README's install command after scripts/setup) */
    ll_seq *outs[LL_MAX_SEQS] = {0};
    int32_t rows[LL_MAX_SEQS] = {0};
    int nout = 0;
    b->n_tokens = 0;
    for (int k = 0; k < n; k++) {
        ll_seq *s = seqs[k];
        for (size_t i = 0; i < take[k]; i++) {
            int32_t r = b->n_tokens++;
            b->token[r] = s->tok[s->n_past + i];
            b->pos[r] = (llama_pos)(s->n_past + i);
            b->n_seq_id[r] = 1;
            b->seq_id[r][0] = s->slot;
            b->logits[r] = 0;
        }
        if (s->n_past + take[k] == s->n_tok) {
            b->logits[b->n_tokens - 1] = 1;
            outs[nout] = s;
            rows[nout++] = b->n_tokens - 1;
        }
    }
    if (b->n_tokens == 0) return true;
    if (e->cfg.fault_hang_after_tokens && e->total_emitted >= (uint64_t)e->cfg.fault_hang_after_tokens) {
        /* as a llama_decode that never returns: no more commands, no quit, no events */
        BT_WARN("llama engine: injected hang (--fault-hang-after-tokens): the engine thread stops for good");
        for (;;) sleep(3600);
    }
    if (e->cfg.fault_error_after_tokens && e->total_emitted >= (uint64_t)e->cfg.fault_error_after_tokens) {
        engine_die(e, "injected decode failure (--fault-error-after-tokens)");
        return false;
    }
    int32_t rc = e->L->llama_decode(e->ctx, *b);
    if (rc == 1) { /* no free KV slot: back-pressure */
        if (e->running.n <= 1) seq_end(e, TAILQ_FIRST(&e->running.q), END_FINISH, BT_FINISH_LENGTH, BT_OK, NULL);
        else preempt_one(e);
        return true;
    }
    if (rc != 0) {
        char why[96];
        snprintf(why, sizeof why, "llama_decode failed (%d)", rc);
        engine_die(e, why);
        return false;
    }
    uint64_t prefill = 0; /* every token fed but a sequence's newest (bt_engine_kv_stats) */
    for (int k = 0; k < n; k++) {
        prefill += take[k] - (seqs[k]->n_past + take[k] == seqs[k]->n_tok ? 1 : 0);
        seqs[k]->n_past += take[k]; /* now in the cache */
    }
    if (prefill) kv_count(e, &e->kvs.prefill_tokens, prefill);
    for (int i = 0; i < nout; i++) {
        ll_seq *s = outs[i];
        float *logits = e->L->llama_get_logits_ith(e->ctx, rows[i]);
        /* --fault-nan-after-tokens: poison the row itself, so that the check the sampler makes on
         * every logit of the row (bt_llsample) is what finds it, as it would a broken kernel's */
        if (logits && e->cfg.fault_nan_after_tokens && e->total_emitted >= (uint64_t)e->cfg.fault_nan_after_tokens)
            logits[e->total_emitted % e->n_vocab] = NAN;
        /* the tokens after the prompt are the carried and generated ones: what the penalties count;
         * the prompt is seen by repetition_penalty (tok may have moved since the last draw) */
        s->sp.prompt = s->tok;
        s->sp.n_prompt = s->n_prompt;
        int32_t t = logits ? bt_llsample(logits, (int32_t)e->n_vocab, &s->sp, s->tok + s->n_prompt,
                                         s->n_carried + s->n_gen, e->sample)
                           : -1;
        if (t < 0) {
            engine_die(e, "non-finite logits");
            return false;
        }
        seq_take(e, s, t);
        if (e->cfg.fault_die_after_tokens && e->total_emitted >= (uint64_t)e->cfg.fault_die_after_tokens) {
            engine_die(e, "injected engine death (--fault-die-after-tokens)");
            return false;
        }
    }
    return true;
}

/* A running sequence is being prefilled in chunks and this step has no budget left for its next
 * one: the sequences before it in the running list (admission order) take it, the first one
 * always getting its chunk (step), so it waits until they are through their prompts. Its stream
 * hears nothing meanwhile, for as long as their prefills take, and is computed by no step: a wait
 * as a queued one's, told the same way (BT_ENGINE_WAIT_QUEUED, counted as waiting in the load),
 * or a frontend's --stream-token-timeout would give up a stream that only waits its turn. Told
 * once it has been left out of two steps in a row, so that a step that leaves a sequence out only
 * once (the budget before it shrinks and grows back as the sequences ahead start and finish their
 * prompts) makes no frame; told once per wait (wait_told), which lasts until a step computes it
 * again (starve_end). A new wait then needs the budget before it to shrink again, which only
 * other sequences changing phase (admitted, or through a prompt) do, not the steps going by: a
 * WAITING per wait, never one per step. */
#define LL_STARVED_TELL 2
static void starve(ll_engine *e, ll_seq *s) {
    if (s->starved < UINT32_MAX) s->starved++;
    if (s->starved >= LL_STARVED_TELL && !s->wait_told) post_wait(e, s, BT_ENGINE_WAIT_QUEUED);
}

/* s is computed in this step: a wait it was told (for budget, or queued before its admission) is
 * over. Its stream's wait ends at its next TOKENS, or at the next LOAD showing nothing waiting
 * (update_load no longer counts it). */
static void starve_end(ll_seq *s) {
    s->starved = 0;
    s->wait_told = false;
}

/* One scheduler step: admit; then, within --max-num-batched-tokens, one token for every
 * sequence that is decoding and a chunk for every sequence being prefilled. Returns false when
 * idle or dead.
 *
 * Numerics decide how this is handed to llama.cpp. Its CPU kernels do not compute a token bit
 * for bit the same in every batch shape, and a greedy stream flips at a near-tie some hundred
 * tokens after the first difference (measured, docs/engines.md): a continuation whose carried
 * tokens were re-prefilled in one batch diverges; so do batched streams whose neighbours differ,
 * because llama.cpp's split of a multi-sequence batch pairs sequences with consecutive ids into
 * one physical batch even when n_ubatch is 1 (llama_batch_allocr::split_equal admits
 * n_ubatch + 1 sequences). What is exact, at length and under any load: every token computed
 * alone. So with --llama-ubatch 1 (the default) each sequence gets its own llama_decode per step
 * (its one decoding token, or its chunk, split by llama.cpp into one-token physical batches), and
 * a continuation may replay its carried tokens in chunks. With --llama-ubatch > 1 (faster, not
 * exact across migration) the decoding tokens of all sequences go in one llama_decode and only
 * prompts are chunked. Chunks are cut at fixed offsets (multiples of --max-num-batched-tokens
 * minus --max-num-seqs from the sequence's start), never where a step's budget happened to end. */
static bool step(ll_engine *e) {
    admit(e);
    /* arrivals this admit() left waiting are queued: their streams hear nothing until a later one */
    for (ll_seq *s = TAILQ_FIRST(&e->waiting.q); s; s = TAILQ_NEXT(s, link))
        if (!s->wait_told) post_wait(e, s, BT_ENGINE_WAIT_QUEUED);
    if (!TAILQ_FIRST(&e->running.q)) return false;
    bool exact = e->cfg.ubatch == 1;
    int32_t budget = (int32_t)e->cfg.max_num_batched_tokens;
    ll_seq *singles[LL_MAX_SEQS], *chunks[LL_MAX_SEQS];
    size_t ones[LL_MAX_SEQS], chunk_take[LL_MAX_SEQS];
    int nsingle = 0, nchunk = 0;
    /* chunk size: what is left of the budget when every other sequence decodes, so the first
     * sequence waiting to prefill always fits (no starvation behind decoding sequences) */
    size_t chunk_max = (size_t)(e->cfg.max_num_batched_tokens - e->cfg.max_num_seqs);
    for (ll_seq *s = TAILQ_FIRST(&e->running.q); s; s = TAILQ_NEXT(s, link)) {
        size_t left = s->n_tok - s->n_past;
        if (left == 1 || (left > 1 && !exact && s->n_past >= s->n_prompt)) {
            singles[nsingle] = s;
            ones[nsingle++] = 1;
        }
    }
    budget -= nsingle;
    for (ll_seq *s = TAILQ_FIRST(&e->running.q); s; s = TAILQ_NEXT(s, link)) {
        size_t left = s->n_tok - s->n_past;
        if (left <= 1 || (!exact && s->n_past >= s->n_prompt)) {
            starve_end(s); /* decoding: one of the singles */
            continue;
        }
        size_t until = exact ? left : s->n_prompt - s->n_past;
        size_t to_boundary = chunk_max - s->n_past % chunk_max;
        size_t take = until < to_boundary ? until : to_boundary;
        if (take > (size_t)(budget > 0 ? budget : 0)) { /* the whole chunk in a later step */
            starve(e, s);
            continue;
        }
        starve_end(s);
        chunks[nchunk] = s;
        chunk_take[nchunk++] = take;
        budget -= (int32_t)take;
    }
    if (!nsingle && !nchunk) return false;
    kv_count(e, &e->kvs.steps, 1);
    if (exact) {
        for (int i = 0; i < nsingle; i++) {
            if (singles[i]->state != LS_RUNNING) continue; /* preempted by back-pressure just now */
            if (!run_batch(e, &singles[i], &ones[i], 1)) return false;
        }
    } else if (nsingle && !run_batch(e, singles, ones, nsingle)) {
        return false;
    }
    for (int i = 0; i < nchunk; i++) {
        if (chunks[i]->state != LS_RUNNING) continue;
        if (!run_batch(e, &chunks[i], &chunk_take[i], 1)) return false;
    }
    return true;
}

static ll_seq *find_seq(ll_engine *e, bt_engine_seq *h) {
    for (ll_seq *s = TAILQ_FIRST(&e->running.q); s; s = TAILQ_NEXT(s, link))
        if (s->h == h) return s;
    for (ll_seq *s = TAILQ_FIRST(&e->waiting.q); s; s = TAILQ_NEXT(s, link))
        if (s->h == h) return s;
    return NULL;
}

static void run_cmd(ll_engine *e, ll_cmd *c) {
    ll_seq *s;
    switch (c->kind) {
    case CMD_SUBMIT:
        e->n_arrived++;
        if (e->dead) {
            c->seq->slot = -1;
            list_push_back(&e->waiting, c->seq);
            c->seq->state = LS_WAITING;
            seq_end(e, c->seq, END_ERROR, BT_FINISH_STOP, BT_ERR_SHUTDOWN, "engine failed");
        } else {
            seq_arrive(e, c->seq);
        }
        c->seq = NULL;
        break;
    case CMD_KILL:
        if ((s = find_seq(e, c->h))) {
            char rid[sizeof s->rid];
            memcpy(rid, s->rid, sizeof rid);
            seq_end(e, s, END_KILLED, BT_FINISH_CANCELLED, BT_OK, NULL);
            /* CLOCK_MONOTONIC, for bench/cancel_latency.py: when the cells were free again */
            BT_DEBUG("request %s: llama engine freed the sequence's KV cells (t=%" PRIu64 " us)", rid, bt_now_us());
        }
        break;
    case CMD_STOP:
        if ((s = find_seq(e, c->h))) seq_end(e, s, END_FINISH, BT_FINISH_CANCELLED, BT_OK, NULL);
        break;
    case CMD_DIE: engine_die(e, "injected engine death (fault signal)"); break;
    case CMD_STALL: e->stalled = true; break;
    case CMD_RESUME: e->stalled = false; break;
    case CMD_HANDOFF: kv_handoff(e, c); break;
    }
    seq_free(c->seq);
    free(c);
}

/* Whether the step may run now: false while a batch gather holds the first step of an idle engine.
 * A gather whose sequences were all killed or stopped just ends; one that ends with sequences
 * waiting is counted (kv_stats). Engine thread. */
static bool gather_release(ll_engine *e) {
    if (!e->gather.active) return true;
    uint64_t now = bt_now_ns();
    if (TAILQ_EMPTY(&e->waiting.q)) {
        bt_engine_gather_end(&e->gather, now);
        return true;
    }
    if (bt_engine_gather_holds(&e->gather, now)) return false;
    uint64_t waited = bt_engine_gather_end(&e->gather, now);
    pthread_mutex_lock(&e->mu);
    e->kvs.gathers++;
    e->kvs.gathered_seqs += e->waiting.n;
    e->kvs.gather_ns += waited;
    pthread_mutex_unlock(&e->mu);
    BT_DEBUG("llama: batch gather: first step with %zu waiting sequences after %" PRIu64 " us", e->waiting.n,
             waited / 1000u);
    return true;
}

/* The loop reads a changed load (on_async) when the thread posts an event, which a step does soon
 * enough; a batch gather holds the step for up to BT_GATHER_BOUND x the window with nothing to
 * post, so the arrivals it waits for (the waiting count) wake the loop themselves. Under mu, as
 * post(). Engine thread. */
static void wake_for_load(ll_engine *e) {
    pthread_mutex_lock(&e->mu);
    if (e->load_changed && !e->abandoned) uv_async_send(&e->async);
    pthread_mutex_unlock(&e->mu);
}

static void *engine_thread(void *arg) {
    ll_engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        /* a dead engine too must first end what it holds (below), then wait; a batch gather waits
         * for its deadline or the next command, whichever comes first (cv runs on CLOCK_MONOTONIC,
         * bt_now_ns's clock) */
        for (;;) {
            if (e->quit || !STAILQ_EMPTY(&e->cmds)) break;
            if ((TAILQ_EMPTY(&e->running.q) && TAILQ_EMPTY(&e->waiting.q)) || (e->stalled && !e->dead)) {
                pthread_cond_wait(&e->cv, &e->mu);
                continue;
            }
            if (e->dead || !bt_engine_gather_holds(&e->gather, bt_now_ns())) break;
            uint64_t until = bt_engine_gather_deadline(&e->gather);
            struct timespec ts = {.tv_sec = (time_t)(until / 1000000000u), .tv_nsec = (long)(until % 1000000000u)};
            pthread_cond_timedwait(&e->cv, &e->mu, &ts);
        }
        ll_cmd *cmds = STAILQ_FIRST(&e->cmds);
        STAILQ_INIT(&e->cmds);
        bool quit = e->quit;
        pthread_mutex_unlock(&e->mu);
        while (cmds) {
            ll_cmd *next = STAILQ_NEXT(cmds, link);
            run_cmd(e, cmds);
            cmds = next;
        }
        if (quit) break;
        if (e->dead) {
            /* a dead engine ends what it holds; the worker hands the streams back */
            while (TAILQ_FIRST(&e->running.q))
                seq_end(e, TAILQ_FIRST(&e->running.q), END_ERROR, BT_FINISH_STOP, BT_ERR_SHUTDOWN, "engine failed");
            while (TAILQ_FIRST(&e->waiting.q))
                seq_end(e, TAILQ_FIRST(&e->waiting.q), END_ERROR, BT_FINISH_STOP, BT_ERR_SHUTDOWN, "engine failed");
            update_load(e);
            continue;
        }
        bool held = false; /* a batch gather holds the first step */
        if (!e->stalled) {
            if (gather_release(e)) step(e);
            else held = true;
        }
        update_load(e);
        if (held) wake_for_load(e);
    }
    return NULL;
}

/* ---- loop side ------------------------------------------------------------------------------ */

static void ll_destroy_now(ll_engine *e);

static void free_handle_if_done(bt_engine_seq *h) {
    if (h->released && h->thread_done) free(h);
}

/* ops.free_seq: the module has released h; its memory waits for its END (see the top). */
static void dl_free_seq(void *owner, bt_deliver_seq *ds) {
    (void)owner;
    bt_engine_seq *h = BT_DELIVER_OWNER(ds, bt_engine_seq, ds);
    h->released = true;
    free_handle_if_done(h);
}

/* ops.teardown: closed and no callback on the stack: the thread is joined and everything freed. */
static void dl_teardown(void *owner) { ll_destroy_now(owner); }

/* No wake: output and endings are staged only in on_async, which drains right after. */
static const bt_deliver_ops ll_deliver_ops = {.free_seq = dl_free_seq, .wake = NULL, .teardown = dl_teardown};

/* Moves the thread's events into the delivery module, in order, and drains them. EV_DEAD is
 * handed to the worker after everything before it was delivered, as it was posted. */
static void on_async(uv_async_t *a) {
    ll_engine *e = a->data;
    pthread_mutex_lock(&e->mu);
    ll_ev *evs = STAILQ_FIRST(&e->evs);
    STAILQ_INIT(&e->evs);
    bool load_changed = e->load_changed;
    e->load_changed = false;
    pthread_mutex_unlock(&e->mu);
    bt_deliver_enter(&e->dl);
    while (evs) {
        ll_ev *ev = evs;
        evs = STAILQ_NEXT(ev, link);
        bt_engine_seq *h = ev->h;
        bool open = !bt_deliver_closed(&e->dl);
        if (ev->kind == EV_TOKENS && open &&
            bt_deliver_stage(&e->dl, &h->ds, ev->ids, ev->n, ev->text ? ev->text : "", ev->text_len) != BT_OK) {
            bt_deliver_error(&e->dl, &h->ds, BT_ERR_NOMEM, "out of memory");
        } else if (ev->kind == EV_END) {
            if (open && ev->end == END_FINISH) bt_deliver_finish(&e->dl, &h->ds, ev->reason, &ev->usage);
            else if (open && ev->end == END_ERROR) bt_deliver_error(&e->dl, &h->ds, ev->code, ev->msg);
            h->thread_done = true;
            free_handle_if_done(h);
        } else if (ev->kind == EV_DEAD && open && e->hooks.on_dead) {
            bt_deliver_drain(&e->dl);
            if (!bt_deliver_closed(&e->dl)) e->hooks.on_dead(e->hooks_ud, ev->msg);
        } else if (ev->kind == EV_WAIT && open) {
            bt_deliver_wait(&e->dl, &h->ds, ev->wait); /* a no-op once h is dead */
        } else if (ev->kind == EV_HANDOFF && open) {
            bt_deliver_drain(&e->dl); /* the tokens before it reach the worker before its state */
            if (!bt_deliver_closed(&e->dl)) {
                ev->hcb(ev->hud, ev->state, ev->state_len); /* the callback owns the state */
                ev->state = NULL;
            }
        }
        free(ev->ids);
        free(ev->text);
        free(ev->state);
        free(ev);
    }
    bt_deliver_drain(&e->dl);
    if (load_changed && !bt_deliver_closed(&e->dl) && e->hooks.on_load) e->hooks.on_load(e->hooks_ud);
    bt_deliver_leave(&e->dl); /* may tear the engine down: nothing of e after it */
}

static void send_cmd(ll_engine *e, ll_cmd *c) {
    pthread_mutex_lock(&e->mu);
    STAILQ_INSERT_TAIL(&e->cmds, c, link);
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

/* A SUBMIT goes to the prompt thread; until the engine thread has it, it is counted as waiting in
 * the load (n_prompts), which the worker hears from on_async, never from inside submit. True when
 * it queues behind another prompt (one being prepared, or queued): its stream then hears nothing
 * for as long as the tokenizations ahead of it take, seconds each for long prompts on a large
 * model, a wait of the engine's as a queued sequence's at a step. It is marked told (wait_told)
 * here, before any other thread sees it, so that the step that finds it still waiting does not
 * tell the same wait again (one WAITING per wait); the caller tells it. */
static bool send_submit(ll_engine *e, ll_cmd *c) {
    pthread_mutex_lock(&e->mu);
    bool behind = e->prompt_cur || !STAILQ_EMPTY(&e->prompts);
    c->seq->wait_told = behind;
    STAILQ_INSERT_TAIL(&e->prompts, c, link);
    e->n_prompts++;
    e->load_changed = true;
    pthread_cond_signal(&e->prompt_cv);
    uv_async_send(&e->async);
    pthread_mutex_unlock(&e->mu);
    return behind;
}

/* A stop, kill or hand-off of h (loop). While h's SUBMIT has not gone on to the engine thread, the
 * command would wait behind every prompt queued ahead of it, seconds each for long ones: instead
 * the SUBMIT is withdrawn, out of the prompt queue, or left for the prompt thread to drop if it is
 * preparing that prompt now. No thread names h afterwards (thread_done), and the caller delivers
 * the ending itself; on_async, woken here, drains it and reports the load without it. True when
 * h's sequence is withdrawn (now or before), false when the engine thread has it: the command goes
 * there, behind the SUBMIT. */
static bool ll_withdraw(ll_engine *e, bt_engine_seq *h) {
    if (h->withdrawn) return true;
    ll_cmd *c = NULL;
    char rid[sizeof((ll_seq *)0)->rid] = "";
    bool held = false;
    pthread_mutex_lock(&e->mu);
    if (!h->prepped) {
        if (e->prompt_cur && e->prompt_cur->h == h) {
            memcpy(rid, e->prompt_cur->seq->rid, sizeof rid);
            e->prompt_cur->h = NULL; /* the prompt thread drops it when its render returns */
            held = true;
        } else {
            STAILQ_FOREACH(c, &e->prompts, link) {
                if (c->h == h) break;
            }
            if (c) {
                STAILQ_REMOVE(&e->prompts, c, ll_cmd, link);
                memcpy(rid, c->seq->rid, sizeof rid);
                held = true;
            }
        }
    }
    if (held) {
        e->n_prompts--;
        e->load_changed = true;
        uv_async_send(&e->async);
    }
    pthread_mutex_unlock(&e->mu);
    if (!held) return false;
    h->withdrawn = true;
    h->thread_done = true;
    /* CLOCK_MONOTONIC, as the engine thread's "freed the sequence's KV cells" of a running one */
    BT_DEBUG("request %s: llama engine dropped the sequence before its prompt reached the engine thread (t=%" PRIu64
             " us)",
             rid, bt_now_us());
    if (c) {
        seq_free(c->seq);
        free(c);
    }
    return true;
}

/* The prompt thread: each SUBMIT's prompt rendered and tokenized (render_prompt, bounded by
 * prompt_may_fit), then the SUBMIT passed on to the engine thread. One withdrawn meanwhile
 * (ll_withdraw) is dropped; at destroy the one it holds goes back to the queue, freed with it. */
static void *prompt_thread(void *arg) {
    ll_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!e->prompt_quit && STAILQ_EMPTY(&e->prompts)) pthread_cond_wait(&e->prompt_cv, &e->mu);
        if (e->prompt_quit) break;
        ll_cmd *c = STAILQ_FIRST(&e->prompts);
        STAILQ_REMOVE_HEAD(&e->prompts, link);
        e->prompt_cur = c;
        pthread_mutex_unlock(&e->mu);
        ll_seq *s = c->seq;
        s->prompt_err[0] = '\0';
        s->prompt_st = render_prompt(e, s, s->prompt_err, sizeof s->prompt_err);
        if (e->cfg.fault_prompt_delay_ms > 0) { /* a tokenization as long as a long prompt's on a large model */
            struct timespec d = {.tv_sec = (time_t)(e->cfg.fault_prompt_delay_ms / 1000),
                                 .tv_nsec = (long)(e->cfg.fault_prompt_delay_ms % 1000) * 1000000L};
            while (nanosleep(&d, &d) != 0) continue;
        }
        pthread_mutex_lock(&e->mu);
        e->prompt_cur = NULL;
        if (!c->h) { /* withdrawn meanwhile: the loop has delivered its ending */
            pthread_mutex_unlock(&e->mu);
            seq_free(c->seq);
            free(c);
            pthread_mutex_lock(&e->mu);
            continue;
        }
        if (e->prompt_quit) { /* destroyed meanwhile */
            STAILQ_INSERT_HEAD(&e->prompts, c, link);
            break;
        }
        c->h->prepped = true;
        STAILQ_INSERT_TAIL(&e->cmds, c, link);
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

static double body_number(const json_t *body, const char *key, double def) {
    json_t *v = json_object_get(body, key);
    return json_is_number(v) ? json_number_value(v) : def;
}

/* The body's logit_bias into s->sp (the frontend checked its form, docs/security.md; a client of
 * the request plane may send anything): token ids of this model's vocabulary, numbers, at most
 * BT_MAX_LOGIT_BIAS, one entry per id (the last of "5" and "05"). A key outside the vocabulary is
 * the client's mistake: refused before any token (BT_ERR_INVALID_LOGIT_BIAS), as a prompt token id
 * outside it is (BT_ERR_INVALID_PROMPT). */
static bt_status read_logit_bias(ll_engine *e, const json_t *body, ll_seq *s, char *err, size_t errlen) {
    json_t *lb = json_object_get(body, "logit_bias");
    if (!lb || json_is_null(lb) || json_object_size(lb) == 0) return BT_OK;
    if (!json_is_object(lb) || json_object_size(lb) > BT_MAX_LOGIT_BIAS)
        return snprintf(err, errlen, "logit_bias must be an object of at most %d token ids", BT_MAX_LOGIT_BIAS),
               BT_ERR_INVALID_LOGIT_BIAS;
    bt_llsample_bias *b = calloc(json_object_size(lb), sizeof *b);
    if (!b) return snprintf(err, errlen, "out of memory"), BT_ERR_NOMEM;
    size_t n = 0, klen;
    const char *key;
    json_t *v;
    json_object_keylen_foreach(lb, key, klen, v) {
        char *end = NULL;
        unsigned long long id = strtoull(key, &end, 10);
        if (klen == 0 || end != key + klen || key[0] < '0' || key[0] > '9' || id >= e->n_vocab) {
            snprintf(err, errlen, "logit_bias key \"%.32s\" is not a token id of this model (vocabulary 0..%u)", key,
                     e->n_vocab - 1);
            free(b);
            return BT_ERR_INVALID_LOGIT_BIAS; /* the frontend's 400 names "logit_bias" */
        }
        /* OpenAI's range, as the frontend checks it: a larger bias could make a logit infinite */
        if (!json_is_number(v) || !(fabs(json_number_value(v)) <= 100)) {
            snprintf(err, errlen, "logit_bias values must be numbers from -100 to 100 (token %.32s)", key);
            free(b);
            return BT_ERR_INVALID_LOGIT_BIAS;
        }
        size_t at = 0;
        while (at < n && b[at].id != (int32_t)id) at++;
        b[at] = (bt_llsample_bias){(int32_t)id, json_number_value(v)};
        if (at == n) n++;
    }
    s->bias = b;
    s->sp.bias = b;
    s->sp.n_bias = n;
    return BT_OK;
}

void bt_llama_inject(bt_engine *be, int fault) {
    ll_engine *e = (ll_engine *)be;
    ll_cmd *c = calloc(1, sizeof *c);
    if (!c) return;
    c->kind = fault == 1 ? CMD_DIE : fault == 2 ? CMD_STALL : CMD_RESUME;
    send_cmd(e, c);
}

static bt_status ll_submit(bt_engine *be, const bt_engine_request *req, const bt_engine_sink *sink, void *ud,
                           bt_engine_seq **out, char *err, size_t errlen) {
    ll_engine *e = (ll_engine *)be;
    bt_engine_seq *h = calloc(1, sizeof *h);
    ll_seq *s = calloc(1, sizeof *s);
    ll_cmd *c = calloc(1, sizeof *c);
    if (!h || !s || !c) goto nomem;
    s->h = h;
    s->slot = -1;
    s->api = req->api;
    snprintf(s->rid, sizeof s->rid, "%s", req->request_id ? req->request_id : "?");
    s->body = json_deep_copy(req->body);
    if (!s->body) goto nomem;
    if (bt_lltext_init(&s->text, req->stop, req->n_stop) != BT_OK) goto nomem;
    s->n_carried = req->n_carried;
    s->max_new = req->max_tokens;
    s->max_asked = json_is_integer(json_object_get(req->body, "max_tokens")) ||
                   json_is_integer(json_object_get(req->body, "max_completion_tokens"));
    s->priority = req->priority;
    s->sp.temperature = req->temperature;
    s->sp.top_p = body_number(req->body, "top_p", 1.0);
    s->sp.frequency_penalty = body_number(req->body, "frequency_penalty", 0);
    s->sp.presence_penalty = body_number(req->body, "presence_penalty", 0);
    bt_status bst = bt_gen_params_read(req->body, &s->gp, err, errlen);
    if (bst == BT_OK) bst = read_logit_bias(e, req->body, s, err, errlen);
    s->sp.min_p = s->gp.min_p;
    s->sp.repetition_penalty = s->gp.repetition_penalty;
    s->sp.min_tokens = s->gp.min_tokens;
    s->sp.eog = e->eog;
    s->sp.n_eog = e->n_eog;
    bt_lltext_min_tokens(&s->text, s->gp.min_tokens, req->n_carried);
    s->text.stops.keep = s->gp.include_stop; /* include_stop_str_in_output */
    /* OpenAI's range, as the frontend checks it (a client of the request plane may skip it) */
    if (bst == BT_OK && !(fabs(s->sp.frequency_penalty) <= 2 && fabs(s->sp.presence_penalty) <= 2)) {
        snprintf(err, errlen, "frequency_penalty and presence_penalty must be numbers from -2 to 2");
        bst = BT_ERR_INVALID;
    }
    if (bst != BT_OK) {
        free(h);
        seq_free(s);
        free(c);
        return bst;
    }
    json_t *k = json_object_get(req->body, "top_k");
    s->sp.top_k = json_is_integer(k) && json_integer_value(k) > 0 && json_integer_value(k) < INT32_MAX
                      ? (int32_t)json_integer_value(k)
                      : 0;
    json_t *seed = json_object_get(req->body, "seed");
    if (json_is_integer(seed)) s->sp.seed = (uint64_t)json_integer_value(seed);
    else if (req->attempt_seed) s->sp.seed = req->attempt_seed;
    else s->sp.seed = bt_random64(); /* no frontend seed: sampled output is not resumable exactly */
    if (s->sp.temperature > 0)
        BT_DEBUG("request %s: sampling seed %" PRIu64 " (%s)", req->request_id ? req->request_id : "?", s->sp.seed,
                 json_is_integer(seed) ? "request" : req->attempt_seed ? "frontend" : "random");
    if (req->kv_state && req->kv_state_len) { /* imported when admitted (llama_kv.h) */
        s->kv = malloc(req->kv_state_len);
        if (!s->kv) goto nomem;
        memcpy(s->kv, req->kv_state, req->kv_state_len);
        s->kv_len = req->kv_state_len;
    }
    if (req->n_carried) { /* they go behind the prompt, which is rendered on the thread */
        s->car = malloc(req->n_carried * sizeof *s->car);
        if (!s->car) goto nomem;
        for (uint32_t i = 0; i < req->n_carried; i++)
            s->car[i] = req->carried[i] > INT32_MAX ? -1 : (llama_token)req->carried[i];
    }
    c->kind = CMD_SUBMIT;
    c->h = h;
    c->seq = s;
    h->n_carried = req->n_carried;
    bt_deliver_add(&e->dl, &h->ds, sink, ud, LL_TEXT_CAP);
    /* Queued behind another prompt: told now, from the loop, drained by the on_async that
     * send_submit woke (staged here rather than posted as an event, so that no event names a
     * handle that ll_withdraw may free first). The load counts the sequence as waiting from
     * send_submit on (n_prompts), then in the engine thread's loads (waiting, or admitted and
     * still told: update_load) until a step computes it: no LOAD written after this WAITING shows
     * it not waiting before it runs (docs/protocol.md §4). Its first tokens end the wait (or its
     * ending, which tells nothing). */
    if (send_submit(e, c)) bt_deliver_wait(&e->dl, &h->ds, BT_ENGINE_WAIT_QUEUED);
    *out = h;
    return BT_OK;
nomem:
    snprintf(err, errlen, "out of memory");
    free(h);
    seq_free(s);
    free(c);
    return BT_ERR_NOMEM;
}

static void ll_stop(bt_engine *be, bt_engine_seq *h) {
    ll_engine *e = (ll_engine *)be;
    if (bt_deliver_ended(&h->ds) || h->stop_sent) return;
    if (ll_withdraw(e, h)) {
        /* its prompt was never counted in tokens: the usage has the carried ones alone */
        bt_usage u = {.prompt_tokens = 0, .completion_tokens = h->n_carried};
        h->stop_sent = true;
        bt_deliver_finish(&e->dl, &h->ds, BT_FINISH_CANCELLED, &u); /* delivered by on_async */
        return;
    }
    ll_cmd *c = calloc(1, sizeof *c);
    if (!c) return;
    h->stop_sent = true;
    c->kind = CMD_STOP;
    c->h = h;
    send_cmd(e, c);
}

static void ll_kill(bt_engine *be, bt_engine_seq *h) {
    ll_engine *e = (ll_engine *)be;
    if (bt_deliver_dead(&h->ds)) return;
    ll_cmd *c = ll_withdraw(e, h) ? NULL : calloc(1, sizeof *c);
    if (c) { /* else withdrawn, or the sequence runs to its end unseen; its END still frees the handle */
        c->kind = CMD_KILL;
        c->h = h;
        send_cmd(e, c);
    }
    bt_deliver_kill(&e->dl, &h->ds); /* no more callbacks; the memory waits for its END */
}

static void ll_get_load(bt_engine *be, bt_engine_load *out) {
    ll_engine *e = (ll_engine *)be;
    pthread_mutex_lock(&e->mu);
    *out = e->load;
    /* queued for the prompt thread: waiting as much as those queued after it (engine.h) */
    out->waiting += e->n_prompts;
    out->preparing = e->n_prompts;
    pthread_mutex_unlock(&e->mu);
}

static void ll_card(bt_engine *be, json_t *card) {
    ll_engine *e = (ll_engine *)be;
    json_object_set_new(card, "total_kv_blocks", json_integer(e->n_ctx / LL_BLOCK));
    json_object_set_new(card, "block_size", json_integer(LL_BLOCK));
    json_object_set_new(card, "max_num_seqs", json_integer(e->cfg.max_num_seqs));
    json_object_set_new(card, "max_num_batched_tokens", json_integer(e->cfg.max_num_batched_tokens));
    json_object_set_new(card, "context_length", json_integer(e->n_cap));
    json_object_set_new(card, "max_token_bytes", json_integer(e->max_piece));
    json_object_set_new(card, "engine", json_string("llama"));
    json_object_set_new(card, "llama_model", json_string(e->model_desc));
    json_object_set_new(card, "exactness", json_string(e->exactness));
}

/* The model's identity for the fingerprint: its size and an FNV-1a 64 hash of its first MiB
 * (the GGUF header, metadata and vocabulary of a small model, the first tensors of a big one):
 * cheap, and two different models, or two quantisations of one, do not share both. */
static void model_identity(const char *path, char *buf, size_t len) {
    struct stat st;
    FILE *f = fopen(path, "rb");
    uint64_t h = 0xcbf29ce484222325ull;
    unsigned char chunk[4096];
    size_t n, hashed = 0;
    if (!f || fstat(fileno(f), &st) != 0) {
        if (f) fclose(f);
        snprintf(buf, len, "unreadable");
        return;
    }
    while (hashed < ((size_t)1 << 20) && (n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        for (size_t i = 0; i < n; i++) h = (h ^ chunk[i]) * 0x100000001b3ull;
        hashed += n;
    }
    fclose(f);
    snprintf(buf, len, "%lld:%016" PRIx64, (long long)st.st_size, h);
}

static void on_async_closed(uv_handle_t *h) {
    ll_engine *e = h->data;
    free(e);
}

/* Frees the commands of a queue once no thread runs: a SUBMIT's handle with it, which nothing
 * else names by then (a withdrawn one's h is NULL: the loop had it). */
static void free_cmds(struct ll_cmd_q *q) {
    ll_cmd *c;
    while ((c = STAILQ_FIRST(q)) != NULL) {
        STAILQ_REMOVE_HEAD(q, link);
        if (c->kind == CMD_SUBMIT) free(c->h);
        seq_free(c->seq);
        free(c);
    }
}

/* The rest of the teardown, once the prompt thread holds no prompt (joined at once here) or was
 * joined (prompt_joined); async_closed: the async handle was closed already (the deferred case). */
static void ll_destroy_finish(ll_engine *e, bool async_closed) {
    if (e->prompt_started && !e->prompt_joined) pthread_join(e->prompt_thread, NULL);
    e->prompt_joined = true;
    free_cmds(&e->prompts);
    if (e->thread_started) {
        /* The thread stops between two steps (ll_destroy_now told it to). One that has not stopped
         * within LL_JOIN_WAIT_S is hung (inside llama.cpp, or injected: --fault-hang-after-tokens);
         * joining it would keep this process from ever exiting (the engine monitor failed the
         * worker to get it restarted). It is left to the process's exit, with everything it may
         * still touch: the engine is not freed, and it wakes the loop no more. */
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += LL_JOIN_WAIT_S;
        if (pthread_timedjoin_np(e->thread, NULL, &until) != 0) {
            pthread_mutex_lock(&e->mu);
            e->abandoned = true;
            pthread_mutex_unlock(&e->mu);
            pthread_detach(e->thread);
            BT_ERROR("llama engine: the engine thread did not stop within %d s (hung); leaving it to the process's "
                     "exit", LL_JOIN_WAIT_S);
            if (!async_closed) uv_close((uv_handle_t *)&e->async, NULL);
            return;
        }
    }
    while (TAILQ_FIRST(&e->running.q)) {
        ll_seq *s = TAILQ_FIRST(&e->running.q);
        list_remove(&e->running, s);
        free(s->h);
        seq_free(s);
    }
    while (TAILQ_FIRST(&e->waiting.q)) {
        ll_seq *s = TAILQ_FIRST(&e->waiting.q);
        list_remove(&e->waiting, s);
        free(s->h);
        seq_free(s);
    }
    free_cmds(&e->cmds);
    while (!STAILQ_EMPTY(&e->evs)) {
        ll_ev *ev = STAILQ_FIRST(&e->evs);
        STAILQ_REMOVE_HEAD(&e->evs, link);
        if (ev->kind == EV_END) free(ev->h);
        free(ev->ids);
        free(ev->text);
        free(ev->state);
        free(ev);
    }
    if (e->batch_ok) e->L->llama_batch_free(e->batch);
    if (e->ctx) e->L->llama_free(e->ctx);
    if (e->model) e->L->llama_model_free(e->model);
    free(e->chat_template);
    bt_llsample_scratch_free(e->sample);
    free(e->eog);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    pthread_cond_destroy(&e->prompt_cv);
    if (async_closed) free(e);
    else uv_close((uv_handle_t *)&e->async, on_async_closed);
}

/* The two parts of a deferred teardown (ll_destroy_now), on the loop: the last one finishes it. */
static void teardown_part_done(ll_engine *e) {
    if (--e->teardown_parts == 0) ll_destroy_finish(e, true);
}

static void on_async_closed_deferred(uv_handle_t *h) { teardown_part_done(h->data); }

/* Thread pool: waits for the prompt thread to come out of its tokenization and end. */
static void join_prompt_work(uv_work_t *req) {
    ll_engine *e = req->data;
    pthread_join(e->prompt_thread, NULL);
}

static void after_join_prompt(uv_work_t *req, int status) {
    (void)status; /* never cancelled: nothing calls uv_cancel on it */
    ll_engine *e = req->data;
    e->prompt_joined = true;
    teardown_part_done(e);
}

/* Both threads are told to stop at once. The engine thread stops between two steps; the prompt
 * thread cannot stop inside llama_tokenize, seconds for a long prompt. Idle, it exits at once and
 * is joined here. In a tokenization it is joined on the thread pool instead, so that the loop goes
 * on closing the worker's connections meanwhile: a request (uv_work_t) keeps the loop running
 * until then, which a handle would not (the worker closes every handle left, bt_proc_close_handles),
 * and the process does not exit while llama.cpp's tokenizer runs. The async handle is closed now
 * (no thread sends on it any more: abandoned), and the teardown ends once both are done. */
static void ll_destroy_now(ll_engine *e) {
    if (e->destroyed) return;
    e->destroyed = true;
    bool busy;
    pthread_mutex_lock(&e->mu);
    e->prompt_quit = true;
    e->quit = true;
    pthread_cond_signal(&e->prompt_cv);
    pthread_cond_signal(&e->cv);
    busy = e->prompt_started && e->prompt_cur;
    if (busy) e->abandoned = true;
    pthread_mutex_unlock(&e->mu);
    if (!busy) {
        ll_destroy_finish(e, false);
        return;
    }
    e->join_req.data = e;
    e->teardown_parts = 2;
    uv_close((uv_handle_t *)&e->async, on_async_closed_deferred);
    if (uv_queue_work(e->loop, &e->join_req, join_prompt_work, after_join_prompt) != 0) {
        pthread_join(e->prompt_thread, NULL); /* cannot happen with a callback given; joined here then */
        e->prompt_joined = true;
        teardown_part_done(e);
    }
}

/* Drops every sequence without callbacks. Handles of live sequences are freed here too. Safe
 * from inside a sink or hook callback (the module defers the teardown to the end of it). */
static void ll_destroy(bt_engine *be) {
    ll_engine *e = (ll_engine *)be;
    bt_deliver_close(&e->dl);
}

/* Like ll_kill, after the thread exported the sequence's state (kv_handoff). */
static void ll_handoff(bt_engine *be, bt_engine_seq *h, bt_engine_handoff_cb cb, void *ud) {
    ll_engine *e = (ll_engine *)be;
    /* withdrawn: its prompt not even tokenized, there is no state to give */
    ll_cmd *c = bt_deliver_dead(&h->ds) || ll_withdraw(e, h) ? NULL : calloc(1, sizeof *c);
    if (!c) {
        ll_kill(be, h);
        cb(ud, NULL, 0);
        return;
    }
    c->kind = CMD_HANDOFF;
    c->h = h;
    c->hcb = cb;
    c->hud = ud;
    send_cmd(e, c);
    bt_deliver_kill(&e->dl, &h->ds); /* no more sink callbacks; the memory waits for its END */
}

static void ll_kv_stats(bt_engine *be, bt_engine_kv_stats *out) {
    ll_engine *e = (ll_engine *)be;
    pthread_mutex_lock(&e->mu);
    *out = e->kvs;
    pthread_mutex_unlock(&e->mu);
}

static const bt_engine_ops ll_ops = {ll_submit, ll_stop, ll_kill, ll_get_load, ll_card, ll_destroy, ll_handoff,
                                     ll_kv_stats, true, false};

bt_engine *bt_llama_create(uv_loop_t *loop, const bt_llama_config *cfg, const bt_engine_hooks *hooks, void *hooks_ud,
                           char *err, size_t errlen) {
    if (bt_llama_config_check(cfg, err, errlen) != BT_OK) return NULL;
    const bt_llama_api *L = bt_llama_lib_open(cfg->lib_dir, err, errlen);
    if (!L) return NULL;
    const char *path = cfg->model_path && cfg->model_path[0] ? cfg->model_path : bt_llama_default_model();
    if (access(path, R_OK) != 0) {
        snprintf(err, errlen, "model file %s not found", path);
        return NULL;
    }
    return bt_llama_create_with_api(loop, cfg, hooks, hooks_ud, L, path, err, errlen);
}

bt_engine *bt_llama_create_with_api(uv_loop_t *loop, const bt_llama_config *cfg, const bt_engine_hooks *hooks,
                                    void *hooks_ud, const bt_llama_api *L, const char *path, char *err,
                                    size_t errlen) {
    if (bt_llama_config_check(cfg, err, errlen) != BT_OK) return NULL;
    ll_engine *e = calloc(1, sizeof *e);
    if (!e) return snprintf(err, errlen, "out of memory"), NULL;
    TAILQ_INIT(&e->waiting.q);
    TAILQ_INIT(&e->running.q);
    STAILQ_INIT(&e->cmds);
    STAILQ_INIT(&e->evs);
    STAILQ_INIT(&e->prompts);
    e->base.ops = &ll_ops;
    e->loop = loop;
    e->cfg = *cfg;
    e->L = L;
    if (hooks) e->hooks = *hooks;
    e->hooks_ud = hooks_ud;
    pthread_mutex_init(&e->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* the batch gather's timed wait (engine_thread) */
    pthread_cond_init(&e->cv, &ca);
    pthread_cond_init(&e->prompt_cv, NULL);
    pthread_condattr_destroy(&ca);
    bt_engine_gather_init(&e->gather, cfg->batch_gather_us);
    bt_deliver_init(&e->dl, &ll_deliver_ops, e);
    uv_async_init(loop, &e->async, on_async);
    e->async.data = e;

    struct llama_model_params mp = L->llama_model_default_params();
    mp.n_gpu_layers = 0;
    e->model = L->llama_model_load_from_file(path, mp);
    if (!e->model) {
        snprintf(err, errlen, "llama.cpp cannot load the model %s", path);
        goto fail;
    }
    e->vocab = L->llama_model_get_vocab(e->model);
    e->n_vocab = (uint32_t)L->llama_vocab_n_tokens(e->vocab);
    e->n_ctx_train = (uint32_t)L->llama_model_n_ctx_train(e->model);
    /* the longest entry, as text (special tokens too: a chat template's markers are parsed as
     * such), for the byte bound of prompt_may_fit and the model card: one pass over the vocabulary */
    for (uint32_t t = 0; t < e->n_vocab; t++) {
        char buf[256];
        int32_t n = L->llama_token_to_piece(e->vocab, (llama_token)t, buf, (int32_t)sizeof buf, 0, true);
        uint32_t len = (uint32_t)(n < 0 ? -n : n); /* negative: the size it needs */
        if (len > e->max_piece) e->max_piece = len;
    }
    L->llama_model_desc(e->model, e->model_desc, sizeof e->model_desc);
    const char *tmpl = L->llama_model_chat_template(e->model, NULL);
    if (tmpl) {
        /* keep it only when llama.cpp recognises it (no Jinja): probe with one message */
        struct llama_chat_message m = {"user", "x"};
        if (L->llama_chat_apply_template(tmpl, &m, 1, true, NULL, 0) >= 0) e->chat_template = strdup(tmpl);
    }

    uint32_t n_seq = (uint32_t)cfg->max_num_seqs;
    ll_kv_layout kv = ll_kv_layout_auto(e->n_ctx_train, n_seq, cfg->kv_unified);
    if (cfg->ctx_size && !ll_kv_layout_of((uint64_t)cfg->ctx_size, n_seq, cfg->kv_unified, &kv)) {
        /* bt_llama_config_check refuses it; a caller that skipped the check gets the same answer */
        bt_llama_config_check(cfg, err, errlen);
        goto fail;
    }
    struct llama_context_params cp = L->llama_context_default_params();
    cp.n_ctx = kv.n_ctx;
    cp.n_batch = (uint32_t)cfg->max_num_batched_tokens;
    /* n_ubatch 1 (the default): llama.cpp computes every token of a batch alone, the only way its
     * output does not depend on which tokens share a physical batch (see step()) */
    cp.n_ubatch = (uint32_t)(cfg->ubatch < cfg->max_num_batched_tokens ? cfg->ubatch : cfg->max_num_batched_tokens);
    cp.n_seq_max = (uint32_t)cfg->max_num_seqs;
    cp.n_threads = cp.n_threads_batch = (int32_t)cfg->threads;
    cp.kv_unified = cfg->kv_unified;
    /* measured (docs/benchmarks.md): the CPU flash-attention kernel is about 4x slower than
     * plain attention for a small model, so it is off unless asked for */
    cp.flash_attn_type = cfg->flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    e->ctx = L->llama_init_from_model(e->model, cp);
    if (!e->ctx) {
        snprintf(err, errlen, "llama.cpp cannot create a context of %u cells for %lld sequences", cp.n_ctx,
                 (long long)cfg->max_num_seqs);
        goto fail;
    }
    /* what llama.cpp made of it, which is what the checks and the model card go by */
    e->n_ctx = L->llama_n_ctx(e->ctx);
    uint32_t n_ctx_seq = L->llama_n_ctx_seq(e->ctx);
    if (e->n_ctx != kv.n_ctx || n_ctx_seq != kv.n_ctx_seq)
        BT_WARN("llama engine: llama.cpp allocated %u KV cells, %u per sequence, where %u and %u were asked for: "
                "this llama.cpp sizes its KV cache by another rule than the one baton knows",
                e->n_ctx, n_ctx_seq, kv.n_ctx, kv.n_ctx_seq);
    else if (cfg->ctx_size && kv.n_ctx != (uint64_t)cfg->ctx_size)
        BT_WARN("llama engine: --ctx-size %lld rounded down to %u KV cells: llama.cpp allocates %s in multiples of "
                "%u cells",
                (long long)cfg->ctx_size, kv.n_ctx, cfg->kv_unified ? "the shared pool" : "each sequence's stream",
                LL_KV_PAD);
    /* each sequence's cap: the model's trained context, and the cells it may fill (its own stream,
     * or the whole pool when unified) */
    e->n_cap = e->n_ctx_train && e->n_ctx_train < n_ctx_seq ? e->n_ctx_train : n_ctx_seq;
    if (!cfg->kv_unified && n_ctx_seq >= e->n_cap + LL_KV_PAD)
        BT_WARN("llama engine: each sequence's %u KV cells are more than the model's context (%u tokens): %u cells "
                "of every stream are never used (--ctx-size %llu would do)",
                n_ctx_seq, e->n_ctx_train, n_ctx_seq - e->n_cap,
                (unsigned long long)(e->n_cap + LL_KV_PAD - 1) / LL_KV_PAD * LL_KV_PAD * n_seq);
    e->n_batch = L->llama_n_batch(e->ctx);
    e->batch = L->llama_batch_init((int32_t)cfg->max_num_batched_tokens, 0, 1);
    e->batch_ok = true;
    e->sample = bt_llsample_scratch_new((int32_t)e->n_vocab);
    e->eog = calloc(e->n_vocab, sizeof *e->eog);
    for (uint32_t t = 0; e->eog && t < e->n_vocab; t++)
        if (L->llama_vocab_is_eog(e->vocab, (llama_token)t)) e->eog[e->n_eog++] = (int32_t)t;
    if (!e->sample || !e->eog) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    e->load.total_blocks = e->n_ctx / LL_BLOCK;
    e->load.max_num_batched_tokens = (uint64_t)cfg->max_num_batched_tokens;
    /* what decides the logits bit for bit (llama.h): a stream continues only where all are equal */
    char variant[96], ident[64];
    if (!bt_llama_lib_cpu_variant(variant, sizeof variant)) snprintf(variant, sizeof variant, "none");
    model_identity(path, ident, sizeof ident);
    snprintf(e->exactness, sizeof e->exactness, "llama-0.4.0 cpu=%s threads=%lld ubatch=%u fa=%d model=%s sampler=%d",
             variant, (long long)cfg->threads, cp.n_ubatch, cfg->flash_attn ? 1 : 0, ident, BT_LLSAMPLE_VERSION);
    /* a KV state is checked against the same fingerprint: one description of the numerics */
    ll_kv_ident_init(&e->kv_ident, L, e->model, e->ctx, e->exactness, cfg);
    if (pthread_create(&e->thread, NULL, engine_thread, e) != 0) {
        snprintf(err, errlen, "cannot start the engine thread");
        goto fail;
    }
    e->thread_started = true;
    if (pthread_create(&e->prompt_thread, NULL, prompt_thread, e) != 0) {
        snprintf(err, errlen, "cannot start the prompt thread");
        goto fail;
    }
    e->prompt_started = true;
    char layout[96];
    if (cfg->kv_unified) snprintf(layout, sizeof layout, "shared by up to %u sequences", n_seq);
    else snprintf(layout, sizeof layout, "%u for each of up to %u sequences", n_ctx_seq, n_seq);
    BT_INFO("llama engine: %s (%s), %u KV cells (%s), a context of %u tokens per sequence, %lld tokens per step, "
            "%lld thread(s), chat template: %s",
            path, e->model_desc, e->n_ctx, layout, e->n_cap, (long long)cfg->max_num_batched_tokens,
            (long long)cfg->threads, e->chat_template ? "the model's" : "plain");
    BT_INFO("llama engine: exactness fingerprint \"%s\"", e->exactness);
    /* llama.cpp's threads spin at a barrier after every matrix product: more of them than CPUs
     * this process may run on makes each step wait on preempted spinners (measured: seconds per
     * step on 2 CPUs, docs/engines.md §3.2) */
    long ncpu = bt_cpus_usable();
    if (cfg->threads > ncpu)
        BT_WARN("llama engine: --llama-threads %lld is more than the %ld CPUs this process may use; its threads "
                "wait for each other spinning, and each step can take seconds: use %ld or fewer",
                (long long)cfg->threads, ncpu, ncpu);
    return &e->base;
fail:
    ll_destroy_now(e);
    return NULL;
}

#endif
