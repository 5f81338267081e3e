"""A loopback TCP proxy that slows a connection down, for fault tests against a real server.

Put between a service and PostgreSQL (or any TCP server), it forwards every chunk after
``delay_s`` in each direction, so a request-response exchange takes ``2 × delay_s`` longer: a
database that answers slowly without being down. The delay can change while connections are
open (a slow spell mid-run); chunks keep their order, and throughput is not capped, only latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["LatencyProxy", "ProxyStats"]

_CHUNK = 64 * 1024


@dataclass
class ProxyStats:
    """What went through the proxy: for a test to show the fault was really in the path."""

    connections: int = 0
    chunks: int = 0
    bytes: int = 0
    #: chunks forwarded while a delay above zero was in force
    delayed_chunks: int = 0


class LatencyProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, *, delay_s: float = 0.0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        #: seconds each chunk waits in each direction; read at the time the chunk arrives
        self.delay_s = delay_s
        self.stats = ProxyStats()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def for_url(cls, url: str, *, delay_s: float = 0.0) -> LatencyProxy:
        """A proxy to the host and port of a ``postgresql://`` (or similar) URL."""
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432, delay_s=delay_s)

    def url(self, url: str) -> str:
        """*url* with its host and port replaced by this proxy's (user, path and query kept)."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> int:
        """Start listening; returns the port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> LatencyProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.stats.connections += 1
        server_w: asyncio.StreamWriter | None = None
        try:
            server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
            # either direction ending (EOF, reset) ends the connection, as a real cut would
            pipes = [asyncio.create_task(self._pipe(client_r, server_w)),
                     asyncio.create_task(self._pipe(server_r, client_w))]  # fmt: skip
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for writer in (client_w, server_w):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward one direction; each chunk is due ``delay_s`` after it arrived (a queue, so a
        slow chunk delays the ones behind it only by what is left of its own wait)."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def receive() -> None:
            try:
                while chunk := await reader.read(_CHUNK):
                    queue.put_nowait((time.monotonic() + self.delay_s, chunk))
            finally:
                queue.put_nowait(None)

        receiver = asyncio.create_task(receive())
        try:
            while (item := await queue.get()) is not None:
                due, chunk = item
                wait = due - time.monotonic()
                if wait > 0:
                    self.stats.delayed_chunks += 1
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
                self.stats.chunks += 1
                self.stats.bytes += len(chunk)
        except OSError:
            pass
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
