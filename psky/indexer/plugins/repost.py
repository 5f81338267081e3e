"""``app.bsky.feed.repost`` → ``repost`` and a ``feed_item``; one per (creator, subject)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from psky.indexer.plugins.base import AggKey, RecordOp
from psky.indexer.plugins.like import Like

if TYPE_CHECKING:
    from psky.indexer.batch import WaveContext


class Repost(Like):
    collection = "app.bsky.feed.repost"
    table = "repost"
    reason = "repost"

    def agg_keys(self, row: Mapping[str, Any]) -> Sequence[AggKey]:
        return (AggKey("post_agg", row["subject"], "repostCount"),)

    async def after_insert(
        self, rows: list[Mapping[str, Any]], ops: list[RecordOp], ctx: WaveContext
    ) -> None:
        # the feed item is written whether or not the repost row is new (as the TypeScript
        # indexer does: both inserts run side by side)
        items = []
        for op in ops:
            r = op.row
            if r is None:
                continue
            created, indexed = r[7], r[8]
            items.append((op.uri, op.cid, "repost", r[3], op.did, min(created, indexed)))
        await ctx.insert_feed_items(items)

    async def after_delete(self, rows: list[Mapping[str, Any]], uris: list[str], ctx: WaveContext) -> None:
        await ctx.execute("DELETE FROM feed_item WHERE uri = ANY($1::text[])", uris)
