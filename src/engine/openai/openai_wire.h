/* openai_wire.h — what the openai engine says to and reads from an OpenAI-compatible server,
 * as pure functions (no I/O, no engine state), so that each piece is unit-tested on its own.
 *
 *  - Upstream kinds ("dialects") and their detection from GET /v1/models.
 *  - Text-mode token ids: for an upstream that gives only text, the engine invents one id per
 *    piece of text, tagged so that a continuation knows to resume from the delivered text.
 *  - Streamed chunks and whole (unary) responses parsed into one struct.
 *  - The upstream request body for an attempt (first attempt or continuation).
 *  - vLLM's Prometheus gauges read from /metrics text. */
#ifndef BATON_OPENAI_WIRE_H
#define BATON_OPENAI_WIRE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "common/util.h"
#include "engine/engine.h"

/* ---- upstream kinds ------------------------------------------------------------------------- */

typedef enum {
    BT_OA_KIND_AUTO = 0, /* detect from the owned_by field of GET /v1/models */
    BT_OA_KIND_BATON,    /* a baton frontend: token ids, carried_token_ids continuation */
    BT_OA_KIND_VLLM,     /* token ids (return_token_ids), /tokenize + token-id prompts */
    BT_OA_KIND_SGLANG,   /* text; continue_final_message */
    BT_OA_KIND_LLAMACPP, /* text; a final assistant message is a prefill */
    BT_OA_KIND_OPENAI,   /* anything else: text, nothing beyond the OpenAI API is sent */
} bt_oa_kind;

const char *bt_oa_kind_name(bt_oa_kind k);
/* Parses "auto", "baton", "vllm", "sglang", "llamacpp" (or "llama.cpp"), "openai"; false if none. */
bool bt_oa_kind_parse(const char *s, bt_oa_kind *out);
/* Whether requests to this kind ask for token ids ("return_token_ids": true); from the table below. */
bool bt_oa_kind_wants_ids(bt_oa_kind k);

/* How a stream that moved to this worker continues on its upstream. A continuation is made only
 * through a mechanism the upstream kind provably honours; with none, it is refused (the stream
 * ends with an error the client reads), never approximated: a server that ignores a prefill
 * would otherwise answer from the start and the client would get repeated text as a success. */
typedef enum {
    BT_OA_CONT_NONE = 0,       /* nothing the kind honours: the continuation is refused */
    BT_OA_CONT_CARRIED_IDS,    /* the body gets "carried_token_ids": [ids] (a baton frontend) */
    BT_OA_CONT_TOKEN_PROMPT,   /* /v1/completions, prompt = the prompt's ids (/tokenize) + the delivered ids */
    BT_OA_CONT_RAW_COMPLETION, /* /v1/completions, prompt = the prompt text + the delivered text; only where
                                  the operator declares the upstream's completions raw (raw_completions) */
} bt_oa_cont;

typedef struct {
    bool wants_ids;          /* requests ask for token ids */
    bt_oa_cont ids;          /* carried ids are the upstream's own token ids */
    bt_oa_cont text;         /* carried ids are text-mode ids: the delivered text is what is known */
    const char *render_path; /* where the upstream renders a chat into the prompt its chat endpoint
                                completes (llama.cpp's POST /apply-template), so that a chat can
                                continue as a raw completion; NULL: a chat cannot continue from text */
} bt_oa_caps;

/* The one capability table (docs/engines.md §2.2); AUTO and unknown values get the row of
 * nothing (no ids, no continuation). */
const bt_oa_caps *bt_oa_kind_caps(bt_oa_kind k);

/* Reads a GET /v1/models answer: the kind from the first model's owned_by ("baton", "vllm",
 * "sglang", "llamacpp"; anything else is BT_OA_KIND_OPENAI) and the upstream model to use: `want`
 * when the upstream lists it (or when want is set and the list is empty), else the first listed
 * id, else `fallback`. Returns false (with a message) when the answer is not a model list. */
bool bt_oa_read_models(const char *body, size_t len, const char *want, const char *fallback, bt_oa_kind *kind,
                       char *model, size_t model_len, char *err, size_t errlen);

/* ---- text-mode token ids ------------------------------------------------------------------- */

/* An upstream that sends only text gets one id per text chunk it streams (about one per token on
 * servers that stream token by token): the chunk's position in the stream with bit 31 set. Real
 * vocabularies are far below 2^31, so carried ids say which kind they are. Text-mode ids hold no
 * text: a continuation resumes from the text the frontend re-sends with them (carried_text), and
 * the frontend's token budget counts chunks. */
#define BT_OA_TEXT_ID_BIT 0x80000000u

static inline bool bt_oa_is_text_id(uint32_t id) { return (id & BT_OA_TEXT_ID_BIT) != 0; }
static inline uint32_t bt_oa_text_id(uint64_t pos) { return BT_OA_TEXT_ID_BIT | (uint32_t)(pos & 0x7fffffffu); }

/* ---- parsed responses ---------------------------------------------------------------------- */

typedef enum { BT_OA_FINISH_NONE = -1 } bt_oa_finish_none;

typedef struct {
    json_t *root;       /* owns the strings below */
    bool done;          /* the "[DONE]" sentinel */
    bool is_error;      /* an {"error": ...} object */
    bt_status err_code; /* mapped from the error's code or type */
    const char *err_msg;
    const char *err_param; /* the error's "param" (the request field it names), when a string */
    const char *err_scode; /* the error's "code", when a string (OpenAI's "invalid_value", ...) */
    const char *text; /* choices[0].text or choices[0].delta.content / message.content; may be NULL */
    size_t text_len;
    bool has_ids; /* choices[0].token_ids was an array */
    uint32_t *ids;
    size_t n_ids;
    int finish; /* a bt_finish_reason, BT_OA_FINISH_NONE, or BT_OA_FINISH_ABORT */
    bool has_usage;
    uint32_t prompt_tokens, completion_tokens;
} bt_oa_chunk;

#define BT_OA_FINISH_ABORT 100 /* the upstream aborted the request (vLLM's "abort") */

/* Parses one SSE data payload (a chunk object or "[DONE]") or, with unary set, a whole
 * non-streaming response. Token ids must be integers in [0, 2^31). On a malformed payload returns
 * BT_ERR_PROTOCOL with a message. Free with bt_oa_chunk_free (also after a failure). */
bt_status bt_oa_parse_chunk(const char *data, size_t len, bool unary, bt_oa_chunk *out, char *err, size_t errlen);
void bt_oa_chunk_free(bt_oa_chunk *c);

/* The status an upstream HTTP error maps to: 400/422 invalid, 404 not found, 413 too large,
 * 401/403 unauthorized, 429 upstream rate limited and 503/504 upstream busy (retried on another
 * worker; the worker is not at fault), 408/502 cannot connect (migratable), anything else an engine
 * error. */
bt_status bt_oa_status_for_http(long code);

/* ---- upstream requests --------------------------------------------------------------------- */

typedef enum {
    BT_OA_CARRIED_NONE = 0,
    BT_OA_CARRIED_IDS,  /* real token ids from the upstream */
    BT_OA_CARRIED_TEXT, /* text-mode ids */
    BT_OA_CARRIED_MIXED,
} bt_oa_carried_kind;

bt_oa_carried_kind bt_oa_carried_classify(const uint32_t *ids, size_t n);

typedef struct {
    bt_api api;
    const json_t *body; /* the client's OpenAI body */
    const char *model;  /* the upstream model name; NULL keeps the body's */
    bt_oa_kind kind;    /* resolved (never AUTO) */
    uint32_t max_tokens;
    /* the priority the frontend settled (the client's, bounded by its key's ceiling): it replaces
     * a `priority` of the client's body, so that the upstream (vLLM with --scheduling-policy
     * priority) sees the bounded one; a body without one gets none (a vLLM without priority
     * scheduling refuses any priority but 0) */
    int32_t priority;
    const uint32_t *carried;
    size_t n_carried;
    const char *carried_text; /* for BT_OA_CARRIED_TEXT: the text delivered with the carried ids */
    size_t carried_text_len;
    const uint32_t *prompt_ids; /* the prompt's token ids when known (from /tokenize) */
    size_t n_prompt_ids;
    bool have_prompt_ids;
    bool raw_completions; /* the operator declares that the upstream's /v1/completions continues a text
                             prompt as it is (--upstream-raw-completions) */
    const char *rendered; /* a chat rendered by the upstream (render_path), when known */
    size_t rendered_len;
    bool have_rendered;
} bt_oa_build;

/* What continuing a request needs on top of the body, per the capability table: nothing, the
 * prompt's token ids first (ask the upstream's /tokenize), the chat rendered first (ask the
 * upstream's render_path), or it cannot be done exactly on this upstream (why in err: the
 * continuation must be refused). */
typedef enum { BT_OA_PLAN_DIRECT, BT_OA_PLAN_TOKENIZE, BT_OA_PLAN_RENDER, BT_OA_PLAN_IMPOSSIBLE } bt_oa_plan;
bt_oa_plan bt_oa_plan_for(const bt_oa_build *b, char *err, size_t errlen);

/* The render request for a chat (llama.cpp's /apply-template: {"messages", and what shapes the
 * template: tools, tool_choice, parallel_tool_calls, chat_template_kwargs}), or NULL when out of
 * memory. */
json_t *bt_oa_render_body(const bt_oa_build *b);
/* Reads a render answer ({"prompt": "..."}) into a malloc'd, NUL-terminated copy. */
bt_status bt_oa_read_rendered(const char *body, size_t len, char **prompt, size_t *n, char *err, size_t errlen);

/* The /tokenize request for b (vLLM's shape: {"model","prompt"} or {"model","messages",
 * "add_generation_prompt":true}), or NULL when out of memory. */
json_t *bt_oa_tokenize_body(const bt_oa_build *b);
/* Reads a /tokenize answer ({"tokens": [ids...]}) into a malloc'd array. */
bt_status bt_oa_read_tokens(const char *body, size_t len, uint32_t **ids, size_t *n, char *err, size_t errlen);

/* Builds the streaming request for an attempt: *path gets "/v1/chat/completions" or
 * "/v1/completions", *out the body (owned by the caller). The plan must be DIRECT, TOKENIZE with
 * prompt_ids filled in, or RENDER with rendered filled in. */
bt_status bt_oa_build_request(const bt_oa_build *b, const char **path, json_t **out, char *err, size_t errlen);

/* ---- load ---------------------------------------------------------------------------------- */

typedef struct {
    bool have_usage, have_running, have_waiting;
    double kv_usage; /* fraction 0..1, averaged over the engines the upstream reports */
    double running, waiting;
} bt_oa_vllm_metrics;

/* Reads vllm:gpu_cache_usage_perc or vllm:kv_cache_usage_perc, vllm:num_requests_running and
 * vllm:num_requests_waiting from Prometheus text (summed over label sets, the usage averaged).
 * Returns true when at least one of them is present. */
bool bt_oa_parse_vllm_metrics(const char *text, size_t len, bt_oa_vllm_metrics *out);

#endif
