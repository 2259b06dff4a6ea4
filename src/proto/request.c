/* request.c — the REQUEST payload codec (see request.h for the format). jansson does the JSON
 * (the frontend's usual payload, a body given serialized, is written directly, to the same bytes);
 * this file fixes the members, their types and ranges in one place for both ends. */
#include "proto/request.h"

#include "common/jcanon.h"
#include "common/jstr.h"
#include "proto/proto.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool ascii(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80) return false;
    return true;
}

/* The payload written directly, for a body given serialized and strings of ASCII only (then
 * jansson could not refuse any of them as invalid UTF-8): the bytes of the jansson path below,
 * the members in its order (its objects keep insertion order), strings escaped as it escapes them
 * (common/jcanon.h), integers in decimal. A first attempt's payload is one buffer and a few
 * appends instead of a jansson object built, dumped and spliced (~20,000 instructions). NULL when
 * out of memory; *fallback when the jansson path must do it. */
static char *encode_direct(const bt_request *rq, size_t *len, bool *fallback) {
    *fallback = true;
    size_t rid_len = strlen(rq->request_id);
    size_t key_len = rq->stream_key ? strlen(rq->stream_key) : 0;
    size_t ex_len = rq->exactness ? strlen(rq->exactness) : 0;
    if (!ascii(rq->request_id, rid_len) || !ascii(rq->stream_key, key_len) || !ascii(rq->exactness, ex_len) ||
        (rq->carried_text && !ascii(rq->carried_text, rq->carried_text_len)))
        return NULL;
    *fallback = false;
    bt_buf b;
    bt_buf_init(&b, (size_t)1 << 31);
    /* one reserve for the usual payload: body, id, a few numbers; the rest grows as needed */
    bt_buf_reserve(&b, rq->body_json_len + rid_len + key_len + ex_len + rq->carried_text_len + 11 * rq->n_carried + 256);
    bt_buf_append(&b, "{\"body\":", 8);
    bt_buf_append(&b, rq->body_json, rq->body_json_len);
    bt_buf_append(&b, ",\"request_id\":", 14);
    bt_jcanon_str(&b, rq->request_id, rid_len);
    bt_buf_append_str(&b, rq->api == BT_API_CHAT ? ",\"api\":\"chat\",\"carried\":[" : ",\"api\":\"completion\",\"carried\":[");
    for (size_t i = 0; i < rq->n_carried; i++) {
        if (i) bt_buf_append(&b, ",", 1);
        bt_buf_append_i64(&b, rq->carried[i]);
    }
    bt_buf_append(&b, "]", 1);
    if (rq->has_max_tokens) {
        bt_buf_append(&b, ",\"max_tokens\":", 14);
        bt_buf_append_i64(&b, rq->max_tokens);
    }
    if (rq->seed) {
        bt_buf_append(&b, ",\"seed\":", 8);
        bt_buf_append_i64(&b, (int64_t)rq->seed); /* as json_integer((json_int_t)seed) */
    }
    if (rq->carried_text) {
        bt_buf_append(&b, ",\"carried_text\":", 16);
        bt_jcanon_str(&b, rq->carried_text, rq->carried_text_len);
    }
    if (rq->priority) {
        bt_buf_append(&b, ",\"priority\":", 12);
        bt_buf_append_i64(&b, rq->priority);
    }
    if (rq->stream_key) {
        bt_buf_append(&b, ",\"stream_key\":", 14);
        bt_jcanon_str(&b, rq->stream_key, key_len);
        if (rq->adopt) bt_buf_append(&b, ",\"adopt\":true", 13);
    }
    if (rq->kv_state_bytes) {
        bt_buf_append(&b, ",\"kv_state_bytes\":", 18);
        bt_buf_append_i64(&b, (int64_t)rq->kv_state_bytes);
    }
    if (rq->exactness && rq->exactness[0]) {
        bt_buf_append(&b, ",\"exactness\":", 13);
        bt_jcanon_str(&b, rq->exactness, ex_len);
    }
    bt_buf_append(&b, "}", 1);
    if (bt_buf_status(&b) != BT_OK) {
        bt_buf_free(&b);
        return NULL;
    }
    return bt_buf_steal(&b, len);
}

char *bt_request_encode(const bt_request *rq, size_t *len) {
    if (rq->body_json && rq->request_id) {
        bool fallback;
        size_t n = 0;
        char *p = encode_direct(rq, &n, &fallback);
        if (!fallback) {
            if (p && len) *len = n;
            return p;
        }
    }
    char *out = NULL;
    json_t *carried = json_array();
    json_t *msg = json_object();
    if (!carried || !msg) goto done;
    for (size_t i = 0; i < rq->n_carried; i++)
        if (json_array_append_new(carried, json_integer(rq->carried[i])) != 0) goto done;
    if (json_object_set_new(msg, "request_id", json_string(rq->request_id)) != 0 ||
        json_object_set_new(msg, "api", json_string(rq->api == BT_API_CHAT ? "chat" : "completion")) != 0 ||
        (!rq->body_json && json_object_set(msg, "body", (json_t *)rq->body) != 0) ||
        json_object_set(msg, "carried", carried) != 0)
        goto done;
    if (rq->has_max_tokens && json_object_set_new(msg, "max_tokens", json_integer(rq->max_tokens)) != 0) goto done;
    if (rq->seed && json_object_set_new(msg, "seed", json_integer((json_int_t)rq->seed)) != 0) goto done;
    if (rq->carried_text &&
        json_object_set_new(msg, "carried_text", json_stringn(rq->carried_text, rq->carried_text_len)) != 0)
        goto done;
    if (rq->priority && json_object_set_new(msg, "priority", json_integer(rq->priority)) != 0) goto done;
    if (rq->stream_key && json_object_set_new(msg, "stream_key", json_string(rq->stream_key)) != 0) goto done;
    if (rq->stream_key && rq->adopt && json_object_set_new(msg, "adopt", json_true()) != 0) goto done;
    if (rq->kv_state_bytes &&
        json_object_set_new(msg, "kv_state_bytes", json_integer((json_int_t)rq->kv_state_bytes)) != 0)
        goto done;
    if (rq->exactness && rq->exactness[0] && json_object_set_new(msg, "exactness", json_string(rq->exactness)) != 0)
        goto done;
    out = json_dumps(msg, JSON_COMPACT);
    if (out && rq->body_json) {
        /* the body goes in as given, spliced in as the first member: {"body":<body_json>,<rest> */
        static const char head[] = "{\"body\":";
        size_t rest = strlen(out); /* "{...}", never empty: request_id is always there */
        size_t n = sizeof head - 1 + rq->body_json_len + 1 + (rest - 1);
        char *whole = malloc(n + 1);
        if (whole) {
            char *p = whole;
            memcpy(p, head, sizeof head - 1);
            p += sizeof head - 1;
            memcpy(p, rq->body_json, rq->body_json_len);
            p += rq->body_json_len;
            *p++ = ',';
            memcpy(p, out + 1, rest - 1); /* the members after "{", and the closing "}" */
            p += rest - 1;
            *p = '\0';
        }
        free(out);
        out = whole;
        if (out && len) *len = n;
    } else if (out && len) {
        *len = strlen(out);
    }
done:
    json_decref(carried);
    json_decref(msg);
    return out;
}

#define FAIL(...)                                                                                                      \
    do {                                                                                                               \
        snprintf(err, errlen, __VA_ARGS__);                                                                            \
        st = BT_ERR_INVALID;                                                                                           \
        goto fail;                                                                                                     \
    } while (0)

bt_status bt_request_decode(const void *payload, size_t len, bt_request_msg *out, char *err, size_t errlen) {
    bt_status st = BT_OK;
    memset(out, 0, sizeof *out);
    json_error_t jerr;
    json_t *root = json_loadb(payload, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    uint32_t *carried = NULL;
    if (!root) FAIL("malformed request payload: %s", jerr.text);
    if (!json_is_object(root)) FAIL("malformed request payload: not an object");
    json_t *rid = json_object_get(root, "request_id");
    json_t *api = json_object_get(root, "api");
    json_t *body = json_object_get(root, "body");
    json_t *jcar = json_object_get(root, "carried");
    json_t *jmax = json_object_get(root, "max_tokens");
    json_t *jtext = json_object_get(root, "carried_text");
    json_t *jseed = json_object_get(root, "seed");
    json_t *jprio = json_object_get(root, "priority");
    json_t *jkey = json_object_get(root, "stream_key");
    json_t *jadopt = json_object_get(root, "adopt");
    json_t *jkv = json_object_get(root, "kv_state_bytes");
    json_t *jexact = json_object_get(root, "exactness");
    if (!json_is_string(rid) || json_string_length(rid) == 0 || json_string_length(rid) > BT_REQUEST_ID_MAX ||
        bt_jstr_has_nul(rid))
        FAIL("malformed request payload: request_id must be a string of 1 to %d bytes", BT_REQUEST_ID_MAX);
    /* by length: the payload is parsed with JSON_ALLOW_NUL, and "chat\u0000x" is not "chat" */
    bool chat = bt_jstr_is(api, "chat");
    if (!chat && !bt_jstr_is(api, "completion"))
        FAIL("malformed request payload: api must be \"chat\" or \"completion\"");
    if (!json_is_object(body)) FAIL("malformed request payload: body must be an object");
    if (jcar && !json_is_array(jcar)) FAIL("malformed request payload: carried must be an array");
    if (jmax && (!json_is_integer(jmax) || json_integer_value(jmax) < 0))
        FAIL("malformed request payload: max_tokens must be an integer >= 0");
    if (jtext && !json_is_string(jtext)) FAIL("malformed request payload: carried_text must be a string");
    if (jseed && (!json_is_integer(jseed) || json_integer_value(jseed) <= 0))
        FAIL("malformed request payload: seed must be a positive integer");
    if (jprio && (!json_is_integer(jprio) || json_integer_value(jprio) < -BT_PRIORITY_LIMIT ||
                  json_integer_value(jprio) > BT_PRIORITY_LIMIT))
        FAIL("malformed request payload: priority must be an integer from %d to %d", -BT_PRIORITY_LIMIT,
             BT_PRIORITY_LIMIT);
    if (jkey) {
        const char *k = json_string_value(jkey);
        bool ok = k && json_string_length(jkey) == BT_STREAM_KEY_LEN;
        for (size_t i = 0; ok && i < BT_STREAM_KEY_LEN; i++)
            ok = (k[i] >= '0' && k[i] <= '9') || (k[i] >= 'a' && k[i] <= 'f');
        if (!ok) FAIL("malformed request payload: stream_key must be %d lower-case hex digits", BT_STREAM_KEY_LEN);
    }
    if (jadopt && !json_is_boolean(jadopt)) FAIL("malformed request payload: adopt must be a boolean");
    if (json_is_true(jadopt) && !jkey) FAIL("malformed request payload: adopt needs a stream_key");
    if (jkv && (!json_is_integer(jkv) || json_integer_value(jkv) < 1 ||
                (uint64_t)json_integer_value(jkv) > BT_KV_STATE_MAX))
        FAIL("malformed request payload: kv_state_bytes must be an integer from 1 to %" PRIu64, BT_KV_STATE_MAX);
    if (jexact &&
        (!json_is_string(jexact) || json_string_length(jexact) == 0 || json_string_length(jexact) > BT_EXACTNESS_MAX ||
         bt_jstr_has_nul(jexact)))
        FAIL("malformed request payload: exactness must be a string of 1 to %d bytes", BT_EXACTNESS_MAX);
    size_t n = jcar ? json_array_size(jcar) : 0;
    if (n) {
        carried = malloc(n * sizeof *carried);
        if (!carried) {
            snprintf(err, errlen, "out of memory");
            st = BT_ERR_NOMEM;
            goto fail;
        }
        for (size_t i = 0; i < n; i++) {
            json_t *v = json_array_get(jcar, i);
            if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > UINT32_MAX)
                FAIL("malformed request payload: carried token %zu is not a token id", i);
            carried[i] = (uint32_t)json_integer_value(v);
        }
    }
    out->root = root;
    out->carried = carried;
    out->rq.request_id = json_string_value(rid);
    out->rq.api = chat ? BT_API_CHAT : BT_API_COMPLETION;
    out->rq.body = body;
    out->rq.carried = carried;
    out->rq.n_carried = n;
    out->rq.has_max_tokens = jmax != NULL;
    out->rq.max_tokens = jmax ? json_integer_value(jmax) : 0;
    out->rq.seed = jseed ? (uint64_t)json_integer_value(jseed) : 0;
    out->rq.priority = jprio ? (int32_t)json_integer_value(jprio) : 0;
    out->rq.stream_key = jkey ? json_string_value(jkey) : NULL;
    out->rq.adopt = json_is_true(jadopt);
    out->rq.kv_state_bytes = jkv ? (uint64_t)json_integer_value(jkv) : 0;
    out->rq.exactness = jexact ? json_string_value(jexact) : NULL;
    if (jtext) {
        out->rq.carried_text = json_string_value(jtext);
        out->rq.carried_text_len = json_string_length(jtext);
    }
    return BT_OK;
fail:
    free(carried);
    json_decref(root);
    return st;
}

void bt_request_msg_free(bt_request_msg *m) {
    if (!m) return;
    free(m->carried);
    json_decref(m->root);
    memset(m, 0, sizeof *m);
}
