/* map.c — see map.h. */
#include "common/map.h"

#include <stdlib.h>

#include "common/util.h"

void bt_map_init(bt_map *m) {
    m->slots = NULL;
    m->cap = m->len = 0;
}

void bt_map_free(bt_map *m) {
    free(m->slots);
    bt_map_init(m);
}

static size_t slot_of(const bt_map *m, uint64_t key) { return (size_t)bt_mix64(key) & (m->cap - 1); }

void *bt_map_get(const bt_map *m, uint64_t key) {
    if (!m->cap || !key) return NULL;
    for (size_t i = slot_of(m, key);; i = (i + 1) & (m->cap - 1)) {
        if (m->slots[i].key == key) return m->slots[i].val;
        if (m->slots[i].key == 0) return NULL;
    }
}

static int grow(bt_map *m) {
    size_t ncap = m->cap ? m->cap * 2 : 16;
    bt_map_slot *old = m->slots;
    size_t ocap = m->cap;
    m->slots = calloc(ncap, sizeof *m->slots);
    if (!m->slots) {
        m->slots = old;
        return -1;
    }
    m->cap = ncap;
    m->len = 0;
    for (size_t i = 0; i < ocap; i++)
        if (old[i].key) bt_map_put(m, old[i].key, old[i].val);
    free(old);
    return 0;
}

int bt_map_put(bt_map *m, uint64_t key, void *val) {
    if (!key) return -1;
    if ((m->len + 1) * 4 > m->cap * 3 && grow(m) != 0) return -1;
    for (size_t i = slot_of(m, key);; i = (i + 1) & (m->cap - 1)) {
        if (m->slots[i].key == key) {
            m->slots[i].val = val;
            return 0;
        }
        if (m->slots[i].key == 0) {
            m->slots[i].key = key;
            m->slots[i].val = val;
            m->len++;
            return 0;
        }
    }
}

void *bt_map_del(bt_map *m, uint64_t key) {
    if (!m->cap || !key) return NULL;
    size_t mask = m->cap - 1, i = slot_of(m, key);
    while (m->slots[i].key != key) {
        if (m->slots[i].key == 0) return NULL;
        i = (i + 1) & mask;
    }
    void *val = m->slots[i].val;
    /* backward-shift deletion: pull later members of the probe run into the hole */
    size_t hole = i;
    for (size_t j = (i + 1) & mask; m->slots[j].key; j = (j + 1) & mask) {
        size_t home = slot_of(m, m->slots[j].key);
        int movable = hole <= j ? (home <= hole || home > j) : (home <= hole && home > j);
        if (movable) {
            m->slots[hole] = m->slots[j];
            hole = j;
        }
    }
    m->slots[hole].key = 0;
    m->slots[hole].val = NULL;
    m->len--;
    return val;
}

int bt_map_next(const bt_map *m, size_t *it, uint64_t *key, void **val) {
    while (*it < m->cap) {
        size_t i = (*it)++;
        if (m->slots[i].key) {
            if (key) *key = m->slots[i].key;
            if (val) *val = m->slots[i].val;
            return 1;
        }
    }
    return 0;
}
