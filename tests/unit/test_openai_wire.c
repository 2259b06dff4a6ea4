/* test_openai_wire.c — unit tests of the openai engine's pure helpers
 * (src/engine/openai/openai_wire.c).
 *
 * Covers: text-mode ids and the classification of carried ids (none, upstream ids, text, mixed);
 * chunk parsing for chat and completion streams, the usage chunk, [DONE], error objects (and which
 * of them are migratable), finish reasons, unary answers and every malformed shape; the upstream
 * request for a first attempt and for each continuation plan (baton carried_token_ids, token-id
 * prompts, vLLM /tokenize, text continuation for completions and chats, impossible cases); the
 * /tokenize body and answer; upstream kind and model detection from /v1/models; and vLLM's
 * Prometheus gauges. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/openai/openai_wire.h"

/* ---- text-mode ids ------------------------------------------------------------------------ */

static void test_text_ids(void **state) {
    (void)state;
    uint32_t t[3] = {bt_oa_text_id(0), bt_oa_text_id(1), bt_oa_text_id(0x80000005ull)};
    for (int i = 0; i < 3; i++) assert_true(bt_oa_is_text_id(t[i]));
    assert_int_equal(t[1] & 0x7fffffffu, 1);
    assert_int_equal(t[2] & 0x7fffffffu, 5); /* positions wrap; only the tag matters */
    assert_false(bt_oa_is_text_id(0x7fffffffu));
    assert_int_equal(bt_oa_carried_classify(NULL, 0), BT_OA_CARRIED_NONE);
    assert_int_equal(bt_oa_carried_classify(t, 3), BT_OA_CARRIED_TEXT);
    uint32_t real[] = {0, 17, 0x7fffffffu};
    assert_int_equal(bt_oa_carried_classify(real, 3), BT_OA_CARRIED_IDS);
    uint32_t mixed[] = {t[0], 17};
    assert_int_equal(bt_oa_carried_classify(mixed, 2), BT_OA_CARRIED_MIXED);
}

/* ---- chunks --------------------------------------------------------------------------------- */

static bt_oa_chunk parse(const char *s, bool unary, bt_status want) {
    bt_oa_chunk c;
    char err[256] = "";
    bt_status st = bt_oa_parse_chunk(s, strlen(s), unary, &c, err, sizeof err);
    if (st != want) fprintf(stderr, "parse %s: %d (%s)\n", s, st, err);
    assert_int_equal(st, want);
    if (st != BT_OK) assert_true(err[0] != '\0');
    return c;
}

static void test_chunks(void **state) {
    (void)state;
    bt_oa_chunk c = parse("{\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\" hi\"},"
                          "\"finish_reason\":null,\"token_ids\":[5,4095]}]}",
                          false, BT_OK);
    assert_int_equal(c.text_len, 3);
    assert_memory_equal(c.text, " hi", 3);
    assert_true(c.has_ids);
    assert_int_equal(c.n_ids, 2);
    assert_int_equal(c.ids[1], 4095);
    assert_int_equal(c.finish, BT_OA_FINISH_NONE);
    assert_false(c.has_usage || c.done || c.is_error);
    bt_oa_chunk_free(&c);

    c = parse("{\"choices\":[{\"index\":0,\"text\":\"x\",\"finish_reason\":\"length\"}]}", false, BT_OK);
    assert_int_equal(c.text_len, 1);
    assert_false(c.has_ids);
    assert_int_equal(c.finish, BT_FINISH_LENGTH);
    bt_oa_chunk_free(&c);

    c = parse("{\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}", false, BT_OK);
    assert_null(c.text);
    assert_int_equal(c.finish, BT_FINISH_STOP);
    bt_oa_chunk_free(&c);
    c = parse("{\"choices\":[{\"delta\":{\"content\":null},\"finish_reason\":\"abort\"}]}", false, BT_OK);
    assert_int_equal(c.finish, BT_OA_FINISH_ABORT);
    bt_oa_chunk_free(&c);
    c = parse("{\"choices\":[{\"text\":\"\",\"finish_reason\":\"cancelled\"}]}", false, BT_OK);
    assert_int_equal(c.finish, BT_FINISH_CANCELLED);
    bt_oa_chunk_free(&c);
    /* OpenAI's reasons pass through; a server's own is the answer's end it chose: stop */
    static const struct {
        const char *name;
        int want;
    } reasons[] = {{"content_filter", BT_FINISH_CONTENT_FILTER},
                   {"tool_calls", BT_FINISH_TOOL_CALLS},
                   {"function_call", BT_FINISH_FUNCTION_CALL},
                   {"eos", BT_FINISH_STOP}};
    for (size_t i = 0; i < sizeof reasons / sizeof reasons[0]; i++) {
        char js[128];
        snprintf(js, sizeof js, "{\"choices\":[{\"text\":\"\",\"finish_reason\":\"%s\"}]}", reasons[i].name);
        c = parse(js, false, BT_OK);
        assert_int_equal(c.finish, reasons[i].want);
        bt_oa_chunk_free(&c);
    }

    c = parse("{\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":20,\"total_tokens\":27}}",
              false, BT_OK);
    assert_true(c.has_usage);
    assert_int_equal(c.prompt_tokens, 7);
    assert_int_equal(c.completion_tokens, 20);
    bt_oa_chunk_free(&c);

    c = parse(" [DONE] ", false, BT_OK);
    assert_true(c.done);
    bt_oa_chunk_free(&c);

    /* U+0000 is valid JSON in a string: kept, with the length that counts it */
    c = parse("{\"choices\":[{\"index\":0,\"text\":\"a\\u0000b\"}]}", false, BT_OK);
    assert_int_equal(c.text_len, 3);
    assert_memory_equal(c.text, "a\0b", 3);
    bt_oa_chunk_free(&c);

    /* an error's param and string code are kept for the client */
    c = parse("{\"error\":{\"message\":\"too hot\",\"type\":\"invalid_request_error\",\"param\":\"temperature\","
              "\"code\":\"invalid_value\"}}",
              true, BT_OK);
    assert_true(c.is_error);
    assert_string_equal(c.err_param, "temperature");
    assert_string_equal(c.err_scode, "invalid_value");
    bt_oa_chunk_free(&c);

    /* choices other than index 0 are not ours */
    c = parse("{\"choices\":[{\"index\":1,\"text\":\"no\"},{\"index\":0,\"text\":\"yes\"}]}", false, BT_OK);
    assert_memory_equal(c.text, "yes", 3);
    bt_oa_chunk_free(&c);

    /* unary answers */
    c = parse("{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"whole\"},"
              "\"finish_reason\":\"stop\",\"token_ids\":[1,2,3]}],\"usage\":{\"prompt_tokens\":1,"
              "\"completion_tokens\":3}}",
              true, BT_OK);
    assert_memory_equal(c.text, "whole", 5);
    assert_int_equal(c.n_ids, 3);
    assert_true(c.has_usage);
    bt_oa_chunk_free(&c);
}

static void test_errors(void **state) {
    (void)state;
    /* each error body: the status it maps to (and whether that migrates), and the message kept */
    static const struct {
        const char *body;
        bt_status code;
        bool migratable;
        const char *msg; /* NULL: not checked */
    } errs[] = {
        {"{\"error\":{\"message\":\"All workers are busy\",\"type\":\"Service Unavailable\",\"code\":503}}",
         BT_ERR_UPSTREAM_BUSY, true, "All workers are busy"},
        {"{\"error\":{\"message\":\"slow down\",\"type\":\"requests\",\"code\":\"rate_limit_exceeded\"}}",
         BT_ERR_UPSTREAM_RATE_LIMITED, true, "slow down"},
        {"{\"error\":{\"message\":\"bad\",\"type\":\"invalid_request_error\",\"code\":null}}", BT_ERR_INVALID, false,
         NULL},
        /* OpenAI's string codes, as a baton frontend upstream sends them */
        {"{\"error\":{\"message\":\"busy\",\"type\":\"server_error\",\"param\":null,\"code\":\"worker_unavailable\"}}",
         BT_ERR_UPSTREAM_BUSY, true, NULL},
        {"{\"error\":{\"message\":\"busy\",\"type\":\"server_error\",\"param\":null,\"code\":\"overloaded\"}}",
         BT_ERR_UPSTREAM_BUSY, true, NULL},
        {"{\"error\":{\"message\":\"x\",\"type\":\"server_error\",\"param\":null,\"code\":\"engine_error\"}}",
         BT_ERR_ENGINE, false, NULL},
        {"{\"error\":{\"message\":\"long\",\"type\":\"invalid_request_error\",\"param\":\"messages\","
         "\"code\":\"context_length_exceeded\"}}",
         BT_ERR_CONTEXT_LENGTH, false, NULL},
        {"{\"error\":\"plain\"}", BT_ERR_ENGINE, false, "plain"},
    };
    bt_oa_chunk c;
    for (size_t i = 0; i < sizeof errs / sizeof errs[0]; i++) {
        c = parse(errs[i].body, false, BT_OK);
        assert_true(c.is_error);
        assert_int_equal(c.err_code, errs[i].code);
        assert_int_equal(bt_status_migratable(c.err_code), errs[i].migratable);
        if (errs[i].msg) assert_string_equal(c.err_msg, errs[i].msg);
        bt_oa_chunk_free(&c);
    }
    /* malformed */
    const char *bad[] = {"not json", "[1,2]", "{\"choices\":{}}", "{\"choices\":[7]}",
                         "{\"choices\":[{\"text\":5}]}", "{\"choices\":[{\"text\":\"a\",\"token_ids\":\"x\"}]}",
                         "{\"choices\":[{\"text\":\"a\",\"token_ids\":[-1]}]}",
                         "{\"choices\":[{\"text\":\"a\",\"token_ids\":[1.5]}]}",
                         "{\"choices\":[{\"text\":\"a\",\"token_ids\":[2147483648]}]}", ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        c = parse(bad[i], false, BT_ERR_PROTOCOL);
        bt_oa_chunk_free(&c);
    }
    /* HTTP statuses: those another worker's upstream might serve are migratable */
    long mig[] = {408, 429, 502, 503, 504};
    for (size_t i = 0; i < 5; i++) assert_true(bt_status_migratable(bt_oa_status_for_http(mig[i])));
    long not_mig[] = {400, 401, 403, 404, 413, 422, 500, 501};
    for (size_t i = 0; i < 8; i++) assert_false(bt_status_migratable(bt_oa_status_for_http(not_mig[i])));
    /* a busy upstream is not a dead worker: its refusals have codes of their own, which the
     * frontend retries without quarantining the worker; a refused connection stays a dead upstream */
    assert_int_equal(bt_oa_status_for_http(429), BT_ERR_UPSTREAM_RATE_LIMITED);
    assert_int_equal(bt_oa_status_for_http(503), BT_ERR_UPSTREAM_BUSY);
    assert_int_equal(bt_oa_status_for_http(504), BT_ERR_UPSTREAM_BUSY);
    assert_int_equal(bt_oa_status_for_http(502), BT_ERR_CANNOT_CONNECT);
    assert_true(bt_status_upstream_busy(BT_ERR_UPSTREAM_BUSY) && bt_status_upstream_busy(BT_ERR_UPSTREAM_RATE_LIMITED));
    assert_false(bt_status_upstream_busy(BT_ERR_CANNOT_CONNECT));
    /* the upstream's Retry-After, as the engine writes it at the head of the message */
    static const char ok[] = "retry after 20 s: the upstream answered HTTP 429";
    assert_int_equal(bt_status_retry_after(ok, sizeof ok - 1), 20);
    assert_int_equal(bt_status_retry_after(ok, 16), 20); /* "retry after 20 s" */
    assert_int_equal(bt_status_retry_after(ok, 15), 0);  /* cut before the unit */
    const char *none[] = {"the upstream answered HTTP 503", "retry after s: x", "retry after 0 s: x",
                          "retry after 86401 s: x", "retry after 99999999999999999999 s: x", "retry after 5s", ""};
    for (size_t i = 0; i < sizeof none / sizeof none[0]; i++)
        assert_int_equal(bt_status_retry_after(none[i], strlen(none[i])), 0);
}

/* ---- requests ------------------------------------------------------------------------------- */

static json_t *js(const char *s) {
    json_t *j = json_loads(s, 0, NULL);
    assert_non_null(j);
    return j;
}

static json_t *build_ok(const bt_oa_build *b, const char *want_path) {
    const char *path = NULL;
    json_t *out = NULL;
    char err[256] = "";
    bt_status st = bt_oa_build_request(b, &path, &out, err, sizeof err);
    if (st != BT_OK) fprintf(stderr, "build: %s\n", err);
    assert_int_equal(st, BT_OK);
    assert_string_equal(path, want_path);
    assert_true(json_is_true(json_object_get(out, "stream")));
    assert_true(json_is_true(json_object_get(json_object_get(out, "stream_options"), "include_usage")));
    assert_int_equal(json_integer_value(json_object_get(out, "max_tokens")), b->max_tokens);
    assert_null(json_object_get(out, "max_completion_tokens"));
    return out;
}

static void ids_eq(const json_t *arr, const uint32_t *want, size_t n) {
    assert_true(json_is_array(arr));
    assert_int_equal(json_array_size(arr), n);
    for (size_t i = 0; i < n; i++) assert_int_equal(json_integer_value(json_array_get(arr, i)), want[i]);
}

static void test_first_attempt(void **state) {
    (void)state;
    json_t *body = js("{\"model\":\"front\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],"
                      "\"max_completion_tokens\":50,\"temperature\":0.5,\"seed\":3,\"stream\":false,\"n\":1,"
                      "\"logprobs\":true,\"stop\":[\"x\"]}");
    bt_oa_build b = {.api = BT_API_CHAT, .body = body, .model = "up-model", .kind = BT_OA_KIND_BATON, .max_tokens = 50};
    json_t *out = build_ok(&b, "/v1/chat/completions");
    assert_string_equal(json_string_value(json_object_get(out, "model")), "up-model");
    assert_true(json_is_true(json_object_get(out, "return_token_ids")));
    assert_null(json_object_get(out, "n"));
    assert_null(json_object_get(out, "logprobs"));
    assert_null(json_object_get(out, "carried_token_ids"));
    assert_true(json_equal(json_object_get(out, "messages"), json_object_get(body, "messages")));
    assert_true(json_equal(json_object_get(out, "stop"), json_object_get(body, "stop")));
    assert_int_equal(json_integer_value(json_object_get(out, "seed")), 3);
    json_decref(out);
    /* a server of unknown kind gets nothing beyond the OpenAI API */
    b.kind = BT_OA_KIND_OPENAI;
    b.model = NULL;
    out = build_ok(&b, "/v1/chat/completions");
    assert_null(json_object_get(out, "return_token_ids"));
    assert_string_equal(json_string_value(json_object_get(out, "model")), "front");
    json_decref(out);
    /* the client's body is never modified */
    assert_int_equal(json_integer_value(json_object_get(body, "max_completion_tokens")), 50);
    assert_true(json_is_false(json_object_get(body, "stream")));
    json_decref(body);
}

static void test_continuations(void **state) {
    (void)state;
    char err[256];
    uint32_t car[] = {11, 12, 13};
    json_t *chat = js("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"tools\":[]}");
    json_t *comp_s = js("{\"model\":\"m\",\"prompt\":\"Once upon\"}");
    json_t *comp_ids = js("{\"model\":\"m\",\"prompt\":[1,2]}");

    /* baton: the ids go as carried_token_ids, on either API */
    bt_oa_build b = {.api = BT_API_CHAT, .body = chat, .kind = BT_OA_KIND_BATON, .max_tokens = 7, .carried = car,
                     .n_carried = 3};
    assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_DIRECT);
    json_t *out = build_ok(&b, "/v1/chat/completions");
    ids_eq(json_object_get(out, "carried_token_ids"), car, 3);
    json_decref(out);

    /* a token-id prompt takes the carried ids on any kind that gives ids */
    b = (bt_oa_build){.api = BT_API_COMPLETION, .body = comp_ids, .kind = BT_OA_KIND_VLLM, .max_tokens = 7,
                      .carried = car, .n_carried = 3};
    assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_DIRECT);
    out = build_ok(&b, "/v1/completions");
    uint32_t want1[] = {1, 2, 11, 12, 13};
    ids_eq(json_object_get(out, "prompt"), want1, 5);
    json_decref(out);

    /* vLLM, chat or text prompt: /tokenize first, then a completion of prompt ids + carried */
    b = (bt_oa_build){.api = BT_API_CHAT, .body = chat, .kind = BT_OA_KIND_VLLM, .max_tokens = 7, .carried = car,
                      .n_carried = 3, .model = "up"};
    assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_TOKENIZE);
    const char *path;
    assert_int_equal(bt_oa_build_request(&b, &path, &out, err, sizeof err), BT_ERR_INVALID);
    json_t *tk = bt_oa_tokenize_body(&b);
    assert_string_equal(json_string_value(json_object_get(tk, "model")), "up");
    assert_true(json_equal(json_object_get(tk, "messages"), json_object_get(chat, "messages")));
    assert_true(json_is_true(json_object_get(tk, "add_generation_prompt")));
    assert_non_null(json_object_get(tk, "tools"));
    json_decref(tk);
    uint32_t pids[] = {100, 101};
    b.prompt_ids = pids;
    b.n_prompt_ids = 2;
    b.have_prompt_ids = true;
    out = build_ok(&b, "/v1/completions");
    uint32_t want2[] = {100, 101, 11, 12, 13};
    ids_eq(json_object_get(out, "prompt"), want2, 5);
    assert_null(json_object_get(out, "messages"));
    assert_null(json_object_get(out, "tools"));
    json_decref(out);
    b = (bt_oa_build){.api = BT_API_COMPLETION, .body = comp_s, .kind = BT_OA_KIND_VLLM, .carried = car,
                      .n_carried = 3};
    assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_TOKENIZE);
    tk = bt_oa_tokenize_body(&b);
    assert_string_equal(json_string_value(json_object_get(tk, "prompt")), "Once upon");
    json_decref(tk);

    /* no way to tokenize: impossible, with a reason */
    b.kind = BT_OA_KIND_OPENAI;
    err[0] = '\0';
    assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_IMPOSSIBLE);
    assert_true(err[0] != '\0');
    assert_int_equal(bt_oa_build_request(&b, &path, &out, err, sizeof err), BT_ERR_INVALID);

    /* text: only a raw completion the operator declared, prompt text + delivered text */
    uint32_t packed[] = {bt_oa_text_id(0), bt_oa_text_id(1)};
    size_t np = 2;
    b = (bt_oa_build){.api = BT_API_COMPLETION, .body = comp_s, .kind = BT_OA_KIND_OPENAI, .max_tokens = 4,
                      .carried = packed, .n_carried = np, .carried_text = " there", .carried_text_len = 6,
                      .raw_completions = true};
    out = build_ok(&b, "/v1/completions");
    assert_string_equal(json_string_value(json_object_get(out, "prompt")), "Once upon there");
    json_decref(out);
    assert_string_equal(json_string_value(json_object_get(comp_s, "prompt")), "Once upon"); /* untouched */
    b.raw_completions = false; /* not declared: refused, and it says so */
    err[0] = '\0';
    assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_IMPOSSIBLE);
    assert_non_null(strstr(err, "--upstream-raw-completions"));
    assert_int_equal(bt_oa_build_request(&b, &path, &out, err, sizeof err), BT_ERR_INVALID);
    assert_null(out);
    /* a chat continues from text only where the upstream renders it (llama.cpp): as a raw completion
     * of the rendered prompt + the delivered text */
    b = (bt_oa_build){.api = BT_API_CHAT, .body = chat, .kind = BT_OA_KIND_LLAMACPP, .max_tokens = 4,
                      .carried = packed, .n_carried = np, .carried_text = " there", .carried_text_len = 6,
                      .raw_completions = true};
    assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_RENDER);
    assert_int_equal(bt_oa_build_request(&b, &path, &out, err, sizeof err), BT_ERR_INVALID);
    json_t *rb = bt_oa_render_body(&b);
    assert_true(json_equal(json_object_get(rb, "messages"), json_object_get(chat, "messages")));
    assert_non_null(json_object_get(rb, "tools"));
    assert_null(json_object_get(rb, "model"));
    json_decref(rb);
    char *rendered;
    size_t rl;
    const char *ans = "{\"prompt\":\"<|user|>Hi<|assistant|>\"}";
    assert_int_equal(bt_oa_read_rendered(ans, strlen(ans), &rendered, &rl, err, sizeof err), BT_OK);
    assert_int_equal(rl, strlen("<|user|>Hi<|assistant|>"));
    free(rendered);
    assert_int_equal(bt_oa_read_rendered("{\"tokens\":[1]}", 14, &rendered, &rl, err, sizeof err), BT_ERR_PROTOCOL);
    assert_null(rendered);
    assert_int_equal(bt_oa_read_rendered(ans, strlen(ans), &rendered, &rl, err, sizeof err), BT_OK);
    b.rendered = rendered;
    b.rendered_len = rl;
    b.have_rendered = true;
    assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_DIRECT);
    out = build_ok(&b, "/v1/completions");
    assert_string_equal(json_string_value(json_object_get(out, "prompt")), "<|user|>Hi<|assistant|> there");
    assert_null(json_object_get(out, "messages"));
    assert_null(json_object_get(out, "tools"));
    assert_null(json_object_get(out, "continue_final_message"));
    json_decref(out);
    free(rendered);
    b.raw_completions = false; /* still needs the declaration */
    assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_IMPOSSIBLE);
    /* elsewhere a chat is never continued from text: no prefill, no continue_final_message */
    for (int k = BT_OA_KIND_BATON; k <= BT_OA_KIND_OPENAI; k++) {
        if (bt_oa_kind_caps((bt_oa_kind)k)->render_path) continue;
        b = (bt_oa_build){.api = BT_API_CHAT, .body = chat, .kind = (bt_oa_kind)k, .max_tokens = 4, .carried = packed,
                          .n_carried = np, .carried_text = " there", .carried_text_len = 6, .raw_completions = true};
        err[0] = '\0';
        assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_IMPOSSIBLE);
        assert_true(err[0] != '\0');
        assert_int_equal(bt_oa_build_request(&b, &path, &out, err, sizeof err), BT_ERR_INVALID);
        assert_null(out);
    }
    assert_int_equal(json_array_size(json_object_get(chat, "messages")), 1); /* untouched */
    /* text cannot follow a token-id prompt; ids and text cannot be mixed */
    b = (bt_oa_build){.api = BT_API_COMPLETION, .body = comp_ids, .kind = BT_OA_KIND_OPENAI, .carried = packed,
                      .n_carried = np, .raw_completions = true};
    assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_IMPOSSIBLE);
    uint32_t mixed[] = {packed[0], 5};
    b = (bt_oa_build){.api = BT_API_CHAT, .body = chat, .kind = BT_OA_KIND_BATON, .carried = mixed, .n_carried = 2};
    assert_int_equal(bt_oa_plan_for(&b, err, sizeof err), BT_OA_PLAN_IMPOSSIBLE);

    json_decref(chat);
    json_decref(comp_s);
    json_decref(comp_ids);
}

/* The capability table, row by row (docs/engines.md §2.2), and the plan it gives for every kind,
 * carried form, API and declaration: a continuation is planned only where the table says the kind
 * honours it. */
static void test_capability_table(void **state) {
    (void)state;
    static const struct {
        bt_oa_kind kind;
        bool wants_ids;
        bt_oa_cont ids, text;
        const char *render;
    } want[] = {
        {BT_OA_KIND_AUTO, false, BT_OA_CONT_NONE, BT_OA_CONT_NONE, NULL},
        {BT_OA_KIND_BATON, true, BT_OA_CONT_CARRIED_IDS, BT_OA_CONT_RAW_COMPLETION, NULL},
        {BT_OA_KIND_VLLM, true, BT_OA_CONT_TOKEN_PROMPT, BT_OA_CONT_RAW_COMPLETION, NULL},
        {BT_OA_KIND_SGLANG, false, BT_OA_CONT_NONE, BT_OA_CONT_RAW_COMPLETION, NULL},
        {BT_OA_KIND_LLAMACPP, false, BT_OA_CONT_NONE, BT_OA_CONT_RAW_COMPLETION, "/apply-template"},
        {BT_OA_KIND_OPENAI, false, BT_OA_CONT_NONE, BT_OA_CONT_RAW_COMPLETION, NULL},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const bt_oa_caps *c = bt_oa_kind_caps(want[i].kind);
        assert_int_equal(c->wants_ids, want[i].wants_ids);
        assert_int_equal(bt_oa_kind_wants_ids(want[i].kind), want[i].wants_ids);
        assert_int_equal(c->ids, want[i].ids);
        assert_int_equal(c->text, want[i].text);
        if (want[i].render) assert_string_equal(c->render_path, want[i].render);
        else assert_null(c->render_path);
    }
    assert_int_equal(bt_oa_kind_caps((bt_oa_kind)99)->ids, BT_OA_CONT_NONE);

    json_t *chat = js("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}");
    json_t *comp_s = js("{\"model\":\"m\",\"prompt\":\"Once\"}");
    uint32_t ids[] = {5, 6};
    uint32_t tids[] = {bt_oa_text_id(0), bt_oa_text_id(1)};
    char err[256];
    for (int k = BT_OA_KIND_BATON; k <= BT_OA_KIND_OPENAI; k++) {
        const bt_oa_caps *c = bt_oa_kind_caps((bt_oa_kind)k);
        for (int api = 0; api < 2; api++) {
            for (int decl = 0; decl < 2; decl++) {
                bt_oa_build b = {.api = api ? BT_API_COMPLETION : BT_API_CHAT, .body = api ? comp_s : chat,
                                 .kind = (bt_oa_kind)k, .max_tokens = 3, .carried = ids, .n_carried = 2,
                                 .carried_text = " a b", .carried_text_len = 4, .raw_completions = decl};
                bt_oa_plan p = bt_oa_plan_for(&b, err, sizeof err);
                if (c->ids == BT_OA_CONT_NONE) assert_int_equal(p, BT_OA_PLAN_IMPOSSIBLE);
                else if (c->ids == BT_OA_CONT_CARRIED_IDS) assert_int_equal(p, BT_OA_PLAN_DIRECT);
                else assert_int_equal(p, BT_OA_PLAN_TOKENIZE);
                b.carried = tids;
                p = bt_oa_plan_for(&b, err, sizeof err);
                bool can = c->text == BT_OA_CONT_RAW_COMPLETION && decl && (api || c->render_path);
                assert_int_equal(p, !can ? BT_OA_PLAN_IMPOSSIBLE : api ? BT_OA_PLAN_DIRECT : BT_OA_PLAN_RENDER);
            }
        }
    }
    json_decref(chat);
    json_decref(comp_s);
}

static void test_tokens_answer(void **state) {
    (void)state;
    uint32_t *ids;
    size_t n;
    char err[256];
    const char *ok = "{\"count\":3,\"max_model_len\":4096,\"tokens\":[1,22,333]}";
    assert_int_equal(bt_oa_read_tokens(ok, strlen(ok), &ids, &n, err, sizeof err), BT_OK);
    assert_int_equal(n, 3);
    assert_int_equal(ids[2], 333);
    free(ids);
    const char *bad[] = {"{}", "{\"tokens\":[1,-2]}", "{\"tokens\":\"x\"}", "nope"};
    for (size_t i = 0; i < 4; i++) {
        assert_int_equal(bt_oa_read_tokens(bad[i], strlen(bad[i]), &ids, &n, err, sizeof err), BT_ERR_PROTOCOL);
        assert_null(ids);
    }
}

/* ---- detection and metrics ------------------------------------------------------------------ */

static void test_models(void **state) {
    (void)state;
    bt_oa_kind k;
    char model[64], err[128];
    const char *vllm = "{\"object\":\"list\",\"data\":[{\"id\":\"meta/llama\",\"owned_by\":\"vllm\"}]}";
    assert_true(bt_oa_read_models(vllm, strlen(vllm), "mock-model", "mock-model", &k, model, sizeof model, err,
                                  sizeof err));
    assert_int_equal(k, BT_OA_KIND_VLLM);
    assert_string_equal(model, "meta/llama"); /* the served name is not listed: the upstream's model */
    const char *baton = "{\"data\":[{\"id\":\"a\",\"owned_by\":\"baton\"},"
                        "{\"id\":\"mock-model\",\"owned_by\":\"baton\"}]}";
    assert_true(bt_oa_read_models(baton, strlen(baton), "mock-model", "x", &k, model, sizeof model, err, sizeof err));
    assert_int_equal(k, BT_OA_KIND_BATON);
    assert_string_equal(model, "mock-model");
    const char *other[] = {"{\"data\":[{\"id\":\"gpt\",\"owned_by\":\"openai\"}]}", "{\"data\":[{\"id\":\"g\"}]}",
                           "{\"data\":[{\"id\":\"l\",\"owned_by\":\"llamacpp\"}]}",
                           "{\"data\":[{\"id\":\"s\",\"owned_by\":\"sglang\"}]}"};
    bt_oa_kind want[] = {BT_OA_KIND_OPENAI, BT_OA_KIND_OPENAI, BT_OA_KIND_LLAMACPP, BT_OA_KIND_SGLANG};
    for (int i = 0; i < 4; i++) {
        assert_true(
            bt_oa_read_models(other[i], strlen(other[i]), NULL, "fb", &k, model, sizeof model, err, sizeof err));
        assert_int_equal(k, want[i]);
    }
    const char *empty = "{\"data\":[]}";
    assert_true(bt_oa_read_models(empty, strlen(empty), "want", "fb", &k, model, sizeof model, err, sizeof err));
    assert_string_equal(model, "want");
    assert_true(bt_oa_read_models(empty, strlen(empty), NULL, "fb", &k, model, sizeof model, err, sizeof err));
    assert_string_equal(model, "fb");
    const char *bad = "{\"models\":[]}";
    assert_false(bt_oa_read_models(bad, strlen(bad), NULL, "fb", &k, model, sizeof model, err, sizeof err));
    bt_oa_kind pk;
    assert_true(bt_oa_kind_parse("llama.cpp", &pk) && pk == BT_OA_KIND_LLAMACPP);
    assert_true(bt_oa_kind_parse("VLLM", &pk) && pk == BT_OA_KIND_VLLM);
    assert_false(bt_oa_kind_parse("tgi", &pk));
}

static void test_vllm_metrics(void **state) {
    (void)state;
    const char *t = "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                    "# TYPE vllm:num_requests_running gauge\n"
                    "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\n"
                    "vllm:num_requests_running{engine=\"1\",model_name=\"m}\\\"x\"} 2.0\n"
                    "vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 4.0\n"
                    "vllm:gpu_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\n"
                    "vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.75 1700000000000\n"
                    "vllm:num_requests_running_total 99\n"
                    "dynamo_frontend_inflight_requests 7\n";
    bt_oa_vllm_metrics m;
    assert_true(bt_oa_parse_vllm_metrics(t, strlen(t), &m));
    assert_true(m.have_usage && m.have_running && m.have_waiting);
    assert_true(m.running == 5.0);
    assert_true(m.waiting == 4.0);
    assert_true(m.kv_usage > 0.499 && m.kv_usage < 0.501);
    const char *none = "# TYPE dynamo_frontend_requests_total counter\ndynamo_frontend_requests_total 4\n";
    assert_false(bt_oa_parse_vllm_metrics(none, strlen(none), &m));
    const char *junk = "vllm:num_requests_waiting NaN\nvllm:num_requests_running {\nvllm:gpu_cache_usage_perc -1\n";
    assert_false(bt_oa_parse_vllm_metrics(junk, strlen(junk), &m));
    const char *unlabelled = "vllm:gpu_cache_usage_perc 7";
    assert_true(bt_oa_parse_vllm_metrics(unlabelled, strlen(unlabelled), &m));
    assert_true(m.kv_usage == 1.0); /* clamped */
}

/* The settled priority replaces the client's; a body without one gets none (an upstream without
 * priority scheduling refuses any but 0). */
static void test_priority(void **state) {
    (void)state;
    json_t *with = js("{\"model\":\"m\",\"prompt\":\"x\",\"priority\":-5}");
    json_t *without = js("{\"model\":\"m\",\"prompt\":\"x\"}");
    bt_oa_build b = {.api = BT_API_COMPLETION, .body = with, .kind = BT_OA_KIND_VLLM, .max_tokens = 3, .priority = 7};
    json_t *out = build_ok(&b, "/v1/completions");
    assert_int_equal(json_integer_value(json_object_get(out, "priority")), 7);
    json_decref(out);
    b.body = without;
    out = build_ok(&b, "/v1/completions");
    assert_null(json_object_get(out, "priority"));
    json_decref(out);
    json_decref(with);
    json_decref(without);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_ids),
        cmocka_unit_test(test_chunks),         cmocka_unit_test(test_errors),
        cmocka_unit_test(test_first_attempt),  cmocka_unit_test(test_continuations),
        cmocka_unit_test(test_capability_table),
        cmocka_unit_test(test_priority),
        cmocka_unit_test(test_tokens_answer),  cmocka_unit_test(test_models),
        cmocka_unit_test(test_vllm_metrics),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
