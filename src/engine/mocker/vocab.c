/* vocab.c — the mocker's vocabulary, tokenizer and token function: pure, deterministic code with
 * no engine state, usable from any thread.
 *
 * The vocabulary has BT_MOCKER_VOCAB tokens: BT_MOCKER_VOCAB-3 word tokens (" fenlo", " marit":
 * a space and 4–6 lowercase letters built from consonant–vowel syllables, all distinct) and three
 * punctuation tokens ("," "." "\n") at the top ids. The table is computed once, on first use,
 * under pthread_once. The tokenizer splits text into pieces (a space plus a run of word
 * characters, a bare run of word characters, or one other non-blank byte); a piece that is the
 * exact text of a token maps to that token, any other piece to FNV-1a(piece) mod VOCAB. It is
 * lossy for arbitrary text but exact for text the mocker produced, so a client that sends back
 * generated text gets the generated ids. The token function picks the next id as a hash of
 * (prefix state, seed, temperature bits, and top_p bits when sampling with top_p < 1); the prefix state also keeps the last token id in its
 * low 12 bits so that punctuation is never chosen twice in a row (except "\n" after "."). */
#include <pthread.h>
#include <string.h>

#include "common/util.h"
#include "engine/mocker/mocker.h"
#include "engine/mocker/mocker_internal.h"

#define MK_WORDS (BT_MOCKER_VOCAB - 3u)
#define MK_TEXT_MAX 8u      /* " " + at most 6 letters + NUL */
#define MK_INDEX_SIZE 8192u /* open-addressing table over the token texts, load factor 1/2 */

static char g_text[BT_MOCKER_VOCAB][MK_TEXT_MAX];
static uint8_t g_len[BT_MOCKER_VOCAB];
static uint16_t g_index[MK_INDEX_SIZE]; /* 0 = empty, else id + 1 */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static const char k_consonants[16] = {'b', 'd', 'f', 'g', 'k', 'l', 'm', 'n',
                                      'p', 'r', 's', 't', 'v', 'z', 'h', 'j'};
static const char k_vowels[5] = {'a', 'e', 'i', 'o', 'u'};
static const char k_codas[4] = {'n', 'r', 'l', 's'};

static uint32_t fnv1a(const char *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 16777619u;
    }
    return h;
}

/* Word i is C V [coda] C V [coda]. (C1,V1,C2,V2) comes from a bijection of i onto 16·5·16·5 = 6400
 * combinations (2897 is coprime with 6400), and the optional codas cannot make two words equal:
 * the letter after the first vowel is a coda exactly when the letter after it is a consonant, so
 * every word decodes back to one (C1,V1,C2,V2). */
static void build_word(uint32_t i, char *out, uint8_t *len) {
    uint32_t j = (i * 2897u + 1213u) % 6400u;
    uint64_t h = bt_mix64(0x6d6f636b6572ull ^ i);
    size_t n = 0;
    out[n++] = ' ';
    out[n++] = k_consonants[j % 16u];
    j /= 16u;
    out[n++] = k_vowels[j % 5u];
    j /= 5u;
    if ((h & 7u) == 0) out[n++] = k_codas[(h >> 3) & 3u];
    out[n++] = k_consonants[j % 16u];
    j /= 16u;
    out[n++] = k_vowels[j % 5u];
    if ((h >> 8) % 3u == 0) out[n++] = k_codas[(h >> 12) & 3u];
    out[n] = '\0';
    *len = (uint8_t)n;
}

static void index_put(uint32_t id) {
    uint32_t slot = fnv1a(g_text[id], g_len[id]) & (MK_INDEX_SIZE - 1u);
    while (g_index[slot]) slot = (slot + 1u) & (MK_INDEX_SIZE - 1u);
    g_index[slot] = (uint16_t)(id + 1u);
}

/* The id whose text is exactly p[0..n), or -1. */
static int64_t index_find(const char *p, size_t n) {
    if (n == 0 || n >= MK_TEXT_MAX) return -1;
    uint32_t slot = fnv1a(p, n) & (MK_INDEX_SIZE - 1u);
    while (g_index[slot]) {
        uint32_t id = g_index[slot] - 1u;
        if (g_len[id] == n && memcmp(g_text[id], p, n) == 0) return id;
        slot = (slot + 1u) & (MK_INDEX_SIZE - 1u);
    }
    return -1;
}

static void vocab_build(void) {
    for (uint32_t i = 0; i < MK_WORDS; i++) build_word(i, g_text[i], &g_len[i]);
    const char *punct[3] = {",", ".", "\n"};
    for (uint32_t k = 0; k < 3; k++) {
        g_text[MK_TOK_COMMA + k][0] = punct[k][0];
        g_text[MK_TOK_COMMA + k][1] = '\0';
        g_len[MK_TOK_COMMA + k] = 1;
    }
    for (uint32_t i = 0; i < BT_MOCKER_VOCAB; i++) index_put(i);
}

static inline void vocab_init(void) { pthread_once(&g_once, vocab_build); }

const char *bt_mocker_token_text(uint32_t id, size_t *len) {
    if (id >= BT_MOCKER_VOCAB) {
        if (len) *len = 0;
        return "";
    }
    vocab_init();
    if (len) *len = g_len[id];
    return g_text[id];
}

size_t mk_token_len(uint32_t id) {
    size_t n;
    bt_mocker_token_text(id, &n);
    return n;
}

static inline bool is_word_byte(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c >= 0x80;
}

size_t bt_mocker_tokenize(const char *text, size_t len, uint32_t *out, size_t cap) {
    vocab_init();
    size_t count = 0;
    size_t i = 0;
    while (i < len) {
        unsigned char c = (unsigned char)text[i];
        size_t start = i;
        if (c == ' ' && i + 1 < len && is_word_byte((unsigned char)text[i + 1])) {
            i++;
            while (i < len && is_word_byte((unsigned char)text[i])) i++;
        } else if (is_word_byte(c)) {
            while (i < len && is_word_byte((unsigned char)text[i])) i++;
        } else if (c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f') {
            i++; /* blanks that do not lead a word carry no token */
            continue;
        } else {
            i++; /* one punctuation byte or newline */
        }
        int64_t id = index_find(text + start, i - start);
        if (id < 0) id = (int64_t)(fnv1a(text + start, i - start) % BT_MOCKER_VOCAB);
        if (count < cap) out[count] = (uint32_t)id;
        count++;
    }
    return count;
}

uint64_t bt_mocker_state_push(uint64_t state, uint32_t token) {
    uint64_t h = bt_mix64((state * 0x9e3779b97f4a7c15ull) ^ (((uint64_t)token + 1u) * 0xd6e8feb86659fd93ull));
    /* The low 12 bits carry the last token (VOCAB is 2^12) so the next choice can look at it. */
    return (h & ~(uint64_t)(BT_MOCKER_VOCAB - 1u)) | (token & (BT_MOCKER_VOCAB - 1u));
}

uint32_t bt_mocker_next_token(uint64_t state, uint64_t seed, double temperature, double top_p) {
    if (temperature == 0) temperature = 0.0; /* -0.0 and 0.0 are the same request */
    /* top_p changes the choice only where it changes a real sampler's draw: a sampled choice
     * (temperature > 0) from a nucleus smaller than the whole vocabulary (top_p < 1). top_p 0 keeps
     * the most probable token alone, which is the greedy choice whatever the temperature. Greedy
     * and top_p 1 (the default) hash exactly what they hashed before top_p was read. */
    uint64_t pbits = 0;
    if (temperature > 0 && top_p < 1) {
        if (top_p <= 0) temperature = 0.0;
        else memcpy(&pbits, &top_p, sizeof pbits);
    }
    uint64_t tbits;
    memcpy(&tbits, &temperature, sizeof tbits);
    uint64_t h = bt_mix64(state ^ bt_mix64(seed ^ bt_mix64(tbits ^ 0x74656d70ull)));
    if (pbits) h = bt_mix64(h ^ bt_mix64(pbits ^ 0x746f7070ull));
    uint32_t prev = (uint32_t)(state & (BT_MOCKER_VOCAB - 1u));
    bool have_prev = state != 0;
    if (have_prev && prev == MK_TOK_PERIOD && ((h >> 40) & 3u) == 0) return MK_TOK_NEWLINE;
    bool prev_punct = have_prev && prev >= MK_TOK_COMMA;
    /* 20/256 ≈ 7.8% punctuation, 3:2 commas to periods. */
    if (!prev_punct && (h & 0xffu) < 20u) return ((h >> 8) % 5u) < 3u ? MK_TOK_COMMA : MK_TOK_PERIOD;
    return (uint32_t)((h >> 16) % MK_WORDS);
}
