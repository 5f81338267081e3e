"""``app.bsky.feed.like`` → ``like``; one like per (creator, subject), the rest duplicates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from psky.indexer.plugins.base import (
    AggKey,
    Notif,
    Plugin,
    RecordOp,
    did_of,
    normalize_datetime,
    ref_cid,
    ref_uri,
)

if TYPE_CHECKING:
    from psky.indexer.batch import WaveContext


class Like(Plugin):
    collection = "app.bsky.feed.like"
    table = "like"
    columns = (
        ("uri", "text"), ("cid", "text"), ("creator", "text"), ("subject", "text"), ("subjectCid", "text"),
        ("via", "text"), ("viaCid", "text"), ("createdAt", "text"), ("indexedAt", "text"),
    )  # fmt: skip
    unique = ("creator", "subject")
    reason = "like"

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        r = op.record or {}
        subject = r.get("subject")
        via = r.get("via")
        return (
            op.uri, op.cid, op.did, ref_uri(subject), ref_cid(subject), ref_uri(via), ref_cid(via),
            normalize_datetime(r.get("createdAt")), op.indexed_at,
        )  # fmt: skip

    def dup_key(self, did: str, record: Mapping[str, Any]) -> tuple[str, ...] | None:
        subject = ref_uri(record.get("subject"))
        return (did, subject) if subject else None

    def agg_keys(self, row: Mapping[str, Any]) -> Sequence[AggKey]:
        return (AggKey("post_agg", row["subject"], "likeCount"),)

    def notifs_for_insert(self, row: Mapping[str, Any], ctx: WaveContext) -> list[Notif]:
        creator, subject = row["creator"], row["subject"]
        owner = did_of(subject)
        if owner == creator:
            return []
        notifs = [Notif(owner, row["uri"], row["cid"], creator, self.reason, subject, row["sortAt"])]
        via = row.get("via")
        if via and did_of(via) != creator:
            notifs.append(
                Notif(
                    did_of(via),
                    row["uri"],
                    row["cid"],
                    creator,
                    f"{self.reason}-via-repost",
                    via,
                    row["sortAt"],
                )
            )
        return notifs

    def notifs_for_delete(
        self, row: Mapping[str, Any], replaced: bool, op: RecordOp
    ) -> tuple[list[Notif], bool]:
        return [], not replaced
