/* pool.h — a free list of same-size objects owned by one event loop: what a connection or a
 * request is freed to and allocated from, instead of malloc.
 *
 * Why not malloc: the frontend's per-connection and per-request structures are over 1,000 bytes,
 * which in glibc is a "large" request. calloc never takes those from the thread cache; it goes
 * through _int_malloc's large-chunk path, which first consolidates the fast bins that the many
 * small frees of a request fill, then sorts the unsorted chunks into bins and unlinks a best fit.
 * A profile of the frontend during bursts of 1,000 streams put 15–20 % of its samples there,
 * most of it under the connection's calloc (docs/benchmarks.md). Taking a kept object back costs
 * a pointer swap and a memset.
 *
 * Bounds: at most `cap` objects are kept; a put beyond that frees. The owner empties the pool
 * with bt_pool_drain when it wants the memory back (the frontend does when idle, before
 * malloc_trim), and with bt_pool_destroy at its end. Not thread-safe: one loop's thread only.
 *
 * Under AddressSanitizer a kept object is poisoned from its put until a get hands it out again, so
 * a use after the put is reported as a use after free would be (the sanitizer cannot see that the
 * object is dead while the pool holds its memory). */
#ifndef BATON_COMMON_POOL_H
#define BATON_COMMON_POOL_H

#include <stddef.h>

typedef struct bt_pool {
    size_t size; /* bytes of one object (at least a pointer: a kept object links to the next) */
    size_t cap;  /* most objects kept */
    size_t n;    /* objects kept now */
    void *head;  /* the kept objects, linked through their first bytes */
} bt_pool;

/* An empty pool of objects of `size` bytes, keeping at most `cap`. */
void bt_pool_init(bt_pool *p, size_t size, size_t cap);

/* A zeroed object of the pool's size (a kept one, else calloc); NULL when out of memory. The
 * caller owns it until it gives it back with bt_pool_put (or free(): it is plain heap memory). */
void *bt_pool_get(bt_pool *p);

/* bt_pool_get, but only the object's first `zeroed` bytes (at most its size) are zeroed; the rest
 * holds what its last user left there (zeros for a new object). For an owner whose object has
 * large parts that it sets before reading (strings, given a terminator): zeroing the whole object
 * writes every one of its cache lines, cold by the time a kept object is taken again, where the
 * owner may touch only some of them (the frontend's request, docs/benchmarks.md). */
void *bt_pool_get_head(bt_pool *p, size_t zeroed);

/* Takes the object back: kept for the next get, or freed when the pool is full. NULL is a no-op. */
void bt_pool_put(bt_pool *p, void *obj);

/* Frees every kept object; returns how many. The pool stays usable. */
size_t bt_pool_drain(bt_pool *p);

/* bt_pool_drain; the pool is empty and may be dropped. NULL is a no-op. */
void bt_pool_destroy(bt_pool *p);

#endif
