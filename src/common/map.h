/* map.h — an open-addressing hash map from non-zero uint64 keys to pointers.
 *
 * Used for stream tables (stream id → stream) and worker tables (instance id → worker). Linear
 * probing with backward-shift deletion, so there are no tombstones and lookups stay short under
 * churn. Hand-written because no Debian C library offers a small integer-keyed map that is worth
 * a dependency. Neither inserting nor deleting is allowed during bt_map_next iteration; to empty a map while
 * acting on each entry, restart the iteration after each deletion. */
#ifndef BATON_MAP_H
#define BATON_MAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t key; /* 0 = empty */
    void *val;
} bt_map_slot;

typedef struct {
    bt_map_slot *slots;
    size_t cap; /* power of two, or 0 */
    size_t len;
} bt_map;

void bt_map_init(bt_map *m);
void bt_map_free(bt_map *m);
void *bt_map_get(const bt_map *m, uint64_t key);
/* Inserts or replaces; returns 0, or -1 when out of memory. key must not be 0. */
int bt_map_put(bt_map *m, uint64_t key, void *val);
/* Removes key; returns its value or NULL. */
void *bt_map_del(bt_map *m, uint64_t key);
/* Iteration: size_t it = 0; while (bt_map_next(m, &it, &k, &v)) { ... } */
int bt_map_next(const bt_map *m, size_t *it, uint64_t *key, void **val);

#endif
