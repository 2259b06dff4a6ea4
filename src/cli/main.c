/* main.c — the `baton` binary: dispatches to a subcommand. */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include "cli/run.h"
#include "common/log.h"
#include "common/paths.h"
#include "common/proc.h"
#include "frontend/frontend.h"
#include "worker/worker.h"

/* The usage goes to stdout when asked for (--help, help), to stderr after a usage error (exit 2),
 * so that `baton nosuch > out` leaves out empty and the message in front of the reader. */
static void usage(FILE *to) {
    fprintf(to, "usage: baton <command> [options]\n\n"
                "commands:\n"
                "  run        a frontend and N workers on this machine, simulated or --engine llama (start here)\n"
                "  frontend   the OpenAI-compatible HTTP frontend and router\n"
                "  worker     one engine behind the request plane\n"
                "  chaos      fault scenarios against baton, checked byte for byte (docs/chaos.md)\n\n"
                "`baton <command> --help` (or `baton help <command>`) lists a command's options;\n"
                "`baton --version` prints the version.\n");
}

/* `baton chaos ...`: the fault-testing tool is a Python program, chaos.py. It is found through
 * $BATON_CHAOS_DIR, else next to this binary: <prefix>/share/baton/chaos when installed, or
 * tools/chaos in the source tree for a build directory inside it (build/baton). It is exec'd with
 * the remaining arguments and, unless BATON_BIN says otherwise, starts this very binary for the
 * processes it tests. */
static int chaos_main(int argc, char **argv) {
    char self[PATH_MAX];
    char dir[PATH_MAX];
    char tool[PATH_MAX + 16];
    if (!bt_paths_self(self, sizeof self)) {
        fprintf(stderr, "baton chaos: cannot find this binary's path: %s\n", strerror(errno));
        return 2;
    }
    const char *env = getenv("BATON_CHAOS_DIR");
    if (env && *env) {
        if (snprintf(dir, sizeof dir, "%s", env) >= (int)sizeof dir) {
            fprintf(stderr, "baton chaos: BATON_CHAOS_DIR is too long\n");
            return 2;
        }
    } else if (!bt_paths_data_dir(self, "chaos", "tools/chaos", dir, sizeof dir)) {
        fprintf(stderr, "baton chaos: the chaos tool is not installed at %s (nor is this binary in a build "
                        "directory of the source tree); set BATON_CHAOS_DIR to the directory holding chaos.py\n",
                dir);
        return 2;
    }
    snprintf(tool, sizeof tool, "%s/chaos.py", dir);
    if (access(tool, R_OK) != 0) {
        fprintf(stderr, "baton chaos: cannot read %s (%s); set BATON_CHAOS_DIR to the directory holding chaos.py\n",
                tool, strerror(errno));
        return 2;
    }
    setenv("BATON_BIN", self, 0);
    char **args = calloc((size_t)argc + 2, sizeof *args);
    if (!args) return 2;
    args[0] = "python3";
    args[1] = tool;
    for (int i = 1; i < argc; i++) args[i + 1] = argv[i];
    execvp("python3", args);
    fprintf(stderr, "baton chaos: cannot run python3 (%s); the chaos tool needs Python 3.11 or newer\n",
            strerror(errno));
    free(args);
    return 127;
}

/* stdout writes through stdout_write, a glibc cookie stream (fopencookie) in place of the C
 * library's own: glibc keeps only that a write failed, and when it was not the last one (an output
 * past the buffer: `baton frontend --help` is over 8 KiB) its errno is gone by the final flush.
 * Here the first failure's errno is kept, and nothing is written after it: what the reader got is
 * a prefix of the output, never one with a hole or with a byte written after the fact. */
static int stdout_errno; /* of the first failed write to stdout, 0 while none failed */

static ssize_t stdout_write(void *cookie, const char *buf, size_t n) {
    (void)cookie;
    size_t done = 0;
    while (done < n && !stdout_errno) {
        ssize_t w = write(STDOUT_FILENO, buf + done, n - done);
        if (w > 0) done += (size_t)w;
        else if (w < 0 && errno != EINTR) stdout_errno = errno;
        else if (w == 0) stdout_errno = EIO;
    }
    return (ssize_t)done; /* short of n: glibc marks the stream in error */
}

/* Puts stdout_write under stdout (glibc lets a program assign stdout: its manual, "Standard
 * Streams"), buffered as glibc buffers stdout: by line on a terminal, by block otherwise. Nothing
 * has been written yet. Without memory for it, stdout stays glibc's and only the reason of a failed
 * write may be lost ("write error"). */
static void stdout_keep_errno(void) {
    FILE *f = fopencookie(NULL, "w", (cookie_io_functions_t){.write = stdout_write});
    if (!f) return;
    if (setvbuf(f, NULL, isatty(STDOUT_FILENO) ? _IOLBF : _IOFBF, BUFSIZ) != 0) {
        fclose(f);
        return;
    }
    stdout = f;
}

/* What a command printed on stdout reached it, or the exit status says it did not: an output that
 * could not be written (a full disk: `baton frontend --help > /dev/full`) is an error (exit 1 if
 * the command had succeeded), but a reader that went away (`baton --help | head -1`: EPIPE, SIGPIPE
 * being ignored) only stopped reading what it did not want: the command's own status stands. */
static int finish_stdout(int rc) {
    errno = 0;
    if (fflush(stdout) == 0 && !ferror(stdout)) return rc;
    int e = stdout_errno ? stdout_errno : errno;
    if (e == EPIPE) return rc;
    fprintf(stderr, "baton: cannot write to standard output: %s\n", e ? strerror(e) : "write error");
    return rc ? rc : 1;
}

static int dispatch(int argc, char **argv);

int main(int argc, char **argv) {
    stdout_keep_errno();
    return finish_stdout(dispatch(argc, argv));
}

static int dispatch(int argc, char **argv) {
    /* a peer that vanishes mid-write must be an error code, never a signal that kills the process */
    signal(SIGPIPE, SIG_IGN);
    /* a frontend holds one descriptor per client: use all the descriptors the system allows */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    /* children of `baton run` stop with it, even when it is killed with SIGKILL */
    const char *ppid = getenv("BATON_PARENT_PID");
    if (ppid) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (strtol(ppid, NULL, 10) != (long)getppid()) return 1; /* the parent is already gone */
        unsetenv("BATON_PARENT_PID");
        bt_proc_supervised = true; /* repeated stop signals are the launcher's to escalate (proc.h) */
        /* a launcher started under nohup: its children ignore the hang-up as it does (run.c) */
        if (getenv("BATON_SIGHUP_IGNORED")) signal(SIGHUP, SIG_IGN);
        unsetenv("BATON_SIGHUP_IGNORED");
        bt_log_env_reported();     /* `baton run` said what is wrong with DYN_LOG*: once for the group */
    }
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0) {
        /* it takes no argument: a stray one is refused as the commands refuse theirs */
        if (argc > 2) {
            fprintf(stderr, "baton %s: unknown argument '%s' (see --help)\n", argv[1], argv[2]);
            return 2;
        }
        printf("baton %s\n", BATON_VERSION); /* the project's version in CMakeLists.txt */
        return 0;
    }
    const char *cmd = argv[1];
    /* `baton help` prints the usage; `baton help <command>` that command's --help */
    if (strcmp(cmd, "help") == 0) {
        if (argc < 3) {
            usage(stdout);
            return 0;
        }
        static char help_flag[] = "--help";
        static char *sub[4];
        if (strcmp(argv[2], "run") == 0 || strcmp(argv[2], "frontend") == 0 || strcmp(argv[2], "worker") == 0 ||
            strcmp(argv[2], "chaos") == 0) {
            sub[0] = argv[0];
            sub[1] = argv[2];
            sub[2] = help_flag;
            argc = 3;
            argv = sub;
            cmd = argv[1];
        } else {
            fprintf(stderr, "baton help: unknown command '%s'\n", argv[2]);
            usage(stderr);
            return 2;
        }
    }
    if (strcmp(cmd, "chaos") == 0) return chaos_main(argc - 1, argv + 1);
    /* SIGUSR1/SIGUSR2 mean nothing to a server (bt_proc_signals_start logs and ignores them once
     * its loop runs): ignored from here on, a stray one during start-up (a model loading) cannot
     * kill it either */
    signal(SIGUSR1, SIG_IGN);
    signal(SIGUSR2, SIG_IGN);
    if (strcmp(cmd, "run") == 0) return bt_run_main(argc - 1, argv + 1);
    if (strcmp(cmd, "frontend") == 0) return bt_frontend_main(argc - 1, argv + 1);
    if (strcmp(cmd, "worker") == 0) return bt_worker_main(argc - 1, argv + 1);
    fprintf(stderr, "baton: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
