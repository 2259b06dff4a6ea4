/* run.c — `baton run`: a frontend and N workers (the mocker unless --engine says otherwise) on one machine.
 *
 * The children are this same binary (`baton frontend`, `baton worker`) started with uv_spawn over
 * file discovery in a private temporary directory. Everything they listen on is bound to the
 * launcher's --http-host (the workers' status servers included).
 *
 * The workers start only once the frontend answers on its port (any HTTP answer to GET /health):
 * their status servers bind any free port, which could otherwise be the very port the user chose
 * for the frontend if the frontend had not bound it yet (the frontend would then exit with the
 * port taken). Start-up is watched, not assumed: the launcher polls the frontend's GET /health and watches the
 * discovery directory, and prints "serving ..." only once the frontend answers and lists every
 * worker (known by the pid in its discovery record) among the instances it routes to. (A /health
 * that lists none of them is not taken for the frontend's: another program may hold the port.) A child
 * that exits before that, or any child that exits with status 2 (a configuration error: the same
 * flags would fail again), stops the whole group with a non-zero exit status instead of being
 * restarted: a port that is taken is an error, not a loop.
 *
 * Once serving, a child that exits is restarted, with a log line, so a laptop demo heals itself.
 * A restarted child that exits again before it is ready counts as a failed start; the delay
 * doubles with each (1 s, 2 s, 4 s, ...) and after RUN_MAX_START_FAILURES in a row the group
 * gives up and exits 1. A child that became ready again starts the count afresh.
 *
 * On SIGINT/SIGTERM/SIGHUP (a closed terminal) every child gets SIGTERM (workers drain), the
 * group waits for them, removes the directory and exits 0; a second signal sends SIGKILL, which
 * cuts what still ran, and the group exits 128 + that signal's number (130 for Ctrl-C). A
 * launcher started with SIGHUP ignored (nohup) has its children ignore it too. */
#include "cli/run.h"

#include <curl/curl.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "common/curl_uv.h"
#include "common/log.h"
#include "common/opts.h"
#include "common/util.h"
#include "common/proc.h"
#include "discovery/discovery.h"
#include "frontend/frontend.h"
#include "worker/worker.h"

#define MAX_WORKERS 64
#define MAX_ARGS 160
#define RUN_PROBE_MS 200             /* GET /health while a child is not ready yet */
#define RUN_BIND_PROBE_MS 10         /* GET /health until the frontend answers on its port at all */
#define RUN_PROBE_TIMEOUT_MS 2000L   /* one probe */
#define RUN_PROBE_MAX_BYTES (1 << 20) /* a /health body larger than this is not our frontend's */
#define RUN_WAIT_REPORT_MS 10000     /* how often a slow start-up says what it is waiting for */
#define RUN_MAX_START_FAILURES 4     /* restarts in a row that die before ready: give up */
#define RUN_MAX_RESTART_DELAY_MS 8000
#define RUN_KILL_AFTER_MS 5000       /* after a failed start-up, SIGKILL what SIGTERM did not stop */

typedef struct run_ctx run_ctx;

typedef struct {
    run_ctx *ctx;
    uv_process_t proc;
    uv_timer_t restart;
    bool running;
    bool is_frontend;
    bool ready;            /* since its last start: the frontend answers /health; a worker is routable */
    int index;
    int pid;               /* of the running process, 0 when none */
    uint64_t instance_id;  /* a worker's id in discovery (matched by pid), 0 until seen */
    int start_failures;    /* starts in a row that ended before the child was ready */
} child;

struct run_ctx {
    uv_loop_t *loop;
    char exe[PATH_MAX];
    char dir[PATH_MAX];
    int64_t http_port, workers;
    const char *model, *http_host; /* model: NULL unless given (the workers' default applies) */
    char served[256];              /* the model name the first worker registered, for "serving" */
    double speedup;
    bool speedup_given; /* --speedup-ratio / DYN_SPEEDUP_RATIO: passed on; else the workers' default */
    int64_t migration_limit;
    int64_t llama_threads; /* each worker's llama decode threads (0: another engine), from check_child_args */
    const char *event_plane, *nats_server; /* NULL: not given (nor in the environment) */
    const char *fe_args[MAX_ARGS];
    int n_fe_args;
    const char *w_args[MAX_ARGS];
    int n_w_args;
    child frontend;
    child w[MAX_WORKERS];
    bool stopping;
    bool serving; /* the group has been ready once ("serving" printed) */
    bool workers_started; /* the frontend has answered on its port once: the workers may bind theirs */
    int exit_code;
    int signals;
    uint64_t started_ms, last_report_ms;
    char shown[300];     /* http://host:port as printed to the user */
    char probe_url[320]; /* the frontend's /health, over loopback when it listens on every address */
    bt_proc_signals sigs;
    uv_timer_t probe_timer, kill_timer;
    bt_curl_uv *cu;
    CURL *probe; /* the GET /health in flight, or NULL */
    bt_buf probe_rx;
    bt_discovery *disc; /* the launcher's own view of the directory: worker pid -> instance id */
    char **env;         /* this process's environment plus BATON_PARENT_PID */
};

/* Flags `baton run` forwards to the frontend only; the shared ones go to the frontend and to
 * every worker; everything else unknown goes to the workers. */
static const char *frontend_flags[] = {"--router-mode", "--active-decode-blocks-threshold",
                                       "--active-prefill-tokens-threshold", "--stream-stall-timeout",
                                       "--stream-token-timeout", "--api-key", "--admin-api-key", "--api-key-file",
                                       "--admin-api-key-file", "--metrics-api-key-required", "--allowed-origins", "--tenant-label-secret-file",
                                       "--max-body-bytes", "--max-body-bytes-total", "--shutdown-drain-timeout",
                                       "--shutdown-accept-window-ms", "--max-output-bytes-total",
                                       "--http-header-timeout-ms", "--http-idle-timeout-ms", "--max-connections",
                                       "--max-client-backlog-bytes", "--max-concurrent-requests", "--threads",
                                       "--stream-retention", "--stream-retention-bytes", "--priority-ceiling",
                                       "--priority-ceiling-file", "--trust-tenant-header", "--queue-max-requests", "--queue-max-tokens",
                                       "--queue-timeout", "--outlier-factor", "--outlier-window",
                                       "--outlier-min-samples", "--outlier-backoff", "--outlier-max-ejected",
                                       "--retry-budget", "--retry-budget-min", "--migration-concurrency", "--access-log", NULL};
/* the NATS TLS settings go with the event plane (event_plane_args): the whole group's */
static const char *shared_flags[] = {
    "--rpc-secret-file", "--namespace", "--nats-tls-ca", "--nats-tls-cert", "--nats-tls-key", "--allowed-hosts", NULL};

static bool flag_in(const char *a, const char **list) {
    for (int i = 0; list[i]; i++) {
        size_t n = strlen(list[i]);
        if (strncmp(a, list[i], n) == 0 && (a[n] == '\0' || a[n] == '=')) return true;
    }
    return false;
}

static const char *child_name(const child *c) { return c->is_frontend ? "frontend" : "worker"; }

static void start_child(child *c);
static void probe_arm(run_ctx *r);
static void start_workers(run_ctx *r);

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

static void on_disc_closed(void *ud) {
    run_ctx *r = ud;
    remove_dir(r->dir);
    uv_walk(r->loop, walk_close, NULL);
}

/* Every child has exited: close what the launcher holds (discovery last: its close completes on
 * a later turn, and the directory goes only then), and let the loop end. */
static void finish(run_ctx *r) {
    BT_INFO("all processes stopped");
    uv_timer_stop(&r->probe_timer);
    uv_timer_stop(&r->kill_timer);
    if (r->probe) {
        bt_curl_uv_remove(r->cu, r->probe);
        curl_easy_cleanup(r->probe);
        r->probe = NULL;
    }
    bt_curl_uv_close(r->cu, NULL, NULL);
    r->cu = NULL;
    bt_buf_free(&r->probe_rx);
    bt_discovery *d = r->disc;
    r->disc = NULL;
    if (d) bt_discovery_close(d, on_disc_closed, r);
    else on_disc_closed(r);
}

/* Sends `sig` to every running child and stops every pending restart. */
static void signal_children(run_ctx *r, int sig) {
    r->stopping = true;
    uv_timer_stop(&r->frontend.restart);
    if (r->frontend.running) uv_process_kill(&r->frontend.proc, sig);
    for (int i = 0; i < r->workers; i++) {
        uv_timer_stop(&r->w[i].restart);
        if (r->w[i].running) uv_process_kill(&r->w[i].proc, sig);
    }
}

static void on_kill_timer(uv_timer_t *t) {
    run_ctx *r = t->data;
    BT_WARN("children still running %d s after SIGTERM; sending SIGKILL", RUN_KILL_AFTER_MS / 1000);
    signal_children(r, SIGKILL);
}

/* The group cannot serve: say why, stop every child and exit with `code` once they are gone. */
static void fail_group(run_ctx *r, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail_group(run_ctx *r, int code, const char *fmt, ...) {
    if (r->stopping) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    BT_ERROR("%s; stopping", msg);
    r->exit_code = code;
    signal_children(r, SIGTERM);
    if (running_children(r) == 0) finish(r);
    else uv_timer_start(&r->kill_timer, on_kill_timer, RUN_KILL_AFTER_MS, 0);
}

static void describe_exit(char *out, size_t n, int64_t status, int sig) {
    if (sig) snprintf(out, n, "signal %s", strsignal(sig));
    else snprintf(out, n, "status %lld", (long long)status);
}

static void on_exit_cb(uv_process_t *p, int64_t status, int sig) {
    child *c = p->data;
    run_ctx *r = c->ctx;
    bool was_ready = c->ready;
    c->running = false;
    c->ready = false;
    c->pid = 0;
    c->instance_id = 0;
    uv_close((uv_handle_t *)p, NULL);
    const char *what = child_name(c);
    char how[96];
    describe_exit(how, sizeof how, status, sig);
    if (r->stopping) {
        BT_INFO("%s %d exited (%s)", what, c->index, how);
        if (running_children(r) == 0) finish(r);
        return;
    }
    if (!sig && status == 2) {
        fail_group(r, 2, "%s %d exited with status 2: a configuration error (its message is above), which a restart "
                         "would repeat", what, c->index);
        return;
    }
    if (!r->serving) {
        fail_group(r, 1, "%s %d exited during start-up (%s; its error is above): nothing is serving at %s", what,
                   c->index, how, r->shown);
        return;
    }
    if (!was_ready && ++c->start_failures >= RUN_MAX_START_FAILURES) {
        fail_group(r, 1, "%s %d exited before it was ready %d times in a row (last: %s); giving up", what, c->index,
                   c->start_failures, how);
        return;
    }
    uint64_t delay = (uint64_t)1000 << c->start_failures;
    if (delay > RUN_MAX_RESTART_DELAY_MS) delay = RUN_MAX_RESTART_DELAY_MS;
    BT_WARN("%s %d exited unexpectedly (%s); restarting it in %llu s", what, c->index, how,
            (unsigned long long)(delay / 1000));
    uv_timer_start(&c->restart, on_restart_timer, delay, 0);
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

/* Bounded text for the values child_args() puts in a child's arguments. */
typedef struct {
    char port[32], speed[64], mig[32];
} child_argbuf;

/* The arguments of the frontend (frontend) or of a worker, from args[0] = the executable on;
 * returns their count (no NULL added). The strings live in r and in *b. */
static int child_args(const run_ctx *r, bool frontend, const char **args, child_argbuf *b) {
    int n = 0;
    args[n++] = r->exe;
    if (frontend) {
        snprintf(b->port, sizeof b->port, "%lld", (long long)r->http_port);
        snprintf(b->mig, sizeof b->mig, "%lld", (long long)r->migration_limit);
        args[n++] = "frontend";
        args[n++] = "--http-port";
        args[n++] = b->port;
        args[n++] = "--http-host";
        args[n++] = r->http_host;
        args[n++] = "--discovery"; /* explicit: DYN_DISCOVERY_BACKEND in the environment must not win */
        args[n++] = "file";
        args[n++] = "--discovery-dir";
        args[n++] = r->dir;
        args[n++] = "--migration-limit";
        args[n++] = b->mig;
        /* no load balancer in front of a one-machine group: Ctrl-C need not wait for one */
        args[n++] = "--shutdown-accept-window-ms";
        args[n++] = "0";
        n = event_plane_args(r, args, n);
        for (int i = 0; i < r->n_fe_args; i++) args[n++] = r->fe_args[i];
    } else {
        args[n++] = "worker";
        args[n++] = "--discovery";
        args[n++] = "file";
        args[n++] = "--discovery-dir";
        args[n++] = r->dir;
        /* without one the worker's own default applies: mock-model, or a llama model's file name */
        if (r->model) {
            args[n++] = "--model-name";
            args[n++] = r->model;
        }
        if (r->speedup_given) {
            snprintf(b->speed, sizeof b->speed, "%.17g", r->speedup);
            args[n++] = "--speedup-ratio";
            args[n++] = b->speed;
        }
        args[n++] = "--system-port";
        args[n++] = "0";
        /* the launcher's address is the group's: a status server must not listen wider than the
         * frontend. DYN_SYSTEM_HOST or a forwarded --system-host (later, so it wins) overrides. */
        const char *sh = getenv("DYN_SYSTEM_HOST");
        if (!sh || !*sh) {
            args[n++] = "--system-host";
            args[n++] = r->http_host;
        }
        n = event_plane_args(r, args, n);
        for (int i = 0; i < r->n_w_args; i++) args[n++] = r->w_args[i];
    }
    return n;
}

/* Runs the frontend's and a worker's argument checks in this process (bt_proc_check_for) over
 * the arguments start_child() will give them; false once one refused them (it said why). */
static bool check_child_args(run_ctx *r) {
    const char *args[MAX_ARGS * 2];
    child_argbuf b;
    bt_proc_check_for = "run";
    int n = child_args(r, true, args, &b);
    args[n] = NULL;
    int rc = bt_frontend_main(n - 1, (char **)args + 1);
    if (rc == 0) {
        n = child_args(r, false, args, &b);
        args[n] = NULL;
        bt_worker_checked_llama_threads = 0;
        rc = bt_worker_main(n - 1, (char **)args + 1);
        r->llama_threads = bt_worker_checked_llama_threads;
    }
    bt_proc_check_for = NULL;
    bt_log_init("run");
    return rc == 0;
}

/* llama.cpp's decode threads wait for each other spinning after every matrix product, so the
 * threads of all the workers together beyond the CPUs they share stall every step of every
 * worker (seconds a step measured on 2 CPUs, docs/engines.md §3.2). Each worker warns only about
 * its own threads: the group's total is said here, with a split that fits. */
static void warn_llama_cpus(const run_ctx *r) {
    long ncpu = bt_cpus_usable();
    int64_t total = r->workers * r->llama_threads;
    if (total <= ncpu) return;
    int64_t w = r->workers <= ncpu ? r->workers : ncpu, t = ncpu / w;
    BT_WARN("%lld llama worker%s x %lld --llama-threads = %lld decode threads for the %ld CPU%s this process may "
            "use: llama.cpp's threads wait for each other spinning, and each step can take seconds; keep --workers x "
            "--llama-threads at most %ld (e.g. --workers %lld --llama-threads %lld)",
            (long long)r->workers, r->workers == 1 ? "" : "s", (long long)r->llama_threads, (long long)total, ncpu,
            ncpu == 1 ? "" : "s", ncpu, (long long)w, (long long)t);
}

static void start_child(child *c) {
    run_ctx *r = c->ctx;
    const char *args[MAX_ARGS * 2];
    child_argbuf b;
    int n = child_args(r, c->is_frontend, args, &b);
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
    c->ready = false;
    c->instance_id = 0;
    int rc = uv_spawn(r->loop, &c->proc, &po);
    if (rc < 0) {
        uv_close((uv_handle_t *)&c->proc, NULL); /* initialized even when the spawn failed */
        if (!r->serving) {
            fail_group(r, 1, "cannot start %s %d: %s", child_name(c), c->index, uv_strerror(rc));
            return;
        }
        if (++c->start_failures >= RUN_MAX_START_FAILURES) {
            fail_group(r, 1, "cannot start %s %d (%d times in a row): %s", child_name(c), c->index, c->start_failures,
                       uv_strerror(rc));
            return;
        }
        BT_ERROR("cannot start %s %d: %s; trying again in 2 s", child_name(c), c->index, uv_strerror(rc));
        uv_timer_start(&c->restart, on_restart_timer, 2000, 0);
        return;
    }
    c->running = true;
    c->pid = c->proc.pid;
    BT_INFO("started %s %d (pid %d)", child_name(c), c->index, c->proc.pid);
    probe_arm(r);
}

/* ---- readiness: the frontend's GET /health and the workers' discovery records ---- */

static bool all_ready(const run_ctx *r) {
    if (!r->frontend.running || !r->frontend.ready) return false;
    for (int i = 0; i < r->workers; i++)
        if (!r->w[i].running || !r->w[i].ready) return false;
    return true;
}

static int routable_workers(const run_ctx *r) {
    int n = 0;
    for (int i = 0; i < r->workers; i++) n += r->w[i].running && r->w[i].ready;
    return n;
}

static void print_serving(run_ctx *r) {
    const char *model = r->served[0] ? r->served : r->model ? r->model : "mock-model";
    printf("baton: serving '%s' with %lld worker%s at %s/v1 (discovery in %s); Ctrl-C stops\n"
           "try:   curl -N %s/v1/chat/completions -H 'Content-Type: application/json' "
           "-d '{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],\"stream\":true,"
           "\"max_tokens\":20}'\n",
           model, (long long)r->workers, r->workers == 1 ? "" : "s", r->shown, r->dir, r->shown, model);
    fflush(stdout);
}

static void mark_ready(child *c) {
    run_ctx *r = c->ctx;
    if (c->ready) return;
    c->ready = true;
    c->start_failures = 0;
    if (r->serving) BT_INFO("%s %d (pid %d) is %s again", child_name(c), c->index, c->pid,
                            c->is_frontend ? "serving" : "routable");
}

/* A /health body from the frontend: who it routes to now. */
static void probe_result(run_ctx *r, const char *body, size_t len) {
    json_t *j = json_loadb(body, len, 0, NULL);
    json_t *insts = json_object_get(j, "instances");
    if (!json_is_array(insts)) goto out;
    size_t i;
    json_t *inst;
    int ours = 0;
    json_array_foreach(insts, i, inst) {
        json_t *id = json_object_get(inst, "instance_id");
        if (!json_is_integer(id)) continue;
        for (int k = 0; k < r->workers; k++) {
            child *c = &r->w[k];
            if (c->running && c->instance_id && c->instance_id == (uint64_t)json_integer_value(id)) {
                mark_ready(c);
                ours++;
            }
        }
    }
    /* Whoever answers on the port is our frontend only if it routes to one of our workers (their
     * ids are random 63-bit numbers): another program that took the port may answer /health too. */
    if (ours > 0 && r->frontend.running) mark_ready(&r->frontend);
    if (all_ready(r)) {
        uv_timer_stop(&r->probe_timer);
        if (!r->serving) {
            r->serving = true;
            print_serving(r);
        }
    }
out:
    json_decref(j);
}

static size_t on_probe_write(char *p, size_t size, size_t nmemb, void *ud) {
    run_ctx *r = ud;
    size_t n = size * nmemb;
    return bt_buf_append(&r->probe_rx, p, n) == BT_OK ? n : 0; /* 0: libcurl aborts the transfer */
}

static bool on_probe_done(void *ud, CURL *easy, CURLcode result) {
    run_ctx *r = ud;
    long code = 0;
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &code);
    bt_curl_uv_remove(r->cu, easy);
    curl_easy_cleanup(easy);
    if (easy == r->probe) r->probe = NULL;
    if (result == CURLE_OK && !r->stopping && !r->workers_started) start_workers(r);
    if (result == CURLE_OK && code == 200 && !r->stopping) probe_result(r, r->probe_rx.data, r->probe_rx.len);
    bt_buf_reset(&r->probe_rx);
    return true;
}

static const bt_curl_uv_hooks probe_hooks = {NULL, on_probe_done, NULL};

static void on_probe_timer(uv_timer_t *t) {
    run_ctx *r = t->data;
    if (r->stopping) return;
    uint64_t now = bt_now_ms();
    if (!r->serving && now - r->last_report_ms >= RUN_WAIT_REPORT_MS) {
        r->last_report_ms = now;
        BT_INFO("still starting after %llu s: frontend %s, %d of %lld worker%s routable",
                (unsigned long long)((now - r->started_ms) / 1000), r->frontend.ready ? "ready" : "not ready yet",
                routable_workers(r), (long long)r->workers, r->workers == 1 ? "" : "s");
    }
    if (r->probe || !r->frontend.running) return;
    CURL *c = curl_easy_init();
    if (!c) return;
    curl_easy_setopt(c, CURLOPT_URL, r->probe_url);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_probe_write);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_PROXY, ""); /* our own child, whatever *_proxy says */
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, RUN_PROBE_TIMEOUT_MS);
    if (bt_curl_uv_add(r->cu, c) != BT_OK) {
        curl_easy_cleanup(c);
        return;
    }
    r->probe = c;
}

/* Polls /health until every child is ready; called whenever a child (re)starts. Often at first,
 * until the frontend answers on its port and the workers start (start_workers). */
static void probe_arm(run_ctx *r) {
    uint64_t ms = r->workers_started ? RUN_PROBE_MS : RUN_BIND_PROBE_MS;
    if (!r->stopping && !uv_is_active((uv_handle_t *)&r->probe_timer))
        uv_timer_start(&r->probe_timer, on_probe_timer, ms, ms);
}

/* The frontend answered on its port: it holds it, so the workers' status servers, which bind any
 * free port, can no longer take it. Starts them, and the probe goes back to its usual pace. */
static void start_workers(run_ctx *r) {
    r->workers_started = true;
    uv_timer_stop(&r->probe_timer);
    for (int i = 0; i < r->workers && !r->stopping; i++) start_child(&r->w[i]);
    probe_arm(r);
}

/* A worker's discovery record carries its pid: that is how the launcher tells which instance in
 * the frontend's /health is which of its children. */
static void on_disc_put(void *ud, const char *key, const json_t *value) {
    run_ctx *r = ud;
    (void)key;
    json_t *pid = json_object_get(value, "pid"), *id = json_object_get(value, "instance_id");
    if (!json_is_integer(pid) || !json_is_integer(id)) return;
    const char *name = json_string_value(json_object_get(json_object_get(value, "model"), "name"));
    if (name && !r->served[0] && strlen(name) < sizeof r->served) snprintf(r->served, sizeof r->served, "%s", name);
    for (int i = 0; i < r->workers; i++)
        if (r->w[i].running && r->w[i].pid == (int)json_integer_value(pid))
            r->w[i].instance_id = (uint64_t)json_integer_value(id);
}

static void on_disc_delete(void *ud, const char *key) {
    (void)ud;
    (void)key; /* a worker that is gone is known from its exit, not from its record */
}

/* What a stop signal stops: the children running now, which before start-up ends (the workers
 * start once the frontend answers) or while one waits for its restart are not all of them. */
static void describe_running(const run_ctx *r, char *out, size_t n) {
    int w = 0;
    for (int i = 0; i < r->workers; i++) w += r->w[i].running;
    char ws[64];
    if (w == r->workers) snprintf(ws, sizeof ws, "%d worker%s", w, w == 1 ? "" : "s");
    else snprintf(ws, sizeof ws, "%d of %lld worker%s", w, (long long)r->workers, r->workers == 1 ? "" : "s");
    if (r->frontend.running && w) snprintf(out, n, "stopping the frontend and %s", ws);
    else if (r->frontend.running)
        snprintf(out, n, "stopping the frontend (%s)",
                 r->workers_started ? "no worker running" : "no worker started yet");
    else if (w) snprintf(out, n, "stopping %s (the frontend not running)", ws);
    else snprintf(out, n, "nothing running to stop");
}

static void on_signal(void *data, int signum) {
    run_ctx *r = data;
    r->signals++;
    if (r->signals == 1) {
        char what[160];
        describe_running(r, what, sizeof what);
        BT_INFO("%s received: %s%s", bt_proc_signal_name(signum), what,
                running_children(r) ? " (again to force)" : "");
    }
    bool was_stopping = r->stopping;
    /* a forced stop cuts running streams: not the clean drain that exit 0 reports. 128 + the
     * signal, as a shell reports a command the signal ended; a failure's own code stays */
    if (r->signals > 1 && running_children(r) > 0 && r->exit_code == 0) r->exit_code = 128 + signum;
    signal_children(r, r->signals > 1 ? SIGKILL : SIGTERM);
    if (!was_stopping && running_children(r) == 0) finish(r);
}

/* "host" as it goes in a URL: an IPv6 literal in brackets; every address ("0.0.0.0", "::") as the
 * loopback address of its family, or, shown to the user, as localhost. */
static void url_host(const char *host, bool for_user, char *out, size_t n) {
    if (strcmp(host, "0.0.0.0") == 0) snprintf(out, n, "%s", for_user ? "localhost" : "127.0.0.1");
    else if (strcmp(host, "::") == 0) snprintf(out, n, "%s", for_user ? "localhost" : "[::1]");
    else if (strchr(host, ':')) snprintf(out, n, "[%s]", host);
    else snprintf(out, n, "%s", host);
}

int bt_run_main(int argc, char **argv) {
    bt_log_init("run");
    static run_ctx r;
    r.http_port = 8000;
    r.workers = 2;
    r.http_host = "0.0.0.0";
    r.speedup = 1.0;
    r.migration_limit = 3;
    const bt_opt opts[] = {
        {"--http-port", "DYN_HTTP_PORT", BT_OPT_INT, &r.http_port, 1, 65535, "frontend HTTP port"},
        {"--http-host", "DYN_HTTP_HOST", BT_OPT_STR, &r.http_host, 0, 0,
         "numeric address the frontend and the workers' status servers listen on"},
        {"--workers", "BATON_WORKERS", BT_OPT_INT, &r.workers, 1, MAX_WORKERS, "number of workers"},
        {"--model-name", "DYN_MODEL_NAME", BT_OPT_STR, &r.model, 0, 0,
         "model name (none: the workers' default, mock-model; --engine llama: the model file's name)"},
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
            printf("\nany other frontend or worker flag is passed on to those processes, e.g. --engine llama for "
                   "llama.cpp workers (`baton worker --help`)\n");
            bt_log_usage();
            return 0;
        }
    const char *rest[MAX_ARGS];
    int nrest = 0;
    char err[256];
    if (!bt_opts_parse(opts, nopts, argc, argv, 1, rest, MAX_ARGS, &nrest, err, sizeof err)) {
        fprintf(stderr, "baton run: %s\n", err);
        return 2;
    }
    r.speedup_given = bt_opts_origin(opts, nopts, argc, argv, 1, "--speedup-ratio") != NULL;
    /* every child listens on it: one check here says what is wrong, instead of each child's bind
     * error (a worker's naming its status-server port) */
    if (!bt_proc_check_host("run", opts, nopts, argc, argv, "--http-host", r.http_host)) return 2;
    static const char *const planes[] = {"direct", "nats", NULL};
    if (r.event_plane &&
        !bt_proc_check_choice("run", opts, nopts, argc, argv, "--event-plane", r.event_plane, planes, "direct or nats"))
        return 2;
    /* the workers inherit the environment (DYN_SYSTEM_PORT is overridden by each one's --system-port 0) */
    const char *env_rpc = getenv("DYN_TCP_RPC_PORT");
    if (r.workers > 1 && env_rpc && *env_rpc && strcmp(env_rpc, "0") != 0) {
        fprintf(stderr, "baton run: DYN_TCP_RPC_PORT=%s would give all %lld workers the same port; unset it (each "
                        "worker gets a free one), or use --workers 1\n", env_rpc, (long long)r.workers);
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
        /* one port for every worker: all but the first would fail to bind it */
        if (r.workers > 1 && (flag_in(flag, (const char *[]){"--system-port", "--rpc-port", NULL}))) {
            const char *eq = strchr(flag, '='), *v = eq ? eq + 1 : value;
            if (v && strcmp(v, "0") != 0 && strcmp(v, "-1") != 0) {
                fprintf(stderr, "baton run: %.*s %s would give all %lld workers the same port; leave it out (each "
                                "worker gets a free one), or use --workers 1\n",
                        (int)(eq ? eq - flag : (long)strlen(flag)), flag, v, (long long)r.workers);
                return 2;
            }
        }
        if (r.n_fe_args + 2 > MAX_ARGS || r.n_w_args + 2 > MAX_ARGS) {
            fprintf(stderr, "baton run: too many flags\n");
            return 2;
        }
        bool to_fe = flag_in(flag, frontend_flags) || flag_in(flag, shared_flags);
        bool to_w = !flag_in(flag, frontend_flags);
        if (to_fe) {
            r.fe_args[r.n_fe_args++] = flag;
            if (value) r.fe_args[r.n_fe_args++] = value;
        }
        if (to_w) {
            r.w_args[r.n_w_args++] = flag;
            if (value) r.w_args[r.n_w_args++] = value;
        }
    }
    char host[256];
    url_host(r.http_host, true, host, sizeof host);
    snprintf(r.shown, sizeof r.shown, "http://%s:%lld", host, (long long)r.http_port);
    url_host(r.http_host, false, host, sizeof host);
    snprintf(r.probe_url, sizeof r.probe_url, "http://%s:%lld/health", host, (long long)r.http_port);
    size_t len = sizeof r.exe;
    if (uv_exepath(r.exe, &len) != 0) {
        fprintf(stderr, "baton run: cannot find its own executable\n");
        return 1;
    }
    /* Every argument a child would refuse is refused now, before anything starts (an unknown flag
     * goes to the workers, which exit 2). The directory is made only later: the check reads no path. */
    const char *tmp = getenv("TMPDIR");
    snprintf(r.dir, sizeof r.dir, "%s/baton-run-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!check_child_args(&r)) return 2;
    warn_llama_cpus(&r);
    if (!bt_curl_uv_global_init()) {
        fprintf(stderr, "baton run: libcurl cannot start\n");
        return 1;
    }
    if (!mkdtemp(r.dir)) {
        fprintf(stderr, "baton run: cannot create a discovery directory under %s\n", tmp ? tmp : "/tmp");
        return 1;
    }
    int rc = 1;
    extern char **environ;
    size_t nenv = 0;
    while (environ[nenv]) nenv++;
    r.env = calloc(nenv + 3, sizeof *r.env);
    static char parent[48];
    snprintf(parent, sizeof parent, "BATON_PARENT_PID=%d", (int)getpid());
    if (!r.env) goto out;
    size_t ne = 0;
    for (size_t i = 0; i < nenv; i++)
        if (strncmp(environ[i], "BATON_SIGHUP_IGNORED=", 21) != 0) r.env[ne++] = environ[i];
    r.env[ne++] = parent;
    /* uv_spawn gives each child every signal's default action: a launcher under nohup says so, or
     * its children would stop on the hang-up it was started to survive (main.c) */
    static char hup_ignored[] = "BATON_SIGHUP_IGNORED=1";
    if (bt_proc_sighup_ignored()) r.env[ne++] = hup_ignored;
    uv_loop_t loop;
    uv_loop_init(&loop);
    r.loop = &loop;
    bt_buf_init(&r.probe_rx, RUN_PROBE_MAX_BYTES);
    r.cu = bt_curl_uv_create(&loop, &probe_hooks, &r);
    bt_discovery_config dc;
    bt_discovery_config_default(&dc);
    dc.backend = "file";
    dc.dir = r.dir;
    static const bt_discovery_watcher dw = {on_disc_put, on_disc_delete};
    if (!r.cu || bt_discovery_create(&loop, &dc, &r.disc, err, sizeof err) != BT_OK ||
        bt_discovery_watch(r.disc, "v1/instances/", &dw, &r) != BT_OK) {
        fprintf(stderr, "baton run: cannot watch its discovery directory %s: %s\n", r.dir,
                r.cu ? (r.disc ? "watch refused" : err) : "libcurl refused");
        finish(&r); /* closes what was made; the loop below runs the closes to their end */
        uv_run(&loop, UV_RUN_DEFAULT);
        uv_loop_close(&loop);
        goto out;
    }
    bt_proc_signals_start(&loop, &r.sigs, on_signal, NULL, &r);
    uv_timer_init(&loop, &r.probe_timer);
    uv_timer_init(&loop, &r.kill_timer);
    r.probe_timer.data = r.kill_timer.data = &r;
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
    r.started_ms = r.last_report_ms = bt_now_ms();
    BT_INFO("starting a frontend on %s and %lld worker%s (discovery in %s); \"serving\" follows once all are ready",
            r.shown, (long long)r.workers, r.workers == 1 ? "" : "s", r.dir);
    /* the frontend alone first: the workers start once it answers on its port (start_workers) */
    start_child(&r.frontend);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    rc = r.exit_code;
out:
    free(r.env);
    if (rc != 0) remove_dir(r.dir); /* after a clean run the directory is gone already */
    return rc;
}
