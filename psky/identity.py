"""DID resolution over HTTP with a shared TTL cache (did:plc via a PLC directory, did:web).

Services resolve the same few DIDs over and over (every commit needs its author's signing
key), so documents are cached; `invalidate()` drops one when an `#identity` event says it
changed. Documents are parsed by `psky.atproto.did`, which accepts both the absolute
(`did:plc:…#atproto`) and relative (`#atproto`) ids that real documents use.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

import aiohttp
import orjson

from psky.atproto.did import DidDocument, InvalidDidDocument, did_web_to_url, parse_did_document

DEFAULT_PLC_URL = "https://plc.directory"


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
    ) -> None:
        self.plc_url = plc_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[float, DidDocument]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[DidDocument]] = {}
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> IdentityResolver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    def invalidate(self, did: str) -> None:
        self._cache.pop(did, None)

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
            return await asyncio.shield(pending)
        fut: asyncio.Future[DidDocument] = asyncio.get_running_loop().create_future()
        self._inflight[did] = fut
        try:
            doc = await self._fetch(did)
            self._store(did, doc)
            fut.set_result(doc)
            return doc
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: a lone caller must not log "never retrieved"
            raise
        finally:
            del self._inflight[did]

    def _store(self, did: str, doc: DidDocument) -> None:
        self._cache[did] = (time.monotonic() + self.ttl_s, doc)
        self._cache.move_to_end(did)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    async def _fetch(self, did: str) -> DidDocument:
        url = self.document_url(did)
        try:
            async with self._http().get(url, headers={"accept": "application/json"}) as resp:
                if resp.status == 404 or resp.status == 410:
                    raise ResolutionError(f"{did}: not found ({resp.status} from {url})")
                if resp.status != 200:
                    raise ResolutionError(f"{did}: HTTP {resp.status} from {url}")
                body = await resp.content.read(1_000_001)
                if len(body) > 1_000_000:
                    raise ResolutionError(f"{did}: DID document over 1 MB at {url}")
        except (TimeoutError, aiohttp.ClientError) as e:
            raise ResolutionError(f"{did}: cannot fetch {url}: {e or type(e).__name__}") from None
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
