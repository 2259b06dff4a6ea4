/* fuzz_request_body.c — libFuzzer driver for the frontend's OpenAI body validation
 * (fe_validate_body in src/frontend/request.c) and for what the mocker engine does with a body
 * that passed it (prompt rendering, tokenizer, stop strings; src/engine/mocker/).
 *
 * The first input byte picks the API (chat or completions); the rest is the request body. It goes
 * through json_loadb and fe_validate_body as the frontend does; the answer must be the same with a
 * tiny error buffer, a rejection must come with a NUL-terminated reason, and an accepted body must
 * satisfy the documented contract (a string model, non-empty messages of objects with a string
 * role, or a prompt of a string / one string / token ids, max_tokens in range, stream_options only
 * with stream true, and so on; a role, content part type or tool_choice one of its fixed values
 * over its whole length, the model and stop strings free of U+0000, where a C string would stop).
 * An accepted body is then submitted to a mocker engine as a worker
 * would (max_tokens capped at 16, stop strings, carried_token_ids) and generated to the end: the
 * engine must accept it unless the prompt holds ids outside its vocabulary or it does not fit,
 * finish exactly once, deliver text that matches its token ids and contains no stop string, stay
 * within max_tokens, and be idle with every KV block free afterwards. The raw bytes also go through
 * the mocker tokenizer, whose output must re-tokenize to itself once turned back into text. A
 * violated invariant aborts, so libFuzzer reports it like a crash. Seeds are in
 * fuzz/corpus/request_body/; build and run with fuzz/build.sh. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* memmem */
#endif
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "check.h"
#include "common/jstr.h"
#include "common/log.h"
#include "common/util.h"
#include "engine/mocker/mocker.h"
#include "frontend/fe.h"

#define MAX_NEW 16u
/* the mocker's context length (prompt + completion), at most what its 64 blocks of 16 admit */
#define CONTEXT 512u
#define MAX_CARRIED 64u
#define MAX_TOKENS_LIMIT 1000000 /* request.c's bound, documented in docs/security.md */

static uv_loop_t g_loop;
static bt_engine *g_engine;

/* ---- the mocker tokenizer ---- */

static void check_tokenizer(const uint8_t *p, size_t n) {
    uint32_t *ids = malloc((n + 1) * sizeof *ids);
    CHECK(ids != NULL);
    size_t k = bt_mocker_tokenize((const char *)p, n, ids, n + 1);
    CHECK(k <= n);
    bt_buf text;
    bt_buf_init(&text, 64u * 1024 * 1024);
    for (size_t i = 0; i < k; i++) {
        CHECK(ids[i] < BT_MOCKER_VOCAB);
        size_t l;
        const char *t = bt_mocker_token_text(ids[i], &l);
        CHECK(l >= 1 && l <= 7 && strlen(t) == l);
        CHECK(bt_buf_append(&text, t, l) == BT_OK);
    }
    /* text made of token texts tokenizes back to the same ids */
    uint32_t *again = malloc((text.len + 1) * sizeof *again);
    CHECK(again != NULL);
    size_t k2 = bt_mocker_tokenize(text.data ? text.data : "", text.len, again, text.len + 1);
    CHECK(k2 == k && (k == 0 || memcmp(ids, again, k * sizeof *ids) == 0));
    /* a short output array is filled up to its cap and the full count is still returned */
    if (k > 1) CHECK(bt_mocker_tokenize((const char *)p, n, again, 1) == k && again[0] == ids[0]);
    free(again);
    free(ids);
    bt_buf_free(&text);
}

/* ---- the validator's contract ---- */

/* s is a JSON string without U+0000 (a C string reads all of it) */
static bool whole(const json_t *s) {
    return json_is_string(s) && strlen(json_string_value(s)) == json_string_length(s);
}

/* s is one of the NULL-ended list, compared over its whole length */
static bool one_of(const json_t *s, const char *const *vals) {
    for (; *vals; vals++)
        if (whole(s) && strcmp(json_string_value(s), *vals) == 0) return true;
    return false;
}

static void check_accepted(const json_t *b, bt_api api) {
    CHECK(json_is_object(b));
    CHECK(whole(json_object_get(b, "model")));
    if (api == BT_API_CHAT) {
        static const char *const roles[] = {"system", "developer", "user", "assistant", "tool", "function", NULL};
        static const char *const text[] = {"text", NULL}, *const refusal[] = {"refusal", NULL};
        const json_t *msgs = json_object_get(b, "messages");
        CHECK(json_is_array(msgs) && json_array_size(msgs) > 0);
        size_t i, j;
        const json_t *m, *part;
        json_array_foreach(msgs, i, m) {
            CHECK(json_is_object(m) && one_of(json_object_get(m, "role"), roles));
            const json_t *c = json_object_get(m, "content");
            /* null or absent only on an assistant message with its calls, or a function message */
            bool calls = json_array_size(json_object_get(m, "tool_calls")) > 0 ||
                         json_is_object(json_object_get(m, "function_call"));
            const char *role = json_string_value(json_object_get(m, "role"));
            if (!c || json_is_null(c))
                CHECK((strcmp(role, "assistant") == 0 && calls) || strcmp(role, "function") == 0);
            else CHECK(json_is_string(c) || (json_is_array(c) && json_array_size(c) > 0));
            json_array_foreach(c, j, part) {
                const json_t *type = json_object_get(part, "type");
                /* required; "text\u0000image_url" is not a text part; a refusal is an assistant's */
                CHECK(one_of(type, text) || (one_of(type, refusal) && strcmp(role, "assistant") == 0));
                CHECK(bt_jstr_part_text(part)); /* the words every engine renders */
            }
        }
    } else {
        const json_t *p = json_object_get(b, "prompt");
        CHECK(json_is_string(p) || json_is_array(p));
        if (json_is_array(p)) {
            CHECK(json_array_size(p) > 0);
            bool one_string = json_array_size(p) == 1 && json_is_string(json_array_get(p, 0));
            size_t i;
            const json_t *v;
            if (!one_string)
                json_array_foreach(p, i, v) CHECK(json_is_integer(v) && json_integer_value(v) >= 0 &&
                                                  json_integer_value(v) <= (json_int_t)UINT32_MAX);
        }
    }
    const char *ints[] = {"max_tokens", "max_completion_tokens"};
    for (int i = 0; i < 2; i++) {
        const json_t *v = json_object_get(b, ints[i]);
        if (v && !json_is_null(v))
            CHECK(json_is_integer(v) && json_integer_value(v) >= 0 && json_integer_value(v) <= MAX_TOKENS_LIMIT);
    }
    const json_t *t = json_object_get(b, "temperature");
    if (t && !json_is_null(t)) CHECK(json_is_number(t) && json_number_value(t) >= 0 && json_number_value(t) <= 2);
    const json_t *st = json_object_get(b, "stream");
    if (st) CHECK(json_is_boolean(st) || json_is_null(st));
    const json_t *so = json_object_get(b, "stream_options"); /* only on a stream, as OpenAI's */
    if (so && !json_is_null(so)) CHECK(json_is_object(so) && json_is_true(st));
    /* an integral real (1.0) was written back as the integer: engines read integers only */
    const json_t *n = json_object_get(b, "n");
    if (n && !json_is_null(n)) CHECK(json_is_integer(n) && json_integer_value(n) == 1);
    const json_t *tlp = json_object_get(b, "top_logprobs");
    if (tlp && !json_is_null(tlp)) CHECK(json_is_integer(tlp) && json_integer_value(tlp) == 0);
    const json_t *seed = json_object_get(b, "seed");
    if (seed && !json_is_null(seed)) CHECK(json_is_integer(seed));
    const json_t *stop = json_object_get(b, "stop");
    if (stop && !json_is_null(stop)) {
        if (json_is_string(stop)) {
            CHECK(json_string_length(stop) > 0);
        } else {
            CHECK(json_is_array(stop) && json_array_size(stop) <= BT_MAX_STOP);
            size_t i;
            const json_t *v;
            json_array_foreach(stop, i, v) CHECK(whole(v) && json_string_length(v) > 0);
        }
        if (json_is_string(stop)) CHECK(whole(stop)); /* matched as C strings, whole */
    }
    static const char *const choices[] = {"none", "auto", NULL};
    const char *choice[] = {"tool_choice", "function_call"};
    for (int i = 0; i < 2; i++) {
        const json_t *v = json_object_get(b, choice[i]);
        CHECK(!v || json_is_null(v) || one_of(v, choices));
    }
}

/* ---- the mocker, as a worker would drive it ---- */

typedef struct {
    int finishes, errors;
    bt_finish_reason reason;
    bt_usage usage;
    bt_status err;
    uint32_t ids[MAX_NEW + 1];
    size_t nids;
    bool ids_overflow;
    bt_buf text;
} sink_state;

static void on_tokens(void *ud, const uint32_t *ids, size_t n, const char *text, size_t len) {
    sink_state *s = ud;
    CHECK(s->finishes == 0 && s->errors == 0);
    CHECK(n > 0);
    for (size_t i = 0; i < n; i++) {
        if (s->nids < MAX_NEW) s->ids[s->nids] = ids[i];
        else s->ids_overflow = true;
        s->nids++;
    }
    CHECK(bt_buf_append(&s->text, text, len) == BT_OK);
}

static void on_finish(void *ud, bt_finish_reason reason, const bt_usage *usage) {
    sink_state *s = ud;
    CHECK(s->finishes == 0 && s->errors == 0);
    s->finishes++;
    s->reason = reason;
    s->usage = *usage;
    uv_stop(&g_loop);
}

static void on_error(void *ud, bt_status code, const char *msg) {
    sink_state *s = ud;
    CHECK(s->finishes == 0 && s->errors == 0);
    CHECK(msg != NULL);
    s->errors++;
    s->err = code;
    uv_stop(&g_loop);
}

static const bt_engine_sink g_sink = {on_tokens, on_finish, on_error, NULL};

static size_t mk_len(uint32_t id) {
    size_t l;
    bt_mocker_token_text(id, &l);
    return l;
}

static void run_mocker(const json_t *body, bt_api api) {
    bt_engine_request er;
    memset(&er, 0, sizeof er);
    er.request_id = "fuzz";
    er.api = api;
    er.body = body;
    const json_t *mt = json_object_get(body, "max_completion_tokens");
    if (!json_is_integer(mt)) mt = json_object_get(body, "max_tokens");
    uint32_t max_new = json_is_integer(mt) && json_integer_value(mt) < MAX_NEW ? (uint32_t)json_integer_value(mt)
                                                                                : MAX_NEW;
    er.max_tokens = max_new;
    const json_t *t = json_object_get(body, "temperature");
    er.temperature = json_is_number(t) ? json_number_value(t) : 1.0;
    const json_t *seed = json_object_get(body, "seed");
    er.seed = json_is_integer(seed) ? (uint64_t)json_integer_value(seed) : 0;
    const json_t *stop = json_object_get(body, "stop");
    if (json_is_string(stop)) er.stop[er.n_stop++] = json_string_value(stop);
    size_t i;
    const json_t *v;
    if (json_is_array(stop)) json_array_foreach(stop, i, v) er.stop[er.n_stop++] = json_string_value(v);
    /* carried tokens as a continuing client names them (the worker takes them from the body) */
    uint32_t carried[MAX_CARRIED];
    const json_t *jc = json_object_get(body, "carried_token_ids");
    if (json_is_array(jc)) {
        json_array_foreach(jc, i, v) {
            if (er.n_carried >= MAX_CARRIED || !json_is_integer(v) || json_integer_value(v) < 0 ||
                json_integer_value(v) > (json_int_t)UINT32_MAX)
                break;
            carried[er.n_carried++] = (uint32_t)json_integer_value(v);
        }
    }
    er.carried = carried;

    sink_state s;
    memset(&s, 0, sizeof s);
    bt_buf_init(&s.text, 1u << 20);
    bt_engine_seq *seq = NULL;
    char err[256];
    bt_status st = bt_engine_submit(g_engine, &er, &g_sink, &s, &seq, err, sizeof err);
    bool bad_ids = false;
    const json_t *p = json_object_get(body, "prompt");
    if (api == BT_API_COMPLETION && json_is_array(p))
        json_array_foreach(p, i, v) bad_ids = bad_ids || (json_is_integer(v) && json_integer_value(v) >= BT_MOCKER_VOCAB);
    if (st != BT_OK) {
        CHECK(seq == NULL && strlen(err) > 0);
        /* a validated body is refused only for ids outside the vocabulary (the prompt's fault,
         * BT_ERR_INVALID_PROMPT: a 400 naming "prompt") or for its size */
        CHECK((st == BT_ERR_INVALID_PROMPT && bad_ids) || st == BT_ERR_TOO_LARGE || st == BT_ERR_CONTEXT_LENGTH);
    } else {
        CHECK(seq != NULL && !bad_ids);
        uv_run(&g_loop, UV_RUN_DEFAULT);
        CHECK(s.finishes + s.errors == 1);
        CHECK(s.errors == 0); /* no fault hooks: the mocker does not fail a sequence */
        CHECK(s.nids <= max_new);
        CHECK(s.usage.completion_tokens >= er.n_carried + s.nids);
        CHECK(s.usage.completion_tokens <= er.n_carried + max_new);
        /* "length": max_tokens reached, or, without an explicit max_tokens, the context is full (the
         * default shrinks to what fits, as OpenAI and vLLM apply it) */
        bool explicit_max = json_is_integer(json_object_get(body, "max_completion_tokens")) ||
                            json_is_integer(json_object_get(body, "max_tokens"));
        if (s.reason == BT_FINISH_LENGTH)
            CHECK(s.usage.completion_tokens == er.n_carried + max_new ||
                  (!explicit_max && s.usage.prompt_tokens + s.usage.completion_tokens == CONTEXT));
        /* the text is that of the ids; only a stop string may cut the last token short */
        bt_buf want;
        bt_buf_init(&want, 1u << 20);
        for (size_t k = 0; k < s.nids && k < MAX_NEW; k++) {
            size_t l;
            const char *tt = bt_mocker_token_text(s.ids[k], &l);
            CHECK(bt_buf_append(&want, tt, l) == BT_OK);
        }
        if (s.reason == BT_FINISH_STOP && er.n_stop > 0) {
            CHECK(s.text.len <= want.len);
            /* a delivered token keeps at least one byte of its text */
            if (s.nids) CHECK(s.text.len + mk_len(s.ids[s.nids - 1]) > want.len);
        } else {
            CHECK(s.text.len == want.len);
        }
        CHECK(s.text.len == 0 || memcmp(s.text.data, want.data, s.text.len) == 0);
        for (int k = 0; k < er.n_stop; k++)
            if (er.stop[k][0] && s.text.len)
                CHECK(memmem(s.text.data, s.text.len, er.stop[k], strlen(er.stop[k])) == NULL);
        bt_buf_free(&want);
    }
    bt_buf_free(&s.text);
    /* back to baseline: nothing queued or running, every KV block free */
    bt_engine_load l;
    bt_engine_get_load(g_engine, &l);
    CHECK(l.waiting == 0 && l.running == 0 && l.active_decode_blocks == 0 && l.active_prefill_tokens == 0);
}

/* Called by libFuzzer once, before the first input. */
int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    setenv("DYN_LOG", "error", 1);
    bt_log_init("fuzz");
    CHECK(uv_loop_init(&g_loop) == 0);
    bt_mocker_config c;
    bt_mocker_config_default(&c);
    c.speedup_ratio = 1e9; /* steps take no real time */
    c.num_gpu_blocks = 64; /* small, so that "does not fit" is reachable */
    c.block_size = 16;
    c.context_length = CONTEXT; /* known here, so that the oracle can check the default's cap */
    g_engine = bt_mocker_create(&g_loop, &c, NULL, NULL);
    CHECK(g_engine != NULL);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    bt_api api = (data[0] & 1) ? BT_API_COMPLETION : BT_API_CHAT;
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    check_tokenizer(data + 1, len);

    json_error_t jerr;
    json_t *body = json_loadb(text, len, FE_BODY_JSON_FLAGS, &jerr); /* as the frontend parses */
    if (!body) {
        CHECK(jerr.text[0] != '\0');
        return 0;
    }
    char err[256], small[8];
    err[0] = small[0] = 'x';
    bool ok = fe_validate_body(body, api, err, sizeof err);
    bool ok_small = fe_validate_body(body, api, small, sizeof small);
    CHECK(ok == ok_small);
    if (!ok) {
        CHECK(memchr(err, 0, sizeof err) && err[0] != '\0');
        CHECK(memchr(small, 0, sizeof small) && small[0] != '\0');
        CHECK(strncmp(err, small, sizeof small - 1) == 0);
    } else {
        check_accepted(body, api);
        run_mocker(body, api);
    }
    json_decref(body);
    return 0;
}
