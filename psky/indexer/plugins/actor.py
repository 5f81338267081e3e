"""Actor-level collections: profile, feed generator, labeler, declarations, status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from psky.indexer.plugins.base import (
    Notif,
    Plugin,
    RecordOp,
    blob_cid,
    did_of,
    normalize_datetime,
    ref_cid,
    ref_uri,
)

if TYPE_CHECKING:
    from psky.indexer.batch import WaveContext


class Profile(Plugin):
    collection = "app.bsky.actor.profile"
    table = "profile"
    self_only = True
    columns = (
        ("uri", "text"), ("cid", "text"), ("creator", "text"), ("displayName", "text"), ("description", "text"),
        ("avatarCid", "text"), ("bannerCid", "text"), ("joinedViaStarterPackUri", "text"),
        ("pinnedPost", "text"), ("pinnedPostCid", "text"), ("createdAt", "text"), ("indexedAt", "text"),
    )  # fmt: skip

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        r = op.record or {}
        created = r.get("createdAt")
        pinned = r.get("pinnedPost")
        pinned_uri, pinned_cid = ref_uri(pinned), ref_cid(pinned)
        if not (pinned_uri and pinned_cid and pinned_uri.startswith("at://")):
            pinned_uri = pinned_cid = None
        return (
            op.uri, op.cid, op.did,
            r.get("displayName") if type(r.get("displayName")) is str else None,
            r.get("description") if type(r.get("description")) is str else None,
            blob_cid(r.get("avatar")), blob_cid(r.get("banner")), ref_uri(r.get("joinedViaStarterPack")),
            pinned_uri, pinned_cid,
            created if type(created) is str else op.indexed_at, op.indexed_at,
        )  # fmt: skip

    def notifs_for_insert(self, row: Mapping[str, Any], ctx: WaveContext) -> list[Notif]:
        via = row.get("joinedViaStarterPackUri")
        if not via:
            return []
        return [
            Notif(
                did_of(via),
                row["uri"],
                row["cid"],
                row["creator"],
                "starterpack-joined",
                via,
                row["indexedAt"],
            )
        ]


class FeedGenerator(Plugin):
    collection = "app.bsky.feed.generator"
    table = "feed_generator"
    columns = (
        ("uri", "text"), ("cid", "text"), ("creator", "text"), ("feedDid", "text"), ("displayName", "text"),
        ("description", "text"), ("descriptionFacets", "text"), ("avatarCid", "text"),
        ("createdAt", "text"), ("indexedAt", "text"),
    )  # fmt: skip

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        r = op.record or {}
        facets = r.get("descriptionFacets")
        return (
            op.uri, op.cid, op.did, r.get("did"), r.get("displayName"),
            r.get("description") if type(r.get("description")) is str else None,
            orjson.dumps(facets).decode() if facets is not None else None, blob_cid(r.get("avatar")),
            normalize_datetime(r.get("createdAt")), op.indexed_at,
        )  # fmt: skip


class Labeler(Plugin):
    collection = "app.bsky.labeler.service"
    table = "labeler"
    self_only = True
    columns = (
        ("uri", "text"),
        ("cid", "text"),
        ("creator", "text"),
        ("createdAt", "text"),
        ("indexedAt", "text"),
    )

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        r = op.record or {}
        return (op.uri, op.cid, op.did, normalize_datetime(r.get("createdAt")), op.indexed_at)


class Declaration(Plugin):
    """Indexed in ``record`` only (rkey ``self``): read back by the AppView from there."""

    self_only = True

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        return None


class ChatDeclaration(Declaration):
    collection = "chat.bsky.actor.declaration"


class NotificationDeclaration(Declaration):
    collection = "app.bsky.notification.declaration"


class Status(Declaration):
    collection = "app.bsky.actor.status"
