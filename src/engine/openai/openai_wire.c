/* openai_wire.c — see openai_wire.h: the openai engine's request bodies, response parsing,
 * text-mode ids, upstream detection and vLLM metrics, all pure functions over JSON and text. */
#include "engine/openai/openai_wire.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- kinds ---------------------------------------------------------------------------------- */

static const char *kind_names[] = {"auto", "baton", "vllm", "sglang", "llamacpp", "openai"};

const char *bt_oa_kind_name(bt_oa_kind k) {
    if ((int)k < 0 || (size_t)k >= sizeof kind_names / sizeof kind_names[0]) return "unknown";
    return kind_names[k];
}

bool bt_oa_kind_parse(const char *s, bt_oa_kind *out) {
    if (!s) return false;
    for (size_t i = 0; i < sizeof kind_names / sizeof kind_names[0]; i++)
        if (strcasecmp(s, kind_names[i]) == 0) {
            *out = (bt_oa_kind)i;
            return true;
        }
    if (strcasecmp(s, "llama.cpp") == 0) {
        *out = BT_OA_KIND_LLAMACPP;
        return true;
    }
    return false;
}

/* What each upstream kind provably honours when a stream continues on it. Text is continued only
 * as a raw completion (prompt text + delivered text), the one form whose meaning the OpenAI API
 * fixes, and only where the operator declares it (a server may wrap completions in a template).
 * Chat prefills (a final assistant message, continue_final_message) are not here: most servers
 * ignore them without an error and answer from the start. */
static const bt_oa_caps kind_caps[] = {
    [BT_OA_KIND_AUTO] = {false, BT_OA_CONT_NONE, BT_OA_CONT_NONE, NULL}, /* resolved before use */
    [BT_OA_KIND_BATON] = {true, BT_OA_CONT_CARRIED_IDS, BT_OA_CONT_RAW_COMPLETION, NULL},
    [BT_OA_KIND_VLLM] = {true, BT_OA_CONT_TOKEN_PROMPT, BT_OA_CONT_RAW_COMPLETION, NULL},
    [BT_OA_KIND_SGLANG] = {false, BT_OA_CONT_NONE, BT_OA_CONT_RAW_COMPLETION, NULL},
    /* llama.cpp's /apply-template answers the very prompt its chat endpoint hands to its completion
     * path, so that prompt + the delivered text, completed raw, continues the chat */
    [BT_OA_KIND_LLAMACPP] = {false, BT_OA_CONT_NONE, BT_OA_CONT_RAW_COMPLETION, "/apply-template"},
    [BT_OA_KIND_OPENAI] = {false, BT_OA_CONT_NONE, BT_OA_CONT_RAW_COMPLETION, NULL},
};

const bt_oa_caps *bt_oa_kind_caps(bt_oa_kind k) {
    if ((int)k < 0 || (size_t)k >= sizeof kind_caps / sizeof kind_caps[0]) return &kind_caps[BT_OA_KIND_AUTO];
    return &kind_caps[k];
}

bool bt_oa_kind_wants_ids(bt_oa_kind k) { return bt_oa_kind_caps(k)->wants_ids; }

bool bt_oa_read_models(const char *body, size_t len, const char *want, const char *fallback, bt_oa_kind *kind,
                       char *model, size_t model_len, char *err, size_t errlen) {
    json_error_t jerr;
    json_t *root = json_loadb(body, len, 0, &jerr);
    json_t *data = root ? json_object_get(root, "data") : NULL;
    if (!json_is_array(data)) {
        snprintf(err, errlen, "GET /v1/models did not answer a model list%s%s", root ? "" : ": ",
                 root ? "" : jerr.text);
        json_decref(root);
        return false;
    }
    *kind = BT_OA_KIND_OPENAI;
    json_t *first = json_array_get(data, 0);
    const char *owner = json_string_value(json_object_get(first, "owned_by"));
    if (owner) {
        bt_oa_kind k;
        if (bt_oa_kind_parse(owner, &k) && k != BT_OA_KIND_AUTO) *kind = k;
    }
    const char *pick = NULL;
    size_t i;
    json_t *m;
    if (want && *want) {
        json_array_foreach(data, i, m) {
            const char *id = json_string_value(json_object_get(m, "id"));
            if (id && strcmp(id, want) == 0) pick = want;
        }
        if (!pick && json_array_size(data) == 0) pick = want;
    }
    if (!pick) pick = json_string_value(json_object_get(first, "id"));
    if (!pick) pick = fallback ? fallback : "";
    snprintf(model, model_len, "%s", pick);
    json_decref(root);
    return true;
}

/* ---- text-mode ids ---------------------------------------------------------------------------- */

bt_oa_carried_kind bt_oa_carried_classify(const uint32_t *ids, size_t n) {
    size_t tagged = 0;
    for (size_t i = 0; i < n; i++) tagged += bt_oa_is_text_id(ids[i]);
    if (n == 0) return BT_OA_CARRIED_NONE;
    if (tagged == 0) return BT_OA_CARRIED_IDS;
    if (tagged == n) return BT_OA_CARRIED_TEXT;
    return BT_OA_CARRIED_MIXED;
}

/* ---- responses ------------------------------------------------------------------------------ */

bt_status bt_oa_status_for_http(long code) {
    switch (code) {
    case 400:
    case 422: return BT_ERR_INVALID;
    case 401:
    case 403: return BT_ERR_UNAUTHORIZED;
    case 404: return BT_ERR_NOT_FOUND;
    case 413: return BT_ERR_TOO_LARGE;
    case 499: return BT_ERR_CANCELLED;
    /* an upstream that says it is busy is overloaded, not gone: the attempt may go to another
     * worker, and its worker stays in service (a gateway's timeout is that attempt's failure) */
    case 429: return BT_ERR_UPSTREAM_RATE_LIMITED;
    case 503:
    case 504: return BT_ERR_UPSTREAM_BUSY;
    case 408:
    case 502: return BT_ERR_CANNOT_CONNECT;
    default: return BT_ERR_ENGINE;
    }
}

void bt_oa_chunk_free(bt_oa_chunk *c) {
    json_decref(c->root);
    free(c->ids);
    memset(c, 0, sizeof *c);
    c->finish = BT_OA_FINISH_NONE;
}

/* OpenAI's finish reasons pass through as they are, so that a client can tell a filtered answer
 * or a tool call from a plain stop. Any other reason (a server's own: "eos", "stop_sequence", ...)
 * is the end of the answer the upstream chose: "stop" (docs/engines.md §2.4). */
static int finish_from(const char *s) {
    static const struct {
        const char *name;
        int reason;
    } known[] = {{"stop", BT_FINISH_STOP},
                 {"length", BT_FINISH_LENGTH},
                 {"cancelled", BT_FINISH_CANCELLED},
                 {"content_filter", BT_FINISH_CONTENT_FILTER},
                 {"tool_calls", BT_FINISH_TOOL_CALLS},
                 {"function_call", BT_FINISH_FUNCTION_CALL},
                 {"abort", BT_OA_FINISH_ABORT}};
    if (!s) return BT_OA_FINISH_NONE;
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strcmp(s, known[i].name) == 0) return known[i].reason;
    return BT_FINISH_STOP;
}

static bool get_u32(const json_t *v, uint32_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > UINT32_MAX) return false;
    *out = (uint32_t)json_integer_value(v);
    return true;
}

bt_status bt_oa_parse_chunk(const char *data, size_t len, bool unary, bt_oa_chunk *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    out->finish = BT_OA_FINISH_NONE;
    size_t a = 0, b = len;
    while (a < b && isspace((unsigned char)data[a])) a++;
    while (b > a && isspace((unsigned char)data[b - 1])) b--;
    if (!unary && b - a == 6 && memcmp(data + a, "[DONE]", 6) == 0) {
        out->done = true;
        return BT_OK;
    }
    json_error_t jerr;
    /* a content string may hold U+0000 (valid JSON, and a model may generate it): it is kept, with
     * the text's length carried alongside it all the way to the client, which gets it back as \u0000 */
    out->root = json_loadb(data, len, JSON_ALLOW_NUL, &jerr);
    if (!json_is_object(out->root)) {
        snprintf(err, errlen, "upstream sent %s: %.120s",
                 out->root ? "a JSON value that is not an object" : "invalid JSON", out->root ? "" : jerr.text);
        return BT_ERR_PROTOCOL;
    }
    json_t *e = json_object_get(out->root, "error");
    if (e && !json_is_null(e)) {
        out->is_error = true;
        out->err_code = BT_ERR_ENGINE;
        const json_t *code = json_object_get(e, "code");
        const char *type = json_string_value(json_object_get(e, "type"));
        const char *scode = json_string_value(code);
        /* OpenAI's string codes (a baton frontend upstream sends them): those of a 503 are worth
         * another worker, as the 503 of an integer code is */
        static const char *const unavailable[] = {"overloaded", "worker_unavailable", "no_worker_available",
                                                  "shutting_down", "too_many_connections"};
        if (json_is_integer(code)) out->err_code = bt_oa_status_for_http((long)json_integer_value(code));
        else if (scode && strcmp(scode, "context_length_exceeded") == 0) out->err_code = BT_ERR_CONTEXT_LENGTH;
        else if (scode && strcmp(scode, "rate_limit_exceeded") == 0) out->err_code = bt_oa_status_for_http(429);
        else if (type && strcmp(type, "invalid_request_error") == 0) out->err_code = BT_ERR_INVALID;
        for (size_t i = 0; scode && i < sizeof unavailable / sizeof unavailable[0]; i++)
            if (strcmp(scode, unavailable[i]) == 0) out->err_code = bt_oa_status_for_http(503);
        out->err_msg = json_is_string(e) ? json_string_value(e) : json_string_value(json_object_get(e, "message"));
        out->err_param = json_string_value(json_object_get(e, "param"));
        out->err_scode = scode;
        if (!out->err_msg) out->err_msg = "upstream error without a message";
        return BT_OK;
    }
    json_t *u = json_object_get(out->root, "usage");
    if (json_is_object(u)) {
        uint32_t pt = 0, ct = 0;
        bool okp = get_u32(json_object_get(u, "prompt_tokens"), &pt);
        bool okc = get_u32(json_object_get(u, "completion_tokens"), &ct);
        if (okp || okc) {
            out->has_usage = true;
            out->prompt_tokens = pt;
            out->completion_tokens = ct;
        }
    }
    json_t *choices = json_object_get(out->root, "choices");
    if (choices && !json_is_array(choices)) {
        snprintf(err, errlen, "upstream sent \"choices\" that is not an array");
        return BT_ERR_PROTOCOL;
    }
    json_t *c = NULL;
    size_t i;
    json_t *v;
    json_array_foreach(choices, i, v) {
        json_t *idx = json_object_get(v, "index");
        if (!idx || (json_is_integer(idx) && json_integer_value(idx) == 0)) {
            c = v;
            break;
        }
    }
    if (!c) return BT_OK; /* e.g. the usage chunk, whose choices are empty */
    if (!json_is_object(c)) {
        snprintf(err, errlen, "upstream sent a choice that is not an object");
        return BT_ERR_PROTOCOL;
    }
    json_t *t = NULL;
    json_t *holder = json_object_get(c, unary ? "message" : "delta");
    if (json_is_object(holder)) t = json_object_get(holder, "content");
    else if (json_object_get(c, "text")) t = json_object_get(c, "text");
    else if (json_is_object(json_object_get(c, "message")))
        t = json_object_get(json_object_get(c, "message"), "content");
    if (t && !json_is_null(t)) {
        if (!json_is_string(t)) {
            snprintf(err, errlen, "upstream sent text content that is not a string");
            return BT_ERR_PROTOCOL;
        }
        out->text = json_string_value(t);
        out->text_len = json_string_length(t);
    }
    json_t *ids = json_object_get(c, "token_ids");
    if (json_is_array(ids)) {
        out->has_ids = true;
        out->n_ids = json_array_size(ids);
        out->ids = malloc((out->n_ids ? out->n_ids : 1) * sizeof *out->ids);
        if (!out->ids) {
            snprintf(err, errlen, "out of memory");
            return BT_ERR_NOMEM;
        }
        json_array_foreach(ids, i, v) {
            uint32_t id;
            if (!get_u32(v, &id) || bt_oa_is_text_id(id)) {
                snprintf(err, errlen, "upstream sent token_ids[%zu] that is not a token id below 2^31", i);
                return BT_ERR_PROTOCOL;
            }
            out->ids[i] = id;
        }
    } else if (ids && !json_is_null(ids)) {
        snprintf(err, errlen, "upstream sent token_ids that is not an array");
        return BT_ERR_PROTOCOL;
    }
    out->finish = finish_from(json_string_value(json_object_get(c, "finish_reason")));
    return BT_OK;
}

/* ---- requests ------------------------------------------------------------------------------- */

/* The prompt of a completion body as text: a string or an array holding one string. */
static const json_t *prompt_string(const json_t *body) {
    const json_t *p = json_object_get(body, "prompt");
    if (json_is_string(p)) return p;
    if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0)))
        return json_array_get(p, 0);
    return NULL;
}

static bool prompt_is_ids(const json_t *body) {
    const json_t *p = json_object_get(body, "prompt");
    if (!json_is_array(p) || json_array_size(p) == 0) return false;
    size_t i;
    json_t *v;
    json_array_foreach(p, i, v) if (!json_is_integer(v)) return false;
    return true;
}

bt_oa_plan bt_oa_plan_for(const bt_oa_build *b, char *err, size_t errlen) {
    const bt_oa_caps *caps = bt_oa_kind_caps(b->kind);
    const char *kn = bt_oa_kind_name(b->kind);
    switch (bt_oa_carried_classify(b->carried, b->n_carried)) {
    case BT_OA_CARRIED_NONE: return BT_OA_PLAN_DIRECT;
    case BT_OA_CARRIED_MIXED:
        snprintf(err, errlen, "the carried tokens mix upstream token ids and text-mode ids: the workers of one model "
                              "must front upstreams of one kind");
        return BT_OA_PLAN_IMPOSSIBLE;
    case BT_OA_CARRIED_IDS:
        switch (caps->ids) {
        case BT_OA_CONT_CARRIED_IDS: return BT_OA_PLAN_DIRECT;
        case BT_OA_CONT_TOKEN_PROMPT:
            if (b->have_prompt_ids || (b->api == BT_API_COMPLETION && prompt_is_ids(b->body))) return BT_OA_PLAN_DIRECT;
            return BT_OA_PLAN_TOKENIZE;
        default: break;
        }
        snprintf(err, errlen, "upstream kind %s has no way to continue from token ids", kn);
        return BT_OA_PLAN_IMPOSSIBLE;
    case BT_OA_CARRIED_TEXT:
        if (caps->text != BT_OA_CONT_RAW_COMPLETION) {
            snprintf(err, errlen, "upstream kind %s has no way to continue from text", kn);
        } else if (b->api == BT_API_CHAT && !caps->render_path) {
            snprintf(err, errlen, "a chat cannot be continued exactly from its delivered text (servers ignore "
                                  "prefills; upstream kind %s renders no chat prompt)", kn);
        } else if (b->api == BT_API_COMPLETION && !prompt_string(b->body)) {
            snprintf(err, errlen, "a prompt of token ids cannot be continued from text (upstream kind %s)", kn);
        } else if (!b->raw_completions) {
            snprintf(err, errlen, "upstream kind %s continues text only as a raw completion, which the operator did "
                                  "not declare (--upstream-raw-completions)", kn);
        } else {
            return b->api == BT_API_CHAT && !b->have_rendered ? BT_OA_PLAN_RENDER : BT_OA_PLAN_DIRECT;
        }
        return BT_OA_PLAN_IMPOSSIBLE;
    }
    return BT_OA_PLAN_IMPOSSIBLE;
}

static json_t *ids_array(const uint32_t *a, size_t na, const uint32_t *b, size_t nb) {
    json_t *arr = json_array();
    if (!arr) return NULL;
    for (size_t i = 0; i < na; i++)
        if (json_array_append_new(arr, json_integer(a[i])) != 0) goto fail;
    for (size_t i = 0; i < nb; i++)
        if (json_array_append_new(arr, json_integer(b[i])) != 0) goto fail;
    return arr;
fail:
    json_decref(arr);
    return NULL;
}

json_t *bt_oa_tokenize_body(const bt_oa_build *b) {
    json_t *t = json_object();
    if (!t) return NULL;
    if (b->model) json_object_set_new(t, "model", json_string(b->model));
    else json_object_set(t, "model", json_object_get(b->body, "model"));
    if (b->api == BT_API_CHAT) {
        json_object_set(t, "messages", json_object_get(b->body, "messages"));
        json_object_set_new(t, "add_generation_prompt", json_true());
        /* what shapes the rendered chat template goes along */
        static const char *keep[] = {"add_generation_prompt", "continue_final_message", "add_special_tokens",
                                     "chat_template", "chat_template_kwargs", "tools", "documents"};
        for (size_t i = 0; i < sizeof keep / sizeof keep[0]; i++) {
            json_t *v = json_object_get(b->body, keep[i]);
            if (v) json_object_set(t, keep[i], v);
        }
    } else {
        json_object_set(t, "prompt", (json_t *)prompt_string(b->body));
        json_t *v = json_object_get(b->body, "add_special_tokens");
        if (v) json_object_set(t, "add_special_tokens", v);
    }
    return t;
}

json_t *bt_oa_render_body(const bt_oa_build *b) {
    json_t *t = json_object();
    if (!t) return NULL;
    static const char *keep[] = {"messages", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs"};
    for (size_t i = 0; i < sizeof keep / sizeof keep[0]; i++) {
        json_t *v = json_object_get(b->body, keep[i]);
        if (v && json_object_set(t, keep[i], v) != 0) {
            json_decref(t);
            return NULL;
        }
    }
    return t;
}

bt_status bt_oa_read_rendered(const char *body, size_t len, char **prompt, size_t *n, char *err, size_t errlen) {
    *prompt = NULL;
    *n = 0;
    json_t *root = json_loadb(body, len, JSON_ALLOW_NUL, NULL); /* a chat's content may hold U+0000 */
    json_t *p = root ? json_object_get(root, "prompt") : NULL;
    if (!json_is_string(p)) {
        snprintf(err, errlen, "the upstream's chat rendering did not answer {\"prompt\": \"...\"}");
        json_decref(root);
        return BT_ERR_PROTOCOL;
    }
    size_t pl = json_string_length(p);
    *prompt = malloc(pl + 1);
    if (!*prompt) {
        json_decref(root);
        snprintf(err, errlen, "out of memory");
        return BT_ERR_NOMEM;
    }
    memcpy(*prompt, json_string_value(p), pl + 1);
    *n = pl;
    json_decref(root);
    return BT_OK;
}

bt_status bt_oa_read_tokens(const char *body, size_t len, uint32_t **ids, size_t *n, char *err, size_t errlen) {
    *ids = NULL;
    *n = 0;
    json_t *root = json_loadb(body, len, 0, NULL);
    json_t *tok = root ? json_object_get(root, "tokens") : NULL;
    if (!json_is_array(tok)) {
        snprintf(err, errlen, "the upstream's /tokenize did not answer {\"tokens\": [...]}");
        json_decref(root);
        return BT_ERR_PROTOCOL;
    }
    size_t cnt = json_array_size(tok);
    *ids = malloc((cnt ? cnt : 1) * sizeof **ids);
    if (!*ids) {
        json_decref(root);
        snprintf(err, errlen, "out of memory");
        return BT_ERR_NOMEM;
    }
    for (size_t i = 0; i < cnt; i++) {
        uint32_t id;
        if (!get_u32(json_array_get(tok, i), &id) || bt_oa_is_text_id(id)) {
            free(*ids);
            *ids = NULL;
            json_decref(root);
            snprintf(err, errlen, "the upstream's /tokenize answered tokens[%zu] that is not a token id", i);
            return BT_ERR_PROTOCOL;
        }
        (*ids)[i] = id;
    }
    *n = cnt;
    json_decref(root);
    return BT_OK;
}

/* Fields of a client body the engine sets itself, or that would change the text it streams. */
static const char *drop_always[] = {"stream", "stream_options", "n", "max_completion_tokens", "max_tokens",
                                    "return_token_ids", "carried_token_ids", "logprobs", "top_logprobs",
                                    "echo", "best_of", "suffix"};
/* Chat-only fields, dropped when a chat request continues as a completion of token ids. */
static const char *chat_only[] = {"messages", "tools", "tool_choice", "parallel_tool_calls", "functions",
                                  "function_call", "chat_template", "chat_template_kwargs", "add_generation_prompt",
                                  "continue_final_message", "documents", "reasoning_effort", "add_special_tokens"};

bt_status bt_oa_build_request(const bt_oa_build *b, const char **path, json_t **out, char *err, size_t errlen) {
    *out = NULL;
    *path = b->api == BT_API_CHAT ? "/v1/chat/completions" : "/v1/completions";
    if (!json_is_object(b->body)) {
        snprintf(err, errlen, "request has no JSON body");
        return BT_ERR_INVALID;
    }
    bt_oa_plan plan = bt_oa_plan_for(b, err, errlen);
    if (plan == BT_OA_PLAN_IMPOSSIBLE) return BT_ERR_INVALID;
    if (plan == BT_OA_PLAN_TOKENIZE || plan == BT_OA_PLAN_RENDER) {
        snprintf(err, errlen, "the prompt's %s is needed first", plan == BT_OA_PLAN_RENDER ? "rendering" : "token ids");
        return BT_ERR_INVALID;
    }
    json_t *body = json_deep_copy(b->body);
    if (!body) goto nomem;
    for (size_t i = 0; i < sizeof drop_always / sizeof drop_always[0]; i++) json_object_del(body, drop_always[i]);
    if (b->model && json_object_set_new(body, "model", json_string(b->model)) != 0) goto nomem;
    if (json_object_set_new(body, "stream", json_true()) != 0 ||
        json_object_set_new(body, "stream_options", json_pack("{s:b}", "include_usage", 1)) != 0 ||
        json_object_set_new(body, "max_tokens", json_integer(b->max_tokens)) != 0)
        goto nomem;
    if (bt_oa_kind_wants_ids(b->kind) && json_object_set_new(body, "return_token_ids", json_true()) != 0) goto nomem;
    if (json_object_get(body, "priority") && json_object_set_new(body, "priority", json_integer(b->priority)) != 0)
        goto nomem;

    /* the plan above admitted only what the capability table allows */
    switch (bt_oa_carried_classify(b->carried, b->n_carried)) {
    case BT_OA_CARRIED_NONE: break;
    case BT_OA_CARRIED_IDS:
        if (bt_oa_kind_caps(b->kind)->ids == BT_OA_CONT_CARRIED_IDS) {
            json_t *c = ids_array(b->carried, b->n_carried, NULL, 0);
            if (!c || json_object_set_new(body, "carried_token_ids", c) != 0) goto nomem;
        } else if (b->have_prompt_ids) {
            json_t *p = ids_array(b->prompt_ids, b->n_prompt_ids, b->carried, b->n_carried);
            for (size_t i = 0; i < sizeof chat_only / sizeof chat_only[0]; i++) json_object_del(body, chat_only[i]);
            if (!p || json_object_set_new(body, "prompt", p) != 0) goto nomem;
            *path = "/v1/completions";
        } else { /* a completion whose prompt is token ids */
            json_t *orig = json_object_get(body, "prompt");
            for (size_t i = 0; i < b->n_carried; i++)
                if (json_array_append_new(orig, json_integer(b->carried[i])) != 0) goto nomem;
        }
        break;
    case BT_OA_CARRIED_TEXT: { /* a raw completion: prompt text (a chat's rendered) + delivered text */
        const char *pt;
        size_t pl;
        if (b->api == BT_API_CHAT) {
            pt = b->rendered;
            pl = b->rendered_len;
        } else {
            const json_t *ps = prompt_string(body);
            pt = json_string_value(ps);
            pl = json_string_length(ps);
        }
        bt_buf t;
        bt_buf_init(&t, (size_t)1 << 30);
        if (bt_buf_append(&t, pt, pl) != BT_OK || bt_buf_append(&t, b->carried_text, b->carried_text_len) != BT_OK) {
            bt_buf_free(&t);
            goto nomem;
        }
        json_t *s = json_stringn(t.data ? t.data : "", t.len);
        bt_buf_free(&t);
        if (b->api == BT_API_CHAT)
            for (size_t i = 0; i < sizeof chat_only / sizeof chat_only[0]; i++) json_object_del(body, chat_only[i]);
        if (!s || json_object_set_new(body, "prompt", s) != 0) goto nomem;
        *path = "/v1/completions";
        break;
    }
    case BT_OA_CARRIED_MIXED: break; /* refused by the plan */
    }
    *out = body;
    return BT_OK;
nomem:
    json_decref(body);
    snprintf(err, errlen, "out of memory building the upstream request");
    return BT_ERR_NOMEM;
}

/* ---- metrics -------------------------------------------------------------------------------- */

static bool name_is(const char *s, size_t n, const char *name) { return strlen(name) == n && memcmp(s, name, n) == 0; }

bool bt_oa_parse_vllm_metrics(const char *text, size_t len, bt_oa_vllm_metrics *out) {
    memset(out, 0, sizeof *out);
    size_t usage_n = 0;
    double usage_sum = 0;
    size_t i = 0;
    while (i < len) {
        size_t e = i;
        while (e < len && text[e] != '\n') e++;
        const char *s = text + i;
        size_t n = e - i;
        i = e + 1;
        while (n && isspace((unsigned char)*s)) s++, n--;
        if (n == 0 || s[0] == '#') continue;
        size_t k = 0;
        while (k < n && s[k] != '{' && !isspace((unsigned char)s[k])) k++;
        int which = -1;
        if (name_is(s, k, "vllm:gpu_cache_usage_perc") || name_is(s, k, "vllm:kv_cache_usage_perc")) which = 0;
        else if (name_is(s, k, "vllm:num_requests_running")) which = 1;
        else if (name_is(s, k, "vllm:num_requests_waiting")) which = 2;
        if (which < 0) continue;
        if (k < n && s[k] == '{') { /* skip the label set; label values may hold '}' inside quotes */
            bool q = false;
            for (k++; k < n; k++) {
                if (q && s[k] == '\\') k++;
                else if (s[k] == '"') q = !q;
                else if (!q && s[k] == '}') break;
            }
            if (k >= n) continue;
            k++;
        }
        while (k < n && isspace((unsigned char)s[k])) k++;
        char num[64];
        size_t m = 0;
        while (k < n && !isspace((unsigned char)s[k]) && m + 1 < sizeof num) num[m++] = s[k++];
        num[m] = '\0';
        char *end;
        double v = strtod(num, &end);
        if (m == 0 || *end || !isfinite(v) || v < 0) continue;
        if (which == 0) {
            usage_sum += v;
            usage_n++;
        } else if (which == 1) {
            out->running += v;
            out->have_running = true;
        } else {
            out->waiting += v;
            out->have_waiting = true;
        }
    }
    if (usage_n) {
        out->have_usage = true;
        out->kv_usage = usage_sum / (double)usage_n;
        if (out->kv_usage > 1) out->kv_usage = 1;
    }
    return out->have_usage || out->have_running || out->have_waiting;
}
