/* llama.h — the `llama` engine: llama.cpp in the worker process, continuous batching on an
 * engine thread.
 *
 * One llama context per engine holds every sequence: each has its own KV stream, an even share of
 * --ctx-size in whole multiples of 256 cells, or (kv_unified) all share one pool; each is capped at
 * the model's trained context. A dedicated engine thread
 * owns the context: it takes commands (submit, stop, kill) from a mutex-protected queue, admits
 * waiting sequences while their tokens fit in free cells and --max-num-seqs allows, builds one
 * batch per step (one token per decoding sequence, then prompt chunks up to
 * --max-num-batched-tokens), calls llama_decode once, samples, and posts output events to the
 * worker's loop (uv_async_send). Nothing of llama.cpp runs on the loop. A decode that finds no
 * free KV slot is back-pressure: the most recently admitted sequence is preempted (its KV
 * dropped, recomputed from its tokens later, as vLLM does). Any other decode failure, or a
 * non-finite logit, kills the engine (hooks.on_dead: the worker hands every stream back).
 * Output text follows llama_text.h, sampling llama_sample.h.
 *
 * Exactness fingerprint. A migrated stream continues bit for bit only on a worker that computes
 * the same logits and picks from them alike: the same llama.cpp, CPU backend variant
 * (libggml-cpu-<family>.so, chosen per CPU at load), thread count, physical batch size, flash
 * attention setting and model file, and the same sampler (llama_sample.h, by its version). The
 * engine writes them as one string into its model card ("exactness": "llama-0.4.0
 * cpu=libggml-cpu-haswell.so threads=1 ubatch=1 fa=0 model=<bytes>:<fnv64 of the first MiB>
 * sampler=4"); the
 * frontend continues a stream only on a worker with the fingerprint of the one that began it, and
 * the worker refuses a continuation that names another (docs/engines.md §3.4). */
#ifndef BATON_LLAMA_ENGINE_H
#define BATON_LLAMA_ENGINE_H

#include <stdint.h>
#include <uv.h>

#include "engine/engine.h"

typedef struct {
    const char *model_path;         /* --model: a GGUF file; NULL = the bundled stories260K */
    const char *lib_dir;            /* --llama-lib-dir: NULL = the cache scripts/setup fills */
    int64_t ctx_size;               /* --ctx-size: KV cells in all, at most (llama.c: ll_kv_layout); 0 = auto */
    int64_t max_num_seqs;           /* sequences decoding at once (<= 256, llama.cpp's limit) */
    int64_t max_num_batched_tokens; /* tokens per decode step (> max_num_seqs) */
    int64_t threads;                /* --llama-threads: CPU threads of the decode (1) */
    int64_t ubatch;                 /* --llama-ubatch: tokens per physical batch (1: exact, see llama.c) */
    bool flash_attn;                /* --flash-attn: llama.cpp's flash attention (off) */
    bool kv_unified;                /* --kv-unified: one KV pool for all sequences (false: one stream each) */
    int64_t default_max_tokens;     /* max_tokens when a request sets none */
    int64_t fault_die_after_tokens;   /* test hook: engine dead after N tokens (0 = off) */
    int64_t fault_error_after_tokens; /* test hook: decode treated as failed after N tokens (0 = off) */
    bool fault_kv_corrupt;            /* test hook: every exported KV state has one byte flipped */
    int64_t fault_hang_after_tokens;  /* test hook: the engine thread blocks for good, as in a decode
                                       * that never returns, once N tokens were emitted (0 = off) */
    int64_t fault_nan_after_tokens;   /* test hook: the logits row the sampler reads gets a NaN once
                                       * N tokens were emitted (0 = off): the non-finite check fails */
    int64_t fault_prompt_delay_ms;    /* test hook: the prompt thread takes N ms longer over each
                                       * prompt, as a long prompt's tokenization does on a large
                                       * model (0 = off) */
    int64_t batch_gather_us;          /* --batch-gather-us: an idle engine's first step waits for the
                                       * rest of a burst (bt_engine_gather, engine.h); 0 = off */
} bt_llama_config;

void bt_llama_config_default(bt_llama_config *c);
bt_status bt_llama_config_check(const bt_llama_config *c, char *err, size_t errlen);

/* Loads the libraries and the model and starts the engine thread. On failure returns NULL and
 * writes why (naming what to run when the libraries are missing) into err. */
bt_engine *bt_llama_create(uv_loop_t *loop, const bt_llama_config *cfg, const bt_engine_hooks *hooks, void *hooks_ud,
                           char *err, size_t errlen);

/* Whether llama.cpp reads the model file (the default one when cfg names none) as a whole: its
 * header, its vocabulary and every tensor's place within the file, without reading the weights. A
 * file that passes the magic check but is cut short or corrupt fails here, in a moment, so that it
 * is refused as the configuration error it is (exit code 2) and by `baton run` before anything
 * starts. True, and nothing checked, when the libraries cannot be opened: that is said apart. */
bool bt_llama_model_loads(const bt_llama_config *cfg, char *err, size_t errlen);

/* Fault injection for tests (the worker's --fault-signals): 1 = the engine dies now (as after a
 * failed decode), 2 = the engine thread stops stepping (a hung engine), 3 = it resumes. The same
 * numbers as bt_mocker_fault. */
void bt_llama_inject(bt_engine *e, int fault);

/* The bundled model's path: <dir of the executable>/../models/stories260K.gguf when it exists,
 * else the source tree's models/ (baked in at build time). */
const char *bt_llama_default_model(void);

#endif
