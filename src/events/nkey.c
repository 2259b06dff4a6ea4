/* nkey.c — see nkey.h: decoding a user seed and deriving its public key. Base32 and the CRC are
 * written here (a few lines each); the ed25519 arithmetic is OpenSSL's. */
#include "events/nkey.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define RAW_LEN 32
#define SEED_CHARS 58 /* base32 of 2 + 32 + 2 bytes */
#define SEED_BYTES 36
#define PUB_BYTES 35  /* 1 + 32 + 2 */

#define PREFIX_SEED (18u << 3) /* 'S' */
#define PREFIX_USER (20u << 3) /* 'U' */

static const char B32[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

static uint16_t crc16_xmodem(const uint8_t *p, size_t n) {
    uint16_t crc = 0;
    for (size_t i = 0; i < n; i++) {
        crc ^= (uint16_t)(p[i] << 8);
        for (int b = 0; b < 8; b++) crc = (uint16_t)(crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1);
    }
    return crc;
}

/* Decodes exactly `out_len` bytes from `n` characters; the bits left over are ignored. Returns the
 * 1-based position of the first character outside the alphabet, or 0. */
static size_t b32_decode(const char *s, size_t n, uint8_t *out, size_t out_len) {
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        const char *c = s[i] ? strchr(B32, s[i]) : NULL;
        if (!c) return i + 1;
        acc = (acc << 5) | (uint32_t)(c - B32);
        bits += 5;
        if (bits >= 8) {
            bits -= 8;
            if (o < out_len) out[o++] = (uint8_t)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    return 0;
}

static void b32_encode(const uint8_t *p, size_t n, char *out) {
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        acc = (acc << 8) | p[i];
        bits += 8;
        while (bits >= 5) {
            bits -= 5;
            out[o++] = B32[(acc >> bits) & 31];
        }
        acc &= (1u << bits) - 1;
    }
    if (bits > 0) out[o++] = B32[(acc << (5 - bits)) & 31];
    out[o] = '\0';
}

static const char *key_type(unsigned prefix) {
    switch (prefix) {
    case 0u << 3: return "an account key (SA…)";
    case 2u << 3: return "a cluster key (SC…)";
    case 13u << 3: return "a server key (SN…)";
    case 14u << 3: return "an operator key (SO…)";
    case 23u << 3: return "a curve key (SX…)";
    default: return "an unknown kind of key";
    }
}

bool bt__nkey_user_public(const char *seed, char pub[BT_NKEY_PUBLIC_LEN + 1], char *err, size_t errlen) {
    uint8_t raw[SEED_BYTES];
    bool ok = false;
    EVP_PKEY *pk = NULL;
    size_t n = seed ? strlen(seed) : 0;
    if (n != SEED_CHARS) {
        if (n == BT_NKEY_PUBLIC_LEN && seed[0] == 'U')
            snprintf(err, errlen, "this is a user public key (U…); the seed (SU…, %d characters) is needed to sign",
                     SEED_CHARS);
        else
            snprintf(err, errlen, "not an nkey seed: %zu characters, a user seed has %d (SU…)", n, SEED_CHARS);
        return false;
    }
    size_t bad = b32_decode(seed, n, raw, sizeof raw);
    if (bad) {
        snprintf(err, errlen, "not an nkey seed: character %zu is not base32 (A-Z, 2-7)", bad);
        goto out;
    }
    uint16_t crc = (uint16_t)(raw[SEED_BYTES - 2] | raw[SEED_BYTES - 1] << 8);
    if (crc16_xmodem(raw, SEED_BYTES - 2) != crc) {
        snprintf(err, errlen, "not an nkey seed: the checksum does not match (mistyped or truncated?)");
        goto out;
    }
    /* two-byte prefix: 5 bits "seed", then 5 bits of the key type, then 6 zero bits */
    unsigned kind = ((raw[0] & 7u) << 5) | (raw[1] >> 3);
    if ((raw[0] & ~7u) != PREFIX_SEED) {
        snprintf(err, errlen, "not an nkey seed (a seed starts with S)");
        goto out;
    }
    if (kind != PREFIX_USER) {
        snprintf(err, errlen, "this is the seed of %s; a user seed (SU…) is needed", key_type(kind));
        goto out;
    }
    pk = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, raw + 2, RAW_LEN);
    uint8_t p[PUB_BYTES];
    size_t plen = RAW_LEN;
    if (!pk || EVP_PKEY_get_raw_public_key(pk, p + 1, &plen) != 1 || plen != RAW_LEN) {
        snprintf(err, errlen, "cannot derive the public key (OpenSSL without ed25519?)");
        goto out;
    }
    p[0] = PREFIX_USER;
    uint16_t pc = crc16_xmodem(p, 1 + RAW_LEN);
    p[PUB_BYTES - 2] = (uint8_t)(pc & 0xff);
    p[PUB_BYTES - 1] = (uint8_t)(pc >> 8);
    b32_encode(p, sizeof p, pub);
    ok = true;
out:
    EVP_PKEY_free(pk);
    OPENSSL_cleanse(raw, sizeof raw);
    return ok;
}
