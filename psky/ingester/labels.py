"""One labeler's ``com.atproto.label.subscribeLabels`` into ``label_live`` (one task per labeler).

Starts from cursor 0 on the first run (labels are few and all matter), keeps its cursor in
``<label stream>:cursor:<host>`` (written after the labels it covers), writes one
``{"type":"label","label":…}`` entry per label. Each label's signature is checked against
the ``#atproto_label`` key of its ``src`` DID (strict drops a failing label, lenient passes it).
"""

from __future__ import annotations

import logging

import aiohttp
import redis.asyncio as aioredis

from psky.atproto.label import (
    ErrorMessage,
    InfoMessage,
    InvalidLabelMessage,
    Label,
    LabelsMessage,
    decode_labels_frame,
)
from psky.ingester._ws import read_websocket, reconnect_forever
from psky.ingester.config import IngesterConfig, ws_base
from psky.ingester.metrics import IngesterMetrics
from psky.ingester.verify import KeyCache
from psky.streams import StreamWriter, cursor_key, label_fields
from psky.streams._redis import Backoff, command, is_transient, raw_client, text

__all__ = ["LabelIngester"]

log = logging.getLogger(__name__)

SUBSCRIBE_LABELS = "/xrpc/com.atproto.label.subscribeLabels"


class LabelIngester:
    def __init__(
        self,
        config: IngesterConfig,
        host: str,
        redis: aioredis.Redis,
        session: aiohttp.ClientSession,
        keys: KeyCache,
        metrics: IngesterMetrics,
    ) -> None:
        self.config = config
        self.host = host
        self.session = session
        self.keys = keys
        self.metrics = metrics
        self.cursor_key = cursor_key(config.label_stream, host)
        self.writer = StreamWriter(
            redis, config.label_stream, high_water_mark=config.label_high_water_mark,
            batch_size=config.batch_size, batch_timeout_ms=config.batch_timeout_ms,
        )
        self._raw = raw_client(redis)
        self.last_seq: int | None = None
        self._incoming = metrics.label_incoming.labels(host=host)
        self._written = metrics.label_stream_events.labels(host=host)

    async def run(self) -> None:
        self.writer.start()
        base = ws_base(self.host) + SUBSCRIBE_LABELS

        async def connect_once() -> str:
            if self.last_seq is None:
                self.last_seq = await self._load_cursor()
            return await read_websocket(
                self.session, f"{base}?cursor={self.last_seq}", on_frame=self.handle_frame,
                before_read=self.writer.wait_below_high_water_mark,
                idle_timeout_s=self.config.idle_timeout_s, max_frame_bytes=self.config.max_frame_bytes,
            )

        await reconnect_forever(
            connect_once, min_delay_s=self.config.reconnect_min_s, max_delay_s=self.config.reconnect_max_s,
            healthy_after_s=self.config.healthy_after_s,
            on_reconnect=lambda reason: self.metrics.reconnects.labels(host=self.host, reason=reason).inc(),
        )

    async def close(self) -> None:
        await self.writer.close()

    async def _load_cursor(self) -> int:
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                value = await command(self._raw, "GET", self.cursor_key)
                break
            except Exception as e:
                if not is_transient(e):
                    raise
                log.warning("cannot read label cursor, retrying", extra={"key": self.cursor_key, "error": str(e)})
                await backoff.sleep()
        try:
            return max(int(text(value)), 0) if value is not None else 0
        except ValueError:
            log.error("stored label cursor is not an integer, starting at 0", extra={"key": self.cursor_key})
            return 0

    async def handle_frame(self, data: bytes) -> None:
        self._incoming.inc()
        try:
            message = decode_labels_frame(data, strict=False)
        except InvalidLabelMessage as e:
            self.metrics.label_bad_frames.labels(host=self.host).inc()
            log.warning("bad labeler frame", extra={"host": self.host, "after_seq": self.last_seq,
                                                    "bytes": len(data), "error": str(e)[:300]})
            return
        if isinstance(message, LabelsMessage):
            if self.last_seq is not None and message.seq <= self.last_seq:
                return
            for index, reason in message.rejected:
                self.metrics.label_verify_failures.labels(host=self.host, reason="invalid").inc()
                log.warning("invalid label skipped", extra={"host": self.host, "seq": message.seq,
                                                            "index": index, "error": reason[:300]})
            for label in message.labels:
                if await self._accept(label, message.seq):
                    await self.writer.add(label_fields(label))
                    self._written.inc()
            self.last_seq = message.seq
            self.writer.set_cursor_after(self.cursor_key, message.seq)
        elif isinstance(message, InfoMessage):
            log.warning("labeler info", extra={"host": self.host, "name": message.name, "info": message.message})
        elif isinstance(message, ErrorMessage):
            log.error("labeler error frame", extra={"host": self.host, "error": message.error,
                                                    "info": message.message})
        else:
            self.metrics.label_bad_frames.labels(host=self.host).inc()

    async def _accept(self, label: Label, seq: int) -> bool:
        """Whether to write *label* under the verification mode (failures counted)."""
        if self.config.verify == "off":
            return True
        reason: str | None = None
        if label.sig is None:
            reason = "unsigned"
        else:
            key = await self.keys.label_key(label.src)
            ok = key is not None and label.verify(key)
            if not ok:  # the labeler may have rotated its key
                self.keys.invalidate(label.src)
                fresh = await self.keys.label_key(label.src)
                ok = fresh is not None and label.verify(fresh)
                if not ok:
                    reason = "key-unavailable" if fresh is None else "bad-signature"
        if reason is None:
            return True
        self.metrics.label_verify_failures.labels(host=self.host, reason=reason).inc()
        log.warning("label failed verification", extra={"host": self.host, "seq": seq, "src": label.src,
                                                        "uri": label.uri, "reason": reason})
        return self.config.verify == "lenient"
