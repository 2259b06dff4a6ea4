/* test_discovery_file.c — unit tests of the discovery plane's dispatch and its file backend.
 *
 * Each test gets its own uv loop and a fresh mkdtemp directory under /tmp, removed afterwards.
 * Two handles on one directory stand in for two processes. The loop is always driven with a time
 * bound (run_until), so a missing event fails the test instead of hanging it; latencies that the
 * design promises (delete seen quickly, expiry, refresh) are measured and printed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "common/util.h"
#include "discovery/discovery.h"
#include "discovery/discovery_internal.h"

/* ---- fixture and loop driving ------------------------------------------------------------- */

typedef struct {
    uv_loop_t loop;
    char dir[64];
} fx;

static int setup(void **state) {
    fx *f = calloc(1, sizeof *f);
    if (!f || uv_loop_init(&f->loop) != 0) return -1;
    snprintf(f->dir, sizeof f->dir, "/tmp/bt_disc_test_XXXXXX");
    if (!mkdtemp(f->dir)) return -1;
    *state = f;
    return 0;
}

static void rm_rf(const char *dir) {
    DIR *dp = opendir(dir);
    if (!dp) return;
    struct dirent *de;
    while ((de = readdir(dp)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
        char p[512];
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        struct stat st;
        if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode)) rm_rf(p);
        else unlink(p);
    }
    closedir(dp);
    rmdir(dir);
}

static int teardown(void **state) {
    fx *f = *state;
    uv_run(&f->loop, UV_RUN_DEFAULT); /* everything must have been closed: this returns at once */
    int rc = uv_loop_close(&f->loop);
    rm_rf(f->dir);
    free(f);
    return rc == 0 ? 0 : -1;
}

static void tick(uv_timer_t *t) { (void)t; }
static void set_flag(uv_handle_t *h) { *(bool *)h->data = true; }

/* Runs the loop until pred(ctx) holds or timeout_ms passes; returns pred's last value. A 1 ms
 * ticker bounds each loop turn, so the measured latencies are accurate to about a millisecond. */
static bool run_until(uv_loop_t *loop, bool (*pred)(void *), void *ctx, uint64_t timeout_ms) {
    uv_timer_t t;
    bool closed = false;
    uv_timer_init(loop, &t);
    t.data = &closed;
    uv_timer_start(&t, tick, 1, 1);
    uint64_t end = bt_now_ms() + timeout_ms;
    bool ok;
    while (!(ok = pred ? pred(ctx) : false) && bt_now_ms() < end) uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, set_flag);
    while (!closed) uv_run(loop, UV_RUN_NOWAIT);
    return ok;
}

static void run_for(uv_loop_t *loop, uint64_t ms) { run_until(loop, NULL, NULL, ms); }

static bool flag_set(void *p) { return *(bool *)p; }
static void done_cb(void *ud) { *(bool *)ud = true; }

static void close_disc(fx *f, bt_discovery *d) {
    bool done = false;
    bt_discovery_close(d, done_cb, &done);
    assert_false(done); /* done comes from the loop, never from inside close */
    assert_true(run_until(&f->loop, flag_set, &done, 2000));
}

static bt_discovery *make(fx *f, int64_t ttl) {
    bt_discovery_config c;
    bt_discovery_config_default(&c);
    c.dir = f->dir;
    c.ttl_s = ttl;
    bt_discovery *d = NULL;
    char err[256];
    assert_int_equal(bt_discovery_create(&f->loop, &c, &d, err, sizeof err), BT_OK);
    assert_non_null(d);
    return d;
}

/* ---- a recording watcher ------------------------------------------------------------------ */

#define MAX_EV 256
typedef struct {
    char kind; /* 'P' or 'D' */
    char key[256];
    char *value; /* compact, sorted JSON; 'P' only */
    uint64_t at_us;
} ev;

typedef struct {
    ev evs[MAX_EV];
    int n;
    /* for predicates */
    const char *want_key;
    char want_kind;
    int want_count;
    /* optional: close this handle from inside on_put */
    bt_discovery *close_me;
    bool closed;
} rec;

static void rec_put(void *ud, const char *key, const json_t *v) {
    rec *r = ud;
    assert_true(r->n < MAX_EV);
    ev *e = &r->evs[r->n++];
    e->kind = 'P';
    snprintf(e->key, sizeof e->key, "%s", key);
    e->value = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY);
    e->at_us = bt_now_us();
    if (r->close_me) {
        bt_discovery *d = r->close_me;
        r->close_me = NULL;
        bt_discovery_close(d, done_cb, &r->closed);
    }
}

static void rec_del(void *ud, const char *key) {
    rec *r = ud;
    assert_true(r->n < MAX_EV);
    ev *e = &r->evs[r->n++];
    e->kind = 'D';
    snprintf(e->key, sizeof e->key, "%s", key);
    e->value = NULL;
    e->at_us = bt_now_us();
}

static const bt_discovery_watcher rec_watcher = {rec_put, rec_del};

static void rec_free(rec *r) {
    for (int i = 0; i < r->n; i++) free(r->evs[i].value);
    r->n = 0;
}

static int count(const rec *r, char kind, const char *key) {
    int c = 0;
    for (int i = 0; i < r->n; i++)
        if (r->evs[i].kind == kind && (!key || strcmp(r->evs[i].key, key) == 0)) c++;
    return c;
}

static const ev *last(const rec *r, char kind, const char *key) {
    for (int i = r->n - 1; i >= 0; i--)
        if (r->evs[i].kind == kind && strcmp(r->evs[i].key, key) == 0) return &r->evs[i];
    return NULL;
}

static bool rec_has(void *p) {
    rec *r = p;
    return count(r, r->want_kind, r->want_key) >= r->want_count;
}

/* Waits until `r` has seen at least n events of `kind` for `key` (any key if NULL). */
static bool wait_for(fx *f, rec *r, char kind, const char *key, int n, uint64_t timeout_ms) {
    r->want_kind = kind;
    r->want_key = key;
    r->want_count = n;
    return run_until(&f->loop, rec_has, r, timeout_ms);
}

/* ---- a writer and a reader ------------------------------------------------------------------ */

/* Two processes on one directory: a writer handle, a reader handle whose watch on "v1/" records
 * into rr, and a value for the writer to put. */
typedef struct {
    bt_discovery *w, *r;
    rec rr;
    json_t *v; /* {"x":1} */
} duo;

static void duo_open(fx *f, duo *h, int64_t ttl) {
    h->w = make(f, ttl);
    h->r = make(f, ttl);
    memset(&h->rr, 0, sizeof h->rr);
    assert_int_equal(bt_discovery_watch(h->r, "v1/", &rec_watcher, &h->rr), BT_OK);
    h->v = json_pack("{s:i}", "x", 1);
    assert_non_null(h->v);
}

/* Closes both handles; a test that closed the writer itself sets w to NULL. */
static void duo_close(fx *f, duo *h) {
    json_decref(h->v);
    if (h->w) close_disc(f, h->w);
    close_disc(f, h->r);
    rec_free(&h->rr);
}

/* ---- file helpers ------------------------------------------------------------------------- */

static void key_file(const fx *f, const char *key, char *out, size_t cap) {
    char name[BT_DISCOVERY_FILE_NAME_MAX + 1];
    assert_true(bt_discovery_file_encode_key(key, name, sizeof name) > 0);
    snprintf(out, cap, "%s/%s", f->dir, name);
}

static void write_raw(const char *path, const char *text, size_t len) {
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.writing", path);
    /* Written beside the target then renamed, like a well-behaved foreign writer. */
    char *slash = strrchr(tmp, '/');
    char hidden[600];
    snprintf(hidden, sizeof hidden, "%.*s/.t%s", (int)(slash - tmp), tmp, slash + 1);
    FILE *fp = fopen(hidden, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(text, 1, len, fp), len);
    assert_int_equal(fclose(fp), 0);
    assert_int_equal(rename(hidden, path), 0);
}

static void write_key(const fx *f, const char *key, const char *text) {
    char p[512];
    key_file(f, key, p, sizeof p);
    write_raw(p, text, strlen(text));
}

static bool key_exists(const fx *f, const char *key) {
    char p[512];
    key_file(f, key, p, sizeof p);
    return access(p, F_OK) == 0;
}

static void age_file(const char *path, int seconds) {
    struct timeval tv[2];
    gettimeofday(&tv[0], NULL);
    tv[0].tv_sec -= seconds;
    tv[1] = tv[0];
    assert_int_equal(utimes(path, tv), 0);
}

static char *slurp(const char *path) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    char *buf = calloc(1, 70000);
    size_t n = fread(buf, 1, 69999, fp);
    buf[n] = '\0';
    fclose(fp);
    return buf;
}

#define K1 "v1/instances/dynamo/backend/generate/1a"
#define K2 "v1/instances/dynamo/backend/generate/2b"
#define K3 "v1/instances/dynamo/backend/generate/3c"

/* ---- tests -------------------------------------------------------------------------------- */

static void test_defaults_and_dispatch(void **state) {
    fx *f = *state;
    char *old_kv = getenv("DYN_FILE_KV") ? strdup(getenv("DYN_FILE_KV")) : NULL;
    char *old_tmp = getenv("TMPDIR") ? strdup(getenv("TMPDIR")) : NULL;
    bt_discovery_config c;

    setenv("DYN_FILE_KV", "/srv/kv", 1);
    bt_discovery_config_default(&c);
    assert_string_equal(c.backend, "file");
    assert_string_equal(c.dir, "/srv/kv");
    assert_int_equal(c.ttl_s, 10);
    unsetenv("DYN_FILE_KV");
    setenv("TMPDIR", "/var/tmp/", 1);
    bt_discovery_config_default(&c);
    assert_string_equal(c.dir, "/var/tmp/baton_store_kv");
    unsetenv("TMPDIR");
    bt_discovery_config_default(&c);
    assert_string_equal(c.dir, "/tmp/baton_store_kv");
    if (old_kv) setenv("DYN_FILE_KV", old_kv, 1);
    if (old_tmp) setenv("TMPDIR", old_tmp, 1);
    free(old_kv);
    free(old_tmp);

    char err[256];
    bt_discovery *d = (bt_discovery *)1;
    c.dir = f->dir;
    c.backend = "etcd"; /* dispatched to the etcd backend, which checks its endpoints */
    c.etcd_endpoints = "ftp://127.0.0.1:2379";
    assert_int_equal(bt_discovery_create(&f->loop, &c, &d, err, sizeof err), BT_ERR_INVALID);
    assert_null(d);
    assert_non_null(strstr(err, "only http:// and https://"));
    c.backend = "zookeeper";
    assert_int_equal(bt_discovery_create(&f->loop, &c, &d, err, sizeof err), BT_ERR_INVALID);
    assert_non_null(strstr(err, "unknown discovery backend 'zookeeper'"));
    c.backend = "file";
    c.ttl_s = 0;
    assert_int_equal(bt_discovery_create(&f->loop, &c, &d, err, sizeof err), BT_ERR_INVALID);
    assert_non_null(strstr(err, "ttl"));

    char k[64];
    assert_int_equal(bt_discovery_instance_key(k, sizeof k, "dynamo", "backend", "generate", 0x1f), 39);
    assert_string_equal(k, "v1/instances/dynamo/backend/generate/1f");
    assert_int_equal(bt_discovery_instance_key(k, 10, "dynamo", "backend", "generate", 1), -1);
    assert_string_equal(k, "");

    /* Argument checks and the one-watch rule; NULL close is a no-op. */
    d = make(f, 10);
    rec r = {0};
    assert_int_equal(bt_discovery_put(d, "", json_true()), BT_ERR_INVALID);
    assert_int_equal(bt_discovery_watch(d, "v1/", &rec_watcher, &r), BT_OK);
    assert_int_equal(bt_discovery_watch(d, "v1/", &rec_watcher, &r), BT_ERR_INVALID);
    bt_discovery_close(NULL, NULL, NULL);
    close_disc(f, d);
}

static void test_key_encoding(void **state) {
    fx *f = *state;
    char name[BT_DISCOVERY_FILE_NAME_MAX + 1], back[BT_DISCOVERY_FILE_NAME_MAX + 1];
    static const struct {
        const char *key, *name;
    } cases[] = {
        {K1, "v1%2Finstances%2Fdynamo%2Fbackend%2Fgenerate%2F1a"},
        {"a%2Fb/c%", "a%252Fb%2Fc%25"},
        {".hidden/x.y", "%2Ehidden%2Fx.y"},
        {"plain", "plain"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(bt_discovery_file_encode_key(cases[i].key, name, sizeof name), strlen(cases[i].name));
        assert_string_equal(name, cases[i].name);
        assert_int_equal(bt_discovery_file_decode_name(name, back, sizeof back), strlen(cases[i].key));
        assert_string_equal(back, cases[i].key);
    }
    assert_int_equal(bt_discovery_file_decode_name("v1%2finst", back, sizeof back), 7); /* lower-case hex */
    assert_string_equal(back, "v1/inst");
    assert_int_equal(bt_discovery_file_decode_name("bad%zz", back, sizeof back), -1);
    assert_int_equal(bt_discovery_file_decode_name("trail%2", back, sizeof back), -1);
    assert_int_equal(bt_discovery_file_decode_name("nul%00", back, sizeof back), -1);
    assert_int_equal(bt_discovery_file_encode_key("", name, sizeof name), -1);
    char longkey[200];
    memset(longkey, '/', sizeof longkey - 1);
    longkey[sizeof longkey - 1] = '\0';
    assert_int_equal(bt_discovery_file_encode_key(longkey, name, sizeof name), -1); /* 597 > NAME_MAX */

    /* Through a handle: the watcher gets back exactly the keys that were put. */
    bt_discovery *d = make(f, 10);
    rec r = {0};
    assert_int_equal(bt_discovery_watch(d, "", &rec_watcher, &r), BT_OK);
    json_t *v = json_pack("{s:i}", "n", 1);
    assert_int_equal(bt_discovery_put(d, "a%2Fb/c%", v), BT_OK);
    assert_int_equal(bt_discovery_put(d, ".hidden/x.y", v), BT_OK);
    assert_int_equal(bt_discovery_put(d, longkey, v), BT_ERR_INVALID);
    assert_true(wait_for(f, &r, 'P', NULL, 2, 2000));
    assert_int_equal(count(&r, 'P', "a%2Fb/c%"), 1);
    assert_int_equal(count(&r, 'P', ".hidden/x.y"), 1);
    char p[512];
    snprintf(p, sizeof p, "%s/a%%252Fb%%2Fc%%25", f->dir);
    assert_int_equal(access(p, F_OK), 0);
    json_decref(v);
    close_disc(f, d);
    rec_free(&r);
}

static void test_put_seen_by_watch(void **state) {
    fx *f = *state;
    bt_discovery *d = make(f, 10);
    rec r = {0};
    write_key(f, "v1/mdc/dynamo/backend/generate/1a", "{\"card\":1}"); /* outside the prefix */
    bt_discovery_stats st;
    bt_discovery_get_stats(d, &st);
    assert_false(st.watching); /* no watch yet */
    assert_int_equal(bt_discovery_watch(d, "v1/instances/", &rec_watcher, &r), BT_OK);
    bt_discovery_get_stats(d, &st);
    assert_false(st.watching); /* nothing listed yet: the first scan runs from the loop */
    json_t *v = json_pack("{s:s,s:s,s:s,s:s,s:I,s:{s:s},s:{s:s,s:i}}", "type", "Endpoint", "namespace", "dynamo",
                          "component", "backend", "endpoint", "generate", "instance_id", (json_int_t)26, "transport",
                          "tcp", "127.0.0.1:5000", "model", "name", "mock", "total_kv_blocks", 16384);
    uint64_t t0 = bt_now_us();
    assert_int_equal(bt_discovery_put(d, K1, v), BT_OK);
    assert_int_equal(r.n, 0); /* never called back from inside put or watch */
    assert_true(wait_for(f, &r, 'P', K1, 1, 2000));
    printf("    put-to-notice (same handle): %.2f ms\n", (last(&r, 'P', K1)->at_us - t0) / 1000.0);
    bt_discovery_get_stats(d, &st);
    assert_true(st.watching);
    assert_true(st.registered);
    assert_int_equal(st.reregistrations, 0);
    char *want = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS);
    assert_string_equal(last(&r, 'P', K1)->value, want);
    free(want);
    /* On disk: the compact JSON, under the encoded name, with no temp files left behind. */
    char p[512];
    key_file(f, K1, p, sizeof p);
    char *disk = slurp(p);
    char *compact = json_dumps(v, JSON_COMPACT);
    assert_non_null(disk);
    assert_string_equal(disk, compact);
    free(disk);
    free(compact);
    run_for(&f->loop, 50);
    assert_int_equal(count(&r, 'P', NULL), 1); /* the mdc key was filtered out; no repeats */
    DIR *dp = opendir(f->dir);
    struct dirent *de;
    while ((de = readdir(dp)) != NULL) assert_false(strncmp(de->d_name, ".tmp.", 5) == 0);
    closedir(dp);

    /* A changed value is reported again; an identical rewrite is not. */
    json_object_set_new(v, "instance_id", json_integer(27));
    assert_int_equal(bt_discovery_put(d, K1, v), BT_OK);
    assert_true(wait_for(f, &r, 'P', K1, 2, 2000));
    assert_int_equal(bt_discovery_put(d, K1, v), BT_OK);
    run_for(&f->loop, 100);
    assert_int_equal(count(&r, 'P', K1), 2);
    json_decref(v);
    close_disc(f, d);
    rec_free(&r);
}

static void test_two_handles_see_each_other(void **state) {
    fx *f = *state;
    bt_discovery *a = make(f, 10), *b = make(f, 10);
    rec ra = {0}, rb = {0};
    assert_int_equal(bt_discovery_watch(a, "v1/", &rec_watcher, &ra), BT_OK);
    assert_int_equal(bt_discovery_watch(b, "v1/", &rec_watcher, &rb), BT_OK);
    json_t *va = json_pack("{s:s}", "who", "a"), *vb = json_pack("{s:s}", "who", "b");
    assert_int_equal(bt_discovery_put(a, K1, va), BT_OK);
    assert_int_equal(bt_discovery_put(b, K2, vb), BT_OK);
    assert_true(wait_for(f, &ra, 'P', NULL, 2, 2000));
    assert_true(wait_for(f, &rb, 'P', NULL, 2, 2000));
    assert_string_equal(last(&ra, 'P', K2)->value, "{\"who\":\"b\"}");
    assert_string_equal(last(&rb, 'P', K1)->value, "{\"who\":\"a\"}");
    json_decref(va);
    json_decref(vb);
    close_disc(f, a);
    close_disc(f, b);
    rec_free(&ra);
    rec_free(&rb);
}

static void test_delete_latency(void **state) {
    fx *f = *state;
    duo h;
    duo_open(f, &h, 10);
    run_for(&f->loop, 20); /* let the first (empty) scan finish so the put is seen via inotify */
    uint64_t t0 = bt_now_us();
    assert_int_equal(bt_discovery_put(h.w, K1, h.v), BT_OK);
    assert_true(wait_for(f, &h.rr, 'P', K1, 1, 2000));
    double put_ms = (last(&h.rr, 'P', K1)->at_us - t0) / 1000.0;

    t0 = bt_now_us();
    assert_int_equal(bt_discovery_delete(h.w, K1), BT_OK);
    assert_true(wait_for(f, &h.rr, 'D', K1, 1, 2000));
    double del_ms = (last(&h.rr, 'D', K1)->at_us - t0) / 1000.0;
    assert_false(key_exists(f, K1));

    /* A key removed behind our back (an operator, another process's sweep). */
    assert_int_equal(bt_discovery_put(h.w, K2, h.v), BT_OK);
    assert_true(wait_for(f, &h.rr, 'P', K2, 1, 2000));
    char p[512];
    key_file(f, K2, p, sizeof p);
    t0 = bt_now_us();
    assert_int_equal(unlink(p), 0);
    assert_true(wait_for(f, &h.rr, 'D', K2, 1, 2000));
    double unlink_ms = (last(&h.rr, 'D', K2)->at_us - t0) / 1000.0;
    printf("    put-to-notice %.2f ms, delete-to-notice %.2f ms, external unlink-to-notice %.2f ms\n", put_ms,
           del_ms, unlink_ms);
    assert_true(put_ms < 500);
    assert_true(del_ms < 50); /* the frontend must stop routing to a draining worker within 50 ms */
    assert_true(unlink_ms < 500);
    duo_close(f, &h);
}

static void test_expiry(void **state) {
    fx *f = *state;
    bt_discovery *r = make(f, 2);
    rec rr = {0};
    /* Left behind by crashed processes: a registration and a temp file, both past the TTL. */
    write_key(f, K2, "{\"stale\":true}");
    char stale[512], tmpf[512];
    key_file(f, K2, stale, sizeof stale);
    age_file(stale, 100);
    snprintf(tmpf, sizeof tmpf, "%s/.tmp.99999.1", f->dir);
    write_raw(tmpf, "{", 1);
    age_file(tmpf, 100);
    write_key(f, K1, "{\"fresh\":true}");

    assert_int_equal(bt_discovery_watch(r, "v1/", &rec_watcher, &rr), BT_OK);
    assert_true(wait_for(f, &rr, 'P', K1, 1, 2000));
    assert_int_equal(count(&rr, 'P', K2), 0); /* an expired key is never reported */
    assert_false(key_exists(f, K2));          /* ... and is removed */
    assert_int_not_equal(access(tmpf, F_OK), 0);

    /* A live key whose writer stops refreshing: reported deleted, file removed. */
    char p[512];
    key_file(f, K1, p, sizeof p);
    uint64_t t0 = bt_now_us();
    age_file(p, 10);
    assert_true(wait_for(f, &rr, 'D', K1, 1, 2000));
    printf("    expired-to-notice: %.2f ms\n", (last(&rr, 'D', K1)->at_us - t0) / 1000.0);
    assert_false(key_exists(f, K1));

    /* A writer that dies produces no file event at all when its key expires: the periodic rescan
     * finds it. Aged to 1.5 s of the 2 s TTL, it must be gone within about 0.5 s + one 1 s tick. */
    write_key(f, K3, "{}");
    assert_true(wait_for(f, &rr, 'P', K3, 1, 2000));
    key_file(f, K3, p, sizeof p);
    struct timeval tv[2];
    gettimeofday(&tv[0], NULL);
    tv[0].tv_usec -= 500000;
    tv[0].tv_sec -= 1;
    if (tv[0].tv_usec < 0) tv[0].tv_usec += 1000000, tv[0].tv_sec -= 1;
    tv[1] = tv[0];
    t0 = bt_now_us();
    assert_int_equal(utimes(p, tv), 0);
    assert_true(wait_for(f, &rr, 'D', K3, 1, 2500));
    double silent_ms = (last(&rr, 'D', K3)->at_us - t0) / 1000.0;
    printf("    silent expiry (0.5 s left) noticed after %.0f ms\n", silent_ms);
    assert_true(silent_ms >= 450);
    assert_false(key_exists(f, K3));
    close_disc(f, r);
    rec_free(&rr);
}

static bool rewrite_counted(void *p) {
    bt_discovery_stats st;
    bt_discovery_get_stats(p, &st);
    return st.reregistrations > 0;
}

static void test_refresh_keeps_key_alive(void **state) {
    fx *f = *state;
    duo h;
    duo_open(f, &h, 2);
    assert_int_equal(bt_discovery_put(h.w, K1, h.v), BT_OK);
    assert_true(wait_for(f, &h.rr, 'P', K1, 1, 2000));
    run_for(&f->loop, 2600); /* past the 2 s TTL */
    assert_int_equal(count(&h.rr, 'D', K1), 0);
    assert_int_equal(count(&h.rr, 'P', K1), 1); /* refreshes touch the mtime only: no re-put */
    assert_true(key_exists(f, K1));

    /* Someone removes it (an expiry sweep while we were paused): the writer puts it back. */
    char p[512];
    key_file(f, K1, p, sizeof p);
    uint64_t t0 = bt_now_us();
    assert_int_equal(unlink(p), 0);
    assert_true(wait_for(f, &h.rr, 'D', K1, 1, 1000));
    assert_true(wait_for(f, &h.rr, 'P', K1, 2, 2000));
    printf("    vanished key rewritten and seen after %.0f ms\n", (last(&h.rr, 'P', K1)->at_us - t0) / 1000.0);
    assert_true(key_exists(f, K1));
    /* the rewrite is counted when its job's result reaches the loop, which may come after the
     * reader's scan has seen the file again */
    assert_true(run_until(&f->loop, rewrite_counted, h.w, 1000));
    bt_discovery_stats st;
    bt_discovery_get_stats(h.w, &st);
    assert_int_equal(st.reregistrations, 1); /* the rewrite is counted, once */
    assert_true(st.registered);
    bt_discovery_get_stats(NULL, &st); /* a process without discovery: all zero */
    assert_false(st.watching || st.registered || st.reregistrations);
    duo_close(f, &h);
}

static void test_malformed_skipped(void **state) {
    fx *f = *state;
    bt_discovery *r = make(f, 10);
    rec rr = {0};
    write_key(f, K2, "{\"type\":\"Endpoint\",");            /* truncated JSON */
    write_key(f, "v1/instances/dynamo/x/y/3", "");           /* empty */
    char big[70000];                                         /* over the 64 KiB read cap */
    memset(big, ' ', sizeof big);
    big[0] = '1';
    char bigp[512];
    key_file(f, "v1/instances/dynamo/x/y/4", bigp, sizeof bigp);
    write_raw(bigp, big, sizeof big);
    char odd[512];
    snprintf(odd, sizeof odd, "%s/v1%%zz", f->dir); /* not a valid encoded name */
    write_raw(odd, "{}", 2);
    snprintf(odd, sizeof odd, "%s/v1%%2Fsubdir", f->dir); /* a directory */
    assert_int_equal(mkdir(odd, 0755), 0);
    write_key(f, K1, "{\"ok\":1}");

    assert_int_equal(bt_discovery_watch(r, "v1/", &rec_watcher, &rr), BT_OK);
    assert_true(wait_for(f, &rr, 'P', K1, 1, 2000));
    run_for(&f->loop, 1100); /* one periodic rescan: still skipped (and warned about only once) */
    assert_int_equal(rr.n, 1);

    /* Fixed: now reported. Broken again: the watcher forgets it. */
    write_key(f, K2, "{\"type\":\"Endpoint\"}");
    assert_true(wait_for(f, &rr, 'P', K2, 1, 2000));
    write_key(f, K2, "not json");
    assert_true(wait_for(f, &rr, 'D', K2, 1, 2000));
    assert_int_equal(count(&rr, 'P', NULL), 2);
    close_disc(f, r);
    rec_free(&rr);
}

/* Descriptor pressure (EMFILE): a scan that can list the directory but cannot open the key files
 * must keep what it knew about them. Only real absence is a deletion: a key unlinked under
 * pressure is still reported deleted (which also proves that scans ran while the process was out
 * of descriptors), and a key that appeared under pressure is reported once it can be read. */
static void test_unreadable_keeps_previous_view(void **state) {
    fx *f = *state;
    bt_discovery *r = make(f, 10);
    rec rr = {0};
    write_key(f, K1, "{\"ok\":1}");
    write_key(f, K2, "{\"ok\":2}");
    /* K3 is staged under a name the scan ignores, to be renamed in (rename needs no descriptor) */
    char k2p[512], k3p[512], staged[512];
    key_file(f, K2, k2p, sizeof k2p);
    key_file(f, K3, k3p, sizeof k3p);
    snprintf(staged, sizeof staged, "%s/.staged", f->dir);
    write_raw(staged, "{\"ok\":3}", 8);
    assert_int_equal(bt_discovery_watch(r, "v1/", &rec_watcher, &rr), BT_OK);
    assert_true(wait_for(f, &rr, 'P', NULL, 2, 2000));
    run_for(&f->loop, 50);

    /* Leave exactly one free descriptor: a scan's opendir takes it and every openat fails. */
    struct rlimit old, low;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &old), 0);
    low = old;
    low.rlim_cur = 64;
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &low), 0);
    int fds[64], nf = 0, open_errno = 0;
    while (nf < 64) {
        int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            open_errno = errno;
            break;
        }
        fds[nf++] = fd;
    }
    bool full = open_errno == EMFILE && nf > 0;
    if (full) close(fds[--nf]);
    int unlinked = unlink(k2p), renamed = rename(staged, k3p);
    bool k2_gone = full && wait_for(f, &rr, 'D', K2, 1, 2000);
    run_for(&f->loop, 1200); /* and at least one periodic rescan */
    int k1_deleted = count(&rr, 'D', K1), k3_put = count(&rr, 'P', K3);
    while (nf > 0) close(fds[--nf]);
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);

    /* Descriptors back: K3 is read and reported, K1 is unchanged (no repeat, no delete). */
    bool k3_seen = wait_for(f, &rr, 'P', K3, 1, 2000);
    run_for(&f->loop, 100);
    close_disc(f, r); /* before any assertion: a failed one must not leave the loop running */
    printf("    under EMFILE: %d delete(s) of the live key, %d put(s) of the unread new key; "
           "unlinked key %s\n", k1_deleted, k3_put, k2_gone ? "reported deleted" : "NOT reported");
    assert_true(full); /* the process really ran out of descriptors */
    assert_int_equal(unlinked, 0);
    assert_int_equal(renamed, 0);
    assert_true(k2_gone);
    assert_int_equal(k1_deleted, 0); /* before the fix: EMFILE on K1 read as its deletion */
    assert_int_equal(k3_put, 0);     /* unread and unknown: nothing to report yet */
    assert_true(k3_seen);
    assert_string_equal(last(&rr, 'P', K3)->value, "{\"ok\":3}");
    assert_int_equal(count(&rr, 'P', K1), 1);
    assert_int_equal(count(&rr, 'D', K1), 0);
    rec_free(&rr);
}

static void test_close_removes_own_keys(void **state) {
    fx *f = *state;
    duo h;
    duo_open(f, &h, 10);
    assert_int_equal(bt_discovery_put(h.w, K1, h.v), BT_OK);
    assert_int_equal(bt_discovery_put(h.w, K2, h.v), BT_OK);
    assert_true(wait_for(f, &h.rr, 'P', NULL, 2, 2000));
    uint64_t t0 = bt_now_us();
    close_disc(f, h.w); /* done is only called after the unlinks have completed */
    h.w = NULL;
    assert_false(key_exists(f, K1));
    assert_false(key_exists(f, K2));
    assert_true(wait_for(f, &h.rr, 'D', NULL, 2, 2000));
    printf("    close-to-notice: %.2f ms\n", (bt_now_us() - t0) / 1000.0);
    duo_close(f, &h);
}

static void test_put_then_delete_ends_absent(void **state) {
    fx *f = *state;
    duo h;
    duo_open(f, &h, 10);
    assert_int_equal(bt_discovery_put(h.w, K1, h.v), BT_OK);
    assert_int_equal(bt_discovery_delete(h.w, K1), BT_OK);
    for (int i = 0; i < 20; i++) { /* interleaved while earlier operations are still running */
        assert_int_equal(bt_discovery_put(h.w, K2, h.v), BT_OK);
        assert_int_equal(bt_discovery_delete(h.w, K2), BT_OK);
        if (i % 5 == 0) uv_run(&f->loop, UV_RUN_NOWAIT);
    }
    assert_int_equal(bt_discovery_put(h.w, K2, h.v), BT_OK); /* ... and a final put wins */
    assert_true(wait_for(f, &h.rr, 'P', K2, 1, 2000));
    run_for(&f->loop, 100);
    assert_false(key_exists(f, K1));
    assert_true(key_exists(f, K2));
    duo_close(f, &h);
}

static void test_close_from_callback(void **state) {
    fx *f = *state;
    bt_discovery *r = make(f, 10);
    rec rr = {0};
    write_key(f, K1, "{}");
    write_key(f, K2, "{}");
    rr.close_me = r;
    assert_int_equal(bt_discovery_watch(r, "v1/", &rec_watcher, &rr), BT_OK);
    assert_true(run_until(&f->loop, flag_set, &rr.closed, 2000));
    assert_int_equal(rr.n, 1); /* no callbacks after close, even within the same snapshot */
    rec_free(&rr);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_defaults_and_dispatch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_key_encoding, setup, teardown),
        cmocka_unit_test_setup_teardown(test_put_seen_by_watch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_handles_see_each_other, setup, teardown),
        cmocka_unit_test_setup_teardown(test_delete_latency, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refresh_keeps_key_alive, setup, teardown),
        cmocka_unit_test_setup_teardown(test_malformed_skipped, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unreadable_keeps_previous_view, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_removes_own_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_put_then_delete_ends_absent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_from_callback, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
