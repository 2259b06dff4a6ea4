/* fuzz_request.c — libFuzzer driver for the REQUEST payload codec (src/proto/request.c).
 *
 * Treats the input as a REQUEST frame's payload from a peer. A payload the decoder accepts is
 * checked against the format's contract (request_id 1..BT_REQUEST_ID_MAX bytes with no NUL, a known
 * api, an object body, carried ids, max_tokens and priority in range, an exactness fingerprint of
 * 1..BT_EXACTNESS_MAX bytes with no NUL) and must survive a round trip: encoded
 * again and decoded, it gives the same request. A refused one must come with a reason and leave
 * nothing to free. A violated invariant aborts, so libFuzzer reports it like a crash. Seeds are in
 * fuzz/corpus/request/; build and run with fuzz/build.sh. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto/request.h"

#include "check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    bt_request_msg m;
    char err[256] = "";
    bt_status st = bt_request_decode(data, size, &m, err, sizeof err);
    if (st != BT_OK) {
        CHECK(st == BT_ERR_INVALID || st == BT_ERR_NOMEM);
        CHECK(err[0] != '\0');
        CHECK(m.root == NULL && m.carried == NULL);
        return 0;
    }
    const bt_request *rq = &m.rq;
    size_t idl = strlen(rq->request_id);
    CHECK(idl >= 1 && idl <= BT_REQUEST_ID_MAX);
    CHECK(rq->api == BT_API_CHAT || rq->api == BT_API_COMPLETION);
    CHECK(json_is_object(rq->body));
    CHECK(!rq->has_max_tokens || rq->max_tokens >= 0);
    CHECK((rq->n_carried == 0) == (rq->carried == NULL));
    CHECK(rq->priority >= -BT_PRIORITY_LIMIT && rq->priority <= BT_PRIORITY_LIMIT);
    CHECK(!rq->exactness || (strlen(rq->exactness) >= 1 && strlen(rq->exactness) <= BT_EXACTNESS_MAX));
    size_t len = 0;
    char *p = bt_request_encode(rq, &len);
    CHECK(p != NULL);
    bt_request_msg m2;
    CHECK(bt_request_decode(p, len, &m2, err, sizeof err) == BT_OK);
    CHECK(strcmp(m2.rq.request_id, rq->request_id) == 0);
    CHECK(m2.rq.api == rq->api);
    CHECK(json_equal((json_t *)m2.rq.body, (json_t *)rq->body));
    CHECK(m2.rq.n_carried == rq->n_carried);
    CHECK(rq->n_carried == 0 || memcmp(m2.rq.carried, rq->carried, rq->n_carried * sizeof *rq->carried) == 0);
    CHECK(m2.rq.has_max_tokens == rq->has_max_tokens && m2.rq.max_tokens == rq->max_tokens);
    CHECK(m2.rq.seed == rq->seed);
    CHECK(rq->seed == 0 || rq->seed <= (uint64_t)INT64_MAX);
    CHECK(m2.rq.priority == rq->priority);
    CHECK((m2.rq.exactness == NULL) == (rq->exactness == NULL));
    CHECK(!rq->exactness || strcmp(m2.rq.exactness, rq->exactness) == 0);
    CHECK((m2.rq.carried_text == NULL) == (rq->carried_text == NULL));
    CHECK(!rq->carried_text || (m2.rq.carried_text_len == rq->carried_text_len &&
                                memcmp(m2.rq.carried_text, rq->carried_text, rq->carried_text_len) == 0));
    bt_request_msg_free(&m2);
    free(p);
    bt_request_msg_free(&m);
    return 0;
}
