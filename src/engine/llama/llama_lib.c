/* llama_lib.c — dlopen of llama.cpp's libraries and the function table (see llama_lib.h). */
#include "engine/llama/llama_lib.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef BATON_HAVE_LLAMA
#include <dlfcn.h>
#include <link.h>
#include <unistd.h>

#include "common/log.h"
#endif

bool bt_llama_default_lib_dir(char *buf, size_t len) {
    const char *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    int n;
    if (xdg && xdg[0] == '/') n = snprintf(buf, len, "%s/%s", xdg, BT_LLAMA_LIB_SUBDIR);
    else if (home && home[0]) n = snprintf(buf, len, "%s/.cache/%s", home, BT_LLAMA_LIB_SUBDIR);
    else return false;
    return n > 0 && (size_t)n < len;
}

#ifdef BATON_HAVE_LLAMA

#define LIB_LLAMA "libllama.v0.4.0.so"
#define LIB_GGML "libggml.v0.4.0.so"

static bt_llama_api api;
static bool api_ok;

/* llama.cpp logs through this: warnings and errors go to baton's log, the rest only at debug. */
static void ll_log(enum ggml_log_level level, const char *text, void *ud) {
    (void)ud;
    size_t n = strlen(text);
    while (n && text[n - 1] == '\n') n--;
    if (!n) return;
    if (level == GGML_LOG_LEVEL_ERROR) BT_ERROR("llama.cpp: %.*s", (int)n, text);
    else if (level == GGML_LOG_LEVEL_WARN) BT_DEBUG("llama.cpp: %.*s", (int)n, text);
    else BT_TRACE("llama.cpp: %.*s", (int)n, text);
}

const bt_llama_api *bt_llama_lib_open(const char *dir, char *err, size_t errlen) {
    char def[4096], path[4200];
    void *hllama = NULL, *hggml = NULL;
    if (api_ok) return &api;
    if (!dir || !dir[0]) {
        if (!bt_llama_default_lib_dir(def, sizeof def)) {
            snprintf(err, errlen, "no llama.cpp library directory: set --llama-lib-dir (BATON_LLAMA_LIB_DIR)");
            return NULL;
        }
        dir = def;
    }
    snprintf(path, sizeof path, "%s/%s", dir, LIB_LLAMA);
    if (access(path, R_OK) != 0) {
        snprintf(err, errlen,
                 "llama.cpp library %s not found: run scripts/setup (it fetches llama.cpp 0.4.0 into %s) or "
                 "point --llama-lib-dir (BATON_LLAMA_LIB_DIR) at a directory holding %s and libggml*.so",
                 path, def[0] && dir == def ? dir : "the cache", LIB_LLAMA);
        return NULL;
    }
    /* RUNPATH $ORIGIN in libllama makes its libggml dependencies resolve from the same directory. */
    hllama = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!hllama) {
        snprintf(err, errlen, "cannot load %s: %s", path, dlerror());
        return NULL;
    }
    snprintf(path, sizeof path, "%s/%s", dir, LIB_GGML);
    hggml = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!hggml) {
        snprintf(err, errlen, "cannot load %s: %s", path, dlerror());
        goto fail;
    }
#define BT_LLAMA_RESOLVE(name)                                                                 \
    *(void **)(&api.name) = dlsym(hllama, #name);                                              \
    if (!api.name) {                                                                           \
        snprintf(err, errlen, "%s/%s has no symbol %s (a different llama.cpp version?)", dir, \
                 LIB_LLAMA, #name);                                                            \
        goto fail;                                                                             \
    }
    BT_LLAMA_FUNCS(BT_LLAMA_RESOLVE)
#undef BT_LLAMA_RESOLVE
#define BT_GGML_RESOLVE(name)                                                                         \
    *(void **)(&api.name) = dlsym(hggml, #name);                                                      \
    if (!api.name) {                                                                                  \
        snprintf(err, errlen, "%s/%s has no symbol %s (a different ggml version?)", dir, LIB_GGML, #name); \
        goto fail;                                                                                    \
    }
    BT_GGML_RESOLVE(ggml_backend_load_all_from_path)
    BT_GGML_RESOLVE(ggml_backend_dev_count)
    BT_GGML_RESOLVE(ggml_backend_dev_get)
    BT_GGML_RESOLVE(ggml_backend_dev_name)
    BT_GGML_RESOLVE(ggml_backend_dev_description)
#undef BT_GGML_RESOLVE
    api.llama_log_set(ll_log, NULL);
    /* Backends (one libggml-cpu-<family>.so per CPU family, the best for this CPU chosen here)
     * must be registered before llama_backend_init, or model loading finds no backend. */
    api.ggml_backend_load_all_from_path(dir);
    if (api.ggml_backend_dev_count() == 0) {
        snprintf(err, errlen, "no ggml backend could be loaded from %s (libggml-cpu-*.so missing?)", dir);
        goto fail;
    }
    api.llama_backend_init();
    api_ok = true;
    return &api;

fail:
    /* the handles stay open on purpose only on success; on failure nothing of them is used */
    if (hggml) dlclose(hggml);
    if (hllama) dlclose(hllama);
    memset(&api, 0, sizeof api);
    return NULL;
}

typedef struct {
    char *buf;
    size_t len;
    bool found;
} variant_walk;

static int variant_cb(struct dl_phdr_info *info, size_t size, void *ud) {
    (void)size;
    variant_walk *v = ud;
    const char *name = info->dlpi_name ? info->dlpi_name : "";
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    if (strncmp(base, "libggml-cpu", 11) != 0) return 0;
    snprintf(v->buf, v->len, "%s", base);
    v->found = true;
    return 1; /* ggml loads one CPU variant: the first is the one */
}

bool bt_llama_lib_cpu_variant(char *buf, size_t len) {
    variant_walk v = {buf, len, false};
    if (len) buf[0] = '\0';
    dl_iterate_phdr(variant_cb, &v);
    return v.found;
}

#endif
