"""atproto cryptography: K-256 (secp256k1) and P-256 keys, did:key / Multikey, ECDSA.

atproto signatures are ECDSA over SHA-256 of the signed bytes, in the 64-byte compact
``r || s`` form, and must be "low-S" (``s <= n/2``): both forms of a malleable signature
are never accepted. Public keys travel as did:key strings or multibase "Multikey" strings:
base58btc (``z`` prefix) of a multicodec varint (secp256k1-pub ``e7 01``, p256-pub
``80 24``) followed by the 33-byte compressed point. Older DID documents carry the bare
point (compressed or uncompressed, no multicodec) under the legacy
``EcdsaSecp256k1VerificationKey2019`` / ``EcdsaSecp256r1VerificationKey2019`` types.

K-256 goes straight to libsecp256k1 through coincurve's cffi bindings (its verifier
rejects high-S itself), called from psky's C extension when it is built (the same library
and verdict, without the Python calls and allocations around it; ``PSKY_NATIVE=0`` turns it
off); P-256 uses ``cryptography`` (OpenSSL) with an explicit low-S check.
Parsing a key costs far more than verifying with it, so :func:`verifier_for` keeps an LRU
of parsed keys for the firehose hot path.
"""

from __future__ import annotations

import functools
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Literal

from coincurve import PrivateKey as _CoincurvePrivateKey
from coincurve._libsecp256k1 import ffi as _ffi
from coincurve._libsecp256k1 import lib as _lib
from coincurve.context import GLOBAL_CONTEXT as _K256_CONTEXT
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

try:
    from psky.atproto import _native
except ImportError:  # built without a C compiler: the cffi calls below do the same
    _native = None  # type: ignore[assignment]

__all__ = [
    "K256_JWT_ALG",
    "P256_JWT_ALG",
    "Curve",
    "InvalidKey",
    "K256PrivateKey",
    "K256PublicKey",
    "P256PrivateKey",
    "P256PublicKey",
    "PrivateKey",
    "PublicKey",
    "b58decode",
    "b58encode",
    "parse_did_key",
    "parse_legacy_multibase",
    "parse_multikey",
    "parse_verification_method",
    "verifier_for",
    "verify_signature",
]

Curve = Literal["k256", "p256"]

K256_JWT_ALG = "ES256K"
P256_JWT_ALG = "ES256"

#: multicodec varints of the public-key codes (secp256k1-pub 0xe7, p256-pub 0x1200)
K256_MULTICODEC = b"\xe7\x01"
P256_MULTICODEC = b"\x80\x24"

DID_KEY_PREFIX = "did:key:"

LEGACY_K256_TYPE = "EcdsaSecp256k1VerificationKey2019"
LEGACY_P256_TYPE = "EcdsaSecp256r1VerificationKey2019"
MULTIKEY_TYPE = "Multikey"

#: group orders
K256_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_HALF_N = P256_N // 2

#: no legitimate key string is anywhere near this long; bounds base58 work on hostile input
_MAX_KEY_STRING = 256

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_P256_CURVE = ec.SECP256R1()
_sha256 = hashlib.sha256


class InvalidKey(ValueError):
    """A key string or key bytes that are not a usable atproto public/private key."""


# --- base58btc ------------------------------------------------------------------------

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58 (no multibase prefix)."""
    n = int.from_bytes(data, "big")
    out: list[str] = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Inverse of :func:`b58encode`; raises :class:`InvalidKey` on a non-alphabet character."""
    n = 0
    index = _B58_INDEX
    try:
        for ch in text:
            n = n * 58 + index[ch]
    except KeyError:
        raise InvalidKey("invalid base58btc character") from None
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def _multibase_bytes(multibase: str) -> bytes:
    if not isinstance(multibase, str):
        raise InvalidKey(f"key must be a string, not {type(multibase).__name__}")
    if len(multibase) > _MAX_KEY_STRING:
        raise InvalidKey("key string too long")
    if len(multibase) < 2 or multibase[0] != "z":
        raise InvalidKey(f"not a base58btc multibase string ('z' prefix): {multibase!r:.80}")
    return b58decode(multibase[1:])


# --- public keys ----------------------------------------------------------------------


class PublicKey(ABC):
    """An atproto public key on one of the two supported curves.

    Equality and hashing use the curve and the compressed point, so the same key parsed
    from a did:key and from a legacy DID-document form compares equal.
    """

    __slots__ = ("_did_key", "compressed")

    curve: ClassVar[Curve]
    jwt_alg: ClassVar[str]
    multicodec: ClassVar[bytes]

    compressed: bytes
    _did_key: str | None

    @abstractmethod
    def verify(self, data: bytes, sig: bytes, *, allow_high_s: bool = False) -> bool:
        """True iff *sig* is a valid compact ECDSA signature of SHA-256(*data*).

        High-S signatures are rejected unless *allow_high_s* (only for contexts such as
        JWTs where atproto tolerates them). Never raises for a malformed signature.
        """

    @property
    @abstractmethod
    def uncompressed(self) -> bytes:
        """65-byte SEC1 uncompressed point (``04 || x || y``)."""

    def multibase(self) -> str:
        """Multikey form: ``z`` + base58btc(multicodec || compressed point)."""
        return self.did_key()[len(DID_KEY_PREFIX) :]

    def did_key(self) -> str:
        key = self._did_key
        if key is None:
            key = DID_KEY_PREFIX + "z" + b58encode(self.multicodec + self.compressed)
            self._did_key = key
        return key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return self.curve == other.curve and self.compressed == other.compressed

    def __hash__(self) -> int:
        return hash((self.curve, self.compressed))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.did_key()!r})"


def _bind_native_k256() -> bool:
    """Hand coincurve's libsecp256k1 context and functions to the C extension; False when
    either is missing (or ``PSKY_NATIVE=0``), and K-256 checks then go through cffi."""
    if _native is None or os.environ.get("PSKY_NATIVE", "1") == "0":
        return False
    try:
        def address(target: object) -> int:
            return int(_ffi.cast("uintptr_t", target))

        _native.k256_bind(
            address(_K256_CONTEXT.ctx),
            address(_ffi.addressof(_lib, "secp256k1_ecdsa_signature_parse_compact")),
            address(_ffi.addressof(_lib, "secp256k1_ecdsa_signature_normalize")),
            address(_ffi.addressof(_lib, "secp256k1_ecdsa_verify")),
        )
    except (AttributeError, TypeError, ValueError, _ffi.error):  # another coincurve build
        return False
    return True


#: K-256 signatures checked by the C extension (through the same libsecp256k1); tests and
#: benchmarks may flip it at run time
NATIVE_K256: bool = _bind_native_k256()


class K256PublicKey(PublicKey):
    """secp256k1 public key (ES256K), verified by libsecp256k1."""

    __slots__ = ("_pub", "_raw")

    curve: ClassVar[Curve] = "k256"
    jwt_alg: ClassVar[str] = K256_JWT_ALG
    multicodec: ClassVar[bytes] = K256_MULTICODEC

    def __init__(self, point: bytes) -> None:
        """Parse a SEC1 point, compressed (33 bytes) or uncompressed (65 bytes)."""
        if not _is_sec1_point(point):
            raise InvalidKey("K-256 public key must be a 33-byte compressed or 65-byte uncompressed point")
        pub = _ffi.new("secp256k1_pubkey *")
        if not _lib.secp256k1_ec_pubkey_parse(_K256_CONTEXT.ctx, pub, point, len(point)):
            raise InvalidKey("K-256 public key is not a point on the curve")
        self._pub = pub
        self._raw = bytes(_ffi.buffer(pub))  # the parsed key, for the C extension
        self.compressed = self._serialize(compressed=True)
        self._did_key = None

    def _serialize(self, *, compressed: bool) -> bytes:
        size = 33 if compressed else 65
        out = _ffi.new("unsigned char[]", size)
        out_len = _ffi.new("size_t *", size)
        flag = _lib.SECP256K1_EC_COMPRESSED if compressed else _lib.SECP256K1_EC_UNCOMPRESSED
        _lib.secp256k1_ec_pubkey_serialize(_K256_CONTEXT.ctx, out, out_len, self._pub, flag)
        return bytes(_ffi.buffer(out, out_len[0]))

    @property
    def uncompressed(self) -> bytes:
        return self._serialize(compressed=False)

    def verify(self, data: bytes, sig: bytes, *, allow_high_s: bool = False) -> bool:
        if NATIVE_K256 and type(sig) is bytes and type(data) is bytes:
            return _native.k256_verify(self._raw, data, sig, allow_high_s)
        if type(sig) is not bytes:
            # only byte strings: bytes(n) of an integer would allocate n bytes (or overflow)
            if not isinstance(sig, (bytearray, memoryview)):
                return False
            sig = bytes(sig)
        if len(sig) != 64:
            return False
        try:
            digest = _sha256(data).digest()
        except TypeError:
            return False
        ctx = _K256_CONTEXT.ctx
        raw = _ffi.new("secp256k1_ecdsa_signature *")
        # parse_compact fails when r or s overflows the group order
        if not _lib.secp256k1_ecdsa_signature_parse_compact(ctx, raw, sig):
            return False
        if allow_high_s:
            _lib.secp256k1_ecdsa_signature_normalize(ctx, raw, raw)
        # libsecp256k1 only accepts lower-S signatures: high-S fails here
        return bool(_lib.secp256k1_ecdsa_verify(ctx, raw, digest, self._pub))


class P256PublicKey(PublicKey):
    """NIST P-256 public key (ES256), verified by OpenSSL with an explicit low-S rule."""

    __slots__ = ("_key",)

    curve: ClassVar[Curve] = "p256"
    jwt_alg: ClassVar[str] = P256_JWT_ALG
    multicodec: ClassVar[bytes] = P256_MULTICODEC

    def __init__(self, point: bytes) -> None:
        """Parse a SEC1 point, compressed (33 bytes) or uncompressed (65 bytes)."""
        if not _is_sec1_point(point):
            raise InvalidKey("P-256 public key must be a 33-byte compressed or 65-byte uncompressed point")
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(_P256_CURVE, point)
        except ValueError:
            raise InvalidKey("P-256 public key is not a point on the curve") from None
        self._key = key
        self.compressed = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        self._did_key = None

    @property
    def uncompressed(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def verify(self, data: bytes, sig: bytes, *, allow_high_s: bool = False) -> bool:
        try:
            if len(sig) != 64:
                return False
            r = int.from_bytes(sig[:32], "big")
            s = int.from_bytes(sig[32:], "big")
        except TypeError:
            return False
        if not (0 < r < P256_N and 0 < s < P256_N):
            return False
        if s > _P256_HALF_N and not allow_high_s:
            return False
        try:
            self._key.verify(encode_dss_signature(r, s), data, _ECDSA_SHA256)
        except (InvalidSignature, TypeError):
            return False
        return True


def _is_sec1_point(point: object) -> bool:
    if not isinstance(point, bytes):
        return False
    if len(point) == 33:
        return point[0] in (2, 3)
    if len(point) == 65:
        return point[0] == 4
    return False


_CODEC_CLASSES: dict[bytes, Callable[[bytes], PublicKey]] = {
    K256_MULTICODEC: K256PublicKey,
    P256_MULTICODEC: P256PublicKey,
}


def parse_multikey(multibase: str) -> PublicKey:
    """Parse a Multikey string (``z…``, multicodec-prefixed compressed point)."""
    raw = _multibase_bytes(multibase)
    cls = _CODEC_CLASSES.get(raw[:2])
    if cls is None:
        raise InvalidKey(f"unsupported key type (multicodec prefix {raw[:2].hex() or 'missing'})")
    point = raw[2:]
    if len(point) != 33:
        raise InvalidKey(f"Multikey must hold a 33-byte compressed point, got {len(point)} bytes")
    key = cls(point)
    # base58btc is one-to-one, so the string is already the key's did:key form (no re-encoding)
    key._did_key = DID_KEY_PREFIX + multibase
    return key


def parse_did_key(did_key: str) -> PublicKey:
    """Parse a ``did:key:z…`` string (K-256 or P-256)."""
    if not isinstance(did_key, str) or not did_key.startswith(DID_KEY_PREFIX):
        raise InvalidKey(f"not a did:key: {did_key!r:.80}")
    return parse_multikey(did_key[len(DID_KEY_PREFIX) :])


def parse_legacy_multibase(multibase: str, curve: Curve) -> PublicKey:
    """Parse the legacy DID-document form: multibase of the bare SEC1 point, no multicodec.

    Used by ``EcdsaSecp256k1VerificationKey2019`` (*curve* ``"k256"``) and
    ``EcdsaSecp256r1VerificationKey2019`` (``"p256"``); both point encodings occur.
    """
    raw = _multibase_bytes(multibase)
    if curve == "k256":
        return K256PublicKey(raw)
    if curve == "p256":
        return P256PublicKey(raw)
    raise InvalidKey(f"unknown curve {curve!r}")


def parse_verification_method(method_type: str, public_key_multibase: str) -> PublicKey:
    """Key of a DID-document verification method, by its ``type``."""
    if method_type == MULTIKEY_TYPE:
        if not isinstance(public_key_multibase, str):
            raise InvalidKey(f"key must be a string, not {type(public_key_multibase).__name__}")
        # parsed once, under the did:key string a verifier will be asked for next
        return _cached_key(DID_KEY_PREFIX + public_key_multibase)
    if method_type == LEGACY_K256_TYPE:
        return parse_legacy_multibase(public_key_multibase, "k256")
    if method_type == LEGACY_P256_TYPE:
        return parse_legacy_multibase(public_key_multibase, "p256")
    raise InvalidKey(f"unsupported verification method type {method_type!r:.80}")


@functools.lru_cache(maxsize=50_000)
def _cached_key(key: str) -> PublicKey:
    if key.startswith(DID_KEY_PREFIX):
        return parse_did_key(key)
    return parse_multikey(key)


def verifier_for(key: str) -> PublicKey:
    """Parsed key for a did:key or Multikey string, from an LRU cache (parsing is the slow part)."""
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a string, not {type(key).__name__}")
    return _cached_key(key)


def verify_signature(key: str, data: bytes, sig: bytes) -> bool:
    """Verify a low-S compact signature against a did:key / Multikey string.

    Raises :class:`InvalidKey` for an unusable key; returns False for a bad signature.
    """
    return verifier_for(key).verify(data, sig)


# --- private keys ---------------------------------------------------------------------


class PrivateKey(ABC):
    """A signing key. Signatures are compact 64-byte ``r || s``, always low-S."""

    __slots__ = ()

    curve: ClassVar[Curve]

    @staticmethod
    def generate(curve: Curve) -> PrivateKey:
        if curve == "k256":
            return K256PrivateKey(_CoincurvePrivateKey().secret)
        if curve == "p256":
            return P256PrivateKey.from_ec(ec.generate_private_key(_P256_CURVE))
        raise InvalidKey(f"unknown curve {curve!r}")

    @staticmethod
    def from_bytes(secret: bytes, curve: Curve) -> PrivateKey:
        """Load a raw 32-byte big-endian scalar."""
        if curve == "k256":
            return K256PrivateKey(secret)
        if curve == "p256":
            return P256PrivateKey(secret)
        raise InvalidKey(f"unknown curve {curve!r}")

    @abstractmethod
    def to_bytes(self) -> bytes:
        """Raw 32-byte scalar."""

    @abstractmethod
    def sign(self, data: bytes) -> bytes:
        """Compact low-S ECDSA signature of SHA-256(*data*)."""

    @abstractmethod
    def public_key(self) -> PublicKey: ...

    def did_key(self) -> str:
        return self.public_key().did_key()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(public={self.did_key()!r})"


def _check_secret(secret: bytes, order: int) -> None:
    if not isinstance(secret, bytes) or len(secret) != 32:
        raise InvalidKey("private key must be 32 bytes")
    if not 0 < int.from_bytes(secret, "big") < order:
        raise InvalidKey("private key scalar out of range")


class K256PrivateKey(PrivateKey):
    """secp256k1 signing key; deterministic (RFC 6979) nonces from libsecp256k1."""

    __slots__ = ("_key", "_public")

    curve: ClassVar[Curve] = "k256"

    def __init__(self, secret: bytes) -> None:
        _check_secret(secret, K256_N)
        self._key = _CoincurvePrivateKey(secret)
        self._public = K256PublicKey(self._key.public_key.format(compressed=True))

    def to_bytes(self) -> bytes:
        return bytes(self._key.secret)

    def public_key(self) -> K256PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        ctx = _K256_CONTEXT.ctx
        raw = _ffi.new("secp256k1_ecdsa_signature *")
        if not _lib.secp256k1_ecdsa_sign(
            ctx, raw, _sha256(data).digest(), self._key.secret, _ffi.NULL, _ffi.NULL
        ):
            raise ValueError("secp256k1 signing failed")
        # libsecp256k1 already emits low-S; normalising again costs nothing and states the rule
        _lib.secp256k1_ecdsa_signature_normalize(ctx, raw, raw)
        out = _ffi.new("unsigned char[64]")
        _lib.secp256k1_ecdsa_signature_serialize_compact(ctx, out, raw)
        return bytes(_ffi.buffer(out, 64))


class P256PrivateKey(PrivateKey):
    """NIST P-256 signing key (OpenSSL); S is normalised to the low half after signing."""

    __slots__ = ("_key", "_public")

    curve: ClassVar[Curve] = "p256"

    def __init__(self, secret: bytes) -> None:
        _check_secret(secret, P256_N)
        self._init(ec.derive_private_key(int.from_bytes(secret, "big"), _P256_CURVE))

    @classmethod
    def from_ec(cls, key: ec.EllipticCurvePrivateKey) -> P256PrivateKey:
        self = cls.__new__(cls)
        self._init(key)
        return self

    def _init(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self._public = P256PublicKey(
            key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
            )
        )

    def to_bytes(self) -> bytes:
        return self._key.private_numbers().private_value.to_bytes(32, "big")

    def public_key(self) -> P256PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        r, s = decode_dss_signature(self._key.sign(data, _ECDSA_SHA256))
        if s > _P256_HALF_N:
            s = P256_N - s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
