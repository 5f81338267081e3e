"""Stream machinery throughput on one process: producing, consuming, the wire format.

Prints events/s for
  - StreamWriter (one Lua call per batch of --batch events), against a plain redis-py
    pipeline of --batch XADDs as the baseline DESIGN.md measured (~50k/s here);
  - StreamConsumer read + ack (XACK + XDEL) in batches of --batch (DESIGN.md: 85-100k/s for
    raw XREADGROUP + XACK/XDEL), without and with parsing every event;
  - encode_event / parse_stream_event alone (no Redis);
  - a writer held at its high-water mark while a consumer drains (sustained throughput
    with backpressure on);
and the Redis server version. Realistic events: a like record, ~560 bytes of JSON.

Redis: ``REDIS_URL`` if set, else an embedded Redis 6.2 in a temporary directory.
Usage: python benchmarks/bench_streams.py [--events 200000] [--batch 500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from psky.ops.embedded import EmbeddedServices
from psky.streams import (
    RecordEvent,
    StreamConsumer,
    StreamWriter,
    connect,
    encode_event,
    event_fields,
    parse_stream_event,
)

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"


def make_event(i: int) -> RecordEvent:
    return RecordEvent(
        type="create",
        seq=1_000_000 + i,
        time="2024-09-10T12:00:00.000Z",
        did=DID,
        commit=CID,
        rev="3l3qo2vutsw2b",
        collection="app.bsky.feed.like",
        rkey=f"3l3qo2vu{i:05d}",
        cid=CID,
        record={
            "$type": "app.bsky.feed.like",
            "subject": {"uri": f"at://{DID}/app.bsky.feed.post/3l3qo2vutsw2b", "cid": CID},
            "createdAt": "2024-09-10T12:00:00.000Z",
        },
    )


@contextlib.asynccontextmanager
async def redis_url() -> AsyncIterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with tempfile.TemporaryDirectory(prefix="psky-bench-") as tmp:
        async with EmbeddedServices(tmp, redis=True, postgres=False) as services:
            yield services.redis_url()


def rate(n: int, seconds: float, cpu: float | None = None) -> str:
    text = f"{n / seconds:>10,.0f}/s"
    return text if cpu is None else f"{text}   client CPU {cpu / n * 1e6:5.2f} µs/event"


class Timer:
    """Wall and process CPU time of a block (the client's CPU is what a service pays; the
    wall rate also depends on Redis, which shares this machine's cores)."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


async def bench_writer(client: aioredis.Redis, stream: str, payloads: list[bytes], batch: int) -> Timer:
    writer = StreamWriter(client, stream, batch_size=batch, high_water_mark=None)
    with Timer() as timer:
        for payload in payloads:
            await writer.add({"event": payload})
        await writer.flush()
    return timer


async def bench_pipeline(client: aioredis.Redis, stream: str, payloads: list[bytes], batch: int) -> Timer:
    with Timer() as timer:
        for start in range(0, len(payloads), batch):
            pipe = client.pipeline(transaction=False)
            for payload in payloads[start : start + batch]:
                pipe.xadd(stream, {"event": payload})
            await pipe.execute()
    return timer


async def bench_consumer(client: aioredis.Redis, stream: str, n: int, batch: int, *, parse: bool) -> Timer:
    consumer = StreamConsumer(client, [stream], "bench_group", "bench", batch_size=batch, block_ms=100)
    seen = 0
    with Timer() as timer:
        while seen < n:
            messages = await consumer.read()
            if parse:
                for message in messages:
                    parse_stream_event(message.fields)
            await consumer.ack(messages)
            seen += len(messages)
    return timer


async def bench_backpressure(
    client: aioredis.Redis, stream: str, payloads: list[bytes], batch: int
) -> tuple[float, int]:
    """Writer capped at 5 batches; a consumer drains concurrently. Returns (seconds, max XLEN seen)."""
    mark = 5 * batch
    writer = StreamWriter(
        client, stream, batch_size=batch, high_water_mark=mark, poll_min_ms=1, poll_max_ms=10
    )
    consumer = StreamConsumer(client, [stream], "bp_group", "bench", batch_size=batch, block_ms=50)
    peak = 0

    async def produce() -> None:
        nonlocal peak
        for payload in payloads:
            await writer.add({"event": payload})
            peak = max(peak, writer.stats.stream_length or 0)
        await writer.flush()

    async def consume() -> None:
        seen = 0
        while seen < len(payloads):
            messages = await consumer.read()
            await consumer.ack(messages)
            seen += len(messages)

    started = time.perf_counter()
    await asyncio.gather(produce(), consume())
    elapsed = time.perf_counter() - started
    print(
        f"    (writer waited {writer.stats.backpressure_waits} times, {writer.stats.backpressure_seconds:.2f}s)"
    )
    return elapsed, peak


async def main(args: argparse.Namespace) -> None:
    events = [make_event(i) for i in range(args.events)]
    with Timer() as encoding:
        payloads = [encode_event(e) for e in events]
    fields = [event_fields(e) for e in events[:50_000]]
    with Timer() as parsing:
        for f in fields:
            parse_stream_event(f)
    print(f"event JSON: {len(payloads[0])} bytes")
    print(f"encode_event                      {rate(len(payloads), encoding.wall)}")
    print(f"parse_stream_event                {rate(len(fields), parsing.wall)}")

    async with redis_url() as url:
        client = connect(url)
        prefix = f"bench-streams:{os.getpid()}:"
        try:
            info = await client.info("server")
            print(f"redis {info['redis_version']} at {url}; {args.events:,} events, batches of {args.batch}")
            for attempt in range(2):
                stream = f"{prefix}w{attempt}"
                n = len(payloads)
                t = await bench_pipeline(client, f"{stream}-pipe", payloads, args.batch)
                print(f"XADD pipeline (redis-py baseline) {rate(n, t.wall, t.cpu)}")
                t = await bench_writer(client, stream, payloads, args.batch)
                print(f"StreamWriter.add                  {rate(n, t.wall, t.cpu)}")
                t = await bench_consumer(client, stream, n, args.batch, parse=False)
                print(f"StreamConsumer read + ack         {rate(n, t.wall, t.cpu)}")
                await bench_writer(client, stream, payloads, args.batch)
                t = await bench_consumer(client, stream, n, args.batch, parse=True)
                print(f"  … + parse_stream_event          {rate(n, t.wall, t.cpu)}")
                assert await client.xlen(stream) == 0
            seconds, peak = await bench_backpressure(client, f"{prefix}bp", payloads, args.batch)
            print(
                f"write+consume at high-water mark  {rate(len(payloads), seconds)}  (max length seen {peak:,})"
            )
        finally:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
            await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    asyncio.run(main(parser.parse_args()))
