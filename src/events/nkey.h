/* nkey.h — NATS user nkeys in their text form (docs/security.md).
 *
 * An nkey is an ed25519 key pair written as unpadded RFC 4648 base32 of: a prefix, the 32 raw
 * key bytes, and a CRC-16/XMODEM of both (little-endian). A user's public key has the one-byte
 * prefix that makes it start with "U" (56 characters); the seed — the private key — has a
 * two-byte prefix that makes it start with "SU" (58 characters). NATS_AUTH_NKEY holds the seed;
 * the server is configured with the public key, which this module derives from the seed. */
#ifndef BATON_NKEY_H
#define BATON_NKEY_H

#include <stdbool.h>
#include <stddef.h>

#define BT_NKEY_PUBLIC_LEN 56 /* characters of a public key, without the NUL */

/* Checks that `seed` is a well-formed user seed (length, alphabet, checksum, "SU" type) and
 * writes the matching public key ("U…", NUL-terminated) to pub. On failure returns false with a
 * message in err that never contains the seed. The raw private key is wiped before returning. */
bool bt__nkey_user_public(const char *seed, char pub[BT_NKEY_PUBLIC_LEN + 1], char *err, size_t errlen);

#endif
