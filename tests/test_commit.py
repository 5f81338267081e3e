"""Commit objects: strict decoding, the exact signed bytes, signatures on both curves."""

from __future__ import annotations

from typing import Any

import pytest

from psky.atproto import cbor
from psky.atproto.cbor import CID
from psky.atproto.commit import Commit, CommitError, sign_commit
from psky.atproto.crypto import K256_N, P256_N, PrivateKey

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
REV = "3jzfcijpj2z2a"
DATA = cbor.cid_for_cbor(cbor.encode({"e": [], "l": None}))
RAW_CID = cbor.cid_for_raw(b"blob")


@pytest.fixture(scope="module", params=["k256", "p256"])
def key(request: pytest.FixtureRequest) -> PrivateKey:
    return PrivateKey.generate(request.param)


def _signed(key: PrivateKey, unsigned: dict[str, Any], signed_over: dict[str, Any] | None = None) -> bytes:
    """A commit block signed over *signed_over* (default: *unsigned* itself)."""
    sig = key.sign(cbor.encode(unsigned if signed_over is None else signed_over))
    return cbor.encode({**unsigned, "sig": sig})


def _unsigned(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"did": DID, "version": 3, "data": DATA, "rev": REV, "prev": None}
    obj.update(over)
    return {k: v for k, v in obj.items() if v is not _DROP}


_DROP = object()


def test_sign_and_verify_round_trip(key: PrivateKey) -> None:
    cid, block = sign_commit(DID, DATA, REV, key)
    assert cid == cbor.cid_for_cbor(block)
    commit = Commit.decode(block)
    assert (commit.did, commit.version, commit.data, commit.rev, commit.prev) == (DID, 3, DATA, REV, None)
    assert commit.verify(key.did_key())
    assert commit.verify(key.public_key())
    # re-encoding reproduces the block, hence the CID
    assert commit.encode() == block
    assert commit.cid() == cid


def test_unsigned_bytes_are_the_canonical_v3_object_with_null_prev(key: PrivateKey) -> None:
    _, block = sign_commit(DID, DATA, REV, key)
    commit = Commit.decode(block)
    expected = cbor.encode({"did": DID, "version": 3, "data": DATA, "rev": REV, "prev": None})
    assert commit.unsigned_bytes() == expected
    assert cbor.decode(commit.unsigned_bytes())["prev"] is None
    # the signature really is over exactly those bytes
    assert key.public_key().verify(expected, commit.sig)
    # and the block is the unsigned map plus sig, nothing else
    decoded = cbor.decode(block)
    assert set(decoded) == {"did", "version", "data", "rev", "prev", "sig"}


def test_commit_signed_by_hand_over_canonical_encoding_verifies(key: PrivateKey) -> None:
    block = _signed(key, _unsigned())
    assert Commit.decode(block).verify(key.did_key())


def test_signature_over_other_bytes_fails(key: PrivateKey) -> None:
    # signed without prev (the old optional form) but stored with prev: null
    block = _signed(key, _unsigned(), signed_over=_unsigned(prev=_DROP))
    assert not Commit.decode(block).verify(key.did_key())


def test_missing_prev_round_trips_but_is_signed_as_null(key: PrivateKey) -> None:
    # Go and Rust decode a commit without prev and verify over prev: null; the block is kept
    signed_over_null = _signed(key, _unsigned(prev=_DROP), signed_over=_unsigned())
    commit = Commit.decode(signed_over_null)
    assert commit.prev is None and not commit.prev_present
    assert commit.encode() == signed_over_null
    assert commit.unsigned_bytes() == cbor.encode(_unsigned())
    assert commit.verify(key.did_key())
    # signed over the object without prev: not what any reference implementation checks
    signed_without = _signed(key, _unsigned(prev=_DROP))
    assert not Commit.decode(signed_without).verify(key.did_key())


def test_prev_link_is_kept_and_signed(key: PrivateKey) -> None:
    prev = cbor.cid_for_cbor(b"\xa0")
    _, block = sign_commit(DID, DATA, REV, key, prev=prev)
    commit = Commit.decode(block)
    assert commit.prev == prev
    assert commit.verify(key.did_key())
    assert commit.encode() == block


def test_wrong_key_fails(key: PrivateKey) -> None:
    _, block = sign_commit(DID, DATA, REV, key)
    other = PrivateKey.generate(key.curve)
    assert not Commit.decode(block).verify(other.did_key())


def test_high_s_signature_is_rejected(key: PrivateKey) -> None:
    _, block = sign_commit(DID, DATA, REV, key)
    obj = cbor.decode(block)
    r, s = obj["sig"][:32], int.from_bytes(obj["sig"][32:], "big")
    n = K256_N if key.curve == "k256" else P256_N
    obj["sig"] = r + (n - s).to_bytes(32, "big")
    malleated = Commit.decode(cbor.encode(obj))
    assert not malleated.verify(key.did_key())


def test_v2_commit_without_rev(key: PrivateKey) -> None:
    unsigned = _unsigned(version=2, rev=_DROP)
    block = _signed(key, unsigned)
    commit = Commit.decode(block)
    assert commit.version == 2 and commit.rev is None
    assert commit.unsigned_bytes() == cbor.encode(unsigned)
    assert commit.verify(key.did_key())
    assert commit.encode() == block


def test_v2_commit_with_rev_and_prev(key: PrivateKey) -> None:
    unsigned = _unsigned(version=2, prev=cbor.cid_for_cbor(b"\xa0"))
    commit = Commit.decode(_signed(key, unsigned))
    assert commit.verify(key.did_key())


def test_unknown_fields_round_trip_but_are_not_signed(key: PrivateKey) -> None:
    # reference implementations decode into the known fields and verify over those
    unsigned = _unsigned()
    block = cbor.encode({**unsigned, "zzz": 1, "sig": key.sign(cbor.encode(unsigned))})
    commit = Commit.decode(block)
    assert commit.extra == {"zzz": 1}
    assert commit.encode() == block
    assert commit.verify(key.did_key())
    signed_with_extra = _signed(key, {**unsigned, "zzz": 1})
    assert not Commit.decode(signed_with_extra).verify(key.did_key())


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"version": 4}, "version"),
        ({"version": 1}, "version"),
        ({"version": "3"}, "version"),
        ({"version": True}, "version"),
        ({"version": _DROP}, "version"),
        ({"did": "not-a-did"}, "did"),
        ({"did": 5}, "did"),
        ({"did": _DROP}, "did"),
        ({"data": "bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454"}, "data"),
        ({"data": RAW_CID}, "data"),
        ({"data": None}, "data"),
        ({"data": _DROP}, "data"),
        ({"prev": b"\x01"}, "prev"),
        ({"prev": RAW_CID}, "prev"),
        ({"rev": _DROP}, "rev"),
        ({"rev": None}, "rev"),
        ({"rev": "not-a-tid"}, "rev"),
        ({"rev": 12}, "rev"),
    ],
)
def test_malformed_commit_fields_rejected(key: PrivateKey, over: dict[str, Any], message: str) -> None:
    block = _signed(key, _unsigned(**over))
    with pytest.raises(CommitError, match=message):
        Commit.decode(block)


@pytest.mark.parametrize("sig", [None, "c2ln", 5, [1, 2]])
def test_sig_must_be_bytes(sig: Any) -> None:
    block = cbor.encode({**_unsigned(), "sig": sig})
    with pytest.raises(CommitError, match="sig"):
        Commit.decode(block)


def test_missing_sig_rejected() -> None:
    with pytest.raises(CommitError, match="sig"):
        Commit.decode(cbor.encode(_unsigned()))


@pytest.mark.parametrize(
    "block",
    [
        b"",
        b"\xff",
        b"\x82\x01\x02",  # an array
        cbor.encode("commit"),
        cbor.encode({"did": DID}) + b"\x00",  # trailing bytes
        bytes.fromhex("a2616202616101"),  # map keys not in canonical order
    ],
)
def test_garbage_blocks_rejected(block: bytes) -> None:
    with pytest.raises(CommitError):
        Commit.decode(block)


def test_empty_or_short_signature_does_not_verify(key: PrivateKey) -> None:
    for sig in (b"", b"\x01" * 63, b"\x00" * 64, b"\x01" * 65):
        commit = Commit.decode(cbor.encode({**_unsigned(), "sig": sig}))
        assert not commit.verify(key.did_key())


def test_malformed_key_string_raises_value_error() -> None:
    _, block = sign_commit(DID, DATA, REV, PrivateKey.generate("k256"))
    with pytest.raises(ValueError):
        Commit.decode(block).verify("did:key:zNOPE")


def test_sign_commit_validates_inputs(key: PrivateKey) -> None:
    with pytest.raises(CommitError):
        sign_commit("nope", DATA, REV, key)
    with pytest.raises(CommitError):
        sign_commit(DID, DATA, "nope", key)


def test_decode_accepts_memoryview(key: PrivateKey) -> None:
    _, block = sign_commit(DID, DATA, REV, key)
    assert Commit.decode(memoryview(block)).encode() == block


def test_commit_fields_compare(key: PrivateKey) -> None:
    _, block = sign_commit(DID, DATA, REV, key)
    a, b = Commit.decode(block), Commit.decode(block)
    assert a == b
    assert isinstance(a.data, CID)


def test_unsigned_bytes_known_answer() -> None:
    """Hand-assembled DAG-CBOR of the v3 unsigned commit: keys sorted length-first
    (did, rev, data, prev, version), prev as CBOR null, data as tag 42 with the 0x00 prefix."""
    commit = Commit(DID, 3, DATA, REV, None, b"")
    expected = (
        bytes([0xA5])
        + bytes([0x63]) + b"did" + bytes([0x78, len(DID)]) + DID.encode()
        + bytes([0x63]) + b"rev" + bytes([0x6D]) + REV.encode()
        + bytes([0x64]) + b"data" + bytes([0xD8, 0x2A, 0x58, 0x25, 0x00]) + DATA.cid_bytes
        + bytes([0x64]) + b"prev" + bytes([0xF6])
        + bytes([0x67]) + b"version" + bytes([0x03])
    )  # fmt: skip
    assert commit.unsigned_bytes() == expected
