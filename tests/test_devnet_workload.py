"""The devnet workload without servers: record generators against the bundled lexicons,
planner determinism and realism (Zipf popularity, deep threads, every record and embed kind),
and the ground-truth manifest (updates, deletes, account deletion, JSON, diff, normalization)."""

from __future__ import annotations

import random
import struct
import zlib
from collections import Counter
from functools import cache
from typing import Any

import pytest

from psky.atproto import cbor
from psky.atproto.lexicon import Lexicons, grapheme_len
from psky.atproto.syntax import is_valid_handle, is_valid_tid, parse_at_uri
from psky.devnet.manifest import Manifest, ManifestError
from psky.devnet.workload import (
    AccountCreate,
    BlobPool,
    Event,
    HandleChange,
    LabelIssue,
    Planner,
    StatusChange,
    WriteBatch,
    blob_ref,
    derived_key,
    fake_did,
    iso_from_us,
    png_bytes,
    record_cid,
    rich_text,
    simulate,
)

DID_A = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
DID_B = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
CID_1 = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
CID_2 = "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a"


@cache
def lexicons() -> Lexicons:
    return Lexicons.load()


@cache
def sample(seed: int) -> tuple[Manifest, tuple[Event, ...]]:
    """A mid-sized offline run (about 6,000 writes) shared by several tests."""
    events: list[Event] = []
    m = simulate(seed, accounts=120, records_per_account=40, live_events=1500,
                 hostnames=("pds1.test", "pds2.test"), events=events)
    return m, tuple(events)


def writes(events: tuple[Event, ...]) -> list[tuple[str, str, str, dict[str, Any] | None, str | None]]:
    out = []
    for ev in events:
        if isinstance(ev, WriteBatch):
            for (action, collection, rkey, value), cid in zip(ev.writes, ev.cids, strict=True):
                out.append((action, collection, rkey, value, cid))
    return out


# --- generators -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_generated_record_is_valid(seed: int) -> None:
    _, events = sample(seed)
    lex = lexicons()
    n = 0
    for action, collection, rkey, value, _ in writes(events):
        if value is None:
            assert action == "delete"
            continue
        lex.validate_record(collection, value, rkey)
        n += 1
    assert n > 4000


def test_record_cids_match_the_repo_encoding() -> None:
    _, events = sample(0)
    for _, _, _, value, cid in writes(events)[:3000]:
        if value is not None:
            assert cid == record_cid(value) == cbor.cid_for_cbor(cbor.encode_lex(value)).encode()


def test_all_record_types_and_embeds_appear() -> None:
    m, events = sample(0)
    created = Counter(collection for action, collection, _, _, _ in writes(events) if action == "create")
    expected = set(lexicons().record_types()) - {"com.atproto.lexicon.schema"}
    assert expected <= set(created), expected - set(created)
    embeds: Counter[str] = Counter()
    media: Counter[str] = Counter()
    for _, collection, _, value, _ in writes(events):
        if collection == "app.bsky.feed.post" and value is not None and "embed" in value:
            embeds[value["embed"]["$type"]] += 1
            if "media" in value["embed"]:
                media[value["embed"]["media"]["$type"]] += 1
    assert set(embeds) == {
        "app.bsky.embed.images", "app.bsky.embed.external", "app.bsky.embed.video", "app.bsky.embed.record",
        "app.bsky.embed.recordWithMedia", "app.bsky.embed.gallery",
    }
    assert len(media) >= 2
    values = [v for _, _, _, v, _ in writes(events) if v is not None]
    assert any("via" in v for v in values if v["$type"] == "app.bsky.feed.like")
    assert any(v.get("hiddenReplies") for v in values if v["$type"] == "app.bsky.feed.threadgate")
    assert any(v.get("detachedEmbeddingUris") for v in values if v["$type"] == "app.bsky.feed.postgate")
    assert any(v.get("pinnedPost") for v in values if v["$type"] == "app.bsky.actor.profile")
    assert any("labels" in v for v in values if v["$type"] == "app.bsky.feed.post")
    purposes = {v["purpose"] for v in values if v["$type"] == "app.bsky.graph.list"}
    assert purposes == {"app.bsky.graph.defs#curatelist", "app.bsky.graph.defs#modlist",
                        "app.bsky.graph.defs#referencelist"}
    actions = Counter(a for a, *_ in writes(events))
    assert actions["update"] > 20 and actions["delete"] > 50
    kinds = Counter(type(ev).__name__ for ev in events)
    assert kinds["HandleChange"] and kinds["StatusChange"] and kinds["LabelIssue"]
    statuses = {ev.status for ev in events if isinstance(ev, StatusChange)}
    assert {"deactivated", "active"} <= statuses
    assert any(isinstance(ev, AccountCreate) and ev.curve == "p256" for ev in events)
    assert m.counts()["deleted"] > 0


def test_rich_text_facets_point_at_their_text() -> None:
    rng = random.Random(5)
    for _ in range(300):
        mentions = [("alice.pds1.test", DID_A), ("joão-ü.pds2.test", DID_B)][: rng.randint(0, 2)]
        text, facets = rich_text(rng, phrases=("今日はいい天気ですね", "coração"), mentions=mentions,
                                 links=["https://example.com/a/very/long/path/indeed?id=12345"], tags=["café", "日本"],
                                 words=rng.randint(0, 80), emoji=rng.randint(0, 30))
        raw = text.encode()
        assert grapheme_len(text) <= 300 and len(raw) <= 3000
        for facet in facets:
            start, end = facet["index"]["byteStart"], facet["index"]["byteEnd"]
            piece = raw[start:end].decode()  # offsets fall on character boundaries
            (feature,) = facet["features"]
            kind = feature["$type"].rsplit("#", 1)[1]
            if kind == "mention":
                assert piece.startswith("@") and (piece[1:], feature["did"]) in mentions
            elif kind == "tag":
                assert piece == "#" + feature["tag"]
            else:
                assert kind == "link"
                assert piece.endswith("...") and feature["uri"].startswith("https://" + piece[:-3])


def test_rich_text_keeps_specials_when_truncating() -> None:
    rng = random.Random(1)
    text, facets = rich_text(rng, phrases=("ありがとうございます",), mentions=[("alice.pds1.test", DID_A)],
                             tags=["x"], words=400, emoji=50)
    assert grapheme_len(text) <= 300
    assert {f["features"][0]["$type"] for f in facets} == {
        "app.bsky.richtext.facet#mention", "app.bsky.richtext.facet#tag"}


def test_generated_pngs_are_real_pngs() -> None:
    rng = random.Random(3)
    data = png_bytes(rng, 12, 9)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    _, tag = struct.unpack(">I4s", data[8:16])
    assert tag == b"IHDR" and struct.unpack(">II", data[16:24]) == (12, 9)
    idat_len = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    assert len(zlib.decompress(data[41:41 + idat_len])) == 9 * (1 + 12 * 3)
    ref = blob_ref(data, "image/png")
    assert ref == {"$type": "blob", "ref": {"$link": cbor.cid_for_raw(data).encode()}, "mimeType": "image/png",
                   "size": len(data)}
    pool = BlobPool(4)
    assert all(img.width and img.height and img.mime == "image/png" for img in pool.images)
    assert {v.mime for v in pool.videos} == {"video/mp4"} and {c.mime for c in pool.captions} == {"text/vtt"}
    assert [b.data for b in pool.images] == [b.data for b in BlobPool(4).images]


def test_timestamps_and_keys() -> None:
    assert iso_from_us(1730419200123456) == "2024-11-01T00:00:00.123Z"
    assert iso_from_us(0) == "1970-01-01T00:00:00.000Z"
    k1 = derived_key(1, 2, "signing", "k256")
    assert k1.to_bytes() == derived_key(1, 2, "signing", "k256").to_bytes()
    assert k1.to_bytes() != derived_key(1, 3, "signing", "k256").to_bytes()
    assert derived_key(1, 2, "signing", "p256").did_key().startswith("did:key:zDn")


# --- planner ----------------------------------------------------------------------------------


def test_simulation_is_deterministic() -> None:
    a = simulate(11, accounts=30, records_per_account=20, live_events=300)
    b = simulate(11, accounts=30, records_per_account=20, live_events=300)
    c = simulate(12, accounts=30, records_per_account=20, live_events=300)
    assert a.to_json() == b.to_json()
    assert a.diff(b) == []
    assert a.to_json() != c.to_json()


def test_keys_timestamps_and_handles() -> None:
    _, events = sample(1)
    for _, collection, rkey, _, _ in writes(events):
        if collection in ("app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow"):
            assert is_valid_tid(rkey)
    handles = [ev.handle for ev in events if isinstance(ev, AccountCreate | HandleChange)]
    assert len(handles) == len(set(handles))
    assert all(is_valid_handle(h) and h.endswith((".pds1.test", ".pds2.test")) for h in handles)
    # rkeys are unique per repo even across updates and deletes
    seen: set[str] = set()
    for ev in events:
        if isinstance(ev, WriteBatch):
            for action, collection, rkey, _ in ev.writes:
                if action == "create" and collection == "app.bsky.feed.post":
                    key = f"{ev.index}/{rkey}"
                    assert key not in seen
                    seen.add(key)


def test_popularity_is_zipf_like() -> None:
    m, _ = sample(2)
    likes: Counter[str] = Counter()
    followers: Counter[str] = Counter()
    posts: Counter[str] = Counter()
    for _, rec in m.iter_records("app.bsky.feed.like"):
        uri = rec["value"]["subject"]["uri"]
        likes[parse_at_uri(uri).authority] += 1
        posts[uri] += 1
    for _, rec in m.iter_records("app.bsky.graph.follow"):
        followers[rec["value"]["subject"]] += 1
    n = len(m.accounts)
    top = max(1, n // 10)
    assert sum(c for _, c in likes.most_common(top)) > 0.5 * sum(likes.values())
    assert sum(c for _, c in followers.most_common(top)) > 0.4 * sum(followers.values())
    top_posts = max(1, len(posts) // 10)
    assert sum(c for _, c in posts.most_common(top_posts)) > 0.4 * sum(posts.values())


def test_reply_threads_are_deep_and_consistent() -> None:
    m, _ = sample(0)
    records = m.records()
    parent_of: dict[str, str] = {}
    for uri, rec in m.iter_records("app.bsky.feed.post"):
        reply = rec["value"].get("reply")
        if reply:
            parent_of[uri] = reply["parent"]["uri"]
            parent = records.get(reply["parent"]["uri"])
            if parent is not None:  # not deleted since
                parent_reply = parent["value"].get("reply")
                expected_root = parent_reply["root"] if parent_reply else {"uri": reply["parent"]["uri"],
                                                                            "cid": parent["cid"]}
                assert reply["root"] == expected_root

    def depth(uri: str) -> int:
        d = 0
        while uri in parent_of and d < 1000:
            uri, d = parent_of[uri], d + 1
        return d

    depths = Counter(depth(u) for u in parent_of)
    assert max(depths) >= 4


def test_strong_refs_point_at_real_versions() -> None:
    """Every strong ref names a record the planner wrote, with that version's CID."""
    _, events = sample(1)
    versions: set[tuple[str, str]] = set()
    for ev in events:
        if isinstance(ev, WriteBatch):
            did = fake_did(ev.index)
            for (_, collection, rkey, value), cid in zip(ev.writes, ev.cids, strict=True):
                if value is not None and cid is not None:
                    versions.add((f"at://{did}/{collection}/{rkey}", cid))
    refs = 0
    for _, _, _, value, _ in writes(events):
        if value is None:
            continue
        for key in ("subject", "via", "pinnedPost", "joinedViaStarterPack"):
            ref = value.get(key)
            if isinstance(ref, dict):
                assert (ref["uri"], ref["cid"]) in versions
                refs += 1
    assert refs > 1000


def test_planner_refuses_writes_by_inactive_accounts() -> None:
    p = Planner(1, ["pds1.test"])
    ev = p.new_account()
    with pytest.raises(ValueError):
        p.write_batch(ev.index, 1)  # not bound yet
    p.bind(ev.index, DID_A)
    p.initial_batch(ev.index)
    p.write_batch(ev.index, 3)
    assert p.status_change("deactivated", ev.index) == StatusChange(ev.index, "deactivated")
    with pytest.raises(ValueError):
        p.write_batch(ev.index, 1)
    assert p.status_change("suspended", ev.index) is None  # only from active
    assert p.status_change("active", ev.index) is not None
    assert p.status_change("deleted", ev.index) is not None
    assert not any(u.startswith(f"at://{DID_A}/") for u in p.records)
    with pytest.raises(ValueError):
        Planner(1, [])


def test_labels_include_negations_and_expiry() -> None:
    _, events = sample(0)
    labels = [ev for ev in events if isinstance(ev, LabelIssue)]
    assert any(label.neg for label in labels)
    assert any(label.exp for label in labels)
    assert any(label.cid for label in labels) and any(label.uri.startswith("did:") for label in labels)


# --- manifest ---------------------------------------------------------------------------------


def post(text: str) -> dict[str, Any]:
    return {"$type": "app.bsky.feed.post", "text": text, "createdAt": "2024-11-01T00:00:00.000Z"}


def small_manifest() -> Manifest:
    m = Manifest()
    m.add_account(DID_A, "alice.pds1.test", "http://127.0.0.1:1")
    m.add_account(DID_B, "bob.pds1.test", "http://127.0.0.1:1")
    m.apply_ops(DID_A, [("create", "app.bsky.feed.post/3k2aaaaaaaaaa", CID_1, post("one")),
                        ("create", "app.bsky.feed.post/3k2aaaaaaaaab", CID_2, post("two"))])
    m.add_label("did:plc:labeler", f"at://{DID_A}/app.bsky.feed.post/3k2aaaaaaaaaa", "spam", cid=CID_1)
    return m


def test_manifest_updates_and_deletes() -> None:
    m = small_manifest()
    uri1 = f"at://{DID_A}/app.bsky.feed.post/3k2aaaaaaaaaa"
    uri2 = f"at://{DID_A}/app.bsky.feed.post/3k2aaaaaaaaab"
    m.apply_ops(DID_A, [("update", "app.bsky.feed.post/3k2aaaaaaaaaa", CID_2, post("one!"))])
    assert m.records()[uri1] == {"cid": CID_2, "value": post("one!")}
    m.apply_ops(DID_A, [("delete", "app.bsky.feed.post/3k2aaaaaaaaab", None, None)])
    assert uri2 not in m.records() and m.deleted() == {uri2}
    m.put_record(uri2, CID_1, post("again"))  # re-created: no longer deleted
    assert m.deleted() == set()
    with pytest.raises(ManifestError, match="exists"):
        m.apply_ops(DID_A, [("create", "app.bsky.feed.post/3k2aaaaaaaaab", CID_1, post("x"))])
    with pytest.raises(ManifestError, match="missing"):
        m.apply_ops(DID_B, [("update", "app.bsky.feed.post/3k2aaaaaaaaab", CID_1, post("x"))])
    with pytest.raises(ManifestError, match="not in the manifest"):
        m.delete_record(f"at://{DID_B}/app.bsky.feed.post/3k2aaaaaaaaab")
    with pytest.raises(ManifestError):
        m.apply_ops(DID_A, [("upsert", "app.bsky.feed.post/x", CID_1, post("x"))])
    with pytest.raises(ManifestError):
        m.put_record("https://example.com/", CID_1, post("x"))
    with pytest.raises(ManifestError):
        m.add_account(DID_A, "dup.pds1.test", "http://x")
    with pytest.raises(ManifestError):
        m.set_status(DID_A, "frozen")
    m.set_handle(DID_A, "alice2.pds1.test")
    m.set_status(DID_A, "deleted")
    assert m.accounts[DID_A].records == {} and m.deleted() == {uri1, uri2}
    assert m.counts() == {"accounts": 2, "deleted": 2, "labels": 1}


def test_manifest_json_round_trip() -> None:
    m, _ = sample(1)
    again = Manifest.from_json(m.to_json())
    assert again.diff(m) == [] and again == m
    assert Manifest.from_json(again.to_json(indent=True)).to_json() == m.to_json()
    for bad in (b"[]", b"{}", b'{"version": 2, "accounts": {}}', b"not json",
                b'{"version": 1, "accounts": {"did:plc:x": {"handle": "h"}}}',
                b'{"version": 1, "accounts": {"did:plc:x": {"handle": "h", "pds": "p", "records": {"at://did:plc:y/a.b.c/x": {"cid": "c", "value": {}}}}}}',
                b'{"version": 1, "accounts": {}, "labels": [{"src": 1}]}'):
        with pytest.raises(ManifestError):
            Manifest.from_json(bad)


def test_manifest_save_and_load(tmp_path: Any) -> None:
    m = small_manifest()
    m.save(tmp_path / "m.json")
    assert Manifest.load(tmp_path / "m.json") == m


def test_manifest_diff_reports_each_difference() -> None:
    a = small_manifest()
    b = Manifest.from_json(a.to_json())
    uri1 = f"at://{DID_A}/app.bsky.feed.post/3k2aaaaaaaaaa"
    b.accounts[DID_A].records[uri1] = {"cid": CID_2, "value": post("ONE")}
    b.accounts[DID_A].records.pop(f"at://{DID_A}/app.bsky.feed.post/3k2aaaaaaaaab")
    b.accounts[DID_A].records[f"at://{DID_A}/app.bsky.feed.like/3k2aaaaaaaaac"] = {"cid": CID_1, "value": {}}
    b.set_handle(DID_B, "robert.pds1.test")
    b.set_status(DID_B, "takendown")
    b.accounts[DID_A].deleted.add(f"at://{DID_A}/app.bsky.feed.post/3k2aaaaaaaaaz")
    b.add_account("did:plc:cccccccccccccccccccccccc", "carol.pds1.test", "http://127.0.0.1:1")
    b.labels[0]["neg"] = True
    diff = a.diff(b)
    text = "\n".join(diff)
    assert f"{uri1}: cid {CID_1} != {CID_2} (value /text: \"one\" != \"ONE\")" in diff
    assert f"at://{DID_A}/app.bsky.feed.post/3k2aaaaaaaaab: missing record" in diff
    assert f"at://{DID_A}/app.bsky.feed.like/3k2aaaaaaaaac: unexpected record (cid {CID_1})" in diff
    assert f"account {DID_B}: handle 'bob.pds1.test' != 'robert.pds1.test'" in diff
    assert f"account {DID_B}: status 'active' != 'takendown'" in diff
    assert "3k2aaaaaaaaaz: unexpectedly deleted" in text
    assert "account did:plc:cccccccccccccccccccccccc (carol.pds1.test): unexpected" in diff
    assert "label #0:" in text
    assert len(diff) == 8
    assert a.diff(b, limit=2) == diff[:2]
    assert a.diff(b, fields=("records",)) == [d for d in diff if d.startswith("at://") and "deleted" not in d]
    assert b.diff(a, fields=("accounts",)) == ["account did:plc:cccccccccccccccccccccccc (carol.pds1.test): missing"]
    with pytest.raises(ValueError):
        a.diff(b, fields=("colour",))


def test_manifest_labels() -> None:
    m = Manifest()
    src, uri = "did:plc:labeler", f"at://{DID_A}/app.bsky.feed.post/3k2aaaaaaaaaa"
    m.add_label(src, uri, "spam", cid=CID_1)
    m.add_label(src, uri, "rude")
    m.add_label(src, DID_A, "!warn", exp="2025-01-01T00:00:00.000Z")
    m.add_label(src, DID_B, "!hide", exp="2099-01-01T00:00:00.000Z")
    m.add_label(src, uri, "rude", neg=True)
    assert m.active_labels("2024-06-01T00:00:00.000Z") == {
        (src, uri, CID_1, "spam"), (src, DID_A, None, "!warn"), (src, DID_B, None, "!hide")}
    assert m.active_labels("2026-01-01T00:00:00.000Z") == {(src, uri, CID_1, "spam"), (src, DID_B, None, "!hide")}
    assert len(m.latest_labels()) == 4 and m.latest_labels()[(src, uri, None, "rude")]["neg"] is True


def test_normalized_ignores_dids_cids_and_ports_only() -> None:
    a = small_manifest()
    b = Manifest()
    other_a, other_b = "did:plc:xxxxxxxxxxxxxxxxxxxxxxxx", "did:plc:yyyyyyyyyyyyyyyyyyyyyyyy"
    b.add_account(other_a, "alice.pds1.test", "http://127.0.0.1:2")
    b.add_account(other_b, "bob.pds1.test", "http://127.0.0.1:2")
    b.apply_ops(other_a, [("create", "app.bsky.feed.post/3k2aaaaaaaaaa", CID_2, post("one")),
                          ("create", "app.bsky.feed.post/3k2aaaaaaaaab", CID_1, post("two"))])
    b.add_label("did:plc:labeler2", f"at://{other_a}/app.bsky.feed.post/3k2aaaaaaaaaa", "spam", cid=CID_2)
    assert a.diff(b) != []
    assert a.normalized().diff(b.normalized()) == []
    assert a.normalized().to_json() == b.normalized().to_json()
    b.set_handle(other_b, "robert.pds1.test")
    assert a.normalized().diff(b.normalized()) == [
        "account did:plc:aaaaaaaaaaaaaaaaaaaaaaab: handle 'bob.pds1.test' != 'robert.pds1.test'"]


def test_new_profiles_join_only_starter_packs_that_still_exist() -> None:
    """Defect 8: a new account's profile picked a starter pack whose account had been deleted
    and the planner raised KeyError building the strong ref. New profiles must join only live
    starter packs, and still join them."""
    p = Planner(3, ["pds1.test"])
    for _ in range(80):
        ev = p.new_account()
        p.bind(ev.index, fake_did(ev.index))
    p.rebalance_popularity()
    owners: dict[int, list[str]] = {}
    for batch in p.seed_batches(60):
        for action, collection, rkey, _ in batch.writes:
            if action == "create" and collection == "app.bsky.graph.starterpack":
                owners.setdefault(batch.index, []).append(f"at://{fake_did(batch.index)}/{collection}/{rkey}")
    assert len(owners) >= 3, "the seed should give several starter pack owners"
    survivor, *doomed = sorted(owners)
    for index in doomed:
        assert p.status_change("deleted", index) is not None
    live_packs = set(owners[survivor])
    joined: Counter[str] = Counter()
    for _ in range(400):
        ev = p.new_account()
        p.bind(ev.index, fake_did(ev.index))
        for _, collection, _, value in p.initial_batch(ev.index).writes:
            if collection == "app.bsky.actor.profile" and value is not None and "joinedViaStarterPack" in value:
                joined[value["joinedViaStarterPack"]["uri"]] += 1
    assert joined, "new profiles should still join the starter packs that exist"
    assert set(joined) <= live_packs
