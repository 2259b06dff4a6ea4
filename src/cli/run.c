/* run.c — `baton run`: a frontend and N mocker workers on one machine.
 *
 * The children are this same binary (`baton frontend`, `baton worker`) started with uv_spawn over
 * file discovery in a private temporary directory. A worker that exits while the group is
 * running is restarted after a short delay, with a log line, so a laptop demo heals itself. On
 * SIGINT/SIGTERM every child gets SIGTERM (workers drain), the group waits for them, removes the
 * directory and exits 0; a second signal sends SIGKILL. */
#include "cli/run.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "common/log.h"
#include "common/opts.h"
#include "common/util.h"

#define MAX_WORKERS 64
#define MAX_ARGS 160

typedef struct run_ctx run_ctx;

typedef struct {
    run_ctx *ctx;
    uv_process_t proc;
    uv_timer_t restart;
    bool running;
    bool is_frontend;
    int index;
    int restarts;
} child;

struct run_ctx {
    uv_loop_t *loop;
    char exe[PATH_MAX];
    char dir[PATH_MAX];
    int64_t http_port, workers;
    const char *model, *http_host;
    double speedup;
    int64_t migration_limit;
    const char *event_plane, *nats_server; /* NULL: not given (nor in the environment) */
    const char *ns;      /* --namespace, NULL if not given */
    bool endpoint_given; /* --endpoint was given for the workers */
    const char *fe_args[MAX_ARGS];
    int n_fe_args;
    const char *w_args[MAX_ARGS];
    int n_w_args;
    child frontend;
    child w[MAX_WORKERS];
    bool stopping;
    int signals;
    uv_signal_t sig_int, sig_term;
    char **env; /* this process's environment plus BATON_PARENT_PID */
};

/* Flags `baton run` forwards to the frontend only; --rpc-secret-file goes to the frontend and to
 * every worker, and --namespace to the frontend and, as the namespace of --endpoint, to the
 * workers; everything else unknown goes to the workers. */
static const char *frontend_flags[] = {"--router-mode", "--active-decode-blocks-threshold",
                                       "--active-prefill-tokens-threshold", "--stream-stall-timeout", "--api-key",
                                       "--max-body-bytes", "--shutdown-drain-timeout", "--shutdown-accept-window-ms",
                                       "--http-header-timeout-ms", "--http-idle-timeout-ms", "--max-connections",
                                       "--max-client-backlog-bytes", "--max-concurrent-requests", "--threads",
                                       NULL};
static const char *shared_flags[] = {"--rpc-secret-file", NULL};

static bool flag_in(const char *a, const char **list) {
    for (int i = 0; list[i]; i++) {
        size_t n = strlen(list[i]);
        if (strncmp(a, list[i], n) == 0 && (a[n] == '\0' || a[n] == '=')) return true;
    }
    return false;
}

static void start_child(child *c);

static void on_restart_timer(uv_timer_t *t) {
    child *c = t->data;
    if (!c->ctx->stopping) start_child(c);
}

static size_t running_children(run_ctx *r) {
    size_t n = r->frontend.running;
    for (int i = 0; i < r->workers; i++) n += r->w[i].running;
    return n;
}

static void remove_dir(const char *dir) {
    uv_fs_t req;
    uv_dirent_t ent;
    if (uv_fs_scandir(NULL, &req, dir, 0, NULL) >= 0) {
        while (uv_fs_scandir_next(&req, &ent) != UV_EOF) {
            char p[PATH_MAX + 256];
            snprintf(p, sizeof p, "%s/%s", dir, ent.name);
            unlink(p);
        }
    }
    uv_fs_req_cleanup(&req);
    rmdir(dir);
}

static void walk_close(uv_handle_t *h, void *arg) {
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

static void on_exit_cb(uv_process_t *p, int64_t status, int sig) {
    child *c = p->data;
    run_ctx *r = c->ctx;
    c->running = false;
    uv_close((uv_handle_t *)p, NULL);
    const char *what = c->is_frontend ? "frontend" : "worker";
    if (r->stopping) {
        BT_INFO("%s %d exited (status %lld%s%s)", what, c->index, (long long)status, sig ? ", signal " : "",
                sig ? strsignal(sig) : "");
        if (running_children(r) == 0) {
            remove_dir(r->dir);
            BT_INFO("all processes stopped");
            uv_walk(r->loop, walk_close, NULL);
        }
        return;
    }
    BT_WARN("%s %d exited unexpectedly (status %lld%s%s); restarting it in 1 s", what, c->index, (long long)status,
            sig ? ", signal " : "", sig ? strsignal(sig) : "");
    c->restarts++;
    uv_timer_start(&c->restart, on_restart_timer, 1000, 0);
}

/* The event plane is the whole group's: the frontend subscribes to what the workers publish, so
 * both get the same flags. (NATS credentials, NATS_AUTH_*, reach them through the environment.) */
static int event_plane_args(const run_ctx *r, const char **args, int n) {
    if (r->event_plane) {
        args[n++] = "--event-plane";
        args[n++] = r->event_plane;
    }
    if (r->nats_server) {
        args[n++] = "--nats-server";
        args[n++] = r->nats_server;
    }
    return n;
}

static void start_child(child *c) {
    run_ctx *r = c->ctx;
    const char *args[MAX_ARGS * 2];
    int n = 0;
    char port[32], wport[32], speed[64], mig[32];
    args[n++] = r->exe;
    if (c->is_frontend) {
        snprintf(port, sizeof port, "%lld", (long long)r->http_port);
        snprintf(mig, sizeof mig, "%lld", (long long)r->migration_limit);
        args[n++] = "frontend";
        args[n++] = "--http-port";
        args[n++] = port;
        args[n++] = "--http-host";
        args[n++] = r->http_host;
        args[n++] = "--discovery"; /* explicit: DYN_DISCOVERY_BACKEND in the environment must not win */
        args[n++] = "file";
        args[n++] = "--discovery-dir";
        args[n++] = r->dir;
        args[n++] = "--migration-limit";
        args[n++] = mig;
        /* no load balancer in front of a one-machine group: Ctrl-C need not wait for one */
        args[n++] = "--shutdown-accept-window-ms";
        args[n++] = "0";
        n = event_plane_args(r, args, n);
        for (int i = 0; i < r->n_fe_args; i++) args[n++] = r->fe_args[i];
    } else {
        snprintf(speed, sizeof speed, "%g", r->speedup);
        snprintf(wport, sizeof wport, "0");
        args[n++] = "worker";
        args[n++] = "--discovery";
        args[n++] = "file";
        args[n++] = "--discovery-dir";
        args[n++] = r->dir;
        args[n++] = "--model-name";
        args[n++] = r->model;
        args[n++] = "--speedup-ratio";
        args[n++] = speed;
        args[n++] = "--system-port";
        args[n++] = wport;
        n = event_plane_args(r, args, n);
        for (int i = 0; i < r->n_w_args; i++) args[n++] = r->w_args[i];
    }
    args[n] = NULL;
    uv_stdio_container_t stdio[3] = {{.flags = UV_IGNORE}, {.flags = UV_INHERIT_FD, .data.fd = 1},
                                     {.flags = UV_INHERIT_FD, .data.fd = 2}};
    uv_process_options_t po = {0};
    po.file = r->exe;
    po.args = (char **)args;
    po.exit_cb = on_exit_cb;
    po.stdio = stdio;
    po.stdio_count = 3;
    po.env = r->env;
    c->proc.data = c;
    int rc = uv_spawn(r->loop, &c->proc, &po);
    if (rc < 0) {
        BT_ERROR("cannot start %s: %s", c->is_frontend ? "frontend" : "worker", uv_strerror(rc));
        uv_timer_start(&c->restart, on_restart_timer, 2000, 0);
        return;
    }
    c->running = true;
    BT_INFO("started %s %d (pid %d)", c->is_frontend ? "frontend" : "worker", c->index, c->proc.pid);
}

static void on_signal(uv_signal_t *h, int signum) {
    run_ctx *r = h->data;
    r->signals++;
    int sig = r->signals > 1 ? SIGKILL : SIGTERM;
    if (r->signals == 1)
        BT_INFO("%s received: stopping the frontend and %lld workers (again to force)",
                signum == SIGINT ? "SIGINT" : "SIGTERM", (long long)r->workers);
    r->stopping = true;
    if (r->frontend.running) uv_process_kill(&r->frontend.proc, sig);
    for (int i = 0; i < r->workers; i++) {
        uv_timer_stop(&r->w[i].restart);
        if (r->w[i].running) uv_process_kill(&r->w[i].proc, sig);
    }
    uv_timer_stop(&r->frontend.restart);
    if (running_children(r) == 0) {
        remove_dir(r->dir);
        uv_walk(r->loop, walk_close, NULL);
    }
}

int bt_run_main(int argc, char **argv) {
    bt_log_init("run");
    static run_ctx r;
    r.http_port = 8000;
    r.workers = 2;
    r.model = "mock-model";
    r.http_host = "0.0.0.0";
    r.speedup = 1.0;
    r.migration_limit = 3;
    const bt_opt opts[] = {
        {"--http-port", "DYN_HTTP_PORT", BT_OPT_INT, &r.http_port, 0, 65535, "frontend HTTP port"},
        {"--http-host", "DYN_HTTP_HOST", BT_OPT_STR, &r.http_host, 0, 0, "frontend HTTP address"},
        {"--workers", NULL, BT_OPT_INT, &r.workers, 1, MAX_WORKERS, "number of mocker workers"},
        {"--model-name", "DYN_MODEL_NAME", BT_OPT_STR, &r.model, 0, 0, "model name"},
        {"--migration-limit", "DYN_MIGRATION_LIMIT", BT_OPT_INT, &r.migration_limit, 0, 1000, "migration attempts"},
        {"--speedup-ratio", "DYN_SPEEDUP_RATIO", BT_OPT_DOUBLE, &r.speedup, 1e-6, 1e9, "mocker time scale"},
        {"--event-plane", "DYN_EVENT_PLANE", BT_OPT_STR, &r.event_plane, 0, 0,
         "direct or nats, for the frontend and every worker"},
        {"--nats-server", "NATS_SERVER", BT_OPT_STR, &r.nats_server, 0, 0,
         "nats://host:port[,nats://...], for the frontend and every worker"},
    };
    int nopts = (int)(sizeof opts / sizeof opts[0]);
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            bt_opts_usage("run", opts, nopts);
            printf("\nany other frontend or worker flag is passed on to those processes\n");
            return 0;
        }
    const char *rest[MAX_ARGS];
    int nrest = 0;
    char err[256];
    if (!bt_opts_parse(opts, nopts, argc, argv, 1, rest, MAX_ARGS, &nrest, err, sizeof err)) {
        fprintf(stderr, "baton run: %s\n", err);
        return 2;
    }
    if (r.event_plane && strcmp(r.event_plane, "direct") != 0 && strcmp(r.event_plane, "nats") != 0) {
        fprintf(stderr, "baton run: unknown event plane '%s' (direct or nats)\n", r.event_plane);
        return 2;
    }
    for (int i = 0; i < nrest; i++) {
        /* One machine, one private directory: the group's discovery is not the user's to choose. */
        if (strncmp(rest[i], "--discovery", 11) == 0 || strncmp(rest[i], "--etcd-", 7) == 0) {
            fprintf(stderr, "baton run: %s is not supported: `baton run` always uses file discovery in a private "
                            "directory; for etcd, start `baton frontend` and `baton worker` with --discovery etcd "
                            "(docs/operations.md)\n", rest[i]);
            return 2;
        }
        const char *flag = rest[i], *value = NULL;
        if (!strchr(flag, '=') && i + 1 < nrest && strncmp(rest[i + 1], "--", 2) != 0) value = rest[++i];
        if (r.n_fe_args + 2 > MAX_ARGS || r.n_w_args + 2 > MAX_ARGS) {
            fprintf(stderr, "baton run: too many flags\n");
            return 2;
        }
        if (flag_in(flag, (const char *[]){"--namespace", NULL})) {
            const char *ns = value ? value : strchr(flag, '=') ? strchr(flag, '=') + 1 : "";
            r.fe_args[r.n_fe_args++] = "--namespace";
            r.fe_args[r.n_fe_args++] = ns;
            r.ns = ns;
            continue;
        }
        bool to_fe = flag_in(flag, frontend_flags) || flag_in(flag, shared_flags);
        bool to_w = !flag_in(flag, frontend_flags);
        if (to_w && flag_in(flag, (const char *[]){"--endpoint", NULL})) r.endpoint_given = true;
        if (to_fe) {
            r.fe_args[r.n_fe_args++] = flag;
            if (value) r.fe_args[r.n_fe_args++] = value;
        }
        if (to_w) {
            r.w_args[r.n_w_args++] = flag;
            if (value) r.w_args[r.n_w_args++] = value;
        }
    }
    const char *env_ns = getenv("DYN_NAMESPACE"), *env_ep = getenv("DYN_ENDPOINT");
    if (!r.ns && env_ns && *env_ns && !(env_ep && *env_ep)) r.ns = env_ns;
    if (r.ns && !r.endpoint_given) { /* the workers serve in the frontend's namespace */
        static char ep[300];
        snprintf(ep, sizeof ep, "dyn://%s.backend.generate", r.ns);
        r.w_args[r.n_w_args++] = "--endpoint";
        r.w_args[r.n_w_args++] = ep;
    }
    size_t len = sizeof r.exe;
    if (uv_exepath(r.exe, &len) != 0) {
        fprintf(stderr, "baton run: cannot find its own executable\n");
        return 1;
    }
    const char *tmp = getenv("TMPDIR");
    snprintf(r.dir, sizeof r.dir, "%s/baton-run-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(r.dir)) {
        fprintf(stderr, "baton run: cannot create a discovery directory under %s\n", tmp ? tmp : "/tmp");
        return 1;
    }
    extern char **environ;
    size_t nenv = 0;
    while (environ[nenv]) nenv++;
    r.env = calloc(nenv + 2, sizeof *r.env);
    static char parent[48];
    snprintf(parent, sizeof parent, "BATON_PARENT_PID=%d", (int)getpid());
    if (!r.env) return 1;
    for (size_t i = 0; i < nenv; i++) r.env[i] = environ[i];
    r.env[nenv] = parent;
    uv_loop_t loop;
    uv_loop_init(&loop);
    r.loop = &loop;
    uv_signal_init(&loop, &r.sig_int);
    uv_signal_init(&loop, &r.sig_term);
    r.sig_int.data = r.sig_term.data = &r;
    uv_signal_start(&r.sig_int, on_signal, SIGINT);
    uv_signal_start(&r.sig_term, on_signal, SIGTERM);
    child *all[MAX_WORKERS + 1];
    all[0] = &r.frontend;
    r.frontend.is_frontend = true;
    for (int i = 0; i < r.workers; i++) {
        r.w[i].index = i;
        all[i + 1] = &r.w[i];
    }
    for (int i = 0; i <= r.workers; i++) {
        all[i]->ctx = &r;
        uv_timer_init(&loop, &all[i]->restart);
        all[i]->restart.data = all[i];
    }
    for (int i = 1; i <= r.workers; i++) start_child(all[i]);
    start_child(&r.frontend);
    const char *shown = strcmp(r.http_host, "0.0.0.0") == 0 ? "localhost" : r.http_host;
    printf("baton: serving '%s' with %lld workers at http://%s:%lld/v1 (discovery in %s); Ctrl-C stops\n"
           "try:   curl -N http://%s:%lld/v1/chat/completions -H 'Content-Type: application/json' "
           "-d '{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],\"stream\":true,"
           "\"max_tokens\":20}'\n",
           r.model, (long long)r.workers, shown, (long long)r.http_port, r.dir, shown, (long long)r.http_port,
           r.model);
    fflush(stdout);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    free(r.env);
    return 0;
}
