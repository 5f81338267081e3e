"""``psky dlq``: inspect, replay and purge the dead-letter streams.

Dead-letter streams are ``<stream>_dlq``: ``repo_backfill_dlq`` (the backfiller, after its
retries) and ``firehose_live_dlq``, ``firehose_backfill_dlq``, ``label_live_dlq`` (the
indexer, after too many deliveries). An entry holds the original fields verbatim plus
``reason``, ``attempts``, ``source_stream``, ``source_id``, ``group``, ``consumer`` and
``time`` (:class:`~psky.streams.DeadLetter`); rsky's backfiller writes only ``repo``,
``reason`` and ``attempts``, and those read too (the origin is then the DLQ's name without
``_dlq``).

Replay copies each selected entry's original fields (metadata stripped) to the end of its
origin stream with ``XADD``, and only once that succeeded deletes it from the DLQ with
``XDEL``. It is at-least-once: an interruption between the two leaves an entry both replayed
and still in the DLQ, so running replay again sends it a second time. That is harmless —
the backfiller refetches a repo, the indexer's writes are idempotent and rev-guarded — and
it never loses one. A replayed entry is a new entry at the end of its stream: events
written for the same record since then are older in the stream but newer in rev, and the
indexer's rev guard keeps the newer state.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
import redis.asyncio as aioredis

from psky.streams import (
    FIREHOSE_BACKFILL,
    FIREHOSE_LIVE,
    LABEL_LIVE,
    REPO_BACKFILL,
    DeadLetter,
    MalformedMessage,
    dlq_stream_for,
    parse_dead_letter,
)
from psky.streams._redis import command, raw_client, text

__all__ = [
    "KNOWN_DLQS",
    "DlqEntry",
    "DlqSummary",
    "dlq_names",
    "entries",
    "purge",
    "reason_class",
    "replay",
    "run_dlq",
    "summarize",
]

#: the dead-letter streams of the backfiller and the indexer
KNOWN_DLQS = tuple(dlq_stream_for(s) for s in (REPO_BACKFILL, FIREHOSE_LIVE, FIREHOSE_BACKFILL, LABEL_LIVE))
_PAGE = 500


@dataclass(slots=True)
class DlqEntry:
    id: str
    letter: DeadLetter | None
    #: set when the entry is not a readable dead letter (then ``letter`` is None)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.letter is None:
            return {"id": self.id, "error": self.error}
        letter = self.letter
        fields: dict[str, Any] = {}
        for name, value in letter.fields.items():
            try:
                decoded = value.decode()
            except UnicodeDecodeError:
                fields[name] = {"$hex": value.hex()}
                continue
            try:
                fields[name] = orjson.loads(decoded)
            except orjson.JSONDecodeError:
                fields[name] = decoded
        return {"id": self.id, "reason": letter.reason, "attempts": letter.attempts, "time": letter.time or None,
                "source_stream": letter.source_stream or None, "source_id": letter.source_id or None,
                "group": letter.group or None, "consumer": letter.consumer or None, "fields": fields}


@dataclass(slots=True)
class DlqSummary:
    stream: str
    length: int
    scanned: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    origins: Counter[str] = field(default_factory=Counter)
    first_time: str | None = None
    last_time: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"stream": self.stream, "length": self.length, "scanned": self.scanned,
                "reasons": dict(self.reasons.most_common()), "origins": dict(self.origins),
                "first_time": self.first_time, "last_time": self.last_time}


_DID = re.compile(r"did:[a-z]+:[A-Za-z0-9._:%-]+")
_URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+")
_HEX = re.compile(r"\b(?:bafy|bafk)[a-z2-7]{20,}\b|\b[0-9a-f]{16,}\b")
_NUM = re.compile(r"\d+")


def reason_class(reason: str) -> str:
    """*reason* with its particulars (DIDs, URLs, CIDs, numbers) masked, so that entries
    failing the same way count together."""
    out = _DID.sub("<did>", reason)
    out = _URL.sub("<url>", out)
    out = _HEX.sub("<id>", out)
    out = _NUM.sub("N", out)
    return (out[:120] + "…") if len(out) > 120 else (out or "(no reason)")


def origin_of(dlq: str, letter: DeadLetter) -> str:
    """The stream an entry came from: its ``source_stream``, else the DLQ name without ``_dlq``."""
    if letter.source_stream:
        return letter.source_stream
    return dlq[: -len("_dlq")] if dlq.endswith("_dlq") else dlq


async def dlq_names(redis: aioredis.Redis, prefix: str = "", *, max_keys: int = 1_000_000) -> list[str]:
    """The known dead-letter streams under *prefix* plus any other ``*_dlq`` stream present
    (looked for only while Redis holds at most *max_keys* keys)."""
    from psky.ops.status import glob_escape, scan_keys

    names = [prefix + n for n in KNOWN_DLQS]
    found = await scan_keys(raw_client(redis), glob_escape(prefix) + "*_dlq", "stream", max_keys=max_keys)
    return names + [k for k in found or () if k not in names]


async def entries(redis: aioredis.Redis, dlq: str, *, start: str = "-", limit: int | None = None,
                  reason: str | None = None, ids: Sequence[str] = ()) -> AsyncIterator[DlqEntry]:
    """Entries of *dlq* from *start*, oldest first; *reason* keeps those whose reason
    contains it, *ids* only those ids, *limit* stops after that many matches."""
    raw = raw_client(redis)
    found = 0
    async for rows in _by_ids(raw, dlq, ids) if ids else _pages(raw, dlq, start):
        for row in rows:
            entry_id = text(row[0])
            flat = row[1] or []
            pairs = dict(zip(flat[::2], flat[1::2], strict=True))
            try:
                entry = DlqEntry(entry_id, parse_dead_letter(pairs))
            except MalformedMessage as e:
                entry = DlqEntry(entry_id, None, str(e))
            if reason is not None and (entry.letter is None or reason not in entry.letter.reason):
                continue
            yield entry
            found += 1
            if limit is not None and found >= limit:
                return


async def _by_ids(raw: aioredis.Redis, dlq: str, ids: Sequence[str]) -> AsyncIterator[list[Any]]:
    for entry_id in ids:
        yield await command(raw, "XRANGE", dlq, entry_id, entry_id, raw=True)


async def _pages(raw: aioredis.Redis, dlq: str, start: str) -> AsyncIterator[list[Any]]:
    while True:
        rows = await command(raw, "XRANGE", dlq, start, "+", "COUNT", _PAGE, raw=True)
        if not rows:
            return
        yield rows
        if len(rows) < _PAGE:
            return
        start = "(" + text(rows[-1][0])


async def summarize(redis: aioredis.Redis, dlq: str, *, scan_limit: int = 100_000) -> DlqSummary:
    """Length, and counts by reason class and origin over the first *scan_limit* entries."""
    length = int(await command(raw_client(redis), "XLEN", dlq))
    summary = DlqSummary(dlq, length)
    async for entry in entries(redis, dlq, limit=scan_limit):
        summary.scanned += 1
        if entry.letter is None:
            summary.reasons["(unreadable entry)"] += 1
            continue
        summary.reasons[reason_class(entry.letter.reason)] += 1
        summary.origins[origin_of(dlq, entry.letter)] += 1
        when = entry.letter.time or None
        if when:
            summary.first_time = summary.first_time or when
            summary.last_time = when
    return summary


@dataclass(slots=True)
class ReplayResult:
    replayed: int = 0
    skipped: int = 0  # unreadable entries, left in place
    targets: Counter[str] = field(default_factory=Counter)


async def replay(redis: aioredis.Redis, dlq: str, *, to: str | None = None, limit: int | None = None,
                 reason: str | None = None, ids: Sequence[str] = (), batch: int = 100) -> ReplayResult:
    """Move entries back to their origin stream (or *to*): XADD the original fields, then XDEL
    from the DLQ only the entries whose XADD succeeded (at-least-once; see the module doc)."""
    raw = raw_client(redis)
    result = ReplayResult()
    chunk: list[tuple[str, str, dict[str, bytes]]] = []

    async def flush() -> None:
        if not chunk:
            return
        pipe = raw.pipeline(transaction=False)
        for _id, target, fields in chunk:
            pipe.execute_command("XADD", target, "*", *[x for pair in fields.items() for x in pair])
        replies = await pipe.execute(raise_on_error=False)
        done = [entry_id for (entry_id, _t, _f), reply in zip(chunk, replies, strict=True)
                if not isinstance(reply, Exception)]
        failure = next((reply for reply in replies if isinstance(reply, Exception)), None)
        if done:
            await command(raw, "XDEL", dlq, *done)
        for (_id, target, _f), reply in zip(chunk, replies, strict=True):
            if not isinstance(reply, Exception):
                result.replayed += 1
                result.targets[target] += 1
        chunk.clear()
        if failure is not None:
            raise failure

    # Read everything selected first: entries are deleted as we go, and a page-wise read
    # that deleted behind itself would be correct too, but a fixed list keeps --limit exact.
    selected = [e async for e in entries(redis, dlq, limit=limit, reason=reason, ids=ids)]
    for entry in selected:
        if entry.letter is None or not entry.letter.fields:
            result.skipped += 1
            continue
        target = to or origin_of(dlq, entry.letter)
        chunk.append((entry.id, target, dict(entry.letter.fields)))
        if len(chunk) >= batch:
            await flush()
    await flush()
    return result


async def purge(redis: aioredis.Redis, dlq: str, *, limit: int | None = None, reason: str | None = None,
                ids: Sequence[str] = ()) -> int:
    """Delete selected entries (all when nothing is selected); returns how many."""
    raw = raw_client(redis)
    if limit is None and reason is None and not ids:
        return int(await command(raw, "XTRIM", dlq, "MAXLEN", 0))
    deleted = 0
    pending: list[str] = []
    async for entry in entries(redis, dlq, limit=limit, reason=reason, ids=ids):
        pending.append(entry.id)
        if len(pending) >= 500:
            deleted += int(await command(raw, "XDEL", dlq, *pending))
            pending.clear()
    if pending:
        deleted += int(await command(raw, "XDEL", dlq, *pending))
    return deleted


# --- command line -------------------------------------------------------------------------


def _print_entry(entry: DlqEntry, out: TextIO) -> None:
    data = entry.to_json()
    if "error" in data:
        out.write(f"{entry.id}  UNREADABLE: {data['error']}\n")
        return
    out.write(f"{entry.id}  {data['time'] or '?'}  attempts {data['attempts']}  from {data['source_stream'] or '?'}"
              f"{'/' + data['source_id'] if data['source_id'] else ''}"
              f"{'  by ' + data['consumer'] if data['consumer'] else ''}\n")
    out.write(f"  reason: {data['reason']}\n")
    for name, value in data["fields"].items():
        out.write(f"  {name}: {orjson.dumps(value).decode()[:2000]}\n")


async def run_dlq(redis: aioredis.Redis, action: str, *, streams: Sequence[str] = (), prefix: str = "",
                  count: int | None = None, reason: str | None = None, ids: Sequence[str] = (),
                  to: str | None = None, yes: bool = False, as_json: bool = False,
                  out: TextIO | None = None) -> int:
    """The ``psky dlq`` actions; returns the exit status."""
    from psky.errors import UserError

    out = out or sys.stdout
    if action == "list":
        names = [prefix + s for s in streams] if streams else await dlq_names(redis, prefix)
        summaries = [await summarize(redis, n) for n in names]
        if as_json:
            out.write(orjson.dumps([s.to_json() for s in summaries]).decode() + "\n")
            return 0
        for s in summaries:
            when = f"  ({s.first_time} … {s.last_time})" if s.first_time else ""
            out.write(f"{s.stream}: {s.length:,} entries{when}\n")
            for reason_text, n in s.reasons.most_common(20):
                out.write(f"  {n:>8,}  {reason_text}\n")
            if len(s.reasons) > 20:
                out.write(f"  … {len(s.reasons) - 20} more reasons\n")
            if s.scanned < s.length:
                out.write(f"  (reasons counted over the first {s.scanned:,} entries)\n")
        return 0
    if len(streams) != 1:
        raise UserError(f"dlq {action}: name one dead-letter stream, e.g. repo_backfill_dlq", 2)
    dlq = prefix + streams[0]
    if not dlq.endswith("_dlq") and to is None and action == "replay":
        raise UserError(f"{dlq} is not a dead-letter stream (<stream>_dlq); pass --to to replay it anyway", 2)
    if action == "show":
        shown = 0
        async for entry in entries(redis, dlq, limit=count if count is not None else 10, reason=reason, ids=ids):
            shown += 1
            if as_json:
                out.write(orjson.dumps(entry.to_json()).decode() + "\n")
            else:
                _print_entry(entry, out)
        if not shown and not as_json:
            out.write(f"{dlq}: no matching entries\n")
        return 0
    if action == "replay":
        result = await replay(redis, dlq, to=prefix + to if to else None, limit=count,
                              reason=reason, ids=ids)
        summary = {"replayed": result.replayed, "skipped": result.skipped, "targets": dict(result.targets)}
        if as_json:
            out.write(orjson.dumps(summary).decode() + "\n")
        else:
            where = ", ".join(f"{n:,} to {t}" for t, n in result.targets.items()) or "nothing"
            out.write(f"{dlq}: replayed {where}"
                      + (f"; {result.skipped} unreadable entries left in place" if result.skipped else "") + "\n")
        return 0
    if action == "purge":
        if not yes:
            raise UserError(f"dlq purge deletes entries of {dlq} for good: add --yes", 2)
        deleted = await purge(redis, dlq, limit=count, reason=reason, ids=ids)
        if as_json:
            out.write(orjson.dumps({"deleted": deleted}).decode() + "\n")
        else:
            out.write(f"{dlq}: deleted {deleted:,} entries\n")
        return 0
    raise UserError(f"dlq: unknown action {action!r}", 2)
