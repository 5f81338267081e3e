/*
 * psky.atproto._native: the hot paths psky runs in C, as one extension module (one
 * translation unit, so the commit fast path can use the MST code's tables and tree edits).
 *
 *   _mst_native.c     SHA-256 and sync 1.1 operation inversion on a partial MST
 *   _commit_native.c  the firehose #commit fast path (frame -> checked stream events)
 *   _k256_native.c    K-256 signature checks through coincurve's libsecp256k1
 *
 * Optional: without a C compiler psky runs the same logic in Python (setup.py).
 */
#include "_mst_native.c"
#include "_commit_native.c"
#include "_k256_native.c"

static PyMethodDef methods[] = {
    {"invert", py_invert, METH_VARARGS,
     "invert(blocks, root_after, ops, verify) -> bytes | None\n\n"
     "CID bytes of the MST root before a commit's ops, or None when the Python inverter must decide."},
    {"sha256", py_sha256, METH_VARARGS, "sha256(data, portable=False) -> bytes (test hook)"},
    {"key_height", py_key_height, METH_VARARGS, "key_height(key) -> int (test hook)"},
    {"use_sha_ni", py_use_sha_ni, METH_VARARGS, "use_sha_ni(enable) -> bool (test hook)"},
    {"key_heights", py_key_heights, METH_VARARGS, "key_heights(key1, key2) -> (int, int) (test hook)"},
    {"commit_fast", py_commit_fast, METH_VARARGS,
     "commit_fast(frame, verify) -> tuple | None\n\n"
     "A usual, valid #commit frame decoded and checked in one pass, with its stream events as JSON;\n"
     "None for anything else (the Python path decides)."},
    {"k256_bind", py_k256_bind, METH_VARARGS,
     "k256_bind(ctx, parse_compact, normalize, verify) -> None\n\n"
     "Addresses of coincurve's libsecp256k1 context and functions (psky.atproto.crypto calls it)."},
    {"k256_verify", py_k256_verify, METH_VARARGS,
     "k256_verify(pubkey64, data, sig64, allow_high_s) -> bool\n\n"
     "libsecp256k1's verdict on a compact signature of SHA-256(data); pubkey64 is its parsed key."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "psky.atproto._native", "Native hot paths: sync 1.1 MST operation inversion, the firehose commit fast path, K-256 checks.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    init_key_chars();
#if PSKY_SHA_NI
    if (cpu_has_sha_ni()) sha_blocks = sha256_blocks_shani;
#endif
    static const uint8_t empty_node[7] = {0xa2, 0x61, 0x65, 0x80, 0x61, 0x6c, 0xf6};
    memcpy(EMPTY_ROOT, NODE_PFX, 4);
    sha256(empty_node, sizeof empty_node, EMPTY_ROOT + 4);
    PyObject *cbrrr = PyImport_ImportModule("cbrrr");
    if (cbrrr == NULL) return NULL;
    CID_type = PyObject_GetAttrString(cbrrr, "CID");
    Py_DECREF(cbrrr);
    if (CID_type == NULL) return NULL;
    str_cid_bytes = PyUnicode_InternFromString("cid_bytes");
    str_create = PyUnicode_InternFromString("create");
    str_update = PyUnicode_InternFromString("update");
    str_delete = PyUnicode_InternFromString("delete");
    if (str_cid_bytes == NULL || str_create == NULL || str_update == NULL || str_delete == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "SHA_NI", sha_blocks != sha256_blocks_portable) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
