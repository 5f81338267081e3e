"""The WebSocket read loop and the reconnect policy shared by the firehose and label tasks."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import aiohttp

from psky._aio import cancel_and_wait

__all__ = ["read_websocket", "reconnect_forever"]

log = logging.getLogger(__name__)


async def read_websocket(
    session: aiohttp.ClientSession,
    url: str,
    *,
    on_frame: Callable[[bytes], Awaitable[None] | None],
    before_read: Callable[[], Awaitable[None] | None],
    idle_timeout_s: float,
    max_frame_bytes: int,
) -> str:
    """Read binary frames from *url* until the connection ends; returns why it ended.

    ``before_read`` runs before every socket read (the backpressure wait: while it blocks,
    nothing is read and TCP flow control holds the sender). The idle watchdog restarts only
    on binary frames (``receive()`` answers pings internally), so pings alone do not keep a
    connection that sends no data alive. Either callback may return None instead of an
    awaitable when it is done without waiting (a coroutine less per frame on the hot path).
    """
    try:
        async with session.ws_connect(
            url, max_msg_size=max_frame_bytes, autoping=True, heartbeat=None, compress=0
        ) as ws:
            log.info("connected", extra={"url": url})
            loop = asyncio.get_running_loop()
            last_data = loop.time()
            idle = False

            async def watchdog() -> None:
                # one timer per connection instead of one per frame (asyncio.wait_for per
                # receive() costs a task each): close the socket once data stops coming
                nonlocal idle
                while True:
                    await asyncio.sleep(max(last_data + idle_timeout_s - loop.time(), 0.01))
                    if loop.time() - last_data >= idle_timeout_s:
                        idle = True
                        await ws.close()
                        return

            timer = asyncio.create_task(watchdog())
            try:
                while True:
                    waiting = before_read()
                    if waiting is not None:
                        await waiting
                    last_data = loop.time()  # time spent waiting for Redis is not idleness
                    msg = await ws.receive()
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        last_data = loop.time()
                        pending = on_frame(msg.data)
                        if pending is not None:
                            await pending
                    elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                        if idle:
                            log.warning("no data, reconnecting", extra={"url": url, "idle_s": idle_timeout_s})
                            return "idle"
                        return "closed"
                    elif msg.type == aiohttp.WSMsgType.ERROR:
                        log.warning("websocket error", extra={"url": url, "error": str(ws.exception())})
                        return "error"
                    else:  # text frames are not part of the protocol
                        pending = on_frame(b"")
                        if pending is not None:
                            await pending
            finally:
                await cancel_and_wait(timer)
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        log.warning("connection failed", extra={"url": url, "error": str(e) or type(e).__name__})
        return "connect-error"


async def reconnect_forever(
    connect_once: Callable[[], Awaitable[str]],
    *,
    min_delay_s: float,
    max_delay_s: float,
    healthy_after_s: float,
    on_reconnect: Callable[[str], None],
) -> None:
    """Run *connect_once* again and again with full-jitter exponential backoff; a connection
    that lasted ``healthy_after_s`` resets the backoff. Runs until cancelled."""
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        started = loop.time()
        reason = await connect_once()
        if loop.time() - started >= healthy_after_s:
            attempt = 0
        on_reconnect(reason)
        delay = min(max_delay_s, min_delay_s * (2**attempt))
        attempt = min(attempt + 1, 30)
        await asyncio.sleep(random.uniform(delay / 2, delay))
