/* test_mocker.c — unit tests of the mocker engine: vocabulary and tokenizer purity, the token
 * function, determinism and the continuation property (the oracle of migration), stop strings,
 * max_tokens and usage, KV accounting under pressure (waiting, preemption, chunked prefill,
 * max_num_seqs), kill/stop semantics, re-entrant callbacks, fault hooks, configuration checks,
 * batch gathering (--batch-gather-us: a burst and a kill during the timerfd's wait, the only
 * sequence killed, a destroy while armed, no descriptor left behind by 200 engines on one loop).
 * Every test runs its own libuv loop to completion with a high speedup ratio so it is fast. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <dirent.h>
#include <string.h>

#include <cmocka.h>

#include "common/util.h"
#include "engine/mocker/mocker.h"

#define MAXIDS 4096
#define MAXTEXT 65536

/* ---- harness -------------------------------------------------------------------------------- */

typedef struct run run_t;
struct run {
    uint32_t ids[MAXIDS];
    size_t n;
    char text[MAXTEXT];
    size_t tlen;
    int calls;
    int finished, errored;
    bt_finish_reason reason;
    bt_usage usage;
    bt_status err;
    char errmsg[128];
    /* for tests that act from inside callbacks */
    bt_engine *e;
    bt_engine_seq *seq;
    void (*on_tok)(run_t *r);
    void *arg;
    int after_end_calls; /* callbacks received after the seq ended: must stay 0 */
    int order;           /* 1 + the number of sequences that had finished before this one */
    uint64_t first_ns;   /* bt_now_ns() at the first tokens (0: none) */
    int waits[2];        /* on_wait calls, by bt_engine_wait */
    size_t wait_n;       /* tokens received before the last on_wait */
};

static int g_finished; /* finishes seen, for run_t.order */

static void s_tokens(void *ud, const uint32_t *ids, size_t n, const char *text, size_t len) {
    run_t *r = ud;
    if (r->finished || r->errored) r->after_end_calls++;
    assert_true(n > 0);
    assert_true(r->n + n <= MAXIDS);
    assert_true(r->tlen + len < MAXTEXT);
    if (!r->first_ns) r->first_ns = bt_now_ns();
    memcpy(r->ids + r->n, ids, n * sizeof *ids);
    r->n += n;
    memcpy(r->text + r->tlen, text, len);
    r->tlen += len;
    r->text[r->tlen] = '\0';
    r->calls++;
    if (r->on_tok) r->on_tok(r);
}

static void s_finish(void *ud, bt_finish_reason reason, const bt_usage *u) {
    run_t *r = ud;
    if (r->finished || r->errored) r->after_end_calls++;
    r->finished++;
    r->order = ++g_finished;
    r->reason = reason;
    r->usage = *u;
}

static void s_error(void *ud, bt_status code, const char *msg) {
    run_t *r = ud;
    if (r->finished || r->errored) r->after_end_calls++;
    r->errored++;
    r->err = code;
    snprintf(r->errmsg, sizeof r->errmsg, "%s", msg);
}

static void s_wait(void *ud, bt_engine_wait why) {
    run_t *r = ud;
    if (r->finished || r->errored) r->after_end_calls++;
    r->waits[why]++;
    r->wait_n = r->n;
}

static const bt_engine_sink k_sink = {s_tokens, s_finish, s_error, NULL};
/* With on_wait: a sequence told it waits is on the delivery queue from then on, so the sinks of one
 * drain are called in the order the sequences were queued, not the order they finished in (which
 * test_priority_order reads from its finish callbacks). */
static const bt_engine_sink k_wait_sink = {s_tokens, s_finish, s_error, s_wait};
static bool g_tell_waits; /* submit_q uses k_wait_sink */

typedef struct {
    bt_api api;
    const char *prompt; /* completion: string prompt */
    const uint32_t *prompt_ids;
    size_t n_prompt_ids; /* completion: token-id prompt when prompt_ids != NULL */
    const json_t *messages;
    const uint32_t *carried;
    uint32_t n_carried;
    uint32_t max_tokens;
    bool no_max_in_body;
    double temperature;
    uint64_t seed;
    const char *stop[BT_MAX_STOP];
    int n_stop;
    int32_t priority;
} req_t;

static json_t *make_body(const req_t *q) {
    json_t *b = json_object();
    if (q->api == BT_API_CHAT) {
        json_object_set_new(b, "messages", json_deep_copy(q->messages));
    } else if (q->prompt_ids) {
        json_t *a = json_array();
        for (size_t i = 0; i < q->n_prompt_ids; i++) json_array_append_new(a, json_integer(q->prompt_ids[i]));
        json_object_set_new(b, "prompt", a);
    } else {
        json_object_set_new(b, "prompt", json_string(q->prompt ? q->prompt : ""));
    }
    if (!q->no_max_in_body) json_object_set_new(b, "max_tokens", json_integer(q->max_tokens + q->n_carried));
    return b;
}

static bt_status submit_q(bt_engine *e, const req_t *q, run_t *r, char *err, size_t errlen) {
    json_t *body = make_body(q);
    bt_engine_request req = {
        .request_id = "test",
        .api = q->api,
        .body = body,
        .carried = q->carried,
        .n_carried = q->n_carried,
        .max_tokens = q->max_tokens,
        .temperature = q->temperature,
        .seed = q->seed,
        .n_stop = q->n_stop,
        .priority = q->priority,
    };
    for (int i = 0; i < q->n_stop; i++) req.stop[i] = q->stop[i];
    r->e = e;
    bt_status st = bt_engine_submit(e, &req, g_tell_waits ? &k_wait_sink : &k_sink, r, &r->seq, err, errlen);
    json_decref(body); /* submit copies what it needs */
    return st;
}

static bt_mocker_config fast_cfg(void) {
    bt_mocker_config c;
    bt_mocker_config_default(&c);
    c.speedup_ratio = 1e6;
    return c;
}

static void close_loop(uv_loop_t *loop) {
    uv_run(loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(loop), 0);
}

/* Runs one request alone on a fresh engine, to the end. */
static run_t *run_one_cfg(const bt_mocker_config *cfg, const req_t *q) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_engine *e = bt_mocker_create(&loop, cfg, NULL, NULL);
    assert_non_null(e);
    run_t *r = calloc(1, sizeof *r);
    char err[256];
    assert_int_equal(submit_q(e, q, r, err, sizeof err), BT_OK);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(r->finished + r->errored, 1);
    assert_int_equal(r->after_end_calls, 0);
    bt_engine_destroy(e);
    close_loop(&loop);
    return r;
}

static run_t *run_one(const req_t *q) {
    bt_mocker_config c = fast_cfg();
    return run_one_cfg(&c, q);
}

/* Concatenated text of token ids. */
static size_t ids_text(const uint32_t *ids, size_t n, char *out, size_t cap) {
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l;
        const char *t = bt_mocker_token_text(ids[i], &l);
        assert_true(len + l < cap);
        memcpy(out + len, t, l);
        len += l;
    }
    out[len] = '\0';
    return len;
}

static const char *k_prompt = "Tell me a story about a lighthouse keeper, please.";

/* ---- vocabulary, tokenizer, token function -------------------------------------------------- */

static void test_vocab_readable(void **st) {
    (void)st;
    int punct = 0;
    for (uint32_t i = 0; i < BT_MOCKER_VOCAB; i++) {
        size_t l = 99;
        const char *t = bt_mocker_token_text(i, &l);
        assert_non_null(t);
        assert_int_equal(strlen(t), l);
        assert_true(l >= 1);
        if (t[0] == ' ') {
            assert_true(l >= 3 && l <= 7);
            for (size_t k = 1; k < l; k++) assert_true(t[k] >= 'a' && t[k] <= 'z');
        } else {
            punct++;
            assert_int_equal(l, 1);
            assert_true(t[0] == ',' || t[0] == '.' || t[0] == '\n');
        }
        /* every token's text tokenizes back to exactly that token, so texts are distinct */
        uint32_t back[4];
        assert_int_equal(bt_mocker_tokenize(t, l, back, 4), 1);
        assert_int_equal(back[0], i);
    }
    assert_true(punct >= 2 && punct <= 3);
    size_t l = 5;
    assert_string_equal(bt_mocker_token_text(BT_MOCKER_VOCAB, &l), "");
    assert_int_equal(l, 0);
}

static void test_tokenizer(void **st) {
    (void)st;
    uint32_t a[64], b[64];
    const char *s = "Hello, world. How are  you?\nfine";
    size_t n = bt_mocker_tokenize(s, strlen(s), a, 64);
    /* "Hello" "," " world" "." " How" " are" " you" "?" "\n" "fine" (a double space carries none) */
    assert_int_equal(n, 10);
    assert_int_equal(bt_mocker_tokenize(s, strlen(s), b, 64), n);
    assert_memory_equal(a, b, n * sizeof *a);
    for (size_t i = 0; i < n; i++) assert_true(a[i] < BT_MOCKER_VOCAB);
    /* cap: counts everything, writes only cap */
    b[3] = 77777;
    assert_int_equal(bt_mocker_tokenize(s, strlen(s), b, 3), n);
    assert_int_equal(b[3], 77777);
    assert_int_equal(bt_mocker_tokenize("", 0, b, 3), 0);

    /* generated text round-trips exactly */
    uint64_t state = 0;
    uint32_t g[200];
    for (int i = 0; i < 200; i++) {
        g[i] = bt_mocker_next_token(state, 42, 0.7, 1.0);
        state = bt_mocker_state_push(state, g[i]);
    }
    static char text[4096];
    size_t tl = ids_text(g, 200, text, sizeof text);
    uint32_t back[256];
    assert_int_equal(bt_mocker_tokenize(text, tl, back, 256), 200);
    assert_memory_equal(back, g, sizeof g);
}

static void test_token_function(void **st) {
    (void)st;
    assert_int_equal(bt_mocker_next_token(12345, 1, 0.0, 1.0), bt_mocker_next_token(12345, 1, 0.0, 1.0));
    assert_int_equal(bt_mocker_next_token(12345, 1, 0.0, 1.0), bt_mocker_next_token(12345, 1, -0.0, 1.0));
    assert_int_equal(bt_mocker_state_push(99, 7), bt_mocker_state_push(99, 7));
    assert_true(bt_mocker_state_push(0, 1) != bt_mocker_state_push(0, 2));
    assert_true(bt_mocker_state_push(bt_mocker_state_push(0, 1), 2) !=
                bt_mocker_state_push(bt_mocker_state_push(0, 2), 1));

    /* streams for different temperature / seed differ; punctuation is rare and never doubled */
    const double temps[3] = {0.0, 0.7, 1.0};
    uint32_t streams[3][500];
    int punct = 0, total = 0;
    for (int t = 0; t < 3; t++) {
        uint64_t state = bt_mocker_state_push(0, 5);
        bool prev_p = false;
        uint32_t prev = 0;
        for (int i = 0; i < 500; i++) {
            uint32_t tok = bt_mocker_next_token(state, 7, temps[t], 1.0);
            streams[t][i] = tok;
            state = bt_mocker_state_push(state, tok);
            const char *txt = bt_mocker_token_text(tok, NULL);
            bool p = txt[0] != ' ';
            if (p && prev_p) {
                /* only ".\n" may follow one another */
                assert_string_equal(bt_mocker_token_text(prev, NULL), ".");
                assert_string_equal(txt, "\n");
            }
            punct += p;
            total++;
            prev_p = p;
            prev = tok;
        }
    }
    assert_memory_not_equal(streams[0], streams[1], sizeof streams[0]);
    assert_memory_not_equal(streams[1], streams[2], sizeof streams[0]);
    double frac = (double)punct / total;
    assert_true(frac > 0.03 && frac < 0.15);

    uint64_t s0 = bt_mocker_state_push(0, 5);
    int same = 0;
    for (uint64_t seed = 0; seed < 64; seed++) same += bt_mocker_next_token(s0, seed, 0.7, 1.0) == bt_mocker_next_token(s0, seed + 1000, 0.7, 1.0);
    assert_true(same < 8);
}

/* The first n tokens after the prefix [5] for seed 7. */
static void chain(double temperature, double top_p, uint32_t *out, int n) {
    uint64_t state = bt_mocker_state_push(0, 5);
    for (int i = 0; i < n; i++) {
        out[i] = bt_mocker_next_token(state, 7, temperature, top_p);
        state = bt_mocker_state_push(state, out[i]);
    }
}

/* top_p is part of a sampled choice, as it is of a real sampler's draw; greedy and top_p 1 choose
 * what the mocker chose before it read top_p (the values below), so recorded outputs still hold */
static void test_token_function_top_p(void **st) {
    (void)st;
    static const uint32_t greedy[12] = {1901, 4093, 3762, 1994, 3584, 3682, 588, 4093, 3644, 1958, 3697, 3961};
    static const uint32_t sampled[12] = {734, 1173, 2173, 4093, 1307, 1834, 3992, 3019, 1357, 913, 3029, 859};
    uint32_t a[12], b[12];
    const double any_top_p[] = {1.0, 0.9, 0.5, 0.0, 1.5};
    for (size_t i = 0; i < sizeof any_top_p / sizeof any_top_p[0]; i++) { /* greedy ignores it */
        chain(0.0, any_top_p[i], a, 12);
        assert_memory_equal(a, greedy, sizeof a);
    }
    chain(0.7, 1.0, a, 12);
    assert_memory_equal(a, sampled, sizeof a);
    chain(0.7, 1.5, a, 12); /* past 1 is no nucleus either (the frontend refuses it) */
    assert_memory_equal(a, sampled, sizeof a);
    /* top_p 0 keeps the most probable token alone: the greedy choice at any temperature */
    chain(0.7, 0.0, a, 12);
    assert_memory_equal(a, greedy, sizeof a);
    chain(1.3, 0.0, a, 12);
    assert_memory_equal(a, greedy, sizeof a);
    /* a nucleus changes the draw, each top_p its own, the same one every time */
    chain(0.7, 0.9, a, 12);
    assert_memory_not_equal(a, sampled, sizeof a);
    chain(0.7, 0.9, b, 12);
    assert_memory_equal(a, b, sizeof a);
    chain(0.7, 0.5, b, 12);
    assert_memory_not_equal(a, b, sizeof a);
    uint64_t s0 = bt_mocker_state_push(0, 5);
    int same = 0;
    for (int i = 1; i < 64; i++) same += bt_mocker_next_token(s0, 7, 0.7, i / 64.0) == bt_mocker_next_token(s0, 7, 0.7, 1.0);
    assert_true(same < 8);
}

/* ---- generation ----------------------------------------------------------------------------- */

static void test_determinism(void **st) {
    (void)st;
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 50, .temperature = 0.7, .seed = 3};
    run_t *a = run_one(&q), *b = run_one(&q);
    assert_int_equal(a->reason, BT_FINISH_LENGTH);
    assert_int_equal(a->n, 50);
    assert_int_equal(b->n, 50);
    assert_memory_equal(a->ids, b->ids, 50 * sizeof(uint32_t));
    assert_string_equal(a->text, b->text);
    /* text is the concatenation of the ids' texts */
    static char t[MAXTEXT];
    ids_text(a->ids, a->n, t, sizeof t);
    assert_string_equal(t, a->text);
    uint32_t pids[256];
    assert_int_equal(a->usage.prompt_tokens, bt_mocker_tokenize(k_prompt, strlen(k_prompt), pids, 256));
    assert_int_equal(a->usage.completion_tokens, 50);
    free(a);
    free(b);
}

static void test_continuation(void **st) {
    (void)st;
    const uint32_t N = 40;
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = N, .temperature = 0.7, .seed = 11};
    run_t *full = run_one(&q);
    assert_int_equal(full->n, N);
    uint32_t pids[256];
    size_t np = bt_mocker_tokenize(k_prompt, strlen(k_prompt), pids, 200);
    const uint32_t ks[] = {0, 1, 2, 7, 20, 39, 40};
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++) {
        uint32_t k = ks[i];
        /* continuation through carried tokens */
        req_t c = q;
        c.carried = full->ids;
        c.n_carried = k;
        c.max_tokens = N - k;
        run_t *r = run_one(&c);
        assert_int_equal(r->n, N - k);
        assert_memory_equal(r->ids, full->ids + k, (N - k) * sizeof(uint32_t));
        assert_int_equal(r->reason, BT_FINISH_LENGTH);
        assert_int_equal(r->usage.completion_tokens, N);
        assert_int_equal(r->usage.prompt_tokens, np);
        static char t[MAXTEXT];
        size_t tl = ids_text(full->ids, k, t, sizeof t);
        assert_int_equal(tl + r->tlen, full->tlen);
        assert_memory_equal(full->text + tl, r->text, r->tlen);
        free(r);

        /* continuation through a token-id prompt: prompt ids ++ g[0..k) */
        uint32_t p2[256];
        memcpy(p2, pids, np * sizeof *p2);
        memcpy(p2 + np, full->ids, k * sizeof *p2);
        req_t d = q;
        d.prompt = NULL;
        d.prompt_ids = p2;
        d.n_prompt_ids = np + k;
        d.max_tokens = N - k;
        r = run_one(&d);
        assert_int_equal(r->n, N - k);
        assert_memory_equal(r->ids, full->ids + k, (N - k) * sizeof(uint32_t));
        free(r);
    }
    /* a one-string array prompt is the same as the string */
    free(full);
}

static void test_chat_prompt(void **st) {
    (void)st;
    json_t *m1 = json_pack("[{s:s,s:s},{s:s,s:s}]", "role", "system", "content", "Be brief.", "role", "user",
                           "content", "Hello there");
    json_t *m2 = json_pack("[{s:s,s:s},{s:s,s:[{s:s,s:s},{s:s,s:s}]}]", "role", "system", "content", "Be brief.",
                           "role", "user", "content", "type", "text", "text", "Hello", "type", "text", "text",
                           " there");
    req_t q = {.api = BT_API_CHAT, .messages = m1, .max_tokens = 30, .seed = 1};
    run_t *a = run_one(&q);
    q.messages = m2;
    run_t *b = run_one(&q);
    assert_int_equal(a->n, 30);
    assert_memory_equal(a->ids, b->ids, 30 * sizeof(uint32_t));
    const char *rendered = "system: Be brief.\nuser: Hello there\nassistant:";
    uint32_t pids[64];
    size_t np = bt_mocker_tokenize(rendered, strlen(rendered), pids, 64);
    assert_int_equal(a->usage.prompt_tokens, np);
    /* same rendering through the completion API with a token-id prompt */
    req_t c = {.api = BT_API_COMPLETION, .prompt_ids = pids, .n_prompt_ids = np, .max_tokens = 30, .seed = 1};
    run_t *d = run_one(&c);
    assert_memory_equal(a->ids, d->ids, 30 * sizeof(uint32_t));
    /* chat continuation */
    q.messages = m1;
    q.carried = a->ids;
    q.n_carried = 12;
    q.max_tokens = 18;
    run_t *e = run_one(&q);
    assert_memory_equal(e->ids, a->ids + 12, 18 * sizeof(uint32_t));
    assert_int_equal(e->usage.completion_tokens, 30);
    json_decref(m1);
    json_decref(m2);
    free(a);
    free(b);
    free(d);
    free(e);
}

static void test_temperature_seed(void **st) {
    (void)st;
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 20, .temperature = 0.0, .seed = 1};
    run_t *a = run_one(&q);
    q.temperature = 0.7;
    run_t *b = run_one(&q);
    q.seed = 2;
    run_t *c = run_one(&q);
    assert_memory_not_equal(a->ids, b->ids, 20 * sizeof(uint32_t));
    assert_memory_not_equal(b->ids, c->ids, 20 * sizeof(uint32_t));
    free(a);
    free(b);
    free(c);
}

/* Finds j so that tokens j and j+1 are words, and builds a stop string spanning them. */
static size_t spanning_stop(const run_t *full, size_t from, char *stop, size_t cap) {
    for (size_t j = from; j + 1 < full->n; j++) {
        size_t la, lb;
        const char *a = bt_mocker_token_text(full->ids[j], &la);
        const char *b = bt_mocker_token_text(full->ids[j + 1], &lb);
        if (a[0] != ' ' || b[0] != ' ') continue;
        /* the last 2 letters of token j, then the space and first letter of token j+1 */
        snprintf(stop, cap, "%.*s%.*s", 2, a + la - 2, 2, b);
        return j;
    }
    fail();
    return 0;
}

static void test_stop_strings(void **st) {
    (void)st;
    const uint32_t N = 80;
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = N, .temperature = 0.7, .seed = 5};
    run_t *full = run_one(&q);
    char stop[32];
    spanning_stop(full, 20, stop, sizeof stop);
    const char *hit = strstr(full->text, stop);
    assert_non_null(hit);
    size_t pos = (size_t)(hit - full->text);

    req_t s = q;
    s.stop[0] = "qqqq"; /* never matches */
    s.stop[1] = stop;
    s.n_stop = 2;
    run_t *r = run_one(&s);
    assert_int_equal(r->reason, BT_FINISH_STOP);
    assert_int_equal(r->tlen, pos);
    assert_memory_equal(r->text, full->text, pos);
    assert_null(strstr(r->text, stop));
    /* delivered ids: exactly the tokens whose text starts before the stop */
    size_t off = 0, want = 0;
    while (want < full->n && off < pos) off += strlen(bt_mocker_token_text(full->ids[want++], NULL));
    assert_int_equal(r->n, want);
    assert_memory_equal(r->ids, full->ids, want * sizeof(uint32_t));
    assert_true(r->usage.completion_tokens >= want);

    /* continuation from any delivered prefix gives the same ending */
    for (size_t k = 0; k + 1 < r->n; k += (r->n / 5) + 1) {
        req_t c = s;
        c.carried = r->ids;
        c.n_carried = (uint32_t)k;
        c.max_tokens = N - (uint32_t)k;
        run_t *x = run_one(&c);
        assert_int_equal(x->reason, BT_FINISH_STOP);
        assert_int_equal(x->n, r->n - k);
        assert_memory_equal(x->ids, r->ids + k, x->n * sizeof(uint32_t));
        static char t[MAXTEXT];
        size_t tl = ids_text(r->ids, k, t, sizeof t);
        assert_int_equal(tl + x->tlen, pos);
        assert_memory_equal(x->text, full->text + tl, x->tlen);
        free(x);
    }

    /* a stop string that starts in carried text and ends in the first new token */
    static char tbuf[MAXTEXT];
    req_t c = q;
    for (size_t j0 = 30;;) {
        size_t j = spanning_stop(full, j0, stop, sizeof stop);
        size_t pre = ids_text(full->ids, j + 1, tbuf, sizeof tbuf);
        if ((size_t)(strstr(full->text, stop) - full->text) != pre - 2) {
            j0 = j + 1; /* the string occurs earlier too: try another */
            continue;
        }
        c.stop[0] = stop;
        c.n_stop = 1;
        c.carried = full->ids;
        c.n_carried = (uint32_t)(j + 1);
        c.max_tokens = N - c.n_carried;
        run_t *x = run_one(&c);
        assert_int_equal(x->reason, BT_FINISH_STOP);
        assert_int_equal(x->n, 0);
        assert_int_equal(x->tlen, 0);
        assert_int_equal(x->usage.completion_tokens, j + 2);
        free(x);
        break;
    }

    /* a stop string wholly inside the carried text: the stream had already ended */
    c.n_carried = 40;
    c.max_tokens = N - 40;
    char inside[8];
    snprintf(inside, sizeof inside, "%s", bt_mocker_token_text(full->ids[10], NULL));
    c.stop[0] = inside;
    run_t *x = run_one(&c);
    assert_int_equal(x->reason, BT_FINISH_STOP);
    assert_int_equal(x->n, 0);
    assert_int_equal(x->usage.completion_tokens, 40);
    free(x);

    /* a stop equal to the text of the first new token: nothing is delivered */
    req_t f = q;
    f.stop[0] = bt_mocker_token_text(full->ids[0], NULL);
    f.n_stop = 1;
    x = run_one(&f);
    assert_int_equal(x->reason, BT_FINISH_STOP);
    assert_int_equal(x->tlen, 0);
    assert_int_equal(x->n, 0);
    assert_int_equal(x->usage.completion_tokens, 1);

    /* a stop string that begins in the middle of a token: that token is delivered, cut */
    free(x);
    const char *t5 = bt_mocker_token_text(full->ids[5], NULL);
    char mid[16];
    snprintf(mid, sizeof mid, "%s", t5 + 2); /* drop " " and the first letter */
    f.stop[0] = mid;
    x = run_one(&f);
    hit = strstr(full->text, mid);
    assert_non_null(hit);
    pos = (size_t)(hit - full->text);
    assert_int_equal(x->reason, BT_FINISH_STOP);
    assert_int_equal(x->tlen, pos);
    assert_memory_equal(x->text, full->text, pos);
    off = 0;
    want = 0;
    while (off < pos) off += strlen(bt_mocker_token_text(full->ids[want++], NULL));
    assert_int_equal(x->n, want);
    free(x);
    free(r);
    free(full);
}

static void test_max_tokens_usage(void **st) {
    (void)st;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    cfg.default_max_tokens = 10;
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    char err[256];
    /* max_tokens 0: finishes at once, but never from inside submit */
    run_t *z = calloc(1, sizeof *z);
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 0};
    assert_int_equal(submit_q(e, &q, z, err, sizeof err), BT_OK);
    assert_int_equal(z->finished, 0);
    /* no max_tokens in the body: the default applies */
    run_t *d = calloc(1, sizeof *d);
    q.no_max_in_body = true;
    assert_int_equal(submit_q(e, &q, d, err, sizeof err), BT_OK);
    /* carried tokens count in usage */
    run_t *c = calloc(1, sizeof *c);
    uint32_t carried[3] = {1, 2, 3};
    req_t qc = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 7, .carried = carried, .n_carried = 3};
    assert_int_equal(submit_q(e, &qc, c, err, sizeof err), BT_OK);
    uv_run(&loop, UV_RUN_DEFAULT);

    assert_int_equal(z->finished, 1);
    assert_int_equal(z->reason, BT_FINISH_LENGTH);
    assert_int_equal(z->n, 0);
    assert_int_equal(z->usage.completion_tokens, 0);
    assert_int_equal(d->n, 10);
    assert_int_equal(d->reason, BT_FINISH_LENGTH);
    assert_int_equal(c->n, 7);
    assert_int_equal(c->usage.completion_tokens, 10);
    bt_engine_load l;
    bt_engine_get_load(e, &l);
    assert_int_equal(l.active_decode_blocks, 0);
    assert_int_equal(l.running + l.waiting + l.active_prefill_tokens, 0);
    bt_engine_destroy(e);
    close_loop(&loop);
    free(z);
    free(d);
    free(c);
}

static void test_bad_requests(void **st) {
    (void)st;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    cfg.num_gpu_blocks = 8;
    cfg.block_size = 4;
    cfg.watermark = 0;
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    char err[256];
    run_t *r = calloc(1, sizeof *r);
    req_t q = {.api = BT_API_COMPLETION, .prompt = "a b c d e", .max_tokens = 28}; /* 5 + 28 > 32 */
    assert_int_equal(submit_q(e, &q, r, err, sizeof err), BT_ERR_CONTEXT_LENGTH); /* the context: the KV cache */
    assert_non_null(strstr(err, "maximum context length is 32 tokens"));
    assert_true(strlen(err) > 0);
    assert_null(r->seq);
    q.max_tokens = 27; /* exactly 32 tokens = 8 blocks: fits */
    assert_int_equal(submit_q(e, &q, r, err, sizeof err), BT_OK);
    bt_engine_kill(e, r->seq);

    uint32_t bad[2] = {5, BT_MOCKER_VOCAB};
    req_t b = {.api = BT_API_COMPLETION, .prompt_ids = bad, .n_prompt_ids = 2, .max_tokens = 3};
    /* an id past the vocabulary is the prompt's fault: the frontend names param "prompt" */
    assert_int_equal(submit_q(e, &b, r, err, sizeof err), BT_ERR_INVALID_PROMPT);
    assert_non_null(strstr(err, "4096"));

    json_t *body = json_pack("{s:[s,s]}", "prompt", "a", "b");
    bt_engine_request req = {.api = BT_API_COMPLETION, .body = body, .max_tokens = 3};
    bt_engine_seq *s = NULL;
    /* a prompt array of several strings is the prompt's fault too (param "prompt") */
    assert_int_equal(bt_engine_submit(e, &req, &k_sink, r, &s, err, sizeof err), BT_ERR_INVALID_PROMPT);
    json_decref(body);
    body = json_pack("{s:i}", "max_tokens", 3);
    req.body = body;
    assert_int_equal(bt_engine_submit(e, &req, &k_sink, r, &s, err, sizeof err), BT_ERR_INVALID);
    req.api = BT_API_CHAT;
    assert_int_equal(bt_engine_submit(e, &req, &k_sink, r, &s, err, sizeof err), BT_ERR_INVALID);
    assert_non_null(strstr(err, "messages"));
    json_decref(body);
    /* a one-string array is a string prompt */
    body = json_pack("{s:[s],s:i}", "prompt", "a b", "max_tokens", 3);
    req.body = body;
    req.api = BT_API_COMPLETION;
    assert_int_equal(bt_engine_submit(e, &req, &k_sink, r, &s, err, sizeof err), BT_OK);
    json_decref(body);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(r->finished, 1);
    assert_int_equal(r->n, 3);
    assert_int_equal(r->usage.prompt_tokens, 2);
    bt_engine_destroy(e);
    close_loop(&loop);
    free(r);
}

/* ---- scheduling and KV accounting ----------------------------------------------------------- */

typedef struct {
    bt_engine *e;
    int loads;
    uint64_t max_blocks, max_running, max_waiting, max_prefill;
    uint64_t cap_blocks, cap_running;
} watch_t;

static void watch_check(watch_t *w) {
    bt_engine_load l;
    bt_engine_get_load(w->e, &l);
    assert_true(l.active_decode_blocks <= l.total_blocks);
    assert_true(l.active_decode_blocks <= w->cap_blocks);
    assert_true(l.running <= w->cap_running);
    if (l.active_decode_blocks > w->max_blocks) w->max_blocks = l.active_decode_blocks;
    if (l.running > w->max_running) w->max_running = l.running;
    if (l.waiting > w->max_waiting) w->max_waiting = l.waiting;
    if (l.active_prefill_tokens > w->max_prefill) w->max_prefill = l.active_prefill_tokens;
}

static void w_on_load(void *ud) {
    watch_t *w = ud;
    w->loads++;
    watch_check(w);
}

static watch_t *g_watch;
static void tok_watch(run_t *r) {
    (void)r;
    watch_check(g_watch);
}

/* Many requests against a constrained engine: all complete, each exactly as it would alone.
 * Request i asks for max_tokens + i % 4 tokens. The workloads are sized to need many ticks (a tick
 * runs at most 64 steps), so that the watch sees intermediate states. */
static void run_pressure(bt_mocker_config cfg, int nreq, uint32_t max_tokens, watch_t *w, bool long_prompts) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_engine_hooks hooks = {.on_load = w_on_load};
    bt_engine *e = bt_mocker_create(&loop, &cfg, &hooks, w);
    w->e = e;
    w->cap_blocks = (uint64_t)cfg.num_gpu_blocks;
    w->cap_running = (uint64_t)cfg.max_num_seqs;
    g_watch = w;
    run_t **runs = calloc((size_t)nreq, sizeof *runs);
    static char prompts[64][512];
    char err[256];
    for (int i = 0; i < nreq; i++) {
        runs[i] = calloc(1, sizeof(run_t));
        runs[i]->on_tok = tok_watch;
        int words = long_prompts ? 90 + i : 2 + i % 3;
        size_t len = 0;
        for (int k = 0; k < words; k++) len += (size_t)snprintf(prompts[i] + len, 512 - len, "w%d ", (i * 7 + k) % 13);
        req_t q = {.api = BT_API_COMPLETION, .prompt = prompts[i], .max_tokens = max_tokens + (uint32_t)(i % 4),
                   .seed = (uint64_t)i};
        assert_int_equal(submit_q(e, &q, runs[i], err, sizeof err), BT_OK);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    bt_engine_load l;
    bt_engine_get_load(e, &l);
    assert_int_equal(l.active_decode_blocks, 0);
    assert_int_equal(l.running, 0);
    assert_int_equal(l.waiting, 0);
    assert_int_equal(l.active_prefill_tokens, 0);
    bt_engine_destroy(e);
    close_loop(&loop);
    for (int i = 0; i < nreq; i++) {
        assert_int_equal(runs[i]->finished, 1);
        assert_int_equal(runs[i]->reason, BT_FINISH_LENGTH);
        uint32_t want = max_tokens + (uint32_t)(i % 4);
        assert_int_equal(runs[i]->n, want);
        /* scheduling (waiting, preemption, chunking) never changes the tokens */
        req_t q = {.api = BT_API_COMPLETION, .prompt = prompts[i], .max_tokens = want, .seed = (uint64_t)i};
        run_t *alone = run_one(&q);
        assert_memory_equal(alone->ids, runs[i]->ids, want * sizeof(uint32_t));
        free(alone);
        free(runs[i]);
    }
    free(runs);
    assert_true(w->loads > 0);
}

static void test_kv_tiny(void **st) {
    (void)st;
    bt_mocker_config cfg = fast_cfg();
    cfg.num_gpu_blocks = 8;
    cfg.block_size = 4;
    cfg.watermark = 0;
    cfg.max_num_seqs = 8;
    cfg.max_num_batched_tokens = 16;
    watch_t w = {0};
    run_pressure(cfg, 40, 20, &w, false); /* each needs up to 27 tokens = 7 of the 8 blocks */
    assert_true(w.max_waiting > 0);
    assert_true(w.max_blocks <= 8);
}

static void test_chunked_prefill(void **st) {
    (void)st;
    bt_mocker_config cfg = fast_cfg();
    cfg.num_gpu_blocks = 200;
    cfg.block_size = 4;
    cfg.max_num_batched_tokens = 4;
    watch_t w = {0};
    run_pressure(cfg, 6, 5, &w, true); /* prompts of ~90 tokens, 4 prefilled per step */
    assert_true(w.max_prefill > 4);
}

static void test_max_num_seqs(void **st) {
    (void)st;
    bt_mocker_config cfg = fast_cfg();
    cfg.max_num_seqs = 3;
    watch_t w = {0};
    run_pressure(cfg, 10, 40, &w, false);
    assert_true(w.max_running >= 1 && w.max_running <= 3); /* ≤ 3 is also checked at every observation */
    assert_true(w.max_waiting > 0);
}

/* Waiting sequences are admitted by (priority, arrival): with one sequence at a time, they finish
 * in that order whatever order they were submitted in. */
static void test_priority_order(void **st) {
    (void)st;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    cfg.max_num_seqs = 1;
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    assert_non_null(e);
    static const int32_t prio[] = {5, 5, 0, 9, 0, -3};
    static const int want[] = {4, 5, 2, 6, 3, 1}; /* the finishing position of each */
    run_t *r[6];
    char err[256];
    g_finished = 0;
    for (int i = 0; i < 6; i++) {
        r[i] = calloc(1, sizeof *r[i]);
        req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 5, .priority = prio[i]};
        assert_int_equal(submit_q(e, &q, r[i], err, sizeof err), BT_OK);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    for (int i = 0; i < 6; i++) {
        assert_int_equal(r[i]->finished, 1);
        assert_int_equal(r[i]->n, 5);
        if (r[i]->order != want[i]) fail_msg("sequence %d (priority %d) finished %d-th, not %d-th", i, prio[i],
                                             r[i]->order, want[i]);
        free(r[i]);
    }
    bt_engine_destroy(e);
    close_loop(&loop);
}

/* Priority preemption: with one sequence slot, a priority-0 arrival preempts the running
 * priority-10 sequence (which then continues exactly as it would have alone), and a priority-10
 * arrival, equal to it, does not: it waits behind the victim, which arrived before it. */
typedef struct {
    run_t *b, *c;
    req_t qb, qc;
    bool sent;
} prio_arrivals;

static void submit_arrivals_once(run_t *r) {
    prio_arrivals *pa = r->arg;
    if (pa->sent) return;
    pa->sent = true;
    char err[256];
    assert_int_equal(submit_q(r->e, &pa->qb, pa->b, err, sizeof err), BT_OK); /* equal priority first */
    assert_int_equal(submit_q(r->e, &pa->qc, pa->c, err, sizeof err), BT_OK);
}

static void test_priority_preempt(void **st) {
    (void)st;
    bt_mocker_config cfg = fast_cfg();
    cfg.max_num_seqs = 1;
    req_t qa = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 300, .priority = 10,
                .temperature = 0.8, .seed = 42};
    run_t *ref = run_one_cfg(&cfg, &qa);
    assert_int_equal(ref->n, 300);

    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    assert_non_null(e);
    run_t *a = calloc(1, sizeof *a);
    prio_arrivals pa = {.b = calloc(1, sizeof(run_t)), .c = calloc(1, sizeof(run_t))};
    pa.qb = (req_t){.api = BT_API_COMPLETION, .prompt = "equal", .max_tokens = 5, .priority = 10};
    /* long enough to hold the victim off for more steps than a tick runs, so that its wait is
     * delivered before it runs again (a wait over by the drain is not told) */
    pa.qc = (req_t){.api = BT_API_COMPLETION, .prompt = "urgent", .max_tokens = 200, .priority = 0};
    a->on_tok = submit_arrivals_once;
    a->arg = &pa;
    char err[256];
    g_finished = 0;
    g_tell_waits = true;
    assert_int_equal(submit_q(e, &qa, a, err, sizeof err), BT_OK);
    uv_run(&loop, UV_RUN_DEFAULT);
    g_tell_waits = false;
    assert_true(pa.sent);
    assert_true(a->finished == 1 && pa.b->finished == 1 && pa.c->finished == 1);
    assert_true(a->after_end_calls == 0 && pa.b->after_end_calls == 0 && pa.c->after_end_calls == 0);
    if (pa.c->order != 1 || a->order != 2 || pa.b->order != 3)
        fail_msg("finishing order urgent %d, victim %d, equal %d (want 1, 2, 3)", pa.c->order, a->order, pa.b->order);
    /* the victim's output is exactly its run alone: nothing repeated, nothing different */
    assert_int_equal(a->n, ref->n);
    assert_memory_equal(a->ids, ref->ids, ref->n * sizeof ref->ids[0]);
    assert_string_equal(a->text, ref->text);
    bt_engine_kv_stats k;
    bt_engine_kv_stats_get(e, &k);
    assert_int_equal(k.preempted_priority, 1);
    assert_int_equal(k.preempted_kv, 0);
    /* the waits its sinks were told: the victim once, preempted, after the tokens it had made and
     * before the rest; the equal arrival once, queued behind it; the urgent one, admitted at its
     * first step, never */
    assert_int_equal(a->waits[BT_ENGINE_WAIT_PREEMPTED], 1);
    assert_int_equal(a->waits[BT_ENGINE_WAIT_QUEUED], 0);
    if (a->wait_n == 0 || a->wait_n >= ref->n) fail_msg("the victim was told its wait after %zu tokens", a->wait_n);
    assert_int_equal(pa.b->waits[BT_ENGINE_WAIT_QUEUED], 1);
    assert_int_equal(pa.b->waits[BT_ENGINE_WAIT_PREEMPTED], 0);
    assert_int_equal(pa.b->wait_n, 0);
    assert_int_equal(pa.c->waits[0] + pa.c->waits[1], 0);
    free(a);
    free(pa.b);
    free(pa.c);
    free(ref);
    bt_engine_destroy(e);
    close_loop(&loop);
}

/* The load report's victims (engine.h): the preemptible decoding sequences of the least urgent
 * running priority, less the waiting ones more urgent than them; a sequence preempted for priority
 * is not one again before its next token. */
static void test_priority_victims(void **st) {
    (void)st;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    cfg.max_num_seqs = 3;
    cfg.speedup_ratio = 50; /* steps of well under a millisecond, but real ones: the test acts between them */
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    assert_non_null(e);
    char err[256];
    run_t *r[4];
    static const int32_t prio[] = {10, 10, 5, 0};
    for (int i = 0; i < 4; i++) r[i] = calloc(1, sizeof *r[i]);
    bt_engine_load l;
    bt_engine_get_load(e, &l);
    assert_true(l.victims == 0 && l.victim_priority == 0); /* idle: nothing to preempt */
    for (int i = 0; i < 3; i++) {
        req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 2000, .priority = prio[i]};
        assert_int_equal(submit_q(e, &q, r[i], err, sizeof err), BT_OK);
    }
    bt_engine_get_load(e, &l);
    assert_int_equal(l.victims, 0); /* waiting, not decoding: nothing a newcomer could take yet */
    while (r[0]->n < 3 || r[1]->n < 3 || r[2]->n < 3) uv_run(&loop, UV_RUN_ONCE);
    bt_engine_get_load(e, &l);
    if (l.victims != 2 || l.victim_priority != 10)
        fail_msg("three running (10, 10, 5): victims %llu of priority %lld, want 2 of 10",
                 (unsigned long long)l.victims, (long long)l.victim_priority);
    /* an urgent arrival, not yet admitted, claims one of them */
    req_t qu = {.api = BT_API_COMPLETION, .prompt = "urgent", .max_tokens = 2000, .priority = prio[3]};
    assert_int_equal(submit_q(e, &qu, r[3], err, sizeof err), BT_OK);
    bt_engine_get_load(e, &l);
    assert_int_equal(l.victims, 1);
    assert_int_equal(l.victim_priority, 10);
    /* admitted by preempting one priority-10 sequence: the other is still a victim, the preempted
     * one is not (it waits, and is held until its next token) */
    while (r[3]->n < 1) uv_run(&loop, UV_RUN_ONCE);
    bt_engine_kv_stats k;
    bt_engine_kv_stats_get(e, &k);
    assert_int_equal(k.preempted_priority, 1);
    bt_engine_get_load(e, &l);
    assert_int_equal(l.victims, 1);
    assert_int_equal(l.victim_priority, 10);
    for (int i = 0; i < 4; i++) { /* all gone: nothing to preempt */
        if (r[i]->seq) bt_engine_kill(e, r[i]->seq);
        r[i]->seq = NULL;
    }
    bt_engine_get_load(e, &l);
    assert_true(l.victims == 0 && l.victim_priority == 0);
    for (int i = 0; i < 4; i++) free(r[i]);
    bt_engine_destroy(e);
    close_loop(&loop);
}

/* ---- kill, stop, re-entrancy ---------------------------------------------------------------- */

static void kill_other_after_3(run_t *r) {
    run_t *other = r->arg;
    if (r->n >= 3 && other && other->seq) {
        bt_engine_kill(r->e, other->seq);
        other->seq = NULL;
        r->arg = NULL;
    }
}

static void test_kill(void **st) {
    (void)st;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    cfg.max_num_seqs = 2;
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    char err[256];
    run_t *a = calloc(1, sizeof *a), *b = calloc(1, sizeof *b), *c = calloc(1, sizeof *c), *d = calloc(1, sizeof *d);
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 200};
    assert_int_equal(submit_q(e, &q, a, err, sizeof err), BT_OK);
    assert_int_equal(submit_q(e, &q, b, err, sizeof err), BT_OK);
    assert_int_equal(submit_q(e, &q, c, err, sizeof err), BT_OK); /* waits: max_num_seqs 2 */
    assert_int_equal(submit_q(e, &q, d, err, sizeof err), BT_OK);
    /* kill from inside a callback: a kills b once it has 3 tokens */
    a->on_tok = kill_other_after_3;
    a->arg = b;
    /* run until a has some tokens */
    while (a->n < 10) uv_run(&loop, UV_RUN_ONCE);
    assert_null(b->seq);
    size_t b_n = b->n;
    bt_engine_load l0, l1;
    bt_engine_get_load(e, &l0);
    assert_true(l0.active_decode_blocks > 0);
    /* kill a waiting sequence: no callback ever */
    bt_engine_kill(e, d->seq);
    bt_engine_get_load(e, &l1);
    assert_int_equal(l1.waiting + 1, l0.waiting);
    /* kill a running one: its blocks are free at once */
    bt_engine_get_load(e, &l0);
    bt_engine_kill(e, a->seq);
    bt_engine_get_load(e, &l1);
    assert_true(l1.active_decode_blocks < l0.active_decode_blocks);
    assert_int_equal(l1.running + 1, l0.running);
    size_t a_n = a->n;
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(a->n, a_n);
    assert_int_equal(a->finished + a->errored, 0);
    assert_int_equal(b->n, b_n);
    assert_int_equal(b->finished + b->errored, 0);
    assert_int_equal(d->n + d->calls + d->finished + d->errored, 0);
    assert_int_equal(c->finished, 1);
    assert_int_equal(c->n, 200);
    bt_engine_get_load(e, &l1);
    assert_int_equal(l1.active_decode_blocks, 0);
    bt_engine_destroy(e);
    close_loop(&loop);
    free(a);
    free(b);
    free(c);
    free(d);
}

static void kill_self_after_2(run_t *r) {
    if (r->n >= 2 && r->seq) {
        bt_engine_kill(r->e, r->seq);
        r->seq = NULL;
    }
}

static void stop_self_after_2(run_t *r) {
    if (r->n >= 2 && r->seq && !r->arg) {
        bt_engine_stop(r->e, r->seq);
        r->arg = r; /* only once */
    }
}

static void test_stop(void **st) {
    (void)st;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    cfg.max_num_seqs = 3;
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    char err[256];
    run_t *a = calloc(1, sizeof *a), *b = calloc(1, sizeof *b), *c = calloc(1, sizeof *c), *w = calloc(1, sizeof *w),
          *k = calloc(1, sizeof *k);
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 300};
    assert_int_equal(submit_q(e, &q, a, err, sizeof err), BT_OK);
    b->on_tok = stop_self_after_2;
    assert_int_equal(submit_q(e, &q, b, err, sizeof err), BT_OK);
    k->on_tok = kill_self_after_2;
    assert_int_equal(submit_q(e, &q, k, err, sizeof err), BT_OK);
    /* a stop string keeps tokens held back; stop releases them with the finish */
    req_t qs = q;
    qs.stop[0] = "zzzzzz";
    qs.n_stop = 1;
    assert_int_equal(submit_q(e, &qs, c, err, sizeof err), BT_OK); /* waits: max_num_seqs 3 */
    assert_int_equal(submit_q(e, &q, w, err, sizeof err), BT_OK);  /* waits */
    bt_engine_stop(e, w->seq);
    assert_int_equal(w->finished, 0); /* never from inside stop */
    while (a->n < 5) uv_run(&loop, UV_RUN_ONCE);
    bt_engine_stop(e, a->seq);
    assert_int_equal(a->finished, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(a->finished, 1);
    assert_int_equal(a->reason, BT_FINISH_CANCELLED);
    assert_int_equal(a->usage.completion_tokens, a->n);
    assert_true(a->n < 300);
    assert_int_equal(b->finished, 1);
    assert_int_equal(b->reason, BT_FINISH_CANCELLED);
    assert_int_equal(b->usage.completion_tokens, b->n);
    assert_int_equal(w->finished, 1);
    assert_int_equal(w->reason, BT_FINISH_CANCELLED);
    assert_int_equal(w->n, 0);
    assert_int_equal(k->finished + k->errored, 0);
    assert_int_equal(c->finished, 1);
    assert_int_equal(c->n, 300);
    assert_int_equal(a->after_end_calls + b->after_end_calls + c->after_end_calls + w->after_end_calls, 0);
    bt_engine_destroy(e);
    close_loop(&loop);
    free(a);
    free(b);
    free(c);
    free(w);
    free(k);
}

static void stop_with_held(run_t *r) {
    /* stop after the first delivery: held tokens come out with the cancel */
    if (!r->arg) {
        bt_engine_stop(r->e, r->seq);
        r->arg = r;
    }
}

static void test_stop_releases_held(void **st) {
    (void)st;
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 100, .seed = 9};
    run_t *full = run_one(&q);
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    run_t *r = calloc(1, sizeof *r);
    r->on_tok = stop_with_held;
    q.stop[0] = "e zq"; /* holds back tokens ending in "e" but never matches ("zq" cannot occur) */
    q.n_stop = 1;
    char err[256];
    assert_int_equal(submit_q(e, &q, r, err, sizeof err), BT_OK);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(r->finished, 1);
    assert_int_equal(r->reason, BT_FINISH_CANCELLED);
    assert_memory_equal(r->ids, full->ids, r->n * sizeof(uint32_t));
    static char t[MAXTEXT];
    ids_text(r->ids, r->n, t, sizeof t);
    assert_string_equal(t, r->text);
    bt_engine_destroy(e);
    close_loop(&loop);
    free(r);
    free(full);
}

static void destroy_in_cb(run_t *r) {
    if (r->e) {
        bt_engine_destroy(r->e);
        r->e = NULL;
    }
}

static void test_destroy(void **st) {
    (void)st;
    /* destroy with live sequences: no callbacks, nothing leaks */
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    run_t *a = calloc(1, sizeof *a), *b = calloc(1, sizeof *b);
    char err[256];
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 300, .stop = {"zzz"}, .n_stop = 1};
    assert_int_equal(submit_q(e, &q, a, err, sizeof err), BT_OK);
    assert_int_equal(submit_q(e, &q, b, err, sizeof err), BT_OK);
    while (a->n < 5) uv_run(&loop, UV_RUN_ONCE);
    size_t an = a->n;
    bt_engine_destroy(e);
    close_loop(&loop);
    assert_int_equal(a->n, an);
    assert_int_equal(a->finished + a->errored + b->finished + b->errored, 0);

    /* destroy from inside a sink callback */
    uv_loop_init(&loop);
    e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    memset(a, 0, sizeof *a);
    memset(b, 0, sizeof *b);
    assert_int_equal(submit_q(e, &q, a, err, sizeof err), BT_OK);
    assert_int_equal(submit_q(e, &q, b, err, sizeof err), BT_OK);
    a->on_tok = destroy_in_cb;
    close_loop(&loop);
    assert_true(a->calls == 1);
    assert_int_equal(a->finished + b->finished + a->errored + b->errored, 0);
    free(a);
    free(b);
}

/* ---- fault hooks ---------------------------------------------------------------------------- */

typedef struct {
    int dead;
    char why[128];
    int loads;
} hooks_t;

static void h_dead(void *ud, const char *why) {
    hooks_t *h = ud;
    h->dead++;
    snprintf(h->why, sizeof h->why, "%s", why);
}

static void h_load(void *ud) { ((hooks_t *)ud)->loads++; }

static void test_fault_die(void **st) {
    (void)st;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    cfg.fault_die_after_tokens = 10;
    hooks_t h = {0};
    bt_engine_hooks hooks = {.on_load = h_load, .on_dead = h_dead};
    bt_engine *e = bt_mocker_create(&loop, &cfg, &hooks, &h);
    run_t *a = calloc(1, sizeof *a);
    char err[256];
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 100};
    assert_int_equal(submit_q(e, &q, a, err, sizeof err), BT_OK);
    uv_run(&loop, UV_RUN_DEFAULT); /* the timer stops once dead */
    assert_int_equal(h.dead, 1);
    assert_string_equal(h.why, "mocker fault: engine dead");
    assert_int_equal(a->n, 10);
    assert_int_equal(a->finished + a->errored, 0);
    /* a dead engine refuses work and makes no callbacks */
    run_t *b = calloc(1, sizeof *b);
    assert_int_equal(submit_q(e, &q, b, err, sizeof err), BT_ERR_ENGINE);
    bt_engine_stop(e, a->seq);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(a->finished + a->errored, 0);
    bt_engine_kill(e, a->seq);
    bt_engine_destroy(e);
    close_loop(&loop);
    free(a);
    free(b);

    /* injected: on_dead comes from the loop, not from inside inject */
    uv_loop_init(&loop);
    cfg.fault_die_after_tokens = 0;
    memset(&h, 0, sizeof h);
    e = bt_mocker_create(&loop, &cfg, &hooks, &h);
    bt_mocker_inject(e, BT_MOCKER_FAULT_DIE);
    assert_int_equal(h.dead, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(h.dead, 1);
    bt_engine_destroy(e);
    close_loop(&loop);
}

static void test_fault_error(void **st) {
    (void)st;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    cfg.fault_error_after_tokens = 5;
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    run_t *a = calloc(1, sizeof *a), *b = calloc(1, sizeof *b), *c = calloc(1, sizeof *c);
    char err[256];
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 50};
    assert_int_equal(submit_q(e, &q, a, err, sizeof err), BT_OK);
    assert_int_equal(submit_q(e, &q, b, err, sizeof err), BT_OK);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(a->errored, 1);
    assert_int_equal(b->errored, 1);
    assert_int_equal(a->err, BT_ERR_ENGINE);
    assert_string_equal(a->errmsg, "mocker fault: engine error");
    assert_true(a->n + b->n <= 5);
    assert_int_equal(a->after_end_calls + b->after_end_calls, 0);
    /* one-shot: the engine keeps serving */
    assert_int_equal(submit_q(e, &q, c, err, sizeof err), BT_OK);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(c->finished, 1);
    assert_int_equal(c->n, 50);
    bt_engine_load l;
    bt_engine_get_load(e, &l);
    assert_int_equal(l.active_decode_blocks, 0);
    bt_engine_destroy(e);
    close_loop(&loop);
    free(a);
    free(b);
    free(c);
}

static void test_fault_stall(void **st) {
    (void)st;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    cfg.fault_stall_after_tokens = 5;
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    run_t *a = calloc(1, sizeof *a);
    char err[256];
    req_t q = {.api = BT_API_COMPLETION, .prompt = k_prompt, .max_tokens = 30};
    assert_int_equal(submit_q(e, &q, a, err, sizeof err), BT_OK);
    uv_run(&loop, UV_RUN_DEFAULT); /* returns: a stalled engine has no timer running */
    assert_int_equal(a->n, 5);
    assert_int_equal(a->finished, 0);
    bt_mocker_inject(e, BT_MOCKER_FAULT_RESUME);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(a->finished, 1);
    assert_int_equal(a->n, 30);
    /* injected stall and resume */
    memset(a, 0, sizeof *a);
    assert_int_equal(submit_q(e, &q, a, err, sizeof err), BT_OK);
    bt_mocker_inject(e, BT_MOCKER_FAULT_STALL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(a->n, 0);
    bt_mocker_inject(e, BT_MOCKER_FAULT_RESUME);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(a->n, 30);
    bt_engine_destroy(e);
    close_loop(&loop);
    free(a);
}

/* ---- configuration, card, timing ------------------------------------------------------------ */

static void test_config(void **st) {
    (void)st;
    bt_mocker_config c;
    char err[256];
    bt_mocker_config_default(&c);
    assert_int_equal(c.num_gpu_blocks, 16384);
    assert_int_equal(c.block_size, 64);
    assert_int_equal(c.max_num_seqs, 256);
    assert_int_equal(c.max_num_batched_tokens, 8192);
    assert_true(c.watermark == 0.01);
    assert_true(c.speedup_ratio == 1.0);
    assert_int_equal(c.default_max_tokens, 256);
    assert_int_equal(c.fault_die_after_tokens + c.fault_stall_after_tokens + c.fault_error_after_tokens, 0);
    assert_int_equal(bt_mocker_config_check(&c, err, sizeof err), BT_OK);

#define BAD(field, value, word)                                                   \
    do {                                                                          \
        bt_mocker_config b = c;                                                   \
        b.field = value;                                                          \
        err[0] = '\0';                                                            \
        assert_int_equal(bt_mocker_config_check(&b, err, sizeof err), BT_ERR_INVALID); \
        assert_non_null(strstr(err, word));                                       \
        uv_loop_t l;                                                              \
        uv_loop_init(&l);                                                         \
        assert_null(bt_mocker_create(&l, &b, NULL, NULL));                        \
        close_loop(&l);                                                           \
    } while (0)
    BAD(block_size, 1, "block_size");
    BAD(block_size, 0, "block_size");
    BAD(num_gpu_blocks, 0, "num_gpu_blocks");
    BAD(num_gpu_blocks, -5, "num_gpu_blocks");
    BAD(max_num_seqs, 0, "max_num_seqs");
    BAD(max_num_batched_tokens, -1, "max_num_batched_tokens");
    BAD(watermark, 1.0, "watermark");
    BAD(watermark, -0.1, "watermark");
    BAD(watermark, NAN, "watermark");
    BAD(speedup_ratio, 0.0, "speedup_ratio");
    BAD(speedup_ratio, -2.0, "speedup_ratio");
    BAD(default_max_tokens, 0, "default_max_tokens");
    BAD(fault_die_after_tokens, -1, "fault");
#undef BAD
    bt_mocker_config b = c;
    b.watermark = 0.0;
    assert_int_equal(bt_mocker_config_check(&b, err, sizeof err), BT_OK);
}

static void test_card(void **st) {
    (void)st;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_mocker_config cfg = fast_cfg();
    cfg.num_gpu_blocks = 1000;
    cfg.block_size = 16;
    cfg.max_num_seqs = 7;
    cfg.max_num_batched_tokens = 512;
    bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    json_t *card = json_object();
    bt_engine_card(e, card);
    assert_int_equal(json_integer_value(json_object_get(card, "total_kv_blocks")), 1000);
    assert_int_equal(json_integer_value(json_object_get(card, "block_size")), 16);
    assert_int_equal(json_integer_value(json_object_get(card, "max_num_seqs")), 7);
    assert_int_equal(json_integer_value(json_object_get(card, "max_num_batched_tokens")), 512);
    json_decref(card);
    bt_engine_load l;
    bt_engine_get_load(e, &l);
    assert_int_equal(l.total_blocks, 1000);
    assert_int_equal(l.max_num_batched_tokens, 512);
    assert_int_equal(l.active_decode_blocks + l.running + l.waiting, 0);
    bt_engine_destroy(e);
    close_loop(&loop);
}

static void test_timing(void **st) {
    (void)st;
    /* speedup 1: prefill of a short prompt ≈ 16.6 ms + 4 decode steps of ≈ 5.74 ms ≈ 40 ms */
    bt_mocker_config cfg;
    bt_mocker_config_default(&cfg);
    req_t q = {.api = BT_API_COMPLETION, .prompt = "hi", .max_tokens = 4};
    uint64_t t0 = bt_now_ns();
    run_t *r = run_one_cfg(&cfg, &q);
    double ms = (double)(bt_now_ns() - t0) / 1e6;
    assert_int_equal(r->n, 4);
    assert_true(ms >= 38.0);
    assert_true(ms < 400.0);
    /* at this speed a tick runs one step, so tokens arrive one per step (a tick delayed by a loaded
     * machine may merge two) */
    assert_true(r->calls >= 2 && r->calls <= 4);
    free(r);

    /* a high speedup coalesces many tokens per on_tokens call */
    cfg.speedup_ratio = 1e6;
    q.max_tokens = 1000;
    r = run_one_cfg(&cfg, &q);
    assert_int_equal(r->n, 1000);
    assert_true(r->calls < 100);
    free(r);
}

/* ---- batch gathering (--batch-gather-us, the timerfd) ----------------------------------------- */

typedef struct {
    bt_engine *e;
    run_t *r;          /* runs[0..4] */
    uint64_t last_ns;  /* bt_now_ns() just before the last arrival of the burst */
    uint64_t done_ns;  /* bt_now_ns() when the action ran */
    req_t *q;
} gather_t;

/* 10 ms into the gather: four more arrive, the third of them (runs[3]) is killed at once */
static void g_burst(uv_timer_t *t) {
    gather_t *g = t->data;
    char err[256];
    for (int i = 1; i <= 4; i++) {
        if (i == 4) g->last_ns = bt_now_ns();
        assert_int_equal(submit_q(g->e, g->q, &g->r[i], err, sizeof err), BT_OK);
    }
    bt_engine_kill(g->e, g->r[3].seq);
    uv_close((uv_handle_t *)t, NULL);
}

static void g_kill0(uv_timer_t *t) {
    gather_t *g = t->data;
    bt_engine_kill(g->e, g->r[0].seq);
    g->done_ns = bt_now_ns();
    uv_close((uv_handle_t *)t, NULL);
}

static void g_submit1(uv_timer_t *t) {
    gather_t *g = t->data;
    char err[256];
    bt_engine_load l;
    bt_engine_get_load(g->e, &l);
    assert_int_equal(l.waiting + l.running, 0);
    g->last_ns = bt_now_ns();
    assert_int_equal(submit_q(g->e, g->q, &g->r[1], err, sizeof err), BT_OK);
    uv_close((uv_handle_t *)t, NULL);
}

static void g_destroy(uv_timer_t *t) {
    gather_t *g = t->data;
    bt_engine_destroy(g->e);
    g->done_ns = bt_now_ns();
    uv_close((uv_handle_t *)t, NULL);
}

static int open_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    assert_non_null(d);
    int n = 0;
    while (readdir(d)) n++;
    closedir(d);
    return n;
}

/* With --batch-gather-us the first step of an idle mocker waits on a timerfd: a burst that arrives
 * during the wait is answered in one step (max_tokens 1: admitted, prefilled and answered in one
 * step, so steps counts the parts the burst was admitted in) after the window that followed its
 * last arrival; a sequence killed during the wait is not in it and hears nothing; a gather whose
 * only sequence is killed ends at once (nothing stays armed: the loop ends long before the
 * deadline) and the next request, after the dead gather's bound, waits a window of its own; a
 * destroy while the timerfd is armed ends the loop at once with every handle closed; and engines
 * destroyed while armed leave no descriptor open. */
static void test_batch_gather(void **st) {
    (void)st;
    bt_mocker_config cfg = fast_cfg();
    req_t q = {.api = BT_API_COMPLETION, .prompt = "hi", .max_tokens = 1};
    run_t *r = calloc(5, sizeof *r);
    char err[256];
    uv_loop_t loop;
    uv_timer_t t1, t2;
    gather_t g = {.r = r, .q = &q};
    bt_engine_kv_stats k;

    /* a burst and a kill during the wait (50 ms window) */
    cfg.batch_gather_us = 50000;
    uv_loop_init(&loop);
    g.e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    assert_non_null(g.e);
    assert_int_equal(submit_q(g.e, &q, &r[0], err, sizeof err), BT_OK);
    uv_timer_init(&loop, &t1);
    t1.data = &g;
    uv_timer_start(&t1, g_burst, 10, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    for (int i = 0; i <= 4; i++) {
        assert_int_equal(r[i].after_end_calls, 0);
        assert_int_equal(r[i].errored, 0);
        if (i == 3) {
            assert_int_equal(r[i].n + (size_t)r[i].finished, 0); /* killed: absent */
            continue;
        }
        assert_int_equal(r[i].finished, 1);
        assert_int_equal(r[i].n, 1);
        assert_true(r[i].first_ns >= g.last_ns + 50000u * 1000u);
    }
    bt_engine_kv_stats_get(g.e, &k);
    assert_int_equal(k.steps, 1);
    assert_int_equal(k.gathers, 1);
    assert_int_equal(k.gathered_seqs, 4);
    assert_true(k.gather_ns >= 50000u * 1000u);
    bt_engine_destroy(g.e);
    close_loop(&loop);

    /* the only sequence killed during the wait (20 ms window, bound 160 ms); the next request 300 ms
     * later gathers afresh */
    memset(r, 0, 5 * sizeof *r);
    cfg.batch_gather_us = 20000;
    uv_loop_init(&loop);
    g.e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    assert_int_equal(submit_q(g.e, &q, &r[0], err, sizeof err), BT_OK);
    uv_timer_init(&loop, &t1);
    uv_timer_init(&loop, &t2);
    t1.data = t2.data = &g;
    uv_timer_start(&t1, g_kill0, 5, 0);
    uv_timer_start(&t2, g_submit1, 300, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(r[0].n + (size_t)r[0].finished + (size_t)r[0].errored, 0);
    assert_int_equal(r[1].finished, 1);
    assert_true(r[1].first_ns >= g.last_ns + 20000u * 1000u);
    bt_engine_kv_stats_get(g.e, &k);
    assert_int_equal(k.steps, 1);
    assert_int_equal(k.gathers, 1);
    assert_int_equal(k.gathered_seqs, 1);
    bt_engine_destroy(g.e);
    close_loop(&loop);

    /* ... and nothing stays armed after it (1 s window): the loop ends right after the kill */
    memset(r, 0, 5 * sizeof *r);
    cfg.batch_gather_us = 1000000;
    uv_loop_init(&loop);
    g.e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    assert_int_equal(submit_q(g.e, &q, &r[0], err, sizeof err), BT_OK);
    uv_timer_init(&loop, &t1);
    t1.data = &g;
    uv_timer_start(&t1, g_kill0, 5, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    uint64_t left = bt_now_ns() - g.done_ns;
    assert_true(left < 500u * 1000000u); /* the deadline was ~1 s away */
    assert_int_equal(r[0].calls + r[0].finished + r[0].errored, 0);
    bt_engine_load l;
    bt_engine_get_load(g.e, &l);
    assert_int_equal(l.waiting + l.running, 0);
    bt_engine_destroy(g.e);
    close_loop(&loop);

    /* a destroy while the timerfd is armed: no callback, the loop ends at once, every handle closed */
    memset(r, 0, 5 * sizeof *r);
    uv_loop_init(&loop);
    g.e = bt_mocker_create(&loop, &cfg, NULL, NULL);
    assert_int_equal(submit_q(g.e, &q, &r[0], err, sizeof err), BT_OK);
    assert_int_equal(submit_q(g.e, &q, &r[1], err, sizeof err), BT_OK);
    uv_timer_init(&loop, &t1);
    t1.data = &g;
    uv_timer_start(&t1, g_destroy, 10, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_true(bt_now_ns() - g.done_ns < 500u * 1000000u);
    assert_int_equal(r[0].calls + r[1].calls + r[0].finished + r[1].finished + r[0].errored + r[1].errored, 0);
    assert_int_equal(uv_loop_close(&loop), 0);

    /* 200 engines on one loop, one after the other (1 ms window), each destroyed while its timerfd
     * is armed or, every other one, after its request was answered (its gather ended by the timerfd,
     * whose descriptor number the previous engine had used): no descriptor is left behind */
    cfg.batch_gather_us = 1000;
    uv_loop_init(&loop);
    int fds = open_fds();
    for (int i = 0; i < 200; i++) {
        memset(r, 0, sizeof *r);
        bt_engine *e = bt_mocker_create(&loop, &cfg, NULL, NULL);
        assert_non_null(e);
        assert_int_equal(submit_q(e, &q, r, err, sizeof err), BT_OK);
        uv_run(&loop, i % 2 ? UV_RUN_DEFAULT : UV_RUN_NOWAIT); /* NOWAIT: the first tick arms the timerfd */
        if (i % 2) {
            assert_int_equal(r->finished, 1);
            assert_int_equal(r->n, 1);
            bt_engine_kv_stats_get(e, &k);
            assert_int_equal(k.gathers, 1);
        }
        bt_engine_destroy(e);
        uv_run(&loop, UV_RUN_DEFAULT);
        if (!(i % 2)) assert_int_equal(r->calls + r->finished + r->errored, 0);
    }
    assert_int_equal(open_fds(), fds);
    close_loop(&loop);
    free(r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vocab_readable),
        cmocka_unit_test(test_tokenizer),
        cmocka_unit_test(test_token_function),
        cmocka_unit_test(test_token_function_top_p),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_continuation),
        cmocka_unit_test(test_chat_prompt),
        cmocka_unit_test(test_temperature_seed),
        cmocka_unit_test(test_stop_strings),
        cmocka_unit_test(test_max_tokens_usage),
        cmocka_unit_test(test_bad_requests),
        cmocka_unit_test(test_kv_tiny),
        cmocka_unit_test(test_chunked_prefill),
        cmocka_unit_test(test_priority_order),
        cmocka_unit_test(test_priority_preempt),
        cmocka_unit_test(test_priority_victims),
        cmocka_unit_test(test_max_num_seqs),
        cmocka_unit_test(test_kill),
        cmocka_unit_test(test_stop),
        cmocka_unit_test(test_stop_releases_held),
        cmocka_unit_test(test_destroy),
        cmocka_unit_test(test_fault_die),
        cmocka_unit_test(test_fault_error),
        cmocka_unit_test(test_fault_stall),
        cmocka_unit_test(test_config),
        cmocka_unit_test(test_card),
        cmocka_unit_test(test_timing),
        cmocka_unit_test(test_batch_gather),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
