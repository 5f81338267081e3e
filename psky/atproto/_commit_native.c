/*
 * The firehose commit fast path: one subscribeRepos frame in, its stream events out.
 *
 * The Python path decodes a #commit frame into objects, indexes its CAR slice, decodes each
 * record into a dict and serialises each event with orjson: about 40 µs a frame, most of
 * the ingester's time.  This file does the same in one pass over the frame bytes and writes
 * each event's JSON directly.  It handles only the usual, fully valid commit: canonical
 * DAG-CBOR throughout, 36-byte sha-256 CIDs, known fields, valid ops whose records are all
 * present and, when verifying, every block matching its CID, the commit block well formed
 * and the sync 1.1 proof (operation inversion, _mst_native.c) giving prevData, or without
 * prevData every op agreeing with the signed tree (as the Python path checks).  On anything
 * else it returns None and the Python path decides and reports, so the events are the same
 * whichever path ran; tests/test_commit_native.py holds the two to that.
 *
 * Signature and repo-state checks stay in Python (they need the key cache and Redis); this
 * returns the commit's unsigned bytes and signature for them.
 *
 * Included by _native.c after _mst_native.c (it uses that file's context, arena, block
 * table, SHA-256 and tree edits).
 */

#define FAST_MAX_BLOCKS_BYTES 2000000 /* psky.atproto.firehose.MAX_COMMIT_BLOCKS_BYTES */
#define FAST_MAX_RECORD_BYTES 1000000 /* MAX_RECORD_BYTES */
#define FAST_MAX_OPS 200              /* MAX_OPS */
#define FAST_MAX_BLOCK (2 * 1024 * 1024) /* car.DEFAULT_MAX_BLOCK_SIZE */
#define FAST_MAX_DEPTH 64             /* below cbor.MAX_DEPTH (128): deeper records go to Python */
#define INT64_MAX_U ((uint64_t)INT64_MAX)

/* ---------------------------------------------------------------------------------------
 * output buffer (malloc'd, freed at the single exit)
 */

typedef struct {
    char *p;
    size_t n, cap;
} Buf;

typedef struct {
    Ctx c; /* first: bail() and the arena work on a Fast as on a Ctx */
    Buf out;
} Fast;

static void buf_reserve(Fast *f, size_t more) {
    Buf *b = &f->out;
    if (b->cap - b->n >= more) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->n < more) {
        if (cap > SIZE_MAX / 4) out_of_memory(&f->c);
        cap *= 2;
    }
    char *np = (char *)realloc(b->p, cap);
    if (np == NULL) out_of_memory(&f->c);
    b->p = np;
    b->cap = cap;
}

static void put_raw(Fast *f, const void *s, size_t n) {
    buf_reserve(f, n);
    memcpy(f->out.p + f->out.n, s, n);
    f->out.n += n;
}

#define PUT_LIT(f, lit) put_raw((f), (lit), sizeof(lit) - 1)

static void put_u64(Fast *f, uint64_t v) {
    char tmp[24];
    int i = 24;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put_raw(f, tmp + i, (size_t)(24 - i));
}

/* ---------------------------------------------------------------------------------------
 * text: strict UTF-8 and JSON escaping as orjson writes it
 */

/* length of the valid UTF-8 sequence at p (1-4), 0 if invalid (overlong, surrogate, > U+10FFFF) */
static size_t utf8_seq(const uint8_t *p, const uint8_t *end) {
    uint8_t b = p[0];
    if (b < 0x80) return 1;
    if (b < 0xC2) return 0;
    if (b < 0xE0) return (end - p >= 2 && (p[1] & 0xC0) == 0x80) ? 2 : 0;
    if (b < 0xF0) {
        if (end - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
        if (b == 0xE0 && p[1] < 0xA0) return 0; /* overlong */
        if (b == 0xED && p[1] >= 0xA0) return 0; /* surrogate */
        return 3;
    }
    if (b < 0xF5) {
        if (end - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
        if (b == 0xF0 && p[1] < 0x90) return 0; /* overlong */
        if (b == 0xF4 && p[1] >= 0x90) return 0; /* above U+10FFFF */
        return 4;
    }
    return 0;
}

static int valid_utf8(const uint8_t *p, size_t n) {
    const uint8_t *end = p + n;
    while (p < end) {
        if (*p < 0x80) {
            p++;
            continue;
        }
        size_t k = utf8_seq(p, end);
        if (k == 0) return 0;
        p += k;
    }
    return 1;
}

static const char HEX[16] = "0123456789abcdef";

/* a JSON string of UTF-8 text (validated here; bails on invalid) */
#if defined(__SSE2__) && (defined(__GNUC__) || defined(__clang__))
#include <emmintrin.h>
#define PSKY_SSE2_SCAN 1
#endif

/* the first byte at or after p that is not plain ASCII to copy as is (a control character,
 * '"', '\\', or the start of a multi-byte sequence), or end */
static inline const uint8_t *plain_ascii_end(const uint8_t *p, const uint8_t *end) {
#if PSKY_SSE2_SCAN
    const __m128i space = _mm_set1_epi8(0x20), quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\');
    while (end - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        /* signed: bytes >= 0x80 are negative, so "below 0x20" also catches them */
        __m128i special = _mm_or_si128(_mm_cmplt_epi8(v, space),
                                       _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)));
        int mask = _mm_movemask_epi8(special);
        if (mask != 0) return p + __builtin_ctz((unsigned)mask);
        p += 16;
    }
#endif
    while (p < end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\') p++;
    return p;
}

static void put_str(Fast *f, const uint8_t *s, size_t n) {
    buf_reserve(f, n + 2);
    f->out.p[f->out.n++] = '"';
    const uint8_t *p = s, *end = s + n, *run = s;
    while (p < end) {
        p = plain_ascii_end(p, end);
        if (p == end) break;
        uint8_t b = *p;
        if (b >= 0x80) {
            size_t k = utf8_seq(p, end);
            if (k == 0) bail(&f->c);
            p += k;
            continue;
        }
        if (b >= 0x20 && b != '"' && b != '\\') {
            p++;
            continue;
        }
        put_raw(f, run, (size_t)(p - run));
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        size_t en = 2;
        switch (b) {
            case '"': esc[1] = '"'; break;
            case '\\': esc[1] = '\\'; break;
            case '\b': esc[1] = 'b'; break;
            case '\t': esc[1] = 't'; break;
            case '\n': esc[1] = 'n'; break;
            case '\f': esc[1] = 'f'; break;
            case '\r': esc[1] = 'r'; break;
            default:
                esc[1] = 'u';
                esc[2] = '0';
                esc[3] = '0';
                esc[4] = HEX[b >> 4];
                esc[5] = HEX[b & 15];
                en = 6;
        }
        put_raw(f, esc, en);
        run = ++p;
    }
    put_raw(f, run, (size_t)(p - run));
    buf_reserve(f, 1);
    f->out.p[f->out.n++] = '"';
}

static const char B32[33] = "abcdefghijklmnopqrstuvwxyz234567";

/* "b" + lowercase unpadded base32 of a 36-byte CID (as cbrrr and libipld print it) */
static void put_cid_text(Fast *f, const uint8_t *cid) {
    char tmp[1 + 58];
    size_t o = 0;
    tmp[o++] = 'b';
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < CID_LEN; i++) {
        acc = (acc << 8) | cid[i];
        bits += 8;
        while (bits >= 5) {
            bits -= 5;
            tmp[o++] = B32[(acc >> bits) & 31];
        }
    }
    if (bits > 0) tmp[o++] = B32[(acc << (5 - bits)) & 31];
    put_raw(f, tmp, o);
}

static const char B64[65] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void put_b64(Fast *f, const uint8_t *s, size_t n) {
    if (n > SIZE_MAX / 2) out_of_memory(&f->c);
    buf_reserve(f, (n + 2) / 3 * 4);
    char *o = f->out.p + f->out.n;
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8) | s[i + 2];
        *o++ = B64[v >> 18];
        *o++ = B64[(v >> 12) & 63];
        *o++ = B64[(v >> 6) & 63];
        *o++ = B64[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)s[i] << 16;
        *o++ = B64[v >> 18];
        *o++ = B64[(v >> 12) & 63];
    } else if (n - i == 2) {
        uint32_t v = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8);
        *o++ = B64[v >> 18];
        *o++ = B64[(v >> 12) & 63];
        *o++ = B64[(v >> 6) & 63];
    }
    f->out.n = (size_t)(o - f->out.p);
}

/* ---------------------------------------------------------------------------------------
 * strict DAG-CBOR reading
 */

typedef struct {
    const uint8_t *p;
    size_t n;
} Span;

/* any minimal-length head (8-byte arguments included); returns the major type, -1 if not minimal */
static int rd_any_head(Fast *f, Reader *r, uint64_t *out) {
    if (r->p >= r->end) bail(&f->c);
    uint8_t ib = *r->p++;
    int major = ib >> 5;
    uint8_t ai = ib & 31;
    if (major == 7) { /* simple values and floats: the caller looks at ai */
        *out = ai;
        return 7;
    }
    if (ai < 24) {
        *out = ai;
        return major;
    }
    size_t n = ai == 24 ? 1 : ai == 25 ? 2 : ai == 26 ? 4 : ai == 27 ? 8 : 0;
    if (n == 0 || (size_t)(r->end - r->p) < n) bail(&f->c); /* indefinite lengths, reserved */
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) v = (v << 8) | r->p[i];
    r->p += n;
    uint64_t min = n == 1 ? 24 : n == 2 ? 256 : n == 4 ? 65536 : 0x100000000ULL;
    if (v < min) bail(&f->c);
    *out = v;
    return major;
}


static Span rd_span(Fast *f, Reader *r, int major) {
    uint64_t n;
    if (rd_any_head(f, r, &n) != major || n > (uint64_t)(r->end - r->p)) bail(&f->c);
    Span s = {r->p, (size_t)n};
    r->p += n;
    return s;
}

static Span rd_text(Fast *f, Reader *r) {
    Span s = rd_span(f, r, 3);
    if (!valid_utf8(s.p, s.n)) bail(&f->c);
    return s;
}

/* map keys in DAG-CBOR order: shorter first, then bytewise; strictly increasing */
static void key_after(Fast *f, Span prev, Span key) {
    if (prev.p == NULL) return;
    if (key.n < prev.n) bail(&f->c);
    if (key.n == prev.n && memcmp(prev.p, key.p, key.n) >= 0) bail(&f->c);
}

static int span_is(Span s, const char *lit) {
    size_t n = strlen(lit);
    return s.n == n && memcmp(s.p, lit, n) == 0;
}

static int span_eq(Span a, Span b) { return a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, a.n) == 0); }

/* a 36-byte sha-256 CID link (dag-cbor or raw); NULL for null when nullable */
static const uint8_t *rd_cid(Fast *f, Reader *r, int nullable) {
    int ok = 1;
    const uint8_t *cid = rd_link(r, nullable, &ok);
    if (!ok || (cid != NULL && !value_link(cid))) bail(&f->c);
    return cid;
}

/* one DAG-CBOR value as lex JSON (cbrrr's atjson form, serialised as orjson does) */
static void json_value(Fast *f, Reader *r, int depth) {
    uint64_t v;
    int major = rd_any_head(f, r, &v);
    switch (major) {
        case 0:
            if (v > INT64_MAX_U) bail(&f->c); /* decode_lex refuses it */
            put_u64(f, v);
            return;
        case 1:
            if (v > INT64_MAX_U) bail(&f->c);
            PUT_LIT(f, "-");
            put_u64(f, v + 1);
            return;
        case 2:
            if (v > (uint64_t)(r->end - r->p)) bail(&f->c);
            PUT_LIT(f, "{\"$bytes\":\"");
            put_b64(f, r->p, (size_t)v);
            PUT_LIT(f, "\"}");
            r->p += v;
            return;
        case 3:
            if (v > (uint64_t)(r->end - r->p)) bail(&f->c);
            put_str(f, r->p, (size_t)v);
            r->p += v;
            return;
        case 4: {
            if (depth >= FAST_MAX_DEPTH || v > (uint64_t)(r->end - r->p)) bail(&f->c); /* >= 1 byte each */
            PUT_LIT(f, "[");
            for (uint64_t i = 0; i < v; i++) {
                if (i) PUT_LIT(f, ",");
                json_value(f, r, depth + 1);
            }
            PUT_LIT(f, "]");
            return;
        }
        case 5: {
            if (depth >= FAST_MAX_DEPTH || v > (uint64_t)(r->end - r->p) / 2) bail(&f->c);
            PUT_LIT(f, "{");
            Span prev = {NULL, 0};
            for (uint64_t i = 0; i < v; i++) {
                Span key = rd_span(f, r, 3);
                key_after(f, prev, key);
                prev = key;
                if (i) PUT_LIT(f, ",");
                put_str(f, key.p, key.n);
                PUT_LIT(f, ":");
                json_value(f, r, depth + 1);
            }
            PUT_LIT(f, "}");
            return;
        }
        case 6: {
            /* only tag 42 with a 36-byte sha-256 CID; rd_link wants the head from its start */
            if (v != 42) bail(&f->c);
            r->p -= 2; /* tag 42 is always the two bytes d8 2a */
            const uint8_t *cid = rd_cid(f, r, 0);
            PUT_LIT(f, "{\"$link\":\"");
            put_cid_text(f, cid);
            PUT_LIT(f, "\"}");
            return;
        }
        default:
            if (v == 20)
                PUT_LIT(f, "false");
            else if (v == 21)
                PUT_LIT(f, "true");
            else if (v == 22)
                PUT_LIT(f, "null");
            else
                bail(&f->c); /* floats, undefined, other simple values: Python decides */
            return;
    }
}

/* ---------------------------------------------------------------------------------------
 * identifiers (the regular expressions of psky.atproto.syntax)
 */

static int is_alpha(uint8_t ch) { return (ch | 0x20) >= 'a' && (ch | 0x20) <= 'z'; }
static int is_alnum(uint8_t ch) { return is_alpha(ch) || (ch >= '0' && ch <= '9'); }

/* did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-], at most 2048 characters */
static int valid_did(Span s) {
    if (s.n > 2048 || s.n < 7 || memcmp(s.p, "did:", 4) != 0) return 0;
    size_t i = 4;
    while (i < s.n && s.p[i] >= 'a' && s.p[i] <= 'z') i++;
    if (i == 4 || i >= s.n || s.p[i] != ':') return 0;
    i++;
    if (i >= s.n) return 0;
    for (; i < s.n; i++) {
        uint8_t ch = s.p[i];
        if (!(is_alnum(ch) || ch == '.' || ch == '_' || ch == '-' || ch == ':' || ch == '%')) return 0;
    }
    uint8_t last = s.p[s.n - 1];
    return last != ':' && last != '%';
}

static int tid_char(uint8_t ch) { return (ch >= '2' && ch <= '7') || (ch >= 'a' && ch <= 'z'); }

static int valid_tid(Span s) {
    if (s.n != 13) return 0;
    if (!((s.p[0] >= '2' && s.p[0] <= '7') || (s.p[0] >= 'a' && s.p[0] <= 'j'))) return 0;
    for (size_t i = 1; i < 13; i++)
        if (!tid_char(s.p[i])) return 0;
    return 1;
}

/* reversed domain (first label starts with a letter) + name (a letter, then alphanumerics);
 * labels of letters, digits and inner hyphens, at most 63 characters; 317 in all */
static int valid_nsid(const uint8_t *p, size_t n) {
    if (n == 0 || n > 317) return 0;
    size_t start = 0, parts = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && p[i] != '.') continue;
        size_t len = i - start;
        const uint8_t *lab = p + start;
        if (len == 0 || len > 63) return 0;
        int last = i == n;
        if (parts == 0 || last) {
            if (!is_alpha(lab[0])) return 0;
        } else if (!is_alnum(lab[0])) {
            return 0;
        }
        for (size_t k = 0; k < len; k++) {
            uint8_t ch = lab[k];
            if (is_alnum(ch)) continue;
            if (ch != '-' || last) return 0;
        }
        if (lab[len - 1] == '-') return 0;
        parts++;
        start = i + 1;
    }
    return parts >= 3;
}

static int rkey_char(uint8_t ch) { return is_alnum(ch) || ch == '_' || ch == '~' || ch == '.' || ch == ':' || ch == '-'; }

static int valid_rkey(const uint8_t *p, size_t n) {
    if (n == 0 || n > 512) return 0;
    if ((n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.')) return 0;
    for (size_t i = 0; i < n; i++)
        if (!rkey_char(p[i])) return 0;
    return 1;
}

/* ---------------------------------------------------------------------------------------
 * the frame
 */

typedef struct {
    int action;
    Span path;
    size_t slash; /* collection = path[:slash], rkey = path[slash + 1:] */
    const uint8_t *cid, *prev;
    size_t json_at, json_len; /* this op's event in f->out */
} FOp;

typedef struct {
    uint64_t seq;
    Span repo, rev, time, blocks;
    const uint8_t *commit, *prev_data;
    int have_seq, have_commit, have_blocks, have_ops;
    uint32_t nops;
    FOp *ops;
    /* verified: the commit block */
    const uint8_t *data;
    Span sig;
    Span unsigned_head, unsigned_tail; /* did+rev entries, data..end */
} FCommit;

static const uint8_t COMMIT_HEADER[15] = {0xa2, 0x61, 't', 0x67, '#', 'c', 'o', 'm', 'm', 'i', 't', 0x62, 'o', 'p', 0x01};

static void read_ops(Fast *f, Reader *r, FCommit *fc) {
    uint64_t n;
    if (rd_any_head(f, r, &n) != 4 || n > FAST_MAX_OPS) bail(&f->c);
    fc->nops = (uint32_t)n;
    fc->ops = (FOp *)alloc_array(&f->c, (size_t)n, sizeof(FOp));
    for (uint32_t i = 0; i < fc->nops; i++) {
        FOp *op = &fc->ops[i];
        memset(op, 0, sizeof *op);
        uint64_t keys;
        if (rd_any_head(f, r, &keys) != 5 || keys < 3 || keys > 4) bail(&f->c);
        Span prev_key = {NULL, 0}, action = {NULL, 0};
        int have_cid = 0, have_path = 0, have_action = 0;
        for (uint64_t k = 0; k < keys; k++) {
            Span key = rd_span(f, r, 3);
            key_after(f, prev_key, key);
            prev_key = key;
            if (span_is(key, "cid")) {
                op->cid = rd_cid(f, r, 1);
                have_cid = 1;
            } else if (span_is(key, "path")) {
                op->path = rd_text(f, r);
                have_path = 1;
            } else if (span_is(key, "prev")) {
                op->prev = rd_cid(f, r, 1);
            } else if (span_is(key, "action")) {
                action = rd_text(f, r);
                have_action = 1;
            } else {
                bail(&f->c);
            }
        }
        if (!have_cid || !have_path || !have_action) bail(&f->c);
        if (span_is(action, "create"))
            op->action = A_CREATE;
        else if (span_is(action, "update"))
            op->action = A_UPDATE;
        else if (span_is(action, "delete"))
            op->action = A_DELETE;
        else
            bail(&f->c);
    }
}

static void read_body(Fast *f, Reader *r, FCommit *fc) {
    uint64_t n;
    if (rd_any_head(f, r, &n) != 5 || n > 16) bail(&f->c);
    Span prev = {NULL, 0};
    int have_repo = 0, have_rev = 0, have_time = 0;
    for (uint64_t i = 0; i < n; i++) {
        Span key = rd_span(f, r, 3);
        key_after(f, prev, key);
        prev = key;
        uint64_t v;
        if (span_is(key, "ops")) {
            read_ops(f, r, fc);
            fc->have_ops = 1;
        } else if (span_is(key, "rev")) {
            fc->rev = rd_text(f, r);
            if (!valid_tid(fc->rev)) bail(&f->c);
            have_rev = 1;
        } else if (span_is(key, "seq")) {
            if (rd_any_head(f, r, &v) != 0 || v > INT64_MAX_U) bail(&f->c); /* negative: Python decides */
            fc->seq = v;
            fc->have_seq = 1;
        } else if (span_is(key, "repo")) {
            fc->repo = rd_text(f, r);
            if (!valid_did(fc->repo)) bail(&f->c);
            have_repo = 1;
        } else if (span_is(key, "time")) {
            fc->time = rd_text(f, r);
            have_time = 1;
        } else if (span_is(key, "blobs")) {
            if (r->p < r->end && *r->p == 0xf6) {
                r->p++;
            } else if (rd_any_head(f, r, &v) != 4 || v != 0) {
                bail(&f->c);
            }
        } else if (span_is(key, "since")) {
            if (r->p < r->end && *r->p == 0xf6) {
                r->p++;
            } else if (!valid_tid(rd_text(f, r))) {
                bail(&f->c);
            }
        } else if (span_is(key, "blocks")) {
            fc->blocks = rd_span(f, r, 2);
            fc->have_blocks = 1;
        } else if (span_is(key, "commit")) {
            fc->commit = rd_cid(f, r, 0);
            if (!node_link(fc->commit)) bail(&f->c);
            fc->have_commit = 1;
        } else if (span_is(key, "rebase")) {
            if (r->p >= r->end || (*r->p != 0xf4 && *r->p != 0xf5)) bail(&f->c);
            r->p++;
        } else if (span_is(key, "tooBig")) {
            if (r->p >= r->end || *r->p != 0xf4) bail(&f->c); /* tooBig commits: a resync, in Python */
            r->p++;
        } else if (span_is(key, "prevData")) {
            fc->prev_data = rd_cid(f, r, 1);
            if (fc->prev_data != NULL && !node_link(fc->prev_data)) bail(&f->c);
        } else {
            bail(&f->c);
        }
    }
    if (!(fc->have_seq && have_repo && have_rev && have_time && fc->have_commit && fc->have_blocks && fc->have_ops))
        bail(&f->c);
}

/* a minimal unsigned varint of at most 4 bytes (CAR section lengths) */
static uint32_t rd_varint(Fast *f, Reader *r) {
    uint32_t v = 0;
    for (int shift = 0; shift < 28; shift += 7) {
        if (r->p >= r->end) bail(&f->c);
        uint8_t b = *r->p++;
        v |= (uint32_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            if (b == 0 && shift) bail(&f->c);
            return v;
        }
    }
    bail(&f->c);
}

/* index the CAR slice; hash every block when verifying */
static void read_blocks(Fast *f, FCommit *fc, int verify) {
    Ctx *c = &f->c;
    if (fc->blocks.n > FAST_MAX_BLOCKS_BYTES) bail(c);
    Reader r = {fc->blocks.p, fc->blocks.p + fc->blocks.n};
    /* the header: exactly {"roots": [commit], "version": 1} */
    static const uint8_t h1[] = {0x3a, 0xa2, 0x65, 'r', 'o', 'o', 't', 's', 0x81, 0xd8, 0x2a, 0x58, 0x25, 0x00};
    static const uint8_t h2[] = {0x67, 'v', 'e', 'r', 's', 'i', 'o', 'n', 0x01};
    if (!rd_expect(&r, h1, sizeof h1) || r.end - r.p < CID_LEN || memcmp(r.p, fc->commit, CID_LEN) != 0) bail(c);
    r.p += CID_LEN;
    if (!rd_expect(&r, h2, sizeof h2)) bail(c);
    while (r.p < r.end) {
        uint32_t slen = rd_varint(f, &r);
        if (slen < CID_LEN || slen > (uint32_t)(r.end - r.p) || slen - CID_LEN > FAST_MAX_BLOCK) bail(c);
        const uint8_t *cid = r.p;
        if (!value_link(cid)) bail(c);
        const uint8_t *data = cid + CID_LEN;
        size_t len = slen - CID_LEN;
        r.p += slen;
        if (verify) {
            uint8_t d[32];
            sha256(data, len, d);
            if (memcmp(d, cid + 4, 32) != 0) bail(c);
        }
        if ((c->count + 1) * 2 > c->cap) table_grow(c);
        Entry *e = table_find(c, cid);
        if (e->used) {
            if ((size_t)e->len != len || memcmp(e->data, data, len) != 0) bail(c);
            continue;
        }
        memcpy(e->cid, cid, CID_LEN);
        e->used = 1;
        e->verified = (uint8_t)verify;
        e->layer_ok = -1;
        e->data = data;
        e->len = (Py_ssize_t)len;
        c->count++;
    }
}

static Entry *present(Ctx *c, const uint8_t *cid) {
    Entry *e = table_find(c, cid);
    return (e->used && e->data != NULL) ? e : NULL;
}

/* the commit block: exactly {did, rev, sig, data, prev, version: 3}, consistent with the event */
static void read_commit_block(Fast *f, FCommit *fc) {
    Entry *e = present(&f->c, fc->commit);
    if (e == NULL) bail(&f->c);
    Reader r = {e->data, e->data + e->len};
    if (!rd_expect(&r, (const uint8_t *)"\xa6\x63" "did", 5)) bail(&f->c);
    const uint8_t *head_start = r.p - 4; /* the did key */
    if (!span_eq(rd_text(f, &r), fc->repo)) bail(&f->c);
    if (!rd_expect(&r, (const uint8_t *)"\x63rev", 4) || !span_eq(rd_text(f, &r), fc->rev)) bail(&f->c);
    fc->unsigned_head.p = head_start;
    fc->unsigned_head.n = (size_t)(r.p - head_start);
    if (!rd_expect(&r, (const uint8_t *)"\x63sig", 4)) bail(&f->c);
    fc->sig = rd_span(f, &r, 2);
    const uint8_t *tail_start = r.p;
    if (!rd_expect(&r, (const uint8_t *)"\x64" "data", 5)) bail(&f->c);
    fc->data = rd_cid(f, &r, 0);
    if (!node_link(fc->data)) bail(&f->c);
    if (!rd_expect(&r, (const uint8_t *)"\x64prev", 5)) bail(&f->c);
    const uint8_t *prev = rd_cid(f, &r, 1);
    if (prev != NULL && !node_link(prev)) bail(&f->c);
    if (!rd_expect(&r, (const uint8_t *)"\x67version\x03", 9) || r.p != r.end) bail(&f->c);
    fc->unsigned_tail.p = tail_start;
    fc->unsigned_tail.n = (size_t)(r.end - tail_start);
}

static void check_ops(Fast *f, FCommit *fc, int verify) {
    /* with prevData, an op without prev (legacy) rules out the inversion: Python decides */
    int legacy_bails = verify && fc->prev_data != NULL;
    for (uint32_t i = 0; i < fc->nops; i++) {
        FOp *op = &fc->ops[i];
        const uint8_t *slash = memchr(op->path.p, '/', op->path.n);
        if (slash == NULL) bail(&f->c);
        op->slash = (size_t)(slash - op->path.p);
        if (!valid_nsid(op->path.p, op->slash) ||
            !valid_rkey(slash + 1, op->path.n - op->slash - 1))
            bail(&f->c);
        for (uint32_t j = 0; j < i; j++)
            if (span_eq(fc->ops[j].path, op->path)) bail(&f->c);
        switch (op->action) {
            case A_CREATE:
                if (op->cid == NULL || op->prev != NULL) bail(&f->c);
                break;
            case A_UPDATE:
                if (op->cid == NULL || (legacy_bails && op->prev == NULL)) bail(&f->c); /* legacy: no inversion */
                break;
            default:
                if (op->cid != NULL || (legacy_bails && op->prev == NULL)) bail(&f->c);
        }
    }
}

/* with prevData: undo the ops on the tree slice, the root must be prevData; without (a repo's
 * first commit, or a relay that omits it): each op must agree with the signed tree, as the
 * Python path checks then (its tree loads lazily: no op, no node read) */
static void check_proof(Fast *f, FCommit *fc) {
    Ctx *c = &f->c;
    const uint8_t *out;
    if (fc->nops == 0) {
        out = fc->data;
    } else {
        NOp *nop = (NOp *)alloc_array(c, fc->nops, sizeof(NOp));
        for (uint32_t i = 0; i < fc->nops; i++) {
            FOp *op = &fc->ops[i];
            if (op->path.n > MAX_KEY_LEN || !valid_key(op->path.p, op->path.n)) bail(c);
            nop[i].action = op->action;
            nop[i].cid = op->cid;
            nop[i].prev = op->prev;
            nop[i].key.p = op->path.p;
            nop[i].key.n = (uint32_t)op->path.n;
            nop[i].key.h = key_height(op->path.p, op->path.n);
        }
        load_root(c, fc->data);
        for (uint32_t i = 0; i < fc->nops; i++) {
            const uint8_t *cur = tree_get(c, &nop[i].key);
            if (nop[i].action == A_DELETE) {
                if (cur != NULL) bail(c);
            } else if (cur == NULL || memcmp(cur, nop[i].cid, CID_LEN) != 0) {
                bail(c);
            }
        }
        if (fc->prev_data == NULL) return;
        for (uint32_t i = 0; i < fc->nops; i++) {
            if (nop[i].action == A_CREATE)
                tree_remove(c, &nop[i].key);
            else
                tree_put(c, &nop[i].key, nop[i].prev);
        }
        out = c->root ? node_cid(c, c->root) : EMPTY_ROOT;
    }
    if (fc->prev_data != NULL && memcmp(out, fc->prev_data, CID_LEN) != 0) bail(c);
}

/* every op's event, as psky.atproto.firehose.to_stream_events + orjson.dumps write it */
static void write_events(Fast *f, FCommit *fc) {
    for (uint32_t i = 0; i < fc->nops; i++) {
        FOp *op = &fc->ops[i];
        op->json_at = f->out.n;
        if (op->action == A_DELETE) {
            PUT_LIT(f, "{\"type\":\"delete\",\"seq\":");
        } else {
            Entry *e = present(&f->c, op->cid);
            if (e == NULL || e->len > FAST_MAX_RECORD_BYTES) bail(&f->c);
            Reader r = {e->data, e->data + e->len};
            if (r.p >= r.end || (*r.p >> 5) != 5) bail(&f->c); /* a record is a map */
            if (op->action == A_CREATE)
                PUT_LIT(f, "{\"type\":\"create\",\"record\":");
            else
                PUT_LIT(f, "{\"type\":\"update\",\"record\":");
            json_value(f, &r, 0);
            if (r.p != r.end) bail(&f->c);
            PUT_LIT(f, ",\"cid\":\"");
            put_cid_text(f, op->cid);
            PUT_LIT(f, "\",\"seq\":");
        }
        put_u64(f, fc->seq);
        PUT_LIT(f, ",\"time\":");
        put_str(f, fc->time.p, fc->time.n);
        PUT_LIT(f, ",\"did\":");
        put_str(f, fc->repo.p, fc->repo.n);
        PUT_LIT(f, ",\"commit\":\"");
        put_cid_text(f, fc->commit);
        PUT_LIT(f, "\",\"rev\":");
        put_str(f, fc->rev.p, fc->rev.n);
        PUT_LIT(f, ",\"collection\":");
        put_str(f, op->path.p, op->slash);
        PUT_LIT(f, ",\"rkey\":");
        put_str(f, op->path.p + op->slash + 1, op->path.n - op->slash - 1);
        PUT_LIT(f, "}");
        op->json_len = f->out.n - op->json_at;
    }
}

static PyObject *str_create, *str_update, *str_delete;

static PyObject *bytes_or_none(const uint8_t *p, size_t n) {
    if (p == NULL) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
}

static PyObject *py_text(Span s) { return PyUnicode_DecodeUTF8((const char *)s.p, (Py_ssize_t)s.n, "strict"); }

static PyObject *build_result(Fast *f, FCommit *fc, int verify) {
    PyObject *events = PyList_New(fc->nops);
    if (events == NULL) return NULL;
    PyObject *last_coll = NULL;
    Span last_span = {NULL, 0};
    for (uint32_t i = 0; i < fc->nops; i++) {
        FOp *op = &fc->ops[i];
        Span coll = {op->path.p, op->slash};
        if (last_coll == NULL || !span_eq(coll, last_span)) {
            PyObject *s = PyUnicode_FromStringAndSize((const char *)coll.p, (Py_ssize_t)coll.n);
            if (s == NULL) goto fail;
            Py_XDECREF(last_coll);
            last_coll = s;
            last_span = coll;
        }
        PyObject *json = PyBytes_FromStringAndSize(f->out.p + op->json_at, (Py_ssize_t)op->json_len);
        if (json == NULL) goto fail;
        PyObject *act = op->action == A_CREATE ? str_create : op->action == A_UPDATE ? str_update : str_delete;
        PyObject *t = PyTuple_Pack(3, last_coll, act, json);
        Py_DECREF(json);
        if (t == NULL) goto fail;
        PyList_SET_ITEM(events, i, t);
    }
    Py_XDECREF(last_coll);
    last_coll = NULL;
    PyObject *unsigned_bytes = NULL;
    if (verify) {
        size_t n = 1 + fc->unsigned_head.n + fc->unsigned_tail.n;
        unsigned_bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
        if (unsigned_bytes == NULL) goto fail;
        char *p = PyBytes_AS_STRING(unsigned_bytes);
        p[0] = (char)0xa5; /* the same map less its "sig" entry: still canonical */
        memcpy(p + 1, fc->unsigned_head.p, fc->unsigned_head.n);
        memcpy(p + 1 + fc->unsigned_head.n, fc->unsigned_tail.p, fc->unsigned_tail.n);
    } else {
        Py_INCREF(Py_None);
        unsigned_bytes = Py_None;
    }
    PyObject *res = Py_BuildValue(
        "(KNNNNNNNNN)", (unsigned long long)fc->seq, py_text(fc->repo), py_text(fc->rev), py_text(fc->time),
        bytes_or_none(fc->commit, CID_LEN), bytes_or_none(fc->prev_data, CID_LEN),
        bytes_or_none(verify ? fc->data : NULL, CID_LEN), unsigned_bytes,
        bytes_or_none(verify ? fc->sig.p : NULL, fc->sig.n), events);
    return res; /* "N" steals every reference, also on failure */
fail:
    Py_XDECREF(last_coll);
    Py_DECREF(events);
    return NULL;
}

static PyObject *py_commit_fast(PyObject *self, PyObject *args) {
    Py_buffer buf;
    int verify;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*p", &buf, &verify)) return NULL;
    Fast *f = (Fast *)calloc(1, sizeof(Fast));
    if (f == NULL) {
        PyBuffer_Release(&buf);
        return PyErr_NoMemory();
    }
    Ctx *c = &f->c;
    c->verify = verify;
    PyObject *result = NULL;
    if (table_init(c, 16) < 0) {
        free(f);
        PyBuffer_Release(&buf);
        return PyErr_NoMemory();
    }
    FCommit fc;
    memset(&fc, 0, sizeof fc);
    if (setjmp(c->jb) == 0) {
        Reader r = {(const uint8_t *)buf.buf, (const uint8_t *)buf.buf + buf.len};
        if (!rd_expect(&r, COMMIT_HEADER, sizeof COMMIT_HEADER)) bail(c);
        read_body(f, &r, &fc);
        if (r.p != r.end) bail(c);
        read_blocks(f, &fc, verify);
        if (present(c, fc.commit) == NULL) bail(c);
        check_ops(f, &fc, verify);
        if (verify) {
            read_commit_block(f, &fc);
            check_proof(f, &fc);
        }
        write_events(f, &fc);
        result = build_result(f, &fc, verify);
    } else if (c->nomem) {
        PyErr_NoMemory();
    } else {
        Py_INCREF(Py_None);
        result = Py_None;
    }
    free(f->out.p);
    arena_free(&c->arena);
    table_free(c);
    free(f);
    PyBuffer_Release(&buf);
    return result;
}
