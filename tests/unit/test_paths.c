/* test_paths.c — unit tests of src/common/paths.c, how baton finds its data files from its own
 * executable's path.
 *
 * Covers: the installed layout (<bin>/../share/baton/<name>) is found and wins over a source tree
 * next to it; a build directory inside the source tree (<build>/../<source>) is found when nothing
 * is installed; with neither, the answer is false and names the installed candidate (what the
 * error message shows); a file where a directory is expected does not count; a result that does
 * not fit the caller's buffer is refused, never truncated; bt_paths_self gives an absolute path
 * of an existing file (this test's own executable). The directories are real ones under a fresh
 * temporary directory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/paths.h"

static char base[256];

static void mkdirs(const char *rel) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", base, rel);
    for (char *s = p + strlen(base) + 1; *s; s++)
        if (*s == '/') {
            *s = '\0';
            mkdir(p, 0755);
            *s = '/';
        }
    assert_int_equal(mkdir(p, 0755), 0);
}

static void path(char *out, size_t cap, const char *rel) { snprintf(out, cap, "%s/%s", base, rel); }

static int setup(void **state) {
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(base, sizeof base, "%s/baton-test-paths-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    return mkdtemp(base) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", base);
    return system(cmd) == 0 ? 0 : -1;
}

/* bt_paths_data_dir("chaos") for the binary at self_rel (below the test's directory) with the
 * source-tree candidate `source`: whether it finds the directory, and the path it writes
 * (want_rel below the test's directory; NULL: not compared). */
static void expect_dir(const char *self_rel, const char *source, bool found, const char *want_rel) {
    char self[512], want[512], out[512];
    path(self, sizeof self, self_rel);
    assert_int_equal(bt_paths_data_dir(self, "chaos", source, out, sizeof out), found);
    if (!want_rel) return;
    path(want, sizeof want, want_rel);
    assert_string_equal(out, want);
}

static void test_installed_wins(void **state) {
    (void)state;
    mkdirs("prefix/bin");
    mkdirs("prefix/share/baton/chaos");
    mkdirs("prefix/tools/chaos"); /* a source-tree look-alike next to it: the installed one wins */
    expect_dir("prefix/bin/baton", "tools/chaos", true, "prefix/bin/../share/baton/chaos");
}

static void test_source_tree(void **state) {
    (void)state;
    mkdirs("src/build");
    mkdirs("src/tools/chaos");
    expect_dir("src/build/baton", "tools/chaos", true, "src/build/../tools/chaos");
    /* without a source candidate, only the installed layout counts */
    expect_dir("src/build/baton", NULL, false, NULL);
}

static void test_neither(void **state) {
    (void)state;
    mkdirs("lone/bin");
    expect_dir("lone/bin/baton", "tools/chaos", false, "lone/bin/../share/baton/chaos");
}

static void test_file_is_not_a_dir(void **state) {
    (void)state;
    mkdirs("f/bin");
    mkdirs("f/share/baton");
    char file[512];
    path(file, sizeof file, "f/share/baton/chaos");
    FILE *fp = fopen(file, "w");
    assert_non_null(fp);
    fclose(fp);
    expect_dir("f/bin/baton", "tools/chaos", false, NULL);
}

static void test_too_small(void **state) {
    (void)state;
    mkdirs("s/bin");
    mkdirs("s/share/baton/chaos");
    char self[512], want[512], out[512];
    path(self, sizeof self, "s/bin/baton");
    path(want, sizeof want, "s/bin/../share/baton/chaos");
    size_t need = strlen(want) + 1;
    assert_true(bt_paths_data_dir(self, "chaos", NULL, out, need)); /* exactly enough */
    assert_string_equal(out, want);
    memset(out, 'x', sizeof out);
    assert_false(bt_paths_data_dir(self, "chaos", NULL, out, need - 1)); /* one byte short */
    assert_int_equal(out[0], '\0');
    assert_false(bt_paths_data_dir(self, "chaos", NULL, out, 0));
}

static void test_self(void **state) {
    (void)state;
    char self[4096];
    assert_true(bt_paths_self(self, sizeof self));
    assert_int_equal(self[0], '/');
    assert_int_equal(access(self, X_OK), 0);
    assert_non_null(strstr(self, "test_paths"));
    assert_false(bt_paths_self(self, 4)); /* does not fit: refused, not truncated */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_installed_wins),    cmocka_unit_test(test_source_tree),
        cmocka_unit_test(test_neither),           cmocka_unit_test(test_file_is_not_a_dir),
        cmocka_unit_test(test_too_small),         cmocka_unit_test(test_self),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
