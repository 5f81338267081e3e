"""Batched, back-pressured stream writes (the ingester's and backfiller's output side).

:class:`StreamWriter` buffers entries and writes each batch with one Lua script call
(``XADD`` × n, then the cursor ``SET`` s that the batch covers, then ``XLEN``). The script
stops at the first failing command, so a cursor is never stored unless every event it covers
is, and one call per batch costs the client far less than a pipeline of n commands (about
2.5× the throughput). The ``XLEN`` at the end of each batch feeds the high-water mark: while
the stream is at or above it, :meth:`StreamWriter.wait_below_high_water_mark` (and so
:meth:`StreamWriter.add` once a batch is full) waits, polling ``XLEN`` with growing
intervals, and the caller stops reading its source. Memory is bounded by one batch per writer.
In Redis Cluster all keys of one writer (its streams and cursor keys) must share a hash slot.

Delivery is at least once: a batch whose reply is lost (connection cut after Redis ran it)
is written again, so duplicates are possible; every psky consumer treats them as harmless
(indexing is idempotent and rev-guarded, backfills are repeatable). Nothing that has not been
written is ever covered by a stored cursor, so a crash loses nothing the source cannot replay.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Self

import redis.asyncio as aioredis

from psky._aio import cancel_and_wait
from psky.streams._redis import Backoff, LuaScript, command, is_transient, raw_client

__all__ = ["StreamWriter", "WriterStats"]

log = logging.getLogger(__name__)

# One script call per batch, with the entries packed into two arguments: a header of
# little-endian uint32s (per entry: key index, field count, then per field: name length,
# value length) and the concatenated names and values. The client then encodes 3 arguments
# instead of ~4 per entry (redis-py's argument packing is most of the client's cost: ~7 µs
# per event with one argument each, ~2.5 µs packed). The cursors are SET only after every
# XADD succeeded (a failing redis.call aborts the script). Returns {added, XLEN KEYS[1]}.
# ARGV: ncursors, (key index, value) per cursor, header, blob.
_WRITE_SCRIPT = LuaScript("""
local ncursors = tonumber(ARGV[1])
local header, blob = ARGV[2 + 2 * ncursors], ARGV[3 + 2 * ncursors]
local hpos, bpos, hlen, added = 1, 1, #header, 0
local key, nfields, nlen, vlen
while hpos <= hlen do
  key, nfields, hpos = struct.unpack('<I4I4', header, hpos)
  local args = {KEYS[key], '*'}
  for f = 1, nfields do
    nlen, vlen, hpos = struct.unpack('<I4I4', header, hpos)
    args[#args + 1] = string.sub(blob, bpos, bpos + nlen - 1)
    bpos = bpos + nlen
    args[#args + 1] = string.sub(blob, bpos, bpos + vlen - 1)
    bpos = bpos + vlen
  end
  redis.call('XADD', unpack(args))
  added = added + 1
end
for c = 0, ncursors - 1 do
  redis.call('SET', KEYS[tonumber(ARGV[2 + 2 * c])], ARGV[3 + 2 * c])
end
return {added, redis.call('XLEN', KEYS[1])}
""")
_NAMES: dict[str, bytes] = {}
_U32 = next(code for code in "IL" if array(code).itemsize == 4)


def _name_bytes(name: str) -> bytes:
    encoded = _NAMES.get(name)
    if encoded is None:
        encoded = name.encode()
        if len(_NAMES) < 256:
            _NAMES[name] = encoded
    return encoded


def _value_bytes(value: FieldValue) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError(f"stream field values are bytes, str or numbers, not {type(value).__name__}")


FieldValue = bytes | bytearray | memoryview | str | int | float


@dataclass(slots=True)
class WriterStats:
    written: int = 0  # entries written (a retried batch counts once)
    batches: int = 0
    cursors_written: int = 0
    retries: int = 0  # batch attempts that failed transiently and were repeated
    backpressure_waits: int = 0  # times a write had to wait for the high-water mark
    backpressure_seconds: float = 0.0
    stream_length: int | None = None  # last XLEN seen


class StreamWriter:
    """Buffered writer for one stream (entries may name another stream with ``stream=``).

    ``high_water_mark`` (checked on the writer's own stream only) of None or 0 disables
    backpressure. ``batch_timeout_ms`` is the
    longest an entry waits in the buffer when :meth:`start` (or ``async with``) runs the
    flush timer; without it, call :meth:`flush` yourself. Transient errors (connection
    loss, LOADING, OOM when Redis is full…) are retried with backoff forever when ``retry``
    is set, which is what a service wants: it stops reading its source until Redis is back.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str,
        *,
        high_water_mark: int | None = 100_000,
        batch_size: int = 500,
        batch_timeout_ms: int = 100,
        retry: bool = True,
        poll_min_ms: int = 20,
        poll_max_ms: int = 1000,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if batch_timeout_ms < 1:
            raise ValueError("batch_timeout_ms must be at least 1")
        if high_water_mark is not None and high_water_mark < 0:
            raise ValueError("high_water_mark must not be negative")
        self.stream = stream
        self.high_water_mark = high_water_mark or None
        self.batch_size = batch_size
        self.batch_timeout = batch_timeout_ms / 1000.0
        self.retry = retry
        self._poll_min = poll_min_ms / 1000.0
        self._poll_max = poll_max_ms / 1000.0
        self._raw = raw_client(redis)
        self._buffer: list[tuple[str, Mapping[str, FieldValue]]] = []
        self._cursors: dict[str, str] = {}
        self._first_at: float | None = None  # monotonic time the oldest buffered item arrived
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self.stats = WriterStats()

    # -- buffering

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def add(self, fields: Mapping[str, FieldValue], *, stream: str | None = None) -> None:
        """Queue one entry; when the batch is full, write it (waiting at the high-water mark)."""
        self._buffer.append((stream or self.stream, fields))
        if self._first_at is None:
            self._first_at = time.monotonic()
        if len(self._buffer) >= self.batch_size:
            await self.flush()

    async def add_many(
        self, entries: Iterable[Mapping[str, FieldValue]], *, stream: str | None = None
    ) -> None:
        """:meth:`add` for each entry, without a coroutine call per entry."""
        key = stream or self.stream
        size = self.batch_size
        for fields in entries:
            self._buffer.append((key, fields))
            if self._first_at is None:
                self._first_at = time.monotonic()
            if len(self._buffer) >= size:
                await self.flush()

    def set_cursor_after(self, key: str, value: str | int) -> None:
        """Store ``key = value`` once every entry added so far is written (in the same
        transaction as the last of them). A later value for the same key replaces an
        unwritten earlier one; it is written by the next flush even if no entry follows."""
        self._cursors[key] = str(value)
        if self._first_at is None:
            self._first_at = time.monotonic()

    # -- writing

    async def flush(self, *, wait_for_room: bool = True) -> None:
        """Write everything buffered now (no-op when empty). On a non-retried error the
        batch goes back to the front of the buffer and the error propagates.
        ``wait_for_room=False`` writes even at the high-water mark (the final flush)."""
        async with self._lock:
            if not self._buffer and not self._cursors:
                return
            batch, cursors = self._buffer, self._cursors
            self._buffer, self._cursors, self._first_at = [], {}, None
            try:
                await self._write(batch, cursors, wait_for_room)
            except BaseException:
                self._buffer = batch + self._buffer
                self._cursors = {**cursors, **self._cursors}
                if self._first_at is None:
                    self._first_at = time.monotonic()
                raise

    async def _write(
        self, batch: list[tuple[str, Mapping[str, FieldValue]]], cursors: dict[str, str], wait_for_room: bool
    ) -> None:
        keys, args = self._script_arguments(batch, cursors)
        backoff = Backoff(0.05, 5.0)
        while True:
            if wait_for_room:
                await self.wait_below_high_water_mark()
            try:
                reply = await _WRITE_SCRIPT(self._raw, keys, args)
            except Exception as e:
                if not (self.retry and is_transient(e)):
                    raise
                self.stats.retries += 1
                delay = backoff.next_delay()
                log.warning(
                    "stream write failed, retrying",
                    extra={
                        "stream": self.stream,
                        "entries": len(batch),
                        "error": str(e),
                        "retry_in_s": round(delay, 3),
                    },
                )
                await asyncio.sleep(delay)
                continue
            break
        self.stats.stream_length = int(reply[1])
        self.stats.written += len(batch)
        self.stats.batches += 1
        self.stats.cursors_written += len(cursors)

    def _script_arguments(
        self, batch: list[tuple[str, Mapping[str, FieldValue]]], cursors: dict[str, str]
    ) -> tuple[list[str], list[bytes | str | int]]:
        """KEYS = [main stream, other streams…, cursor keys…]; ARGV as the script reads it."""
        keys = [self.stream]
        index = {self.stream: 1}
        args: list[bytes | str | int] = [len(cursors)]
        for key, cursor in cursors.items():
            keys.append(key)
            args += (len(keys), cursor)
        ints: list[int] = []
        parts: list[bytes] = []
        for stream, fields in batch:
            key_index = index.get(stream)
            if key_index is None:
                keys.append(stream)
                key_index = index[stream] = len(keys)
            ints += (key_index, len(fields))
            for name, value in fields.items():
                name_b = _name_bytes(name)
                value_b = value if type(value) is bytes else _value_bytes(value)
                ints += (len(name_b), len(value_b))
                parts += (name_b, value_b)
        header = array(_U32, ints)
        if sys.byteorder != "little":
            header.byteswap()
        args += (header.tobytes(), b"".join(parts))
        return keys, args

    async def wait_below_high_water_mark(self) -> None:
        """Return once the stream is below the high-water mark.

        Free when the last batch's ``XLEN`` was already below it; otherwise polls ``XLEN``
        (``poll_min_ms`` doubling up to ``poll_max_ms``) until consumers drained enough.
        Callers use it to stop reading their source while Redis is full. Cancellable.
        """
        mark = self.high_water_mark
        if mark is None:
            return
        known = self.stats.stream_length
        if known is not None and known < mark:
            return
        started = time.monotonic()
        delay, waited, backoff = self._poll_min, False, Backoff(0.05, 5.0)
        while True:
            try:
                length = int(await command(self._raw, "XLEN", self.stream))
            except Exception as e:
                if not is_transient(e):
                    raise
                log.warning("stream length check failed", extra={"stream": self.stream, "error": str(e)})
                await backoff.sleep()
                continue
            self.stats.stream_length = length
            if length < mark:
                break
            if not waited:
                waited = True
                self.stats.backpressure_waits += 1
                log.info(
                    "stream at high-water mark, waiting",
                    extra={"stream": self.stream, "length": length, "high_water_mark": mark},
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._poll_max)
        if waited:
            elapsed = time.monotonic() - started
            self.stats.backpressure_seconds += elapsed
            log.info(
                "stream below high-water mark again",
                extra={"stream": self.stream, "waited_s": round(elapsed, 3)},
            )

    # -- flush timer

    async def _tick(self) -> None:
        while True:
            first = self._first_at
            wait = self.batch_timeout if first is None else first + self.batch_timeout - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            try:
                await self.flush()
            except Exception:
                # add()/close() will surface the error to the owner; keep the timer alive
                log.exception("timed stream flush failed", extra={"stream": self.stream})
                await asyncio.sleep(self.batch_timeout)

    def start(self) -> None:
        """Run the flush timer (entries wait at most ``batch_timeout_ms``)."""
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(self._tick(), name=f"flush:{self.stream}")

    async def close(self) -> None:
        """Stop the timer and write what is buffered, even at the high-water mark (one batch
        past it at most), so a stop under backpressure still saves the cursor at once."""
        if self._timer is not None:
            await cancel_and_wait(self._timer)
            self._timer = None
        await self.flush(wait_for_room=False)

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.close()
        elif self._timer is not None:  # failing: do not block on Redis, just stop the timer
            await cancel_and_wait(self._timer)
            self._timer = None
