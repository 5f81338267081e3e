"""``psky ingester``: the relay, listRepos and labeler tasks of one process, their metrics
and a graceful stop (tasks cancelled, buffered events flushed, cursors saved)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
from prometheus_client import CollectorRegistry

from psky._aio import cancel_and_wait, wait_bounded
from psky.atproto.firehose import NATIVE_COMMITS
from psky.identity import IdentityResolver
from psky.ingester.config import IngesterConfig
from psky.ingester.firehose import FirehoseIngester
from psky.ingester.labels import LabelIngester
from psky.ingester.metrics import IngesterMetrics
from psky.ingester.repos import RepoEnumerator
from psky.ingester.verify import KeyCache
from psky.metrics import MetricsServer
from psky.streams import StreamWriter, connect

__all__ = ["CLOSE_TIMEOUT_S", "run_ingester"]

log = logging.getLogger(__name__)

#: longest a stop waits for the final flush (Redis may be down); unflushed events are
#: replayed from the stored cursor on the next start
CLOSE_TIMEOUT_S = 15.0


class _Task(Protocol):
    writer: StreamWriter

    async def run(self) -> None: ...

    async def close(self) -> None: ...


async def run_ingester(
    config: IngesterConfig,
    *,
    stop: asyncio.Event,
    registry: CollectorRegistry | None = None,
    on_listening: Callable[[int], None] | None = None,
    resolver: IdentityResolver | None = None,
) -> None:
    """Run until *stop* is set. ``registry`` lets an embedding process (or a test) read the
    metrics; by default a private one is served on ``metrics_port`` (-1: not served;
    0: a free port, passed to ``on_listening``). ``resolver`` shares a DID document cache
    with the embedding process (by default the ingester has its own)."""
    metrics = IngesterMetrics(registry)
    redis = connect(config.redis_url)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))
    own_resolver = resolver is None
    if resolver is None:
        resolver = IdentityResolver(config.plc_url, handle_map=config.handle_resolver_map)
    keys = KeyCache(resolver)
    tasks: list[_Task] = []
    if config.mode in ("all", "firehose"):
        tasks += [FirehoseIngester(config, h, redis, session, keys, metrics) for h in config.relay_hosts]
    if config.mode in ("all", "backfill"):
        tasks += [RepoEnumerator(config, h, redis, session, metrics) for h in config.relay_hosts]
    if config.mode in ("all", "labeler"):
        tasks += [LabelIngester(config, h, redis, session, keys, metrics) for h in config.labeler_hosts]
    if not tasks:
        log.warning("nothing to ingest: no hosts configured for mode %s", config.mode)
    log.info("native fast path: %s", "on" if NATIVE_COMMITS else "off",
             extra={"verify": config.verify, "native": NATIVE_COMMITS})
    running = [asyncio.create_task(t.run(), name=f"ingester:{type(t).__name__}") for t in tasks]

    async def health() -> dict[str, Any]:
        dead = [r.get_name() for r in running if r.done()]
        return {"status": "ok" if not dead else "failing", "tasks": len(running), "dead": dead}

    server: MetricsServer | None = None
    if config.metrics_port >= 0:
        server = MetricsServer(metrics.registry, health=health)
        await server.start(config.metrics_host, config.metrics_port)
        log.info("ingester metrics served", extra={"host": config.metrics_host, "port": server.port})
        if on_listening is not None:
            on_listening(server.port)
    sampling = _Sampler(tasks, metrics)
    sampler = asyncio.create_task(sampling.run())
    stopper = asyncio.create_task(stop.wait())
    try:
        pending: set[asyncio.Task[Any]] = {stopper, *running}
        while not stop.is_set():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                error = None if finished is stopper or finished.cancelled() else finished.exception()
                if error is not None:
                    log.error("ingester task failed", exc_info=error)
                    raise RuntimeError(f"ingester task {finished.get_name()} failed") from error
            if not pending - {stopper}:
                await stopper
    finally:
        log.info("ingester stopping")
        try:
            await _stop_tasks([*running, sampler, stopper])
            for t in tasks:
                try:
                    await wait_bounded(t.close(), CLOSE_TIMEOUT_S)
                except Exception as e:
                    log.error("final flush failed; the stored cursor still covers only written events",
                              extra={"stream": t.writer.stream, "error": str(e) or type(e).__name__})
            sampling.sample()
        finally:  # also when the caller cancels the stop itself: release sockets
            if server is not None:
                await server.stop()
            if own_resolver:
                await resolver.close()
            await session.close()
            await redis.aclose()


async def _stop_tasks(running: list[asyncio.Task[Any]]) -> None:
    """Cancel every task, then wait for each (a failure was already reported by the loop)."""
    for r in running:
        r.cancel()
    for r in running:
        with contextlib.suppress(Exception):
            await cancel_and_wait(r)


class _Sampler:
    """Copies the writers' stream lengths, retries and backpressure state into metrics."""

    def __init__(self, tasks: list[_Task], metrics: IngesterMetrics) -> None:
        self.tasks = tasks
        self.metrics = metrics
        self.last: dict[tuple[int, str], float] = {}

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(1.0)

    def _delta(self, key: tuple[int, str], value: float) -> float:
        delta = value - self.last.get(key, 0.0)
        self.last[key] = value
        return delta

    def sample(self) -> None:
        metrics = self.metrics
        for t in self.tasks:
            w = t.writer
            stats = w.stats
            if stats.stream_length is not None:
                metrics.stream_length.labels(stream=w.stream).set(stats.stream_length)
            mark = w.high_water_mark
            waiting = mark is not None and stats.stream_length is not None and stats.stream_length >= mark
            metrics.backpressure.labels(stream=w.stream).set(1 if waiting else 0)
            delta = self._delta((id(w), "bp"), stats.backpressure_seconds)
            if delta > 0:
                metrics.backpressure_seconds.labels(stream=w.stream).inc(delta)
            retries = self._delta((id(w), "retries"), stats.retries)
            if retries > 0:
                metrics.write_retries.labels(stream=w.stream).inc(retries)
