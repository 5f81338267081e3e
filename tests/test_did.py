"""psky.atproto.did: DID documents in the forms real resolvers return, PLC data, DID syntax."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from psky.atproto.crypto import PrivateKey, parse_did_key
from psky.atproto.did import (
    DidDocument,
    DidService,
    DidTombstoned,
    InvalidDid,
    InvalidDidDocument,
    build_did_document,
    did_web_to_url,
    document_from_plc_data,
    format_plc_document,
    is_valid_did,
    normalize_plc_data,
    parse_did_document,
    plc_url,
    validate_did,
)
from tests.paths import INTEROP

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
SIG_FIXTURES: list[dict[str, Any]] = json.loads((INTEROP / "crypto" / "signature-fixtures.json").read_text())
K256 = next(f for f in SIG_FIXTURES if f["algorithm"] == "ES256K")
P256 = next(f for f in SIG_FIXTURES if f["algorithm"] == "ES256")
K256_DIDKEY: str = K256["publicKeyDid"]
P256_DIDKEY: str = P256["publicKeyDid"]
LABEL_DIDKEY = PrivateKey.from_bytes(b"\x05" * 32, "k256").did_key()


def _syntax_lines(name: str) -> list[str]:
    text = (INTEROP / "syntax" / name).read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def plc_directory_doc() -> dict[str, Any]:
    """As plc.directory serves it: absolute method ids, relative service ids."""
    return {
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
            "https://w3id.org/security/suites/secp256k1-2019/v1",
        ],
        "id": DID,
        "alsoKnownAs": ["at://atproto.com"],
        "verificationMethod": [
            {
                "id": f"{DID}#atproto",
                "type": "Multikey",
                "controller": DID,
                "publicKeyMultibase": K256_DIDKEY[len("did:key:") :],
            }
        ],
        "service": [
            {
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": "https://enoki.us-east.host.bsky.network",
            }
        ],
    }


def _set_ids(doc: dict[str, Any], absolute: bool) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for item in doc.get("verificationMethod", []) + doc.get("service", []):
        frag = item["id"].split("#", 1)[1]
        item["id"] = f"{doc['id']}#{frag}" if absolute else f"#{frag}"
    return doc


# --- documents ------------------------------------------------------------------------


def test_plc_directory_document() -> None:
    d = parse_did_document(plc_directory_doc(), expected_did=DID)
    assert d == DidDocument(
        id=DID,
        also_known_as=("at://atproto.com",),
        handle="atproto.com",
        signing_key=K256_DIDKEY,
        pds_endpoint="https://enoki.us-east.host.bsky.network",
        labeler_key=None,
        labeler_endpoint=None,
        keys={"atproto": K256_DIDKEY},
        services={
            "atproto_pds": DidService("AtprotoPersonalDataServer", "https://enoki.us-east.host.bsky.network")
        },
    )


@pytest.mark.parametrize("absolute", [True, False], ids=["absolute-ids", "relative-ids"])
def test_both_id_styles(absolute: bool) -> None:
    d = parse_did_document(_set_ids(plc_directory_doc(), absolute))
    assert d.signing_key == K256_DIDKEY
    assert d.pds_endpoint == "https://enoki.us-east.host.bsky.network"


def test_ids_of_another_did_are_ignored() -> None:
    doc = plc_directory_doc()
    other = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
    doc["verificationMethod"][0]["id"] = f"{other}#atproto"
    doc["service"][0]["id"] = f"{other}#atproto_pds"
    d = parse_did_document(doc)
    assert d.signing_key is None and d.pds_endpoint is None
    # a prefix of the DID is not the DID
    doc["verificationMethod"][0]["id"] = f"{DID[:-1]}#atproto"
    assert parse_did_document(doc).signing_key is None


@pytest.mark.parametrize("fx", [K256, P256], ids=["k256", "p256"])
def test_legacy_verification_method_types(fx: dict[str, Any]) -> None:
    doc = plc_directory_doc()
    doc["verificationMethod"] = [
        {
            "id": "#atproto",
            "type": fx["didDocSuite"],
            "controller": DID,
            "publicKeyMultibase": fx["publicKeyMultibase"],
        }
    ]
    assert parse_did_document(doc).signing_key == fx["publicKeyDid"]


def test_legacy_uncompressed_key() -> None:
    from psky.atproto.crypto import b58encode

    pub = parse_did_key(P256_DIDKEY)
    doc = plc_directory_doc()
    doc["verificationMethod"][0].update(
        type="EcdsaSecp256r1VerificationKey2019", publicKeyMultibase="z" + b58encode(pub.uncompressed)
    )
    assert parse_did_document(doc).signing_key == P256_DIDKEY


def test_p256_multikey() -> None:
    doc = plc_directory_doc()
    doc["verificationMethod"][0]["publicKeyMultibase"] = P256_DIDKEY[len("did:key:") :]
    assert parse_did_document(doc).signing_key == P256_DIDKEY


@pytest.mark.parametrize(
    "change",
    [
        {"publicKeyMultibase": None},
        {"publicKeyMultibase": 42},
        {"type": "Ed25519VerificationKey2020"},
        {"type": "JsonWebKey2020"},
        {"publicKeyMultibase": "zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJw"},  # truncated
        {"publicKeyMultibase": "not-multibase"},
        {"type": "EcdsaSecp256k1VerificationKey2019"},  # Multikey bytes under the legacy type
        {"controller": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"},
    ],
)
def test_unusable_key_is_absent_not_fatal(change: dict[str, Any]) -> None:
    doc = plc_directory_doc()
    vm = doc["verificationMethod"][0]
    for k, v in change.items():
        if v is None:
            del vm[k]
        else:
            vm[k] = v
    d = parse_did_document(doc)
    assert d.signing_key is None
    assert d.pds_endpoint == "https://enoki.us-east.host.bsky.network"


def test_missing_key_and_services() -> None:
    doc = plc_directory_doc()
    del doc["verificationMethod"], doc["service"], doc["alsoKnownAs"]
    d = parse_did_document(doc)
    assert (d.signing_key, d.pds_endpoint, d.handle, d.also_known_as) == (None, None, None, ())


def test_first_matching_method_wins() -> None:
    doc = plc_directory_doc()
    doc["verificationMethod"].append(
        {"id": "#atproto", "type": "Multikey", "controller": DID, "publicKeyMultibase": P256_DIDKEY[8:]}
    )
    assert parse_did_document(doc).signing_key == K256_DIDKEY
    # an unusable first entry still claims the id (as the reference resolver does)
    doc["verificationMethod"][0]["type"] = "Unknown"
    assert parse_did_document(doc).signing_key is None


def test_foreign_controller_does_not_claim_the_id() -> None:
    doc = plc_directory_doc()
    doc["verificationMethod"].insert(
        0,
        {
            "id": "#atproto",
            "type": "Multikey",
            "controller": "did:web:evil.example",
            "publicKeyMultibase": P256_DIDKEY[8:],
        },
    )
    assert parse_did_document(doc).signing_key == K256_DIDKEY


def test_multiple_services_and_labeler() -> None:
    doc = plc_directory_doc()
    doc["verificationMethod"].append(
        {
            "id": f"{DID}#atproto_label",
            "type": "Multikey",
            "controller": DID,
            "publicKeyMultibase": LABEL_DIDKEY[8:],
        }
    )
    doc["service"] += [
        {
            "id": f"{DID}#atproto_labeler",
            "type": "AtprotoLabeler",
            "serviceEndpoint": "https://mod.example.com/",
        },
        {"id": "#bsky_fg", "type": "BskyFeedGenerator", "serviceEndpoint": "https://feed.example.com"},
        {"id": "#bsky_chat", "type": "BskyChatService", "serviceEndpoint": {"uri": "https://x"}},
        {"id": "#other", "type": "Whatever", "serviceEndpoint": ["https://a", "https://b"]},
    ]
    d = parse_did_document(doc)
    assert d.signing_key == K256_DIDKEY
    assert d.labeler_key == LABEL_DIDKEY
    assert d.labeler_endpoint == "https://mod.example.com"
    assert d.pds_endpoint == "https://enoki.us-east.host.bsky.network"
    assert d.service_endpoint("#bsky_fg", "BskyFeedGenerator") == "https://feed.example.com"
    assert d.service_endpoint("bsky_fg", "BskyFeedGenerator") == "https://feed.example.com"
    assert d.service_endpoint("bsky_fg", "AtprotoLabeler") is None
    assert d.service_endpoint("bsky_chat", "BskyChatService") is None
    assert set(d.services) == {"atproto_pds", "atproto_labeler", "bsky_fg"}


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("https://pds.example.com", "https://pds.example.com"),
        ("https://pds.example.com/", "https://pds.example.com"),
        ("https://pds.example.com//", "https://pds.example.com"),
        ("http://localhost:2583/", "http://localhost:2583"),
        ("https://pds.example.com:8443/base/", "https://pds.example.com:8443/base"),
        ("HTTPS://PDS.example.com", "HTTPS://PDS.example.com"),
        ("ftp://pds.example.com", None),
        ("pds.example.com", None),
        ("https://", None),
        ("https:///path", None),
        ("https://host:99999", None),
        ("https://host:port", None),
        ("https://pds.example.com/a b", None),
        ("javascript:alert(1)", None),
        ("", None),
        ("https://" + "a" * 3000 + ".com", None),
        (42, None),
        (None, None),
        ({"uri": "https://pds.example.com"}, None),
    ],
)
def test_pds_endpoint_forms(endpoint: Any, expected: str | None) -> None:
    doc = plc_directory_doc()
    doc["service"][0]["serviceEndpoint"] = endpoint
    assert parse_did_document(doc).pds_endpoint == expected


def test_pds_service_of_wrong_type() -> None:
    doc = plc_directory_doc()
    doc["service"][0]["type"] = "AtpPersonalDataServer"
    d = parse_did_document(doc)
    assert d.pds_endpoint is None
    assert (
        d.service_endpoint("atproto_pds", "AtpPersonalDataServer")
        == "https://enoki.us-east.host.bsky.network"
    )
    # first entry with the id decides, even if a later one would have the right type
    doc["service"].append(
        {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://x.example"}
    )
    assert parse_did_document(doc).pds_endpoint is None


@pytest.mark.parametrize(
    ("aka", "handle"),
    [
        (["at://alice.example.com"], "alice.example.com"),
        (["at://Alice.Example.COM"], "alice.example.com"),
        (["https://alice.example.com", "at://alice.example.com"], "alice.example.com"),
        (["at://first.example", "at://second.example"], "first.example"),
        (["at://not a handle"], None),
        (["at://"], None),
        (["at://did:plc:ewvi7nxzyoun6zhxrhs64oiz"], None),
        (["at://localhost"], None),
        (["https://alice.example.com"], None),
        ([], None),
    ],
)
def test_handle(aka: list[str], handle: str | None) -> None:
    doc = plc_directory_doc()
    doc["alsoKnownAs"] = aka
    d = parse_did_document(doc)
    assert d.handle == handle
    assert d.also_known_as == tuple(aka)


def test_expected_did_mismatch() -> None:
    with pytest.raises(InvalidDidDocument, match="expected"):
        parse_did_document(plc_directory_doc(), expected_did="did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")


def test_did_web_document() -> None:
    did = "did:web:labeler.example.com"
    doc = {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "verificationMethod": [
            {
                "id": f"{did}#atproto_label",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": LABEL_DIDKEY[8:],
            }
        ],
        "service": [
            {
                "id": "#atproto_labeler",
                "type": "AtprotoLabeler",
                "serviceEndpoint": "https://labeler.example.com",
            }
        ],
    }
    d = parse_did_document(doc, expected_did=did)
    assert d.labeler_key == LABEL_DIDKEY
    assert d.labeler_endpoint == "https://labeler.example.com"
    assert d.signing_key is None


def _mutate(path: str, value: Any) -> dict[str, Any]:
    doc = plc_directory_doc()
    target: Any = doc
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if isinstance(target, list) else target[k]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return doc


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
        42,
        _mutate("id", KeyError),
        _mutate("id", 42),
        _mutate("id", "plc:ewvi7nxzyoun6zhxrhs64oiz"),
        _mutate("id", "did:plc:short"),
        _mutate("id", "did:plc:EWVI7NXZYOUN6ZHXRHS64OIZ"),
        _mutate("id", "did:web:example.com:path"),
        _mutate("id", "did:web:exa_mple.com"),
        _mutate("alsoKnownAs", "at://atproto.com"),
        _mutate("alsoKnownAs", [1, 2]),
        _mutate("alsoKnownAs", [None]),
        _mutate("verificationMethod", "did:key:z"),
        _mutate("verificationMethod", 3),
        _mutate("verificationMethod", ["#atproto"]),
        _mutate("verificationMethod.0.id", KeyError),
        _mutate("verificationMethod.0.id", 7),
        _mutate("verificationMethod.0.type", KeyError),
        _mutate("verificationMethod.0.controller", ["x"]),
        _mutate("service", "https://pds"),
        _mutate("service", [None]),
        _mutate("service.0.id", KeyError),
        _mutate("service.0.type", None),
        _mutate("alsoKnownAs", ["at://x.example"] * 300),
        _mutate(
            "service", [{"id": f"#s{i}", "type": "T", "serviceEndpoint": "https://a"} for i in range(300)]
        ),
    ],
)
def test_malformed_documents(doc: Any) -> None:
    with pytest.raises(InvalidDidDocument):
        parse_did_document(doc)


def test_single_object_in_place_of_array_is_tolerated() -> None:
    doc = plc_directory_doc()
    doc["verificationMethod"] = doc["verificationMethod"][0]
    doc["service"] = doc["service"][0]
    d = parse_did_document(doc)
    assert d.signing_key == K256_DIDKEY and d.pds_endpoint is not None


def test_json_round_trip_and_extra_fields() -> None:
    doc = plc_directory_doc()
    doc["assertionMethod"] = ["#atproto"]
    doc["unknown"] = {"nested": [1, 2, 3]}
    assert parse_did_document(json.loads(json.dumps(doc))).signing_key == K256_DIDKEY


def test_document_is_hashable() -> None:
    d = parse_did_document(plc_directory_doc())
    assert hash(d) == hash(parse_did_document(plc_directory_doc()))


# --- DID syntax and URLs --------------------------------------------------------------


@pytest.mark.parametrize("did", _syntax_lines("did_syntax_valid.txt"))
def test_interop_valid_dids(did: str) -> None:
    assert validate_did(did) == did
    assert is_valid_did(did)


@pytest.mark.parametrize("did", _syntax_lines("did_syntax_invalid.txt"))
def test_interop_invalid_dids(did: str) -> None:
    with pytest.raises(InvalidDid):
        validate_did(did)
    assert not is_valid_did(did)


@pytest.mark.parametrize(
    "did",
    [
        "did:plc:ewvi7nxzyoun6zhxrhs64oi",
        "did:plc:ewvi7nxzyoun6zhxrhs64oizz",
        "did:plc:ewvi7nxzyoun6zhxrhs64oi1",
        "did:plc:ewvi7nxzyoun6zhxrhs64oi8",
        "did:web:example.com:user:alice",
        "did:web:example.com%3A",
        "did:web:example.com%3Aabc",
        "did:web:example.com%3A99999",
        "did:web:-example.com",
        "did:web:example.com%2Fpath",
        "did:web:example.com%0A",
        "did:web:localhost%3A2583%0A",
        "did:web:exa%20mple.com",
        None,
        b"did:plc:ewvi7nxzyoun6zhxrhs64oiz",
    ],
)
def test_method_specific_invalid(did: Any) -> None:
    assert not is_valid_did(did)


@pytest.mark.parametrize(
    ("did", "url"),
    [
        ("did:web:example.com", "https://example.com/.well-known/did.json"),
        ("did:web:sub.example.com", "https://sub.example.com/.well-known/did.json"),
        ("did:web:example.com%3A8443", "https://example.com:8443/.well-known/did.json"),
        ("did:web:localhost%3A2583", "http://localhost:2583/.well-known/did.json"),
        ("did:web:localhost", "http://localhost/.well-known/did.json"),
        ("did:web:localhost%3a2583", "http://localhost:2583/.well-known/did.json"),
    ],
)
def test_did_web_to_url(did: str, url: str) -> None:
    assert did_web_to_url(did) == url


@pytest.mark.parametrize(
    "did", ["did:plc:ewvi7nxzyoun6zhxrhs64oiz", "did:web:example.com:path", "did:web:", "did:web:a%3Ab%3Ac"]
)
def test_did_web_to_url_rejects(did: str) -> None:
    with pytest.raises(InvalidDid):
        did_web_to_url(did)


def test_plc_url() -> None:
    assert plc_url("https://plc.directory", DID) == f"https://plc.directory/{DID}"
    assert plc_url("http://localhost:2582/", DID) == f"http://localhost:2582/{DID}"
    with pytest.raises(InvalidDid):
        plc_url("https://plc.directory", "did:web:example.com")
    with pytest.raises(InvalidDid):
        plc_url("https://plc.directory", "did:plc:../../admin")


def test_error_classes() -> None:
    assert issubclass(InvalidDid, ValueError)
    assert issubclass(InvalidDidDocument, ValueError)
    assert issubclass(DidTombstoned, InvalidDidDocument)


# --- PLC ------------------------------------------------------------------------------

PLC_DATA = {
    "did": DID,
    "verificationMethods": {"atproto": K256_DIDKEY},
    "rotationKeys": [P256_DIDKEY, K256_DIDKEY],
    "alsoKnownAs": ["at://atproto.com"],
    "services": {
        "atproto_pds": {
            "type": "AtprotoPersonalDataServer",
            "endpoint": "https://enoki.us-east.host.bsky.network",
        }
    },
}


def test_plc_data_form() -> None:
    d = document_from_plc_data(DID, PLC_DATA)
    assert d == parse_did_document(plc_directory_doc())


def test_format_plc_document_matches_directory_output() -> None:
    assert format_plc_document(DID, PLC_DATA) == plc_directory_doc()


def test_plc_operation_form() -> None:
    op: dict[str, Any] = {k: v for k, v in PLC_DATA.items() if k != "did"}
    op.update(type="plc_operation", prev=None, sig="abc")
    d = document_from_plc_data(DID, op)
    assert d.signing_key == K256_DIDKEY and d.handle == "atproto.com"


def test_legacy_create_op() -> None:
    op = {
        "type": "create",
        "signingKey": K256_DIDKEY,
        "recoveryKey": P256_DIDKEY,
        "handle": "alice.bsky.social",
        "service": "bsky.social",
        "prev": None,
        "sig": "abc",
    }
    norm = normalize_plc_data(op)
    assert norm == {
        "rotationKeys": [P256_DIDKEY, K256_DIDKEY],
        "verificationMethods": {"atproto": K256_DIDKEY},
        "alsoKnownAs": ["at://alice.bsky.social"],
        "services": {"atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": "https://bsky.social"}},
    }
    d = document_from_plc_data(DID, op)
    assert (d.handle, d.signing_key, d.pds_endpoint) == (
        "alice.bsky.social",
        K256_DIDKEY,
        "https://bsky.social",
    )
    op.update(handle="https://bob.test", service="http://localhost:2583")
    d = document_from_plc_data(DID, op)
    assert (d.handle, d.pds_endpoint) == ("bob.test", "http://localhost:2583")


def test_p256_context_in_plc_document() -> None:
    data = dict(PLC_DATA, verificationMethods={"atproto": P256_DIDKEY, "atproto_label": K256_DIDKEY})
    doc = format_plc_document(DID, data)
    assert doc["@context"] == [
        "https://www.w3.org/ns/did/v1",
        "https://w3id.org/security/multikey/v1",
        "https://w3id.org/security/suites/ecdsa-2019/v1",
        "https://w3id.org/security/suites/secp256k1-2019/v1",
    ]
    d = parse_did_document(doc)
    assert (d.signing_key, d.labeler_key) == (P256_DIDKEY, K256_DIDKEY)


def test_tombstone() -> None:
    with pytest.raises(DidTombstoned):
        document_from_plc_data(DID, {"type": "plc_tombstone", "prev": "bafy", "sig": "x"})


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"type": "plc_unknown"},
        dict(PLC_DATA, did="did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"),
        dict(PLC_DATA, verificationMethods=["did:key:z"]),
        dict(PLC_DATA, verificationMethods={"atproto": 5}),
        dict(PLC_DATA, verificationMethods={"atproto": "zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc"}),
        dict(PLC_DATA, verificationMethods={"atproto": "did:key:zBAD"}),
        dict(PLC_DATA, rotationKeys="did:key:x"),
        dict(PLC_DATA, alsoKnownAs=[1]),
        dict(PLC_DATA, services=[]),
        dict(PLC_DATA, services={"atproto_pds": "https://pds"}),
        dict(PLC_DATA, services={"atproto_pds": {"type": "AtprotoPersonalDataServer"}}),
        {k: v for k, v in PLC_DATA.items() if k != "services"},
        {"type": "create", "signingKey": K256_DIDKEY, "handle": "a.test", "service": "x"},
    ],
)
def test_malformed_plc_data(data: Any) -> None:
    with pytest.raises(InvalidDidDocument):
        document_from_plc_data(DID, data)


def test_build_did_document() -> None:
    key = PrivateKey.from_bytes(b"\x09" * 32, "k256").did_key()
    doc = build_did_document(DID, "alice.test", key, "http://localhost:2583")
    assert doc["@context"][0] == "https://www.w3.org/ns/did/v1"
    assert doc["verificationMethod"] == [
        {"id": f"{DID}#atproto", "type": "Multikey", "controller": DID, "publicKeyMultibase": key[8:]}
    ]
    assert doc["service"] == [
        {
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": "http://localhost:2583",
        }
    ]
    d = parse_did_document(json.loads(json.dumps(doc)), expected_did=DID)
    assert (d.handle, d.signing_key, d.pds_endpoint) == ("alice.test", key, "http://localhost:2583")
    assert build_did_document(DID, None, key, "https://pds.test")["alsoKnownAs"] == []
    with pytest.raises(InvalidDidDocument):
        build_did_document(DID, "alice.test", key, "not a url")
    with pytest.raises(InvalidDidDocument):
        build_did_document(DID, "alice.test", "did:key:zNOPE", "https://pds.test")
    with pytest.raises(InvalidDid):
        build_did_document("did:plc:bad", "alice.test", key, "https://pds.test")
