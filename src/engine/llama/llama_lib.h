/* llama_lib.h — llama.cpp's shared libraries, loaded at run time (dlopen).
 *
 * baton links nothing of llama.cpp: the build needs only its headers (for the declarations; CMake
 * defines BATON_HAVE_LLAMA when it found them, see docs/engines.md), and a worker started with
 * `--engine llama` opens libllama/libggml from a directory: --llama-lib-dir, else
 * ${XDG_CACHE_HOME:-$HOME/.cache}/baton/llama.cpp-0.4.0/lib, where scripts/setup puts them. Every
 * other engine, and the build, work without the libraries. The function table is filled once per
 * process and never unloaded (llama.cpp keeps global state: backends, logging). */
#ifndef BATON_LLAMA_LIB_H
#define BATON_LLAMA_LIB_H

#include <stdbool.h>
#include <stddef.h>

#include "common/status.h"

#define BT_LLAMA_LIB_SUBDIR "baton/llama.cpp-0.4.0/lib"

/* The default library directory (see above) into buf; false when no HOME is known. */
bool bt_llama_default_lib_dir(char *buf, size_t len);

#ifdef BATON_HAVE_LLAMA
#include <ggml-backend.h>
#include <llama.h>

/* The llama.cpp functions the engine calls; each member has the type the header declares. */
#define BT_LLAMA_FUNCS(X)                                                                                      \
    X(llama_backend_init) X(llama_log_set) X(llama_model_default_params) X(llama_context_default_params)       \
    X(llama_model_load_from_file) X(llama_model_free) X(llama_init_from_model) X(llama_free)                   \
    X(llama_model_get_vocab) X(llama_model_n_ctx_train) X(llama_model_chat_template) X(llama_n_ctx)            \
    X(llama_n_batch) X(llama_n_seq_max) X(llama_get_memory) X(llama_memory_seq_rm) X(llama_memory_seq_pos_max) \
    X(llama_memory_clear) X(llama_batch_init) X(llama_batch_free) X(llama_decode) X(llama_get_logits_ith)     \
    X(llama_vocab_n_tokens) X(llama_vocab_is_eog) X(llama_tokenize) X(llama_token_to_piece)                    \
    X(llama_chat_apply_template) X(llama_vocab_get_add_bos) X(llama_model_desc) X(llama_model_size)            \
    X(llama_n_threads) X(llama_n_ctx_seq)                                                                       \
    X(llama_state_seq_get_size) X(llama_state_seq_get_data) X(llama_state_seq_set_data) X(llama_model_n_params)  \
    X(llama_model_n_layer) X(llama_model_n_embd)

#define BT_LLAMA_MEMBER(name) __typeof__(&name) name;
typedef struct {
    BT_LLAMA_FUNCS(BT_LLAMA_MEMBER)
    __typeof__(&ggml_backend_load_all_from_path) ggml_backend_load_all_from_path;
    __typeof__(&ggml_backend_dev_count) ggml_backend_dev_count;
    __typeof__(&ggml_backend_dev_get) ggml_backend_dev_get;
    __typeof__(&ggml_backend_dev_name) ggml_backend_dev_name;
    __typeof__(&ggml_backend_dev_description) ggml_backend_dev_description;
} bt_llama_api;
#undef BT_LLAMA_MEMBER

/* Opens the libraries in `dir` (NULL = the default directory), resolves every function, loads the
 * ggml backends found there and initialises llama.cpp (once per process; later calls return the
 * same table). On failure returns NULL and writes why, naming what to run, into err. Not
 * thread-safe: call it from the worker's main thread before starting engines. */
const bt_llama_api *bt_llama_lib_open(const char *dir, char *err, size_t errlen);

/* The file name of the CPU backend variant ggml loaded into this process (the one
 * libggml-cpu-<family>.so it chose for this CPU, e.g. "libggml-cpu-haswell.so") into buf; false
 * when none is loaded. Its kernels decide the logits bit for bit, so it is part of a worker's
 * exactness fingerprint (llama.h). Call after bt_llama_lib_open. */
bool bt_llama_lib_cpu_variant(char *buf, size_t len);
#endif

#endif
