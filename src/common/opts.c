/* opts.c — see opts.h. Hand-written because getopt_long has no notion of environment twins,
 * typed ranges or collecting the options of other subcommands (`baton run` forwards them). */
#include "common/opts.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

const bt_opt *bt_opts_find(const bt_opt *opts, int nopts, const char *flag) {
    for (int i = 0; i < nopts; i++)
        if (strcmp(opts[i].flag, flag) == 0) return &opts[i];
    return NULL;
}

/* origin: the environment variable the value came from, or NULL for a command-line argument
 * (the caller prefixes the message with the command's name). */
static bool apply(const bt_opt *o, const char *val, const char *origin, char *err, int errlen) {
    const char *sep = origin ? ": " : "";
    if (!origin) origin = "";
    switch (o->type) {
    case BT_OPT_STR:
        *(const char **)o->dst = val;
        return true;
    case BT_OPT_INT: {
        int64_t v;
        if (!bt_parse_i64(val, (int64_t)o->min, (int64_t)o->max, &v)) {
            snprintf(err, (size_t)errlen, "%s%sinvalid value '%s' for %s (expected an integer from %lld to %lld)",
                     origin, sep, val, o->flag, (long long)o->min, (long long)o->max);
            return false;
        }
        *(int64_t *)o->dst = v;
        return true;
    }
    case BT_OPT_DOUBLE: {
        double v;
        if (strcmp(val, "none") == 0 || strcmp(val, "None") == 0) {
            *(double *)o->dst = NAN;
            return true;
        }
        if (!bt_parse_double(val, o->min, o->max, &v)) {
            snprintf(err, (size_t)errlen, "%s%sinvalid value '%s' for %s (expected a number from %g to %g)", origin,
                     sep, val, o->flag, o->min, o->max);
            return false;
        }
        *(double *)o->dst = v;
        return true;
    }
    case BT_OPT_BOOL: {
        bool v;
        if (!bt_parse_bool(val, &v)) {
            snprintf(err, (size_t)errlen, "%s%sinvalid value '%s' for %s (expected true or false)", origin, sep, val,
                     o->flag);
            return false;
        }
        *(bool *)o->dst = v;
        return true;
    }
    }
    return false;
}

/* Whether argv[first..argc) gives `want`, read as bt_opts_parse reads it (a value that looks like a
 * flag is still a value; an unknown flag is skipped with its value, as it is forwarded). */
static bool on_command_line(const bt_opt *opts, int nopts, int argc, char **argv, int first, const bt_opt *want) {
    for (int i = first; i < argc; i++) {
        const char *a = argv[i];
        char name[128];
        const char *eq = strchr(a, '=');
        bool inline_val = strncmp(a, "--", 2) == 0 && eq && (size_t)(eq - a) < sizeof name;
        if (inline_val) {
            memcpy(name, a, (size_t)(eq - a));
            name[eq - a] = '\0';
        } else {
            snprintf(name, sizeof name, "%s", a);
        }
        const bt_opt *o = bt_opts_find(opts, nopts, name);
        if (!o) {
            if (strncmp(a, "--", 2) == 0 && !eq && i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) i++;
            continue;
        }
        if (o == want) return true;
        /* a flag never takes the next flag as its value (bt_opts_parse refuses that for a non-boolean) */
        if (!inline_val && i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) i++;
    }
    return false;
}

bool bt_opts_parse(const bt_opt *opts, int nopts, int argc, char **argv, int first, const char **rest,
                   int rest_cap, int *nrest, char *err, int errlen) {
    if (nrest) *nrest = 0;
    for (int i = 0; i < nopts; i++) {
        const char *v = opts[i].env ? getenv(opts[i].env) : NULL;
        /* the flag wins: a variable it overrides is not read, so a bad value there is no error (a
         * shell's exported default does not stop a command that says what it wants) */
        if (!v || !*v || on_command_line(opts, nopts, argc, argv, first, &opts[i])) continue;
        if (!apply(&opts[i], v, opts[i].env, err, errlen)) return false;
    }
    for (int i = first; i < argc; i++) {
        const char *a = argv[i];
        char name[128];
        const char *val = NULL;
        const char *eq = strchr(a, '=');
        if (strncmp(a, "--", 2) == 0 && eq && (size_t)(eq - a) < sizeof name) {
            memcpy(name, a, (size_t)(eq - a));
            name[eq - a] = '\0';
            val = eq + 1;
        } else {
            snprintf(name, sizeof name, "%s", a);
        }
        const bt_opt *o = bt_opts_find(opts, nopts, name);
        if (!o) {
            if (rest && strncmp(a, "--", 2) == 0) {
                /* forward an unknown flag (with its value, when it has one) */
                if (*nrest >= rest_cap - 1) {
                    snprintf(err, (size_t)errlen, "too many arguments");
                    return false;
                }
                rest[(*nrest)++] = a;
                if (!eq && i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) rest[(*nrest)++] = argv[++i];
                continue;
            }
            snprintf(err, (size_t)errlen, "unknown argument '%s' (see --help)", a);
            return false;
        }
        if (!val) {
            if (o->type == BT_OPT_BOOL && (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0)) {
                val = "true";
            } else if (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
                val = argv[++i];
            } else {
                /* no value, or the next flag: `--api-key --http-port 9000` must not make the key
                 * "--http-port" (a value that starts with "--" can be given as --flag=VALUE) */
                snprintf(err, (size_t)errlen, "%s needs a value", name);
                return false;
            }
        }
        if (!apply(o, val, NULL, err, errlen)) return false;
    }
    return true;
}

const char *bt_opts_origin(const bt_opt *opts, int nopts, int argc, char **argv, int first, const char *flag) {
    const bt_opt *want = bt_opts_find(opts, nopts, flag);
    if (!want) return NULL;
    if (on_command_line(opts, nopts, argc, argv, first, want)) return "argument";
    const char *v = want->env ? getenv(want->env) : NULL;
    return v && *v ? want->env : NULL;
}

/* The value an option holds now: before parsing, its default. */
static void opt_value(const bt_opt *o, char *out, size_t n) {
    switch (o->type) {
    case BT_OPT_STR: {
        const char *v = *(const char *const *)o->dst;
        snprintf(out, n, "%s", v ? (*v ? v : "\"\"") : "none");
        break;
    }
    case BT_OPT_INT: snprintf(out, n, "%lld", (long long)*(const int64_t *)o->dst); break;
    case BT_OPT_DOUBLE: {
        double v = *(const double *)o->dst;
        if (isnan(v)) snprintf(out, n, "none");
        else snprintf(out, n, "%g", v);
        break;
    }
    case BT_OPT_BOOL: snprintf(out, n, "%s", *(const bool *)o->dst ? "true" : "false"); break;
    default: snprintf(out, n, "?");
    }
}

void bt_opts_usage(const char *cmd, const bt_opt *opts, int nopts) {
    printf("usage: baton %s [options]\n\noptions (each flag has an environment twin; the flag wins):\n", cmd);
    for (int i = 0; i < nopts; i++) {
        char def[160];
        opt_value(&opts[i], def, sizeof def);
        printf("  %-38s %-38s %s [default: %s]\n", opts[i].flag, opts[i].env ? opts[i].env : "",
               opts[i].help ? opts[i].help : "", def);
    }
}
