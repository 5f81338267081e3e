"""``psky replay labels|firehose``: re-read a window of a labeler's or a relay's stream into
the Redis streams, without moving the ingester's saved cursor.

Frames go through the ingester's own handlers (:class:`~psky.ingester.labels.LabelIngester`,
:class:`~psky.ingester.firehose.FirehoseIngester`): same decoding, same verification mode
(``INGESTER_VERIFY``), same collection filter, same wire format. Two things differ, on
purpose: the writer never stores a cursor (nor the per-repo verification state, which
describes the newest commit seen and must not be rolled back), and commits are not
checked against that state (every replayed commit is older than it). The indexer is
idempotent, so entries that are already indexed change nothing when read again.

The replay stops at ``--until`` (inclusive), or once the host sends nothing for ``--idle``
seconds (caught up), or on an error frame.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from psky.atproto.firehose import ErrorFrame, FrameError, InfoEvent, decode_frame
from psky.atproto.label import (
    ErrorMessage,
    InfoMessage,
    InvalidLabelMessage,
    LabelsMessage,
    decode_labels_frame,
)
from psky.identity import IdentityResolver
from psky.ingester._ws import read_websocket
from psky.ingester.config import IngesterConfig, ws_base
from psky.ingester.firehose import SUBSCRIBE_REPOS, FirehoseIngester
from psky.ingester.labels import SUBSCRIBE_LABELS, LabelIngester
from psky.ingester.metrics import IngesterMetrics
from psky.ingester.verify import KeyCache, RepoState, RepoStateStore
from psky.streams import StreamWriter
from psky.streams.producer import FieldValue

__all__ = ["ReplayResult", "replay_firehose", "replay_labels"]

log = logging.getLogger("psky.replay")

#: reconnects after a connection that ended other than by idling (the host closed it, a reset)
MAX_RECONNECTS = 3


@dataclass(slots=True)
class ReplayResult:
    kind: Literal["labels", "firehose"]
    host: str
    stream: str
    from_cursor: int
    #: entries written, per stream (the firehose may also queue repo resyncs on repo_backfill)
    queued: dict[str, int] = field(default_factory=dict)
    frames: int = 0
    last_seq: int | None = None
    #: why it stopped: "until", "caught-up", "error"
    stopped: str = ""
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_obj(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}

    def summary(self) -> str:
        what = "labels" if self.kind == "labels" else "events"
        main = self.queued.get(self.stream, 0)
        others = "".join(f", {n} on {s}" for s, n in sorted(self.queued.items()) if s != self.stream)
        line = (f"{self.host}: {main} {what} queued on {self.stream}{others} from {self.frames} frames, "
                f"seq {self.from_cursor} → {self.last_seq if self.last_seq is not None else '-'} ({self.stopped})")
        if self.error:
            line += f"; ERROR: {self.error}"
        for w in self.warnings:
            line += f"; warning: {w}"
        return line


class _ReplayWriter(StreamWriter):
    """Writes entries, counts them, and never stores a cursor or state key."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts: dict[str, int] = {}

    async def add(self, fields: Mapping[str, FieldValue], *, stream: str | None = None) -> None:
        key = stream or self.stream
        self.counts[key] = self.counts.get(key, 0) + 1
        await super().add(fields, stream=stream)

    async def add_many(self, entries: Iterable[Mapping[str, FieldValue]], *, stream: str | None = None) -> None:
        entries = list(entries)
        key = stream or self.stream
        self.counts[key] = self.counts.get(key, 0) + len(entries)
        await super().add_many(entries, stream=stream)

    def set_cursor_after(self, key: str, value: str | int) -> None:
        pass


class _NoStates(RepoStateStore):
    """No per-repo state: replayed commits are not compared with (nor recorded as) the newest."""

    async def get(self, did: str) -> RepoState | None:
        return None

    def put(self, did: str, state: RepoState | None) -> str:
        return ""


class _Stop(Exception):
    def __init__(self, why: str, error: str | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.error = error


def _writer(redis: aioredis.Redis, stream: str, config: IngesterConfig, hwm: int) -> _ReplayWriter:
    return _ReplayWriter(redis, stream, high_water_mark=hwm, batch_size=config.batch_size,
                         batch_timeout_ms=config.batch_timeout_ms)


async def _drive(
    session: aiohttp.ClientSession,
    url_for: Callable[[], str],
    on_frame: Callable[[bytes], Awaitable[None]],
    writer: _ReplayWriter,
    config: IngesterConfig,
    idle_s: float,
    result: ReplayResult,
) -> None:
    """Read until a stop: idle (caught up), ``_Stop`` from the frame handler, or too many
    broken connections (each reconnect resumes after the last seq handled)."""
    failures = 0
    while True:
        try:
            reason = await read_websocket(
                session, url_for(), on_frame=on_frame, before_read=writer.wait_below_high_water_mark,
                idle_timeout_s=idle_s, max_frame_bytes=config.max_frame_bytes,
            )
        except _Stop as stop:
            result.stopped, result.error = stop.why, stop.error
            return
        if reason == "idle":
            result.stopped = "caught-up"
            return
        failures += 1
        if failures > MAX_RECONNECTS:
            result.stopped = "error"
            result.error = f"connection to {result.host} failed ({reason}) {failures} times"
            return
        log.warning("replay connection ended, reconnecting", extra={"host": result.host, "reason": reason})
        await asyncio.sleep(0.5 * 2 ** (failures - 1))


def _session(session: aiohttp.ClientSession | None) -> tuple[aiohttp.ClientSession, bool]:
    if session is not None:
        return session, False
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30)), True


async def replay_labels(
    redis: aioredis.Redis,
    config: IngesterConfig,
    host: str,
    *,
    stream: str,
    from_cursor: int = 0,
    until: int | None = None,
    idle_s: float = 5.0,
    session: aiohttp.ClientSession | None = None,
) -> ReplayResult:
    """Labels of *host* after *from_cursor* (0: all, so negations are applied again) into *stream*."""
    config = dataclasses.replace(config, label_stream=stream)
    result = ReplayResult("labels", host, stream, from_cursor)
    http, own = _session(session)
    resolver = IdentityResolver(config.plc_url, handle_map=config.handle_resolver_map)
    ing = LabelIngester(config, host, redis, http, KeyCache(resolver), IngesterMetrics(CollectorRegistry()))
    writer = ing.writer = _writer(redis, stream, config, config.label_high_water_mark)
    ing.last_seq = from_cursor
    base = ws_base(host) + SUBSCRIBE_LABELS

    async def on_frame(data: bytes) -> None:
        result.frames += 1
        try:
            message = decode_labels_frame(data, strict=False)
        except InvalidLabelMessage:
            message = None  # the ingester's handler counts and logs it
        if isinstance(message, ErrorMessage):
            raise _Stop("error", f"labeler error frame: {message.error}: {message.message or ''}".rstrip(": "))
        if isinstance(message, InfoMessage):
            result.warnings.append(f"{message.name}: {message.message or ''}".rstrip(": "))
        if isinstance(message, LabelsMessage) and until is not None and message.seq > until:
            raise _Stop("until")
        await ing.handle_frame(data)
        if ing.last_seq is not None and ing.last_seq != from_cursor:
            result.last_seq = ing.last_seq
        if until is not None and ing.last_seq is not None and ing.last_seq >= until:
            raise _Stop("until")

    writer.start()
    try:
        await _drive(http, lambda: f"{base}?cursor={ing.last_seq}", on_frame, writer, config, idle_s, result)
    finally:
        await writer.close()
        result.queued = dict(writer.counts)
        await resolver.close()
        if own:
            await http.close()
    return result


async def replay_firehose(
    redis: aioredis.Redis,
    config: IngesterConfig,
    host: str,
    *,
    stream: str,
    cursor: int,
    until: int | None = None,
    idle_s: float = 5.0,
    session: aiohttp.ClientSession | None = None,
) -> ReplayResult:
    """Events of relay *host* after seq *cursor* (up to *until*, inclusive) into *stream*."""
    config = dataclasses.replace(config, firehose_stream=stream)
    result = ReplayResult("firehose", host, stream, cursor)
    http, own = _session(session)
    resolver = IdentityResolver(config.plc_url, handle_map=config.handle_resolver_map)
    ing = FirehoseIngester(config, host, redis, http, KeyCache(resolver), IngesterMetrics(CollectorRegistry()))
    writer = ing.writer = _writer(redis, stream, config, config.firehose_high_water_mark)
    ing.states = _NoStates(redis, stream)
    ing.last_seq, ing._loaded = cursor, True
    base = ws_base(host) + SUBSCRIBE_REPOS

    async def on_frame(data: bytes) -> None:
        result.frames += 1
        seq: int | None = None
        try:
            frame = decode_frame(data)
            seq = getattr(frame, "seq", None)
        except FrameError:
            frame = None  # the ingester's handler counts and logs it
        if isinstance(frame, ErrorFrame):
            raise _Stop("error", f"relay error frame: {frame.error}: {frame.message or ''}".rstrip(": "))
        if isinstance(frame, InfoEvent):
            result.warnings.append(f"{frame.name}: {frame.message or ''}".rstrip(": "))
        if until is not None and isinstance(seq, int) and seq > until:
            raise _Stop("until")
        await ing.handle_frame(data)
        if ing.last_seq is not None and ing.last_seq != cursor:
            result.last_seq = ing.last_seq
        if until is not None and ing.last_seq is not None and ing.last_seq >= until:
            raise _Stop("until")

    writer.start()
    try:
        await _drive(http, lambda: f"{base}?cursor={ing.last_seq}", on_frame, writer, config, idle_s, result)
    finally:
        await writer.close()
        result.queued = dict(writer.counts)
        await resolver.close()
        if own:
            await http.close()
    return result

