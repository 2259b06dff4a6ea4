/* llama_internal.h — the llama engine with a given function table, for tests: the threaded
 * hand-off between the loop and the engine thread is tested (also under ThreadSanitizer, which
 * cannot see into the uninstrumented llama.cpp) with a fake table standing in for llama.cpp. */
#ifndef BATON_LLAMA_INTERNAL_H
#define BATON_LLAMA_INTERNAL_H

#include "engine/llama/llama.h"
#include "engine/llama/llama_lib.h"

#ifdef BATON_HAVE_LLAMA
/* bt_llama_create without loading libraries: `L` (kept, not copied) provides every llama.cpp
 * function, `path` is handed to its llama_model_load_from_file. */
bt_engine *bt_llama_create_with_api(uv_loop_t *loop, const bt_llama_config *cfg, const bt_engine_hooks *hooks,
                                    void *hooks_ud, const bt_llama_api *L, const char *path, char *err,
                                    size_t errlen);
#endif

#endif
