/* openai.h — the `openai` engine: a baton worker in front of any OpenAI-compatible engine server
 * (vLLM, SGLang, llama.cpp's server, another baton frontend, ...), the "upstream".
 *
 * Each sequence is one streaming HTTP request to the upstream's /v1/chat/completions or
 * /v1/completions, driven by libcurl's multi interface on the worker's libuv loop. Token ids come
 * from the upstream when it offers them (a baton frontend and vLLM do, with "return_token_ids"),
 * so a continuation is token-exact; from a text-only upstream the engine delivers one tagged id
 * per text chunk. A stream that moved here continues only through what the upstream kind provably
 * honours (a capability table, openai_wire.h); otherwise it is refused with BT_ERR_NO_WORKER, so
 * the frontend ends it with an error the client reads instead of wrong text (docs/engines.md). A kill closes the upstream connection at once, which makes vLLM-like servers abort
 * the request; a stop ends the sequence with what was delivered. The engine polls the upstream's
 * health and, when it exposes vLLM's Prometheus gauges, its KV-cache usage and queue lengths. */
#ifndef BATON_OPENAI_H
#define BATON_OPENAI_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "engine/engine.h"

typedef struct {
    const char *upstream;     /* --upstream / DYN_UPSTREAM_URL: base URL, e.g. http://127.0.0.1:8000 */
    const char *model;        /* --upstream-model: the model name the upstream serves; NULL = ask it */
    const char *served_model; /* the worker's --model-name, used upstream when the upstream lists it */
    const char *kind;         /* --upstream-kind: auto, baton, vllm, sglang, llamacpp, openai */
    const char *api_key;      /* --upstream-api-key: sent as "Authorization: Bearer"; NULL = none, else a
                                 Bearer token (bt_bearer_token_ok: visible ASCII, not empty) */
    bool raw_completions;     /* --upstream-raw-completions: the operator declares that the upstream's
                                 /v1/completions continues a text prompt as it is (text continuation) */
    int64_t total_blocks;     /* --upstream-total-blocks: KV capacity reported in load and card (1000) */
    double health_interval;   /* seconds between health polls (2) */
    int64_t health_failures;  /* consecutive failed polls that make the upstream dead (3) */
    double metrics_interval;  /* seconds between /metrics polls (1) */
    double connect_timeout;   /* seconds to connect to the upstream (5) */
    double startup_timeout;   /* seconds an upstream may take to answer at all before it is dead (600) */
    double stall_timeout;     /* seconds a stream's upstream request may send nothing, once its answer
                                 began, before that request alone fails, migratable (the worker's
                                 --engine-stuck-timeout; 0 = never) */
    double first_byte_timeout; /* --upstream-first-byte-timeout: seconds the upstream may take to begin
                                  a stream's answer (its queue, its prefill) before that request alone
                                  fails with BT_ERR_UPSTREAM_TIMEOUT, not migrated (300; 0 = never) */
} bt_openai_config;

void bt_openai_config_default(bt_openai_config *c);
/* Validates a configuration; on error writes why into err. */
bt_status bt_openai_config_check(const bt_openai_config *c, char *err, size_t errlen);

/* Creates the engine on `loop` and starts probing the upstream. `hooks` (copied) may be NULL.
 * Strings of cfg are copied. Returns NULL (logged) on a bad configuration or out of memory. */
bt_engine *bt_openai_create(uv_loop_t *loop, const bt_openai_config *cfg, const bt_engine_hooks *hooks,
                            void *hooks_ud);

#endif
