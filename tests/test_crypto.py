"""psky.atproto.crypto against the atproto interop vectors, plus round trips and hostile input."""

from __future__ import annotations

import base64
import json
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psky.atproto import crypto
from psky.atproto.crypto import (
    InvalidKey,
    K256PublicKey,
    P256PublicKey,
    PrivateKey,
    b58decode,
    b58encode,
    parse_did_key,
    parse_legacy_multibase,
    parse_multikey,
    parse_verification_method,
    verifier_for,
    verify_signature,
)
from tests.paths import INTEROP

CRYPTO = INTEROP / "crypto"
SIG_FIXTURES: list[dict[str, Any]] = json.loads((CRYPTO / "signature-fixtures.json").read_text())
K256_DIDKEYS: list[dict[str, Any]] = json.loads((CRYPTO / "w3c_didkey_K256.json").read_text())
P256_DIDKEYS: list[dict[str, Any]] = json.loads((CRYPTO / "w3c_didkey_P256.json").read_text())

CURVES: list[crypto.Curve] = ["k256", "p256"]


def b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _curve(fixture: dict[str, Any]) -> crypto.Curve:
    return "k256" if fixture["algorithm"] == "ES256K" else "p256"


# --- interop: signature-fixtures.json -------------------------------------------------


@pytest.mark.parametrize("fx", SIG_FIXTURES, ids=[f["comment"] for f in SIG_FIXTURES])
def test_signature_fixture_did_key(fx: dict[str, Any]) -> None:
    key = parse_did_key(fx["publicKeyDid"])
    assert key.jwt_alg == fx["algorithm"]
    assert key.did_key() == fx["publicKeyDid"]
    msg, sig = b64(fx["messageBase64"]), b64(fx["signatureBase64"])
    assert key.verify(msg, sig) is fx["validSignature"]
    assert verify_signature(fx["publicKeyDid"], msg, sig) is fx["validSignature"]


@pytest.mark.parametrize("fx", SIG_FIXTURES, ids=[f["comment"] for f in SIG_FIXTURES])
def test_signature_fixture_legacy_multibase(fx: dict[str, Any]) -> None:
    """The didDocSuite form (bare point, no multicodec) is the same key."""
    key = parse_verification_method(fx["didDocSuite"], fx["publicKeyMultibase"])
    assert key == parse_did_key(fx["publicKeyDid"])
    assert key.did_key() == fx["publicKeyDid"]
    assert parse_legacy_multibase(fx["publicKeyMultibase"], _curve(fx)) == key
    msg, sig = b64(fx["messageBase64"]), b64(fx["signatureBase64"])
    assert key.verify(msg, sig) is fx["validSignature"]


@pytest.mark.parametrize(
    "fx", [f for f in SIG_FIXTURES if "high-s" in f["tags"]], ids=lambda f: f["algorithm"]
)
def test_high_s_fixtures_are_the_malleated_valid_signature(fx: dict[str, Any]) -> None:
    """The high-S vectors are rejected only for S: with the lenient flag they do verify."""
    key = parse_did_key(fx["publicKeyDid"])
    msg, sig = b64(fx["messageBase64"]), b64(fx["signatureBase64"])
    assert not key.verify(msg, sig)
    assert key.verify(msg, sig, allow_high_s=True)


@pytest.mark.parametrize(
    "fx", [f for f in SIG_FIXTURES if "der-encoded" in f["tags"]], ids=lambda f: f["algorithm"]
)
def test_der_signatures_rejected_even_leniently(fx: dict[str, Any]) -> None:
    key = parse_did_key(fx["publicKeyDid"])
    msg, sig = b64(fx["messageBase64"]), b64(fx["signatureBase64"])
    assert len(sig) != 64
    assert not key.verify(msg, sig, allow_high_s=True)


def test_every_fixture_class_is_covered() -> None:
    assert {tuple(f["tags"]) for f in SIG_FIXTURES} == {(), ("high-s",), ("der-encoded",)}
    assert {f["validSignature"] for f in SIG_FIXTURES} == {True, False}


# --- interop: w3c did:key vectors -----------------------------------------------------


@pytest.mark.parametrize("fx", K256_DIDKEYS, ids=lambda f: f["publicDidKey"][-8:])
def test_w3c_didkey_k256(fx: dict[str, Any]) -> None:
    priv = PrivateKey.from_bytes(bytes.fromhex(fx["privateKeyBytesHex"]), "k256")
    assert priv.did_key() == fx["publicDidKey"]
    pub = parse_did_key(fx["publicDidKey"])
    assert isinstance(pub, K256PublicKey)
    assert pub == priv.public_key()
    assert pub.did_key() == fx["publicDidKey"]
    assert pub.multibase() == fx["publicDidKey"][len("did:key:") :]
    assert priv.to_bytes().hex() == fx["privateKeyBytesHex"]
    assert pub.verify(b"hello", priv.sign(b"hello"))


@pytest.mark.parametrize("fx", P256_DIDKEYS, ids=lambda f: f["publicDidKey"][-8:])
def test_w3c_didkey_p256(fx: dict[str, Any]) -> None:
    secret = b58decode(fx["privateKeyBytesBase58"])
    priv = PrivateKey.from_bytes(secret, "p256")
    assert priv.did_key() == fx["publicDidKey"]
    pub = parse_did_key(fx["publicDidKey"])
    assert isinstance(pub, P256PublicKey)
    assert pub == priv.public_key()
    assert b58encode(priv.to_bytes()) == fx["privateKeyBytesBase58"]
    assert pub.verify(b"hello", priv.sign(b"hello"))


# --- key forms ------------------------------------------------------------------------


@pytest.mark.parametrize("curve", CURVES)
def test_key_encodings(curve: crypto.Curve) -> None:
    pub = PrivateKey.generate(curve).public_key()
    assert len(pub.compressed) == 33 and pub.compressed[0] in (2, 3)
    unc = pub.uncompressed
    assert len(unc) == 65 and unc[0] == 4
    assert unc[1:33] == pub.compressed[1:]
    prefix = b"\xe7\x01" if curve == "k256" else b"\x80\x24"
    assert b58decode(pub.multibase()[1:]) == prefix + pub.compressed
    assert pub.jwt_alg == ("ES256K" if curve == "k256" else "ES256")
    assert parse_multikey(pub.multibase()) == pub
    # legacy forms: both point encodings, no multicodec
    assert parse_legacy_multibase("z" + b58encode(unc), curve) == pub
    assert parse_legacy_multibase("z" + b58encode(pub.compressed), curve) == pub
    legacy_type = {"k256": crypto.LEGACY_K256_TYPE, "p256": crypto.LEGACY_P256_TYPE}[curve]
    assert parse_verification_method(legacy_type, "z" + b58encode(unc)) == pub
    assert parse_verification_method("Multikey", pub.multibase()) == pub
    assert hash(parse_did_key(pub.did_key())) == hash(pub)
    assert repr(pub).endswith(f"({pub.did_key()!r})")


def test_keys_of_different_curves_differ() -> None:
    k = PrivateKey.generate("k256").public_key()
    p = PrivateKey.generate("p256").public_key()
    assert k != p
    assert k != "not a key"


def test_legacy_point_on_wrong_curve_rejected() -> None:
    """A P-256 point is (almost surely) not a valid secp256k1 point, and vice versa."""
    p_unc = PrivateKey.from_bytes(b"\x01" * 32, "p256").public_key().uncompressed
    with pytest.raises(InvalidKey):
        parse_legacy_multibase("z" + b58encode(p_unc), "k256")
    k_unc = PrivateKey.from_bytes(b"\x01" * 32, "k256").public_key().uncompressed
    with pytest.raises(InvalidKey):
        parse_legacy_multibase("z" + b58encode(k_unc), "p256")


# --- base58 ---------------------------------------------------------------------------


@given(st.binary(max_size=80))
@settings(max_examples=300)
def test_base58_round_trip(data: bytes) -> None:
    assert b58decode(b58encode(data)) == data


def test_base58_known_values() -> None:
    assert b58encode(b"") == ""
    assert b58encode(b"\0\0\x01") == "112"
    assert b58encode(b"hello world") == "StV1DL6CwTryKyV"
    assert b58decode("StV1DL6CwTryKyV") == b"hello world"
    with pytest.raises(InvalidKey):
        b58decode("0OIl")


# --- garbage keys ---------------------------------------------------------------------

K256_EXAMPLE = "did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc"


def _mb(raw: bytes) -> str:
    return "z" + b58encode(raw)


BAD_DID_KEYS = [
    "",
    "did:key:",
    "did:key:z",
    "did:web:example.com",
    K256_EXAMPLE[len("did:key:") :].join(["did:key:", "0"]),  # non-base58 character appended
    "did:key:" + K256_EXAMPLE[9:],  # multibase prefix letter dropped
    "did:key:m" + base64.b64encode(b58decode(K256_EXAMPLE[9:])).decode(),  # base64 multibase
    "did:key:" + _mb(b"\xe7\x01" + b"\x02" * 32),  # 32-byte point
    "did:key:" + _mb(b"\xe7\x01" + b"\x02" * 34),  # 34-byte point
    "did:key:" + _mb(b"\xe7\x01" + b"\x05" + b"\x01" * 32),  # bad SEC1 tag
    "did:key:" + _mb(b"\xe7\x01" + b"\x04" + b"\x01" * 64),  # uncompressed in did:key
    "did:key:" + _mb(b"\x80\x24" + b"\x02" + b"\xff" * 32),  # x >= p: not on P-256
    "did:key:" + _mb(b"\xed\x01" + b"\x01" * 32),  # ed25519: unsupported
    "did:key:" + _mb(b"\xe7"),  # truncated multicodec
    "did:key:z" + "2" * 300,  # absurdly long
    "DID:KEY:" + K256_EXAMPLE[8:],
]


@pytest.mark.parametrize("bad", BAD_DID_KEYS)
def test_bad_did_keys(bad: str) -> None:
    with pytest.raises(InvalidKey):
        parse_did_key(bad)
    with pytest.raises(InvalidKey):
        verifier_for(bad)
    with pytest.raises(InvalidKey):
        verify_signature(bad, b"x", b"\x01" * 64)


@pytest.mark.parametrize("bad", [None, 12, b"did:key:zQ3sh", ["x"]])
def test_non_string_keys(bad: Any) -> None:
    with pytest.raises(InvalidKey):
        parse_did_key(bad)
    with pytest.raises(InvalidKey):
        parse_multikey(bad)
    with pytest.raises(InvalidKey):
        verifier_for(bad)


def test_invalid_key_is_value_error() -> None:
    assert issubclass(InvalidKey, ValueError)


@pytest.mark.parametrize(
    ("method_type", "multibase"),
    [
        ("Ed25519VerificationKey2020", "z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"),
        ("EcdsaSecp256k1VerificationKey2019", "z"),
        ("EcdsaSecp256k1VerificationKey2019", _mb(b"\x02" * 32)),
        ("EcdsaSecp256k1VerificationKey2019", _mb(b"\x06" + b"\x01" * 64)),  # hybrid form
        ("EcdsaSecp256r1VerificationKey2019", "f" + "ab" * 33),  # hex multibase
        ("Multikey", "zxdM8dSstjrpZaRUwBmDvjGXweKuEMVN95A9oJBFjkWMh"),  # legacy bytes as Multikey
    ],
)
def test_bad_verification_methods(method_type: str, multibase: str) -> None:
    with pytest.raises(InvalidKey):
        parse_verification_method(method_type, multibase)


def test_verifier_cache_returns_same_object() -> None:
    priv = PrivateKey.generate("k256")
    dk = priv.did_key()
    assert verifier_for(dk) is verifier_for(dk)
    assert verifier_for(priv.public_key().multibase()) == verifier_for(dk)


# --- sign / verify --------------------------------------------------------------------


@pytest.mark.parametrize("curve", CURVES)
def test_sign_verify_round_trip(curve: crypto.Curve) -> None:
    priv = PrivateKey.generate(curve)
    pub = priv.public_key()
    for msg in (b"", b"a", b"hello world" * 100):
        sig = priv.sign(msg)
        assert len(sig) == 64
        assert pub.verify(msg, sig)
        assert verify_signature(pub.did_key(), msg, sig)
        assert not pub.verify(msg + b"!", sig)
        assert not PrivateKey.generate(curve).public_key().verify(msg, sig)
    restored = PrivateKey.from_bytes(priv.to_bytes(), curve)
    assert restored.did_key() == priv.did_key()
    assert pub.verify(b"x", restored.sign(b"x"))


@pytest.mark.parametrize("curve", CURVES)
def test_signatures_always_low_s(curve: crypto.Curve) -> None:
    order = crypto.K256_N if curve == "k256" else crypto.P256_N
    priv = PrivateKey.generate(curve)
    for i in range(64):
        s = int.from_bytes(priv.sign(i.to_bytes(2, "big"))[32:], "big")
        assert 0 < s <= order // 2


def test_k256_signing_is_deterministic() -> None:
    priv = PrivateKey.generate("k256")
    assert priv.sign(b"abc") == priv.sign(b"abc")


@pytest.mark.parametrize("curve", CURVES)
def test_high_s_rejected(curve: crypto.Curve) -> None:
    """Flip S to n - S: the same signature in its malleated form must be refused."""
    order = crypto.K256_N if curve == "k256" else crypto.P256_N
    priv = PrivateKey.generate(curve)
    pub = priv.public_key()
    sig = priv.sign(b"message")
    r, s = sig[:32], int.from_bytes(sig[32:], "big")
    high = r + (order - s).to_bytes(32, "big")
    assert pub.verify(b"message", sig)
    assert not pub.verify(b"message", high)
    assert pub.verify(b"message", high, allow_high_s=True)
    assert not verify_signature(pub.did_key(), b"message", high)


@pytest.mark.parametrize("curve", CURVES)
def test_malformed_signatures_are_false(curve: crypto.Curve) -> None:
    order = crypto.K256_N if curve == "k256" else crypto.P256_N
    priv = PrivateKey.generate(curve)
    pub = priv.public_key()
    sig = priv.sign(b"m")
    bad: list[Any] = [
        b"",
        sig[:63],
        sig + b"\0",
        b"\0" * 64,  # r = s = 0
        sig[:32] + b"\0" * 32,  # s = 0
        b"\0" * 32 + sig[32:],  # r = 0
        order.to_bytes(32, "big") + sig[32:],  # r = n
        b"\xff" * 64,  # r, s >= n
        sig[:32] + order.to_bytes(32, "big"),  # s = n
        bytes(reversed(sig)),
        sig.hex(),  # text
        None,
        12345,
    ]
    for b in bad:
        assert pub.verify(b"m", b) is False
        assert pub.verify(b"m", b, allow_high_s=True) is False
    assert pub.verify(b"m", cast(Any, bytearray(sig))) is True
    assert pub.verify(b"m", cast(Any, memoryview(sig))) is True
    assert pub.verify("m", sig) is False  # type: ignore[arg-type]


@pytest.mark.parametrize("curve", CURVES)
def test_private_key_validation(curve: crypto.Curve) -> None:
    order = crypto.K256_N if curve == "k256" else crypto.P256_N
    for bad in (b"", b"\x01" * 31, b"\x01" * 33, b"\0" * 32, order.to_bytes(32, "big"), b"\xff" * 32):
        with pytest.raises(InvalidKey):
            PrivateKey.from_bytes(bad, curve)
    with pytest.raises(InvalidKey):
        PrivateKey.from_bytes("00" * 32, curve)  # type: ignore[arg-type]
    assert PrivateKey.from_bytes((order - 1).to_bytes(32, "big"), curve).public_key()


def test_unknown_curve() -> None:
    with pytest.raises(InvalidKey):
        PrivateKey.generate("ed25519")  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        PrivateKey.from_bytes(b"\x01" * 32, "secp384r1")  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        parse_legacy_multibase(_mb(b"\x02" * 33), "x")  # type: ignore[arg-type]


def test_cross_curve_signature_fails() -> None:
    k = PrivateKey.from_bytes(b"\x07" * 32, "k256")
    p = PrivateKey.from_bytes(b"\x07" * 32, "p256")
    assert not p.public_key().verify(b"m", k.sign(b"m"))
    assert not k.public_key().verify(b"m", p.sign(b"m"))
