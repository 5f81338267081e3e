"""Social-graph collections: follow, block, list, list item, list block, starter pack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from psky.indexer.plugins.base import (
    AggKey,
    Notif,
    Plugin,
    RecordOp,
    SkipRecord,
    blob_cid,
    did_of,
    normalize_datetime,
)

if TYPE_CHECKING:
    from psky.indexer.batch import WaveContext


def _text(value: Any) -> str | None:
    return value if type(value) is str else None


def _facets(value: Any) -> str | None:
    return orjson.dumps(value).decode() if value is not None else None


class _Subject(Plugin):
    """A record about one other account or list (``subject``), one per creator and subject."""

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        r = op.record or {}
        return (
            op.uri,
            op.cid,
            op.did,
            r.get("subject"),
            normalize_datetime(r.get("createdAt")),
            op.indexed_at,
        )

    def dup_key(self, did: str, record: Mapping[str, Any]) -> tuple[str, ...] | None:
        subject = _text(record.get("subject"))
        return (did, subject) if subject else None


_DID_SUBJECT = (
    ("uri", "text"), ("cid", "text"), ("creator", "text"), ("subjectDid", "text"),
    ("createdAt", "text"), ("indexedAt", "text"),
)  # fmt: skip


class Follow(_Subject):
    collection = "app.bsky.graph.follow"
    table = "follow"
    columns = _DID_SUBJECT
    unique = ("creator", "subjectDid")

    def agg_keys(self, row: Mapping[str, Any]) -> Sequence[AggKey]:
        return (
            AggKey("profile_agg", row["subjectDid"], "followersCount"),
            AggKey("profile_agg", row["creator"], "followsCount"),
        )

    def notifs_for_insert(self, row: Mapping[str, Any], ctx: WaveContext) -> list[Notif]:
        return [
            Notif(row["subjectDid"], row["uri"], row["cid"], row["creator"], "follow", None, row["sortAt"])
        ]

    def notifs_for_delete(
        self, row: Mapping[str, Any], replaced: bool, op: RecordOp
    ) -> tuple[list[Notif], bool]:
        return [], not replaced

    def write_keys(self, did: str, rkey: str, record: Mapping[str, Any] | None) -> tuple[str, ...]:
        # thread gates with follower rules read follows between two actors
        subject = _text((record or {}).get("subject"))
        return (f"follow:{did}:{subject}",) if subject else (f"follow:{did}:*",)


class Block(_Subject):
    collection = "app.bsky.graph.block"
    table = "actor_block"
    columns = _DID_SUBJECT
    unique = ("creator", "subjectDid")


class List(Plugin):
    collection = "app.bsky.graph.list"
    table = "list"
    columns = (
        ("uri", "text"), ("cid", "text"), ("creator", "text"), ("name", "text"), ("purpose", "text"),
        ("description", "text"), ("descriptionFacets", "text"), ("avatarCid", "text"),
        ("createdAt", "text"), ("indexedAt", "text"),
    )  # fmt: skip

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        r = op.record or {}
        return (
            op.uri, op.cid, op.did, r.get("name"), r.get("purpose"), _text(r.get("description")),
            _facets(r.get("descriptionFacets")), blob_cid(r.get("avatar")),
            normalize_datetime(r.get("createdAt")), op.indexed_at,
        )  # fmt: skip


class ListItem(Plugin):
    collection = "app.bsky.graph.listitem"
    table = "list_item"
    columns = (
        ("uri", "text"), ("cid", "text"), ("creator", "text"), ("subjectDid", "text"), ("listUri", "text"),
        ("createdAt", "text"), ("indexedAt", "text"),
    )  # fmt: skip
    unique = ("listUri", "subjectDid")

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        r = op.record or {}
        list_uri = r.get("list")
        if type(list_uri) is not str or did_of(list_uri) != op.did:
            raise SkipRecord("listitem_foreign_list", "creator of listitem does not match creator of list")
        return (
            op.uri,
            op.cid,
            op.did,
            r.get("subject"),
            list_uri,
            normalize_datetime(r.get("createdAt")),
            op.indexed_at,
        )

    def dup_key(self, did: str, record: Mapping[str, Any]) -> tuple[str, ...] | None:
        list_uri, subject = _text(record.get("list")), _text(record.get("subject"))
        return (list_uri, subject) if list_uri and subject else None

    def write_keys(self, did: str, rkey: str, record: Mapping[str, Any] | None) -> tuple[str, ...]:
        list_uri = _text((record or {}).get("list"))
        return (f"list:{list_uri}",) if list_uri else (f"list:{did}:*",)


class ListBlock(_Subject):
    collection = "app.bsky.graph.listblock"
    table = "list_block"
    columns = (
        ("uri", "text"), ("cid", "text"), ("creator", "text"), ("subjectUri", "text"),
        ("createdAt", "text"), ("indexedAt", "text"),
    )  # fmt: skip
    unique = ("creator", "subjectUri")


class StarterPack(Plugin):
    collection = "app.bsky.graph.starterpack"
    table = "starter_pack"
    columns = (
        ("uri", "text"), ("cid", "text"), ("creator", "text"), ("name", "text"),
        ("createdAt", "text"), ("indexedAt", "text"),
    )  # fmt: skip

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        r = op.record or {}
        return (
            op.uri,
            op.cid,
            op.did,
            _text(r.get("name")),
            normalize_datetime(r.get("createdAt")),
            op.indexed_at,
        )


class Verification(Plugin):
    collection = "app.bsky.graph.verification"
    table = "verification"
    columns = (
        ("uri", "text"), ("cid", "text"), ("rkey", "text"), ("creator", "text"), ("subject", "text"),
        ("handle", "text"), ("displayName", "text"), ("createdAt", "text"), ("indexedAt", "text"),
    )  # fmt: skip
    unique = ("subject", "creator")

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        r = op.record or {}
        return (
            op.uri, op.cid, op.rkey, op.did, r.get("subject"), r.get("handle"), r.get("displayName"),
            normalize_datetime(r.get("createdAt")), op.indexed_at,
        )  # fmt: skip

    def dup_key(self, did: str, record: Mapping[str, Any]) -> tuple[str, ...] | None:
        subject = _text(record.get("subject"))
        return (subject, did) if subject else None

    def notifs_for_insert(self, row: Mapping[str, Any], ctx: WaveContext) -> list[Notif]:
        return [
            Notif(row["subject"], row["uri"], row["cid"], row["creator"], "verified", None, row["sortedAt"])
        ]

    def notifs_for_delete(
        self, row: Mapping[str, Any], replaced: bool, op: RecordOp
    ) -> tuple[list[Notif], bool]:
        # the TypeScript indexer stamps this with the wall clock; the event time is
        # deterministic (replays give the same row) and as close to the deletion
        notif = Notif(
            row["subject"], row["uri"], row["cid"], row["creator"], "unverified", None, op.indexed_at
        )
        return [notif], False
