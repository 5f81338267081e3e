"""Labels from ``label_live`` into ``label``: upsert by (src, uri, cid, val) where newer, and a
negation also negates the same (src, uri, val) under any CID."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from psky.atproto.label import Label

__all__ = ["apply_labels"]


async def apply_labels(conn: asyncpg.Connection, labels: Sequence[Label]) -> None:
    if not labels:
        return
    latest: dict[tuple[str, str, str, str], Label] = {}
    for label in labels:  # one row per key and statement: the newest in this batch
        key = (label.src, label.uri, label.cid or "", label.val)
        prev = latest.get(key)
        if prev is None or prev.cts <= label.cts:
            latest[key] = label
    rows = sorted(latest.values(), key=lambda lb: (lb.src, lb.uri, lb.cid or "", lb.val))
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO label (src, uri, cid, val, neg, cts, exp)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[], $6::text[], $7::text[])"
            " ON CONFLICT ON CONSTRAINT label_pkey DO UPDATE SET neg = excluded.neg, cts = excluded.cts,"
            " exp = excluded.exp WHERE label.cts <= excluded.cts",
            [lb.src for lb in rows], [lb.uri for lb in rows], [lb.cid or "" for lb in rows],
            [lb.val for lb in rows], [lb.neg for lb in rows], [lb.cts for lb in rows], [lb.exp for lb in rows],
        )  # fmt: skip
        negations = [lb for lb in rows if lb.neg]
        if negations:
            await conn.execute(
                "UPDATE label l SET neg = true, cts = t.cts, exp = NULL"
                " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS t(src, uri, val, cts)"
                " WHERE l.src = t.src AND l.uri = t.uri AND l.val = t.val AND l.cts < t.cts AND NOT l.neg",
                [lb.src for lb in negations], [lb.uri for lb in negations], [lb.val for lb in negations],
                [lb.cts for lb in negations],
            )  # fmt: skip
