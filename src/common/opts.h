/* opts.h — command-line flags with environment twins.
 *
 * A subcommand declares a table of bt_opt rows. bt_opts_parse() first applies each row's
 * environment variable, then the command line (the flag wins: the variable of a flag the command
 * line gives is not read at all), validating every value against the row's type and range. Unknown flags and bad values are errors with a message naming the
 * flag, the value and what was expected. Flags take `--name value` or `--name=value`. */
#ifndef BATON_OPTS_H
#define BATON_OPTS_H

#include <stdbool.h>
#include <stdint.h>

typedef enum {
    BT_OPT_STR,    /* char *  (points into argv/environ; not copied) */
    BT_OPT_INT,    /* int64_t, range [min, max] */
    BT_OPT_DOUBLE, /* double, range [min, max]; the literal "none" sets NaN (= unset) */
    BT_OPT_BOOL,   /* bool; a bare flag means true */
} bt_opt_type;

typedef struct {
    const char *flag; /* "--http-port" */
    const char *env;  /* "DYN_HTTP_PORT" or NULL */
    bt_opt_type type;
    void *dst;
    double min, max;
    const char *help;
} bt_opt;

/* Parses env then argv[first..argc). On error writes a message to err and returns false.
 * Arguments not in `opts` are errors unless `rest` is non-NULL, in which case they are copied
 * (pointers) to rest[] (capacity rest_cap) and counted in *nrest. */
bool bt_opts_parse(const bt_opt *opts, int nopts, int argc, char **argv, int first, const char **rest,
                   int rest_cap, int *nrest, char *err, int errlen);
/* Where the value of `flag` comes from in bt_opts_parse over the same arguments: "argument" when
 * the command line gives it, its environment variable's name when only that is set (non-empty),
 * NULL when it keeps its default. The command line is read exactly as bt_opts_parse reads it
 * (a value that looks like a flag is still a value), so the two cannot disagree. */
const char *bt_opts_origin(const bt_opt *opts, int nopts, int argc, char **argv, int first, const char *flag);
/* Prints a usage table of the options to stdout. */
void bt_opts_usage(const char *cmd, const bt_opt *opts, int nopts);
/* Finds the option row by flag name, or NULL. */
const bt_opt *bt_opts_find(const bt_opt *opts, int nopts, const char *flag);

#endif
