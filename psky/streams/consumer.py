"""Consumer-group reading with claiming, delivery limits, dead letters and phantom cleanup.

One :class:`StreamConsumer` is one member (``consumer``) of a group on one or more streams.
Each :meth:`StreamConsumer.read` returns the next batch, in this order of preference:

1. its own pending entries, once at start (``XREADGROUP … 0``): what a previous run under
   the same consumer name was given and never acknowledged;
2. every ``claim_interval_ms``: pending entries of any member of the group (itself
   included) idle for ``claim_idle_ms`` or more, i.e. given to a consumer that died or
   failed them (``XPENDING … IDLE`` + ``XCLAIM`` each, which atomically re-checks idleness,
   so two claimers never both win);
3. new entries (``XREADGROUP … >``, blocking up to ``block_ms``).

Every redelivered entry carries its delivery count (from ``XPENDING``). One delivered more
than ``max_deliveries`` times is not handed out again: it is written to the dead-letter
stream with the reason (the last error recorded by :meth:`StreamConsumer.fail`, if any) and
acknowledged in the same Lua script, only once its DLQ entry is written, so a poison entry
never blocks a group and a failing DLQ write never loses one.

Phantom pending entries (acknowledgement outstanding but the entry itself deleted, e.g. by
``XDEL`` or a trim) are acknowledged and counted instead of being retried forever: Redis
6.2 reports them as ``[id, nil]`` in history reads and ``nil`` from ``XCLAIM``; Redis 7
drops them from the pending list itself when they are claimed.

Nothing is acknowledged that the caller did not acknowledge, except phantoms (no message to
process) and dead-lettered entries (kept in the DLQ). :meth:`StreamConsumer.stop` ends
iteration after the current batch; entries read but not acknowledged stay pending and are
delivered again (to this consumer name on restart, or to another member once idle).

Acknowledging is ``XACK`` + ``XDEL`` (the TypeScript contract: one group per stream); set
``delete_on_ack=False`` when several groups read the same stream.

Failure reasons recorded by :meth:`StreamConsumer.fail` live in the hash
``<stream>:failures:<group>`` (entry id → last error, 7-day expiry) so that whichever member
finally dead-letters an entry can say why it kept failing.

Acknowledging and dead-lettering run as Lua scripts (one call per stream and batch: atomic,
and far cheaper for the client than n-argument commands). In Redis Cluster a stream, its
DLQ and its failures hash must therefore share a hash slot (hash tags in the names).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from psky._aio import cancel_and_wait
from psky.streams._redis import (
    NEVER_DECODE,
    Backoff,
    LuaScript,
    command,
    is_nogroup,
    is_transient,
    raw_client,
    socket_timeout_ms,
    text,
)
from psky.streams.wire import DeadLetter, dead_letter_fields, dlq_stream_for

__all__ = ["ConsumerStats", "Message", "StreamConsumer", "ensure_group", "failures_key"]

log = logging.getLogger(__name__)

_RAW = {NEVER_DECODE: True}
#: longest failure reason kept per entry
MAX_REASON = 2000
#: failure reasons expire this long after the last one recorded on the stream
FAILURES_TTL_S = 7 * 24 * 3600
_ACK_ATTEMPTS = 5

# Dead letters: XADD every entry to the DLQ first (a failing call aborts the script before
# anything is acknowledged), then XACK (+ XDEL) them and drop their failure reasons.
# KEYS: source stream, DLQ stream, failures hash. ARGV: group, '1' to XDEL, then per entry
# its id, its field count and the fields. Ids go to XACK/XDEL/HDEL in chunks (Lua's unpack limit).
_DEAD_LETTER = LuaScript("""
local group, ids, i, n = ARGV[1], {}, 3, #ARGV
while i <= n do
  local nfields = tonumber(ARGV[i + 1])
  ids[#ids + 1] = ARGV[i]
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, i + 2, i + 1 + 2 * nfields))
  i = i + 2 + 2 * nfields
end
for first = 1, #ids, 1000 do
  local last = math.min(first + 999, #ids)
  redis.call('XACK', KEYS[1], group, unpack(ids, first, last))
  if ARGV[2] == '1' then redis.call('XDEL', KEYS[1], unpack(ids, first, last)) end
  redis.call('HDEL', KEYS[3], unpack(ids, first, last))
end
return #ids
""")

# Acknowledgement: XACK (+ XDEL) the space-separated ids of ARGV[3] on KEYS[1] for group
# ARGV[1] (XDEL when ARGV[2] is '1'), and drop failure reasons (KEYS[2]) of ARGV[4]'s ids.
# One argument for all ids keeps the client's cost per message low (redis-py encodes each
# argument separately; this path is ~3 µs/message cheaper than XACK + XDEL with n ids each).
_ACK = LuaScript("""
local function split(text)
  local ids = {}
  for id in string.gmatch(text, '%S+') do ids[#ids + 1] = id end
  return ids
end
local ids = split(ARGV[3])
for first = 1, #ids, 1000 do
  local last = math.min(first + 999, #ids)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, first, last))
  if ARGV[2] == '1' then redis.call('XDEL', KEYS[1], unpack(ids, first, last)) end
end
local retried = split(ARGV[4])
for first = 1, #retried, 1000 do
  redis.call('HDEL', KEYS[2], unpack(retried, first, math.min(first + 999, #retried)))
end
return #ids
""")

# Field names repeat in every entry: decode each distinct one once.
_FIELD_NAMES: dict[bytes, str] = {}


def _name(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    name = _FIELD_NAMES.get(raw)
    if name is None:
        name = raw.decode("utf-8", "replace")
        if len(_FIELD_NAMES) < 256:
            _FIELD_NAMES[raw] = name
    return name


def _fields(raw: Any) -> dict[str, bytes] | None:
    """An entry's field list (flat, or a map in RESP3) as a dict; None for a deleted entry."""
    if raw is None:
        return None
    if type(raw) is list and len(raw) == 2:  # the usual single-field entry
        return {_name(raw[0]): raw[1]}
    if isinstance(raw, dict):
        return {_name(k): v for k, v in raw.items()}
    it = iter(raw)
    return {_name(k): v for k, v in zip(it, it, strict=False)}


def _by_stream(reply: Any) -> dict[str, list[Any]]:
    """XREADGROUP reply (RESP2 list of [stream, entries] or RESP3 map) → {stream: entries}."""
    if not reply:
        return {}
    if isinstance(reply, dict):
        return {text(k): v for k, v in reply.items()}
    return {text(item[0]): item[1] for item in reply}


def failures_key(stream: str, group: str) -> str:
    return f"{stream}:failures:{group}"


async def ensure_group(redis: aioredis.Redis, stream: str, group: str, start_id: str = "0") -> bool:
    """Create *group* on *stream* (and the stream) unless it exists; True when created.

    New groups start at ``0`` like the TypeScript services', so entries written before the
    first consumer started are not skipped.
    """
    try:
        await command(redis, "XGROUP", "CREATE", stream, group, start_id, "MKSTREAM")
    except ResponseError as e:
        if str(e).startswith("BUSYGROUP"):
            return False
        raise
    return True


@dataclass(slots=True)
class Message:
    """One stream entry handed to the caller; ``deliveries`` counts this delivery too."""

    stream: str
    id: str
    fields: dict[str, bytes]
    deliveries: int = 1


@dataclass(slots=True)
class ConsumerStats:
    delivered: int = 0  # messages handed out (every delivery)
    redelivered: int = 0  # of which not the first delivery (own pending, claimed)
    claimed: int = 0  # taken from idle pending entries of any member
    acked: int = 0
    failed: int = 0
    dead_lettered: int = 0
    phantoms: int = 0  # pending entries whose message was gone, acknowledged


class StreamConsumer:
    """A consumer-group member reading ``streams`` in batches (see the module doc).

    ``batch_size`` is per stream and per read (Redis' COUNT). ``dlq_stream`` None sends dead
    letters of each stream to ``<stream>_dlq``. ``max_deliveries`` None or 0 disables dead
    lettering by count. ``claim_interval_ms`` defaults to half of ``claim_idle_ms``, bounded to
    100 ms … 30 s. ``block_ms`` is kept below the client's socket timeout; 0 never blocks.
    ``claim_idle_ms`` must exceed the longest time a batch may take to handle: an entry idle
    that long is presumed abandoned and handed to another member (this consumer's own
    in-flight entries are never re-claimed by itself).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        streams: Sequence[str],
        group: str,
        consumer: str,
        *,
        batch_size: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        claim_interval_ms: int | None = None,
        max_deliveries: int | None = 5,
        dlq_stream: str | None = None,
        delete_on_ack: bool = True,
    ) -> None:
        if isinstance(streams, str) or not streams:
            raise ValueError("streams must be a non-empty list of stream names")
        if len(set(streams)) != len(streams):
            raise ValueError("streams must not repeat")
        if batch_size < 1 or block_ms < 0 or claim_idle_ms < 1:
            raise ValueError("batch_size and claim_idle_ms must be positive, block_ms not negative")
        if not group or not consumer:
            raise ValueError("group and consumer names must not be empty")
        self.streams = list(streams)
        self.group = group
        self.consumer = consumer
        self.batch_size = batch_size
        self.claim_idle_ms = claim_idle_ms
        interval = (
            claim_interval_ms if claim_interval_ms is not None else min(max(claim_idle_ms // 2, 100), 30_000)
        )
        self.claim_interval = interval / 1000.0
        self.max_deliveries = max_deliveries or None
        self.dlq_stream = dlq_stream
        self.delete_on_ack = delete_on_ack
        self._raw = raw_client(redis)
        timeout = socket_timeout_ms(redis)
        self.block_ms = block_ms if timeout is None else int(min(block_ms, max(timeout - 1000, timeout / 2)))
        self._history: dict[str, str] = dict.fromkeys(self.streams, "0")  # streams still reading own pending
        self._claim_from: dict[str, str] = dict.fromkeys(self.streams, "-")
        self._next_claim = 0.0
        self._inflight: dict[str, set[str]] = {s: set() for s in self.streams}
        self._groups_ready = False
        self._stop = asyncio.Event()
        self.stats = ConsumerStats()

    # -- lifecycle

    async def ensure_groups(self) -> None:
        for stream in self.streams:
            if await ensure_group(self._raw, stream, self.group):
                log.info("created consumer group", extra={"stream": stream, "group": self.group})
        self._groups_ready = True

    def stop(self) -> None:
        """End iteration after the current batch (a blocked read is abandoned at once)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def in_flight(self) -> int:
        """Messages handed out and not yet acknowledged, failed, released or dead-lettered."""
        return sum(len(ids) for ids in self._inflight.values())

    def dlq_for(self, stream: str) -> str:
        return self.dlq_stream or dlq_stream_for(stream)

    def __aiter__(self) -> AsyncIterator[list[Message]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[list[Message]]:
        """Non-empty batches until :meth:`stop`; transient Redis errors are waited out."""
        backoff = Backoff(0.1, 5.0)
        while not self._stop.is_set():
            try:
                batch = await self.read()
            except Exception as e:
                if not is_transient(e):
                    raise
                delay = backoff.next_delay()
                log.warning(
                    "stream read failed, retrying",
                    extra={"group": self.group, "error": str(e), "retry_in_s": round(delay, 3)},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                continue
            backoff.reset()
            if batch:
                yield batch
            elif self.block_ms == 0:  # a non-blocking reader must not spin on an empty stream
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.05)

    # -- reading

    async def read(self) -> list[Message]:
        """The next batch (possibly empty: nothing arrived within ``block_ms``, or everything
        read was a phantom or dead-lettered). Empty at once after :meth:`stop`. Redis errors
        propagate (iterate with ``async for`` to have transient ones waited out)."""
        if self._stop.is_set():
            return []
        try:
            if not self._groups_ready:
                await self.ensure_groups()
            if self._history:
                own = await self._read_own_pending()
                if own or self._history:
                    return own
            now = time.monotonic()
            if now >= self._next_claim:
                self._next_claim = now + self.claim_interval
                claimed = await self._claim_idle()
                if claimed:
                    return claimed
            return await self._read_new()
        except ResponseError as e:
            if not is_nogroup(e):
                raise
            # The stream or group was removed (flush, restart without persistence): recreate
            # it and start over; what is still pending will be seen again.
            log.warning("consumer group missing, recreating", extra={"group": self.group, "error": str(e)})
            self._groups_ready = False
            self._history = dict.fromkeys(self.streams, "0")
            return []

    async def _read_own_pending(self) -> list[Message]:
        streams = list(self._history)
        ids = [self._history[s] for s in streams]
        reply = await command(
            self._raw, "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", self.batch_size,
            "STREAMS", *streams, *ids, raw=True,
        )  # fmt: skip
        by_stream = _by_stream(reply)
        out: list[Message] = []
        for stream in streams:
            entries = by_stream.get(stream) or []
            if len(entries) < self.batch_size:
                del self._history[stream]
            else:
                self._history[stream] = text(entries[-1][0])
            if entries:
                out.extend(await self._own_redeliveries(stream, entries))
        return out

    async def _own_redeliveries(self, stream: str, entries: list[Any]) -> list[Message]:
        """History entries of this consumer: attach delivery counts, settle phantoms."""
        first, last = text(entries[0][0]), text(entries[-1][0])
        rows = await command(
            self._raw, "XPENDING", stream, self.group, first, last, len(entries), self.consumer
        )
        counts = {text(row[0]): int(row[3]) for row in rows}
        messages: list[Message] = []
        phantoms: list[str] = []
        for raw_id, raw_fields in entries:
            entry_id = text(raw_id)
            fields = _fields(raw_fields)
            if fields is None:
                phantoms.append(entry_id)
            elif entry_id in counts:  # absent: claimed away by another member meanwhile
                messages.append(Message(stream, entry_id, fields, counts[entry_id]))
        if phantoms:
            await self._settle_phantoms(stream, phantoms)
        return await self._admit(stream, messages)

    async def _claim_idle(self) -> list[Message]:
        out: list[Message] = []
        for stream in self.streams:
            start = self._claim_from[stream]
            rows = await command(
                self._raw,
                "XPENDING",
                stream,
                self.group,
                "IDLE",
                self.claim_idle_ms,
                start,
                "+",
                self.batch_size,
            )
            self._claim_from[stream] = "-" if len(rows) < self.batch_size else "(" + text(rows[-1][0])
            inflight = self._inflight[stream]
            candidates = [(text(row[0]), int(row[3])) for row in rows if text(row[0]) not in inflight]
            if not candidates:
                continue
            pipe = self._raw.pipeline(transaction=False)
            for entry_id, _ in candidates:
                # min-idle makes each claim atomic against other claimers; the count is bumped
                pipe.execute_command(
                    "XCLAIM", stream, self.group, self.consumer, self.claim_idle_ms, entry_id, **_RAW
                )
            replies = await pipe.execute()
            messages: list[Message] = []
            phantoms: list[str] = []
            for (entry_id, count), reply in zip(candidates, replies, strict=True):
                if not reply:
                    continue  # acknowledged or claimed by someone else meanwhile; or deleted (Redis 7)
                entry = reply[0]
                fields = None if entry is None else _fields(entry[1])
                if fields is None:
                    phantoms.append(entry_id)  # Redis 6.2: claimed, but the message is gone
                else:
                    messages.append(Message(stream, entry_id, fields, count + 1))
            self.stats.claimed += len(messages)
            if messages:
                log.info(
                    "claimed idle pending entries",
                    extra={"stream": stream, "group": self.group, "count": len(messages)},
                )
            if phantoms:
                await self._settle_phantoms(stream, phantoms)
            out.extend(await self._admit(stream, messages))
        return out

    async def _read_new(self) -> list[Message]:
        args: list[str | int] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", self.batch_size]
        if self.block_ms > 0:  # BLOCK 0 would mean "forever"
            args += ["BLOCK", self.block_ms]
        args += ["STREAMS", *self.streams, *(">" for _ in self.streams)]
        read = asyncio.ensure_future(command(self._raw, *args, raw=True))
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((read, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not read.done():
            # Stopping: abandon the blocked read. Anything Redis delivered to it meanwhile
            # stays pending under this consumer and is read again on restart.
            with contextlib.suppress(Exception):
                await cancel_and_wait(read)
            return []
        out: list[Message] = []
        for stream, entries in _by_stream(read.result()).items():
            inflight = self._inflight.get(stream)
            if inflight is None:
                continue
            for raw_id, raw_fields in entries:
                fields = _fields(raw_fields)
                if fields is not None:
                    entry_id = raw_id.decode() if type(raw_id) is bytes else text(raw_id)
                    out.append(Message(stream, entry_id, fields))
                    inflight.add(entry_id)
        self.stats.delivered += len(out)
        return out

    async def _admit(self, stream: str, messages: list[Message]) -> list[Message]:
        """Hand out redelivered messages, dead-lettering those over the delivery limit."""
        limit = self.max_deliveries
        over = [m for m in messages if limit is not None and m.deliveries > limit]
        if over:
            key = failures_key(stream, self.group)
            reasons = await command(self._raw, "HMGET", key, *(m.id for m in over))
            by_reason: dict[str, list[Message]] = {}
            for message, last_error in zip(over, reasons, strict=True):
                reason = f"delivered {message.deliveries} times without acknowledgement (max {limit})"
                if last_error:
                    reason += f"; last error: {text(last_error)}"
                by_reason.setdefault(reason, []).append(message)
            for reason, group in by_reason.items():
                await self.dead_letter(group, reason)
            messages = [m for m in messages if m.deliveries <= limit]  # type: ignore[operator]
        self._inflight[stream].update(m.id for m in messages)
        self.stats.delivered += len(messages)
        self.stats.redelivered += len(messages)
        return messages

    async def _settle_phantoms(self, stream: str, ids: list[str]) -> None:
        pipe = self._raw.pipeline(transaction=False)
        pipe.execute_command("XACK", stream, self.group, *ids)
        pipe.execute_command("HDEL", failures_key(stream, self.group), *ids)
        await pipe.execute()
        self.stats.phantoms += len(ids)
        log.warning(
            "acknowledged pending entries whose messages were deleted",
            extra={"stream": stream, "group": self.group, "count": len(ids), "first_id": ids[0]},
        )

    # -- settling what was handed out

    def _forget(self, messages: Iterable[Message]) -> dict[str, list[Message]]:
        by_stream: dict[str, list[Message]] = {}
        for message in messages:
            by_stream.setdefault(message.stream, []).append(message)
            inflight = self._inflight.get(message.stream)
            if inflight is not None:
                inflight.discard(message.id)
        return by_stream

    async def _retrying(self, call: Callable[[], Awaitable[Any]], what: str) -> None:
        """Settle (ack, fail, dead-letter) with a few retries on transient errors: giving up
        early would only mean a redelivery, but a blip should not cost one."""
        backoff = Backoff(0.02, 1.0)
        for attempt in range(1, _ACK_ATTEMPTS + 1):
            try:
                await call()
                return
            except Exception as e:
                if attempt == _ACK_ATTEMPTS or not is_transient(e):
                    raise
                log.warning(f"{what} failed, retrying", extra={"group": self.group, "error": str(e)})
                await backoff.sleep()

    async def ack(self, messages: Iterable[Message]) -> None:
        """Acknowledge handled messages: XACK (+ XDEL) per stream, one script call each
        (ids passed as one space-separated argument: cheap to send, see :data:`_ACK`)."""
        by_stream = self._forget(messages)
        for stream, group in by_stream.items():
            ids = " ".join([m.id for m in group])
            retried = " ".join([m.id for m in group if m.deliveries > 1])
            keys = [stream, failures_key(stream, self.group)]
            args = [self.group, "1" if self.delete_on_ack else "0", ids, retried]
            await self._retrying(functools.partial(_ACK, self._raw, keys, args), "acknowledgement")
            self.stats.acked += len(group)

    async def ack_ids(self, stream: str, ids: Sequence[str]) -> None:
        """Acknowledge by id (e.g. after a restart that lost the Message objects)."""
        await self.ack(Message(stream, entry_id, {}, 2) for entry_id in ids)

    async def fail(self, messages: Iterable[Message], reason: str, *, retry_in_ms: int | None = None) -> None:
        """Record that handling failed; the messages stay pending and are delivered again once
        idle for ``claim_idle_ms`` (to any member), or after about ``retry_in_ms`` when given
        (at most ``claim_idle_ms``): a scheduled retry that holds no task while waiting."""
        by_stream = self._forget(messages)
        if not by_stream:
            return
        reason = reason[:MAX_REASON]
        pipe = self._raw.pipeline(transaction=False)
        count = 0
        for stream, group in by_stream.items():
            ids = [m.id for m in group]
            count += len(ids)
            key = failures_key(stream, self.group)
            pipe.execute_command("HSET", key, *(part for entry_id in ids for part in (entry_id, reason)))
            pipe.execute_command("EXPIRE", key, FAILURES_TTL_S)
            if retry_in_ms is not None:
                idle = max(0, self.claim_idle_ms - max(0, retry_in_ms))
                pipe.execute_command(
                    "XCLAIM", stream, self.group, self.consumer, 0, *ids, "IDLE", idle, "JUSTID", **_RAW
                )
        await self._retrying(pipe.execute, "failure record")
        self.stats.failed += count

    def release(self, messages: Iterable[Message]) -> None:
        """Give messages back unacknowledged, without a reason (e.g. shutting down mid-batch)."""
        self._forget(messages)

    async def dead_letter(self, messages: Iterable[Message], reason: str) -> None:
        """Move messages to the dead-letter stream with *reason*, then acknowledge them (as
        :meth:`ack` does), in one script per stream: the acknowledgement only happens once every
        dead-letter entry is written, so a failure can leave them pending, never lose them."""
        by_stream = self._forget(messages)
        if not by_stream:
            return
        reason = reason[:MAX_REASON]
        for stream, group in by_stream.items():
            dlq = self.dlq_for(stream)
            args: list[Any] = [self.group, "1" if self.delete_on_ack else "0"]
            for message in group:
                letter = DeadLetter(
                    source_stream=stream, source_id=message.id, group=self.group, consumer=self.consumer,
                    reason=reason, attempts=message.deliveries, fields=message.fields,
                )  # fmt: skip
                fields = dead_letter_fields(letter)
                args += (message.id, len(fields))
                for item in fields.items():
                    args += item
            keys = [stream, dlq, failures_key(stream, self.group)]
            await self._retrying(functools.partial(_DEAD_LETTER, self._raw, keys, args), "dead-lettering")
            self.stats.dead_lettered += len(group)
            log.warning(
                "dead-lettered stream entries",
                extra={
                    "stream": stream,
                    "dlq": dlq,
                    "group": self.group,
                    "ids": [m.id for m in group][:10],
                    "reason": reason,
                },
            )
