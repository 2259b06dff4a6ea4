/* fe.h — the frontend's internal types, shared by its modules (not a public interface).
 *
 *   frontend.c  process: options, HTTP routing, probes, /v1/models, shutdown
 *   workers.c   the worker set: discovery watch, request-plane connections, load, quarantine, routing
 *   request.c   one client request: validation, its lifecycle state, output (SSE or JSON), cancel
 *   migrate.c   the attempts of a request: dispatch, the attempt budget, the continuation
 *   resume.c    resumable streams: Last-Event-ID, the GET form, replay from the journal
 *   journal.c   the in-process stream journal (journal.h: the interface)
 *   journal_js.c  the journal shared by frontends through NATS JetStream (event plane NATS)
 *   metrics.c   per-model counters and histograms, Prometheus text
 *
 * Everything runs on one libuv loop. A request lives on that loop from start to end. */
#ifndef BATON_FE_H
#define BATON_FE_H

#include <jansson.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <uv.h>

#include "common/cancel.h"
#include "common/linelog.h"
#include "common/map.h"
#include "common/metrics.h"
#include "common/pool.h"
#include "common/proc.h"
#include "common/util.h"
#include "discovery/discovery.h"
#include "engine/engine.h"
#include "events/events.h"
#include "frontend/admit.h"
#include "frontend/budget.h"
#include "frontend/journal.h"
#include "frontend/outlier.h"
#include "http/http.h"
#include "proto/proto.h"
#include "rpc/conn.h"

/* A chunk head (fe_req.prefix) this long or shorter is kept in the request: ~160 bytes with a
 * generated request id and a short model name */
#define FE_PREFIX_INLINE 175
#define FE_CALLER_LEN 16 /* fe_caller_tag: a SHA-256 prefix */
/* workers a request remembers as having refused it, busy or short of context (migrate.c) */
#define FE_SKIP_IDS_MAX 8

typedef struct fe fe;
typedef struct fe_worker fe_worker;
typedef struct fe_req fe_req;
typedef struct fe_attempt fe_attempt;
typedef struct fe_model fe_model;
typedef struct fe_group fe_group;
typedef struct fe_job fe_job;
typedef struct fe_gather fe_gather;
typedef struct fe_pending_resume fe_pending_resume;

/* ---- metrics ---- */
/* The request path counts into fe_stats; metrics.c reads it into a registry when scraped. */
typedef bt_hist fe_hist; /* over the frontend's latency buckets (metrics.c) */

/* The model label of requests refused whose model is not served (metrics.c): a name no model may
 * have (discovery.h), so that such requests never share a served model's series. */
#define FE_MODEL_UNKNOWN BT_MODEL_NAME_RESERVED
typedef enum { FE_OUT_SUCCESS = 0, FE_OUT_ERROR = 1, FE_OUT_CANCELLED = 2, FE_OUT_REJECTED = 3, FE_OUT_N_ } fe_outcome;

typedef struct {
    uint64_t requests[2][2][FE_OUT_N_]; /* [api][streaming][outcome] */
    int64_t inflight;
    fe_hist ttft, itl, migration_stall, duration;
    uint64_t migrations_new, migrations_ongoing, migrations_exhausted;
    /* failures counted in migrations_new/ongoing, with budget left, whose continuation was never
     * sent: no worker could take it, the retry budget refused it, or the request ended first */
    uint64_t migrations_unserved;
    uint64_t kv_relayed, kv_relayed_bytes, kv_unrelayed; /* KV states a continuation took / could not */
    uint64_t cancellations[2]; /* [streaming] */
    uint64_t rejections[2];    /* [api] */
    uint64_t tokens_out;
    uint64_t preempt_routed; /* new requests routed past the busy verdict to a worker that preempts for them */
    uint64_t token_timeouts; /* attempts given up after --stream-token-timeout of silence on their stream */
    uint64_t stream_waits[2]; /* WAITING frames received, by reason (BT_WAIT_QUEUED, BT_WAIT_PREEMPTED) */
    uint64_t link_wait_retries; /* dispatches of continuations that waited for link room (migrate.c) */
} fe_stats;

struct fe_model {
    char name[BT_MODEL_NAME_MAX + 1];
    fe_stats st;
    double decode_threshold;  /* NaN = unset */
    double prefill_threshold; /* NaN = unset */
    /* The known workers serving this model (routable or not), for routing: a request looks only
     * at its model's workers, with no cap on their number. Order is not meaningful. */
    fe_worker **ws;
    size_t nws, capws;
    /* What the cards of ws allow, kept by workers.c as workers are filed and forgotten (a worker's
     * card does not change while it is known), so that a request reads them instead of scanning
     * ws. The largest, not the smallest: workers may advertise different contexts (a rolling
     * upgrade, a mixed fleet), routing takes only a worker whose card holds the request
     * (fe_request_context_need), so what a request may ask is what the largest of them holds.
     *   context_max: the largest context_length, 0 when a worker advertises none (it bounds
     *                nothing, and routing takes it whatever the request needs) or there is none;
     *   prompt_bytes_max: the largest context_length x max_token_bytes, the text that some worker
     *                could still hold; 0 when a worker lacks either (the mocker: its words are one
     *                token however long, so no text is too long for it);
     *   token_bytes_max: the longest token's bytes among the cards that say (1 when none does),
     *                the weakest bound on how many tokens a text is at least. */
    uint64_t context_max, prompt_bytes_max, token_bytes_max;
    LIST_ENTRY(fe_model) link; /* fe.models */
};

/* ---- workers ---- */
typedef enum { FW_CONNECTING, FW_READY, FW_DOWN } fw_state;

/* How a worker's discovery grace began or ended (the result label of
 * baton_frontend_discovery_grace_total): kept when its key vanished, then reregistered, expired
 * (the grace ran out), or dropped (its connection ended, or it said it was draining). */
typedef enum { FE_GRACE_KEPT, FE_GRACE_REREGISTERED, FE_GRACE_EXPIRED, FE_GRACE_DROPPED, FE_GRACE_N_ } fe_grace_result;

/* Whether w's engine visibly runs sequences: it sent this connection tokens within the last
 * limit_ms of the clock `now` (the calling loop's uv_now, low 32 bits), or a load report showing
 * sequences running (perhaps another frontend's or another event loop's) a little longer ago. */
bool fe_worker_progressed(const fe_worker *w, uint32_t now, uint32_t limit_ms);

struct fe_worker {
    fe *fe;
    fe_model *mdl; /* the model it serves (its entry in mdl->ws), NULL if it could not be filed */
    uint64_t id;
    char key[256];
    char host[64];
    int port;
    char transport[96];
    char model[BT_MODEL_NAME_MAX + 1]; /* checked to fit when discovered (fe_parse_instance) */
    char ns[64], component[64], endpoint[64];
    bt_rpc_conn *conn;
    fw_state state;
    bool in_discovery; /* false once its key is gone: finish streams, then forget */
    /* Its key is gone, but its connection was healthy when that was seen (workers.c, on_disc_delete):
     * still routable until grace_until_ms (uv_now) while it registers again (--discovery-grace).
     * in_discovery is false meanwhile; a put of its key ends the grace, and so do its expiry, a
     * GOAWAY and the connection's end, which drop it as a deletion would have. */
    bool in_grace;
    uint64_t grace_since_ms, grace_until_ms;
    TAILQ_ENTRY(fe_worker) grace_link; /* in fe.grace_workers while in_grace */
    bool goaway;       /* the worker is draining: route nothing new */
    /* Skipped for new attempts after a failure, until a fresh connection completes its handshake
     * (the probe) or discovery re-announces the worker. No time limit: a worker that cannot prove
     * itself stays out. */
    bool quarantined;
    /* Its HELLO announced BT_HELLO_WAITING: its engine reports every wait of a stream (a WAITING
     * frame), so --stream-token-timeout judges each of its silent streams that was not told, whatever
     * its LOAD says (an older worker: none of its streams while its LOAD shows sequences waiting). */
    bool tells_waits;
    /* When its last TOKENS frame arrived, for any stream (the loop's clock, uv_now, in ms, low 32
     * bits; 0 = none yet): a stream its engine keeps waiting waits because others run, and those
     * produce tokens. A waiting stream is exempt from --stream-token-timeout only while this, or
     * running_ms below, is within the bound (fe_worker_progressed): an engine that runs nothing
     * produces nothing, and its waiting streams are judged. */
    uint32_t tokens_ms;
    /* LOAD frames received on its connections (whichever source is applied, see
     * event_plane_is_source), and the count and time (uv_now, ms) of the last one showing nothing
     * waiting: such a LOAD written after a stream's WAITING ends that stream's wait (a->wait_load). */
    uint32_t load_frames, idle_load, idle_ms;
    /* When the last LOAD frame showing sequences running arrived (uv_now, ms, low 32 bits; 0 =
     * none): the engine runs something, perhaps only another frontend's or another shard's streams,
     * whose tokens this connection never sees (fe_worker_progressed). */
    uint32_t running_ms;
    /* When the last LOAD frame of any kind arrived (uv_now, ms, low 32 bits; 0 = none): the worker
     * sends one at least every second, so a recent one says the worker itself is alive and talking
     * (the discovery grace asks it). */
    uint32_t load_frame_ms;
    bt_load_report load;
    uint64_t load_ms; /* when the last LOAD arrived (0 = never) */
    /* Load reports: [0] LOAD frames applied, [1] event-plane reports applied, [2] LOAD frames not
     * applied because the event plane is this worker's source (see fe_workers_apply_load). */
    uint64_t load_reports[3];
    uint64_t event_load_ms; /* when the last event-plane report for it arrived (0 = never) */
    uint64_t total_blocks_card;
    uint64_t block_size; /* tokens per KV block, from the model card (0 = unknown) */
    uint64_t context_length; /* prompt + completion tokens the model takes, from the card (0 = unknown) */
    uint64_t max_token_bytes; /* the longest vocabulary entry in bytes, from the card (0 = unknown) */
    /* The card's exactness fingerprint ("" = none: its engine makes no exactness promise). A
     * continuation of a stream begun on a worker with a fingerprint goes only to a worker with the
     * same one (docs/engines.md §3.4). */
    char exactness[256];
    /* Shedding: KV blocks that requests routed since the last LOAD will need (the report does
     * not show them yet), and the rate at which finished requests release blocks. */
    uint64_t pending_blocks;
    /* Attempts routed to it past its busy verdict (fe_route_preempt) that have had no token yet:
     * each is taken to claim one of the victims its last LOAD offered, until its first token. */
    uint32_t preempt_pending;
    double release_rate; /* blocks/s, exponentially decayed, read through fe_worker_release_rate */
    uint64_t release_us; /* time of the last update of release_rate */
    bt_map streams; /* stream id → fe_req */
    uint32_t next_stream;
    uint32_t backoff_ms;
    uv_timer_t retry_timer;
    bool retry_timer_inited;
    bool freeing;
    uint64_t routed_total;
    unsigned kv_relaying; /* KV states part-written to it (at most BT_KV_INFLIGHT) */
    fe_outlier outlier; /* latency window and ejection state (outlier.h) */
    LIST_ENTRY(fe_worker) link; /* fe.workers */
    bool flush_pending;               /* in fe.req_flush_list: REQUESTs in its write buffer */
    LIST_ENTRY(fe_worker) flush_link; /* fe.req_flush_list */
};

/* ---- requests ---- */

/* A request's life (docs/architecture.md has the diagram). Changed only by fe_req_set_state,
 * which logs each change as "request <id>: <from> -> <to> (<reason>)".
 *   ADMITTED   validated and counted; no attempt yet
 *   ROUTING    its first attempt is on a worker; no token has reached the client
 *   STREAMING  tokens flow from the current attempt
 *   MIGRATING  an attempt failed with a migratable error; from then until the next attempt's first
 *              token (a continuation carries every token delivered so far)
 *   DONE       answered, failed or cancelled; nothing more happens to it */
typedef enum { FE_REQ_ADMITTED, FE_REQ_ROUTING, FE_REQ_STREAMING, FE_REQ_MIGRATING, FE_REQ_DONE } fe_req_state;

/* A KV state a worker sent with a stream it gave back (migrate.c): relayed to the next attempt,
 * then dropped (docs/protocol.md "KV hand-off"). */
typedef struct {
    uint8_t *data;
    uint64_t total, have;
    bool bad; /* out of order or too large: not relayed */
} fe_kv;

/* One try of a request on one worker: one REQUEST frame and the stream it opens. Owned by its
 * request (r->attempt, NULL between attempts); created by migrate.c when it dispatches, and ended
 * by exactly one of: its FINISH, its failure (an ERROR frame, the connection lost, the worker
 * declared dead) or the request's end. The worker connection code only hands it frames
 * (fe_attempt_on_tokens / _on_finish / _on_error) and never touches the request. */
struct fe_attempt {
    fe_req *req;
    fe_worker *worker;
    uint32_t stream_id;
    /* When a frame of its stream last arrived (TOKENS or KVSTATE; its REQUEST or a relayed KV piece
     * written, before any): the loop's clock (uv_now) in ms, low 32 bits, read only as a difference
     * with that clock (--stream-token-timeout, fe_token_sweep_start). In the padding after
     * stream_id: the token path touches no more cache lines for it. */
    uint32_t t_heard_ms;
    bt_ctx *ctx;     /* a child of the request's context: its callback sends STOP or KILL */
    uint32_t tokens; /* tokens received on this attempt */
    int number;      /* 1 = the first attempt */
    bool preempting; /* routed past its worker's busy verdict: counted in its preempt_pending until its first token */
    /* Its worker's engine keeps the stream waiting (a WAITING frame; its next TOKENS ends it):
     * --stream-token-timeout does not judge its silence. In the padding after `preempting`: the
     * first cache line keeps its layout. */
    bool waiting;
    /* Its worker's load_frames when the WAITING came: a LOAD counted after it that shows nothing
     * waiting ends the wait (the sweep reads fe_worker.idle_load). In the padding before t_sent_us. */
    uint32_t wait_load;
    uint64_t t_sent_us, t_last_us; /* when its REQUEST was written; its last tokens (outlier.h) */
    /* A KV state relayed ahead of the REQUEST (workers.c): its pieces are written paced, and the
     * REQUEST payload waits in held_req until the last one is out (held_req NULL: written). */
    fe_kv kv_out;
    size_t kv_off;          /* bytes of kv_out written */
    char *held_req;
    size_t held_len;
    bool held_stop;         /* a STOP asked for meanwhile: written right after the REQUEST */
    LIST_ENTRY(fe_attempt) relay_link; /* fe.relays, while held_req */
};
/* what a token touches of its attempt (up to t_last_us) stays in its first cache line */
_Static_assert(offsetof(fe_attempt, t_last_us) + sizeof(uint64_t) <= 64, "fe_attempt's per-token fields spread");

struct fe_req {
    /* ---- What every token reads or writes (fe_attempt_on_tokens, fe_request_deliver,
     * write_chunk), together in the first four cache lines. An engine step brings a token for
     * each of hundreds of streams, and each stream's state has left the core's caches since the
     * last step: spread over the struct, a token loaded ten of its lines; here, four, which
     * fe_attempts_prefetch loads ahead (docs/benchmarks.md, a sixth round), and the chunk head
     * after them, in the two lines that follow (a seventh round). ---- */
    fe *fe;
    fe_model *model;
    bt_http_req *http;   /* NULL once the client is gone */
    fe_attempt *attempt; /* the running attempt, or NULL */
    /* resumable streams (resume.c): the journal record of this stream (NULL = not journaled) */
    fe_jrec *jrec;
    fe_req_state state;
    bt_api api;
    bool stream, include_usage, return_ids;
    /* While out_in_rec, what was delivered lives only in the journal record `jrec` (above) */
    bool out_in_rec;
    bool text_lost; /* streaming: text went past the cap of `text`; no longer sent on migration */
    bool headers_sent;
    bool role_sent;
    bool catch_up;      /* skip_to fell inside a continuation's event: attempts stop at skip_to (migrate.c) */
    int64_t max_tokens; /* as the client asked, or -1: it set none, and the worker's engine
                           default applies (the worker owns that default, --default-max-tokens) */
    /* What was delivered to the client: nids token ids and their text (streaming too: a
     * continuation carries them). While out_in_rec, they live only in the journal record
     * (one copy for the journal and the request: fe_request_output reads them) and ids/text stay
     * empty; otherwise, in ids and text. */
    size_t nids;
    uint32_t *ids;
    size_t ids_cap;
    uint64_t t_start_us, t_first_us, t_last_us;
    uint64_t skip_to; /* a resume ahead of the journal: events up to this position are not written */
    /* streaming: the constant head of every chunk (prefix_len bytes), built once: prefix_in, or
     * a heap copy when longer (a long request id or model name); NULL when it could not be made */
    const char *prefix;
    size_t prefix_len;
    bt_buf text;
    char stream_id[FE_STREAM_ID_LEN + 1]; /* the resumable stream's id (resume.c) */
    char prefix_in[FE_PREFIX_INLINE];     /* the chunk head when it fits (see prefix) */
    /* ---- the rest: at a request's start and end, and on a failure ---- */
    char rid[80];
    /* The parsed body, only while canon is NULL (out of memory when it was to be made): the
     * journal record and each attempt's REQUEST then dump it themselves. With canon, the tree is
     * freed as soon as the request is admitted (fe_request_start), while its memory is still in
     * the cache: freed at the request's end, its ~30 nodes had left the cache long before
     * (docs/benchmarks.md, a seventh round). Nothing reads it after admission but those two. */
    json_t *body;
    /* body as canonical JSON (sorted keys, compact), serialized once: the digest, the journal
     * record and every attempt's REQUEST use it (NULL: not made; the codec dumps body itself) */
    char *canon;
    size_t canon_len;
    uint64_t seed;      /* chosen here when the body has none, sent with every attempt (0 = body's) */
    fe_kv kv;      /* the KV state of the attempt that was given back, until the next one takes it */
    int attempts_left;       /* the budget: --migration-limit + 1, less each attempt charged */
    int attempts;            /* attempts made */
    int moves;               /* of them, ended by a rebalance (BT_ERR_MOVED): charged to no budget */
    int declined;            /* of them, refused before they ran by a draining worker, or by a worker too
                              * small for them while a larger one was left: no failure either */
    int busy_refusals;       /* of them, refused by a busy upstream (bt_status_upstream_busy) */
    /* the workers that refused it busy, or refused its continuation for their context length
     * (migrate.c): not routed to again */
    uint64_t skip_ids[FE_SKIP_IDS_MAX];
    uint8_t nskip_ids;
    int busy_retry_after;    /* the shortest Retry-After those refusals carried, in seconds (0: none) */
    uint64_t failed_worker;  /* id of the worker that failed last, avoided for the retry */
    bt_status fail_code;     /* why the last attempt failed, for the migration log line */
    bt_ctx *ctx;          /* the request's cancellation context (the root) */
    uint64_t t_cancel_us; /* when a stop or kill was asked for (0 = never) */
    uint64_t t_fail_us; /* when the attempt that started the current migration failed */
    int64_t created;
    uint32_t prompt_tokens, completion_tokens;
    bool usage_unreported; /* the worker's upstream reported no usage: the answer says so (usage null) */
    /* ids the client's body names in carried_token_ids: part of the completion it is billed for
     * (usage counts them) but not of nids, and not limited by max_tokens, which counts new ones */
    uint32_t body_carried;
    /* the prompt's size as the frontend sees it, for fe_request_context_need: its token ids when it
     * is an array of them, else the bytes of its text that reach the model (request.c) */
    uint64_t prompt_ids_len, prompt_bytes;
    /* the least context it needs because a worker whose card advertised one less refused it for its
     * length (a text prompt the frontend cannot count, migrate.c): rules out that worker and every
     * one no larger (0 = none refused it) */
    uint64_t context_floor;
    bool mig_pending;       /* a failure was counted as a migration and no continuation was sent yet */
    bool mig_stall;         /* such a failure since the last token: the stall goes to migration_stall */
    bool link_waiting;      /* in fe.link_waits: every link that could take its continuation is full */
    bool link_wait_logged;
    TAILQ_ENTRY(fe_req) link_wait; /* fe.link_waits, while link_waiting */
    fe_jtail jtail;         /* how the request ended, for its journal record */
    char body_digest[65];   /* of the client's body, before the frontend changes anything (resume.c) */
    bool resumed;           /* built from the journal by a resume: no new record, no admission */
    uint64_t claim_seq;     /* a resume's place among the process's claims (fe_group.claims); 0 otherwise */
    bool overran;           /* a worker sent tokens past max_tokens (dropped; logged once) */
    bool kv_refused_logged; /* a KV state of it was not relayed, and that was logged (once) */
    /* ---- how it was answered, for its access-log line (access.c) ---- */
    bool client_gone;       /* the client went away (or was superseded) before its answer ended */
    uint16_t http_status;   /* the status its answer carries; 0 = none was sent */
    const char *finish;     /* its finish_reason (a static name, or the journal tail's), or NULL */
    const char *err_code;   /* the error code it was answered with (a static name), or NULL */
    uint64_t last_worker;   /* the instance id of the worker of its last attempt (0: none) */
    fe_jsnap *replay;       /* a resume's copy of the record while its events are being replayed */
    size_t replay_ev;       /* the next event of `replay` to write */
    int replay_tail;        /* where the replay ends (resume.c) */
    fe_ticket *ticket;      /* admission (admit.h): priority, tenant, place in the queue; NULL for a resume */
    uint64_t adopt_worker;  /* a resume's first attempt re-attaches to this worker's orphan (0: none) */
    /* its journal record once the journal dropped it (full): kept to the request's end, so that
     * a resume from an id the client already holds is told the record was dropped (journal.c) */
    fe_jrec *dropped_jrec;
    uint8_t caller[FE_CALLER_LEN]; /* who may cancel it besides the operator (fe_caller_tag) */
    LIST_ENTRY(fe_req) link; /* fe.reqs: all live requests */
    /* ---- Not zeroed when a request is taken from the pool (fe_request_new makes each the empty
     * string, and nothing reads past a terminator): ~6 cache lines that most requests never touch
     * but for their first bytes, which zeroing them would write, cold, at every request
     * (docs/benchmarks.md, a seventh round). Fields that must start zeroed go above. ---- */
    /* The exactness fingerprint of the worker whose attempt produced the delivered tokens (that of
     * the last attempt sent with nothing carried); "" = none. Sent with every continuation. */
    char exactness[256];
    char fail_msg[128]; /* why the last attempt failed ("" = none yet) */
};
/* a token's part of the request within four cache lines (from a 16-byte aligned start: five) */
_Static_assert(offsetof(fe_req, stream_id) + FE_STREAM_ID_LEN + 1 <= 256, "fe_req's per-token fields spread");
/* ... and the chunk head kept with them ends within six */
_Static_assert(offsetof(fe_req, prefix_in) + FE_PREFIX_INLINE <= 384, "fe_req's chunk head spread");
/* fe_request_new zeroes up to exactness: the strings not zeroed stay the struct's last members */
_Static_assert(offsetof(fe_req, exactness) > offsetof(fe_req, link) && offsetof(fe_req, fail_msg) > offsetof(fe_req, link),
               "fe_req's unzeroed strings are its last members");

/* ---- options and process ---- */
typedef struct {
    int64_t http_port;
    const char *http_host;
    const char *ns;
    bt_proc_opts p; /* discovery, event plane, request-plane secret */
    int64_t migration_limit;
    const char *router_mode;
    double decode_threshold;
    double prefill_threshold;
    double stall_timeout;
    double token_timeout; /* --stream-token-timeout: seconds an attempt may hear nothing of its stream; 0 = off */
    double discovery_grace; /* --discovery-grace: seconds a healthy worker whose key vanished stays routable; 0 = off */
    const char *api_key;
    const char *admin_api_key;     /* the operator endpoints' key (frontend.c: routes); NULL: the API's */
    const char *api_key_file;      /* the same keys read from files at start-up (key_from_file) */
    const char *admin_api_key_file;
    bool metrics_api_key_required; /* /metrics needs the API key (or the admin key) too (frontend.c: routes) */
    const char *allowed_origins;   /* --allowed-origins: the browser origins served (frontend.c: origin_ok) */
    const char *allowed_hosts;     /* --allowed-hosts: the Host names served (http.h: bt_http_host_allowed) */
    int64_t max_body;
    int64_t max_body_total; /* request body bytes being received at once by all connections; 0 = no cap */
    int64_t max_output_total; /* response bytes queued for all clients at once; 0 = no cap */
    int64_t drain_timeout;
    int64_t accept_window_ms;
    int64_t header_timeout_ms;
    int64_t idle_timeout_ms;
    int64_t max_connections;
    int64_t max_requests; /* concurrent requests; beyond it 503 */
    int64_t max_backlog;  /* bytes queued for a client that does not read, then it is dropped */
    int64_t threads;      /* event loops (shards.c) */
    double stream_retention;       /* seconds a stream's journal record is kept after it ends; 0 = off */
    int64_t stream_retention_bytes; /* cap on the whole journal */
    const char *priority_ceiling;   /* --priority-ceiling KEY=N,...,*=N (admit.h) */
    const char *priority_ceiling_file; /* --priority-ceiling-file: the same, one KEY=N a line (admit.h) */
    bool trust_tenant_header;
    const char *tenant_label_secret_file; /* keys the API keys' tenant labels (admit.h); NULL: random */
    int64_t queue_max_requests, queue_max_tokens;
    double queue_timeout;
    double outlier_factor, outlier_window, outlier_backoff, outlier_max_ejected; /* outlier.h */
    int64_t outlier_min_samples;
    double retry_budget; /* budget.h; 0 = off */
    int64_t retry_budget_min;
    int64_t migration_concurrency; /* admit.h; 0 = no cap */
    const char *access_log;        /* --access-log: a file, "-" (standard output) or NULL (access.c) */
} fe_opts;

/* What became of a resume (resume.c; baton_frontend_stream_resumes_total{outcome}). */
typedef enum {
    FE_RESUME_REPLAYED,   /* a finished answer replayed from the journal */
    FE_RESUME_CONTINUED,  /* an unfinished one replayed and continued by migration */
    FE_RESUME_SUPERSEDED, /* ... taken over from a request that still streamed it (client gone) */
    FE_RESUME_NOT_FOUND,  /* 404: unknown, expired or evicted id */
    FE_RESUME_INVALID,    /* 400: malformed id, a different body, a position it never sent */
    FE_RESUME_CONFLICT,   /* 409: still streamed by another thread's request after a second */
    FE_RESUME_DROPPED,    /* 404: its journal record was dropped while it ran (a tombstone says so) */
    FE_RESUME_UNAVAILABLE, /* 503: the shared journal did not answer in time (NATS down or stopped): retry */
    FE_RESUME_N_
} fe_resume_outcome;

typedef enum { ROUTE_ROUND_ROBIN, ROUTE_RANDOM, ROUTE_LEAST_LOADED } fe_route_mode;

struct fe {
    uv_loop_t *loop;
    fe_opts o;
    fe_route_mode mode;
    bt_http_server *http;
    bt_discovery *disc;
    LIST_HEAD(, fe_worker) workers;
    size_t nworkers;
    bt_map workers_by_id; /* instance id -> fe_worker (event-plane load reports name workers by id) */
    LIST_HEAD(, fe_model) models;
    LIST_HEAD(, fe_req) reqs;
    size_t nreqs;
    bt_pool req_pool; /* ended requests' memory, for the next ones (common/pool.h says why) */
    uint64_t rr;
    uint64_t instance_id;
    bool shutting_down;
    bt_proc_signals sigs; /* shard 0's (bt_proc_signals_start) */
    uv_timer_t shutdown_timer;
    uv_timer_t trim_timer; /* memory back to the system once the process is idle */
    bool trim_inited;
    uint64_t trim_admitted; /* grp->admitted at the last idle tick (UINT64_MAX: busy at the last tick) */
    uint64_t trimmed_admitted; /* grp->admitted at the last trim */
    uint64_t shutdown_started_ms;
    uint64_t shutdown_close_deadline_ms; /* after shutdown_started_ms: stop waiting for connections */
    bt_buf scratch; /* reused for building SSE chunks */
    bt_buf access_line; /* reused for the access log's lines (access.c) */
    uint64_t disconnected_clients;
    uint64_t handed_off; /* streams handed to other frontends at the shutdown bound */
    uint64_t limit_rejections; /* requests refused by --max-concurrent-requests */
    /* requests refused before routing (400, 404) whose model no worker serves, or that name none:
     * one series, model FE_MODEL_UNKNOWN, so that clients cannot add series [api][streaming] */
    uint64_t refused_unknown[2][2];
    uint64_t requests_seen;
    uint64_t started_ms;
    int exit_code;
    bt_events *events;         /* the NATS event plane, NULL for direct */
    bt_proc_closer closer;     /* closes discovery and the event plane at the end of a shutdown */
    uint64_t events_unknown;   /* event-plane reports naming no known worker */
    char *rpc_secret; /* request-plane shared secret, NULL = none */
    fe_admit_policy *admit_policy; /* shard 0's, shared by every shard (admit.h) */
    fe_admit *admit;               /* this shard's admission queue (NULL before start, after stop) */
    fe_admit *admit_closing; /* stopped, its timer closing: freed by the close callback, or at teardown */
    fe_budget budget;              /* this shard's retry budget (budget.h) */
    bool window_logged; /* the end of the accept window was logged */
    /* shards.c: the other loops of this process (--threads) */
    fe_group *grp;
    int shard; /* index in grp->shard; 0 runs on the main thread and takes the signals */
    uv_thread_t thread;
    uv_async_t mail;
    uv_mutex_t mail_mu;
    STAILQ_HEAD(, fe_job) mail_jobs; /* under mail_mu; initialised by fe_mail_init */
    bool mail_inited, mail_closed;
    LIST_HEAD(, fe_gather) gathers; /* this shard's gathers still waiting for other shards */
    uint64_t resumes[FE_RESUME_N_]; /* resume.c: resume requests by outcome */
    LIST_HEAD(, fe_pending_resume) pending_resumes; /* resume.c: resumes waiting for another shard */
    LIST_HEAD(, fe_attempt) relays; /* attempts whose KV state is being written (workers.c) */
    uv_timer_t relay_timer;          /* paces them while any waits for room */
    /* Continuations waiting for a request-plane link under BT_RPC_BACKLOG_CONTINUATION (migrate.c),
     * oldest first, retried by link_timer while any waits: a few at a time, after link_woken. */
    TAILQ_HEAD(, fe_req) link_waits;
    size_t nlink_waits;
    uv_timer_t link_timer;
    bool link_woken;         /* a link drained, or a worker came or went, since the last retry */
    uint32_t link_idle_ticks; /* ticks since the last retry */
    /* The discovery grace (workers.c): fires at the earliest grace_until_ms of a worker in grace.
     * grace_workers: the workers in grace, in the order their graces began, which with one
     * --discovery-grace for all is the order they end (the head ends first), so a fleet whose keys
     * all vanish at once (etcd paused) costs O(1) a worker, never a scan of the fleet per event.
     * grace_counts: workers kept by it, and how each grace ended (fe_grace_result). */
    uv_timer_t grace_timer;
    TAILQ_HEAD(, fe_worker) grace_workers;
    size_t n_grace;
    uint64_t grace_counts[FE_GRACE_N_];
    /* Workers with REQUEST frames not yet written (workers.c, fe_worker_flush_soon): written
     * together at the end of this loop iteration's I/O (req_flush, a check handle), or before the
     * frames of a worker's read are handled, whichever comes first. */
    LIST_HEAD(, fe_worker) req_flush_list;
    uv_check_t req_flush;
    /* --stream-token-timeout (migrate.c, fe_token_sweep_start): one repeating timer per loop
     * checks every running attempt's t_heard_ms; token_sweep_ms is when it last ran (uv_now, low
     * 32 bits) */
    uv_timer_t token_sweep;
    uint32_t token_sweep_ms;
};

#define FE_MAX_THREADS 64

/* The shards of one frontend process. Everything here but the counters is written before the
 * threads start and only read afterwards. */
struct fe_group {
    int n;
    fe *shard[FE_MAX_THREADS];
    atomic_size_t nreqs; /* requests in flight in all shards (--max-concurrent-requests) */
    atomic_size_t nconns; /* client connections open in all shards (--max-connections) */
    atomic_size_t nbodies; /* request body bytes being received in all shards (--max-body-bytes-total) */
    atomic_size_t noutput; /* response bytes queued for clients in all shards (--max-output-bytes-total) */
    bt_http_output_peers *output_peers; /* each shard's largest backlog, for that total's cuts (n > 1) */
    atomic_uint_fast64_t admitted; /* requests ever admitted in all shards (the idle trim's clock) */
    atomic_int running;   /* threads of shards 1..n-1 whose loop has not ended */
    int64_t started_wall_s; /* Unix time the process started: "created" of /v1/models */
    fe_journal *journal;  /* the stream journal of the process (NULL = resumable streams off) */
    uint8_t mac_secret[32]; /* binds journal records to the caller's credential (random, per process) */
    /* resume.c: claims of journal records by resumes, counted; a resume that asks another shard to
     * end the request streaming its record names the count it saw, so that a newer resume is spared */
    atomic_uint_fast64_t claims;
};

/* workers.c */
/* Parses a discovery instance value (instance_id, transport.tcp "host:port", model.name and the
 * optional namespace, component, endpoint, model.total_kv_blocks, model.block_size,
 * model.context_length, model.max_token_bytes, model.exactness) into the identity fields of a zeroed w: id, transport,
 * model, ns, component, endpoint, total_blocks_card, block_size, context_length, max_token_bytes, exactness, host
 * and port (1..65535). Strings longer than their field are
 * cut. Nothing else of w is touched. False with a reason in err if the value is unusable. */
bool fe_parse_instance(const json_t *v, fe_worker *w, char *err, size_t errlen);
void fe_workers_start(fe *f);
/* Workers kept routable by their discovery grace now (workers.c). */
size_t fe_workers_in_grace(const fe *f);
void fe_workers_stop(fe *f);
/* A load report for worker `id` from the event plane; false if no such worker is known. */
bool fe_workers_apply_load(fe *f, uint64_t id, const bt_load_report *r);
/* Picks a worker for `model`, avoiding `avoid` when another is available. NULL if none. With
 * all_busy, busy workers (shedding thresholds) are skipped and *all_busy says whether that is why
 * none was found; without it (a migration: the request was admitted already) they are eligible.
 * exact (NULL or "" = any): only workers whose exactness fingerprint is that string. */
/* skip[0..nskip): workers never to take (a request's busy upstreams and the workers that refused its
 * continuation for their context, migrate.c); avoid: one taken only when no other is eligible (the
 * worker that failed last). need (0 = any): the context, in tokens, the attempt takes at least
 * (fe_request_context_need); a worker whose card advertises a smaller context_length is not taken,
 * one whose card says none is. */
fe_worker *fe_route(fe *f, fe_model *m, uint64_t avoid, const uint64_t *skip, size_t nskip, bool *all_busy,
                    const char *exact, uint64_t need);
/* For a continuation when every worker is busy: the routable worker with the smallest share of its
 * KV blocks in use (reported plus routed since), `avoid` only if it is the only one; only those of
 * fingerprint `exact` unless it is NULL or "", and whose context holds `need` (as fe_route), that
 * have not refused it (skip). A worker whose request-plane link holds BT_RPC_BACKLOG_BUSY unsent
 * bytes comes after every one whose link does not (the least backlogged first), and one holding
 * BT_RPC_BACKLOG_CONTINUATION is never chosen. NULL if none. */
fe_worker *fe_route_least_busy(fe_model *m, uint64_t avoid, const uint64_t *skip, size_t nskip, const char *exact,
                               uint64_t need);
/* Whether w's card says its context is too small for `need` tokens (an unknown one is not). */
bool fe_worker_context_short(const fe_worker *w, uint64_t need);
/* For a new request of priority `prio` when every worker of m is busy: a worker whose engine would
 * preempt a strictly less urgent running sequence for it (its fresh LOAD offers victims of a
 * priority value above prio, BT_LOAD_PREEMPT) and that has victims left once the requests already
 * sent past its busy verdict (preempt_pending) are counted; among those, the one whose victims are
 * the least urgent, then the one with the most left. NULL if none: the request waits or is refused
 * as before. Routable, not ejected workers only, whose context holds `need` (as fe_route). */
fe_worker *fe_route_preempt(fe *f, fe_model *m, int32_t prio, uint64_t need);
/* Attempt a was routed with fe_route_preempt: it counts in its worker's preempt_pending until
 * fe_attempt_preempt_done (its first token, or its end). */
void fe_attempt_preempt_start(fe_attempt *a);
void fe_attempt_preempt_done(fe_attempt *a);
bool fe_worker_routable(const fe_worker *w);
bool fe_worker_busy(const fe_worker *w, const fe_model *m);
/* Seconds a client should wait before retrying when every worker of m is busy (Retry-After). */
int fe_retry_after_s(fe *f, const fe_model *m);
void fe_worker_quarantine(fe_worker *w, const char *why);
/* Sends a REQUEST frame with `payload` for attempt a on w and files a under its new stream id;
 * est_tokens (prompt and output, estimated) counts towards w's pending KV blocks until its next
 * LOAD. Returns the stream id, or 0 if the connection is unusable. When a->kv_out holds a KV state
 * the REQUEST is held (a copy of payload) and written after the state's pieces, which go out paced
 * (docs/protocol.md, KV hand-off). */
uint32_t fe_worker_send_request(fe_worker *w, fe_attempt *a, const char *payload, size_t len, uint64_t est_tokens);
void fe_worker_send_cancel(fe_worker *w, uint32_t stream, bool kill);
/* The REQUEST just put in w's write buffer goes out with every other REQUEST this loop iteration
 * produces, in one write per worker: at the end of the iteration's I/O callbacks, or before the
 * frames of any worker's read are handled (a fan-out of an engine step never delays it). A burst of
 * client requests read in one iteration then reaches the worker in one read, so that its engine
 * can take them into one step, as it does with a burst sent straight to it. */
void fe_worker_flush_soon(fe_worker *w);
/* Writes every REQUEST fe_worker_flush_soon holds back on this loop. */
void fe_workers_flush_requests(fe *f);
/* The attempt's KV relay ends unfinished (its request ended, or it was killed): nothing more of it
 * is written, and its REQUEST never is. No-op for an attempt with nothing held. */
void fe_worker_relay_drop(fe_attempt *a);
void fe_worker_stream_done(fe_worker *w, uint32_t stream);
size_t fe_worker_inflight(const fe_worker *w);
fe_model *fe_model_get(fe *f, const char *name, bool create);

/* request.c */
/* Checks an OpenAI request body for `api` (types and ranges of the fields baton reads). Accepted:
 * an object with a string "model"; chat: "messages" a non-empty array of objects with a string
 * "role"; completions: "prompt" a string, one string in an array, or token ids in [0, 2^32).
 * U+0000 (the body is parsed with JSON_ALLOW_NUL) passes in free text only (content, prompt): a
 * field compared with fixed values (model, role, content part type, tool_choice, function_call) or
 * matched as a C string (stop) that holds it is refused. Otherwise false with a one-line reason in
 * err. Exposed for the fuzz driver. */
bool fe_validate_body(json_t *body, bt_api api, char *err, size_t errlen);
/* The same, and on a rejection *param names the offending field (NULL if none) and *code is the
 * OpenAI error code ("invalid_value", "unsupported_value", ...). param and code may be NULL; a
 * param that names an element ("messages.[2].role") lives in a per-thread buffer until the next
 * call on the same thread. */
bool fe_check_body(json_t *body, bt_api api, char *err, size_t errlen, const char **param, const char **code);
/* How a client's JSON body is parsed (an API request, a resume's re-POST, an admin POST): U+0000
 * inside strings kept (OpenAI accepts it), a key given twice refused (a proxy in front may read
 * the first where jansson keeps the last). The frontend's own stored bodies, written by
 * json_dumps, are read without the second: they cannot hold one. */
#define FE_BODY_JSON_FLAGS (JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES)
/* Writes an integral number given as a real (1.0) in an integer parameter (max_tokens, n, seed, ...)
 * back as that integer: fe_check_body does it first, and a resume's re-POST before its digest. */
void fe_body_integers(json_t *body);
void fe_request_start(fe *f, bt_http_req *http, bt_api api);
void fe_request_abort(fe *f, bt_http_req *http);
/* The one place a request's state changes; logs the change with its reason (debug level). */
void fe_req_set_state(fe_req *r, fe_req_state s, const char *reason);
const char *fe_req_state_name(fe_req_state s);
/* Output, for migrate.c: n new tokens reached the request from its current attempt at now_us
 * (the caller's bt_now_us: one clock read per token serves both); the attempt's finish; a request refused because every worker is busy (503 with Retry-After). */
void fe_request_deliver(fe_req *r, const uint32_t *ids, size_t n, const char *text, size_t len, uint64_t now_us);
/* What was delivered so far (for a continuation): the r->nids token ids and their text, wherever
 * they are kept; *text NULL when the text outgrew its cap (it is then not carried). */
void fe_request_output(const fe_req *r, const uint32_t **ids, const char **text, size_t *text_len);
/* The context, in tokens, r's next attempt takes at least, as far as the frontend can count without
 * a tokenizer (the check before the first routing, request.c, counts the same way): the prompt's
 * tokens when it is token ids (or the least a text prompt can be, when the workers tell their
 * longest token), the carried ones, and what is left of max_tokens (one token without it); and
 * more than the context of a worker that refused it for its length (context_floor). */
uint64_t fe_request_context_need(const fe_req *r);
/* usage_unreported: the FINISH said its counts are not the model server's (BT_FINISH_F_USAGE_UNREPORTED) */
void fe_request_finish(fe_req *r, uint8_t reason, uint32_t prompt_tokens, uint32_t completion_tokens,
                       bool usage_unreported);
void fe_request_reject_busy(fe_req *r);
/* Refuses a request that has not started (no attempt, no header sent): `status` with Retry-After
 * and an OpenAI error body; counted as rejected. r is freed on return. */
void fe_request_refuse(fe_req *r, int status, const char *code, int retry_after_s, const char *msg);
/* Ends a request whose context is stopped or killed and that has no attempt running. */
void fe_request_end_cancelled(fe_req *r);
/* A new request with the given identity, admitted and linked (the caller dispatches it or ends
 * it); NULL when over --max-concurrent-requests or out of memory (then http has been answered).
 * Takes body. created: the chunks' "created" (0 = now). */
fe_req *fe_request_new(fe *f, bt_http_req *http, bt_api api, json_t *body, const char *rid, fe_model *m,
                       int64_t created);
/* Resume (resume.c): appends one replayed token event to b, with its id (pos = the position
 * after it; role = it was the stream's first event). */
void fe_request_write_replayed(fe_req *r, bt_buf *b, const uint32_t *ids, size_t n, const char *text, size_t len,
                               uint32_t pos, bool role);
/* Ends a resumed request whose record had ended (tail): the events after `mark` (an FE_MARK_*),
 * then the end of the response; r is freed. */
void fe_request_replay_tail(fe_req *r, const fe_jtail *tail, int mark);
/* Starts the SSE response of r: 200 with X-Request-Id, and X-Stream-Id when it is journaled. */
void fe_request_begin_stream(fe_req *r);
/* Ends a running request at once with an error the client can read; r is freed. */
void fe_request_fail(fe_req *r, bt_status code, const char *msg);
/* Operator cancel: stop (graceful) or kill. Returns false if no such request. */
/* caller: only requests with this tag (fe_caller_tag) are cancelled; NULL: any (the operator). */
bool fe_request_cancel_by_id(fe *f, const char *rid, bool kill, const uint8_t *caller);
/* The caller of a request or of a cancel, as far as the frontend can tell callers apart: the
 * first FE_CALLER_LEN bytes of SHA-256 of the X-Tenant header under --trust-tenant-header (the
 * gateway in front says who the caller is; no header hashes as an empty one), zeros otherwise.
 * Without it every holder of the one --api-key (everyone, without a key) is the same caller. */
void fe_caller_tag(const fe *f, const bt_http_req *http, uint8_t out[FE_CALLER_LEN]);
/* Answers with OpenAI's error shape {"error":{"message","type","param","code"}}: `code` is a
 * string such as "model_not_found" (NULL gives null), the type follows from the status
 * (fe_error_type). rid may be NULL. */
/* access.c: the --access-log (one per process, shared by the shards). fe_access_start takes l
 * (NULL: no access log) before any shard runs; fe_access_stop closes it after every shard ended. */
#define FE_ACCESS_LOG_BUFFER ((size_t)4 << 20) /* bytes of lines waiting for the writer thread */
#define FE_ACCESS_LINE_MAX 8192 /* a line's fields are cut below it; one past it is counted as dropped */
void fe_access_start(bt_linelog *l);
void fe_access_stop(void);
bool fe_access_on(void);
/* The line of an inference request as it ends (req_done, before its ticket is freed). */
void fe_access_request(const fe_req *r, fe_outcome out);
/* The line of an API request answered without being made a request (no fe_req): a refusal, with
 * its error body's status and code, or a resume that had nothing left to send (204). rid NULL:
 * the client's X-Request-Id if any. */
void fe_access_answer(const bt_http_req *http, const char *rid, int status, const char *code);
/* Lines dropped since start (the writer fell behind, or writing failed), for /metrics. */
uint64_t fe_access_dropped(void);
uint64_t fe_access_written(void);

/* A client's X-Request-Id this frontend takes as the request's id: 1 to RID_MAX of letters, digits,
 * - _ . : (it goes into a response header and the logs as it is). */
bool fe_valid_rid(const char *s);

void fe_json_error(bt_http_req *http, const char *rid, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
/* The same with the offending parameter (NULL gives null) and extra header lines (each ending in
 * "\r\n", or NULL). */
void fe_json_error_ex(bt_http_req *http, const char *rid, int status, const char *code, const char *param,
                      const char *headers, const char *fmt, ...) __attribute__((format(printf, 7, 8)));
/* OpenAI's error type for an HTTP status: "invalid_request_error" for 4xx, "server_error" for 5xx,
 * "cancelled" for 499 (a request cancelled by the operator). */
const char *fe_error_type(int status);
/* Appends {"error":{"message","type","param","code"}} to b (code and param NULL give null). */
void fe_error_body(bt_buf *b, int status, const char *code, const char *param, const char *msg);

/* migrate.c */
/* Starts the request's next attempt on a routable worker (the first, or a continuation carrying
 * every token delivered), or ends the request when there is none or it was cancelled. */
void fe_migrate_dispatch(fe_req *r);
/* r leaves the continuations waiting for link room (migrate.c), if it was there: at its end. */
void fe_migrate_unwait(fe_req *r);
/* A request-plane link drained below BT_RPC_BACKLOG_CONTINUATION, or a worker's connection opened
 * or closed: continuations waiting for link room are retried at the next tick. */
void fe_migrate_link_wake(fe *f);
/* Frames of an attempt's stream, from the worker connection. on_finish and on_error end the
 * attempt (it is detached from its worker and freed); on_error decides whether the request
 * migrates (a migratable error, budget left, not cancelled) or ends. */
void fe_attempt_on_tokens(fe_attempt *a, const uint32_t *ids, size_t n, const char *text, size_t len);
/* A hint, no effect on state (request.c): starts loading, in stages that overlap the cache misses
 * of all n, what the next tokens of these attempts will touch (attempt, request, its buffers,
 * client connection, journal record). NULL entries are skipped. */
void fe_attempts_prefetch(fe_attempt *const *as, size_t n);
void fe_attempt_on_finish(fe_attempt *a, uint8_t reason, uint32_t prompt_tokens, uint32_t completion_tokens,
                          bool usage_unreported);
void fe_attempt_on_error(fe_attempt *a, bt_status code, const char *msg);
/* A KVSTATE piece on the attempt's stream (its worker is giving the stream back). */
void fe_attempt_on_kvstate(fe_attempt *a, uint64_t total, uint64_t offset, const uint8_t *data, size_t len);
void fe_kv_free(fe_kv *k);
/* The request ended while a was running: KILL its stream (once), detach it, free it. */
void fe_attempt_abandon(fe_attempt *a);
/* The request is handed off to another frontend (shutdown): a is detached and freed with no KILL. */
void fe_attempt_release(fe_attempt *a);
/* --stream-token-timeout: starts f's sweep (a no-op when the option is 0). Every running attempt
 * of the loop that has heard nothing of its stream for that long is given up, unless its worker's
 * engine keeps it waiting (a queued or preempted sequence is not a lost one): told by a WAITING
 * frame for the stream, while that worker sends tokens for other streams and no LOAD since the
 * WAITING has shown nothing waiting; or, from a worker that does not send those frames (no
 * BT_HELLO_WAITING), while its last load report shows sequences waiting. Its worker gets a KILL for the stream, and the request
 * migrates as after a worker's failure (BT_ERR_TIMEOUT), charged to its budget; when no other
 * worker could take the continuation, the worker is not quarantined and the continuation goes back
 * to it. The timer is f->token_sweep, initialised by the caller and closed with
 * the loop's handles. */
void fe_token_sweep_start(fe *f);

/* resume.c */
/* A POST with Last-Event-ID: the same request again, resumed after that event. */
void fe_resume_post(fe *f, bt_http_req *http, bt_api api);
/* GET /v1/chat/completions/{stream_id} or /v1/completions/{stream_id}: the EventSource form. */
void fe_resume_get(fe *f, bt_http_req *http, bt_api api, const char *stream_id);
/* True if http was a resume waiting for another shard, which is now dropped (its client left). */
bool fe_resume_abort(fe *f, bt_http_req *http);
/* The client's write backlog drained: a replay in progress writes its next events. */
void fe_resume_on_drain(fe *f, bt_http_req *http);
/* Parses an event id "<stream id>:<position>[:end|:usage|:done|:error]" (what the frontend
 * writes in `id:` lines). *mark is 0 for a token event, else FE_MARK_*. Exposed for the unit test. */
enum { FE_MARK_NONE = 0, FE_MARK_END, FE_MARK_USAGE, FE_MARK_DONE, FE_MARK_ERROR };
bool fe_resume_parse_id(const char *s, char sid[FE_STREAM_ID_LEN + 1], uint64_t *pos, int *mark);
/* The caller's credential bound into a journal record: HMAC-SHA256 of its Authorization header
 * under the process's secret when --api-key is set, zeros otherwise. */
void fe_key_mac(fe *f, const bt_http_req *http, uint8_t out[FE_KEY_MAC_LEN]);
/* The key of "Authorization: Bearer KEY" (the scheme in any case, RFC 9110 §11.1, one or more
 * spaces after it) and its length, or NULL when there is none: the one reading of the header for
 * the API key check, tenant labels and the journal's credential MAC. */
const char *fe_bearer_key(const bt_http_req *http, size_t *len);
/* SHA-256, in hex, of body as canonical JSON (sorted keys, compact); false when out of memory. */
bool fe_body_digest(const json_t *body, char out[65]);
/* The same of a body already in canonical form (len bytes). */
void fe_body_digest_canon(const char *canon, size_t len, char out[65]);
/* Journal metrics (shard 0 only: the journal is the process's). */
void fe_resume_collect(fe *f, bt_metrics *r); /* resumable streams and their journal */
/* Ends request r, which streams a record a resume wants: its client is taken to be gone. */
void fe_request_supersede(fe_req *r);
/* Shutdown bound reached: if r is a stream journaled in a shared journal, ends its response
 * cleanly without [DONE] (the client resumes it on another frontend with Last-Event-ID), leaves
 * its worker stream running to be re-attached, frees r and returns true; false otherwise. */
bool fe_request_hand_off(fe_req *r);

/* shards.c */
void fe_mail_init(fe *f);
/* Runs fn(to, arg) on shard `to`'s loop. False if that shard has stopped taking jobs (it is
 * exiting); then fn never runs and arg is the caller's to free. */
bool fe_shard_post(fe *to, void (*fn)(fe *f, void *arg), void *arg);
void fe_mail_close(fe *f);
void fe_mail_destroy(fe *f);
/* /metrics of the whole process: this shard's registry merged with every other shard's. */
void fe_shards_metrics(fe *f, bt_http_req *http);
/* Operator cancel of request `rid` on whichever shards hold it; answers http. */
void fe_shards_cancel(fe *f, bt_http_req *http, const char *rid, bool kill, const uint8_t *caller);
/* The thresholds of m were changed on f: the same change on every other shard. */
void fe_shards_set_threshold(fe *f, const fe_model *m, bool set_decode, bool set_prefill);
/* f (shard 0) began shutting down: the others begin the same shutdown. */
void fe_shards_shutdown(fe *f);
/* True if http was waiting for a gather, which then answers no one. */
bool fe_gather_abort(fe *f, bt_http_req *http);
/* Merges n shards' registries by each family's rule and renders the result into out (exposed for
 * the unit test). Not BT_OK if a part is NULL or failed, or the text did not fit: nothing to send. */
bt_status fe_metrics_merge(bt_metrics *const *parts, int n, bt_buf *out);
/* Takes a place under --max-concurrent-requests (process-wide); false at the limit. */
bool fe_reqs_reserve(fe *f);
void fe_reqs_release(fe *f);

/* frontend.c */
void fe_cancel_respond(bt_http_req *http, const char *rid, bool kill, bool found);
/* Begins the shutdown sequence on f as if its signal had arrived at started_ms. */
void fe_shutdown_begin(fe *f, uint64_t started_ms);

/* metrics.c */
void fe_hist_observe(fe_hist *h, double seconds);
/* n observations of the same value (a batch of tokens that arrived together) */
void fe_hist_observe_n(fe_hist *h, double seconds, uint64_t n);
/* Adds this shard's families and samples to r (a snapshot, for one scrape). */
void fe_metrics_collect(fe *f, bt_metrics *r);

#endif
