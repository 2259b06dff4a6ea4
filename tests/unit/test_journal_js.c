/* test_journal_js.c — the JetStream journal (src/frontend/journal_js.c) used by several event
 * loops at once, with no server: what scripts/tsan runs to look for data races between the loops
 * (--threads) and the journal's own thread.
 *
 * Four threads act as four loops. Each opens, appends to and closes its streams, then claims its
 * neighbour's ended streams (a resume on another loop), checks that the claim gives back exactly
 * what the neighbour wrote, appends and closes them again. Meanwhile the journal's thread tries
 * the NATS server given (a loopback port where nothing listens: no network is needed), finds it
 * unreachable and retries in the background, so the loops' queueing races with its state
 * changes. Checked: every claim is exact, and the
 * journal's counts add up (every record opened, none left live). The JetStream side with a real
 * server is tests/fault/test_journal_js.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <uv.h>

#include "frontend/fe.h"

#define LOOPS 4
#define STREAMS 150
#define EVENTS 12

static const uint8_t key[FE_KEY_MAC_LEN] = {7};

typedef struct loop_arg {
    fe_journal *j;
    int shard;
    char sids[STREAMS][FE_STREAM_ID_LEN + 1];
    uv_barrier_t *phase; /* every loop has closed its streams before any claims its neighbour's */
    struct loop_arg *all;
    int failures;
} loop_arg;

static void event_of(int shard, int k, int e, uint32_t ids[2], char *text, size_t n) {
    ids[0] = (uint32_t)(shard * 100000 + k);
    ids[1] = (uint32_t)e;
    snprintf(text, n, "<%d.%d.%d>", shard, k, e);
}

static void loop_main(void *p) {
    loop_arg *a = p;
    for (int k = 0; k < STREAMS; k++) {
        char body[64];
        snprintf(body, sizeof body, "{\"shard\":%d,\"k\":%d}", a->shard, k);
        fe_jsnap meta;
        memset(&meta, 0, sizeof meta);
        meta.api = BT_API_CHAT;
        meta.body = body;
        meta.body_len = strlen(body);
        meta.max_tokens = 100;
        snprintf(meta.rid, sizeof meta.rid, "rid-%d-%d", a->shard, k);
        snprintf(meta.model, sizeof meta.model, "m");
        fe_jrec *r = fe_journal_open(a->j, &meta, key, a->shard);
        if (!r) {
            a->failures++;
            continue;
        }
        memcpy(a->sids[k], meta.stream_id, sizeof a->sids[k]);
        for (int e = 0; e < EVENTS; e++) {
            uint32_t ids[2];
            char text[32];
            event_of(a->shard, k, e, ids, text, sizeof text);
            if (!fe_journal_append(a->j, r, ids, 2, text, strlen(text))) a->failures++;
            if (e == 0) fe_journal_note_worker(a->j, r, (uint64_t)(a->shard + 1), NULL);
        }
        fe_jtail none = {.kind = FE_JTAIL_NONE};
        fe_journal_close(a->j, r, &none);
    }
    uv_barrier_wait(a->phase);
    /* resumes on this loop of the neighbour's streams */
    loop_arg *nb = &a->all[(a->shard + 1) % LOOPS];
    for (int k = 0; k < STREAMS; k++) {
        fe_jsnap out;
        memset(&out, 0, sizeof out);
        fe_jrec *r = NULL;
        int cur = -1;
        if (fe_journal_claim(a->j, nb->sids[k], key, a->shard, &out, &r, &cur) != FE_CLAIM_OK) {
            a->failures++;
            continue;
        }
        bool exact = out.nids == 2 * EVENTS && out.nev == EVENTS && out.worker_id == (uint64_t)(nb->shard + 1);
        size_t off = 0;
        for (int e = 0; exact && e < EVENTS; e++) {
            uint32_t ids[2];
            char text[32];
            event_of(nb->shard, k, e, ids, text, sizeof text);
            size_t len = strlen(text);
            exact = out.ids[2 * e] == ids[0] && out.ids[2 * e + 1] == ids[1] && off + len <= out.text_len &&
                    memcmp(out.text + off, text, len) == 0 && out.ev[e].end_tok == (uint32_t)(2 * e + 2);
            off += len;
        }
        if (!exact) a->failures++;
        fe_jsnap_free(&out);
        uint32_t more[1] = {42};
        if (!fe_journal_append(a->j, r, more, 1, "!", 1)) a->failures++;
        fe_jtail fin = {.kind = FE_JTAIL_FINISH, .completion_tokens = 2 * EVENTS + 1};
        snprintf(fin.finish, sizeof fin.finish, "stop");
        fe_journal_close(a->j, r, &fin);
    }
}

static void test_loops_share_the_journal(void **state) {
    (void)state;
    fe_journal *mem = fe_journal_mem_new(60, 64u * 1024 * 1024);
    assert_non_null(mem);
    bt_events_config c;
    bt_events_config_default(&c);
    c.plane = "nats";
    c.nats_server = "nats://127.0.0.1:1"; /* nothing listens: the journal thread keeps retrying */
    c.ns = "unit";
    c.connect_timeout_ms = 200;
    c.user = c.password = c.token = c.nkey = c.creds_file = NULL;
    char err[256] = "";
    fe_journal *j = fe_journal_js_new(mem, &c, err, sizeof err);
    assert_non_null(j);
    uv_barrier_t phase;
    assert_int_equal(uv_barrier_init(&phase, LOOPS), 0);
    static loop_arg args[LOOPS];
    uv_thread_t th[LOOPS];
    for (int i = 0; i < LOOPS; i++) {
        memset(&args[i], 0, sizeof args[i]);
        args[i].j = j;
        args[i].shard = i;
        args[i].phase = &phase;
        args[i].all = args;
    }
    for (int i = 0; i < LOOPS; i++) assert_int_equal(uv_thread_create(&th[i], loop_main, &args[i]), 0);
    for (int i = 0; i < LOOPS; i++) uv_thread_join(&th[i]);
    uv_barrier_destroy(&phase);
    for (int i = 0; i < LOOPS; i++) assert_int_equal(args[i].failures, 0);
    fe_journal_stats st;
    fe_journal_stats_get(j, &st);
    assert_int_equal(st.opened, LOOPS * STREAMS);
    assert_int_equal(st.live, 0);
    assert_int_equal(st.ended, LOOPS * STREAMS);
    assert_int_equal(st.js_published, 0); /* no server: nothing went out, nothing claimed it did */
    fe_journal_destroy(j);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_loops_share_the_journal),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
