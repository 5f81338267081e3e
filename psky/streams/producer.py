"""Batched, back-pressured stream writes (the ingester's and backfiller's output side).

:class:`StreamWriter` buffers entries and writes each batch with one Lua script call
(``XADD`` × n, then the cursor ``SET`` s that the batch covers, then ``XLEN``; a leaner
script when every entry has one field, as psky's do). The script stops at the first failing
command, so a cursor is never stored unless every event it covers
is, and one call per batch costs the client far less than a pipeline of n commands (about
2.5× the throughput). The ``XLEN`` at the end of each batch feeds the high-water mark: while
the stream is at or above it, :meth:`StreamWriter.wait_below_high_water_mark` (and so
:meth:`StreamWriter.add` once a batch is full) waits, polling ``XLEN`` with growing
intervals, and the caller stops reading its source. Memory is bounded by one batch per writer
(two with ``pipeline``).
In Redis Cluster all keys of one writer (its streams and cursor keys) must share a hash slot.

Delivery is at least once: a batch whose reply is lost (connection cut after Redis ran it)
is written again, so duplicates are possible; every psky consumer treats them as harmless
(indexing is idempotent and rev-guarded, backfills are repeatable). Nothing that has not been
written is ever covered by a stored cursor, so a crash loses nothing the source cannot replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from array import array
from collections.abc import Iterable, Mapping, Sequence
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
# The usual batch has one field per entry (``{"event": json}``, a resync request on
# ``repo_backfill`` now and then): it takes a leaner script, one argument per value and no
# unpacking in Lua. Redis spends about half the time per entry (2.4 µs instead of 4.3 on this
# machine) and psky packs an argument for ~0.3 µs (streams._redis.pack_command). Consecutive
# entries for the same stream and field form a run. ARGV: ncursors, (key index, value) per
# cursor, then per run: key index, field name, count, the values.
_RUNS_SCRIPT = LuaScript("""
local ncursors = tonumber(ARGV[1])
local i, n, added = 2 + 2 * ncursors, #ARGV, 0
while i <= n do
  local key, field, count = KEYS[tonumber(ARGV[i])], ARGV[i + 1], tonumber(ARGV[i + 2])
  local last = i + 2 + count
  for j = i + 3, last do
    redis.call('XADD', key, '*', field, ARGV[j])
  end
  added = added + count
  i = last + 1
end
for c = 0, ncursors - 1 do
  redis.call('SET', KEYS[tonumber(ARGV[2 + 2 * c])], ARGV[3 + 2 * c])
end
return {added, redis.call('XLEN', KEYS[1])}
""")
#: pipelined writes: entries added between two yields to the event loop while a batch is written
_YIELD_EVERY = 32
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


def _mark_retrieved(task: asyncio.Task[None]) -> None:
    """A pipelined write's error reaches the next add() or flush(); asyncio need not log it."""
    if not task.cancelled():
        task.exception()


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

    ``pipeline`` writes a full batch in the background while the caller fills the next one
    (at most one batch in flight, batches written in order, each with its cursors): the
    caller's CPU time and Redis's run side by side instead of in turn. A full batch then
    waits for the previous one, whose failure :meth:`add` raises (that batch is back at the
    front of the buffer, as after a failed :meth:`flush`); :meth:`flush` and :meth:`close`
    wait for it and write it again if it failed. Memory is bounded by two batches.
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
        pipeline: bool = False,
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
        self.pipeline = pipeline
        self._in_flight: asyncio.Task[None] | None = None  # pipelined: the batch being written
        # pipelined: a full batch taken from the buffer, not yet written (older than the buffer)
        self._pending: tuple[list[tuple[str, Mapping[str, FieldValue]]], dict[str, str]] | None = None
        self._next_yield_at = sys.maxsize  # pipelined: buffer length at which to yield next
        self.stats = WriterStats()

    # -- buffering

    @property
    def buffered(self) -> int:
        return len(self._buffer) + (len(self._pending[0]) if self._pending is not None else 0)

    async def add(self, fields: Mapping[str, FieldValue], *, stream: str | None = None) -> None:
        """Queue one entry; when the batch is full, write it (waiting at the high-water mark)."""
        self._buffer.append((stream or self.stream, fields))
        if self._first_at is None:
            self._first_at = time.monotonic()
        if len(self._buffer) >= self.batch_size:
            await self._batch_full()
        elif len(self._buffer) >= self._next_yield_at:
            await self._let_write_progress()

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
                await self._batch_full()
        if len(self._buffer) >= self._next_yield_at:
            await self._let_write_progress()

    def add_many_nowait(self, entries: Sequence[Mapping[str, FieldValue]], *, stream: str | None = None) -> bool:
        """:meth:`add_many` when it would not await (the batch stays short of full and of
        the next yield): True when the entries were added, False when nothing was (the
        caller then awaits :meth:`add_many`). Saves a coroutine per call on a hot path."""
        buffer = self._buffer
        if len(buffer) + len(entries) >= min(self.batch_size, self._next_yield_at):
            return False
        key = stream or self.stream
        buffer += [(key, fields) for fields in entries]
        if self._first_at is None:
            self._first_at = time.monotonic()
        return True

    async def _let_write_progress(self) -> None:
        """Yield to the event loop now and then while a pipelined batch is being written.

        A caller whose input is always ready (a busy relay) never waits, so the loop would
        not run the write (the rest of a large send, Redis's reply) until the next batch is
        full and the overlap would be lost; one yield per ``_YIELD_EVERY`` entries keeps it
        going at the cost of a few loop iterations per batch."""
        if self._in_flight is None or self._in_flight.done():
            self._next_yield_at = sys.maxsize
            return
        self._next_yield_at = len(self._buffer) + _YIELD_EVERY
        await asyncio.sleep(0)

    async def _batch_full(self) -> None:
        """Write the full batch: at once, or (``pipeline``) in the background once the
        previous batch is written, so that the caller fills the next batch meanwhile."""
        if not self.pipeline:
            await self.flush()
            return
        task, self._in_flight = self._in_flight, None
        if task is not None:
            await task  # its error is the caller's (its batch is back in the buffer)
        # the caller waits at the high-water mark, not the write: close() never waits for room
        await self.wait_below_high_water_mark()
        # taken now, written in order: whoever holds the lock next writes it before the buffer
        self._pending = (self._buffer, self._cursors)
        self._buffer, self._cursors, self._first_at = [], {}, None
        task = asyncio.get_running_loop().create_task(self._flush_buffer(False, pending_only=True),
                                                      name=f"write:{self.stream}")
        task.add_done_callback(_mark_retrieved)
        self._in_flight = task
        self._next_yield_at = _YIELD_EVERY
        await asyncio.sleep(0)  # let it send the batch now; Redis runs it while the caller goes on

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
        task = self._in_flight
        if task is not None:
            # a batch that failed in the background is back in the buffer: written again below,
            # so this flush's outcome replaces that error (waiting never cancels the write)
            await asyncio.wait((task,))
            if self._in_flight is task:
                self._in_flight = None
        await self._flush_buffer(wait_for_room)

    async def _flush_buffer(self, wait_for_room: bool, *, pending_only: bool = False) -> None:
        async with self._lock:
            batch: list[tuple[str, Mapping[str, FieldValue]]] = []
            cursors: dict[str, str] = {}
            if self._pending is not None:  # older than the buffer
                (batch, cursors), self._pending = self._pending, None
            if not pending_only and (self._buffer or self._cursors):
                batch = batch + self._buffer if batch else self._buffer
                cursors = {**cursors, **self._cursors} if cursors else self._cursors
                self._buffer, self._cursors, self._first_at = [], {}, None
            if not batch and not cursors:
                return
            try:
                await self._write(batch, cursors, wait_for_room)
            except BaseException:
                if self._pending is not None:  # taken meanwhile, newer than this batch
                    (later, later_cursors), self._pending = self._pending, None
                    batch, cursors = batch + later, {**cursors, **later_cursors}
                self._buffer = batch + self._buffer
                self._cursors = {**cursors, **self._cursors}
                if self._first_at is None:
                    self._first_at = time.monotonic()
                raise

    async def _write(
        self, batch: list[tuple[str, Mapping[str, FieldValue]]], cursors: dict[str, str], wait_for_room: bool
    ) -> None:
        script, keys, args = self._script_arguments(batch, cursors)
        backoff = Backoff(0.05, 5.0)
        while True:
            if wait_for_room:
                await self.wait_below_high_water_mark()
            try:
                reply = await script(self._raw, keys, args)
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
    ) -> tuple[LuaScript, list[str], list[bytes | str | int]]:
        """The script for *batch* and its KEYS = [main stream, cursor keys…, other streams…]
        and ARGV as the script reads them."""
        keys = [self.stream]
        args: list[bytes | str | int] = [len(cursors)]
        for key, cursor in cursors.items():
            keys.append(key)
            args += (len(keys), cursor)
        runs = self._runs(batch, keys)
        if runs is not None:
            return _RUNS_SCRIPT, keys, args + runs
        index = {self.stream: 1}
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
        return _WRITE_SCRIPT, keys, args

    def _runs(self, batch: list[tuple[str, Mapping[str, FieldValue]]], keys: list[str]) -> list[bytes | str | int] | None:
        """``_RUNS_SCRIPT``'s runs for a batch of single-field entries (streams other than
        the writer's appended to *keys*); None when an entry has another number of fields."""
        out: list[bytes | str | int] = []
        index = {self.stream: 1}
        run_stream: str | None = None
        run_field = ""
        values: list[bytes] = []
        for stream, fields in batch:
            if len(fields) != 1:
                return None
            for name, value in fields.items():
                if stream != run_stream or name != run_field:
                    if values:
                        out += (index[run_stream], run_field, len(values))  # type: ignore[index]
                        out += values
                        values = []
                    if stream not in index:
                        keys.append(stream)
                        index[stream] = len(keys)
                    run_stream, run_field = stream, name
                values.append(value if type(value) is bytes else _value_bytes(value))
        if values:
            out += (index[run_stream], run_field, len(values))  # type: ignore[index]
            out += values
        return out

    def below_high_water_mark(self) -> bool:
        """Whether :meth:`wait_below_high_water_mark` would return at once (no await)."""
        mark = self.high_water_mark
        known = self.stats.stream_length
        return mark is None or (known is not None and known < mark)

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
        else:  # failing: do not block on Redis, just stop the timer (and a pipelined write)
            if self._timer is not None:
                await cancel_and_wait(self._timer)
                self._timer = None
            if self._in_flight is not None:
                with contextlib.suppress(Exception):  # the error being raised is the one to see
                    await cancel_and_wait(self._in_flight)
                self._in_flight = None
