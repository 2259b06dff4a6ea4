/* proc.c — see proc.h. */
#include "common/proc.h"

#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"

const char bt_proc_discovery_dir_default[] = "$TMPDIR/baton_store_kv";
bool bt_proc_supervised;
const char *bt_proc_check_for;

void bt_proc_opts_default(bt_proc_opts *p) {
    memset(p, 0, sizeof *p);
    p->discovery = "file";
    p->discovery_dir = bt_proc_discovery_dir_default;
    p->event_plane = "direct";
    p->nats_server = "nats://localhost:4222";
}

bool bt_proc_help(const char *cmd, const bt_opt *opts, int nopts, int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            bt_opts_usage(cmd, opts, nopts);
            bt_log_usage();
            return true;
        }
    return false;
}

bool bt_proc_parse(const char *cmd, const bt_opt *opts, int nopts, int argc, char **argv) {
    char err[256];
    if (bt_opts_parse(opts, nopts, argc, argv, 1, NULL, 0, NULL, err, sizeof err)) return true;
    bt_proc_error(cmd, "%s", err);
    return false;
}

int bt_proc_error(const char *cmd, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (bt_proc_check_for)
        fprintf(stderr, "baton %s: %s (as passed on to `baton %s`, which refuses it); nothing was started\n",
                bt_proc_check_for, msg, cmd);
    else fprintf(stderr, "baton %s: %s\n", cmd, msg);
    return 2;
}

/* "--flag", or "ENV (--flag)" when the value came from the environment twin */
static const char *given_as(const bt_opt *opts, int nopts, int argc, char **argv, const char *flag, char *buf,
                            size_t cap) {
    const char *origin = bt_opts_origin(opts, nopts, argc, argv, 1, flag);
    if (!origin || strcmp(origin, "argument") == 0) return flag;
    snprintf(buf, cap, "%s (%s)", origin, flag);
    return buf;
}

bool bt_proc_check_host(const char *cmd, const bt_opt *opts, int nopts, int argc, char **argv, const char *flag,
                        const char *value) {
    struct sockaddr_storage ss;
    if (value && (uv_ip4_addr(value, 0, (struct sockaddr_in *)&ss) == 0 ||
                  uv_ip6_addr(value, 0, (struct sockaddr_in6 *)&ss) == 0))
        return true;
    char name[160];
    bt_proc_error(cmd, "%s '%s' is not a numeric IPv4 or IPv6 address (e.g. 127.0.0.1, ::1 or 0.0.0.0 for every "
                       "address)", given_as(opts, nopts, argc, argv, flag, name, sizeof name), value ? value : "");
    return false;
}

bool bt_proc_check_choice(const char *cmd, const bt_opt *opts, int nopts, int argc, char **argv, const char *flag,
                          const char *value, const char *const *choices, const char *listed) {
    for (const char *const *c = choices; value && *c; c++)
        if (strcmp(value, *c) == 0) return true;
    char name[160];
    bt_proc_error(cmd, "unknown %s '%s' (%s)", given_as(opts, nopts, argc, argv, flag, name, sizeof name),
                  value ? value : "", listed);
    return false;
}

bool bt_proc_check_planes(const char *cmd, const bt_proc_opts *p, const bt_opt *opts, int nopts, int argc,
                          char **argv) {
    static const char *const discovery[] = {"file", "etcd", NULL};
    static const char *const planes[] = {"direct", "nats", NULL};
    if (!bt_proc_check_choice(cmd, opts, nopts, argc, argv, "--discovery", p->discovery, discovery, "file or etcd") ||
        !bt_proc_check_choice(cmd, opts, nopts, argc, argv, "--event-plane", p->event_plane, planes, "direct or nats"))
        return false;
    char why[512], name[160];
    if (strcmp(p->event_plane, "nats") == 0 && !bt_events_urls_ok(p->nats_server, why, sizeof why)) {
        bt_proc_error(cmd, "%s: %s", given_as(opts, nopts, argc, argv, "--nats-server", name, sizeof name), why);
        return false;
    }
    return true;
}

bool bt_proc_given_nonempty(const char *flag, const char *env, const char *val, const char *without, char *err,
                            size_t errlen) {
    const char *ev = getenv(env);
    if (val && !*val) {
        snprintf(err, errlen, "%s (%s) is given empty: leave it out to run without %s", flag, env, without);
        return false;
    }
    if (!val && ev && !*ev) {
        snprintf(err, errlen, "%s (%s) is set but empty: unset it to run without %s", env, flag, without);
        return false;
    }
    return true;
}

bt_status bt_proc_load_secret(const bt_proc_opts *p, char **out, char *err, size_t errlen) {
    *out = NULL;
    /* empty is not "no secret" (a template that failed to fill it in would leave the request
     * plane open without a word), as for the API keys */
    if (!bt_proc_given_nonempty("--rpc-secret-file", "DYN_RPC_SECRET_FILE", p->rpc_secret_file,
                                "a request-plane secret", err, errlen))
        return BT_ERR_INVALID;
    const char *value = getenv("DYN_RPC_SECRET");
    if (!p->rpc_secret_file && value && !*value) {
        snprintf(err, errlen, "DYN_RPC_SECRET is set but empty: unset it to run without a request-plane secret");
        return BT_ERR_INVALID;
    }
    return bt_load_secret(p->rpc_secret_file, value, out, err, errlen);
}

bt_status bt_proc_discovery_create(uv_loop_t *loop, const bt_proc_opts *p, int64_t ttl_s, bt_discovery **out,
                                   char *err, size_t errlen) {
    bt_discovery_config dc;
    bt_discovery_config_default(&dc);
    dc.backend = p->discovery;
    if (p->discovery_dir && p->discovery_dir != bt_proc_discovery_dir_default) dc.dir = p->discovery_dir;
    if (p->etcd_endpoints) dc.etcd_endpoints = p->etcd_endpoints;
    if (p->etcd_ca) dc.etcd_ca = p->etcd_ca;
    if (p->etcd_client_cert) dc.etcd_client_cert = p->etcd_client_cert;
    if (p->etcd_client_key) dc.etcd_client_key = p->etcd_client_key;
    if (ttl_s > 0) dc.ttl_s = ttl_s;
    return bt_discovery_create(loop, &dc, out, err, errlen);
}

void bt_proc_events_config(const bt_proc_opts *p, const char *ns, bt_events_config *ec) {
    bt_events_config_default(ec);
    ec->plane = p->event_plane;
    ec->nats_server = p->nats_server;
    ec->tls_ca = p->nats_tls_ca;
    ec->tls_cert = p->nats_tls_cert;
    ec->tls_key = p->nats_tls_key;
    ec->ns = ns;
}

bt_status bt_proc_events_create(uv_loop_t *loop, const bt_proc_opts *p, const char *ns, const char *role,
                                uint64_t id, bt_events **out, char *err, size_t errlen) {
    bt_events_config ec;
    bt_proc_events_config(p, ns, &ec);
    char name[64];
    snprintf(name, sizeof name, "baton-%s-%" PRIx64, role, id);
    ec.name = name;
    return bt_events_create(loop, &ec, out, err, errlen);
}

const char *bt_proc_signal_name(int signum) {
    switch (signum) {
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGHUP: return "SIGHUP";
    case SIGUSR1: return "SIGUSR1";
    case SIGUSR2: return "SIGUSR2";
    default: return "signal";
    }
}

/* Read once, before any handle of ours is started: libuv puts SIG_DFL back when a signal's last
 * handle closes, so a later look (the frontend starts its handles again after its first loop)
 * would no longer see what the process was started with. */
bool bt_proc_sighup_ignored(void) {
    static int ignored = -1;
    if (ignored < 0) {
        struct sigaction sa;
        ignored = sigaction(SIGHUP, NULL, &sa) == 0 && sa.sa_handler == SIG_IGN;
    }
    return ignored;
}

static void on_proc_signal(uv_signal_t *h, int signum) {
    bt_proc_signals *s = h->data;
    if (signum == SIGUSR1 || signum == SIGUSR2) {
        if (s->on_user && s->on_user(s->data, signum)) return;
        /* a line a second at most for each: a loop sending them must not fill the log */
        static bt_log_limit lim[2];
        unsigned unsaid;
        if (!bt_log_limit_take(&lim[signum == SIGUSR2], uv_now(h->loop), 1, &unsaid)) return;
        if (unsaid)
            BT_INFO("%s received: ignored (baton gives it no meaning; SIGTERM, SIGINT or SIGHUP stop it); %u more "
                    "before it, not logged",
                    bt_proc_signal_name(signum), unsaid);
        else
            BT_INFO("%s received: ignored (baton gives it no meaning; SIGTERM, SIGINT or SIGHUP stop it)",
                    bt_proc_signal_name(signum));
        return;
    }
    /* The same stop signal again within BT_PROC_REPEAT_MS is the one stop delivered twice, not a
     * second one: GNU timeout sends its signal to the command and then to the whole process
     * group (the command included), and `kill -- -PGID` beside a launcher's own signal does the
     * same, so a drain would be cut at once as if forced. No one presses Ctrl-C twice that fast;
     * a second stop that is meant comes later and still forces. One record for the process: the
     * handles live on one loop at a time (the frontend starts them again after its first). */
    static int last_signum;
    static uint64_t last_ns;
    uint64_t now = bt_now_ns();
    if (signum == last_signum && now - last_ns < BT_PROC_REPEAT_MS * 1000000ull) {
        BT_INFO("%s received again %.1f ms after the first: taken as the same stop delivered twice (the command "
                "and its process group both signalled), not a second one",
                bt_proc_signal_name(signum), (double)(now - last_ns) / 1e6);
        return;
    }
    last_signum = signum;
    last_ns = now;
    if (signum == SIGHUP) BT_INFO("SIGHUP: shutting down as for SIGTERM (baton has no configuration to reload)");
    s->on_stop(s->data, signum);
}

void bt_proc_signals_start(uv_loop_t *loop, bt_proc_signals *s, bt_proc_stop_cb on_stop, bt_proc_user_cb on_user,
                           void *data) {
    bool keep_hup_ignored = bt_proc_sighup_ignored();
    static bool said;
    if (keep_hup_ignored && !said) {
        said = true;
        BT_INFO("SIGHUP is ignored, as it was when the process started (nohup)");
    }
    s->on_stop = on_stop;
    s->on_user = on_user;
    s->data = data;
    s->n = 0;
    static const int signums[] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof signums / sizeof signums[0]; i++) {
        if (signums[i] == SIGHUP && keep_hup_ignored) continue;
        uv_signal_t *h = &s->h[s->n++];
        uv_signal_init(loop, h);
        h->data = s;
        uv_signal_start(h, on_proc_signal, signums[i]);
    }
}

/* ---- teardown ---------------------------------------------------------------------------- */

static void close_one(uv_handle_t *h, void *arg) {
    (void)arg;
    if (uv_is_closing(h)) return;
    int sig = h->type == UV_SIGNAL ? ((uv_signal_t *)h)->signum : 0;
    uv_close(h, NULL);
    /* libuv puts back SIG_DFL when the last handle of a signal closes: a SIGHUP, SIGUSR1 or SIGUSR2
     * during the rest of the teardown (or before a loop started again sets its handles) would then
     * kill a process that is stopping cleanly, and exit with the signal instead of its status */
    if (sig == SIGHUP || sig == SIGUSR1 || sig == SIGUSR2) signal(sig, SIG_IGN);
}

void bt_proc_close_handles(uv_loop_t *loop) { uv_walk(loop, close_one, NULL); }


static void on_events_closed(void *ud) {
    bt_proc_closer *c = ud;
    if (c->done) c->done(c->ud);
    bt_proc_close_handles(c->loop);
}

static void on_discovery_closed(void *ud) {
    bt_proc_closer *c = ud;
    bt_events *e = *c->events;
    *c->events = NULL;
    bt_events_close(e, on_events_closed, c); /* calls back at once for the direct plane */
}

void bt_proc_close_planes(bt_proc_closer *c, uv_loop_t *loop, bt_discovery **disc, bt_events **events,
                          void (*done)(void *ud), void *ud) {
    c->loop = loop;
    c->events = events;
    c->done = done;
    c->ud = ud;
    bt_discovery *d = *disc;
    *disc = NULL;
    if (d) bt_discovery_close(d, on_discovery_closed, c);
    else on_discovery_closed(c);
}

/* Discovery closes some of its handles itself once its pending work is done: closing every handle
 * of the loop before that would close them twice. So the planes close first, in order, and the
 * remaining handles after (bt_proc_close_planes). */
void bt_proc_unwind(uv_loop_t *loop, bt_discovery **disc, bt_events **events) {
    bt_proc_closer c;
    bt_events *none = NULL;
    bt_proc_close_planes(&c, loop, disc, events ? events : &none, NULL, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
}
