"""psky.atproto.lexicon: interop lexicon vectors, schema-document checks, and realistic
records for every record type bundled with psky."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from psky.atproto import cbor
from psky.atproto.lexicon import (
    LexiconError,
    Lexicons,
    UnknownLexicon,
    ValidationError,
    check_lexicon_doc,
    grapheme_len,
)
from tests.paths import INTEROP

LEX_DIR = INTEROP / "lexicon"
BUNDLED = Path(__file__).resolve().parent.parent / "psky" / "lexicons"


def load_vectors(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((LEX_DIR / name).read_text())
    return data


def vector_params(name: str) -> list[Any]:
    return [pytest.param(v, id=f"{i}-{v['name']}") for i, v in enumerate(load_vectors(name))]


@pytest.fixture(scope="module")
def catalog() -> Lexicons:
    return Lexicons.load(LEX_DIR / "catalog")


@pytest.fixture(scope="module")
def lex() -> Lexicons:
    return Lexicons.load()


# --- interop: record data ------------------------------------------------------------------


@pytest.mark.parametrize("vector", vector_params("record-data-valid.json"))
def test_record_data_valid(catalog: Lexicons, vector: dict[str, Any]) -> None:
    data = vector["data"]
    catalog.validate_record(data["$type"], data, rkey=vector["rkey"])
    # the same record after a DAG-CBOR round trip (the form the indexer sees)
    catalog.validate_record(data["$type"], cbor.decode_lex(cbor.encode_lex(data)), rkey=vector["rkey"])


@pytest.mark.parametrize("vector", vector_params("record-data-invalid.json"))
def test_record_data_invalid(catalog: Lexicons, vector: dict[str, Any]) -> None:
    data = vector["data"]
    with pytest.raises(ValidationError) as info:
        catalog.validate_record("example.lexicon.record", data, rkey=vector["rkey"])
    assert str(info.value).startswith("Record")
    if vector["name"] != "missing required field" and "integer" not in data:
        # some vectors also lack the required field: they must fail for their own reason too
        with pytest.raises(ValidationError) as info:
            catalog.validate_record("example.lexicon.record", {**data, "integer": 1})
        assert "integer" not in str(info.value)


def test_record_data_vectors_are_all_covered() -> None:
    assert len(load_vectors("record-data-valid.json")) == 3
    assert len(load_vectors("record-data-invalid.json")) == 50


# --- interop: lexicon documents ------------------------------------------------------------


@pytest.mark.parametrize("vector", vector_params("lexicon-valid.json"))
def test_lexicon_doc_valid(vector: dict[str, Any]) -> None:
    doc = vector["lexicon"]
    check_lexicon_doc(doc)
    lex = Lexicons([doc])
    assert len(lex) == 1


@pytest.mark.parametrize("vector", vector_params("lexicon-invalid.json"))
def test_lexicon_doc_invalid(vector: dict[str, Any]) -> None:
    with pytest.raises(LexiconError):
        check_lexicon_doc(vector["lexicon"])
    with pytest.raises(LexiconError):
        Lexicons([vector["lexicon"]])


@pytest.mark.parametrize("path", sorted((LEX_DIR / "catalog").glob("*.json")), ids=lambda p: p.name)
def test_catalog_docs_are_valid(path: Path) -> None:
    check_lexicon_doc(json.loads(path.read_text()))


def test_catalog_loads(catalog: Lexicons) -> None:
    assert catalog.record_types() == ["example.lexicon.record"]
    assert catalog.has_record_type("example.lexicon.record")
    # the procedure example points at a schema outside the catalog
    assert catalog.unresolved_refs() == ["app.bsky.actor.defs#preferences"]


def test_minimal_record_lexicon_validates() -> None:
    doc = next(v["lexicon"] for v in load_vectors("lexicon-valid.json") if v["name"] == "minimal record")
    lex = Lexicons([doc])
    lex.validate_record("example.lexicon.record", {"$type": "example.lexicon.record", "anything": [1, "x"]})
    with pytest.raises(ValidationError, match="floats"):
        lex.validate_record("example.lexicon.record", {"$type": "example.lexicon.record", "x": {"y": 1.5}})


# --- schema document checks beyond the interop vectors -----------------------------------------


def _doc(defs: dict[str, Any], doc_id: str = "com.example.test") -> dict[str, Any]:
    return {"lexicon": 1, "id": doc_id, "defs": defs}


def _obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props}


BAD_SCHEMAS = {
    "no defs": {"lexicon": 1, "id": "com.example.test", "defs": {}},
    "lexicon true": {"lexicon": True, "id": "com.example.test", "defs": {"a": {"type": "token"}}},
    "lexicon 2": {"lexicon": 2, "id": "com.example.test", "defs": {"a": {"type": "token"}}},
    "not an object": ["lexicon", 1],
    "bad def name": _doc({"a#b": {"type": "token"}}),
    "unknown type": _doc({"main": {"type": "float"}}),
    "untyped def": _doc({"main": {"properties": {}}}),
    "union def": _doc({"main": {"type": "union", "refs": []}}),
    "params def": _doc({"main": {"type": "params", "properties": {}}}),
    "closed empty union": _doc({"main": _obj(u={"type": "union", "refs": [], "closed": True})}),
    "string default+const": _doc({"main": _obj(s={"type": "string", "default": "a", "const": "b"})}),
    "unknown string format": _doc({"main": _obj(s={"type": "string", "format": "email"})}),
    "negative maxLength": _doc({"main": _obj(s={"type": "string", "maxLength": -1})}),
    "max below min": _doc({"main": _obj(s={"type": "integer", "minimum": 5, "maximum": 1})}),
    "float maximum": _doc({"main": _obj(s={"type": "integer", "maximum": 1.5})}),
    "required not a property": _doc({"main": {"type": "object", "required": ["x"], "properties": {}}}),
    "object without properties": _doc({"main": {"type": "object"}}),
    "array without items": _doc({"main": _obj(a={"type": "array"})}),
    "token as property": _doc({"main": _obj(t={"type": "token"})}),
    "record as property": _doc({"main": _obj(t={"type": "record", "key": "tid", "record": _obj()})}),
    "bad record key type": _doc({"main": {"type": "record", "key": "uuid", "record": _obj()}}),
    "bad literal record key": _doc({"main": {"type": "record", "key": "literal:a/b", "record": _obj()}}),
    "record of string": _doc({"main": {"type": "record", "key": "tid", "record": {"type": "string"}}}),
    "params with object": _doc({"main": {"type": "query", "parameters": {"type": "params", "properties": {"o": _obj()}}}}),
    "body without encoding": _doc({"main": {"type": "query", "output": {"schema": _obj()}}}),
    "body with string schema": _doc({"main": {"type": "procedure", "input": {"encoding": "application/json", "schema": {"type": "string"}}}}),
    "subscription with object": _doc({"main": {"type": "subscription", "message": {"schema": _obj()}}}),
    "bad ref": _doc({"main": _obj(r={"type": "ref", "ref": "not an nsid#x"})}),
    "empty ref fragment": _doc({"main": _obj(r={"type": "ref", "ref": "com.example.other#"})}),
    "blob bad maxSize": _doc({"main": _obj(b={"type": "blob", "maxSize": 0})}),
    "repo permission wildcard": _doc({"main": {"type": "permission-set", "permissions": [
        {"type": "permission", "resource": "repo", "collection": ["*"]}]}}),
    "rpc permission without aud": _doc({"main": {"type": "permission-set", "permissions": [
        {"type": "permission", "resource": "rpc", "lxm": ["com.example.x"]}]}}),
    "bad title:lang": _doc({"main": {"type": "permission-set", "title:lang": {"not a tag!": "x"}, "permissions": []}}),
}


@pytest.mark.parametrize("doc", list(BAD_SCHEMAS.values()), ids=list(BAD_SCHEMAS))
def test_invalid_schema_documents(doc: Any) -> None:
    with pytest.raises(LexiconError):
        check_lexicon_doc(doc)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(LexiconError, match="not found"):
        Lexicons.load(tmp_path / "missing")
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(LexiconError, match="not valid JSON"):
        Lexicons.load(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps(_doc({"main": {"type": "token"}})))
    (tmp_path / "b.json").write_text(json.dumps(_doc({"main": {"type": "token"}})))
    with pytest.raises(LexiconError, match="duplicate"):
        Lexicons.load(tmp_path)


# --- bundled lexicons ------------------------------------------------------------------------

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
OTHER_DID = "did:plc:bv6ggog3tya2z3vxsub7hnal"
NOW = "2024-11-18T21:47:03.219Z"
POST_URI = f"at://{OTHER_DID}/app.bsky.feed.post/3lb6ydhyd4k2b"
POST_CID = cbor.cid_for_cbor(b"post").encode()
STRONG_REF = {"uri": POST_URI, "cid": POST_CID}
LIST_URI = f"at://{DID}/app.bsky.graph.list/3kvvfbxzpnp2n"


def blob(mime: str = "image/jpeg", size: int = 245_760, data: bytes = b"img") -> dict[str, Any]:
    return {"$type": "blob", "ref": {"$link": cbor.cid_for_raw(data).encode()}, "mimeType": mime, "size": size}


SELF_LABELS = {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": "graphic-media"}]}
FACETS = [
    {"index": {"byteStart": 0, "byteEnd": 17},
     "features": [{"$type": "app.bsky.richtext.facet#mention", "did": OTHER_DID}]},
    {"index": {"byteStart": 38, "byteEnd": 62},
     "features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://atproto.com/specs"}]},
    {"index": {"byteStart": 63, "byteEnd": 71},
     "features": [{"$type": "app.bsky.richtext.facet#tag", "tag": "atproto"}]},
]

EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "app.bsky.actor.contentVisibilityDeclaration": [
        {"hideFromAlgorithmicRecommendations": True},
    ],
    "app.bsky.actor.profile": [
        {"displayName": "Alice 🦋", "description": "Protocol nerd. Bienvenue! 日本語もOK",
         "pronouns": "she/her", "website": "https://alice.example.com",
         "avatar": blob(), "banner": blob("image/png", 612_000, b"banner"),
         "labels": {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": "!no-unauthenticated"}]},
         "joinedViaStarterPack": {"uri": f"at://{OTHER_DID}/app.bsky.graph.starterpack/3kvvfbxzpnp2n",
                                  "cid": POST_CID},
         "pinnedPost": STRONG_REF, "createdAt": NOW},
        {},  # every profile field is optional
        {"displayName": "legacy", "avatar": {"cid": cbor.cid_for_raw(b"old").encode(), "mimeType": "image/jpeg"}},
    ],
    "app.bsky.actor.status": [
        {"status": "app.bsky.actor.status#live", "durationMinutes": 90, "createdAt": NOW,
         "embed": {"$type": "app.bsky.embed.external",
                   "external": {"uri": "https://stream.example.com/alice", "title": "Live now",
                                "description": "Coding the firehose", "thumb": blob()}}},
    ],
    "app.bsky.feed.generator": [
        {"did": "did:web:feeds.example.com", "displayName": "What's Hot", "createdAt": NOW,
         "description": "Top posts from the last day #atproto", "descriptionFacets": FACETS[2:],
         "avatar": blob("image/png"), "acceptsInteractions": True,
         "contentMode": "app.bsky.feed.defs#contentModeUnspecified", "labels": SELF_LABELS},
    ],
    "app.bsky.feed.like": [
        {"subject": STRONG_REF, "createdAt": NOW},
        {"subject": STRONG_REF, "createdAt": "2024-11-18T21:47:03Z",
         "via": {"uri": f"at://{DID}/app.bsky.feed.repost/3lb6yxkx6gk2a", "cid": POST_CID}},
    ],
    "app.bsky.feed.post": [
        {"text": "just setting up my bsky", "createdAt": NOW},
        {"text": "@bob.bsky.social have you read the https://atproto.com/specs #atproto 🎉 ",
         "facets": FACETS, "langs": ["en", "fr-CA"], "tags": ["protocol", "日本"], "createdAt": NOW,
         "reply": {"root": STRONG_REF, "parent": STRONG_REF}, "labels": SELF_LABELS,
         "embed": {"$type": "app.bsky.embed.images", "images": [
             {"image": blob(), "alt": "a cat", "aspectRatio": {"width": 1000, "height": 750}},
             {"image": blob("image/webp", 88_000, b"2"), "alt": ""}]}},
        {"text": "", "createdAt": NOW, "embed": {
            "$type": "app.bsky.embed.recordWithMedia",
            "record": {"record": STRONG_REF},
            "media": {"$type": "app.bsky.embed.video", "video": blob("video/mp4", 12_000_000, b"v"),
                      "alt": "demo", "presentation": "gif", "aspectRatio": {"width": 16, "height": 9},
                      "captions": [{"lang": "en", "file": blob("text/vtt", 900, b"c")}]}}},
        {"text": "look", "createdAt": NOW, "embed": {"$type": "app.bsky.embed.record", "record": STRONG_REF}},
        {"text": "gallery", "createdAt": NOW, "embed": {"$type": "app.bsky.embed.gallery", "items": [
            {"$type": "app.bsky.embed.gallery#image", "image": blob(), "alt": "one",
             "aspectRatio": {"width": 3, "height": 2}}]}},
        {"text": "link card", "createdAt": NOW, "embed": {
            "$type": "app.bsky.embed.external",
            "external": {"uri": "https://example.com/article", "title": "An article", "description": ""}}},
        # open unions accept variants they do not list (checked for data-model validity only)
        {"text": "future embed", "createdAt": NOW,
         "embed": {"$type": "app.bsky.embed.hologram", "frames": [{"$link": POST_CID}]}},
        # legacy entities, and a "#main" spelled out in a union $type
        {"text": "hi @bob", "createdAt": NOW,
         "entities": [{"index": {"start": 3, "end": 7}, "type": "mention", "value": OTHER_DID}],
         "embed": {"$type": "app.bsky.embed.record#main", "record": STRONG_REF}},
        # text exactly at the limits: 200 clusters of 15 UTF-8 bytes (4 code points) is 3000
        # bytes; 300 clusters of 2 code points is 600 code points but 300 graphemes
        {"text": "👩🏽‍💻" * 200, "createdAt": NOW},
        {"text": "e\u0301" * 300, "createdAt": NOW},
    ],
    "app.bsky.feed.postgate": [
        {"post": POST_URI, "createdAt": NOW, "detachedEmbeddingUris": [f"at://{DID}/app.bsky.feed.post/3lb6z"],
         "embeddingRules": [{"$type": "app.bsky.feed.postgate#disableRule"}]},
    ],
    "app.bsky.feed.repost": [
        {"subject": STRONG_REF, "createdAt": NOW},
    ],
    "app.bsky.feed.threadgate": [
        {"post": POST_URI, "createdAt": NOW, "hiddenReplies": [f"at://{DID}/app.bsky.feed.post/3lb6zz"],
         "allow": [{"$type": "app.bsky.feed.threadgate#mentionRule"},
                   {"$type": "app.bsky.feed.threadgate#followerRule"},
                   {"$type": "app.bsky.feed.threadgate#followingRule"},
                   {"$type": "app.bsky.feed.threadgate#listRule", "list": LIST_URI}]},
        {"post": POST_URI, "createdAt": NOW, "allow": []},
    ],
    "app.bsky.graph.block": [
        {"subject": OTHER_DID, "createdAt": NOW},
    ],
    "app.bsky.graph.follow": [
        {"subject": OTHER_DID, "createdAt": NOW},
        {"subject": "did:web:example.com", "createdAt": "2023-03-01T10:00:00.000+09:00",
         "via": {"uri": f"at://{DID}/app.bsky.graph.starterpack/3kvvfbxzpnp2n", "cid": POST_CID}},
    ],
    "app.bsky.graph.list": [
        {"purpose": "app.bsky.graph.defs#curatelist", "name": "Protocol people", "createdAt": NOW,
         "description": "Folks building on #atproto", "descriptionFacets": FACETS[2:],
         "avatar": blob(), "labels": SELF_LABELS},
        {"purpose": "app.bsky.graph.defs#modlist", "name": "Spam", "createdAt": NOW},
    ],
    "app.bsky.graph.listblock": [
        {"subject": LIST_URI, "createdAt": NOW},
    ],
    "app.bsky.graph.listitem": [
        {"subject": OTHER_DID, "list": LIST_URI, "createdAt": NOW},
    ],
    "app.bsky.graph.starterpack": [
        {"name": "Atproto devs", "list": LIST_URI, "createdAt": NOW, "description": "Start here",
         "descriptionFacets": [], "feeds": [{"uri": f"at://{OTHER_DID}/app.bsky.feed.generator/whats-hot"}]},
    ],
    "app.bsky.graph.verification": [
        {"subject": OTHER_DID, "handle": "bob.bsky.social", "displayName": "Bob", "createdAt": NOW},
    ],
    "app.bsky.labeler.service": [
        {"createdAt": NOW, "labels": SELF_LABELS,
         "policies": {"labelValues": ["porn", "spam-farm"], "labelValueDefinitions": [
             {"identifier": "spam-farm", "severity": "alert", "blurs": "content", "defaultSetting": "hide",
              "adultOnly": False, "locales": [
                  {"lang": "en", "name": "Spam farm", "description": "Mass-produced engagement bait"},
                  {"lang": "pt-BR", "name": "Fazenda de spam", "description": "Conteúdo em massa"}]}]},
         "reasonTypes": ["com.atproto.moderation.defs#reasonSpam"], "subjectTypes": ["account", "record"],
         "subjectCollections": ["app.bsky.feed.post", "app.bsky.actor.profile"]},
    ],
    "app.bsky.notification.declaration": [
        {"allowSubscriptions": "followers"},
    ],
    "chat.bsky.actor.declaration": [
        {"allowIncoming": "following", "allowGroupInvites": "none"},
    ],
    "com.atproto.lexicon.schema": [
        {"lexicon": 1, "id": "com.example.thing", "defs": {"main": {"type": "token"}}},
    ],
}

RKEYS = {"tid": "3lb6ydhyd4k2b", "any": "whats-hot", "nsid": "com.example.thing", "literal:self": "self"}


def _record_lexicons() -> list[str]:
    out = []
    for path in sorted(BUNDLED.rglob("*.json")):
        doc = json.loads(path.read_text())
        if doc["defs"].get("main", {}).get("type") == "record":
            out.append(doc["id"])
    return out


def test_bundled_lexicons_load(lex: Lexicons) -> None:
    assert len(lex) == len(list(BUNDLED.rglob("*.json")))
    assert lex.unresolved_refs() == []
    assert lex.record_types() == sorted(_record_lexicons())
    assert lex.has_record_type("app.bsky.feed.post") and not lex.has_record_type("app.bsky.feed.defs")


@pytest.mark.parametrize("nsid", _record_lexicons())
def test_every_record_type_has_valid_examples(lex: Lexicons, nsid: str) -> None:
    assert nsid in EXAMPLES, f"add an example record for {nsid}"
    key_type = lex.get_def(nsid)["key"]  # type: ignore[index]
    rkey = RKEYS[key_type]
    for example in EXAMPLES[nsid]:
        record = {"$type": nsid, **example}
        lex.validate_record(nsid, record, rkey=rkey)
        lex.validate_record(nsid, cbor.decode_lex(cbor.encode_lex(record)), rkey=rkey)


def _post(**fields: Any) -> dict[str, Any]:
    return {"$type": "app.bsky.feed.post", "text": "hello", "createdAt": NOW, **fields}


INVALID_RECORDS: dict[str, tuple[str, dict[str, Any], str]] = {
    # name: (collection, record, expected error text)
    "post text over maxGraphemes": (
        "app.bsky.feed.post", _post(text="a" * 301), "Record/text: must not be longer than 300 graphemes"),
    "post text over maxGraphemes (combining marks)": (
        "app.bsky.feed.post", _post(text="e\u0301" * 301), "Record/text: must not be longer than 300 graphemes"),
    "post text over maxLength": (
        "app.bsky.feed.post", _post(text="👩🏽‍💻" * 201), "Record/text: must not be longer than 3000 bytes"),
    "post bad createdAt": (
        "app.bsky.feed.post", _post(createdAt="2024-11-18 21:47:03"), "Record/createdAt: must be a valid datetime"),
    "post createdAt month 13": (
        "app.bsky.feed.post", _post(createdAt="2024-13-18T21:47:03Z"), "Record/createdAt: must be a valid datetime"),
    "post missing createdAt": (
        "app.bsky.feed.post", {"$type": "app.bsky.feed.post", "text": "x"}, 'Record: must have the property "createdAt"'),
    "post float value": (
        "app.bsky.feed.post",
        _post(facets=[{"index": {"byteStart": 0.0, "byteEnd": 4}, "features": []}]),
        "Record/facets/0/index/byteStart: must be an integer"),
    "post float in undeclared field": (
        "app.bsky.feed.post", _post(extra={"score": 0.5}), "Record/extra/score: floats are not allowed"),
    "post reply root missing cid": (
        "app.bsky.feed.post", _post(reply={"root": {"uri": POST_URI}, "parent": STRONG_REF}),
        'Record/reply/root: must have the property "cid"'),
    "post reply root bad cid": (
        "app.bsky.feed.post", _post(reply={"root": {"uri": POST_URI, "cid": "not a cid"}, "parent": STRONG_REF}),
        "Record/reply/root/cid: must be a valid cid"),
    "post bad language": (
        "app.bsky.feed.post", _post(langs=["en", "english language"]), "Record/langs/1: must be a valid language"),
    "post too many langs": ("app.bsky.feed.post", _post(langs=["en", "fr", "de", "ja"]), "Record/langs"),
    "post too many images": (
        "app.bsky.feed.post",
        _post(embed={"$type": "app.bsky.embed.images", "images": [{"image": blob(), "alt": ""}] * 5}),
        "Record/embed/images: must not have more than 4 elements"),
    "post image not an image": (
        "app.bsky.feed.post",
        _post(embed={"$type": "app.bsky.embed.images", "images": [{"image": blob("video/mp4"), "alt": ""}]}),
        "Record/embed/images/0/image: blob mimeType"),
    "post image too large": (
        "app.bsky.feed.post",
        _post(embed={"$type": "app.bsky.embed.images", "images": [{"image": blob(size=2_000_001), "alt": ""}]}),
        "Record/embed/images/0/image: blob is larger than 2000000 bytes"),
    "post blob with extra field": (
        "app.bsky.feed.post",
        _post(embed={"$type": "app.bsky.embed.images", "images": [{"image": {**blob(), "x": 1}, "alt": ""}]}),
        "Record/embed/images/0/image: blob must have exactly"),
    "post blob bad link": (
        "app.bsky.feed.post",
        _post(embed={"$type": "app.bsky.embed.images",
                     "images": [{"image": {**blob(), "ref": {"$link": "bafyfoo"}}, "alt": ""}]}),
        "Record/embed/images/0/image: invalid CID in $link"),
    "post negative facet index": (
        "app.bsky.feed.post",
        _post(facets=[{"index": {"byteStart": -1, "byteEnd": 4}, "features": []}]),
        "Record/facets/0/index/byteStart: can not be less than 0"),
    "post facet feature without $type": (
        "app.bsky.feed.post",
        _post(facets=[{"index": {"byteStart": 0, "byteEnd": 4}, "features": [{"did": OTHER_DID}]}]),
        'Record/facets/0/features/0: must be an object which includes the "$type" property'),
    "post mention with handle": (
        "app.bsky.feed.post",
        _post(facets=[{"index": {"byteStart": 0, "byteEnd": 4},
                       "features": [{"$type": "app.bsky.richtext.facet#mention", "did": "bob.test"}]}]),
        "Record/facets/0/features/0/did: must be a valid did"),
    "post unknown union variant malformed": (
        "app.bsky.feed.post", _post(embed={"$type": "app.bsky.embed.hologram", "x": {"$bytes": 5}}),
        "Record/embed/x: $bytes must be a string"),
    "post empty $type in union": ("app.bsky.feed.post", _post(embed={"$type": ""}), "Record/embed"),
    "post bool as integer": (
        "app.bsky.feed.post", _post(facets=[{"index": {"byteStart": True, "byteEnd": 4}, "features": []}]),
        "Record/facets/0/index/byteStart: must be an integer"),
    "post null text": ("app.bsky.feed.post", _post(text=None), "Record/text: must be a string"),
    "like subject missing cid": (
        "app.bsky.feed.like", {"$type": "app.bsky.feed.like", "subject": {"uri": POST_URI}, "createdAt": NOW},
        'Record/subject: must have the property "cid"'),
    "like subject cid as link": (
        "app.bsky.feed.like",
        {"$type": "app.bsky.feed.like", "subject": {"uri": POST_URI, "cid": {"$link": POST_CID}}, "createdAt": NOW},
        "Record/subject/cid: must be a string"),
    "like subject uri not at-uri": (
        "app.bsky.feed.like",
        {"$type": "app.bsky.feed.like", "subject": {"uri": "https://bsky.app/x", "cid": POST_CID}, "createdAt": NOW},
        "Record/subject/uri: must be a valid at-uri"),
    "like wrong $type": (
        "app.bsky.feed.like", {"$type": "app.bsky.feed.post", "subject": STRONG_REF, "createdAt": NOW},
        "Record/$type: must be 'app.bsky.feed.like'"),
    "like missing $type": (
        "app.bsky.feed.like", {"subject": STRONG_REF, "createdAt": NOW}, "Record/$type"),
    "like $type with #main": (
        "app.bsky.feed.like", {"$type": "app.bsky.feed.like#main", "subject": STRONG_REF, "createdAt": NOW},
        "Record/$type"),
    "follow bad did": (
        "app.bsky.graph.follow", {"$type": "app.bsky.graph.follow", "subject": "did:PLC:abc", "createdAt": NOW},
        "Record/subject: must be a valid did"),
    "follow handle as subject": (
        "app.bsky.graph.follow", {"$type": "app.bsky.graph.follow", "subject": "bob.bsky.social", "createdAt": NOW},
        "Record/subject: must be a valid did"),
    "follow float createdAt": (
        "app.bsky.graph.follow", {"$type": "app.bsky.graph.follow", "subject": OTHER_DID, "createdAt": 1.7e9},
        "Record/createdAt: must be a string"),
    "profile displayName too long": (
        "app.bsky.actor.profile", {"$type": "app.bsky.actor.profile", "displayName": "x" * 65},
        "Record/displayName: must not be longer than 64 graphemes"),
    "profile avatar gif": (
        "app.bsky.actor.profile", {"$type": "app.bsky.actor.profile", "avatar": blob("image/gif")},
        "Record/avatar: blob mimeType"),
    "profile avatar not a blob": (
        "app.bsky.actor.profile", {"$type": "app.bsky.actor.profile", "avatar": {"$link": POST_CID}},
        "Record/avatar: must be a blob"),
    "list empty name": (
        "app.bsky.graph.list",
        {"$type": "app.bsky.graph.list", "purpose": "app.bsky.graph.defs#modlist", "name": "", "createdAt": NOW},
        "Record/name: must not be shorter than 1 bytes"),
    "threadgate closed-over rule": (
        "app.bsky.feed.threadgate",
        {"$type": "app.bsky.feed.threadgate", "post": POST_URI, "createdAt": NOW,
         "allow": [{"$type": "app.bsky.feed.threadgate#listRule"}]},
        'Record/allow/0: must have the property "list"'),
    "chat declaration not a string": (
        "chat.bsky.actor.declaration", {"$type": "chat.bsky.actor.declaration", "allowIncoming": ["all"]},
        "Record/allowIncoming: must be a string"),
    "lexicon schema version not int": (
        "com.atproto.lexicon.schema", {"$type": "com.atproto.lexicon.schema", "lexicon": "1"},
        "Record/lexicon: must be an integer"),
}


@pytest.mark.parametrize(("collection", "record", "expected"), list(INVALID_RECORDS.values()), ids=list(INVALID_RECORDS))
def test_invalid_records(lex: Lexicons, collection: str, record: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError) as info:
        lex.validate_record(collection, record)
    assert expected in str(info.value)
    assert not isinstance(info.value, UnknownLexicon)


def test_unknown_collection(lex: Lexicons) -> None:
    with pytest.raises(UnknownLexicon):
        lex.validate_record("com.example.nothing", {"$type": "com.example.nothing"})
    with pytest.raises(UnknownLexicon):  # a known lexicon that is not a record type
        lex.validate_record("app.bsky.feed.defs", {"$type": "app.bsky.feed.defs"})
    assert issubclass(UnknownLexicon, ValidationError) and issubclass(ValidationError, ValueError)


@pytest.mark.parametrize("value", [None, [], "post", 5, ({"$type": "app.bsky.feed.post"},)])
def test_record_must_be_object(lex: Lexicons, value: Any) -> None:
    with pytest.raises(ValidationError, match="Record must be an object"):
        lex.validate_record("app.bsky.feed.post", value)


def test_record_keys(lex: Lexicons) -> None:
    like = {"$type": "app.bsky.feed.like", "subject": STRONG_REF, "createdAt": NOW}
    lex.validate_record("app.bsky.feed.like", like, rkey="3lb6ydhyd4k2b")
    with pytest.raises(ValidationError, match="key type 'tid'"):
        lex.validate_record("app.bsky.feed.like", like, rkey="self")
    profile = {"$type": "app.bsky.actor.profile"}
    lex.validate_record("app.bsky.actor.profile", profile, rkey="self")
    with pytest.raises(ValidationError, match="literal:self"):
        lex.validate_record("app.bsky.actor.profile", profile, rkey="3lb6ydhyd4k2b")
    gen = {"$type": "app.bsky.feed.generator", "did": "did:web:f.example.com", "displayName": "F", "createdAt": NOW}
    lex.validate_record("app.bsky.feed.generator", gen, rkey="any:thing~ok")
    with pytest.raises(ValidationError):
        lex.validate_record("app.bsky.feed.generator", gen, rkey="..")


def test_error_paths(lex: Lexicons) -> None:
    with pytest.raises(ValidationError) as info:
        lex.validate_record("app.bsky.feed.post", _post(reply={"root": {"uri": POST_URI, "cid": 5}, "parent": STRONG_REF}))
    err = info.value
    assert str(err) == "Record/reply/root/cid: must be a string"
    assert err.path == ["Record", "reply", "root", "cid"]
    assert err.message == "must be a string"


def test_deep_nesting_is_bounded(lex: Lexicons) -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(500):
        node["n"] = {}
        node = node["n"]
    with pytest.raises(ValidationError, match="nested deeper"):
        lex.validate_record("app.bsky.feed.post", _post(extra=deep))
    lst: list[Any] = []
    cur = lst
    for _ in range(500):
        cur.append([])
        cur = cur[0]
    with pytest.raises(ValidationError, match="nested deeper"):
        lex.validate_record("app.bsky.feed.post", _post(extra=lst))
    with pytest.raises(ValidationError, match="nested deeper"):
        lex.validate_record("app.bsky.feed.post", _post(embed={"$type": "com.example.x", "d": deep}))


def test_data_model_in_undeclared_fields(lex: Lexicons) -> None:
    ok = _post(extra={"link": {"$link": POST_CID}, "b": {"$bytes": "aGVsbG8"}, "blob": blob(), "n": [1, None, True]})
    lex.validate_record("app.bsky.feed.post", ok)
    for bad, text in [
        ({"$link": POST_CID, "x": 1}, "CID link must be exactly"),
        ({"$link": "bafyfoo"}, "invalid CID"),
        ({"$bytes": "!!"}, "base64"),
        ({"$type": "blob", "ref": {"$link": POST_CID}}, "blob must have exactly"),
        ({"$type": 7}, "$type must be a non-empty string"),
        ({"k": 2**64}, "64-bit"),
        ({"k": b"raw"}, "unsupported value type bytes"),
        ({1: "x"}, "keys must be strings"),
    ]:
        with pytest.raises(ValidationError, match=text.replace("$", r"\$")):
            lex.validate_record("app.bsky.feed.post", _post(extra=bad))


def test_validate_any_definition(lex: Lexicons) -> None:
    lex.validate("com.atproto.repo.strongRef", STRONG_REF)
    lex.validate("app.bsky.richtext.facet#byteSlice", {"byteStart": 0, "byteEnd": 1})
    with pytest.raises(ValidationError, match=r"com\.atproto\.repo\.strongRef/cid"):
        lex.validate("com.atproto.repo.strongRef", {"uri": POST_URI, "cid": None})
    with pytest.raises(ValidationError, match="token"):
        lex.validate("app.bsky.graph.defs#modlist", "x")
    with pytest.raises(UnknownLexicon):
        lex.validate("com.example.missing#thing", {})
    assert lex.get_def("app.bsky.feed.like") is not None and lex.get_def("com.example.missing") is None


def test_lenient_mode() -> None:
    lenient = Lexicons.load(lenient=True)
    strict = Lexicons.load()
    for record in (
        _post(createdAt="2023-04-01T10:00:00.123"),
        _post(createdAt="2023-04-01T10:00:00.123-00:00"),
        _post(langs=["EN", "english"]),
    ):
        lenient.validate_record("app.bsky.feed.post", record)
        with pytest.raises(ValidationError):
            strict.validate_record("app.bsky.feed.post", record)
    with pytest.raises(ValidationError):
        lenient.validate_record("app.bsky.feed.post", _post(createdAt="last tuesday"))


def test_union_and_ref_semantics() -> None:
    doc = _doc({
        "main": {"type": "record", "key": "any", "record": _obj(
            closed={"type": "union", "refs": ["#a", "com.example.other"], "closed": True},
            open={"type": "union", "refs": ["#a"]},
            rec={"type": "ref", "ref": "com.example.other"},
            self={"type": "ref", "ref": "#node"},
        )},
        "a": {"type": "object", "required": ["x"], "properties": {"x": {"type": "integer", "default": 3}}},
        "node": _obj(child={"type": "ref", "ref": "#node"}, v={"type": "boolean", "const": True}),
    })
    other = _doc({"main": {"type": "record", "key": "tid", "record": _obj(y={"type": "string"})}}, "com.example.other")
    lex = Lexicons([doc, other])
    t = "com.example.test"
    base = {"$type": t}
    lex.validate_record(t, {**base, "closed": {"$type": "com.example.test#a"}})  # required x has a default
    lex.validate_record(t, {**base, "closed": {"$type": "com.example.other", "y": "z"}})
    lex.validate_record(t, {**base, "closed": {"$type": "com.example.other#main", "y": "z"}})
    lex.validate_record(t, {**base, "open": {"$type": "com.example.whatever", "q": [1]}})
    lex.validate_record(t, {**base, "rec": {"$type": "com.example.other"}})
    lex.validate_record(t, {**base, "self": {"child": {"child": {"v": True}}}})  # recursive schema
    for bad in (
        {"closed": {"$type": "com.example.whatever"}},
        {"closed": {"$type": "com.example.other", "y": 1}},
        {"rec": {"y": "z"}},  # a ref to a record needs the record's $type
        {"self": {"child": {"child": {"v": False}}}},
        {"open": {"$type": "com.example.test#a", "x": "no"}},
    ):
        with pytest.raises(ValidationError):
            lex.validate_record(t, {**base, **bad})


def test_references_to_schemas_not_loaded() -> None:
    doc = _doc({"main": {"type": "record", "key": "tid", "record": _obj(
        open={"type": "union", "refs": ["com.example.absent"]},
        closed={"type": "union", "refs": ["com.example.absent"], "closed": True},
        ref={"type": "ref", "ref": "com.example.absent#thing"},
    )}})
    lex = Lexicons([doc])
    assert lex.unresolved_refs() == ["com.example.absent#main", "com.example.absent#thing"]
    t = "com.example.test"
    # an open union listing an unloaded schema treats it like any unlisted variant
    lex.validate_record(t, {"$type": t, "open": {"$type": "com.example.absent", "x": 1}})
    with pytest.raises(ValidationError, match="floats"):
        lex.validate_record(t, {"$type": t, "open": {"$type": "com.example.absent", "x": 1.5}})
    with pytest.raises(ValidationError, match="not a blob"):
        lex.validate_record(t, {"$type": t, "open": blob()})
    with pytest.raises(UnknownLexicon, match="Record/closed: unresolved"):
        lex.validate_record(t, {"$type": t, "closed": {"$type": "com.example.absent"}})
    with pytest.raises(UnknownLexicon, match="Record/ref: unresolved"):
        lex.validate_record(t, {"$type": t, "ref": {}})
    lex.validate_record(t, {"$type": t})


def test_validators_do_not_mutate_input(lex: Lexicons) -> None:
    for nsid, examples in EXAMPLES.items():
        for example in examples:
            record = {"$type": nsid, **example}
            before = copy.deepcopy(record)
            lex.validate_record(nsid, record)
            assert record == before


# --- graphemes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("", 0),
        ("hello", 5),
        ("a\r\nb", 3),  # CR LF is one cluster
        ("a\n\rb", 4),
        ("é", 1),  # precomposed
        ("e\u0301", 1),  # combining acute
        ("e\u0301\u0302\u0303x", 2),
        ("🇩🇪🇫🇷", 2),  # regional indicator pairs
        ("🇩🇪🇫", 2),  # a dangling indicator is its own cluster
        ("🏳️‍🌈", 1),  # flag + VS16 + ZWJ + rainbow
        ("👩‍👩‍👦‍👦", 1),  # ZWJ family
        ("👍🏽", 1),  # skin tone modifier
        ("👩🏽‍💻x", 2),
        ("❤️", 1),  # VS16
        ("1️⃣", 1),  # keycap
        ("한국어", 3),  # precomposed Hangul syllables
        ("\u1100\u1161\u11a8", 1),  # conjoining jamo L V T
        ("日本語テキスト", 7),
        ("ﾊﾟ", 1),  # halfwidth katakana + semi-voiced mark
        ("क्षि", 2),  # Devanagari without the Unicode 15.1 conjunct rule
        ("a\u200db", 2),  # ZWJ between letters only joins the ZWJ
        ("\u0600a", 1),  # prepended concatenation mark
        ("a\u0903", 1),  # spacing mark
        ("🏴󠁧󠁢󠁳󠁣󠁴󠁿", 1),  # tag sequence (Scotland)
        ("a\x00b", 3),
    ],
)
def test_grapheme_len(text: str, count: int) -> None:
    assert grapheme_len(text) == count


def test_grapheme_fixture_strings() -> None:
    assert grapheme_len("🇩🇪🏳️‍🌈" * 6) == 12
    assert grapheme_len("👩‍👩‍👦‍👦👩‍👩‍👦‍👦") == 2
