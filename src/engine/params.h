/* params.h — the request fields that change what the engines generating text themselves (the
 * mocker, the llama engine) produce, beyond OpenAI's sampling fields: vLLM's min_p,
 * repetition_penalty, ignore_eos, min_tokens and continue_final_message, read and checked in one
 * place; and the fields asking for output neither engine can give (structured output, audio),
 * which they refuse before any token rather than answer in plain text (docs/engines.md, "Request
 * fields"). The openai engine passes every one of them to its upstream and reads none here.
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

typedef struct {
    double min_p;              /* [0, 1]; 0 = off */
    double repetition_penalty; /* > 0; 1 = off */
    bool ignore_eos;           /* end of sequence does not end the completion */
    uint32_t min_tokens;       /* completion tokens (carried ones included) before EOS or a stop string ends it */
    bool continue_final;       /* chat: a final assistant message is continued, not answered */
} bt_gen_params;

/* The form of the fields above (null is absent): false with *param the field, *code the OpenAI
 * error code ("invalid_type" or "invalid_value") and the message in err. */
bool bt_gen_params_check(const json_t *body, const char **param, const char **code, char *err, size_t errlen);

/* Reads the fields into out after checking them and refusing the unsupported ones: BT_OK, or
 * BT_ERR_UNSUPPORTED_PARAM (response_format other than {"type":"text"}, guided_json,
 * guided_regex, guided_choice, guided_grammar, structured_outputs, modalities other than
 * ["text"], audio) or BT_ERR_INVALID_PARAM, err beginning with the field's name in quotes. */
bt_status bt_gen_params_read(const json_t *body, bt_gen_params *out, char *err, size_t errlen);

/* The field an engine's refusal names ('name' at the start of msg) into buf; false when none. */
bool bt_gen_params_field(const char *msg, char *buf, size_t cap);

#endif
