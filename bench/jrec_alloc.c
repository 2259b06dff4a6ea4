/* jrec_alloc.c — what a journal record's allocation costs: calloc and free, as the in-process
 * journal does (src/frontend/journal.c, open_rec and rec_release), against the object pool the
 * frontend uses for its requests (src/common/pool.c), taken and given back under a mutex as the
 * journal would have to (its records are opened on one event loop and expired on any; docs/
 * benchmarks.md, "The journal record and the pool").
 *
 *   baton-jrec-alloc-bench [--bytes 576] [--window 10000] [--records 1000000] [--rounds 5]
 *                          [--only calloc|pool]
 *
 * The model of the journal: --window records are held at once (open, or ended and kept for
 * --stream-retention); each step opens one (the record, then its body copy and its three arrays,
 * as open_rec and presize do; its first cache line written) and, once the window is full, frees
 * the oldest with its arrays. Before each, 16 small objects of one size are allocated and freed,
 * as a request's parse and checks do: past the 7 of their thread-cache bin they go to glibc's
 * fast bins, which a large-chunk request (over 1,008 bytes: --bytes 1088, the record's size before
 * the fifth round) consolidates first. The pool keeps at most 1,024 records, as the request pool does.
 * Prints nanoseconds per record for each side and round; run it under
 * `valgrind --tool=callgrind --dump-instr=no` with --only to count the instructions of the
 * allocation alone (get_record and put_record, inclusive), which a shared machine does not blur. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "common/pool.h"

#define RING (1u << 20)
#define POOL_CAP 1024

typedef enum { SIDE_CALLOC, SIDE_POOL } side;

static size_t rec_bytes = 576; /* sizeof(struct fe_jrec) on x86-64 */
static bt_pool pool;
static uv_mutex_t mu;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* out of line, so that callgrind counts each side's allocation apart */
__attribute__((noinline)) static void *get_record(side s) {
    if (s == SIDE_CALLOC) return calloc(1, rec_bytes);
    uv_mutex_lock(&mu);
    void *r = bt_pool_get(&pool);
    uv_mutex_unlock(&mu);
    return r;
}

__attribute__((noinline)) static void put_record(side s, void *r) {
    if (s == SIDE_CALLOC) {
        free(r);
        return;
    }
    uv_mutex_lock(&mu);
    bt_pool_put(&pool, r);
    uv_mutex_unlock(&mu);
}

typedef struct {
    void *rec, *body, *ids, *text, *ev;
} held;

static void release(side s, held *h) {
    free(h->body);
    free(h->ids);
    free(h->text);
    free(h->ev);
    put_record(s, h->rec);
}

/* Nanoseconds per record over `records` steps with `window` held; NaN when out of memory. */
static double run(side s, size_t window, size_t records, held *ring) {
    size_t head = 0, n = 0;
    double t0 = now_s();
    for (size_t i = 0; i < records; i++) {
        void *small[16];
        for (int k = 0; k < 16; k++) small[k] = malloc(48); /* past the 7 of a tcache bin */
        for (int k = 0; k < 16; k++) free(small[k]);
        held h = {get_record(s), malloc(300), malloc(64 * 4), malloc(64 * 8), malloc(64 * 8)};
        if (!h.rec || !h.body || !h.ids || !h.text || !h.ev) return 0.0 / 0.0;
        memset(h.rec, 1, 64);
        ring[(head + n) % RING] = h;
        if (++n > window) {
            release(s, &ring[head++ % RING]);
            n--;
        }
    }
    double t = now_s() - t0;
    while (n--) release(s, &ring[head++ % RING]);
    return t / (double)records * 1e9;
}

int main(int argc, char **argv) {
    size_t window = 10000, records = 1000000;
    int rounds = 5, only = -1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--bytes") == 0) rec_bytes = strtoul(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--window") == 0) window = strtoul(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--records") == 0) records = strtoul(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--rounds") == 0) rounds = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--only") == 0) only = strcmp(argv[i + 1], "pool") == 0 ? SIDE_POOL : SIDE_CALLOC;
        else {
            fprintf(stderr, "baton-jrec-alloc-bench: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (window == 0 || window >= RING || rec_bytes < 64) {
        fprintf(stderr, "baton-jrec-alloc-bench: --window must be in [1, %u), --bytes at least 64\n", RING);
        return 2;
    }
    held *ring = malloc(RING * sizeof *ring);
    if (!ring || uv_mutex_init(&mu) != 0) return 1;
    bt_pool_init(&pool, rec_bytes, POOL_CAP);
    for (int r = 0; r < rounds; r++)
        for (int s = SIDE_CALLOC; s <= SIDE_POOL; s++)
            if (only < 0 || only == s)
                printf("%s: %zu-byte records, window %zu: %.1f ns per record (with its 4 allocations)\n",
                       s == SIDE_CALLOC ? "calloc" : "pool  ", rec_bytes, window, run((side)s, window, records, ring));
    bt_pool_destroy(&pool);
    uv_mutex_destroy(&mu);
    free(ring);
    return 0;
}
