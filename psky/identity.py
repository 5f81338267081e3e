"""DID and handle resolution over HTTP with a shared TTL cache.

DIDs: did:plc through a PLC directory (`PLC_URL`), did:web through its `/.well-known/did.json`.
Handles: `https://<handle>/.well-known/atproto-did`. Networks without DNS (psky's local test
network, private deployments) route handles with `PSKY_HANDLE_RESOLVER_MAP`, a comma-separated
list of `pattern=base-url` (`*.pds1.test=http://127.0.0.1:2583,alice.example=http://10.0.0.5`):
a handle matching a pattern is asked at that base URL with the handle in the `Host` header.

Services resolve the same few DIDs over and over (every commit needs its author's signing
key), so documents are cached; `invalidate()` drops one when an `#identity` event says it
changed. Fetches are numbered as they start, so a reader that looks ahead in a stream can
invalidate only what was fetched before it read the `#identity` event (`checkpoint()`):
a document fetched after that already reflects the change and is kept. Documents are parsed by `psky.atproto.did`, which accepts both the absolute
(`did:plc:…#atproto`) and relative (`#atproto`) ids that real documents use.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from typing import Any

import aiohttp
import orjson

from psky.atproto.did import DidDocument, InvalidDidDocument, did_web_to_url, parse_did_document
from psky.origin_client import BodyTooLarge, OriginClient, OriginProtocolError

DEFAULT_PLC_URL = "https://plc.directory"

_PLC_DID = re.compile(r"did:plc:[a-z2-7]{24}\Z")


def parse_handle_map(text: str, variable: str = "PSKY_HANDLE_RESOLVER_MAP") -> list[tuple[str, str]]:
    """`*.a.test=http://127.0.0.1:1,b.test=http://h` → [(pattern, base URL), ...], checked."""
    out: list[tuple[str, str]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        pattern, sep, url = part.partition("=")
        pattern, url = pattern.strip().lower(), url.strip().rstrip("/")
        if not sep or not pattern or not url.startswith(("http://", "https://")):
            raise ValueError(f"{variable}: expected pattern=http(s)://host[:port] items, got {part!r}")
        if "*" in pattern and not (pattern.startswith("*.") and "*" not in pattern[2:]):
            raise ValueError(f"{variable}: a wildcard must be a leading '*.', got {pattern!r}")
        out.append((pattern, url))
    return out


def _map_handle(handle_map: list[tuple[str, str]], handle: str) -> str | None:
    for pattern, url in handle_map:
        if pattern == handle or (pattern.startswith("*.") and handle.endswith(pattern[1:])):
            return url
    return None


async def _read_up_to(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first *limit* bytes: ``content.read(n)`` alone returns what has
    arrived so far, which cuts a body that came in several reads."""
    body = b""
    while len(body) < limit:
        chunk = await resp.content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return body


class ResolutionError(Exception):
    """The DID could not be resolved (not found, unreachable, or an invalid document)."""


class IdentityResolver:
    def __init__(
        self,
        plc_url: str = DEFAULT_PLC_URL,
        *,
        timeout_s: float = 10.0,
        ttl_s: float = 3600.0,
        max_entries: int = 100_000,
        session: aiohttp.ClientSession | None = None,
        handle_map: str | list[tuple[str, str]] = "",
    ) -> None:
        self.plc_url = plc_url.rstrip("/")
        self.handle_map = parse_handle_map(handle_map) if isinstance(handle_map, str) else handle_map
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        #: did → (expiry, document, number of the fetch that got it)
        self._cache: OrderedDict[str, tuple[float, DidDocument, int]] = OrderedDict()
        self._inflight: dict[str, tuple[asyncio.Future[DidDocument], int]] = {}
        self._fetches_started = 0
        self._stale_fetches: set[int] = set()  # in flight when invalidated: not cached
        self._session = session
        self._own_session = session is None
        # did:plc documents through kept-alive connections of a lean client (a fraction of
        # aiohttp's CPU per document); aiohttp for the rest, and for whatever it declines.
        # A caller's own session keeps every request (its settings apply).
        self._plc: OriginClient | None = None
        if session is None:
            try:
                self._plc = OriginClient(self.plc_url)
            except ValueError:
                self._plc = None

    async def __aenter__(self) -> IdentityResolver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._plc is not None:
            await self._plc.close()
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    def checkpoint(self) -> int:
        """A mark for :meth:`invalidate`: fetches started from now on are at or above it."""
        return self._fetches_started

    def invalidate(self, did: str, *, fetched_before: int | None = None) -> None:
        """Forget *did*'s document (and do not cache a fetch of it now in flight); with
        *fetched_before* (a :meth:`checkpoint`), only when it was fetched before that mark."""
        limit = self._fetches_started if fetched_before is None else fetched_before
        hit = self._cache.get(did)
        if hit is not None and hit[2] < limit:
            del self._cache[did]
        pending = self._inflight.get(did)
        if pending is not None and pending[1] < limit:
            self._stale_fetches.add(pending[1])

    def cached(self, did: str) -> DidDocument | None:
        """The cached document when fresh, without fetching (None: a resolve would fetch)."""
        hit = self._cache.get(did)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def cached_signing_key(self, did: str) -> str | None:
        """The signing key of a fresh cached document (used: moved to the LRU's end), or
        None; a synchronous shortcut of :meth:`signing_key` for callers on a hot path."""
        hit = self._cache.get(did)
        if hit is None or hit[0] <= time.monotonic() or not hit[1].signing_key:
            return None
        self._cache.move_to_end(did)
        return hit[1].signing_key

    def document_url(self, did: str) -> str:
        if did.startswith("did:plc:"):
            return f"{self.plc_url}/{did}"
        if did.startswith("did:web:"):
            return did_web_to_url(did)
        raise ResolutionError(f"unsupported DID method: {did!r:.100}")

    async def resolve(self, did: str) -> DidDocument:
        """The DID document, from the cache when fresh; concurrent callers share one request."""
        hit = self._cache.get(did)
        if hit is not None and hit[0] > time.monotonic():
            self._cache.move_to_end(did)
            return hit[1]
        pending = self._inflight.get(did)
        if pending is not None:
            return await asyncio.shield(pending[0])
        fut: asyncio.Future[DidDocument] = asyncio.get_running_loop().create_future()
        number = self._fetches_started
        self._fetches_started += 1
        self._inflight[did] = (fut, number)
        try:
            doc = await self._fetch(did)
            if number in self._stale_fetches:  # invalidated while in flight: answer, not cached
                self._stale_fetches.discard(number)
            else:
                self._store(did, doc, number)
            fut.set_result(doc)
            return doc
        except BaseException as e:
            self._stale_fetches.discard(number)
            fut.set_exception(e)
            fut.exception()  # mark retrieved: a lone caller must not log "never retrieved"
            raise
        finally:
            del self._inflight[did]

    def _store(self, did: str, doc: DidDocument, number: int) -> None:
        self._cache[did] = (time.monotonic() + self.ttl_s, doc, number)
        self._cache.move_to_end(did)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    async def _fetch(self, did: str) -> DidDocument:
        url = self.document_url(did)
        if self._plc is not None and _PLC_DID.match(did):
            body = await self._fetch_plc(did, url)
            if body is not None:
                return self._parse(did, url, body)
        try:
            async with self._http().get(url, headers={"accept": "application/json"}) as resp:
                if resp.status == 404 or resp.status == 410:
                    raise ResolutionError(f"{did}: not found ({resp.status} from {url})")
                if resp.status != 200:
                    raise ResolutionError(f"{did}: HTTP {resp.status} from {url}")
                body = await _read_up_to(resp, 1_000_001)
                if len(body) > 1_000_000:
                    raise ResolutionError(f"{did}: DID document over 1 MB at {url}")
        except (TimeoutError, aiohttp.ClientError) as e:
            raise ResolutionError(f"{did}: cannot fetch {url}: {e or type(e).__name__}") from None
        return self._parse(did, url, body)

    async def _fetch_plc(self, did: str, url: str) -> bytes | None:
        """The document's bytes through the lean client, or None when it declined the reply."""
        assert self._plc is not None
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await self._plc.get("/" + did)
        except BodyTooLarge:
            raise ResolutionError(f"{did}: DID document over 1 MB at {url}") from None
        except (TimeoutError, OSError, asyncio.IncompleteReadError, OriginProtocolError) as e:
            raise ResolutionError(f"{did}: cannot fetch {url}: {e or type(e).__name__}") from None
        if answer is None:
            return None
        status, body = answer
        if status == 404 or status == 410:
            raise ResolutionError(f"{did}: not found ({status} from {url})")
        if status != 200:
            raise ResolutionError(f"{did}: HTTP {status} from {url}")
        return body

    @staticmethod
    def _parse(did: str, url: str, body: bytes) -> DidDocument:
        try:
            raw: Any = orjson.loads(body)
            return parse_did_document(raw, expected_did=did)
        except (orjson.JSONDecodeError, InvalidDidDocument) as e:
            raise ResolutionError(f"{did}: invalid DID document from {url}: {e}") from None

    async def signing_key(self, did: str) -> str:
        doc = await self.resolve(did)
        if not doc.signing_key:
            raise ResolutionError(f"{did}: DID document has no #atproto signing key")
        return doc.signing_key

    async def resolve_handle(self, handle: str) -> str | None:
        """The DID a handle claims through `/.well-known/atproto-did`, or None.

        This is one direction only: a handle is valid for a DID when this answer and the
        DID document's `alsoKnownAs` agree (the caller checks both).
        """
        handle = handle.lower()
        base = _map_handle(self.handle_map, handle)
        url = f"{base}/.well-known/atproto-did" if base else f"https://{handle}/.well-known/atproto-did"
        headers = {"host": handle} if base else {}
        try:
            async with self._http().get(url, headers=headers, allow_redirects=False) as resp:
                if resp.status != 200:
                    return None
                body = (await _read_up_to(resp, 2049)).decode("utf-8", "replace").strip()
        except (TimeoutError, aiohttp.ClientError):
            return None
        return body if body.startswith("did:") and len(body) <= 2048 and "\n" not in body else None
