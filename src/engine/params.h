/* params.h — the request fields that change what the engines generating text themselves (the
 * mocker, the llama engine) produce, beyond OpenAI's sampling fields: vLLM's min_p,
 * repetition_penalty, ignore_eos, min_tokens, continue_final_message, stop_token_ids and
 * include_stop_str_in_output, read and checked in one place; and the fields asking for output
 * neither engine can give (structured output, audio, vLLM's bad_words and
 * truncate_prompt_tokens), which they refuse before any token rather than answer in plain text
 * (docs/engines.md, "Request fields"). The openai engine passes every one of them to its upstream and reads none here.
 *
 * The form checks (type, range) are the frontend's too: it refuses a malformed field with a 400
 * before routing, whatever engine serves the model, as vLLM would. The refusals of unsupported
 * fields are the engines' alone, since an upstream behind the openai engine may support them.
 *
 * An engine's refusal travels to the frontend as an ERROR status with a message that begins with
 * the field's name in single quotes ('min_p' ...): bt_gen_params_field reads it back, so the
 * client's 400 names the field (`param`), as the frontend's own refusals do. */
#ifndef BATON_ENGINE_PARAMS_H
#define BATON_ENGINE_PARAMS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

/* Entries in stop_token_ids: each generated token is looked up in them */
#define BT_GP_MAX_STOP_IDS 64

typedef struct {
    double min_p;              /* [0, 1]; 0 = off */
    double repetition_penalty; /* > 0; 1 = off */
    bool ignore_eos;           /* end of sequence does not end the completion */
    uint32_t min_tokens;       /* completion tokens (carried ones included) before EOS or a stop string ends it */
    bool continue_final;       /* chat: a final assistant message is continued, not answered */
    /* vLLM's stop_token_ids: generating one of these ends the completion with "stop", the token
     * and its text delivered (vLLM's output keeps a stop token that is not a special token) */
    uint32_t stop_ids[BT_GP_MAX_STOP_IDS];
    size_t n_stop_ids;
    bool include_stop; /* vLLM's include_stop_str_in_output: a stop string ends the text after it */
} bt_gen_params;

/* Whether generating token id ends the completion (stop_token_ids). */
bool bt_gen_params_stops_at(const bt_gen_params *gp, uint32_t id);

/* The form of the fields above and of the refused ones (null is absent): false with *param the field, *code the OpenAI
 * error code ("invalid_type" or "invalid_value") and the message in err. */
bool bt_gen_params_check(const json_t *body, const char **param, const char **code, char *err, size_t errlen);

/* Reads the fields into out after checking them and refusing the unsupported ones: BT_OK, or
 * BT_ERR_UNSUPPORTED_PARAM (response_format other than {"type":"text"}, guided_json,
 * guided_regex, guided_choice, guided_grammar, structured_outputs, modalities other than
 * ["text"], audio, a non-empty bad_words, truncate_prompt_tokens, min_tokens with stop_token_ids)
 * or BT_ERR_INVALID_PARAM, err beginning with the field's name in quotes. */
bt_status bt_gen_params_read(const json_t *body, bt_gen_params *out, char *err, size_t errlen);

/* The field an engine's refusal names ('name' at the start of msg) into buf; false when none. */
bool bt_gen_params_field(const char *msg, char *buf, size_t cap);

#endif
