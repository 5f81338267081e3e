/*
 * Sync 1.1 operation inversion on a partial MST, in C (part of psky.atproto._native).
 *
 * The firehose checks each commit by undoing its operations on the tree slice the frame
 * carries and comparing the result with prevData.  This module makes the same tree edits as
 * psky.atproto.mst._invert_thorough (the reference algorithm on MST) with the same checks on
 * every node it loads, so wherever it returns a root the Python inverter returns that root
 * too.  Anything it cannot vouch for (a missing or non-canonical node, an op that does not
 * match the tree, unusual CIDs, odd argument types) makes it return None, and the Python
 * code decides and produces the error.
 *
 * Safety against hostile input: every length is checked before it is read; recursion
 * follows tree layers, which are bounded by the key height (at most 128); every allocation
 * comes from a per-call arena freed on return; errors unwind with longjmp to one exit.
 *
 * Plain C99 plus an optional SHA-NI path (x86-64, GCC/Clang, chosen at run time).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define PSKY_SHA_NI 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define PSKY_SHA_NI 0
#endif

/* ---------------------------------------------------------------------------------------
 * SHA-256
 */

static const uint32_t SHA_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t SHA_INIT[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static uint32_t load_be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static void store_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* the portable compression function, for machines without SHA instructions */
static void sha256_blocks_portable(uint32_t st[8], const uint8_t *data, size_t nblocks) {
    uint32_t w[64];
    while (nblocks--) {
        for (int t = 0; t < 16; t++) w[t] = load_be32(data + 4 * t);
        for (int t = 16; t < 64; t++) {
            uint32_t s0 = ROTR(w[t - 15], 7) ^ ROTR(w[t - 15], 18) ^ (w[t - 15] >> 3);
            uint32_t s1 = ROTR(w[t - 2], 17) ^ ROTR(w[t - 2], 19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16] + s0 + w[t - 7] + s1;
        }
        uint32_t a = st[0], b = st[1], c = st[2], d = st[3], e = st[4], f = st[5], g = st[6], h = st[7];
        for (int t = 0; t < 64; t++) {
            uint32_t t1 = h + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + SHA_K[t] + w[t];
            uint32_t t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            h = g;
            g = f;
            f = e;
            e = d + t1;
            d = c;
            c = b;
            b = a;
            a = t1 + t2;
        }
        st[0] += a;
        st[1] += b;
        st[2] += c;
        st[3] += d;
        st[4] += e;
        st[5] += f;
        st[6] += g;
        st[7] += h;
        data += 64;
    }
}

#if PSKY_SHA_NI
/* The SHA extensions: each sha256rnds2 does two rounds on the state split as ABEF/CDGH;
 * the message schedule advances four words at a time with sha256msg1/msg2. */
__attribute__((target("sha,sse4.1,ssse3"))) static void sha256_blocks_shani(uint32_t st[8],
                                                                            const uint8_t *data,
                                                                            size_t nblocks) {
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    __m128i dcba = _mm_loadu_si128((const __m128i *)&st[0]);
    __m128i hgfe = _mm_loadu_si128((const __m128i *)&st[4]);
    __m128i cdab = _mm_shuffle_epi32(dcba, 0xB1);
    __m128i efgh = _mm_shuffle_epi32(hgfe, 0x1B);
    __m128i abef = _mm_alignr_epi8(cdab, efgh, 8);
    __m128i cdgh = _mm_blend_epi16(efgh, cdab, 0xF0);
    while (nblocks--) {
        __m128i abef0 = abef, cdgh0 = cdgh, m[4];
        for (int g = 0; g < 16; g++) {
            __m128i cur;
            if (g < 4) {
                cur = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 16 * g)), bswap);
            } else {
                __m128i a = m[g & 3], b = m[(g + 1) & 3], c = m[(g + 2) & 3], d = m[(g + 3) & 3];
                /* a = W[t-16..t-13], b = W[t-12..t-9], c = W[t-8..t-5], d = W[t-4..t-1] */
                cur = _mm_sha256msg1_epu32(a, b);
                cur = _mm_add_epi32(cur, _mm_alignr_epi8(d, c, 4));
                cur = _mm_sha256msg2_epu32(cur, d);
            }
            m[g & 3] = cur;
            __m128i msg = _mm_add_epi32(cur, _mm_loadu_si128((const __m128i *)&SHA_K[4 * g]));
            cdgh = _mm_sha256rnds2_epu32(cdgh, abef, msg);
            msg = _mm_shuffle_epi32(msg, 0x0E);
            abef = _mm_sha256rnds2_epu32(abef, cdgh, msg);
        }
        abef = _mm_add_epi32(abef, abef0);
        cdgh = _mm_add_epi32(cdgh, cdgh0);
        data += 64;
    }
    __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
    __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);
    dcba = _mm_blend_epi16(feba, dchg, 0xF0);
    hgfe = _mm_alignr_epi8(dchg, feba, 8);
    _mm_storeu_si128((__m128i *)&st[0], dcba);
    _mm_storeu_si128((__m128i *)&st[4], hgfe);
}

/* two independent one-block compressions interleaved: the round instructions of one hide
 * the latency of the other's (key heights come in batches: every key of a node) */
__attribute__((target("sha,sse4.1,ssse3"))) static void sha256_pair_shani(uint32_t st1[8], const uint8_t *b1,
                                                                          uint32_t st2[8], const uint8_t *b2) {
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    __m128i abef[2], cdgh[2], save_abef[2], save_cdgh[2], m[2][4];
    uint32_t *sts[2] = {st1, st2};
    const uint8_t *bs[2] = {b1, b2};
    for (int j = 0; j < 2; j++) {
        __m128i cdab = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&sts[j][0]), 0xB1);
        __m128i efgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&sts[j][4]), 0x1B);
        abef[j] = save_abef[j] = _mm_alignr_epi8(cdab, efgh, 8);
        cdgh[j] = save_cdgh[j] = _mm_blend_epi16(efgh, cdab, 0xF0);
    }
    for (int g = 0; g < 16; g++) {
        __m128i k = _mm_loadu_si128((const __m128i *)&SHA_K[4 * g]);
        for (int j = 0; j < 2; j++) {
            __m128i cur;
            if (g < 4) {
                cur = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(bs[j] + 16 * g)), bswap);
            } else {
                __m128i *mm = m[j];
                cur = _mm_sha256msg1_epu32(mm[g & 3], mm[(g + 1) & 3]);
                cur = _mm_add_epi32(cur, _mm_alignr_epi8(mm[(g + 3) & 3], mm[(g + 2) & 3], 4));
                cur = _mm_sha256msg2_epu32(cur, mm[(g + 3) & 3]);
            }
            m[j][g & 3] = cur;
            __m128i msg = _mm_add_epi32(cur, k);
            cdgh[j] = _mm_sha256rnds2_epu32(cdgh[j], abef[j], msg);
            msg = _mm_shuffle_epi32(msg, 0x0E);
            abef[j] = _mm_sha256rnds2_epu32(abef[j], cdgh[j], msg);
        }
    }
    for (int j = 0; j < 2; j++) {
        __m128i feba = _mm_shuffle_epi32(_mm_add_epi32(abef[j], save_abef[j]), 0x1B);
        __m128i dchg = _mm_shuffle_epi32(_mm_add_epi32(cdgh[j], save_cdgh[j]), 0xB1);
        _mm_storeu_si128((__m128i *)&sts[j][0], _mm_blend_epi16(feba, dchg, 0xF0));
        _mm_storeu_si128((__m128i *)&sts[j][4], _mm_alignr_epi8(dchg, feba, 8));
    }
}

static int cpu_has_sha_ni(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!(c & (1u << 19)) || !(c & (1u << 9))) return 0; /* SSE4.1, SSSE3 */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 29)) != 0;
}
#endif

typedef void (*sha_blocks_fn)(uint32_t st[8], const uint8_t *data, size_t nblocks);
static sha_blocks_fn sha_blocks = sha256_blocks_portable;

static void sha256_with(sha_blocks_fn blocks, const uint8_t *data, size_t len, uint8_t out[32]) {
    uint32_t st[8];
    uint8_t tail[128];
    memcpy(st, SHA_INIT, sizeof st);
    size_t full = len / 64;
    if (full) blocks(st, data, full);
    size_t rest = len - full * 64;
    memset(tail, 0, sizeof tail);
    if (rest) memcpy(tail, data + full * 64, rest);
    tail[rest] = 0x80;
    size_t tail_len = rest < 56 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (size_t i = 0; i < 8; i++) tail[tail_len - 1 - i] = (uint8_t)(bits >> (8 * i));
    blocks(st, tail, tail_len / 64);
    for (int i = 0; i < 8; i++) store_be32(out + 4 * i, st[i]);
}

static void sha256(const uint8_t *data, size_t len, uint8_t out[32]) { sha256_with(sha_blocks, data, len, out); }

#define ONE_BLOCK_MAX 55 /* longest message that pads into one 64-byte block */

/* the padded single block of a short message */
static void pad_block(const uint8_t *data, size_t len, uint8_t blk[64]) {
    if (len) memcpy(blk, data, len);
    blk[len] = 0x80;
    memset(blk + len + 1, 0, 64 - len - 1);
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) blk[63 - i] = (uint8_t)(bits >> (8 * i));
}

/* leading zero bits of a digest given as state words, halved */
static int height_of_state(const uint32_t st[8]) {
    int zeros = 0;
    for (int i = 0; i < 8; i++) {
        uint32_t w = st[i];
        if (w == 0) {
            zeros += 32;
            continue;
        }
        while (!(w & 0x80000000u)) {
            zeros++;
            w <<= 1;
        }
        break;
    }
    return zeros / 2;
}

/* the layer of a key: leading zero bits of its SHA-256, halved */
static int key_height(const uint8_t *key, size_t len) {
    uint32_t st[8];
    if (len <= ONE_BLOCK_MAX) {
        uint8_t blk[64];
        pad_block(key, len, blk);
        memcpy(st, SHA_INIT, sizeof st);
        sha_blocks(st, blk, 1);
        return height_of_state(st);
    }
    uint8_t d[32];
    sha256(key, len, d);
    for (int i = 0; i < 8; i++) st[i] = load_be32(d + 4 * i);
    return height_of_state(st);
}

/* heights of two keys at once (interleaved when both are short and SHA-NI is in use) */
static void key_height_pair(const uint8_t *k1, size_t n1, const uint8_t *k2, size_t n2, int *h1, int *h2) {
#if PSKY_SHA_NI
    if (sha_blocks == sha256_blocks_shani && n1 <= ONE_BLOCK_MAX && n2 <= ONE_BLOCK_MAX) {
        uint8_t b1[64], b2[64];
        uint32_t s1[8], s2[8];
        pad_block(k1, n1, b1);
        pad_block(k2, n2, b2);
        memcpy(s1, SHA_INIT, sizeof s1);
        memcpy(s2, SHA_INIT, sizeof s2);
        sha256_pair_shani(s1, b1, s2, b2);
        *h1 = height_of_state(s1);
        *h2 = height_of_state(s2);
        return;
    }
#endif
    *h1 = key_height(k1, n1);
    *h2 = key_height(k2, n2);
}

/* ---------------------------------------------------------------------------------------
 * per-call state: arena, block table, unwinding
 */

#define CID_LEN 36
#define MAX_KEY_LEN 1024
#define SMALL_MAP 512 /* block maps up to this size are indexed up front; bigger ones lazily */

static const uint8_t NODE_PFX[4] = {0x01, 0x71, 0x12, 0x20};
static const uint8_t RAW_PFX[4] = {0x01, 0x55, 0x12, 0x20};
static uint8_t EMPTY_ROOT[CID_LEN];

typedef struct Chunk {
    struct Chunk *next;
    size_t used, cap;
    /* data follows, max_align_t aligned */
} Chunk;

typedef struct {
    Chunk *head;
} Arena;

typedef struct {
    uint8_t cid[CID_LEN];
    uint8_t used;
    uint8_t verified; /* 0 unknown, 1 matches its CID */
    int16_t layer_ok; /* every key of this block was found at this layer (-1: not yet) */
    PyObject *obj;    /* the bytes object (a strong reference), NULL when missing */
    const uint8_t *data;
    Py_ssize_t len;
} Entry;

typedef struct {
    const uint8_t *p;
    uint32_t n;
} Key;

typedef struct Node Node;

/* a subtree slot: a node in memory, a link not yet followed, or nothing */
typedef struct {
    Node *node;
    const uint8_t *cid;
} Ref;

struct Node {
    uint32_t n; /* number of keys */
    Key *keys;
    const uint8_t **vals; /* CID_LEN bytes each */
    Ref *subs;            /* n + 1: subs[0] is "l", subs[i + 1] entry i's "t" */
    int has_cid;
    uint8_t cid[CID_LEN];
};

typedef struct {
    jmp_buf jb;
    int nomem;
    Arena arena;
    Entry *table;
    size_t cap, count;
    PyObject *blocks; /* the caller's dict */
    int lazy;
    int verify;
    Node *root; /* NULL: the empty tree */
    int layer;
} Ctx;

#ifdef __GNUC__
#define NORETURN __attribute__((noreturn))
#else
#define NORETURN
#endif

static NORETURN void bail(Ctx *c) { longjmp(c->jb, 1); }

static NORETURN void out_of_memory(Ctx *c) {
    c->nomem = 1;
    longjmp(c->jb, 1);
}

#define ALIGN 16

static void *alloc(Ctx *c, size_t size) {
    size = (size + ALIGN - 1) & ~(size_t)(ALIGN - 1);
    Chunk *h = c->arena.head;
    if (h == NULL || h->cap - h->used < size) {
        size_t cap = size > 32768 ? size : 32768;
        size_t hdr = (sizeof(Chunk) + ALIGN - 1) & ~(size_t)(ALIGN - 1);
        if (cap > SIZE_MAX - hdr) out_of_memory(c);
        Chunk *nc = (Chunk *)malloc(hdr + cap);
        if (nc == NULL) out_of_memory(c);
        nc->next = h;
        nc->used = 0;
        nc->cap = cap;
        c->arena.head = nc;
        h = nc;
    }
    size_t hdr = (sizeof(Chunk) + ALIGN - 1) & ~(size_t)(ALIGN - 1);
    void *p = (char *)h + hdr + h->used;
    h->used += size;
    return p;
}

static void *alloc_array(Ctx *c, size_t count, size_t each) {
    if (each && count > (SIZE_MAX / 4) / each) out_of_memory(c);
    size_t size = count * each;
    return alloc(c, size ? size : 1);
}

static void arena_free(Arena *a) {
    Chunk *h = a->head;
    while (h) {
        Chunk *nx = h->next;
        free(h);
        h = nx;
    }
    a->head = NULL;
}

static size_t cid_slot(const uint8_t *cid, size_t mask) {
    uint64_t h;
    memcpy(&h, cid + 4, sizeof h); /* digest bytes: already uniformly spread */
    return (size_t)(h ^ (h >> 29)) & mask;
}

static Entry *table_find(Ctx *c, const uint8_t *cid) {
    size_t mask = c->cap - 1;
    size_t i = cid_slot(cid, mask);
    while (c->table[i].used) {
        if (memcmp(c->table[i].cid, cid, CID_LEN) == 0) return &c->table[i];
        i = (i + 1) & mask;
    }
    return &c->table[i]; /* the free slot where it would go */
}

static int table_init(Ctx *c, size_t want) {
    size_t cap = 16;
    while (cap < want * 2) cap <<= 1;
    c->table = (Entry *)calloc(cap, sizeof(Entry));
    if (c->table == NULL) return -1;
    c->cap = cap;
    c->count = 0;
    return 0;
}

static void table_grow(Ctx *c) {
    size_t old_cap = c->cap;
    Entry *old = c->table;
    Entry *nt = (Entry *)calloc(old_cap * 2, sizeof(Entry));
    if (nt == NULL) out_of_memory(c);
    c->table = nt;
    c->cap = old_cap * 2;
    for (size_t i = 0; i < old_cap; i++) {
        if (!old[i].used) continue;
        Entry *e = table_find(c, old[i].cid);
        *e = old[i];
    }
    free(old);
}

static void table_free(Ctx *c) {
    if (c->table == NULL) return;
    for (size_t i = 0; i < c->cap; i++) Py_XDECREF(c->table[i].obj);
    free(c->table);
    c->table = NULL;
}

static PyObject *CID_type;        /* cbrrr.CID */
static PyObject *str_cid_bytes;   /* "cid_bytes" */

/* the 36 bytes of a CID object of exactly cbrrr.CID, or NULL */
static PyObject *cid_bytes_of(PyObject *obj) {
    if ((PyObject *)Py_TYPE(obj) != CID_type) return NULL;
    PyObject *b = PyObject_GetAttr(obj, str_cid_bytes);
    if (b == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyBytes_CheckExact(b)) {
        Py_DECREF(b);
        return NULL;
    }
    return b; /* new reference */
}

/* index a small block map up front (node links are always 36-byte dag-cbor CIDs) */
static int index_blocks(Ctx *c, PyObject *blocks) {
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(blocks, &pos, &k, &v)) {
        if (!PyBytes_Check(v)) continue;
        PyObject *b = cid_bytes_of(k);
        if (b == NULL) continue;
        if (PyBytes_GET_SIZE(b) == CID_LEN && memcmp(PyBytes_AS_STRING(b), NODE_PFX, 4) == 0) {
            Entry *e = table_find(c, (const uint8_t *)PyBytes_AS_STRING(b));
            if (!e->used) {
                memcpy(e->cid, PyBytes_AS_STRING(b), CID_LEN);
                e->used = 1;
                e->layer_ok = -1;
                Py_INCREF(v);
                e->obj = v;
                e->data = (const uint8_t *)PyBytes_AS_STRING(v);
                e->len = PyBytes_GET_SIZE(v);
                c->count++;
            }
        }
        Py_DECREF(b);
    }
    return 0;
}

/* look a CID up in a big map through the Python CID type (memoized in the table) */
static Entry *lazy_lookup(Ctx *c, const uint8_t *cid) {
    if ((c->count + 1) * 2 > c->cap) table_grow(c);
    Entry *e = table_find(c, cid);
    if (e->used) return e;
    memcpy(e->cid, cid, CID_LEN);
    e->used = 1;
    e->layer_ok = -1;
    c->count++;
    PyObject *raw = PyBytes_FromStringAndSize((const char *)cid, CID_LEN);
    if (raw == NULL) out_of_memory(c);
    PyObject *key = PyObject_CallOneArg(CID_type, raw);
    Py_DECREF(raw);
    if (key == NULL) {
        PyErr_Clear();
        bail(c);
    }
    PyObject *v = PyDict_GetItemWithError(c->blocks, key);
    Py_DECREF(key);
    if (v == NULL) {
        if (PyErr_Occurred()) {
            PyErr_Clear();
            bail(c);
        }
        return e; /* missing */
    }
    if (PyBytes_Check(v)) {
        Py_INCREF(v);
        e->obj = v;
        e->data = (const uint8_t *)PyBytes_AS_STRING(v);
        e->len = PyBytes_GET_SIZE(v);
    }
    return e;
}

/* the block of a node link (checked against its CID when verifying), or bail */
static Entry *block(Ctx *c, const uint8_t *cid) {
    Entry *e = c->lazy ? lazy_lookup(c, cid) : table_find(c, cid);
    if (!e->used || e->data == NULL) bail(c);
    if (c->verify && !e->verified) {
        uint8_t d[32];
        sha256(e->data, (size_t)e->len, d);
        if (memcmp(d, cid + 4, 32) != 0) bail(c);
        e->verified = 1;
    }
    return e;
}

/* ---------------------------------------------------------------------------------------
 * keys
 */

static int kcmp(const uint8_t *a, size_t an, const uint8_t *b, size_t bn) {
    size_t n = an < bn ? an : bn;
    int r = n ? memcmp(a, b, n) : 0;
    if (r) return r;
    return (an > bn) - (an < bn);
}

static uint8_t KEY_CHARS[256]; /* the characters of a repo path segment (filled at import) */

static int key_char(uint8_t ch) { return KEY_CHARS[ch]; }

static void init_key_chars(void) {
    for (int ch = 0; ch < 256; ch++)
        KEY_CHARS[ch] = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
                        ch == '.' || ch == '_' || ch == ':' || ch == '~' || ch == '-';
}

static int dots(const uint8_t *p, size_t n) {
    return (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.');
}

/* repo path syntax (psky.atproto.mst._KEY_RE): collection "/" rkey, allowed ASCII, no "."/".." */
static int valid_key(const uint8_t *k, size_t n) {
    if (n > MAX_KEY_LEN) return 0;
    size_t slash = n;
    for (size_t i = 0; i < n; i++) {
        if (k[i] == '/') {
            if (slash != n) return 0;
            slash = i;
        } else if (!key_char(k[i])) {
            return 0;
        }
    }
    if (slash == n || slash == 0 || slash == n - 1) return 0;
    return !dots(k, slash) && !dots(k + slash + 1, n - slash - 1);
}

static size_t prefix_len(const uint8_t *a, size_t an, const uint8_t *b, size_t bn) {
    size_t n = an < bn ? an : bn, i = 0;
    while (i < n && a[i] == b[i]) i++;
    return i;
}

/* ---------------------------------------------------------------------------------------
 * node decoding: exactly the canonical DAG-CBOR form of {"e": [{"k","p","t","v"}...], "l"}
 */

typedef struct {
    const uint8_t *p, *end;
} Reader;

static int rd_expect(Reader *r, const uint8_t *lit, size_t n) {
    if ((size_t)(r->end - r->p) < n || memcmp(r->p, lit, n) != 0) return 0;
    r->p += n;
    return 1;
}

/* a minimal-length CBOR head of ``major``; 0 on anything else */
static int rd_head(Reader *r, int major, uint64_t *out) {
    if (r->p >= r->end) return 0;
    uint8_t ib = *r->p++;
    if ((ib >> 5) != major) return 0;
    uint8_t ai = ib & 31;
    if (ai < 24) {
        *out = ai;
        return 1;
    }
    size_t n = ai == 24 ? 1 : ai == 25 ? 2 : ai == 26 ? 4 : 0; /* 8-byte heads: never in a node */
    if (n == 0 || (size_t)(r->end - r->p) < n) return 0;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) v = (v << 8) | r->p[i];
    r->p += n;
    uint64_t min = n == 1 ? 24 : n == 2 ? 256 : 65536;
    if (v < min) return 0;
    *out = v;
    return 1;
}

static const uint8_t LINK_HEAD[5] = {0xd8, 0x2a, 0x58, 0x25, 0x00};

/* a 36-byte link (NULL for CBOR null, *ok = 0 on anything else) */
static const uint8_t *rd_link(Reader *r, int nullable, int *ok) {
    if (nullable && r->p < r->end && *r->p == 0xf6) {
        r->p++;
        return NULL;
    }
    if (!rd_expect(r, LINK_HEAD, 5) || r->end - r->p < CID_LEN) {
        *ok = 0;
        return NULL;
    }
    const uint8_t *cid = r->p;
    r->p += CID_LEN;
    return cid;
}

static int node_link(const uint8_t *cid) { return memcmp(cid, NODE_PFX, 4) == 0; }

static int value_link(const uint8_t *cid) { return memcmp(cid, NODE_PFX, 4) == 0 || memcmp(cid, RAW_PFX, 4) == 0; }

static Node *new_node(Ctx *c, uint32_t n) {
    Node *nd = (Node *)alloc(c, sizeof(Node));
    nd->n = n;
    nd->keys = (Key *)alloc_array(c, n, sizeof(Key));
    nd->vals = (const uint8_t **)alloc_array(c, n, sizeof(uint8_t *));
    nd->subs = (Ref *)alloc_array(c, (size_t)n + 1, sizeof(Ref));
    nd->has_cid = 0;
    return nd;
}

/* decode and check a node block: shape, links, key syntax, order and prefix compression */
static Node *parse_node(Ctx *c, const uint8_t *data, Py_ssize_t len, const uint8_t *cid) {
    static const uint8_t start[3] = {0xa2, 0x61, 0x65};
    static const uint8_t ent_k[3] = {0xa4, 0x61, 0x6b};
    static const uint8_t f_p[2] = {0x61, 0x70}, f_t[2] = {0x61, 0x74}, f_v[2] = {0x61, 0x76},
                         f_l[2] = {0x61, 0x6c};
    Reader r = {data, data + len};
    uint64_t count;
    int ok = 1;
    if (!rd_expect(&r, start, 3) || !rd_head(&r, 4, &count)) bail(c);
    if (count > (uint64_t)len / 50) bail(c); /* an entry takes at least 50 bytes */
    Node *nd = new_node(c, (uint32_t)count);
    const uint8_t *prev = NULL;
    size_t prev_n = 0;
    for (uint32_t i = 0; i < (uint32_t)count; i++) {
        uint64_t kn, p;
        if (!rd_expect(&r, ent_k, 3) || !rd_head(&r, 2, &kn) || kn > (uint64_t)(r.end - r.p)) bail(c);
        const uint8_t *k = r.p;
        r.p += kn;
        if (!rd_expect(&r, f_p, 2) || !rd_head(&r, 0, &p) || !rd_expect(&r, f_t, 2)) bail(c);
        const uint8_t *t = rd_link(&r, 1, &ok);
        if (!ok || !rd_expect(&r, f_v, 2)) bail(c);
        const uint8_t *v = rd_link(&r, 0, &ok);
        if (!ok || (t != NULL && !node_link(t)) || !value_link(v)) bail(c);
        if (p > prev_n) bail(c);
        size_t full = (size_t)p + (size_t)kn;
        if (full > MAX_KEY_LEN) bail(c);
        /* maximal compression: the suffix must not start with the previous key's next byte */
        if (p < prev_n && kn && k[0] == prev[p]) bail(c);
        uint8_t *key = (uint8_t *)alloc(c, full ? full : 1);
        if (p) memcpy(key, prev, (size_t)p);
        if (kn) memcpy(key + p, k, (size_t)kn);
        if (i && kcmp(key, full, prev, prev_n) <= 0) bail(c);
        if (!valid_key(key, full)) bail(c);
        nd->keys[i].p = key;
        nd->keys[i].n = (uint32_t)full;
        nd->vals[i] = v;
        nd->subs[i + 1].node = NULL;
        nd->subs[i + 1].cid = t;
        prev = key;
        prev_n = full;
    }
    if (!rd_expect(&r, f_l, 2)) bail(c);
    const uint8_t *l = rd_link(&r, 1, &ok);
    if (!ok || (l != NULL && !node_link(l)) || r.p != r.end) bail(c);
    nd->subs[0].node = NULL;
    nd->subs[0].cid = l;
    memcpy(nd->cid, cid, CID_LEN);
    nd->has_cid = 1;
    return nd;
}

static int has_sub(const Node *n) {
    for (uint32_t i = 0; i <= n->n; i++)
        if (n->subs[i].node || n->subs[i].cid) return 1;
    return 0;
}

static int ref_empty(Ref r) { return r.node == NULL && r.cid == NULL; }

static Ref ref_of(Node *n) {
    Ref r = {n, NULL};
    return r;
}

/* all keys of a block at ``layer`` (memoized per block) */
static void check_layer(Ctx *c, Entry *e, Node *n, int layer) {
    if (e->layer_ok == layer) return;
    uint32_t i = 0;
    for (; i + 1 < n->n; i += 2) {
        int h1, h2;
        key_height_pair(n->keys[i].p, n->keys[i].n, n->keys[i + 1].p, n->keys[i + 1].n, &h1, &h2);
        if (h1 != layer || h2 != layer) bail(c);
    }
    if (i < n->n && key_height(n->keys[i].p, n->keys[i].n) != layer) bail(c);
    e->layer_ok = (int16_t)layer;
}

/* a non-root node expected at ``layer`` with keys strictly inside (lo, hi) (MST._load) */
static Node *load(Ctx *c, const uint8_t *cid, int layer, const Key *lo, const Key *hi) {
    if (layer < 0) bail(c);
    Entry *e = block(c, cid);
    Node *n = parse_node(c, e->data, e->len, cid);
    if (n->n) {
        check_layer(c, e, n, layer);
        if (lo && kcmp(n->keys[0].p, n->keys[0].n, lo->p, lo->n) <= 0) bail(c);
        Key *last = &n->keys[n->n - 1];
        if (hi && kcmp(last->p, last->n, hi->p, hi->n) >= 0) bail(c);
    } else if (ref_empty(n->subs[0])) {
        bail(c);
    }
    if (layer == 0 && has_sub(n)) bail(c);
    return n;
}

static void load_root(Ctx *c, const uint8_t *cid) {
    Entry *e = block(c, cid);
    Node *n = parse_node(c, e->data, e->len, cid);
    if (!n->n) {
        if (!ref_empty(n->subs[0])) bail(c);
        c->root = NULL;
        c->layer = 0;
        return;
    }
    int layer = key_height(n->keys[0].p, n->keys[0].n);
    check_layer(c, e, n, layer);
    if (layer == 0 && has_sub(n)) bail(c);
    c->root = n;
    c->layer = layer;
}

/* exclusive bounds of slot i of a node whose own bounds are (lo, hi) */
static void slot_bounds(Node *n, uint32_t i, const Key *lo, const Key *hi, const Key **slo, const Key **shi) {
    *slo = i ? &n->keys[i - 1] : lo;
    *shi = i < n->n ? &n->keys[i] : hi;
}

/* subtree in slot i given the slot's own bounds, loaded and memoized (MST._slot) */
static Node *slot(Ctx *c, Node *n, uint32_t i, int layer, const Key *lo, const Key *hi) {
    Ref *s = &n->subs[i];
    if (s->node || s->cid == NULL) return s->node;
    s->node = load(c, s->cid, layer, lo, hi);
    return s->node;
}

/* subtree in slot i of n, whose bounds are (lo, hi) (MST._child) */
static Node *child(Ctx *c, Node *n, uint32_t i, int layer, const Key *lo, const Key *hi) {
    const Key *slo, *shi;
    slot_bounds(n, i, lo, hi, &slo, &shi);
    return slot(c, n, i, layer, slo, shi);
}

static uint32_t lower_bound(const Node *n, const uint8_t *kb, size_t kn) {
    uint32_t lo = 0, hi = n->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (kcmp(n->keys[mid].p, n->keys[mid].n, kb, kn) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int key_at(const Node *n, uint32_t i, const uint8_t *kb, size_t kn) {
    return i < n->n && kcmp(n->keys[i].p, n->keys[i].n, kb, kn) == 0;
}

/* ---------------------------------------------------------------------------------------
 * tree edits: the reference algorithm (psky.atproto.mst.MST), on arena nodes
 */

typedef struct {
    const uint8_t *p;
    uint32_t n;
    int h;
} OpKey;

static const uint8_t *tree_get(Ctx *c, const OpKey *k) {
    Node *node = c->root;
    int layer = c->layer;
    if (node == NULL || k->h > layer) return NULL;
    const Key *lo = NULL, *hi = NULL;
    for (;;) {
        uint32_t i = lower_bound(node, k->p, k->n);
        if (layer == k->h) return key_at(node, i, k->p, k->n) ? node->vals[i] : NULL;
        const Key *nlo, *nhi;
        slot_bounds(node, i, lo, hi, &nlo, &nhi);
        Node *ch = child(c, node, i, layer - 1, lo, hi);
        if (ch == NULL) return NULL;
        node = ch;
        layer--;
        lo = nlo;
        hi = nhi;
    }
}

/* a node of keys[a:b] (and vals) of ``src`` with the given subtrees; NULL when empty with no subtree */
static Node *mk(Ctx *c, uint32_t n, Ref first_sub) {
    if (n == 0 && ref_empty(first_sub)) return NULL;
    return new_node(c, n);
}

static void split(Ctx *c, Node *n, int layer, const OpKey *k, const Key *lo, const Key *hi, Node **left,
                  Node **right) {
    if (n == NULL) {
        *left = *right = NULL;
        return;
    }
    uint32_t i = lower_bound(n, k->p, k->n);
    Node *sl = NULL, *sr = NULL;
    if (ref_empty(n->subs[i])) {
        if (i == n->n) {
            *left = n;
            *right = NULL;
            return;
        }
        if (i == 0) {
            *left = NULL;
            *right = n;
            return;
        }
    } else {
        const Key *slo, *shi;
        slot_bounds(n, i, lo, hi, &slo, &shi);
        Node *sub = child(c, n, i, layer - 1, lo, hi);
        split(c, sub, layer - 1, k, slo, shi, &sl, &sr);
    }
    /* left: keys[:i], subs[:i] + [sl] */
    Node *l = mk(c, i, i ? n->subs[0] : ref_of(sl));
    if (l) {
        memcpy(l->keys, n->keys, i * sizeof(Key));
        memcpy(l->vals, n->vals, i * sizeof(uint8_t *));
        memcpy(l->subs, n->subs, i * sizeof(Ref));
        l->subs[i] = ref_of(sl);
    }
    /* right: keys[i:], [sr] + subs[i+1:] */
    uint32_t rn = n->n - i;
    Node *r = mk(c, rn, ref_of(sr));
    if (r) {
        memcpy(r->keys, n->keys + i, rn * sizeof(Key));
        memcpy(r->vals, n->vals + i, rn * sizeof(uint8_t *));
        r->subs[0] = ref_of(sr);
        memcpy(r->subs + 1, n->subs + i + 1, rn * sizeof(Ref));
    }
    *left = l;
    *right = r;
}

static Node *leaf1(Ctx *c, const OpKey *k, const uint8_t *val) {
    Node *nd = new_node(c, 1);
    nd->keys[0].p = k->p;
    nd->keys[0].n = k->n;
    nd->vals[0] = val;
    nd->subs[0].node = nd->subs[1].node = NULL;
    nd->subs[0].cid = nd->subs[1].cid = NULL;
    return nd;
}

static Node *wrap(Ctx *c, Node *sub) {
    Node *nd = new_node(c, 0);
    nd->subs[0] = ref_of(sub);
    return nd;
}

static Node *insert(Ctx *c, Node *n, int layer, const OpKey *k, const uint8_t *val, const Key *lo,
                    const Key *hi) {
    if (layer < 0) bail(c);
    if (n == NULL) {
        if (k->h == layer) return leaf1(c, k, val);
        return wrap(c, insert(c, NULL, layer - 1, k, val, lo, hi));
    }
    uint32_t i = lower_bound(n, k->p, k->n);
    if (k->h == layer) {
        if (key_at(n, i, k->p, k->n)) {
            Node *nd = new_node(c, n->n);
            memcpy(nd->keys, n->keys, n->n * sizeof(Key));
            memcpy(nd->vals, n->vals, n->n * sizeof(uint8_t *));
            memcpy(nd->subs, n->subs, ((size_t)n->n + 1) * sizeof(Ref));
            nd->vals[i] = val;
            return nd;
        }
        const Key *slo, *shi;
        slot_bounds(n, i, lo, hi, &slo, &shi);
        Node *sub = child(c, n, i, layer - 1, lo, hi);
        Node *l, *r;
        split(c, sub, layer - 1, k, slo, shi, &l, &r);
        Node *nd = new_node(c, n->n + 1);
        memcpy(nd->keys, n->keys, i * sizeof(Key));
        memcpy(nd->vals, n->vals, i * sizeof(uint8_t *));
        memcpy(nd->subs, n->subs, i * sizeof(Ref));
        nd->keys[i].p = k->p;
        nd->keys[i].n = k->n;
        nd->vals[i] = val;
        nd->subs[i] = ref_of(l);
        nd->subs[i + 1] = ref_of(r);
        memcpy(nd->keys + i + 1, n->keys + i, (n->n - i) * sizeof(Key));
        memcpy(nd->vals + i + 1, n->vals + i, (n->n - i) * sizeof(uint8_t *));
        memcpy(nd->subs + i + 2, n->subs + i + 1, (n->n - i) * sizeof(Ref));
        return nd;
    }
    const Key *clo, *chi;
    slot_bounds(n, i, lo, hi, &clo, &chi);
    Node *sub = child(c, n, i, layer - 1, lo, hi);
    Node *nd = new_node(c, n->n);
    memcpy(nd->keys, n->keys, n->n * sizeof(Key));
    memcpy(nd->vals, n->vals, n->n * sizeof(uint8_t *));
    memcpy(nd->subs, n->subs, ((size_t)n->n + 1) * sizeof(Ref));
    nd->subs[i] = ref_of(insert(c, sub, layer - 1, k, val, clo, chi));
    return nd;
}

static void tree_put(Ctx *c, const OpKey *k, const uint8_t *val) {
    Node *root = c->root;
    int layer = c->layer;
    if (root == NULL) {
        c->root = leaf1(c, k, val);
        c->layer = k->h;
    } else if (k->h > layer) {
        Node *l, *r;
        split(c, root, layer, k, NULL, NULL, &l, &r);
        for (int j = layer + 1; j < k->h; j++) {
            l = l ? wrap(c, l) : NULL;
            r = r ? wrap(c, r) : NULL;
        }
        Node *nd = leaf1(c, k, val);
        nd->subs[0] = ref_of(l);
        nd->subs[1] = ref_of(r);
        c->root = nd;
        c->layer = k->h;
    } else {
        c->root = insert(c, root, layer, k, val, NULL, NULL);
    }
}

/* join the subtrees in slot ia of pa and slot ib of pb (keys of the first < mid < the second) */
static Ref merge(Ctx *c, Node *pa, uint32_t ia, Node *pb, uint32_t ib, int layer, const Key *lo, const Key *mid,
                 const Key *hi) {
    Ref a_ref = pa->subs[ia], b_ref = pb->subs[ib];
    if (ref_empty(a_ref)) return b_ref;
    if (ref_empty(b_ref)) return a_ref;
    Node *a = slot(c, pa, ia, layer, lo, mid);
    Node *b = slot(c, pb, ib, layer, mid, hi);
    if (a == NULL || b == NULL) bail(c);
    const Key *a_hi = a->n ? &a->keys[a->n - 1] : lo;
    const Key *b_lo = b->n ? &b->keys[0] : hi;
    Ref inner = merge(c, a, a->n, b, 0, layer - 1, a_hi, mid, b_lo);
    Node *nd = new_node(c, a->n + b->n);
    memcpy(nd->keys, a->keys, a->n * sizeof(Key));
    memcpy(nd->keys + a->n, b->keys, b->n * sizeof(Key));
    memcpy(nd->vals, a->vals, a->n * sizeof(uint8_t *));
    memcpy(nd->vals + a->n, b->vals, b->n * sizeof(uint8_t *));
    memcpy(nd->subs, a->subs, a->n * sizeof(Ref));
    nd->subs[a->n] = inner;
    memcpy(nd->subs + a->n + 1, b->subs + 1, b->n * sizeof(Ref));
    return ref_of(nd);
}

static Node *del(Ctx *c, Node *n, int layer, const OpKey *k, const Key *lo, const Key *hi) {
    uint32_t i = lower_bound(n, k->p, k->n);
    if (layer == k->h) {
        if (!key_at(n, i, k->p, k->n)) bail(c);
        const Key *lo_i = i ? &n->keys[i - 1] : lo;
        const Key *hi_i = i + 1 < n->n ? &n->keys[i + 1] : hi;
        Key mid = n->keys[i];
        Ref merged = merge(c, n, i, n, i + 1, layer - 1, lo_i, &mid, hi_i);
        uint32_t m = n->n - 1;
        Ref first = i ? n->subs[0] : merged;
        if (m == 0 && ref_empty(first)) return NULL;
        Node *nd = new_node(c, m);
        memcpy(nd->keys, n->keys, i * sizeof(Key));
        memcpy(nd->keys + i, n->keys + i + 1, (m - i) * sizeof(Key));
        memcpy(nd->vals, n->vals, i * sizeof(uint8_t *));
        memcpy(nd->vals + i, n->vals + i + 1, (m - i) * sizeof(uint8_t *));
        memcpy(nd->subs, n->subs, i * sizeof(Ref));
        nd->subs[i] = merged;
        memcpy(nd->subs + i + 1, n->subs + i + 2, (m - i) * sizeof(Ref));
        return nd;
    }
    if (layer < k->h || layer <= 0) bail(c);
    const Key *clo, *chi;
    slot_bounds(n, i, lo, hi, &clo, &chi);
    Node *sub = child(c, n, i, layer - 1, lo, hi);
    if (sub == NULL) bail(c);
    Node *newsub = del(c, sub, layer - 1, k, clo, chi);
    if (n->n == 0 && newsub == NULL) return NULL; /* i == 0 here: the slot was the only content */
    Node *nd = new_node(c, n->n);
    memcpy(nd->keys, n->keys, n->n * sizeof(Key));
    memcpy(nd->vals, n->vals, n->n * sizeof(uint8_t *));
    memcpy(nd->subs, n->subs, ((size_t)n->n + 1) * sizeof(Ref));
    nd->subs[i] = ref_of(newsub);
    return nd;
}

static void tree_remove(Ctx *c, const OpKey *k) {
    if (c->root == NULL || k->h > c->layer) bail(c);
    int layer = c->layer;
    Node *nd = del(c, c->root, layer, k, NULL, NULL);
    /* an emptied root gives way to its only subtree, repeatedly */
    while (nd != NULL && nd->n == 0) {
        layer--;
        nd = slot(c, nd, 0, layer, NULL, NULL);
    }
    c->root = nd;
    c->layer = nd ? layer : 0;
}

/* ---------------------------------------------------------------------------------------
 * encoding and hashing changed nodes
 */

static size_t head_len(uint64_t v) { return v < 24 ? 1 : v < 256 ? 2 : v < 65536 ? 3 : 5; }

static uint8_t *put_head(uint8_t *o, int major, uint64_t v) {
    uint8_t m = (uint8_t)(major << 5);
    if (v < 24) {
        *o++ = m | (uint8_t)v;
    } else if (v < 256) {
        *o++ = m | 24;
        *o++ = (uint8_t)v;
    } else if (v < 65536) {
        *o++ = m | 25;
        *o++ = (uint8_t)(v >> 8);
        *o++ = (uint8_t)v;
    } else {
        *o++ = m | 26;
        store_be32(o, (uint32_t)v);
        o += 4;
    }
    return o;
}

static uint8_t *put_link(uint8_t *o, const uint8_t *cid) {
    if (cid == NULL) {
        *o++ = 0xf6;
        return o;
    }
    memcpy(o, LINK_HEAD, 5);
    memcpy(o + 5, cid, CID_LEN);
    return o + 5 + CID_LEN;
}

static const uint8_t *node_cid(Ctx *c, Node *n);

static const uint8_t *ref_cid(Ctx *c, Ref r) {
    if (r.node) return node_cid(c, r.node);
    return r.cid;
}

/* CID of a node, encoding it canonically (and its new children first) on first use */
static const uint8_t *node_cid(Ctx *c, Node *n) {
    if (n->has_cid) return n->cid;
    const uint8_t **links = (const uint8_t **)alloc_array(c, (size_t)n->n + 1, sizeof(uint8_t *));
    for (uint32_t i = 0; i <= n->n; i++) links[i] = ref_cid(c, n->subs[i]);
    size_t size = 3 + head_len(n->n) + 2 + 41;
    const uint8_t *prev = NULL;
    size_t prev_n = 0;
    for (uint32_t i = 0; i < n->n; i++) {
        size_t p = prefix_len(prev, prev_n, n->keys[i].p, n->keys[i].n);
        size_t sn = n->keys[i].n - p;
        size += 3 + head_len(sn) + sn + 2 + head_len(p) + 2 + 41 + 2 + 41;
        prev = n->keys[i].p;
        prev_n = n->keys[i].n;
    }
    uint8_t *buf = (uint8_t *)alloc(c, size);
    uint8_t *o = buf;
    *o++ = 0xa2;
    *o++ = 0x61;
    *o++ = 'e';
    o = put_head(o, 4, n->n);
    prev = NULL;
    prev_n = 0;
    for (uint32_t i = 0; i < n->n; i++) {
        const Key *k = &n->keys[i];
        size_t p = prefix_len(prev, prev_n, k->p, k->n);
        *o++ = 0xa4;
        *o++ = 0x61;
        *o++ = 'k';
        o = put_head(o, 2, k->n - p);
        memcpy(o, k->p + p, k->n - p);
        o += k->n - p;
        *o++ = 0x61;
        *o++ = 'p';
        o = put_head(o, 0, p);
        *o++ = 0x61;
        *o++ = 't';
        o = put_link(o, links[i + 1]);
        *o++ = 0x61;
        *o++ = 'v';
        o = put_link(o, n->vals[i]);
        prev = k->p;
        prev_n = k->n;
    }
    *o++ = 0x61;
    *o++ = 'l';
    o = put_link(o, links[0]);
    memcpy(n->cid, NODE_PFX, 4);
    sha256(buf, (size_t)(o - buf), n->cid + 4);
    n->has_cid = 1;
    return n->cid;
}

/* ---------------------------------------------------------------------------------------
 * the Python entry point
 */

enum { A_CREATE, A_UPDATE, A_DELETE };

typedef struct {
    int action;
    OpKey key;
    const uint8_t *cid;  /* create/update */
    const uint8_t *prev; /* update/delete */
} NOp;

/* a copy of an op's CID (a value link), NULL for None; bails on anything unusual */
static const uint8_t *op_cid(Ctx *c, PyObject *obj, int *present) {
    if (obj == Py_None) {
        *present = 0;
        return NULL;
    }
    *present = 1;
    PyObject *b = cid_bytes_of(obj);
    if (b == NULL) bail(c);
    if (PyBytes_GET_SIZE(b) != CID_LEN || !value_link((const uint8_t *)PyBytes_AS_STRING(b))) {
        Py_DECREF(b);
        bail(c);
    }
    uint8_t *out = (uint8_t *)alloc(c, CID_LEN);
    memcpy(out, PyBytes_AS_STRING(b), CID_LEN);
    Py_DECREF(b);
    return out;
}

static void read_op(Ctx *c, PyObject *op, NOp *out) {
    if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) != 4) bail(c);
    PyObject *action = PyTuple_GET_ITEM(op, 0), *path = PyTuple_GET_ITEM(op, 1);
    if (!PyUnicode_Check(action) || !PyUnicode_Check(path)) bail(c);
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(path) < 0) {
        PyErr_Clear();
        bail(c);
    }
#endif
    if (!PyUnicode_IS_ASCII(path)) bail(c);
    if (PyUnicode_CompareWithASCIIString(action, "create") == 0)
        out->action = A_CREATE;
    else if (PyUnicode_CompareWithASCIIString(action, "update") == 0)
        out->action = A_UPDATE;
    else if (PyUnicode_CompareWithASCIIString(action, "delete") == 0)
        out->action = A_DELETE;
    else
        bail(c);
    int has_cid, has_prev;
    out->cid = op_cid(c, PyTuple_GET_ITEM(op, 2), &has_cid);
    out->prev = op_cid(c, PyTuple_GET_ITEM(op, 3), &has_prev);
    if (out->action == A_CREATE ? !(has_cid && !has_prev)
        : out->action == A_UPDATE ? !(has_cid && has_prev)
                                  : !(!has_cid && has_prev))
        bail(c);
    Py_ssize_t n = PyUnicode_GET_LENGTH(path);
    const uint8_t *s = PyUnicode_1BYTE_DATA(path);
    if (n > MAX_KEY_LEN || !valid_key(s, (size_t)n)) bail(c);
    uint8_t *kb = (uint8_t *)alloc(c, (size_t)n);
    memcpy(kb, s, (size_t)n);
    out->key.p = kb;
    out->key.n = (uint32_t)n;
    out->key.h = key_height(kb, (size_t)n);
}

#define MAX_NATIVE_OPS 256 /* more (beyond any firehose commit) are left to Python */

static PyObject *py_invert(PyObject *self, PyObject *args) {
    PyObject *blocks, *root_obj, *ops_obj;
    int verify;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOp", &blocks, &root_obj, &ops_obj, &verify)) return NULL;
    if (!PyDict_CheckExact(blocks)) Py_RETURN_NONE; /* a plain dict: its own lookups, no overrides */
    PyObject *ops = PySequence_Fast(ops_obj, "ops must be a sequence");
    if (ops == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *root_bytes = cid_bytes_of(root_obj);
    Py_ssize_t nops = PySequence_Fast_GET_SIZE(ops);
    if (root_bytes == NULL || nops > MAX_NATIVE_OPS || PyBytes_GET_SIZE(root_bytes) != CID_LEN ||
        !node_link((const uint8_t *)PyBytes_AS_STRING(root_bytes))) {
        Py_XDECREF(root_bytes);
        Py_DECREF(ops);
        Py_RETURN_NONE;
    }
    uint8_t root_cid[CID_LEN];
    memcpy(root_cid, PyBytes_AS_STRING(root_bytes), CID_LEN);
    Py_DECREF(root_bytes);

    Ctx *c = (Ctx *)calloc(1, sizeof(Ctx));
    if (c == NULL) {
        Py_DECREF(ops);
        return PyErr_NoMemory();
    }
    c->blocks = blocks;
    c->verify = verify;
    PyObject *result = NULL;
    Py_ssize_t nblocks = PyDict_GET_SIZE(blocks);
    c->lazy = nblocks > SMALL_MAP;
    if (table_init(c, c->lazy ? 32 : (size_t)nblocks) < 0) {
        free(c);
        Py_DECREF(ops);
        return PyErr_NoMemory();
    }
    if (setjmp(c->jb) == 0) {
        if (!c->lazy) index_blocks(c, blocks);
        NOp *nop = (NOp *)alloc_array(c, (size_t)nops, sizeof(NOp));
        for (Py_ssize_t i = 0; i < nops; i++) {
            read_op(c, PySequence_Fast_GET_ITEM(ops, i), &nop[i]);
            for (Py_ssize_t j = 0; j < i; j++)
                if (kcmp(nop[j].key.p, nop[j].key.n, nop[i].key.p, nop[i].key.n) == 0) bail(c);
        }
        const uint8_t *out;
        if (nops == 0) {
            out = root_cid;
        } else {
            load_root(c, root_cid);
            /* every op must agree with the tree after the commit */
            for (Py_ssize_t i = 0; i < nops; i++) {
                const uint8_t *cur = tree_get(c, &nop[i].key);
                if (nop[i].action == A_DELETE) {
                    if (cur != NULL) bail(c);
                } else if (cur == NULL || memcmp(cur, nop[i].cid, CID_LEN) != 0) {
                    bail(c);
                }
            }
            for (Py_ssize_t i = 0; i < nops; i++) {
                if (nop[i].action == A_CREATE)
                    tree_remove(c, &nop[i].key);
                else
                    tree_put(c, &nop[i].key, nop[i].prev);
            }
            out = c->root ? node_cid(c, c->root) : EMPTY_ROOT;
        }
        result = PyBytes_FromStringAndSize((const char *)out, CID_LEN);
    } else if (c->nomem) {
        PyErr_NoMemory();
    } else {
        Py_INCREF(Py_None);
        result = Py_None;
    }
    arena_free(&c->arena);
    table_free(c);
    free(c);
    Py_DECREF(ops);
    return result;
}

static PyObject *py_sha256(PyObject *self, PyObject *args) {
    Py_buffer buf;
    int portable = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*|p", &buf, &portable)) return NULL;
    uint8_t d[32];
    sha256_with(portable ? sha256_blocks_portable : sha_blocks, (const uint8_t *)buf.buf, (size_t)buf.len, d);
    PyBuffer_Release(&buf);
    return PyBytes_FromStringAndSize((const char *)d, 32);
}

static PyObject *py_key_height(PyObject *self, PyObject *args) {
    Py_buffer buf;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*", &buf)) return NULL;
    int h = key_height((const uint8_t *)buf.buf, (size_t)buf.len);
    PyBuffer_Release(&buf);
    return PyLong_FromLong(h);
}

static PyObject *py_key_heights(PyObject *self, PyObject *args) {
    Py_buffer a, b;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*", &a, &b)) return NULL;
    int h1, h2;
    key_height_pair((const uint8_t *)a.buf, (size_t)a.len, (const uint8_t *)b.buf, (size_t)b.len, &h1, &h2);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return Py_BuildValue("(ii)", h1, h2);
}

/* test hook: run on the portable SHA-256 (as on CPUs without SHA-NI); returns whether SHA-NI is now used */
static PyObject *py_use_sha_ni(PyObject *self, PyObject *args) {
    int enable;
    (void)self;
    if (!PyArg_ParseTuple(args, "p", &enable)) return NULL;
    sha_blocks = sha256_blocks_portable;
#if PSKY_SHA_NI
    if (enable && cpu_has_sha_ni()) sha_blocks = sha256_blocks_shani;
#endif
    return PyBool_FromLong(sha_blocks != sha256_blocks_portable);
}

