/* paths.c — finding baton's data files relative to its own executable (see paths.h). */
#include "common/paths.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef BATON_DATADIR_FROM_BINDIR
#define BATON_DATADIR_FROM_BINDIR "../share/baton"
#endif

bool bt_paths_self(char *out, size_t cap) {
    if (cap < 2) {
        errno = ENAMETOOLONG;
        return false;
    }
    ssize_t n = readlink("/proc/self/exe", out, cap - 1);
    if (n <= 0) return false;
    if ((size_t)n >= cap - 1) { /* possibly truncated */
        errno = ENAMETOOLONG;
        return false;
    }
    out[n] = '\0';
    return true;
}

static bool is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* out = "<dir of self>/<mid>/<leaf>", or false if it does not fit. An absolute `mid` (a data
 * directory configured outside the prefix) is used as it is. */
static bool join(char *out, size_t cap, const char *self, const char *mid, const char *leaf) {
    const char *slash = strrchr(self, '/');
    int dirlen = slash ? (int)(slash - self) : 0;
    int n;
    if (mid[0] == '/') n = snprintf(out, cap, "%s/%s", mid, leaf);
    else if (slash) n = snprintf(out, cap, "%.*s/%s/%s", dirlen, self, mid, leaf);
    else n = snprintf(out, cap, "%s/%s", mid, leaf);
    return n >= 0 && (size_t)n < cap;
}

bool bt_paths_data_dir(const char *self, const char *installed, const char *source, char *out, size_t cap) {
    char first[4096];
    bool have_first = join(first, sizeof first, self, BATON_DATADIR_FROM_BINDIR, installed);
    if (cap == 0) return false;
    if (have_first && is_dir(first) && strlen(first) < cap) {
        memcpy(out, first, strlen(first) + 1);
        return true;
    }
    if (source && join(out, cap, self, "..", source) && is_dir(out)) return true;
    if (have_first && strlen(first) < cap) memcpy(out, first, strlen(first) + 1);
    else out[0] = '\0';
    return false;
}
