"""Stream maintenance and introspection: safe trimming and the figures ``psky status`` shows.

:func:`trim_acknowledged` removes only entries every group is done with. rsky trimmed by
length and so deleted entries still pending in a group, losing them; here the bound is
computed and applied inside one Lua script (atomic against consumers): per group, the oldest
pending id if anything is pending, else the last-delivered id; the stream is trimmed with
``XTRIM MINID`` to the smallest of those, which removes only entries strictly older. A stream
without groups is never trimmed (a consumer that has not started yet still needs it).

:func:`stream_info` reports length, groups, pending counts, consumers with their idle
times, the oldest pending entry and the lag. Redis 7 reports lag itself (``XINFO GROUPS``
``lag``); on Redis 6.2, or when Redis cannot tell, it is counted (entries after the group's
last-delivered id, up to a limit) or estimated (length − pending for a stream's only group).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from psky.streams._redis import LuaScript, as_map, command, raw_client, text

__all__ = ["ConsumerInfo", "GroupInfo", "LagSource", "StreamInfo", "stream_info", "trim_acknowledged"]

#: where a group's lag figure comes from: Redis itself, an exact count, length − pending, or a lower bound
LagSource = Literal["redis", "counted", "estimated", "at_least"]

# Stream ids compare as (ms, seq) pairs of unsigned integers without leading zeros, so
# "shorter is smaller, else lexicographic" on each part is exact (Lua numbers are doubles).
_TRIM_SCRIPT = LuaScript("""
local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then return {0, ''} end
local groups = redis.call('XINFO', 'GROUPS', stream)
if #groups == 0 then return {0, ''} end
local function less(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if #ams ~= #bms then return #ams < #bms end
  if ams ~= bms then return ams < bms end
  if #aseq ~= #bseq then return #aseq < #bseq end
  return aseq < bseq
end
local bound = nil
for _, g in ipairs(groups) do
  local name, last = nil, nil
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local summary = redis.call('XPENDING', stream, name)
  local b = last
  if summary[1] > 0 then b = summary[2] end
  if bound == nil or less(b, bound) then bound = b end
end
local removed
if ARGV[1] == '1' then
  removed = redis.call('XTRIM', stream, 'MINID', '~', bound)
else
  removed = redis.call('XTRIM', stream, 'MINID', bound)
end
return {removed, bound}
""")


async def trim_acknowledged(redis: aioredis.Redis, stream: str, *, approximate: bool = False) -> int:
    """Delete the entries of *stream* that no group still needs; returns how many were removed.

    Never removes an entry pending in any group (even one whose consumer is gone) or one
    not yet delivered to every group. ``approximate`` lets Redis trim whole radix-tree nodes
    only (cheaper on huge streams, removes at most as much).
    """
    reply = await _TRIM_SCRIPT(raw_client(redis), [stream], ["1" if approximate else "0"])
    return int(reply[0])


@dataclass(slots=True)
class ConsumerInfo:
    name: str
    pending: int
    idle_ms: int  # since its last attempted interaction (read, claim, ack…)
    inactive_ms: int | None  # since its last successful read/claim (Redis ≥ 7.2)


@dataclass(slots=True)
class GroupInfo:
    name: str
    pending: int
    last_delivered_id: str
    entries_read: int | None  # Redis ≥ 7
    lag: int | None  # entries not yet delivered to the group
    lag_source: LagSource
    oldest_pending_id: str | None
    oldest_pending_idle_ms: int | None
    oldest_pending_consumer: str | None
    consumers: list[ConsumerInfo] = field(default_factory=list)


@dataclass(slots=True)
class StreamInfo:
    stream: str
    exists: bool
    length: int = 0
    first_id: str | None = None
    last_id: str | None = None
    groups: list[GroupInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


async def _count_after(raw: aioredis.Redis, stream: str, after: str, limit: int) -> tuple[int, bool]:
    """Entries with id > *after*, counted page by page up to *limit*; (count, complete)."""
    count, start = 0, f"({after}"
    while True:
        want = min(1000, limit - count)
        if want <= 0:
            return count, False
        rows = await command(raw, "XRANGE", stream, start, "+", "COUNT", want)
        count += len(rows)
        if len(rows) < want:
            return count, True
        start = f"({text(rows[-1][0])}"


async def stream_info(redis: aioredis.Redis, stream: str, *, lag_scan_limit: int = 10_000) -> StreamInfo:
    """Length, groups, consumers, oldest pending entry and lag of *stream* (see module doc)."""
    raw = raw_client(redis)
    try:
        info = as_map(await command(raw, "XINFO", "STREAM", stream))
    except ResponseError as e:
        if "no such key" in str(e).lower():
            return StreamInfo(stream=stream, exists=False)
        raise
    first, last = info.get("first-entry"), info.get("last-entry")
    result = StreamInfo(
        stream=stream,
        exists=True,
        length=int(info["length"]),
        first_id=text(first[0]) if first else None,
        last_id=text(last[0]) if last else None,
    )
    groups = [as_map(g) for g in await command(raw, "XINFO", "GROUPS", stream)]
    if not groups:
        return result
    pipe = raw.pipeline(transaction=False)
    for g in groups:
        pipe.execute_command("XINFO", "CONSUMERS", stream, g["name"])
        pipe.execute_command("XPENDING", stream, g["name"], "-", "+", 1)
    replies = await pipe.execute()
    for index, g in enumerate(groups):
        consumers_reply, oldest_reply = replies[2 * index], replies[2 * index + 1]
        consumers = [as_map(c) for c in consumers_reply]
        oldest = oldest_reply[0] if oldest_reply else None
        pending = int(g["pending"])
        last_delivered = text(g["last-delivered-id"])
        lag = _opt_int(g.get("lag"))
        source: LagSource = "redis"
        if lag is None:
            counted, complete = await _count_after(raw, stream, last_delivered, lag_scan_limit)
            if complete:
                lag, source = counted, "counted"
            elif len(groups) == 1:
                lag, source = max(counted, result.length - pending), "estimated"
            else:
                lag, source = counted, "at_least"
        result.groups.append(
            GroupInfo(
                name=text(g["name"]),
                pending=pending,
                last_delivered_id=last_delivered,
                entries_read=_opt_int(g.get("entries-read")),
                lag=lag,
                lag_source=source,
                oldest_pending_id=text(oldest[0]) if oldest else None,
                oldest_pending_consumer=text(oldest[1]) if oldest else None,
                oldest_pending_idle_ms=int(oldest[2]) if oldest else None,
                consumers=[
                    ConsumerInfo(
                        name=text(c["name"]),
                        pending=int(c["pending"]),
                        idle_ms=int(c["idle"]),
                        inactive_ms=_opt_int(c.get("inactive")),
                    )
                    for c in consumers
                ],
            )
        )
    return result
