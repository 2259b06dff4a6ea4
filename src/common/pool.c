/* pool.c — the free list of pool.h: a singly linked stack of kept objects, threaded through the
 * objects themselves, so keeping one costs no memory beyond the object. */
#include "common/pool.h"

#include <stdlib.h>
#include <string.h>

/* Under AddressSanitizer a kept object is poisoned from its put to its next get, so that a use of
 * a connection or request after it was given back is reported as a use after free would be: the
 * pool keeps the memory allocated, which otherwise hides such a use from the sanitizer. The
 * macros are no-ops in other builds. */
#if defined(__SANITIZE_ADDRESS__)
#define POOL_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define POOL_ASAN 1
#endif
#endif
#ifdef POOL_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

void bt_pool_init(bt_pool *p, size_t size, size_t cap) {
    p->size = size < sizeof(void *) ? sizeof(void *) : size;
    p->cap = cap;
    p->n = 0;
    p->head = NULL;
}

void *bt_pool_get_head(bt_pool *p, size_t zeroed) {
    void *o = p->head;
    if (!o) return calloc(1, p->size);
    UNPOISON(o, p->size);
    memcpy(&p->head, o, sizeof p->head); /* the next kept object */
    p->n--;
    memset(o, 0, zeroed < p->size ? zeroed : p->size);
    return o;
}

void *bt_pool_get(bt_pool *p) { return bt_pool_get_head(p, p->size); }

void bt_pool_put(bt_pool *p, void *obj) {
    if (!obj) return;
    if (p->n >= p->cap) {
        free(obj);
        return;
    }
    memcpy(obj, &p->head, sizeof p->head);
    POISON(obj, p->size);
    p->head = obj;
    p->n++;
}

size_t bt_pool_drain(bt_pool *p) {
    size_t freed = 0;
    while (p->head) {
        void *o = p->head;
        UNPOISON(o, p->size);
        memcpy(&p->head, o, sizeof p->head);
        free(o);
        freed++;
    }
    p->n = 0;
    return freed;
}

void bt_pool_destroy(bt_pool *p) {
    if (p) bt_pool_drain(p);
}
