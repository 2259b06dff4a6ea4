/* test_linelog.c — unit tests of src/common/linelog.c, the file the access log is written to by a
 * thread of its own.
 *
 * Covers: lines put from two threads at once all reach the file whole (no line cut into another),
 * in each thread's order, and are counted as written once closed; a line longer than the buffer
 * is dropped and counted, the lines around it kept; the file renamed away (logrotate's move) is
 * followed by a new file at the path within the writer's one-second check, the lines before the
 * move staying in the moved file; the file removed likewise; open refuses a path in a directory
 * that does not exist and a directory, saying why; close writes what is queued; the written and
 * dropped counts; a write that fails part-way (the file size limit) leaves one cut line alone on
 * its line, the lines after it whole, and the counts add up; close returns within its bound when
 * the output takes nothing (a FIFO no one reads). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <cmocka.h>

#include "common/linelog.h"

static char dir[64];

static int setup(void **state) {
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/test_linelog-XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *s = malloc(1 << 22);
    *len = fread(s, 1, (1 << 22) - 1, f);
    s[*len] = '\0';
    fclose(f);
    return s;
}

static size_t count_lines(const char *s) {
    size_t n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

typedef struct {
    bt_linelog *l;
    int id, n;
} putter;

static void put_many(void *arg) {
    putter *p = arg;
    for (int i = 0; i < p->n; i++) {
        char line[128];
        int k = snprintf(line, sizeof line, "{\"thread\":%d,\"i\":%d,\"pad\":\"%040d\"}\n", p->id, i, i);
        while (!bt_linelog_put(p->l, line, (size_t)k)) usleep(100); /* full: the test waits, a loop would not */
    }
}

static void test_two_threads(void **state) {
    (void)state;
    char path[128], err[256];
    snprintf(path, sizeof path, "%s/two.log", dir);
    bt_linelog *l = bt_linelog_open(path, 4096, err, sizeof err);
    assert_non_null(l);
    putter a = {l, 1, 20000}, b = {l, 2, 20000};
    uv_thread_t ta, tb;
    assert_int_equal(uv_thread_create(&ta, put_many, &a), 0);
    assert_int_equal(uv_thread_create(&tb, put_many, &b), 0);
    uv_thread_join(&ta);
    uv_thread_join(&tb);
    bt_linelog_close(l);
    size_t len;
    char *s = slurp(path, &len);
    assert_non_null(s);
    assert_int_equal(count_lines(s), 40000);
    int next[3] = {0, 0, 0};
    for (char *ln = strtok(s, "\n"); ln; ln = strtok(NULL, "\n")) {
        int t = -1, i = -1, pad = -1;
        assert_int_equal(sscanf(ln, "{\"thread\":%d,\"i\":%d,\"pad\":\"%d\"}", &t, &i, &pad), 3);
        assert_true(t == 1 || t == 2);
        assert_int_equal(i, next[t]); /* each thread's lines in its order, none cut */
        assert_int_equal(pad, i);
        next[t]++;
    }
    assert_int_equal(next[1], 20000);
    assert_int_equal(next[2], 20000);
    free(s);
}

static void test_too_long_dropped(void **state) {
    (void)state;
    char path[128], err[256];
    snprintf(path, sizeof path, "%s/long.log", dir);
    bt_linelog *l = bt_linelog_open(path, 4096, err, sizeof err);
    assert_non_null(l);
    assert_true(bt_linelog_put(l, "before\n", 7));
    char big[5000];
    memset(big, 'x', sizeof big);
    big[sizeof big - 1] = '\n';
    assert_false(bt_linelog_put(l, big, sizeof big));
    assert_true(bt_linelog_put(l, "after\n", 6));
    bt_linelog_drop(l);
    assert_int_equal(bt_linelog_dropped(l), 2);
    for (int i = 0; i < 200 && bt_linelog_written(l) < 2; i++) usleep(10000);
    assert_int_equal(bt_linelog_written(l), 2);
    bt_linelog_close(l);
    size_t len;
    char *s = slurp(path, &len);
    assert_string_equal(s, "before\nafter\n");
    free(s);
}

/* Puts lines until `path` holds `want` bytes, or 5 s pass. */
static bool wait_for(bt_linelog *l, const char *path, const char *line, const char *want) {
    for (int i = 0; i < 100; i++) {
        assert_true(bt_linelog_put(l, line, strlen(line)));
        usleep(50000);
        size_t len;
        char *s = slurp(path, &len);
        bool ok = s && strstr(s, want);
        free(s);
        if (ok) return true;
    }
    return false;
}

static void test_rotation(void **state) {
    (void)state;
    char path[128], moved[140], err[256];
    snprintf(path, sizeof path, "%s/rot.log", dir);
    snprintf(moved, sizeof moved, "%s/rot.log.1", dir);
    bt_linelog *l = bt_linelog_open(path, 4096, err, sizeof err);
    assert_non_null(l);
    assert_true(wait_for(l, path, "one\n", "one\n"));
    assert_int_equal(rename(path, moved), 0);
    /* lines keep going to the moved file until the check; then to a new file at the path */
    assert_true(wait_for(l, path, "two\n", "two\n"));
    size_t len;
    char *s = slurp(moved, &len);
    assert_non_null(s);
    assert_non_null(strstr(s, "one\n"));
    free(s);
    /* removed: made again */
    assert_int_equal(unlink(path), 0);
    assert_true(wait_for(l, path, "three\n", "three\n"));
    bt_linelog_close(l);
    s = slurp(path, &len);
    assert_null(strstr(s, "one\n"));
    free(s);
}

/* A write that fails part-way (the file size limit, as a full disk would) leaves a cut line; the
 * next batch starts on a line of its own, and the counts add up. */
static void test_write_fails_part_way(void **state) {
    (void)state;
    char path[128], err[256];
    snprintf(path, sizeof path, "%s/cut.log", dir);
    struct rlimit old;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = {1000, old.rlim_max};
    bt_linelog *l = bt_linelog_open(path, 65536, err, sizeof err);
    assert_non_null(l);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &small), 0);
    char line[128];
    for (int i = 0; i < 30; i++) {
        int k = snprintf(line, sizeof line, "{\"n\":%d,\"pad\":\"%040d\"}\n", i, i);
        assert_true(bt_linelog_put(l, line, (size_t)k));
    }
    for (int i = 0; i < 200 && bt_linelog_written(l) + bt_linelog_dropped(l) < 30; i++) usleep(10000);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    for (int i = 100; i < 110; i++) {
        int k = snprintf(line, sizeof line, "{\"n\":%d,\"pad\":\"%040d\"}\n", i, i);
        assert_true(bt_linelog_put(l, line, (size_t)k));
    }
    for (int i = 0; i < 200 && bt_linelog_written(l) + bt_linelog_dropped(l) < 40; i++) usleep(10000);
    uint64_t written = bt_linelog_written(l), dropped = bt_linelog_dropped(l);
    bt_linelog_close(l);
    signal(SIGXFSZ, SIG_DFL);
    assert_int_equal(written + dropped, 40);
    assert_true(dropped > 0 && written >= 10);
    size_t len;
    char *s = slurp(path, &len);
    size_t good = 0, cut = 0;
    int after = 0;
    for (char *ln = strtok(s, "\n"); ln; ln = strtok(NULL, "\n")) {
        int n = -1, pad = -1, end = 0;
        if (sscanf(ln, "{\"n\":%d,\"pad\":\"%d\"}%n", &n, &pad, &end) == 2 && end == (int)strlen(ln) && n == pad) {
            good++;
            after += n >= 100;
        } else {
            cut++; /* the line the limit cut: alone on its line */
            assert_true(strlen(ln) < 60);
        }
    }
    assert_int_equal(good, written);
    assert_true(cut <= 1);
    assert_int_equal(after, 10); /* the lines after the failure all whole */
    free(s);
}

/* An output that takes nothing (a FIFO no one reads) does not keep close from returning. */
static void test_close_stuck_output(void **state) {
    (void)state;
    char path[128], err[256];
    snprintf(path, sizeof path, "%s/fifo", dir);
    assert_int_equal(mkfifo(path, 0600), 0);
    int keep = open(path, O_RDWR | O_NONBLOCK); /* a reader that never reads: the open does not block */
    assert_true(keep >= 0);
    bt_linelog *l = bt_linelog_open(path, 1 << 20, err, sizeof err);
    assert_non_null(l);
    char line[1024];
    memset(line, 'x', sizeof line);
    line[sizeof line - 1] = '\n';
    for (int i = 0; i < 200; i++) assert_true(bt_linelog_put(l, line, sizeof line)); /* 200 KiB > the pipe's 64 */
    usleep(300000);                                                                    /* the writer is in write(2) */
    uint64_t t0 = uv_hrtime();
    bt_linelog_close(l);
    double s = (double)(uv_hrtime() - t0) / 1e9;
    assert_true(s >= 2.5 && s < 6.0); /* it waited its bound, no more */
    close(keep);
}

static void test_open_errors(void **state) {
    (void)state;
    char path[128], err[256] = "";
    snprintf(path, sizeof path, "%s/no/such/dir.log", dir);
    assert_null(bt_linelog_open(path, 4096, err, sizeof err));
    assert_non_null(strstr(err, "No such file or directory"));
    err[0] = '\0';
    assert_null(bt_linelog_open(dir, 4096, err, sizeof err));
    assert_true(strstr(err, "Is a directory") || strstr(err, "not a file"));
}

int main(void) {
    signal(SIGPIPE, SIG_IGN); /* as baton's main does: a reader gone is EPIPE, not the end */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_threads),
        cmocka_unit_test(test_too_long_dropped),
        cmocka_unit_test(test_rotation),
        cmocka_unit_test(test_write_fails_part_way),
        cmocka_unit_test(test_close_stuck_output),
        cmocka_unit_test(test_open_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
