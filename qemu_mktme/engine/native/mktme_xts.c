/* AES-XTS (IEEE 1619) over many data units per call: the compiled half of engine/xts.py.
 *
 * OpenSSL's libcrypto does every AES block (EVP AES-ECB, its AES-NI code; no AES rounds here).
 * This file makes the tweaks, multiplies them by alpha in GF(2^128) and applies the two
 * whitening XORs. The data goes in small steps (STEP_BYTES) that stay in L1: whiten while reading
 * the input into a scratch step (and asking for the input some steps ahead), one ECB call in
 * place there, whiten again into the output. Each call is one pass over the caller's buffers (in place
 * allowed), with no allocation after the context exists.
 *
 * 64-byte units (the engine's cache lines, HPA or explicit tweaks): one ECB call encrypts the
 * tweaks of TWEAK_LINES lines (4 KiB, in L1 until their steps are done); both passes recompute
 * each line's four whitening values from its tweak (cheaper than storing and reloading them).
 * Other unit sizes: one ECB call per batch of BATCH_UNITS tweaks, the step's whitening kept in
 * scratch between the passes (a unit may span steps).
 *
 * Two whitening kernels, the same bytes: SSE2 (any x86-64; one block per register) and AVX2
 * (two per register; 64-byte units double two lines' tweaks at once). The best this CPU has is
 * chosen on first use; mktme_xts_set_isa overrides it (tests, benchmarks, QEMU_MKTME_XTS).
 *
 * Large calls (STREAM_MIN_BYTES) write the output with streaming stores: it is not read back
 * soon, and DRAM is spared the read-for-ownership of every output line. The step is small so
 * that one step's streaming stores drain while the next step is encrypted.
 *
 * Python calls these through ctypes, which releases the GIL for the whole call. A context holds
 * one key's three EVP contexts and its scratch; it must not be used by two threads at once
 * (xts.py keeps one per thread). Key schedules live only inside OpenSSL's contexts, which cleanse
 * them when freed; the scratch (whitening values) is cleansed too.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__x86_64__)
#error "the XTS helper's whitening kernels are written for x86-64 (SSE2, AVX2)"
#endif
#include <immintrin.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#define BLOCK 16
#define LINE 64
#ifndef STEP_BYTES
#define STEP_BYTES 2048 /* data per AES call (64 MiB calls: ~6% faster than with 8 KiB here) */
#endif
#define STEP_BLOCKS (STEP_BYTES / BLOCK)
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4096 /* how far ahead of the current step the input is asked for */
#endif
#ifndef STREAM_MIN_BYTES
#define STREAM_MIN_BYTES (8 << 20) /* calls this large write around the cache (a 1 MiB snapshot chunk
                                     is read again at once, by AES-GCM: it had better stay in L3) */
#endif
#ifndef BATCH_UNITS
#define BATCH_UNITS 1024 /* other unit sizes: tweaks encrypted per ECB call */
#endif
#ifndef TWEAK_LINES
#define TWEAK_LINES 256 /* 64-byte units: tweaks encrypted per ECB call (4 KiB) */
#endif
#define API_VERSION 2

_Static_assert(TWEAK_LINES <= BATCH_UNITS && TWEAK_LINES % (STEP_BYTES / LINE) == 0, "tweak batches hold whole steps");

enum { ISA_SSE2 = 1, ISA_AVX2 = 2 };

#define EXPORT __attribute__((visibility("default")))
#define AVX2 __attribute__((target("avx2")))

typedef uint64_t v2u64 __attribute__((vector_size(16)));

typedef struct {
    EVP_CIPHER_CTX *tweak;           /* E_K2, ECB */
    EVP_CIPHER_CTX *enc;             /* E_K1, ECB */
    EVP_CIPHER_CTX *dec;             /* D_K1, ECB */
    /* scratch, cache-line aligned (so is the context) */
    v2u64 tweaks[BATCH_UNITS] __attribute__((aligned(64))); /* the batch's encrypted tweaks */
    v2u64 white[STEP_BLOCKS] __attribute__((aligned(64)));  /* the step's whitening (not 64-byte units) */
    v2u64 buf[STEP_BLOCKS] __attribute__((aligned(64)));    /* the step between the two whitenings */
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
    __m128i x = (__m128i)t;
    __m128i sign = _mm_srai_epi32(_mm_shuffle_epi32(x, 0x13), 31); /* dwords: hi>>63, 0, lo>>63, 0 */
    __m128i carry = _mm_and_si128(sign, _mm_set_epi32(0, 1, 0, 0x87));
    return (v2u64)_mm_xor_si128(_mm_add_epi64(x, x), carry);
}

/* The same in each 128-bit lane of a 256-bit register. */
AVX2 static inline __m256i times_alpha2(__m256i x) {
    __m256i sign = _mm256_srai_epi32(_mm256_shuffle_epi32(x, 0x13), 31);
    __m256i carry = _mm256_and_si256(sign, _mm256_set_epi32(0, 1, 0, 0x87, 0, 1, 0, 0x87));
    return _mm256_xor_si256(_mm256_add_epi64(x, x), carry);
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

static int isa_supported(int isa) {
    if (isa == ISA_SSE2)
        return 1;
    if (isa == ISA_AVX2) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2");
    }
    return 0;
}

static int isa_in_use; /* 0 until first asked: then the best the CPU has */

static int current_isa(void) {
    int isa = __atomic_load_n(&isa_in_use, __ATOMIC_RELAXED);
    if (isa == 0) { /* the first call: the best kernel, unless mktme_xts_set_isa got there first */
        int best = isa_supported(ISA_AVX2) ? ISA_AVX2 : ISA_SSE2;
        if (__atomic_compare_exchange_n(&isa_in_use, &isa, best, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            isa = best;
    }
    return isa;
}

EXPORT int mktme_xts_api_version(void) { return API_VERSION; }

/* The whitening kernel in use: 1 SSE2, 2 AVX2. */
EXPORT int mktme_xts_isa(void) { return current_isa(); }

/* Use kernel isa (1 SSE2, 2 AVX2) from the next call on, in every thread; 0 when done, -1 when
 * this CPU lacks it (nothing changes then). */
EXPORT int mktme_xts_set_isa(int isa) {
    if (!isa_supported(isa))
        return -1;
    __atomic_store_n(&isa_in_use, isa, __ATOMIC_RELAXED);
    return 0;
}

EXPORT void mktme_xts_free(mktme_xts *x) {
    if (x == NULL)
        return;
    EVP_CIPHER_CTX_free(x->tweak);
    EVP_CIPHER_CTX_free(x->enc);
    EVP_CIPHER_CTX_free(x->dec);
    OPENSSL_cleanse(x, sizeof *x);
    free(x);
}

/* A context for data key k1 and tweak key k2, both keylen (16 or 32) bytes; NULL on failure. */
EXPORT mktme_xts *mktme_xts_new(const uint8_t *k1, const uint8_t *k2, int keylen) {
    if (keylen != 16 && keylen != 32)
        return NULL;
    mktme_xts *x = aligned_alloc(64, sizeof *x);
    if (x == NULL)
        return NULL;
    memset(x, 0, sizeof *x);
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

/* The input to ask for (prefetch) ahead of use while a step is whitened: lines lines from next. */
typedef struct {
    const uint8_t *next;
    size_t lines;
} ahead;

/* Ask for line i of it, if it has one: one line per line whitened in, spread over the pass (a
 * burst of a step's worth waited on the cache's miss buffers; measured slower). Always inlined:
 * GCC deems a function that only prefetches free of effects and drops the calls. */
__attribute__((always_inline)) static inline void ask(const ahead *a, size_t i) {
    if (i < a->lines)
        __builtin_prefetch(a->next + i * LINE);
}

/* --- 64-byte units ------------------------------------------------------------------------ */

/* buf = in ^ whitening, for n lines with encrypted tweaks t, asking for input ahead meanwhile. */
static void lines_in_sse2(const v2u64 *t, uint8_t *buf, const uint8_t *in, size_t n, const ahead *a) {
    for (size_t i = 0; i < n; i++, in += LINE, buf += LINE) {
        ask(a, i);
        v2u64 t0 = t[i], t1 = times_alpha(t0), t2 = times_alpha(t1), t3 = times_alpha(t2);
        store(buf, load(in) ^ t0);
        store(buf + 16, load(in + 16) ^ t1);
        store(buf + 32, load(in + 32) ^ t2);
        store(buf + 48, load(in + 48) ^ t3);
    }
}

/* out = buf ^ whitening, for n lines with encrypted tweaks t; with stream (large calls, 16-byte
 * aligned out) the stores bypass the cache. Inlined with stream constant. */
__attribute__((always_inline)) static inline void lines_out_sse2_as(const v2u64 *t, const uint8_t *buf,
                                                                    uint8_t *out, size_t n, const int stream) {
    for (size_t i = 0; i < n; i++, buf += LINE, out += LINE) {
        v2u64 t0 = t[i], t1 = times_alpha(t0), t2 = times_alpha(t1), t3 = times_alpha(t2);
        v2u64 o0 = load(buf) ^ t0, o1 = load(buf + 16) ^ t1, o2 = load(buf + 32) ^ t2, o3 = load(buf + 48) ^ t3;
        if (stream) {
            _mm_stream_si128((__m128i *)out, (__m128i)o0);
            _mm_stream_si128((__m128i *)(out + 16), (__m128i)o1);
            _mm_stream_si128((__m128i *)(out + 32), (__m128i)o2);
            _mm_stream_si128((__m128i *)(out + 48), (__m128i)o3);
        } else {
            store(out, o0), store(out + 16, o1), store(out + 32, o2), store(out + 48, o3);
        }
    }
}

static void lines_out_sse2(const v2u64 *t, const uint8_t *buf, uint8_t *out, size_t n, int stream) {
    if (stream)
        lines_out_sse2_as(t, buf, out, n, 1);
    else
        lines_out_sse2_as(t, buf, out, n, 0);
}

/* Store 32 bytes at p: cached (stream 0), streaming with p 16-byte aligned (1, two halves), or
 * streaming with p 32-byte aligned (2). */
AVX2 __attribute__((always_inline)) static inline void store2(uint8_t *p, __m256i v, int stream) {
    if (stream == 2) {
        _mm256_stream_si256((__m256i *)p, v);
    } else if (stream) {
        _mm_stream_si128((__m128i *)p, _mm256_castsi256_si128(v));
        _mm_stream_si128((__m128i *)(p + 16), _mm256_extracti128_si256(v, 1));
    } else {
        _mm256_storeu_si256((__m256i *)p, v);
    }
}

/* Two lines' whitening from their encrypted tweaks t[0], t[1] (t 32-byte aligned), two blocks a
 * register: w[0] = (t0, t0 alpha), w[1] = (t0 alpha^2, t0 alpha^3), w[2] and w[3] the same for
 * t1. The doublings run on both lines at once. */
AVX2 static inline void lines_white2(const v2u64 *t, __m256i w[4]) {
    __m256i a = _mm256_load_si256((const __m256i *)t), b = times_alpha2(a), c = times_alpha2(b),
            d = times_alpha2(c);
    w[0] = _mm256_permute2x128_si256(a, b, 0x20);
    w[1] = _mm256_permute2x128_si256(c, d, 0x20);
    w[2] = _mm256_permute2x128_si256(a, b, 0x31);
    w[3] = _mm256_permute2x128_si256(c, d, 0x31);
}

AVX2 static void lines_in_avx2(const v2u64 *t, uint8_t *buf, const uint8_t *in, size_t n, const ahead *a) {
    size_t i = 0;
    for (; i + 2 <= n; i += 2, in += 2 * LINE, buf += 2 * LINE) {
        ask(a, i), ask(a, i + 1);
        __m256i w[4];
        lines_white2(t + i, w);
        for (int k = 0; k < 4; k++)
            _mm256_store_si256((__m256i *)(buf + 32 * k),
                               _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(in + 32 * k)), w[k]));
    }
    if (i < n) { /* an odd line count: the last line through SSE2 */
        ahead last = {a->next + i * LINE, a->lines > i ? a->lines - i : 0};
        lines_in_sse2(t + i, buf, in, 1, &last);
    }
}

/* As lines_out_sse2, stream as for store2; inlined with stream constant. */
AVX2 __attribute__((always_inline)) static inline void lines_out_avx2_as(const v2u64 *t, const uint8_t *buf,
                                                                         uint8_t *out, size_t n, const int stream) {
    size_t i = 0;
    for (; i + 2 <= n; i += 2, buf += 2 * LINE, out += 2 * LINE) {
        __m256i w[4];
        lines_white2(t + i, w);
        for (int k = 0; k < 4; k++)
            store2(out + 32 * k, _mm256_xor_si256(_mm256_load_si256((const __m256i *)(buf + 32 * k)), w[k]), stream);
    }
    if (i < n) /* an odd line count: the last line through SSE2 */
        lines_out_sse2_as(t + i, buf, out, 1, stream != 0);
}

AVX2 static void lines_out_avx2(const v2u64 *t, const uint8_t *buf, uint8_t *out, size_t n, int stream) {
    if (stream == 2)
        lines_out_avx2_as(t, buf, out, n, 2);
    else if (stream)
        lines_out_avx2_as(t, buf, out, n, 1);
    else
        lines_out_avx2_as(t, buf, out, n, 0);
}

/* --- any unit size (a multiple of 16 bytes) ----------------------------------------------- */

/* Where the whitening sequence stands: unit u of the batch, block j of it, its value t. */
typedef struct {
    size_t u, j;
    v2u64 t;
} cursor;

/* buf = in ^ whitening for nblocks blocks from cursor c, keeping the whitening in x->white. */
static void units_in(mktme_xts *x, cursor *c, size_t unit_blocks, uint8_t *buf, const uint8_t *in,
                     size_t nblocks, const ahead *a) {
    v2u64 *w = x->white;
    for (size_t b = 0; b < nblocks; b++) {
        if (b % 4 == 0)
            ask(a, b / 4);
        if (c->j == unit_blocks) {
            c->t = x->tweaks[++c->u];
            c->j = 0;
        } else if (c->j) {
            c->t = times_alpha(c->t);
        }
        c->j++;
        w[b] = c->t;
        store(buf + b * BLOCK, load(in + b * BLOCK) ^ c->t);
    }
}

/* out = x->buf ^ x->white for nblocks blocks; stream as for lines_out_sse2. */
static void units_out(mktme_xts *x, uint8_t *out, size_t nblocks, int stream) {
    const v2u64 *buf = x->buf, *w = x->white;
    for (size_t b = 0; b < nblocks; b++) {
        if (stream)
            _mm_stream_si128((__m128i *)(out + b * BLOCK), (__m128i)(buf[b] ^ w[b]));
        else
            store(out + b * BLOCK, buf[b] ^ w[b]);
    }
}

/* The same, two blocks a register; stream as for store2. */
AVX2 static void units_out_avx2(mktme_xts *x, uint8_t *out, size_t nblocks, int stream) {
    const uint8_t *buf = (const uint8_t *)x->buf, *w = (const uint8_t *)x->white;
    size_t b = 0;
    for (; b + 2 <= nblocks; b += 2) {
        store2(out + b * BLOCK, _mm256_xor_si256(_mm256_load_si256((const __m256i *)(buf + b * BLOCK)),
                                                 _mm256_load_si256((const __m256i *)(w + b * BLOCK))), stream);
    }
    if (b < nblocks) { /* an odd block count */
        __m128i o = _mm_xor_si128(_mm_load_si128((const __m128i *)(buf + b * BLOCK)),
                                  _mm_load_si128((const __m128i *)(w + b * BLOCK)));
        if (stream)
            _mm_stream_si128((__m128i *)(out + b * BLOCK), o);
        else
            _mm_storeu_si128((__m128i *)(out + b * BLOCK), o);
    }
}

/* --- the driver --------------------------------------------------------------------------- */

typedef void (*tweak_fill)(const void *arg, size_t first, size_t n, v2u64 *dst);

/* The input to ask for while a step of len bytes is whitened: [from, from + len) of in[0, nbytes). */
static ahead ask_for(const uint8_t *in, size_t nbytes, size_t from, size_t len) {
    ahead a = {in + from, 0};
    if (from < nbytes)
        a.lines = ((nbytes - from < len ? nbytes - from : len) + LINE - 1) / LINE;
    return a;
}

/* 64-byte units: per batch of TWEAK_LINES lines one ECB call for their tweaks (4 KiB, in L1 until
 * the batch is done); then a step at a time: whiten in, AES, whiten out. */
static int run_lines(mktme_xts *x, EVP_CIPHER_CTX *aes, const uint8_t *in, uint8_t *out, size_t nbytes,
                     tweak_fill fill, const void *arg, int avx2, int stream) {
    uint8_t *buf = (uint8_t *)x->buf;
    size_t lines = nbytes / LINE;
    for (size_t first = 0; first < lines; first += TWEAK_LINES) {
        size_t nt = lines - first < TWEAK_LINES ? lines - first : TWEAK_LINES;
        fill(arg, first, nt, x->tweaks);
        if (!ecb_update(x->tweak, (uint8_t *)x->tweaks, (const uint8_t *)x->tweaks, nt * BLOCK))
            return -1;
        for (size_t l = 0; l < nt; l += STEP_BYTES / LINE) {
            size_t n = nt - l < STEP_BYTES / LINE ? nt - l : STEP_BYTES / LINE;
            size_t off = (first + l) * LINE, len = n * LINE;
            const v2u64 *t = x->tweaks + l;
            ahead a = ask_for(in, nbytes, off + PREFETCH_AHEAD, len);
            if (avx2)
                lines_in_avx2(t, buf, in + off, n, &a);
            else
                lines_in_sse2(t, buf, in + off, n, &a);
            if (!ecb_update(aes, buf, buf, len))
                return -1;
            if (avx2)
                lines_out_avx2(t, buf, out + off, n, stream);
            else
                lines_out_sse2(t, buf, out + off, n, stream);
        }
    }
    return 0;
}

/* Any unit size: per batch of up to BATCH_UNITS units one ECB call encrypts their tweaks; the
 * data goes in steps, whose whitening is kept in x->white between the two passes. */
static int run_units(mktme_xts *x, EVP_CIPHER_CTX *aes, const uint8_t *in, uint8_t *out, size_t nbytes,
                     size_t unit_bytes, tweak_fill fill, const void *arg, int avx2, int stream) {
    size_t unit_blocks = unit_bytes / BLOCK, units = nbytes / unit_bytes;
    uint8_t *buf = (uint8_t *)x->buf;
    for (size_t first = 0; first < units; first += BATCH_UNITS) {
        size_t n = units - first < BATCH_UNITS ? units - first : BATCH_UNITS;
        fill(arg, first, n, x->tweaks);
        if (!ecb_update(x->tweak, (uint8_t *)x->tweaks, (const uint8_t *)x->tweaks, n * BLOCK))
            return -1;
        /* units_in pre-increments u; start "after the end" of unit -1 */
        cursor c = {.u = (size_t)-1, .j = unit_blocks};
        size_t lo = first * unit_bytes, hi = (first + n) * unit_bytes;
        for (size_t off = lo; off < hi; off += STEP_BYTES) {
            size_t len = hi - off < STEP_BYTES ? hi - off : STEP_BYTES;
            ahead a = ask_for(in, nbytes, off + PREFETCH_AHEAD, len);
            units_in(x, &c, unit_blocks, buf, in + off, len / BLOCK, &a);
            if (!ecb_update(aes, buf, buf, len))
                return -1;
            if (avx2)
                units_out_avx2(x, out + off, len / BLOCK, stream);
            else
                units_out(x, out + off, len / BLOCK, stream);
        }
    }
    return 0;
}

/* Units of unit_bytes; fill() writes the plaintext tweaks of units [first, first + n). */
static int run(mktme_xts *x, const uint8_t *in, uint8_t *out, size_t nbytes, size_t unit_bytes,
               tweak_fill fill, const void *arg, int encrypt) {
    if (x == NULL || unit_bytes == 0 || unit_bytes % BLOCK || nbytes % unit_bytes)
        return -2;
    EVP_CIPHER_CTX *aes = encrypt ? x->enc : x->dec;
    int avx2 = current_isa() == ISA_AVX2;
    /* streaming stores need out 16-byte aligned; 2: also 32-byte aligned, for whole AVX2 stores */
    int stream = nbytes >= STREAM_MIN_BYTES && (uintptr_t)out % 16 == 0 ? 1 + ((uintptr_t)out % 32 == 0) : 0;
    int rc = unit_bytes == LINE ? run_lines(x, aes, in, out, nbytes, fill, arg, avx2, stream)
                                : run_units(x, aes, in, out, nbytes, unit_bytes, fill, arg, avx2, stream);
    if (stream)
        _mm_sfence(); /* streaming stores are weakly ordered: publish them before returning */
    return rc;
}

static void fill_lines(const void *arg, size_t first, size_t n, v2u64 *dst) {
    v2u64 t = {*(const uint64_t *)arg + (uint64_t)first * LINE, 0}, next = {LINE, 0};
    for (size_t i = 0; i < n; i++, t += next)
        dst[i] = t;
}

static void fill_explicit(const void *arg, size_t first, size_t n, v2u64 *dst) {
    memcpy(dst, (const uint8_t *)arg + first * BLOCK, n * BLOCK);
}

/* 64-byte lines from line-aligned hpa: line i has tweak (hpa + 64 i) as 16 bytes little-endian.
 * The caller checks that the addresses do not wrap. 0 on success, negative on failure. */
EXPORT int mktme_xts_lines(mktme_xts *x, const uint8_t *in, uint8_t *out, size_t nbytes, uint64_t hpa,
                           int encrypt) {
    return run(x, in, out, nbytes, LINE, fill_lines, &hpa, encrypt);
}

/* Units of unit_bytes (a multiple of 16), unit u with the 16-byte tweak tweaks[16 u ..]. */
EXPORT int mktme_xts_units(mktme_xts *x, const uint8_t *in, uint8_t *out, size_t nbytes, size_t unit_bytes,
                           const uint8_t *tweaks, int encrypt) {
    return run(x, in, out, nbytes, unit_bytes, fill_explicit, tweaks, encrypt);
}
