/* params.c — reading and checking the generation fields of params.h, once for every engine. */
#include "engine/params.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "common/jstr.h"

/* No completion is longer (the frontend's bound on max_tokens is the same). */
#define GP_MAX_TOKENS 1000000

static bool given(const json_t *v) { return v && !json_is_null(v); }

#define FAIL(prm, cd, ...)                                                                                             \
    do {                                                                                                               \
        snprintf(err, errlen, __VA_ARGS__);                                                                            \
        *param = (prm);                                                                                                \
        *code = (cd);                                                                                                  \
        return false;                                                                                                  \
    } while (0)

bool bt_gen_params_check(const json_t *body, const char **param, const char **code, char *err, size_t errlen) {
    json_t *mp = json_object_get(body, "min_p");
    if (given(mp) && !json_is_number(mp)) FAIL("min_p", "invalid_type", "'min_p' must be a number from 0 to 1");
    if (given(mp) && !(json_number_value(mp) >= 0 && json_number_value(mp) <= 1))
        FAIL("min_p", "invalid_value", "'min_p' must be a number from 0 to 1");
    json_t *rp = json_object_get(body, "repetition_penalty");
    if (given(rp) && !json_is_number(rp))
        FAIL("repetition_penalty", "invalid_type", "'repetition_penalty' must be a number greater than 0");
    /* vLLM's range; 1e6 keeps x / penalty and x * penalty finite for any finite logit that matters */
    if (given(rp) && !(json_number_value(rp) > 0 && json_number_value(rp) <= 1e6))
        FAIL("repetition_penalty", "invalid_value",
             "'repetition_penalty' must be a number greater than 0 (at most 1e6)");
    const char *bools[] = {"ignore_eos", "continue_final_message"};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(body, bools[i]);
        if (given(v) && !json_is_boolean(v)) FAIL(bools[i], "invalid_type", "'%s' must be a boolean", bools[i]);
    }
    json_t *mt = json_object_get(body, "min_tokens");
    if (given(mt) && !json_is_integer(mt))
        FAIL("min_tokens", "invalid_type", "'min_tokens' must be an integer from 0 to max_tokens");
    if (json_is_integer(mt) && (json_integer_value(mt) < 0 || json_integer_value(mt) > GP_MAX_TOKENS))
        FAIL("min_tokens", "invalid_value", "'min_tokens' must be an integer from 0 to %d", GP_MAX_TOKENS);
    /* vLLM's: honoured (stop_token_ids) or refused by the engines, their form checked here */
    json_t *sti = json_object_get(body, "stop_token_ids");
    if (given(sti)) {
        size_t i;
        json_t *v;
        if (!json_is_array(sti))
            FAIL("stop_token_ids", "invalid_type", "'stop_token_ids' must be an array of token ids");
        json_array_foreach(sti, i, v) {
            if (!json_is_integer(v))
                FAIL("stop_token_ids", "invalid_type", "'stop_token_ids' must be an array of token ids");
            if (json_integer_value(v) < 0 || json_integer_value(v) > UINT32_MAX)
                FAIL("stop_token_ids", "invalid_value", "'stop_token_ids' must hold token ids from 0 to %u",
                     UINT32_MAX);
        }
        if (json_array_size(sti) > BT_GP_MAX_STOP_IDS)
            FAIL("stop_token_ids", "invalid_value", "'stop_token_ids' holds at most %d token ids",
                 BT_GP_MAX_STOP_IDS);
    }
    json_t *isio = json_object_get(body, "include_stop_str_in_output");
    if (given(isio) && !json_is_boolean(isio))
        FAIL("include_stop_str_in_output", "invalid_type", "'include_stop_str_in_output' must be a boolean");
    json_t *bw = json_object_get(body, "bad_words");
    if (given(bw)) {
        bool strings = json_is_array(bw);
        size_t i;
        json_t *v;
        json_array_foreach(bw, i, v) strings = strings && json_is_string(v);
        if (!strings) FAIL("bad_words", "invalid_type", "'bad_words' must be an array of strings");
    }
    json_t *tpt = json_object_get(body, "truncate_prompt_tokens");
    if (given(tpt) && !json_is_integer(tpt))
        FAIL("truncate_prompt_tokens", "invalid_type", "'truncate_prompt_tokens' must be an integer");
    if (json_is_integer(tpt) && json_integer_value(tpt) < 1 && json_integer_value(tpt) != -1)
        FAIL("truncate_prompt_tokens", "invalid_value", "'truncate_prompt_tokens' must be -1 or at least 1");
    const char *limits[] = {"max_tokens", "max_completion_tokens"};
    for (int i = 0; i < 2 && json_is_integer(mt); i++) {
        json_t *lim = json_object_get(body, limits[i]);
        if (json_is_integer(lim) && json_integer_value(mt) > json_integer_value(lim))
            FAIL("min_tokens", "invalid_value",
                 "'min_tokens' must be at most '%s' (%" JSON_INTEGER_FORMAT "), got %" JSON_INTEGER_FORMAT, limits[i],
                 json_integer_value(lim), json_integer_value(mt));
    }
    return true;
}

/* The fields whose output the engines cannot give: BT_OK, or the refusal with err set. */
static bt_status refuse_unsupported(const json_t *body, char *err, size_t errlen) {
    json_t *rf = json_object_get(body, "response_format");
    if (given(rf)) {
        json_t *type = json_object_get(rf, "type");
        if (!json_is_object(rf) || !json_is_string(type))
            return snprintf(err, errlen, "'response_format' must be an object with a string 'type'"),
                   BT_ERR_INVALID_PARAM;
        if (!bt_jstr_is(type, "text"))
            return snprintf(err, errlen,
                            "'response_format' of type '%.64s' is not supported by this engine: it generates plain "
                            "text only (\"text\")",
                            json_string_value(type)),
                   BT_ERR_UNSUPPORTED_PARAM;
    }
    /* vLLM's guided decoding, old and new spellings: constrained output the engines cannot give */
    static const char *const guided[] = {"guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                         "structured_outputs"};
    for (size_t i = 0; i < sizeof guided / sizeof guided[0]; i++)
        if (given(json_object_get(body, guided[i])))
            return snprintf(err, errlen, "'%s' is not supported by this engine: it has no guided decoding", guided[i]),
                   BT_ERR_UNSUPPORTED_PARAM;
    json_t *mod = json_object_get(body, "modalities");
    if (given(mod)) {
        bool strings = json_is_array(mod);
        size_t i;
        json_t *v;
        json_array_foreach(mod, i, v) strings = strings && json_is_string(v);
        if (!strings) return snprintf(err, errlen, "'modalities' must be an array of strings"), BT_ERR_INVALID_PARAM;
        if (json_array_size(mod) != 1 || !bt_jstr_is(json_array_get(mod, 0), "text"))
            return snprintf(err, errlen, "'modalities' other than [\"text\"] are not supported by this engine"),
                   BT_ERR_UNSUPPORTED_PARAM;
    }
    if (given(json_object_get(body, "audio")))
        return snprintf(err, errlen, "'audio' is not supported by this engine: it generates text only"),
               BT_ERR_UNSUPPORTED_PARAM;
    /* vLLM's: an empty list bans nothing; a prompt cut to its last tokens would change the answer */
    if (json_array_size(json_object_get(body, "bad_words")))
        return snprintf(err, errlen, "'bad_words' is not supported by this engine"), BT_ERR_UNSUPPORTED_PARAM;
    if (given(json_object_get(body, "truncate_prompt_tokens")))
        return snprintf(err, errlen, "'truncate_prompt_tokens' is not supported by this engine: a prompt longer "
                                     "than the context is refused, never cut"),
               BT_ERR_UNSUPPORTED_PARAM;
    /* before min_tokens vLLM keeps stop tokens from being sampled; the engines do so for the end
     * of sequence only */
    json_t *mt = json_object_get(body, "min_tokens");
    if (json_array_size(json_object_get(body, "stop_token_ids")) && json_is_integer(mt) && json_integer_value(mt) > 0)
        return snprintf(err, errlen, "'min_tokens' with stop_token_ids is not supported by this engine"),
               BT_ERR_UNSUPPORTED_PARAM;
    return BT_OK;
}

bool bt_gen_params_stops_at(const bt_gen_params *gp, uint32_t id) {
    for (size_t i = 0; i < gp->n_stop_ids; i++)
        if (gp->stop_ids[i] == id) return true;
    return false;
}

bt_status bt_gen_params_read(const json_t *body, bt_gen_params *out, char *err, size_t errlen) {
    *out = (bt_gen_params){.repetition_penalty = 1};
    const char *param, *code;
    if (!bt_gen_params_check(body, &param, &code, err, errlen)) return BT_ERR_INVALID_PARAM;
    bt_status st = refuse_unsupported(body, err, errlen);
    if (st != BT_OK) return st;
    json_t *v = json_object_get(body, "min_p");
    if (json_is_number(v)) out->min_p = json_number_value(v);
    v = json_object_get(body, "repetition_penalty");
    if (json_is_number(v)) out->repetition_penalty = json_number_value(v);
    out->ignore_eos = json_is_true(json_object_get(body, "ignore_eos"));
    v = json_object_get(body, "min_tokens");
    if (json_is_integer(v)) out->min_tokens = (uint32_t)json_integer_value(v);
    out->continue_final = json_is_true(json_object_get(body, "continue_final_message"));
    out->include_stop = json_is_true(json_object_get(body, "include_stop_str_in_output"));
    size_t i;
    json_array_foreach(json_object_get(body, "stop_token_ids"), i, v) out->stop_ids[out->n_stop_ids++] =
        (uint32_t)json_integer_value(v);
    /* continued is the final message, as the assistant's: any other would be answered anew */
    json_t *msgs = json_object_get(body, "messages");
    size_t n = json_array_size(msgs);
    if (out->continue_final && json_is_array(msgs) &&
        !(n && bt_jstr_is(json_object_get(json_array_get(msgs, n - 1), "role"), "assistant")))
        return snprintf(err, errlen, "'continue_final_message' needs the final message to be an assistant message"),
               BT_ERR_INVALID_PARAM;
    return BT_OK;
}

bool bt_gen_params_field(const char *msg, char *buf, size_t cap) {
    if (!msg || msg[0] != '\'') return false;
    const char *end = strchr(msg + 1, '\'');
    size_t n = end ? (size_t)(end - msg - 1) : 0;
    if (n == 0 || n >= cap) return false;
    memcpy(buf, msg + 1, n);
    buf[n] = '\0';
    return true;
}
