"""Thread gates and post gates: one per post (same author and rkey), flagging the post."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from psky.indexer.plugins.base import Plugin, RecordOp, SkipRecord, normalize_datetime

if TYPE_CHECKING:
    from psky.indexer.batch import WaveContext

POST = "app.bsky.feed.post"


class _Gate(Plugin):
    columns = (
        ("uri", "text"), ("cid", "text"), ("creator", "text"), ("postUri", "text"),
        ("createdAt", "text"), ("indexedAt", "text"),
    )  # fmt: skip
    unique = ("postUri",)
    flag: ClassVar[str]

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        r = op.record or {}
        post = r.get("post")
        if post != f"at://{op.did}/{POST}/{op.rkey}":
            raise SkipRecord("gate_mismatch", f"creator and rkey of {self.table} do not match its post")
        return (op.uri, op.cid, op.did, post, normalize_datetime(r.get("createdAt")), op.indexed_at)

    def dup_key(self, did: str, record: Mapping[str, Any]) -> tuple[str, ...] | None:
        post = record.get("post")
        return (post,) if type(post) is str else None

    def write_keys(self, did: str, rkey: str, record: Mapping[str, Any] | None) -> tuple[str, ...]:
        # sets a flag on its post's row
        return (f"at://{did}/{POST}/{rkey}",)

    async def after_insert(
        self, rows: list[Mapping[str, Any]], ops: list[RecordOp], ctx: WaveContext
    ) -> None:
        # the flag is set for every attempt, as the TypeScript indexer does
        posts = [op.row[3] for op in ops if op.row is not None]
        if posts:
            await ctx.execute(
                f'UPDATE post SET "{self.flag}" = true WHERE uri = ANY($1::text[])', sorted(posts)
            )

    async def after_delete(self, rows: list[Mapping[str, Any]], uris: list[str], ctx: WaveContext) -> None:
        posts = [r["postUri"] for r in rows]
        if posts:
            await ctx.execute(
                f'UPDATE post SET "{self.flag}" = false WHERE uri = ANY($1::text[])', sorted(posts)
            )


class Threadgate(_Gate):
    collection = "app.bsky.feed.threadgate"
    table = "thread_gate"
    flag = "hasThreadGate"


class Postgate(_Gate):
    collection = "app.bsky.feed.postgate"
    table = "post_gate"
    flag = "hasPostGate"
