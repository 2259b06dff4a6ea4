/* mocker_internal.h — symbols shared between the mocker's own files (vocab.c, mocker.c); not part
 * of the engine interface. */
#ifndef BATON_MOCKER_INTERNAL_H
#define BATON_MOCKER_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/mocker/mocker.h"

/* The punctuation tokens occupy the top three ids; every lower id is a word. */
#define MK_TOK_COMMA (BT_MOCKER_VOCAB - 3u)
#define MK_TOK_PERIOD (BT_MOCKER_VOCAB - 2u)
#define MK_TOK_NEWLINE (BT_MOCKER_VOCAB - 1u)

/* Length of a token's text (0 for ids outside the vocabulary). */
size_t mk_token_len(uint32_t id);

#endif
