"""An in-memory event sequencer with websocket fan-out, shared by the PDS, relay and labeler.

The log is a list of ``(seq, frame bytes)`` with seq strictly increasing from 1. A producer
calls :meth:`Sequencer.append` with a builder ``(seq, time) -> frame`` so the seq and time
written inside the frame body are the ones the log assigns. :meth:`Sequencer.serve` is an
aiohttp handler for ``subscribeRepos``/``subscribeLabels`` with the reference semantics:

* no ``cursor``: live events only; ``cursor=N``: every retained event with seq > N, then live;
* ``cursor`` beyond the last seq: error frame ``FutureCursor`` and close (code 1008);
* ``cursor`` older than the retained window (``retain`` events): ``#info OutdatedCursor``,
  then replay from the oldest retained event;
* a live subscriber more than ``max_buffer`` events behind the head (it reads too slowly, or
  not at all): error frame ``ConsumerTooSlow`` and close.

Subscribers read the shared log by position (no per-subscriber copies), so fan-out costs one
wake-up per subscriber per append. :meth:`Sequencer.purge` drops a DID's events (the
reference PDS does that on account deletion). Stream fault knobs (drop, stall, malformed,
oversized, out-of-order and replayed seq) are applied per connection while sending, from the
shared :class:`~psky.devnet.faults.Faults`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from psky.atproto import cbor
from psky.atproto.firehose import encode_error_frame, encode_frame, info_body, now_iso
from psky.devnet.faults import Faults

__all__ = [
    "MALFORMED_FRAME",
    "OVERSIZED_FRAME_BYTES",
    "Sequencer",
    "oversize_frame",
    "replace_seq",
]

#: what ``malformed_every`` sends instead of a frame: a valid header, then bytes that are not CBOR
MALFORMED_FRAME = encode_frame("#commit", {"seq": 0})[:-6] + b"\xff\xfe\x00garbage"
#: size of the frames ``oversized_every`` sends: above psky's 16 MiB frame cap (and any default)
OVERSIZED_FRAME_BYTES = 16 * 1024 * 1024 + 1024
#: close code the reference servers use after an error frame (policy violation)
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001

_REPLAY_BATCH = 500
_COMPACT_AT = 4096


def replace_seq(frame: bytes, seq: int) -> bytes:
    """The same frame with its body's ``seq`` replaced (relays re-sequence with this).

    Raises ValueError (``cbor.DecodeError``) when the frame is not header + body maps.
    """
    header, used = cbor.decode_prefix(frame)
    body = cbor.decode(memoryview(frame)[used:])
    if type(header) is not dict or type(body) is not dict:
        raise ValueError("frame header and body must be maps")
    body["seq"] = seq
    return frame[:used] + cbor.encode(body)


def oversize_frame(frame: bytes, size: int = OVERSIZED_FRAME_BYTES) -> bytes:
    """A well-formed frame of at least ``size`` bytes: the body gains a large ``padding`` field."""
    try:
        header, used = cbor.decode_prefix(frame)
        body = cbor.decode(memoryview(frame)[used:])
    except cbor.DecodeError:
        header, used, body = {"op": 1, "t": "#info"}, 0, {}
    if type(body) is not dict:
        body = {}
    body["padding"] = bytes(max(size - len(frame), 1))
    head = frame[:used] if used else cbor.encode(header)
    return head + cbor.encode(body)


@dataclass(eq=False)
class _Subscriber:
    last: int
    live: bool
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[object] | None = None
    sending: bool = False
    too_slow: bool = False
    closed: bool = False


class _TooSlow(Exception):
    pass


class Sequencer:
    """Sequenced frames in memory plus their websocket subscribers (see the module docstring).

    ``retain`` bounds the number of events kept (None = all); ``max_buffer`` is how far (in
    events) a caught-up subscriber may lag before it is cut off with ``ConsumerTooSlow``.
    """

    def __init__(
        self,
        *,
        retain: int | None = None,
        max_buffer: int = 10_000,
        logger: logging.Logger | None = None,
    ) -> None:
        if retain is not None and retain < 1:
            raise ValueError("retain must be at least 1 (or None for unlimited)")
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        self.retain = retain
        self.max_buffer = max_buffer
        self.log = logger or logging.getLogger("psky.devnet.sequencer")
        self._seqs: list[int] = []
        self._frames: list[bytes | None] = []
        self._dids: list[str | None] = []
        self._start = 0  # index of the oldest retained entry
        self._last = 0  # last seq assigned
        self._trimmed = 0  # highest seq dropped by the retention window
        self._subs: set[_Subscriber] = set()
        self._sockets: set[web.WebSocketResponse] = set()
        self._conn_ids = itertools.count(1)
        self._closed = False

    # --- the log ------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """Last seq assigned (0 before the first event)."""
        return self._last

    @property
    def oldest(self) -> int | None:
        """Seq of the oldest retained event (None when the log is empty)."""
        for i in range(self._start, len(self._seqs)):
            if self._frames[i] is not None:
                return self._seqs[i]
        return None

    def __len__(self) -> int:
        """Number of retained (not purged) events."""
        return sum(1 for i in range(self._start, len(self._frames)) if self._frames[i] is not None)

    def append(self, build: Callable[[int, str], bytes], *, did: str | None = None) -> int:
        """Sequence one event: ``build(seq, time)`` returns its frame. Returns the seq.

        ``did`` tags the event so :meth:`purge` can drop it later.
        """
        if self._closed:
            raise RuntimeError("sequencer is closed")
        seq = self._last + 1
        frame = build(seq, now_iso())
        self._last = seq
        self._seqs.append(seq)
        self._frames.append(frame)
        self._dids.append(did)
        if self.retain is not None and len(self._seqs) - self._start > self.retain:
            self._trim()
        limit = self.max_buffer
        for sub in self._subs:
            if sub.live and not sub.too_slow and seq - sub.last > limit:
                sub.too_slow = True
                if sub.sending and sub.task is not None:
                    sub.task.cancel()  # blocked on a client that does not read
            sub.wake.set()
        return seq

    def _trim(self) -> None:
        while len(self._seqs) - self._start > (self.retain or 0):
            self._trimmed = self._seqs[self._start]
            self._frames[self._start] = None
            self._start += 1
        if self._start >= _COMPACT_AT and self._start * 2 >= len(self._seqs):
            del self._seqs[: self._start]
            del self._frames[: self._start]
            del self._dids[: self._start]
            self._start = 0

    def purge(self, did: str, *, keep: int | None = None) -> int:
        """Drop every retained event tagged with ``did`` except seq ``keep``; returns how many."""
        n = 0
        seqs, frames, dids = self._seqs, self._frames, self._dids
        for i in range(self._start, len(seqs)):
            if dids[i] == did and seqs[i] != keep and frames[i] is not None:
                frames[i] = None
                n += 1
        return n

    def frames_after(self, cursor: int, limit: int | None = None) -> list[tuple[int, bytes]]:
        """Retained ``(seq, frame)`` pairs with seq > ``cursor``, oldest first."""
        seqs, frames = self._seqs, self._frames
        i = bisect_right(seqs, cursor, self._start)
        end = len(seqs) if limit is None else min(len(seqs), i + limit)
        out: list[tuple[int, bytes]] = []
        while i < end:
            f = frames[i]
            if f is not None:
                out.append((seqs[i], f))
            elif limit is not None and end < len(seqs):
                end += 1  # purged entries do not count against the batch
            i += 1
        return out

    def frame(self, seq: int) -> bytes | None:
        """The frame at ``seq`` if it is retained."""
        i = bisect_right(self._seqs, seq, self._start) - 1
        if i >= self._start and self._seqs[i] == seq:
            return self._frames[i]
        return None

    # --- serving ----------------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    async def serve(
        self, request: web.Request, *, faults: Faults | None = None, fault_key: str = ""
    ) -> web.WebSocketResponse:
        """aiohttp handler for a subscription endpoint (``?cursor=N`` optional)."""
        ws = web.WebSocketResponse(compress=False, autoping=True, timeout=2.0)
        await ws.prepare(request)
        if self._closed:
            await ws.close(code=CLOSE_GOING_AWAY)
            return ws
        self._sockets.add(ws)
        conn_key = f"{fault_key}#{next(self._conn_ids)}"
        sub: _Subscriber | None = None
        reader: asyncio.Task[None] | None = None
        try:
            raw = request.query.get("cursor")
            cursor: int | None = None
            if raw is not None and raw != "":
                try:
                    cursor = int(raw, 10)
                except ValueError:
                    await self._fail(ws, "InvalidRequest", "cursor must be an integer")
                    return ws
            if cursor is not None and cursor > self._last:
                await self._fail(ws, "FutureCursor", "Cursor in the future.")
                return ws
            if cursor is not None and cursor < self._trimmed:
                await ws.send_bytes(
                    encode_frame(
                        "#info",
                        info_body(
                            "OutdatedCursor", "Requested cursor exceeded limit. Possibly missing events"
                        ),
                    )
                )
            sub = _Subscriber(last=self._last if cursor is None else cursor, live=cursor is None)
            sub.task = asyncio.current_task()
            self._subs.add(sub)
            reader = asyncio.create_task(self._read(ws, sub))
            try:
                await self._pump(ws, sub, request, faults, conn_key)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not sub.too_slow or task is None:
                    raise
                task.uncancel()
                raise _TooSlow() from None
        except _TooSlow:
            self.log.info("subscriber too slow (%s), closing", conn_key)
            await self._fail(ws, "ConsumerTooSlow", "Stream consumer too slow")
        except (ConnectionError, RuntimeError) as e:  # peer went away mid-send
            self.log.debug("subscriber %s gone: %s", conn_key, e)
        finally:
            if sub is not None:
                sub.closed = True
                self._subs.discard(sub)
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            self._sockets.discard(ws)
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(code=CLOSE_GOING_AWAY if self._closed else 1000), 2)
        return ws

    async def _read(self, ws: web.WebSocketResponse, sub: _Subscriber) -> None:
        """Drain what the client sends (pings are answered by aiohttp); note when it leaves."""
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.ERROR):
                    break
        finally:
            sub.closed = True
            sub.wake.set()

    async def _pump(
        self,
        ws: web.WebSocketResponse,
        sub: _Subscriber,
        request: web.Request,
        faults: Faults | None,
        key: str,
    ) -> None:
        sent = 0
        prev_seq: int | None = None
        send = ws.send_bytes
        while True:
            if sub.closed or self._closed or ws.closed:
                return
            if sub.too_slow:
                raise _TooSlow()
            batch = self.frames_after(sub.last, _REPLAY_BATCH)
            if not batch:
                sub.live = True  # caught up: from now on lag counts against max_buffer
                sub.wake.clear()
                await sub.wake.wait()
                continue
            if sub.live and self._last - sub.last > self.max_buffer:
                raise _TooSlow()
            stream_faults = faults is not None and (
                faults.drop_after_frames
                or faults.stall_seconds
                or faults.malformed_every
                or faults.oversized_every
                or faults.seq_out_of_order_every
                or faults.seq_replay_every
            )
            if not stream_faults:
                sub.sending = True
                try:
                    for seq, frame in batch:
                        await send(frame)
                        sub.last = seq
                finally:
                    sub.sending = False
                sent += len(batch)
                prev_seq = sub.last
                continue
            assert faults is not None
            for seq, frame in batch:
                if faults.should_stall(sent):
                    await asyncio.sleep(faults.stall_seconds)
                data = frame
                if faults.tick("malformed_every", key):
                    data = MALFORMED_FRAME
                elif faults.tick("oversized_every", key):
                    data = oversize_frame(frame)
                elif faults.tick("seq_out_of_order_every", key):
                    with contextlib.suppress(ValueError):
                        data = replace_seq(frame, (prev_seq if prev_seq is not None else seq) - 1)
                sub.sending = True
                try:
                    await send(data)
                    sent += 1
                    if faults.tick("seq_replay_every", key):
                        await send(data)
                        sent += 1
                finally:
                    sub.sending = False
                sub.last = prev_seq = seq
                if faults.should_drop(sent):
                    self.log.info("dropping subscriber %s after %d frames (fault)", key, sent)
                    if request.transport is not None:
                        request.transport.close()
                    sub.closed = True
                    return

    async def _fail(self, ws: web.WebSocketResponse, error: str, message: str) -> None:
        """Error frame, then close with the policy code and the error name as reason."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.send_bytes(encode_error_frame(error, message)), 2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code=CLOSE_POLICY, message=error.encode()), 2)

    async def close(self) -> None:
        """Stop accepting events and end every subscription (code 1001)."""
        self._closed = True
        for sub in list(self._subs):
            sub.closed = True
            sub.wake.set()
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=CLOSE_GOING_AWAY), 2)
