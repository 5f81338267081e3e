"""Small Redis helpers shared by the stream producer, consumer and admin functions.

The stream code talks to Redis through a *raw* client: one sharing the caller's connection
pool but without redis-py's response callbacks, so replies arrive as hiredis builds them
(no per-entry dict building we would redo anyway, and the full XAUTOCLAIM/XCLAIM replies).
Replies are read in both RESP2 (flat lists) and RESP3 (maps) shapes, since redis-py picks
the protocol from the URL/options.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "NEVER_DECODE",
    "Backoff",
    "LuaScript",
    "as_map",
    "command",
    "connect",
    "is_transient",
    "raw_client",
    "text",
]

#: error codes of replies that say "try again later" rather than "this is wrong"; inside a
#: script the code follows the script's own error text, so it is searched for, not prefixed
_TRANSIENT_REPLY = re.compile(
    r"(?:^|: )(?:LOADING|BUSY|OOM|READONLY|MASTERDOWN|TRYAGAIN|CLUSTERDOWN|NOREPLICAS)\b"
)


def connect(url: str, **options: Any) -> aioredis.Redis:
    """A client for the stream machinery: bytes replies, keepalive, a socket timeout longer
    than any blocking read psky issues (so a dead server is noticed, a blocked read is not cut)."""
    settings: dict[str, Any] = {"socket_timeout": 30, "socket_keepalive": True, "health_check_interval": 15}
    settings.update(options)
    return aioredis.Redis.from_url(url, **settings)


def raw_client(client: aioredis.Redis) -> aioredis.Redis:
    """A client on *client*'s pool that returns replies unparsed (see the module doc)."""
    raw = aioredis.Redis(connection_pool=client.connection_pool)
    raw.response_callbacks.clear()
    return raw


async def command(client: aioredis.Redis, *args: Any, raw: bool = False) -> Any:
    """Run one command; with ``raw`` its reply bytes are never decoded (payload reads)."""
    if raw:
        return await client.execute_command(*args, **{NEVER_DECODE: True})  # type: ignore[no-untyped-call]
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def socket_timeout_ms(client: aioredis.Redis) -> float | None:
    timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    return None if timeout is None else float(timeout) * 1000.0


def text(value: Any) -> str:
    """A reply element as str (ids, names, simple strings arrive as bytes or str)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def as_map(reply: Any) -> dict[str, Any]:
    """A RESP3 map or a RESP2 flat key/value list as a dict with str keys."""
    if isinstance(reply, dict):
        return {text(k): v for k, v in reply.items()}
    it = iter(reply or ())
    return {text(k): v for k, v in zip(it, it, strict=False)}


def is_transient(exc: BaseException) -> bool:
    """Connection trouble or a reply meaning "not now" (loading, OOM, failover…)."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)):
        return True
    return isinstance(exc, ResponseError) and _TRANSIENT_REPLY.search(str(exc)[:300]) is not None


def is_nogroup(exc: BaseException) -> bool:
    """The stream or its group vanished (FLUSHALL, DEL, a Redis restart without persistence)."""
    return isinstance(exc, ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED"))


def parse_id(entry_id: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a comparable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Backoff:
    """Exponential backoff with full jitter between *base* and *cap* seconds."""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        self.attempt = 0


def pack_command(args: Sequence[bytes | str | int | float]) -> list[bytes]:
    """The RESP encoding of one command, as the chunks to write. redis-py's packer costs
    ~0.9 µs an argument, this ~0.3: it matters for the scripts that take one argument per
    stream entry."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is bytes:
            value = arg
        elif type(arg) is str:
            value = arg.encode()
        elif isinstance(arg, (bytes, bytearray, memoryview)):
            value = bytes(arg)
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            value = repr(arg).encode()
        else:
            raise TypeError(f"command arguments are bytes, str or numbers, not {type(arg).__name__}")
        out += (b"$%d\r\n" % len(value), value, b"\r\n")
    return out


async def packed_command(client: aioredis.Redis, packed: list[bytes]) -> Any:
    """Send an already packed command on a pooled connection and read its reply (bytes never
    decoded). A connection that fails or is cancelled mid-command is closed, never reused
    with a reply still unread; an error reply raises like ``execute_command``'s."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(packed)
        return await conn.read_response(disable_decoding=True)
    except ResponseError:
        raise  # the whole reply was read: the connection is fine
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


class LuaScript:
    """A Lua script run by SHA1 (``EVALSHA``), sent in full only when the server lacks it
    (first use, or after a restart or ``SCRIPT FLUSH``). The command is packed here (see
    :func:`pack_command`), not by redis-py."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: aioredis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await packed_command(client, pack_command(["EVALSHA", self.sha, len(keys), *keys, *args]))
        except NoScriptError:
            return await packed_command(client, pack_command(["EVAL", self.source, len(keys), *keys, *args]))
