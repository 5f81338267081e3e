"""One relay's ``com.atproto.sync.subscribeRepos`` into ``firehose_live`` (one task per relay).

Per frame: decode, skip seqs at or below the last one (replays), verify a ``#commit``
according to ``INGESTER_VERIFY``, queue its create/update/delete events (collection filter
applied, filtered ops counted), then move the cursor with
:meth:`~psky.streams.StreamWriter.set_cursor_after`, so the stored cursor never covers an
event that is not in Redis. ``#sync`` and ``tooBig`` commits, and ``#account`` events of an
active account (the backfill may have skipped it while it was inactive), queue a resync of
the repo on ``repo_backfill``; ``#identity`` also drops the DID from the resolver cache. Bad frames are
logged and counted and never end the task. Reconnects resume from the last processed seq
(events already queued stay in the writer's buffer), a restart from the stored cursor.

Read-ahead (``lenient``/``strict``): a commit needs its author's signing key (a PLC fetch on a
cache miss) and repo state (a Redis read), and awaiting them frame by frame would stall the
stream for a round trip per new DID. So the socket reader decodes frames into a bounded
in-order queue (``INGESTER_READ_AHEAD_FRAMES`` / ``_BYTES``; the reader stops reading when it
is full, so TCP flow control still holds the relay) and starts the key fetches
(``INGESTER_RESOLVE_CONCURRENCY`` at once) and one MGET of the states the queued frames need;
the processor takes the frames in order and finds them ready. Only the processor moves the
cursor; frames still queued when the connection ends are processed before reconnecting, and on
a stop they are dropped (read again from the stored cursor). An ``#identity`` invalidates only
documents fetched before the reader saw it (a later fetch already reflects it); a key rotation
racing a fetch costs at worst the re-fetch that a failing signature triggers. ``off`` needs
neither and processes each frame as it is read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from libipld import encode_cid

from psky._aio import cancel_and_wait
from psky.atproto.cbor import cid_str
from psky.atproto.crypto import PublicKey
from psky.atproto.firehose import (
    AccountEvent,
    CheckedCommit,
    CommitEvent,
    CommitResult,
    ErrorFrame,
    FrameError,
    IdentityEvent,
    InfoEvent,
    SyncEvent,
    UnknownEvent,
    check_commit_frame,
    decode_frame,
    process_commit,
    process_sync,
    to_stream_events,
)
from psky.ingester._unverified import process_commit_unverified
from psky.ingester._ws import read_websocket, reconnect_forever
from psky.ingester.config import CollectionFilter, IngesterConfig, ws_base
from psky.ingester.metrics import IngesterMetrics
from psky.ingester.verify import KeyCache, RepoState, RepoStateStore, state_key
from psky.streams import BackfillRequest, StreamWriter, backfill_fields, cursor_key
from psky.streams._redis import Backoff, command, is_transient, raw_client, text

__all__ = ["FirehoseIngester"]

log = logging.getLogger(__name__)

SUBSCRIBE_REPOS = "/xrpc/com.atproto.sync.subscribeRepos"
#: reasons after which a commit's records are incomplete whatever the mode: resync the repo
_DATA_LOSS = frozenset({"bad-car", "missing-block", "bad-commit", "bad-record"})

Frame = CommitEvent | SyncEvent | IdentityEvent | AccountEvent | InfoEvent | ErrorFrame | UnknownEvent


@dataclass(slots=True)
class _Native:
    """A ``#commit`` the C fast path decoded and checked, with its frame bytes (the Python
    path takes the frame over when the signature does not verify)."""

    commit: CheckedCommit
    data: bytes


#: most commits whose signatures are checked back to back (see _signature_run)
_SIGNATURE_RUN = 64

#: a queued frame: decoded by the Python path or by the native one
Queued = Frame | _Native
#: (collection, action, event JSON) per record operation, as the native path returns them
Events = list[tuple[str, str, bytes]]


@dataclass(slots=True)
class _Ahead:
    """What the reader prepared for one frame: its key fetch, its state read, and for an
    ``#identity`` the resolver checkpoint at the time it was read."""

    key: asyncio.Task[PublicKey | None] | None = None
    state: asyncio.Task[None] | None = None
    checkpoint: int | None = None


class _ReadAheadQueue:
    """Decoded frames in stream order, bounded by count and by frame bytes."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._items: deque[tuple[Queued, int, _Ahead | None]] = deque()
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, frame: Queued, size: int, ahead: _Ahead | None) -> None:
        self._items.append((frame, size, ahead))
        self._bytes += size
        self._ready.set()
        if len(self._items) >= self.max_frames or self._bytes >= self.max_bytes:
            self._room.clear()

    def has_room(self) -> bool:
        """Whether a frame may be added now (:meth:`wait_for_room` would not wait)."""
        return self._room.is_set()

    def close(self) -> None:
        """No more frames: :meth:`get` returns None once the queue is empty."""
        self._closed = True
        self._ready.set()

    async def wait_for_room(self, processor: asyncio.Task[None]) -> None:
        """Return once a frame may be added, or once *processor* ended (its outcome is the
        reader's to raise)."""
        if self._room.is_set() or processor.done():
            return
        room = asyncio.ensure_future(self._room.wait())
        try:
            await asyncio.wait((room, processor), return_when=asyncio.FIRST_COMPLETED)
        finally:
            room.cancel()

    def peek(self) -> tuple[Queued, _Ahead | None] | None:
        """The next frame if one is queued (not taken)."""
        if not self._items:
            return None
        frame, _, ahead = self._items[0]
        return frame, ahead

    def pop_front(self) -> None:
        """Take the frame :meth:`peek` returned."""
        self.take()

    async def get(self) -> tuple[Queued, _Ahead | None] | None:
        """The next frame, waiting for one; None once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self.take()

    def take(self) -> tuple[Queued, _Ahead | None] | None:
        """The next frame if one is queued (taken), else None, without waiting."""
        if not self._items:
            return None
        frame, size, ahead = self._items.popleft()
        self._bytes -= size
        if len(self._items) < self.max_frames and self._bytes < self.max_bytes:
            self._room.set()
        return frame, ahead


def _chain_reasons(state: RepoState | None, rev: str, root: str | None, prev_data: str | None) -> list[str]:
    """Failed chain checks of a commit (*rev*, MST root *root*, ``prevData``) against the
    repo's last seen *state*."""
    if state is None:
        return []
    if rev == state.rev and root is not None and root == state.data:
        return []  # the same commit again (replayed after a stop mid-commit): at least once
    if rev <= state.rev:
        return ["rev-not-newer"]
    if prev_data is not None and state.data and prev_data != state.data:
        return ["prev-data-mismatch"]
    return []


class FirehoseIngester:
    """Reads one relay; :meth:`run` until cancelled, then :meth:`close` to flush."""

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
        self.verify = config.verify
        self.cursor_key = cursor_key(config.firehose_stream, host)
        self.writer = StreamWriter(
            redis,
            config.firehose_stream,
            high_water_mark=config.firehose_high_water_mark,
            batch_size=config.batch_size,
            batch_timeout_ms=config.batch_timeout_ms,
            pipeline=True,  # the next frames are processed while Redis writes a batch
        )
        self.states = RepoStateStore(redis, config.firehose_stream, max_entries=config.repo_state_cache)
        self._state_prefix = state_key(config.firehose_stream, "")
        self._raw = raw_client(redis)
        self.filter = CollectionFilter(config.collections)
        self._keep_all = "*" in self.filter.patterns  # no filter call per op
        self.last_seq: int | None = None
        self._loaded = False
        self.connected = False
        m = metrics
        self.metrics = m
        self._incoming = m.incoming.labels(host=host)
        self._filtered = m.filtered.labels(host=host)
        self._cursor_gauge = m.cursor.labels(host=host)
        self._skipped = m.duplicates.labels(host=host)
        self._frames = {t: m.frames.labels(host=host, type=t) for t in
                        ("commit", "sync", "identity", "account", "info", "error", "unknown")}
        self._events = {t: m.stream_events.labels(host=host, type=t) for t in
                        ("create", "update", "delete", "identity", "account")}
        self._lag_every = 0
        # read-ahead state (verified modes; see _read_ahead)
        self._prefetches = m.key_prefetches.labels(host=host)
        self._fetch_slots = asyncio.Semaphore(config.resolve_concurrency)
        self._key_fetches: dict[str, asyncio.Task[PublicKey | None]] = {}
        self._state_loads: dict[str, asyncio.Task[None]] = {}
        self._state_batch: list[str] | None = None
        self._state_batch_task: asyncio.Task[None] | None = None

    # -- lifecycle

    async def run(self) -> None:
        self.writer.start()
        url_base = ws_base(self.host) + SUBSCRIBE_REPOS

        async def connect_once() -> str:
            if not self._loaded:
                self.last_seq = await self._load_cursor()
                self._loaded = True
            url = url_base if self.last_seq is None else f"{url_base}?cursor={self.last_seq}"
            self.connected = True
            try:
                if self.verify == "off":  # nothing to fetch ahead: process each frame as it is read
                    return await read_websocket(
                        self.session, url, on_frame=self.handle_frame,
                        before_read=self._wait_below_high_water_mark,
                        idle_timeout_s=self.config.idle_timeout_s, max_frame_bytes=self.config.max_frame_bytes,
                    )
                return await self._read_ahead(url)
            finally:
                self.connected = False

        await reconnect_forever(
            connect_once, min_delay_s=self.config.reconnect_min_s, max_delay_s=self.config.reconnect_max_s,
            healthy_after_s=self.config.healthy_after_s,
            on_reconnect=lambda reason: self.metrics.reconnects.labels(host=self.host, reason=reason).inc(),
        )

    def _wait_below_high_water_mark(self) -> Awaitable[None] | None:
        writer = self.writer
        return None if writer.below_high_water_mark() else writer.wait_below_high_water_mark()

    async def _read_ahead(self, url: str) -> str:
        """One connection with the read-ahead queue between the socket and the processor."""
        queue = _ReadAheadQueue(self.config.read_ahead_frames, self.config.read_ahead_bytes)
        processor = asyncio.create_task(self._process_queue(queue), name=f"firehose-processor:{self.host}")
        self._fetch_slots = asyncio.Semaphore(self.config.resolve_concurrency)

        async def wait_for_room() -> None:
            await queue.wait_for_room(processor)
            if processor.done():
                processor.result()  # its error ends the connection (and the task) as before

        def before_read() -> Awaitable[None] | None:
            return None if queue.has_room() and not processor.done() else wait_for_room()

        async def put_native(checked: CheckedCommit, data: bytes) -> None:
            queue.put(_Native(checked, data), len(data), await self._prepare_repo(checked.repo, True))

        async def put_decoded(data: bytes) -> None:
            frame = self._decode(data)
            if frame is not None:
                queue.put(frame, len(data), await self._prepare(frame))

        def on_frame(data: bytes) -> Awaitable[None] | None:
            checked = check_commit_frame(data, verify=True)
            if checked is None:
                return put_decoded(data)
            self._incoming.inc()
            did = checked.repo
            if self.keys.is_cached(did) and self.states.cached(did):  # the usual case: no await
                queue.put(_Native(checked, data), len(data), None)
                return None
            return put_native(checked, data)

        try:
            reason = await read_websocket(
                self.session, url, on_frame=on_frame, before_read=before_read,
                idle_timeout_s=self.config.idle_timeout_s, max_frame_bytes=self.config.max_frame_bytes,
            )
            queue.close()  # what was read is processed before reconnecting from last_seq
            try:
                await processor
            except (aiohttp.ClientError, OSError, TimeoutError) as e:  # as read_websocket treats them
                log.warning("connection failed", extra={"url": url, "error": str(e) or type(e).__name__})
                return "connect-error"
            return reason
        finally:
            await cancel_and_wait(processor)
            background = [*self._key_fetches.values(), *self._state_loads.values()]
            self._key_fetches.clear()
            self._state_loads.clear()
            self._state_batch = self._state_batch_task = None
            for task in background:
                await cancel_and_wait(task)

    async def _process_queue(self, queue: _ReadAheadQueue) -> None:
        writer = self.writer
        verifying = self.verify != "off"  # (the read-ahead runs only when verifying)
        while True:
            item = queue.take()  # no coroutine while frames are queued (the usual case)
            if item is None:
                item = await queue.get()
                if item is None:
                    return
            frame, ahead = item
            run = self._signature_run(queue, frame, ahead) if isinstance(frame, _Native) and verifying else None
            if run is None:
                if not writer.below_high_water_mark():
                    await writer.wait_below_high_water_mark()
                await self._process(frame, ahead)
                continue
            generation = self.keys.generation
            for native, native_ahead, verdict in run:
                if not writer.below_high_water_mark():
                    await writer.wait_below_high_water_mark()
                # a key dropped meanwhile (a failed signature re-fetches it): check again
                current = self.keys.generation == generation
                if current and verdict[1] and native_ahead is None:
                    entries = self._good_native_commit(native.commit)
                    if entries is not None:  # the usual commit: no await but the stream write
                        if entries and not writer.add_many_nowait(entries):
                            await writer.add_many(entries)
                        self._advance(native.commit.seq, native.commit.time)  # after its events
                        continue
                await self._process(native, native_ahead, verdict if current else None)

    def _signature_run(self, queue: _ReadAheadQueue, first: _Native, ahead: _Ahead | None,
                       ) -> list[tuple[_Native, _Ahead | None, tuple[PublicKey, bool]]] | None:
        """Check the signatures of *first* and the native commits queued right behind it whose
        keys are at hand (up to ``_SIGNATURE_RUN``), back to back; None when *first*'s key is not
        at hand yet (processed the usual way, awaiting it). One after the other, libsecp256k1's
        precomputed tables (~1 MB) stay in the CPU cache: ~40 µs a signature instead of ~53
        when Python work runs between two (measured in the ingester on this machine). Checking
        early changes nothing else: the frames are then processed in order, a run holds commits
        only (no #identity inside), and a verdict is dropped (checked again) when any key was
        invalidated after the run was checked."""
        key = self._key_at_hand(first.commit.repo, ahead)
        if key is None:
            return None
        keys = [(first, ahead, key)]
        while len(keys) < _SIGNATURE_RUN:
            item = queue.peek()
            if item is None:
                break
            nxt, nxt_ahead = item
            if not isinstance(nxt, _Native):
                break
            nxt_key = self._key_at_hand(nxt.commit.repo, nxt_ahead)
            if nxt_key is None:
                break
            queue.pop_front()
            keys.append((nxt, nxt_ahead, nxt_key))
        return [(frame, frame_ahead, (k, k.verify(frame.commit.unsigned or b"", frame.commit.sig or b"")))
                for frame, frame_ahead, k in keys]

    def _good_native_commit(self, checked: CheckedCommit) -> list[dict[str, bytes]] | None:
        """A verified native commit whose signature is good and whose repo state is in memory,
        when nothing fails (the usual case): its repo state moved, its stream entries returned
        for the caller to add before it moves the cursor. None, before any effect, for
        anything else (the caller then runs the general path). The hot path of a verifying
        ingester: the checks of :func:`_chain_reasons` are inlined (same verdicts, tested)."""
        assert checked.data is not None
        repo = checked.repo
        hit, state = self.states.peek(repo)
        if not hit:
            return None
        last = self.last_seq
        if last is not None and checked.seq <= last:
            return None  # replayed: the general path counts and skips it
        root = encode_cid(checked.data)
        rev = checked.rev
        if state is not None and not (rev == state.rev and root == state.data):
            if rev <= state.rev:
                return None
            prev = checked.prev_data
            if prev is not None and state.data and encode_cid(prev) != state.data:
                return None
        self._frames["commit"].inc()
        self.writer.set_cursor_after(self._state_prefix + repo, self.states.put(repo, RepoState(rev, root)))
        counters = self._events
        events = checked.events
        if self._keep_all:
            for _, kind, _ in events:
                counters[kind].value += 1
            return [{"event": event} for _, _, event in events]
        keep = self.filter
        kept = keep.cached  # per-collection answers: one dict lookup per op
        entries = []
        for collection, kind, event in events:
            ok = kept.get(collection)
            if ok if ok is not None else keep(collection):
                entries.append({"event": event})
                counters[kind].value += 1
        if len(entries) != len(events):
            self._filtered.inc(len(events) - len(entries))
        return entries

    def _key_at_hand(self, did: str, ahead: _Ahead | None) -> PublicKey | None:
        """The signing key when it is known without waiting (fetched ahead, or cached)."""
        task = ahead.key if ahead is not None else None
        if task is None:
            return self.keys.cached_key(did)
        if task.done() and not task.cancelled():
            return task.result()
        return None

    async def _prepare(self, frame: Frame) -> _Ahead | None:
        """Start what *frame* will need: its author's key (waiting for a free fetch slot) and,
        for a commit, its repo state. None when it needs nothing."""
        if isinstance(frame, CommitEvent):
            if frame.too_big:
                return None
            return await self._prepare_repo(frame.repo, True)
        if isinstance(frame, SyncEvent):
            return await self._prepare_repo(frame.did, False)
        if isinstance(frame, IdentityEvent):
            return _Ahead(checkpoint=self.keys.checkpoint())
        return None

    async def _prepare_repo(self, did: str, commit: bool) -> _Ahead | None:
        ahead = _Ahead()
        if not self.keys.is_cached(did):
            task = self._key_fetches.get(did)
            if task is None:
                await self._fetch_slots.acquire()
                task = asyncio.create_task(self._fetch_key(did))
                self._key_fetches[did] = task
                self._prefetches.inc()
            ahead.key = task
        if commit and not self.states.cached(did):
            load = self._state_loads.get(did)
            if load is None:
                if self._state_batch is None or self._state_batch_task is None:
                    self._state_batch = []
                    self._state_batch_task = asyncio.create_task(self._load_states())
                self._state_batch.append(did)
                load = self._state_loads[did] = self._state_batch_task
            ahead.state = load
        return ahead if ahead.key is not None or ahead.state is not None else None

    async def _fetch_key(self, did: str) -> PublicKey | None:
        try:
            return await self.keys.signing_key(did)
        except Exception as e:  # never fatal here: the commit is then handled as key-unavailable
            log.warning("signing key fetch failed", extra={"did": did, "error": str(e) or type(e).__name__})
            return None
        finally:
            self._fetch_slots.release()
            self._key_fetches.pop(did, None)

    async def _load_states(self) -> None:
        await asyncio.sleep(0)  # let the reader add the other frames it has in hand to the batch
        dids, self._state_batch, self._state_batch_task = self._state_batch or [], None, None
        try:
            await self.states.load(dids)
        except Exception as e:  # the processor reads them one by one (and reports the error)
            log.warning("repo state read-ahead failed", extra={"repos": len(dids), "error": str(e)})
        finally:
            for did in dids:
                self._state_loads.pop(did, None)

    async def close(self) -> None:
        """Write what is buffered (events, then the cursor covering them)."""
        await self.writer.close()

    async def _load_cursor(self) -> int | None:
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                value = await command(self._raw, "GET", self.cursor_key)
                break
            except Exception as e:
                if not is_transient(e):
                    raise
                log.warning("cannot read cursor, retrying", extra={"key": self.cursor_key, "error": str(e)})
                await backoff.sleep()
        if value is None:
            return self.config.start_cursor
        try:
            return int(text(value))
        except ValueError:
            log.error("stored cursor is not an integer, ignoring it", extra={"key": self.cursor_key,
                                                                            "value": text(value)[:100]})
            return self.config.start_cursor

    # -- frames

    async def handle_frame(self, data: bytes) -> None:
        """Process one binary frame now; never raises for bad content (logged and counted)."""
        checked = check_commit_frame(data, verify=self.verify != "off")
        if checked is not None:
            self._incoming.inc()
            await self._process(_Native(checked, data), None)
            return
        frame = self._decode(data)
        if frame is not None:
            await self._process(frame, None)

    def _decode(self, data: bytes) -> Frame | None:
        self._incoming.inc()
        try:
            return decode_frame(data)
        except FrameError as e:
            self.metrics.bad_frames.labels(host=self.host, reason="decode").inc()
            log.warning("bad frame", extra={"host": self.host, "after_seq": self.last_seq, "bytes": len(data),
                                            "error": str(e)[:300]})
            return None

    async def _process(self, frame: Queued, ahead: _Ahead | None,
                       verdict: tuple[PublicKey, bool] | None = None) -> None:
        if isinstance(frame, _Native):
            checked = frame.commit
            if self._stale(checked.seq):
                return
            self._frames["commit"].inc()
            await self._native_commit(checked, frame.data, ahead, verdict)
            self._advance(checked.seq, checked.time)
        elif isinstance(frame, CommitEvent):
            if self._stale(frame.seq):
                return
            self._frames["commit"].inc()
            await self._commit(frame, ahead)
            self._advance(frame.seq, frame.time)
        elif isinstance(frame, (IdentityEvent, AccountEvent)):
            if self._stale(frame.seq):
                return
            kind = "identity" if isinstance(frame, IdentityEvent) else "account"
            self._frames[kind].inc()
            if isinstance(frame, IdentityEvent):
                self.keys.invalidate(frame.did, fetched_before=ahead.checkpoint if ahead is not None else None)
            for event in to_stream_events(None, frame):
                await self.writer.add({"event": orjson.dumps(event)})
            self._events[kind].inc()
            if isinstance(frame, AccountEvent) and frame.active:
                # an account that is (again) active may have been skipped by the backfill
                # while it was not (the PDS refuses getRepo then): fetch it once more
                await self._resync(frame.did, "", "active")
            self._advance(frame.seq, frame.time)
        elif isinstance(frame, SyncEvent):
            if self._stale(frame.seq):
                return
            self._frames["sync"].inc()
            await self._sync(frame, ahead)
            self._advance(frame.seq, frame.time)
        elif isinstance(frame, InfoEvent):
            self._frames["info"].inc()
            if frame.name == "OutdatedCursor":
                self.metrics.outdated.labels(host=self.host).inc()
            log.warning("relay info", extra={"host": self.host, "name": frame.name, "info": frame.message})
        elif isinstance(frame, ErrorFrame):
            self._frames["error"].inc()
            self.metrics.error_frames.labels(host=self.host, error=frame.error[:64]).inc()
            log.error("relay error frame", extra={"host": self.host, "error": frame.error, "info": frame.message,
                                                  "cursor": self.last_seq})
            if frame.error == "FutureCursor":
                # the relay's sequence restarted below our cursor: start where a new relay starts
                self.last_seq = self.config.start_cursor
        elif isinstance(frame, UnknownEvent):
            self._frames["unknown"].inc()
            if frame.seq is not None and not self._stale(frame.seq):
                self._advance(frame.seq, None)

    def _stale(self, seq: int) -> bool:
        if self.last_seq is not None and seq <= self.last_seq:
            self._skipped.inc()
            return True
        return False

    def _advance(self, seq: int, when: str | None) -> None:
        self.last_seq = seq
        self.writer.set_cursor_after(self.cursor_key, seq)
        self._cursor_gauge.set(seq)
        self._lag_every += 1
        if when is not None and self._lag_every >= 100:
            self._lag_every = 0
            try:
                lag = time.time() - datetime.fromisoformat(when).timestamp()
            except ValueError:
                return
            self.metrics.lag.labels(host=self.host).set(max(lag, 0.0))

    async def _resync(self, did: str, rev: str, reason: str) -> None:
        self.metrics.resyncs.labels(host=self.host, reason=reason).inc()
        request = BackfillRequest(did=did, host=self.host, rev=rev)
        await self.writer.add(backfill_fields(request), stream=self.config.repo_stream)

    def _fail(self, reason: str) -> None:
        self.metrics.verify_failures.labels(host=self.host, reason=reason).inc()

    async def _commit(self, ev: CommitEvent, ahead: _Ahead | None) -> None:
        """The Python path: any commit the native one did not take."""
        if ev.too_big:
            await self._resync(ev.repo, ev.rev, "too-big")
            return
        if self.verify == "off":  # trust the relay: no signature, proof or block hashes
            result = process_commit_unverified(ev)
            reasons = list(result.reasons)
        else:
            result, reasons = await self._verified(ev, ahead)
        data = result.data
        dumps = orjson.dumps
        events = [(op.collection, op.action, dumps(event))
                  for op, event in zip(result.ops, to_stream_events(result, ev), strict=True)]
        await self._emit(ev.repo, ev.rev, ev.seq, reasons, result.errors,
                         cid_str(data) if data is not None else "", events)

    async def _native_commit(self, checked: CheckedCommit, data: bytes, ahead: _Ahead | None,
                             verdict: tuple[PublicKey, bool] | None = None) -> None:
        """A commit the native path decoded and checked (blocks, commit, proof when verifying):
        here the signature (unless *verdict* holds its key and outcome) and the repo chain;
        anything but a good signature goes to the Python path, which refreshes a rotated key
        and reports exactly."""
        if self.verify == "off":
            await self._emit(checked.repo, checked.rev, checked.seq, [], [], "", checked.events)
            return
        assert checked.unsigned is not None and checked.sig is not None and checked.data is not None
        if verdict is not None:
            good = verdict[1]
        else:
            key = self._key_at_hand(checked.repo, ahead)
            if key is None:
                key = await self._key(checked.repo, ahead)
            good = key is not None and key.verify(checked.unsigned, checked.sig)
        if not good:
            frame = decode_frame(data)  # the same frame: a CommitEvent by check_commit_frame's contract
            assert isinstance(frame, CommitEvent)
            await self._commit(frame, ahead)
            return
        root = str(encode_cid(checked.data))
        prev = str(encode_cid(checked.prev_data)) if checked.prev_data is not None else None
        hit, state = self.states.peek(checked.repo) if ahead is None or ahead.state is None else (False, None)
        if hit:
            reasons = _chain_reasons(state, checked.rev, root, prev)
        else:
            reasons = await self._chain(checked.repo, checked.rev, root, prev, ahead)
        await self._emit(checked.repo, checked.rev, checked.seq, reasons, [], root, checked.events)

    async def _emit(self, repo: str, rev: str, seq: int, reasons: list[str], errors: list[str],
                    root: str, events: Events) -> None:
        """Count the failed checks, apply the mode's policy, move the repo state and queue the
        events that pass the collection filter."""
        for reason in reasons:
            self._fail(reason)
        if reasons and self.verify == "strict":
            self.metrics.dropped.labels(host=self.host).inc()
            log.warning("commit dropped", extra={"host": self.host, "seq": seq, "did": repo,
                                                 "reasons": reasons, "errors": errors[:3]})
            self.writer.set_cursor_after(state_key(self.config.firehose_stream, repo),
                                         self.states.put(repo, None))
            await self._resync(repo, rev, "verification")
            return
        if reasons:
            log.info("commit failed checks, passed on", extra={"host": self.host, "seq": seq, "did": repo,
                                                               "reasons": reasons})
            if not _DATA_LOSS.isdisjoint(reasons):
                await self._resync(repo, rev, "incomplete")
        if self.verify != "off":
            value = self.states.put(repo, RepoState(rev, root))
            self.writer.set_cursor_after(self._state_prefix + repo, value)
        keep = None if self._keep_all else self.filter
        counters = self._events
        entries = []
        for collection, kind, event in events:  # one pass: filter, entries, counts
            if keep is None or keep(collection):
                entries.append({"event": event})
                counters[kind].inc()
        if len(entries) != len(events):
            self._filtered.inc(len(events) - len(entries))
        if entries:
            await self.writer.add_many(entries)

    async def _verified(self, ev: CommitEvent, ahead: _Ahead | None) -> tuple[CommitResult, list[str]]:
        key = await self._key(ev.repo, ahead)
        result = process_commit(ev, signing_key=key, check_proof=True)
        if result.signature is False:  # the key may have rotated since it was cached
            self.keys.invalidate(ev.repo)
            fresh = await self.keys.signing_key(ev.repo)
            if fresh is not None and fresh != key:
                result = process_commit(ev, signing_key=fresh, check_proof=True)
        reasons = list(result.reasons)
        if key is None:
            reasons.append("key-unavailable")
        data = result.data
        reasons += await self._chain(ev.repo, ev.rev, cid_str(data) if data is not None else None,
                                     cid_str(ev.prev_data) if ev.prev_data is not None else None, ahead)
        return result, reasons

    async def _chain(self, repo: str, rev: str, root: str | None, prev_data: str | None,
                     ahead: _Ahead | None) -> list[str]:
        """The repo's rev and ``prevData`` chain against the last state seen (in Redis)."""
        if ahead is not None and ahead.state is not None:
            await ahead.state  # never raises; afterwards get() answers from memory
        hit, state = self.states.peek(repo)
        if not hit:
            state = await self.states.get(repo)
        return _chain_reasons(state, rev, root, prev_data)

    async def _key(self, did: str, ahead: _Ahead | None) -> PublicKey | None:
        """The signing key: fetched ahead by the reader, or now."""
        if ahead is not None and ahead.key is not None:
            return await ahead.key
        return await self.keys.signing_key(did)

    async def _sync(self, ev: SyncEvent, ahead: _Ahead | None) -> None:
        if self.verify != "off":
            key = await self._key(ev.did, ahead)
            res = process_sync(ev, signing_key=key)
            reasons: list[str] = list(res.reasons) + ([] if key is not None else ["key-unavailable"])
            for reason in reasons:
                self._fail(reason)
            if not reasons or self.verify == "lenient":
                data: Any = res.commit.data if res.commit is not None else None
                state = RepoState(ev.rev, cid_str(data) if data is not None else "")
                self.writer.set_cursor_after(state_key(self.config.firehose_stream, ev.did),
                                             self.states.put(ev.did, state))
        await self._resync(ev.did, ev.rev, "sync")
