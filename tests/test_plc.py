"""did:plc operations: the public audit-log vectors plus signing, DID derivation and chain rules."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from psky.atproto import cbor, plc
from psky.atproto.crypto import P256_N, PrivateKey, parse_did_key
from psky.atproto.did import format_plc_document, parse_did_document
from tests.paths import TESTS

# The did-method-plc audit-log interop vectors are not redistributed with psky; point
# PSKY_PLC_VECTORS at a checkout's interop_tests/audit_log to run these tests too.
VECTORS = Path(os.environ.get("PSKY_PLC_VECTORS", TESTS / "fixtures" / "plc" / "audit_log"))
needs_vectors = pytest.mark.skipif(not VECTORS.is_dir(), reason="PLC interop vectors not present (PSKY_PLC_VECTORS)")
VALID = sorted((VECTORS / "valid").glob("*.json"))
INVALID = sorted((VECTORS / "invalid").glob("*.json"))

#: why each invalid vector must fail
INVALID_EXPECT: dict[str, tuple[type[plc.PlcError], str]] = {
    "log_invalid_nullification_reused_key.json": (plc.InvalidSignature, "allowed rotation key"),
    "log_invalid_nullification_too_slow.json": (plc.LateRecovery, "72 h"),
    "log_invalid_sig_b64_newline.json": (plc.InvalidSignature, "base64url"),
    "log_invalid_sig_b64_padding_bits.json": (plc.InvalidSignature, "padding bits"),
    "log_invalid_sig_b64_padding_chars.json": (plc.InvalidSignature, "unpadded"),
    "log_invalid_sig_der.json": (plc.InvalidSignature, "not signed"),
    "log_invalid_sig_k256_high_s.json": (plc.InvalidSignature, "high-S"),
    "log_invalid_sig_p256_high_s.json": (plc.InvalidSignature, "high-S"),
    "log_invalid_update_nullified.json": (plc.MisorderedOperation, "nullified"),
    "log_invalid_update_tombstoned.json": (plc.MisorderedOperation, "tombstone"),
}

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def load(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    assert isinstance(data, list)
    return data
@needs_vectors
def test_every_vector_is_covered() -> None:
    assert len(VALID) == 10
    assert {p.name for p in INVALID} == set(INVALID_EXPECT)


# --- public vectors -------------------------------------------------------------------


@needs_vectors
@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_audit_log(path: Path) -> None:
    entries = load(path)
    data = plc.validate_audit_log(entries)
    did = entries[0]["did"]
    active = [e for e in entries if not e["nullified"]]
    last = active[-1]["operation"]
    if last["type"] == "plc_tombstone":
        assert data is None
    else:
        assert data is not None
        assert data == plc.op_data(did, last)
        assert data["did"] == did
    # the current history alone verifies to the same state
    assert plc.validate_op_log(did, [e["operation"] for e in active]) == data


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_vector_cids_and_did(path: Path) -> None:
    entries = load(path)
    for entry in entries:
        assert plc.op_cid(entry["operation"]) == entry["cid"]
    genesis = entries[0]["operation"]
    assert plc.did_for_genesis(genesis) == entries[0]["did"]
    assert plc.is_valid_plc_did(entries[0]["did"])
    assert plc.verify_op(genesis, plc.rotation_keys_of(genesis))


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_vector_log_entries_round_trip(path: Path) -> None:
    entries = load(path)
    assert [plc.LogEntry.from_json(e).to_json() for e in entries] == entries


@needs_vectors
@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_audit_log(path: Path) -> None:
    exc, words = INVALID_EXPECT[path.name]
    with pytest.raises(exc, match=words):
        plc.validate_audit_log(load(path))
@needs_vectors
def test_audit_log_nullified_flag_must_match() -> None:
    entries = load(VECTORS / "valid" / "log_nullification.json")
    flipped = [dict(e) for e in entries]
    for e in flipped:
        e["nullified"] = False
    with pytest.raises(plc.PlcError, match="nullified"):
        plc.validate_audit_log(flipped)
@needs_vectors
def test_audit_log_cid_must_match() -> None:
    entries = load(VECTORS / "valid" / "log_tombstone.json")
    entries[1] = {**entries[1], "cid": entries[0]["cid"]}
    with pytest.raises(plc.PlcError, match="cid"):
        plc.validate_audit_log(entries)
@needs_vectors
def test_audit_log_structure_errors() -> None:
    with pytest.raises(plc.PlcError, match="empty"):
        plc.validate_audit_log([])
    entries = load(VECTORS / "valid" / "log_tombstone.json")
    with pytest.raises(plc.PlcError, match="mixes DIDs"):
        plc.validate_audit_log([entries[0], {**entries[1], "did": "did:plc:" + "a" * 24}])
    with pytest.raises(plc.PlcError, match="createdAt"):
        plc.validate_audit_log([{**entries[0], "createdAt": "yesterday"}])
    with pytest.raises(plc.MisorderedOperation, match="timestamps"):
        plc.validate_audit_log([entries[0], {**entries[1], "createdAt": entries[0]["createdAt"]}])
@needs_vectors
def test_legacy_create_vector() -> None:
    entries = load(VECTORS / "valid" / "log_legacy_dholms.json")
    legacy = entries[0]["operation"]
    assert legacy["type"] == "create"
    assert plc.did_for_genesis(legacy) == "did:plc:yk4dd2qkboz2yv6tpubpc6co"
    assert plc.rotation_keys_of(legacy) == [legacy["recoveryKey"], legacy["signingKey"]]
    norm = plc.normalize_op(legacy)
    assert norm == {
        "type": "plc_operation",
        "verificationMethods": {"atproto": legacy["signingKey"]},
        "rotationKeys": [legacy["recoveryKey"], legacy["signingKey"]],
        "alsoKnownAs": ["at://dan.bsky.social"],
        "services": {"atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": "https://bsky.social"}},
        "prev": None,
        "sig": legacy["sig"],
    }
    # a legacy create is only ever acceptable as a genesis op, never as a new submission
    with pytest.raises(plc.InvalidOperation, match="legacy"):
        plc.check_incoming_op(legacy)
    with pytest.raises(plc.InvalidOperation, match="legacy"):
        plc.validate_op_log(entries[0]["did"], [legacy, legacy])


def test_update_from_legacy_create() -> None:
    key = PrivateKey.generate("k256")
    recovery = PrivateKey.generate("k256")
    legacy = plc.sign_op(
        {
            "type": "create",
            "signingKey": key.did_key(),
            "recoveryKey": recovery.did_key(),
            "handle": "alice.test",
            "service": "https://example.com",
            "prev": None,
        },
        key,
    )
    did = plc.did_for_genesis(legacy)
    nxt = plc.sign_op(plc.update_op(legacy, handle="bob.test"), key)
    assert nxt["prev"] == plc.op_cid(legacy)
    data = plc.validate_op_log(did, [legacy, nxt])
    assert data is not None
    assert data["alsoKnownAs"] == ["at://bob.test"]
    assert data["rotationKeys"] == [recovery.did_key(), key.did_key()]


# --- signatures ------------------------------------------------------------------------


def account_op(
    rotation: PrivateKey, *, handle: str = "alice.test", prev: str | None = None
) -> dict[str, Any]:
    signing = PrivateKey.generate("k256")
    return plc.create_op(
        signing_key=signing.did_key(),
        rotation_keys=[rotation.did_key()],
        handle=handle,
        pds_endpoint="http://127.0.0.1:2583",
        prev=prev,
    )


@pytest.mark.parametrize("curve", ["k256", "p256"])
def test_sign_verify_round_trip(curve: str) -> None:
    key = PrivateKey.generate(curve)  # type: ignore[arg-type]
    other = PrivateKey.generate(curve)  # type: ignore[arg-type]
    signed = plc.sign_op(account_op(key), key)
    assert set(signed) == {*account_op(key), "sig"}
    sig = plc.decode_sig(signed["sig"])
    assert len(sig) == 64 and plc.encode_sig(sig) == signed["sig"] and "=" not in signed["sig"]
    assert parse_did_key(key.did_key()).verify(plc.unsigned_bytes(signed), sig)
    assert plc.verify_op(signed, [key.did_key()])
    assert plc.signer_index(signed, [other.did_key(), key.did_key()]) == 1
    assert not plc.verify_op(signed, [other.did_key()])
    assert not plc.verify_op(signed, [])
    # any change to the signed content breaks the signature
    assert not plc.verify_op({**signed, "alsoKnownAs": ["at://mallory.test"]}, [key.did_key()])
    # re-signing replaces the signature rather than signing over it
    resigned = plc.sign_op(signed, other)
    assert plc.verify_op(resigned, [other.did_key()]) and not plc.verify_op(resigned, [key.did_key()])
    # unusable keys never match, they do not raise
    assert not plc.verify_op(signed, ["did:key:zBogus", "not-a-key"])


def test_unsigned_bytes_are_dag_cbor_without_sig() -> None:
    key = PrivateKey.generate("p256")
    signed = plc.sign_op(account_op(key), key)
    unsigned = {k: v for k, v in signed.items() if k != "sig"}
    assert plc.unsigned_bytes(signed) == cbor.encode(unsigned)
    assert cbor.decode(plc.unsigned_bytes(signed)) == unsigned
    # prev is a string inside the CBOR, not a link
    nxt = plc.update_op(signed, handle="bob.test")
    assert isinstance(cbor.decode(plc.unsigned_bytes(nxt))["prev"], str)


def test_high_s_signature_rejected() -> None:
    key = PrivateKey.generate("p256")
    signed = plc.sign_op(account_op(key), key)
    sig = plc.decode_sig(signed["sig"])
    r, s = sig[:32], int.from_bytes(sig[32:], "big")
    high = r + (P256_N - s).to_bytes(32, "big")
    forged = {**signed, "sig": plc.encode_sig(high)}
    assert not plc.verify_op(forged, [key.did_key()])
    did = plc.did_for_genesis(forged)
    with pytest.raises(plc.InvalidSignature, match="high-S"):
        plc.assure_valid_next_op(did, [], forged, T0)


@pytest.mark.parametrize(
    "sig",
    [
        None,
        "",
        "AAAA",
        "A" * 85,
        "A" * 87,
        "A" * 86 + "==",
        "A" * 85 + "=",
        "A" * 84 + "+/",
        "A" * 85 + "B",  # non-zero padding bits
        "A" * 84 + "\nA",
        "A" * 84 + " A",
    ],
)
def test_decode_sig_is_strict(sig: object) -> None:
    with pytest.raises(plc.InvalidSignature):
        plc.decode_sig(sig)


def test_decode_sig_accepts_canonical() -> None:
    raw = bytes(range(64))
    assert plc.decode_sig(plc.encode_sig(raw)) == raw
    assert plc.decode_sig("A" * 85 + "A") == bytes(64)
    assert plc.decode_sig("_" * 85 + "w") == b"\xff" * 63 + b"\xff"


# --- DIDs and CIDs ---------------------------------------------------------------------


def test_did_derivation_matches_spec_pseudocode() -> None:
    key = PrivateKey.generate("k256")
    signed = plc.sign_op(account_op(key), key)
    digest = hashlib.sha256(cbor.encode(signed)).digest()
    expected = "did:plc:" + base64.b32encode(digest).decode().lower()[:24]
    assert plc.did_for_genesis(signed) == expected
    assert plc.is_valid_plc_did(expected)
    # the DID covers the signature and every field
    assert plc.did_for_genesis({**signed, "sig": plc.encode_sig(bytes(64))}) != expected
    assert plc.did_for_genesis({**signed, "alsoKnownAs": []}) != expected
    # key order of the JSON object does not matter: DAG-CBOR sorts keys
    assert plc.did_for_genesis(dict(reversed(list(signed.items())))) == expected


def test_op_cid() -> None:
    key = PrivateKey.generate("k256")
    signed = plc.sign_op(account_op(key), key)
    cid = plc.op_cid(signed)
    assert cid.startswith("bafyrei")
    assert cid == cbor.cid_str(cbor.cid_for_cbor(cbor.encode(signed)))
    parsed = cbor.parse_cid(cid)
    assert parsed.cid_bytes[:4] == b"\x01\x71\x12\x20"


@pytest.mark.parametrize(
    "did",
    ["did:plc:abc", "did:plc:" + "A" * 24, "did:plc:" + "a" * 25, "did:plc:" + "1" * 24, "did:web:x", 7],
)
def test_invalid_plc_dids(did: object) -> None:
    assert not plc.is_valid_plc_did(did)


# --- building ops ------------------------------------------------------------------------


def test_create_op_shape() -> None:
    op = plc.create_op(
        signing_key="did:key:zSigning",
        rotation_keys=["did:key:zA", "did:key:zB"],
        handle="alice.test",
        pds_endpoint="pds.example.com",
        prev=None,
    )
    assert op == {
        "type": "plc_operation",
        "verificationMethods": {"atproto": "did:key:zSigning"},
        "rotationKeys": ["did:key:zA", "did:key:zB"],
        "alsoKnownAs": ["at://alice.test"],
        "services": {
            "atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": "https://pds.example.com"}
        },
        "prev": None,
    }
    labeler = plc.create_op(
        signing_key="did:key:zSigning",
        rotation_keys=["did:key:zA"],
        handle="at://mod.test",
        pds_endpoint=None,
        verification_methods={"atproto_label": "did:key:zLabel"},
        services={"atproto_labeler": {"type": "AtprotoLabeler", "endpoint": "http://127.0.0.1:1"}},
    )
    assert labeler["verificationMethods"] == {
        "atproto": "did:key:zSigning",
        "atproto_label": "did:key:zLabel",
    }
    assert labeler["services"] == {
        "atproto_labeler": {"type": "AtprotoLabeler", "endpoint": "http://127.0.0.1:1"}
    }
    assert labeler["alsoKnownAs"] == ["at://mod.test"]


def test_update_op_changes_only_what_is_asked() -> None:
    key = PrivateKey.generate("k256")
    genesis = plc.create_op(
        signing_key="did:key:zS",
        rotation_keys=[key.did_key()],
        handle="alice.test",
        pds_endpoint="https://pds.test",
        also_known_as=["https://alice.example"],
    )
    signed = plc.sign_op(genesis, key)
    nxt = plc.update_op(signed, handle="bob.test")
    assert nxt["prev"] == plc.op_cid(signed)
    assert nxt["alsoKnownAs"] == ["at://bob.test", "https://alice.example"]
    assert {k: v for k, v in nxt.items() if k not in ("prev", "alsoKnownAs")} == {
        k: v for k, v in genesis.items() if k not in ("prev", "alsoKnownAs")
    }
    nxt = plc.update_op(signed, also_known_as=["https://x.example"], handle="carol.test")
    assert nxt["alsoKnownAs"] == ["at://carol.test", "https://x.example"]
    nxt = plc.update_op(
        signed, signing_key="did:key:zNew", pds_endpoint="other.test", rotation_keys=["did:key:zR"]
    )
    assert nxt["verificationMethods"] == {"atproto": "did:key:zNew"}
    assert nxt["services"]["atproto_pds"]["endpoint"] == "https://other.test"
    assert nxt["rotationKeys"] == ["did:key:zR"]
    assert "sig" not in nxt
    with pytest.raises(plc.InvalidOperation, match="tombstone"):
        plc.update_op(plc.tombstone_op(plc.op_cid(signed), key))


def test_tombstone_op() -> None:
    key = PrivateKey.generate("p256")
    signed = plc.sign_op(account_op(key), key)
    tomb = plc.tombstone_op(plc.op_cid(signed), key)
    assert set(tomb) == {"type", "prev", "sig"} and tomb["type"] == "plc_tombstone"
    assert plc.verify_op(tomb, [key.did_key()])
    assert plc.op_data("did:plc:" + "a" * 24, tomb) is None
    assert plc.rotation_keys_of(tomb) == []
    with pytest.raises(cbor.DecodeError):
        plc.tombstone_op("not-a-cid", key)


# --- structure ----------------------------------------------------------------------------


def signed_genesis(**changes: Any) -> dict[str, Any]:
    key = PrivateKey.generate("k256")
    op = {**account_op(key), **changes}
    return plc.sign_op(op, key)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"type": "plc_whatever"}, "unknown operation type"),
        ({"extra": 1}, "unexpected field"),
        ({"rotationKeys": "did:key:z"}, "rotationKeys must be an array"),
        ({"rotationKeys": [1]}, "rotationKeys must be an array"),
        ({"alsoKnownAs": None}, "alsoKnownAs must be an array"),
        ({"verificationMethods": []}, "verificationMethods"),
        ({"verificationMethods": {"atproto": 5}}, "verificationMethods"),
        ({"services": []}, "services must be an object"),
        ({"services": {"atproto_pds": {"type": "x"}}}, "exactly"),
        ({"services": {"atproto_pds": {"type": "x", "endpoint": "y", "more": "z"}}}, "exactly"),
        ({"prev": 5}, "prev must be a CID string"),
        ({"prev": "bafynotacid"}, "prev is not a valid CID"),
    ],
)
def test_check_op_rejects(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(plc.InvalidOperation, match=words):
        plc.check_op(signed_genesis(**changes))


def test_check_op_missing_fields_and_sig() -> None:
    op = signed_genesis()
    with pytest.raises(plc.InvalidOperation, match="not signed"):
        plc.check_op({k: v for k, v in op.items() if k != "sig"})
    assert plc.check_op({k: v for k, v in op.items() if k != "sig"}, signed=False) == "plc_operation"
    with pytest.raises(plc.InvalidOperation, match="missing services"):
        plc.check_op({k: v for k, v in op.items() if k != "services"})
    with pytest.raises(plc.InvalidOperation, match="sig must be a string"):
        plc.check_op({**op, "sig": 5})
    with pytest.raises(plc.InvalidOperation, match="JSON object"):
        plc.check_op([op])
    with pytest.raises(plc.InvalidOperation, match="prev must be a CID"):
        plc.check_op({"type": "plc_tombstone", "prev": None, "sig": op["sig"]})


def test_check_incoming_limits() -> None:
    ed25519 = "did:key:z6MkjwbBXZnFqL8su24wGL2Fdjti6GSLv9SWdYGswfazUPm9"
    assert plc.check_incoming_op(signed_genesis()) == "plc_operation"
    # any syntactically valid did:key is fine as a verification method, not as a rotation key
    assert plc.check_incoming_op(signed_genesis(verificationMethods={"atproto": ed25519}))
    bad: list[tuple[dict[str, Any], str]] = [
        ({"rotationKeys": [ed25519]}, "rotationKey"),
        ({"rotationKeys": ["zQ3shP5TBe1sQfSttXty15FAEHV1DZgcxRZNxvEWnPfLFwLxJ"]}, "rotationKey"),
        ({"rotationKeys": ["did:key:zQ3sh"] * 11}, "too many rotationKeys"),
        ({"verificationMethods": {"atproto": "did:banana"}}, "verificationMethod key"),
        ({"verificationMethods": {"atproto": "did:key:BJV2WY5DJMJQXGZJANFZSAYLXMVZW63LFEEQFY3ZP"}}, "key"),
        ({"verificationMethods": {"atproto": "did:key:z0OIl"}}, "key"),
        ({"verificationMethods": {"atproto": "did:key:z" + "a" * 300}}, "too long"),
        ({"verificationMethods": {"x" * 33: ed25519}}, "id too long"),
        ({"verificationMethods": {f"k{i}": ed25519 for i in range(11)}}, "too many verificationMethods"),
        ({"alsoKnownAs": ["at://a", "at://a"]}, "duplicate"),
        ({"alsoKnownAs": [f"at://{i}" for i in range(11)]}, "too many alsoKnownAs"),
        ({"alsoKnownAs": ["at://" + "a" * 254]}, "too long"),
        ({"services": {"s" * 33: {"type": "t", "endpoint": "e"}}}, "service id too long"),
        ({"services": {"s": {"type": "t" * 257, "endpoint": "e"}}}, "service type too long"),
        ({"services": {"s": {"type": "t", "endpoint": "e" * 513}}}, "endpoint too long"),
        ({"services": {f"s{i}": {"type": "t", "endpoint": "e"} for i in range(11)}}, "too many services"),
        (
            {"services": {f"s{i}": {"type": "t" * 200, "endpoint": "e" * 500} for i in range(10)}},
            "too large",
        ),
    ]
    for changes, words in bad:
        with pytest.raises(plc.InvalidOperation, match=words):
            plc.check_incoming_op(signed_genesis(**changes))


# --- chain rules ---------------------------------------------------------------------------


class Chain:
    """A DID's history kept the way a directory keeps it."""

    def __init__(self, genesis: dict[str, Any]) -> None:
        self.did = plc.did_for_genesis(genesis)
        self.entries: list[plc.LogEntry] = []
        self.now = T0
        self.add(genesis)

    @property
    def active(self) -> list[plc.LogEntry]:
        return [e for e in self.entries if not e.nullified]

    def add(self, op: dict[str, Any], after: timedelta = timedelta(seconds=1)) -> plc.NextOp:
        self.now += after
        outcome = plc.assure_valid_next_op(self.did, self.active, op, self.now)
        for e in self.entries:
            if e.cid in outcome.nullified:
                e.nullified = True
        self.entries.append(plc.LogEntry(self.did, op, plc.op_cid(op), False, self.now))
        return outcome

    def last(self) -> dict[str, Any]:
        return self.active[-1].operation


def make_chain(keys: list[PrivateKey]) -> Chain:
    op = plc.create_op(
        signing_key=PrivateKey.generate("k256").did_key(),
        rotation_keys=[k.did_key() for k in keys],
        handle="alice.test",
        pds_endpoint="https://pds.test",
    )
    return Chain(plc.sign_op(op, keys[-1]))


def test_chain_updates_and_key_rotation() -> None:
    a, b, c = (PrivateKey.generate(cv) for cv in ("k256", "p256", "k256"))
    chain = make_chain([a, b])
    assert chain.add(plc.sign_op(plc.update_op(chain.last(), handle="bob.test"), b)).nullified == ()
    # rotate: only c from now on
    chain.add(plc.sign_op(plc.update_op(chain.last(), rotation_keys=[c.did_key()]), a))
    with pytest.raises(plc.InvalidSignature, match="not signed"):
        chain.add(plc.sign_op(plc.update_op(chain.last(), handle="x.test"), a))
    chain.add(plc.sign_op(plc.update_op(chain.last(), handle="carol.test"), c))
    data = plc.validate_audit_log(chain.entries)
    assert data is not None and data["alsoKnownAs"] == ["at://carol.test"]
    assert data["rotationKeys"] == [c.did_key()]
    assert plc.validate_op_log(chain.did, [e.operation for e in chain.entries]) == data


def test_chain_rejections() -> None:
    a = PrivateKey.generate("k256")
    chain = make_chain([a])
    good = plc.sign_op(plc.update_op(chain.last(), handle="bob.test"), a)
    # wrong prev
    wrong_prev = plc.sign_op({**good, "prev": plc.op_cid(good)}, a)
    with pytest.raises(plc.MisorderedOperation, match="not an operation in the current history"):
        chain.add(wrong_prev)
    no_prev = plc.sign_op({**good, "prev": None}, a)
    with pytest.raises(plc.MisorderedOperation, match="prev"):
        chain.add(no_prev)
    # bad signature (signed, then modified)
    with pytest.raises(plc.InvalidSignature):
        chain.add({**good, "alsoKnownAs": ["at://mallory.test"]})
    # another DID's genesis op
    other = plc.sign_op(account_op(a, handle="other.test"), a)
    with pytest.raises(plc.GenesisHashMismatch, match=plc.did_for_genesis(other)):
        plc.assure_valid_next_op(chain.did, [], other, T0)
    with pytest.raises(plc.InvalidOperation, match="prev null"):
        plc.assure_valid_next_op(chain.did, [], good, T0)
    with pytest.raises(plc.MisorderedOperation, match="tombstone"):
        plc.assure_valid_next_op(chain.did, [], plc.tombstone_op(chain.active[0].cid, a), T0)
    chain.add(good)
    # tombstone, then nothing more
    chain.add(plc.tombstone_op(plc.op_cid(chain.last()), a))
    assert plc.validate_audit_log(chain.entries) is None
    after = plc.sign_op(plc.update_op(good, handle="late.test"), a)
    after["prev"] = plc.op_cid(chain.last())
    after = plc.sign_op(after, a)
    with pytest.raises(plc.MisorderedOperation, match="tombstoned"):
        chain.add(after)


def test_recovery_fork_by_stronger_key() -> None:
    recovery, rotation, attacker = (PrivateKey.generate(c) for c in ("p256", "k256", "k256"))
    chain = make_chain([recovery, rotation])
    fork_point = chain.last()
    # the weaker key hands the DID to an attacker
    chain.add(plc.sign_op(plc.update_op(fork_point, rotation_keys=[attacker.did_key()]), rotation))
    chain.add(plc.sign_op(plc.update_op(chain.last(), handle="evil.test"), attacker))
    # the same weak key cannot fork back
    with pytest.raises(plc.InvalidSignature, match="history fork"):
        chain.add(plc.sign_op(plc.update_op(fork_point, handle="back.test"), rotation))
    # the stronger key can, within 72 h
    outcome = chain.add(
        plc.sign_op(plc.update_op(fork_point, rotation_keys=[recovery.did_key()]), recovery),
        after=timedelta(hours=70),
    )
    assert outcome.prev == plc.op_cid(fork_point)
    assert len(outcome.nullified) == 2
    assert [e.nullified for e in chain.entries] == [False, True, True, False]
    data = plc.validate_audit_log(chain.entries)
    assert data is not None and data["rotationKeys"] == [recovery.did_key()]
    # nothing can chain onto the nullified branch
    with pytest.raises(plc.MisorderedOperation):
        chain.add(plc.sign_op(plc.update_op(chain.entries[2].operation, handle="zombie.test"), attacker))


def test_recovery_window_is_72_hours() -> None:
    recovery, rotation = PrivateKey.generate("k256"), PrivateKey.generate("k256")
    chain = make_chain([recovery, rotation])
    fork_point = chain.last()
    chain.add(plc.sign_op(plc.update_op(fork_point, handle="b.test"), rotation))
    late = plc.sign_op(plc.update_op(fork_point, handle="c.test"), recovery)
    with pytest.raises(plc.LateRecovery, match="72 h"):
        chain.add(late, after=timedelta(hours=72, milliseconds=1))
    exactly = Chain(chain.entries[0].operation)
    exactly.add(chain.entries[1].operation)
    exactly.add(late, after=timedelta(hours=72))
    assert plc.validate_audit_log(exactly.entries) is not None


def test_recovery_needs_increasing_time() -> None:
    recovery, rotation = PrivateKey.generate("k256"), PrivateKey.generate("k256")
    chain = make_chain([recovery, rotation])
    fork_point = chain.last()
    chain.add(plc.sign_op(plc.update_op(fork_point, handle="b.test"), rotation))
    with pytest.raises(plc.MisorderedOperation, match="timestamps"):
        plc.assure_valid_next_op(
            chain.did,
            chain.active,
            plc.sign_op(plc.update_op(fork_point, handle="c.test"), recovery),
            chain.now,
        )


# --- documents --------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", ["k256", "p256"])
def test_format_document(curve: str) -> None:
    signing = PrivateKey.generate(curve)  # type: ignore[arg-type]
    other = PrivateKey.generate("p256" if curve == "k256" else "k256")
    key = PrivateKey.generate("k256")
    op = plc.create_op(
        signing_key=signing.did_key(),
        rotation_keys=[key.did_key()],
        handle="alice.test",
        pds_endpoint="https://pds.test",
        verification_methods={"other": other.did_key()},
        services={"other": {"type": "SomeService", "endpoint": "https://other.test"}},
    )
    signed = plc.sign_op(op, key)
    did = plc.did_for_genesis(signed)
    data = plc.op_data(did, signed)
    assert data is not None
    doc = plc.format_document(did, data)
    assert doc == format_plc_document(did, data)
    assert doc["verificationMethod"][0]["publicKeyMultibase"] == signing.did_key().removeprefix("did:key:")
    assert [m["id"] for m in doc["verificationMethod"]] == [f"{did}#atproto", f"{did}#other"]
    assert [s["id"] for s in doc["service"]] == ["#atproto_pds", "#other"]
    parsed = parse_did_document(doc, expected_did=did)
    assert parsed.handle == "alice.test"
    assert parsed.signing_key == signing.did_key()
    assert parsed.pds_endpoint == "https://pds.test"


def test_format_document_unknown_key_type() -> None:
    ed25519 = "did:key:z6MkjwbBXZnFqL8su24wGL2Fdjti6GSLv9SWdYGswfazUPm9"
    did = "did:plc:" + "a" * 24
    data = {
        "did": did,
        "verificationMethods": {"atproto": ed25519},
        "rotationKeys": [],
        "alsoKnownAs": [],
        "services": {},
    }
    doc = plc.format_document(did, data)
    assert doc["@context"] == ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"]
    assert doc["verificationMethod"] == [
        {"id": f"{did}#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": ed25519[8:]}
    ]


def test_created_at_round_trip() -> None:
    when = datetime(2025, 7, 25, 15, 50, 58, 440123, tzinfo=UTC)
    assert plc.format_created_at(when) == "2025-07-25T15:50:58.440Z"
    assert plc.parse_created_at("2025-07-25T15:50:58.440Z") == when.replace(microsecond=440000)
    assert plc.parse_created_at("1970-01-01T00:00:00.000Z") == datetime(1970, 1, 1, tzinfo=UTC)
    for bad in ("2025-07-25", "2025-07-25T15:50:58", 5, None):
        with pytest.raises(plc.PlcError):
            plc.parse_created_at(bad)
