"""``app.bsky.feed.post``: the post row, its feed item, embeds, quotes, reply and gate flags,
and the notifications of mentions, quotes and replies (the TypeScript post plugin's rules)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from psky.indexer.plugins.base import (
    AggKey,
    Notif,
    Plugin,
    RecordOp,
    blob_cid,
    collection_of,
    did_of,
    normalize_datetime,
    ref_cid,
    ref_uri,
)

if TYPE_CHECKING:
    from psky.indexer.batch import WaveContext

POST = "app.bsky.feed.post"
THREADGATE = "app.bsky.feed.threadgate"
POSTGATE = "app.bsky.feed.postgate"
REPLY_NOTIF_DEPTH = 5

# indexes into Post.columns
_CREATED, _INDEXED, _INVALID_ROOT, _VIOLATES_GATE, _VIOLATES_EMBED = 8, 9, 12, 13, 14


def gate_uri(post_uri: str, collection: str = THREADGATE) -> str:
    """The gate record of a post: same author and rkey (URI unchanged if not a post)."""
    parts = post_uri.split("/")
    if len(parts) == 5 and parts[3] == POST:
        parts[3] = collection
        return "/".join(parts)
    return post_uri


def reply_refs(record: Mapping[str, Any]) -> tuple[str | None, str | None, str | None, str | None]:
    reply = record.get("reply")
    if not isinstance(reply, dict):
        return None, None, None, None
    root, parent = reply.get("root"), reply.get("parent")
    return ref_uri(root), ref_cid(root), ref_uri(parent), ref_cid(parent)


def split_embeds(embed: Any) -> list[dict[str, Any]]:
    """A post's embeds, with a recordWithMedia split into its record and its media."""
    if not isinstance(embed, dict):
        return []
    if embed.get("$type") == "app.bsky.embed.recordWithMedia":
        out: list[dict[str, Any]] = []
        record = embed.get("record")
        if isinstance(record, dict):
            out.append({**record, "$type": "app.bsky.embed.record"})
        media = embed.get("media")
        if isinstance(media, dict):
            out.append(media)
        return out
    return [embed]


def embedded_record(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """(uri, cid) of the record a post embeds, if any."""
    for embed in split_embeds(record.get("embed")):
        if embed.get("$type") == "app.bsky.embed.record":
            inner = embed.get("record")
            uri, cid = ref_uri(inner), ref_cid(inner)
            if uri and cid:
                return uri, cid
    return None


def _mentions(record: Mapping[str, Any] | None) -> list[str]:
    out: list[str] = []
    facets = (record or {}).get("facets")
    if not isinstance(facets, list):
        return out
    for facet in facets:
        features = facet.get("features") if isinstance(facet, dict) else None
        if not isinstance(features, list):
            continue
        for feature in features:
            if isinstance(feature, dict) and feature.get("$type") == "app.bsky.richtext.facet#mention":
                did = feature.get("did")
                if type(did) is str:
                    out.append(did)
    return out


def _json_list(value: Any) -> str | None:
    """A jsonb array; jsonb cannot hold NUL characters, so they are dropped from its strings."""
    if not isinstance(value, list) or not value:
        return None
    return orjson.dumps([v.replace("\x00", "") if type(v) is str else v for v in value]).decode()


class Post(Plugin):
    collection = POST
    table = "post"
    renotify_on_update = True
    columns = (
        ("uri", "text"), ("cid", "text"), ("creator", "text"), ("text", "text"),
        ("replyRoot", "text"), ("replyRootCid", "text"), ("replyParent", "text"), ("replyParentCid", "text"),
        ("createdAt", "text"), ("indexedAt", "text"), ("langs", "jsonb"), ("tags", "jsonb"),
        ("invalidReplyRoot", "bool"), ("violatesThreadGate", "bool"), ("violatesEmbeddingRules", "bool"),
    )  # fmt: skip

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        r = op.record or {}
        root, root_cid, parent, parent_cid = reply_refs(r)
        text = r.get("text")
        return (
            op.uri, op.cid, op.did, text if type(text) is str else "",
            root or None, root_cid or None, parent or None, parent_cid or None,
            normalize_datetime(r.get("createdAt")), op.indexed_at, _json_list(r.get("langs")), _json_list(r.get("tags")),
            None, None, None,
        )  # fmt: skip

    def read_keys(self, did: str, rkey: str, record: Mapping[str, Any] | None) -> tuple[str, ...]:
        r = record or {}
        keys: list[str] = []
        root, _, parent, _ = reply_refs(r)
        if root:
            keys += (root, gate_uri(root))
        if parent:
            keys.append(parent)
        embedded = embedded_record(r)
        if embedded and collection_of(embedded[0]) == POST:
            keys.append(gate_uri(embedded[0], POSTGATE))
        return tuple(keys)

    def write_keys(self, did: str, rkey: str, record: Mapping[str, Any] | None) -> tuple[str, ...]:
        uri = f"at://{did}/{POST}/{rkey}"
        keys = [f"quote:{uri}", f"feed:{uri}"]
        embedded = embedded_record(record or {})
        if embedded and collection_of(embedded[0]) == POST:
            keys.append(f"quote:{embedded[0]}")
        return tuple(keys)

    def agg_keys(self, row: Mapping[str, Any]) -> Sequence[AggKey]:
        keys = [AggKey("profile_agg", row["creator"], "postsCount")]
        if row["replyParent"] and not row["violatesThreadGate"]:
            keys.append(AggKey("post_agg", row["replyParent"], "replyCount"))
        return keys

    # -- before insert: reply validity, thread gates, embedding rules

    async def prepare(self, ops: list[RecordOp], ctx: WaveContext) -> None:
        wanted: set[str] = set()
        for op in ops:
            r = op.record or {}
            root, _, parent, _ = reply_refs(r)
            if parent:
                wanted.add(parent)
            if root:
                wanted.update((root, gate_uri(root)))
            embedded = embedded_record(r)
            if embedded and collection_of(embedded[0]) == POST:
                wanted.add(gate_uri(embedded[0], POSTGATE))
        found: dict[str, tuple[dict[str, Any], bool | None]] = {}
        if wanted:
            rows = await ctx.fetch(
                'SELECT r.uri, r.json, p."invalidReplyRoot" FROM record r LEFT JOIN post p ON p.uri = r.uri '
                "WHERE r.uri = ANY($1::text[]) AND r.json <> ''",
                sorted(wanted),
            )
            for row in rows:
                try:
                    value = orjson.loads(row["json"])
                except orjson.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    found[row["uri"]] = (value, row["invalidReplyRoot"])
        gates: dict[str, dict[str, Any]] = {}
        for op in ops:
            if op.row is None:
                continue
            r = op.record or {}
            row = list(op.row)
            root, _, parent, _ = reply_refs(r)
            if root and parent:
                parent_ref = found.get(parent)
                invalid = parent_ref is None or _invalid_reply_root(root, parent, parent_ref)
                root_ref = found.get(root)
                gate = found.get(gate_uri(root))
                violates = await _violates_thread_gate(
                    ctx, op.did, did_of(root), root_ref[0] if root_ref else None, gate[0] if gate else None
                )
                if invalid or violates:
                    row[_INVALID_ROOT], row[_VIOLATES_GATE] = invalid, violates
            embedded = embedded_record(r)
            if embedded and collection_of(embedded[0]) == POST:
                postgate = found.get(gate_uri(embedded[0], POSTGATE))
                if postgate is not None and _embedding_disabled(postgate[0], op.did, did_of(embedded[0])):
                    row[_VIOLATES_EMBED] = True
            # the root's gate hides replies from reply notifications (a root post has none)
            thread_gate = found.get(gate_uri(root)) if root else None
            if thread_gate is not None:
                gates[op.uri] = thread_gate[0]
            op.row = tuple(row)
            # a reply later in this wave to this post sees it as indexed one event at a time
            found[op.uri] = (r, row[_INVALID_ROOT])
        ctx.scratch["post_gates"] = gates

    # -- after insert: feed items, embeds, quotes, and what notifications need

    async def after_insert(
        self, rows: list[Mapping[str, Any]], ops: list[RecordOp], ctx: WaveContext
    ) -> None:
        items = [
            (op.uri, op.cid, "post", op.uri, op.did, min(op.row[_CREATED], op.row[_INDEXED]))
            for op in ops
            if op.row is not None
        ]
        await ctx.insert_feed_items(items)
        inserted = {row["uri"] for row in rows}
        images: list[tuple[Any, ...]] = []
        externals: list[tuple[Any, ...]] = []
        records: list[tuple[Any, ...]] = []
        videos: list[tuple[Any, ...]] = []
        quotes: list[tuple[Any, ...]] = []
        for op in ops:
            if op.uri not in inserted or op.row is None:
                continue
            for embed in split_embeds((op.record or {}).get("embed")):
                kind = embed.get("$type")
                if kind == "app.bsky.embed.images":
                    for i, img in enumerate(embed.get("images") or ()):
                        if isinstance(img, dict):
                            cid = blob_cid(img.get("image"))
                            alt = img.get("alt")
                            if cid:
                                images.append((op.uri, str(i), cid, alt if type(alt) is str else ""))
                elif kind == "app.bsky.embed.external":
                    ext = embed.get("external")
                    if isinstance(ext, dict):
                        externals.append(
                            (
                                op.uri,
                                ext.get("uri"),
                                ext.get("title"),
                                ext.get("description"),
                                blob_cid(ext.get("thumb")),
                            )
                        )
                elif kind == "app.bsky.embed.record":
                    inner = embed.get("record")
                    uri, cid = ref_uri(inner), ref_cid(inner)
                    if uri and cid:
                        records.append((op.uri, uri, cid))
                        if collection_of(uri) == POST:
                            quotes.append((op.uri, op.cid, uri, cid, op.row[_CREATED], op.indexed_at))
                            ctx.recount_quotes(uri, cid)
                elif kind == "app.bsky.embed.video":
                    cid = blob_cid(embed.get("video"))
                    alt = embed.get("alt")
                    if cid:
                        videos.append((op.uri, cid, alt if type(alt) is str else None))
        await ctx.insert_rows(
            "post_embed_image",
            (("postUri", "text"), ("position", "text"), ("imageCid", "text"), ("alt", "text")),
            images,
        )
        await ctx.insert_rows(
            "post_embed_external",
            (
                ("postUri", "text"),
                ("uri", "text"),
                ("title", "text"),
                ("description", "text"),
                ("thumbCid", "text"),
            ),
            externals,
        )
        await ctx.insert_rows(
            "post_embed_record", (("postUri", "text"), ("embedUri", "text"), ("embedCid", "text")), records
        )
        await ctx.insert_rows(
            "post_embed_video", (("postUri", "text"), ("videoCid", "text"), ("alt", "text")), videos
        )
        await ctx.insert_rows(
            "quote",
            (("uri", "text"), ("cid", "text"), ("subject", "text"), ("subjectCid", "text"),
             ("createdAt", "text"), ("indexedAt", "text")),
            quotes,
        )  # fmt: skip
        notify = [row["uri"] for row in rows if ctx.notify_for(row["uri"])]
        if notify:
            await self._thread_context(notify, ctx)

    async def _thread_context(self, uris: list[str], ctx: WaveContext) -> None:
        # the thread above these posts and the replies indexed before them, level by level:
        # one indexed lookup per level (a recursive query gets row estimates that multiply
        # per level, and PostgreSQL then plans sorted merges over the whole post table)
        ancestors: dict[str, list[tuple[str, int]]] = {}
        up: dict[str, list[str]] = {u: [u] for u in uris}  # post -> the posts of this wave below it
        for height in range(REPLY_NOTIF_DEPTH + 1):
            rows = await ctx.fetch(
                'SELECT p.uri, p."replyParent" AS parent FROM post p WHERE p.uri = ANY($1::text[]) ORDER BY p.uri',
                sorted(up),
            )
            above: dict[str, list[str]] = {}
            for row in rows:
                for start in up[row["uri"]]:
                    ancestors.setdefault(start, []).append((row["uri"], height))
                    if row["parent"] is not None and height < REPLY_NOTIF_DEPTH:
                        above.setdefault(row["parent"], []).append(start)
            if not above:
                break
            up = above
        descendents: dict[str, list[tuple[str, int, str, str, str]]] = {}
        frontier = {u: u for u in uris}  # post -> the post of this wave it descends from
        for depth in range(1, REPLY_NOTIF_DEPTH + 1):
            rows = await ctx.fetch(
                'SELECT p."replyParent" AS parent, p.uri, p.cid, p.creator, p."sortAt" FROM post p'
                ' WHERE p."replyParent" = ANY($1::text[]) ORDER BY p.uri',
                sorted(frontier),
            )
            if not rows:
                break
            below: dict[str, str] = {}
            for row in rows:
                start = frontier[row["parent"]]
                descendents.setdefault(start, []).append(
                    (row["uri"], depth, row["cid"], row["creator"], row["sortAt"])
                )
                below[row["uri"]] = start
            frontier = below
        ctx.scratch["post_ancestors"] = ancestors
        ctx.scratch["post_descendents"] = descendents

    def notifs_for_insert(self, row: Mapping[str, Any], ctx: WaveContext) -> list[Notif]:
        uri, cid, creator, sort_at = row["uri"], row["cid"], row["creator"], row["sortAt"]
        record = ctx.record_of(uri) or {}
        notified = {creator}
        out: list[Notif] = []

        def notify(n: Notif) -> None:
            if n.did not in notified:
                notified.add(n.did)
                out.append(n)

        for did in _mentions(record):
            notify(Notif(did, uri, cid, creator, "mention", None, sort_at))
        if not row["violatesEmbeddingRules"]:
            embedded = embedded_record(record)
            if embedded and collection_of(embedded[0]) == POST:
                notify(Notif(did_of(embedded[0]), uri, cid, creator, "quote", embedded[0], sort_at))
        if row["violatesThreadGate"]:
            return out
        gate = ctx.scratch.get("post_gates", {}).get(uri) or {}
        hidden_value = gate.get("hiddenReplies")
        hidden: list[Any] = hidden_value if isinstance(hidden_value, list) else []
        ancestors = ctx.scratch.get("post_ancestors", {}).get(uri, [])
        for ancestor, height in ancestors:
            if ancestor == uri:
                continue
            if height < REPLY_NOTIF_DEPTH:
                notify(Notif(did_of(ancestor), uri, cid, creator, "reply", ancestor, sort_at))
                if ancestor in hidden:
                    break
        for d_uri, depth, d_cid, d_creator, d_sort in ctx.scratch.get("post_descendents", {}).get(uri, []):
            for ancestor, height in ancestors:
                if depth + height < REPLY_NOTIF_DEPTH:
                    notify(Notif(did_of(ancestor), d_uri, d_cid, d_creator, "reply", ancestor, d_sort))
        return out

    def notifs_for_delete(
        self, row: Mapping[str, Any], replaced: bool, op: RecordOp
    ) -> tuple[list[Notif], bool]:
        return [], True

    # -- delete: side tables (the TypeScript deleteFn's statements, video embeds included)

    async def after_delete(self, rows: list[Mapping[str, Any]], uris: list[str], ctx: WaveContext) -> None:
        await ctx.execute('DELETE FROM feed_item WHERE "postUri" = ANY($1::text[])', uris)
        await ctx.execute("DELETE FROM quote WHERE subject = ANY($1::text[])", uris)
        ctx.quotes_removed(uris)
        await ctx.execute('DELETE FROM post_embed_image WHERE "postUri" = ANY($1::text[])', uris)
        await ctx.execute('DELETE FROM post_embed_external WHERE "postUri" = ANY($1::text[])', uris)
        await ctx.execute('DELETE FROM post_embed_video WHERE "postUri" = ANY($1::text[])', uris)
        embeds = await ctx.fetch(
            'DELETE FROM post_embed_record WHERE "postUri" = ANY($1::text[]) RETURNING "postUri", "embedUri", "embedCid"',
            uris,
        )
        quoting = [e["postUri"] for e in embeds if collection_of(e["embedUri"]) == POST]
        if quoting:
            await ctx.execute("DELETE FROM quote WHERE uri = ANY($1::text[])", quoting)
            for e in embeds:
                if collection_of(e["embedUri"]) == POST:
                    ctx.recount_quotes(e["embedUri"], e["embedCid"])


def _invalid_reply_root(root: str, parent: str, parent_ref: tuple[dict[str, Any], bool | None]) -> bool:
    record, parent_invalid = parent_ref
    if parent_invalid:
        return True
    parent_root = reply_refs(record)[0]
    if parent == root:
        return isinstance(record.get("reply"), dict)
    return parent_root != root


async def _violates_thread_gate(
    ctx: WaveContext, replier: str, owner: str, root: dict[str, Any] | None, gate: dict[str, Any] | None
) -> bool:
    if replier == owner or gate is None:
        return False
    allow = gate.get("allow")
    if not isinstance(allow, list):
        return False
    kinds = [rule.get("$type") for rule in allow if isinstance(rule, dict)]
    if "app.bsky.feed.threadgate#mentionRule" in kinds and replier in _mentions(root):
        return False
    follower = "app.bsky.feed.threadgate#followerRule" in kinds
    following = "app.bsky.feed.threadgate#followingRule" in kinds
    lists = [
        rule["list"]
        for rule in allow
        if isinstance(rule, dict)
        and rule.get("$type") == "app.bsky.feed.threadgate#listRule"
        and type(rule.get("list")) is str
    ]
    if not (follower or following or lists):
        return True
    row = await ctx.fetchrow(
        "SELECT"
        ' EXISTS(SELECT 1 FROM follow WHERE creator = $1 AND "subjectDid" = $2) AS follower,'
        ' EXISTS(SELECT 1 FROM follow WHERE creator = $2 AND "subjectDid" = $1) AS following,'
        ' EXISTS(SELECT 1 FROM list_item WHERE "listUri" = ANY($3::text[]) AND "subjectDid" = $1) AS listed',
        replier,
        owner,
        lists,
    )
    if row is None:
        return True
    if following and row["following"]:
        return False
    if follower and row["follower"]:
        return False
    return not (lists and row["listed"])


def _embedding_disabled(postgate: Mapping[str, Any], viewer: str, author: str) -> bool:
    if viewer == author:
        return False
    rules = postgate.get("embeddingRules")
    if not isinstance(rules, list):
        return False
    return any(isinstance(r, dict) and r.get("$type") == "app.bsky.feed.postgate#disableRule" for r in rules)
