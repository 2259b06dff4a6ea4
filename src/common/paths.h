/* paths.h — where baton's own files are, found from the running executable's path so that one
 * binary works both installed (`cmake --install`: <prefix>/bin/baton next to
 * <prefix>/share/baton/) and from a build tree (build/baton next to the source tree). Nothing here
 * depends on the install prefix chosen at configure time: an installed tree can be moved. */
#ifndef BATON_PATHS_H
#define BATON_PATHS_H

#include <stdbool.h>
#include <stddef.h>

/* The absolute path of the running executable (symlinks resolved, from /proc/self/exe) into
 * out[cap]. False, with errno set, if it cannot be read or does not fit. */
bool bt_paths_self(char *out, size_t cap);

/* Finds one of baton's data directories for the executable at `self`, in this order:
 *   1. `<dir of self>/<BATON_DATADIR_FROM_BINDIR>/<installed>` (the installed layout; the
 *      relative path from the bin to the data directory is fixed when the build is configured,
 *      "../share/baton" by default);
 *   2. `<dir of self>/../<source>` (a build directory inside the source tree, e.g. build/baton
 *      and tools/chaos), when `source` is not NULL.
 * The first that is a directory is written to out[cap] and true returned. Otherwise false, with
 * out holding the installed candidate (for the error message). Paths that do not fit in `cap`
 * are never used. */
bool bt_paths_data_dir(const char *self, const char *installed, const char *source, char *out, size_t cap);

#endif
