"""StreamWriter with ``pipeline=True``: a full batch is written in the background while the
next one fills; order, cursors and failures must behave as with the plain writer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from psky.streams import StreamWriter, connect


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = connect(redis_url)
    yield r
    await r.aclose()


async def values(client: aioredis.Redis, stream: str) -> list[bytes]:
    rows: Any = await client.xrange(stream)
    return [fields[b"event"] for _, fields in rows]


async def test_pipelined_batches_in_order_with_their_cursors(client: aioredis.Redis, redis_prefix: str) -> None:
    stream, key = f"{redis_prefix}s", f"{redis_prefix}s:cursor:h"
    writer = StreamWriter(client, stream, batch_size=3, high_water_mark=None, pipeline=True)
    for i in range(1, 7):
        await writer.add({"event": str(i).encode()})
        writer.set_cursor_after(key, i)
    # the sixth add filled the second batch, so it waited for the first one to be written
    assert await client.xlen(stream) >= 3
    assert int(await client.get(key) or 0) >= 2  # the cursor set before the first batch was full
    for i in range(7, 11):
        await writer.add({"event": str(i).encode()})
        writer.set_cursor_after(key, i)
    await writer.close()
    assert await values(client, stream) == [str(i).encode() for i in range(1, 11)]
    assert await client.get(key) == b"10"
    assert writer.stats.written == 10 and writer.buffered == 0


async def test_pipelined_failure_raised_by_next_full_batch(client: aioredis.Redis, redis_prefix: str) -> None:
    """A batch failing in the background is back in the buffer; no later cursor gets ahead of it."""
    stream, broken, key = f"{redis_prefix}s", f"{redis_prefix}not-a-stream", f"{redis_prefix}s:cursor:h"
    await client.set(broken, "string value")
    writer = StreamWriter(client, stream, batch_size=2, high_water_mark=None, retry=False, pipeline=True)
    await writer.add({"event": b"1"})
    await writer.add({"event": b"2"}, stream=broken)  # full: written in the background, fails
    writer.set_cursor_after(key, "2")
    await writer.add({"event": b"3"})
    with pytest.raises(Exception, match="WRONGTYPE"):
        await writer.add({"event": b"4"})  # full again: waits for the failed batch
    writer.set_cursor_after(key, "4")
    assert await client.get(key) is None
    assert writer.buffered == 4
    await client.delete(broken)
    await writer.flush()  # everything again, in order (the first event twice: at least once)
    assert await client.get(key) == b"4"
    assert await values(client, stream) == [b"1", b"1", b"3", b"4"]
    assert await values(client, broken) == [b"2"]


async def test_pipelined_flush_after_a_failed_background_batch(client: aioredis.Redis, redis_prefix: str) -> None:
    """flush() waits for the batch in flight and writes it again when it failed."""
    stream, broken = f"{redis_prefix}s", f"{redis_prefix}not-a-stream"
    await client.set(broken, "string value")
    writer = StreamWriter(client, stream, batch_size=2, high_water_mark=None, retry=False, pipeline=True)
    await writer.add({"event": b"1"}, stream=broken)
    await writer.add({"event": b"2"})  # full: fails in the background
    with pytest.raises(Exception, match="WRONGTYPE"):
        await writer.flush()  # the same batch again, still failing
    assert writer.buffered == 2
    await client.delete(broken)
    await writer.flush()
    assert writer.buffered == 0
    assert await values(client, broken) == [b"1"] and b"2" in await values(client, stream)


async def test_pipelined_close_writes_the_batch_in_flight(client: aioredis.Redis, redis_prefix: str) -> None:
    stream, key = f"{redis_prefix}s", f"{redis_prefix}s:cursor:h"
    async with StreamWriter(client, stream, batch_size=2, high_water_mark=None, pipeline=True) as writer:
        await writer.add_many({"event": str(i).encode()} for i in range(5))
        writer.set_cursor_after(key, 4)
    assert await values(client, stream) == [str(i).encode() for i in range(5)]
    assert await client.get(key) == b"4"


async def test_pipelined_backpressure_holds_the_caller(client: aioredis.Redis, redis_prefix: str) -> None:
    """At the high-water mark the caller waits (not the background write), so close() never
    waits for room: it writes what is left even above the mark."""
    stream = f"{redis_prefix}s"
    writer = StreamWriter(client, stream, batch_size=5, high_water_mark=5, poll_min_ms=5, poll_max_ms=20,
                          pipeline=True)
    await writer.add_many({"event": str(i).encode()} for i in range(5))  # written in the background
    blocked = asyncio.create_task(writer.add_many({"event": str(i).encode()} for i in range(5, 10)))
    await asyncio.sleep(0.2)
    assert not blocked.done() and await client.xlen(stream) == 5  # the producer is held back
    await client.xtrim(stream, maxlen=2, approximate=False)  # consumers drained three
    await asyncio.wait_for(blocked, 10)
    await writer.add({"event": b"10"})
    await asyncio.wait_for(writer.close(), 10)  # at the mark again: written anyway
    assert await values(client, stream) == [str(i).encode() for i in range(3, 11)]
    assert writer.stats.backpressure_waits >= 1
