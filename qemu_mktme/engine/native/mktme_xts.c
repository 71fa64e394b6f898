/* AES-XTS (IEEE 1619) over many data units per call: the compiled half of engine/xts.py.
 *
 * OpenSSL's libcrypto does every AES block (EVP AES-ECB, its AES-NI code; no AES rounds here).
 * This file makes the tweaks, multiplies them by alpha in GF(2^128) and applies the two
 * whitening XORs. Per batch of up to 1024 units, one ECB call encrypts all their tweaks; the
 * data then goes in small steps (STEP_BYTES) that stay in L1: whiten while reading the input
 * into a scratch step (the alpha sequence is computed on the fly, in SSE registers), one ECB
 * call in place there, whiten again into the output while prefetching the next step's input.
 * Each call is one pass over the caller's buffers (in place allowed), with no allocation after
 * the context exists.
 *
 * Python calls these through ctypes, which releases the GIL for the whole call. A context holds
 * one key's three EVP contexts and its scratch; it must not be used by two threads at once
 * (xts.py keeps one per thread). Key schedules live only inside OpenSSL's contexts, which cleanse
 * them when freed; the scratch (whitening values) is cleansed too.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define BLOCK 16
#ifndef STEP_BYTES
#define STEP_BYTES (8 * 1024) /* data per AES call: input, output and whitening stay in L1 */
#endif
#define STEP_BLOCKS (STEP_BYTES / BLOCK)
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD (2 * STEP_BYTES) /* how far ahead of the current step the input is asked for */
#endif
#define STREAM_MIN_BYTES (8 << 20) /* calls this large write around the cache (a 1 MiB snapshot chunk
                                     is read again at once, by AES-GCM: it had better stay in L3) */
#define BATCH_UNITS 1024 /* tweaks encrypted per ECB call */
#define API_VERSION 1

#define EXPORT __attribute__((visibility("default")))

typedef uint64_t v2u64 __attribute__((vector_size(16)));

typedef struct {
    EVP_CIPHER_CTX *tweak;           /* E_K2, ECB */
    EVP_CIPHER_CTX *enc;             /* E_K1, ECB */
    EVP_CIPHER_CTX *dec;             /* D_K1, ECB */
    v2u64 tweaks[BATCH_UNITS];       /* the current batch's encrypted tweaks */
    v2u64 white[STEP_BLOCKS];        /* the current step's whitening */
    v2u64 buf[STEP_BLOCKS];          /* the current step between the two whitenings */
} mktme_xts;

static inline v2u64 load(const uint8_t *p) {
    v2u64 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(uint8_t *p, v2u64 v) { memcpy(p, &v, sizeof v); }

/* T * alpha: the 128-bit little-endian T shifted left one bit; the bit shifted out of the low
 * word moves into the high word, the one out of the high word folds back as 0x87
 * (x^128 = x^7 + x^2 + x + 1). */
static inline v2u64 times_alpha(v2u64 t) {
#if defined(__SSE2__)
    __m128i x = (__m128i)t;
    __m128i sign = _mm_srai_epi32(_mm_shuffle_epi32(x, 0x13), 31); /* dwords: hi>>63, 0, lo>>63, 0 */
    __m128i carry = _mm_and_si128(sign, _mm_set_epi32(0, 1, 0, 0x87));
    return (v2u64)_mm_xor_si128(_mm_add_epi64(x, x), carry);
#else
    uint64_t lo = t[0], hi = t[1];
    uint64_t fold = (uint64_t)((int64_t)hi >> 63) & 0x87;
    v2u64 r = {(lo << 1) ^ fold, (hi << 1) | (lo >> 63)};
    return r;
#endif
}

static EVP_CIPHER_CTX *ecb(const uint8_t *key, int keylen, int encrypt) {
    const EVP_CIPHER *cipher = keylen == 16 ? EVP_aes_128_ecb() : EVP_aes_256_ecb();
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NULL;
    if (EVP_CipherInit_ex(ctx, cipher, NULL, key, NULL, encrypt) != 1 || EVP_CIPHER_CTX_set_padding(ctx, 0) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

EXPORT int mktme_xts_api_version(void) { return API_VERSION; }

EXPORT void mktme_xts_free(mktme_xts *x) {
    if (x == NULL)
        return;
    EVP_CIPHER_CTX_free(x->tweak);
    EVP_CIPHER_CTX_free(x->enc);
    EVP_CIPHER_CTX_free(x->dec);
    OPENSSL_clear_free(x, sizeof *x);
}

/* A context for data key k1 and tweak key k2, both keylen (16 or 32) bytes; NULL on failure. */
EXPORT mktme_xts *mktme_xts_new(const uint8_t *k1, const uint8_t *k2, int keylen) {
    if (keylen != 16 && keylen != 32)
        return NULL;
    mktme_xts *x = OPENSSL_zalloc(sizeof *x);
    if (x == NULL)
        return NULL;
    x->tweak = ecb(k2, keylen, 1);
    x->enc = ecb(k1, keylen, 1);
    x->dec = ecb(k1, keylen, 0);
    if (x->tweak == NULL || x->enc == NULL || x->dec == NULL) {
        mktme_xts_free(x);
        return NULL;
    }
    return x;
}

static int ecb_update(EVP_CIPHER_CTX *ctx, uint8_t *out, const uint8_t *in, size_t nbytes) {
    int outl = 0;
    return EVP_CipherUpdate(ctx, out, &outl, in, (int)nbytes) == 1 && (size_t)outl == nbytes;
}

/* Where the whitening sequence stands: unit u of the batch, block j of it, its value t. */
typedef struct {
    size_t u, j;
    v2u64 t;
} cursor;

/* out = in ^ whitening for nblocks blocks from cursor c, keeping the whitening in x->white. */
static void whiten_in(mktme_xts *x, cursor *c, size_t unit_blocks, uint8_t *out, const uint8_t *in,
                      size_t nblocks) {
    v2u64 *w = x->white;
    size_t b = 0;
    if (unit_blocks == 4 && c->j == 4) { /* 64-byte lines, the engine's case: unrolled */
        for (; b + 4 <= nblocks; b += 4) {
            v2u64 t0 = x->tweaks[++c->u], t1 = times_alpha(t0), t2 = times_alpha(t1), t3 = times_alpha(t2);
            w[b] = t0, w[b + 1] = t1, w[b + 2] = t2, w[b + 3] = t3;
            store(out + b * BLOCK, load(in + b * BLOCK) ^ t0);
            store(out + (b + 1) * BLOCK, load(in + (b + 1) * BLOCK) ^ t1);
            store(out + (b + 2) * BLOCK, load(in + (b + 2) * BLOCK) ^ t2);
            store(out + (b + 3) * BLOCK, load(in + (b + 3) * BLOCK) ^ t3);
        }
    }
    for (; b < nblocks; b++) {
        if (c->j == unit_blocks) {
            c->t = x->tweaks[++c->u];
            c->j = 0;
        } else if (c->j) {
            c->t = times_alpha(c->t);
        }
        c->j++;
        w[b] = c->t;
        store(out + b * BLOCK, load(in + b * BLOCK) ^ c->t);
    }
}

/* out = x->buf ^ x->white; meanwhile ask for the next step's input (the AES pass hid nothing).
 * With stream set (large calls, 16-byte aligned out) the stores bypass the cache: the output is
 * not read back soon, and DRAM is spared the read-for-ownership of every output line. */
static void whiten_out(mktme_xts *x, uint8_t *out, size_t nblocks, const uint8_t *next, size_t next_bytes,
                       int stream) {
    const v2u64 *buf = x->buf, *w = x->white;
    for (size_t b = 0; b < nblocks; b += 4) {
        if (b * BLOCK < next_bytes)
            __builtin_prefetch(next + b * BLOCK);
#if defined(__SSE2__)
        if (stream) {
            for (size_t i = b; i < b + 4 && i < nblocks; i++)
                _mm_stream_si128((__m128i *)(out + i * BLOCK), (__m128i)(buf[i] ^ w[i]));
            continue;
        }
#endif
        for (size_t i = b; i < b + 4 && i < nblocks; i++)
            store(out + i * BLOCK, buf[i] ^ w[i]);
    }
}

typedef void (*tweak_fill)(const void *arg, size_t first, size_t n, v2u64 *dst);

/* Units of unit_bytes; fill() writes the plaintext tweaks of units [first, first + n). */
static int run(mktme_xts *x, const uint8_t *in, uint8_t *out, size_t nbytes, size_t unit_bytes,
               tweak_fill fill, const void *arg, int encrypt) {
    if (x == NULL || unit_bytes == 0 || unit_bytes % BLOCK || nbytes % unit_bytes)
        return -2;
    EVP_CIPHER_CTX *aes = encrypt ? x->enc : x->dec;
    size_t unit_blocks = unit_bytes / BLOCK, units = nbytes / unit_bytes;
    int stream = nbytes >= STREAM_MIN_BYTES && ((uintptr_t)out % BLOCK) == 0;
    for (size_t first = 0; first < units; first += BATCH_UNITS) {
        size_t n = units - first < BATCH_UNITS ? units - first : BATCH_UNITS;
        fill(arg, first, n, x->tweaks);
        if (!ecb_update(x->tweak, (uint8_t *)x->tweaks, (const uint8_t *)x->tweaks, n * BLOCK))
            return -1;
        /* the unrolled path pre-increments u; start "after the end" of unit -1 */
        cursor c = {.u = (size_t)-1, .j = unit_blocks};
        uint8_t *buf = (uint8_t *)x->buf;
        size_t lo = first * unit_bytes, hi = (first + n) * unit_bytes;
        for (size_t off = lo; off < hi; off += STEP_BYTES) {
            size_t len = hi - off < STEP_BYTES ? hi - off : STEP_BYTES;
            size_t ahead = off + PREFETCH_AHEAD, ahead_len = 0;
            if (ahead < nbytes)
                ahead_len = nbytes - ahead < len ? nbytes - ahead : len;
            whiten_in(x, &c, unit_blocks, buf, in + off, len / BLOCK);
            if (!ecb_update(aes, buf, buf, len))
                return -1;
            whiten_out(x, out + off, len / BLOCK, in + ahead, ahead_len, stream);
        }
    }
#if defined(__SSE2__)
    if (stream)
        _mm_sfence(); /* streaming stores are weakly ordered: publish them before returning */
#endif
    return 0;
}

static void fill_lines(const void *arg, size_t first, size_t n, v2u64 *dst) {
    uint64_t hpa = *(const uint64_t *)arg + (uint64_t)first * 64;
    for (size_t i = 0; i < n; i++, hpa += 64) {
        v2u64 t = {hpa, 0};
        dst[i] = t;
    }
}

static void fill_explicit(const void *arg, size_t first, size_t n, v2u64 *dst) {
    memcpy(dst, (const uint8_t *)arg + first * BLOCK, n * BLOCK);
}

/* 64-byte lines from line-aligned hpa: line i has tweak (hpa + 64 i) as 16 bytes little-endian.
 * The caller checks that the addresses do not wrap. 0 on success, negative on failure. */
EXPORT int mktme_xts_lines(mktme_xts *x, const uint8_t *in, uint8_t *out, size_t nbytes, uint64_t hpa,
                           int encrypt) {
    return run(x, in, out, nbytes, 64, fill_lines, &hpa, encrypt);
}

/* Units of unit_bytes (a multiple of 16), unit u with the 16-byte tweak tweaks[16 u ..]. */
EXPORT int mktme_xts_units(mktme_xts *x, const uint8_t *in, uint8_t *out, size_t nbytes, size_t unit_bytes,
                           const uint8_t *tweaks, int encrypt) {
    return run(x, in, out, nbytes, unit_bytes, fill_explicit, tweaks, encrypt);
}
