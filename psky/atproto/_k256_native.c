/*
 * K-256 (secp256k1) signature checks without Python in between: libsecp256k1 is the one
 * coincurve ships, reached through function pointers that psky.atproto.crypto takes from
 * coincurve's cffi module once at import (k256_bind). psky never links libsecp256k1 itself,
 * so the build needs no extra library, and the verdict is libsecp256k1's own: this file only
 * saves the Python calls, the cffi allocations and OpenSSL's digest set-up around it
 * (SHA-256 here is the MST code's, SHA-NI where the CPU has it).
 */

/* libsecp256k1's opaque structures: 64 bytes each in its public API */
typedef struct { unsigned char data[64]; } k256_pubkey;
typedef struct { unsigned char data[64]; } k256_signature;

typedef int (*k256_parse_compact_fn)(const void *ctx, k256_signature *sig, const unsigned char *input64);
typedef int (*k256_normalize_fn)(const void *ctx, k256_signature *out, const k256_signature *in);
typedef int (*k256_verify_fn)(const void *ctx, const k256_signature *sig, const unsigned char *msghash32,
                              const k256_pubkey *pubkey);

static const void *k256_ctx = NULL;
static k256_parse_compact_fn k256_parse_compact = NULL;
static k256_normalize_fn k256_normalize = NULL;
static k256_verify_fn k256_verify_raw = NULL;

/* k256_bind(ctx, parse_compact, normalize, verify): addresses as integers */
static PyObject *py_k256_bind(PyObject *self, PyObject *args) {
    unsigned long long ctx, parse, normalize, verify;
    if (!PyArg_ParseTuple(args, "KKKK", &ctx, &parse, &normalize, &verify)) return NULL;
    if (ctx == 0 || parse == 0 || normalize == 0 || verify == 0) {
        PyErr_SetString(PyExc_ValueError, "k256_bind: null address");
        return NULL;
    }
    k256_ctx = (const void *)(uintptr_t)ctx;
    k256_parse_compact = (k256_parse_compact_fn)(uintptr_t)parse;
    k256_normalize = (k256_normalize_fn)(uintptr_t)normalize;
    k256_verify_raw = (k256_verify_fn)(uintptr_t)verify;
    Py_RETURN_NONE;
}

/* k256_verify(pubkey64, data, sig64, allow_high_s) -> bool: SHA-256 of data, then
 * libsecp256k1's verify (which refuses high-S unless normalised first). */
static PyObject *py_k256_verify(PyObject *self, PyObject *args) {
    Py_buffer pub, data, sig;
    int allow_high_s;
    if (!PyArg_ParseTuple(args, "y*y*y*p", &pub, &data, &sig, &allow_high_s)) return NULL;
    PyObject *result = NULL;
    if (k256_verify_raw == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "k256_verify: k256_bind was not called");
        goto done;
    }
    if (pub.len != (Py_ssize_t)sizeof(k256_pubkey)) {
        PyErr_SetString(PyExc_ValueError, "k256_verify: the parsed public key is 64 bytes");
        goto done;
    }
    int ok = 0;
    if (sig.len == 64) {
        uint8_t digest[32];
        k256_signature parsed;
        k256_pubkey key;
        memcpy(&key, pub.buf, sizeof key);
        sha256((const uint8_t *)data.buf, (size_t)data.len, digest);
        /* parse_compact fails when r or s overflows the group order */
        if (k256_parse_compact(k256_ctx, &parsed, (const unsigned char *)sig.buf)) {
            if (allow_high_s) k256_normalize(k256_ctx, &parsed, &parsed);
            ok = k256_verify_raw(k256_ctx, &parsed, digest, &key) == 1;
        }
    }
    result = PyBool_FromLong(ok);
done:
    PyBuffer_Release(&pub);
    PyBuffer_Release(&data);
    PyBuffer_Release(&sig);
    return result;
}
