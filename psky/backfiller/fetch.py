"""``com.atproto.sync.getRepo`` over HTTP, streamed into verification, with every failure
sorted into what the worker does about it:

* :class:`Transient` — retry later (timeouts, connection errors, 5xx, 408, 429);
* :class:`Permanent` — the PDS says the repo is not available (``RepoNotFound``,
  ``RepoTakendown``, ``RepoDeactivated``, ``RepoSuspended``): acknowledge, maybe tell the indexer;
* :class:`Fatal` — retrying cannot help (corrupt or oversized CAR, bad signature, refused
  address, other 4xx): dead-letter with the reason.

Redirects are followed by hand (at most ``max_redirects``) so each hop passes the address guard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import urlencode, urljoin

import aiohttp
import orjson

from psky.atproto.repo import RepoError, VerifiedRepo, averify_repo_stream, verify_repo
from psky.backfiller.hosts import AddressGuard, AddressRefused, parse_retry_after

__all__ = ["PERMANENT_ERRORS", "Fatal", "FetchFailure", "Permanent", "Transient", "fetch_repo"]

#: XRPC error names meaning "this repo is not (or no longer) here" → account status
PERMANENT_ERRORS: dict[str, str] = {
    "RepoNotFound": "deleted",
    "RepoTakendown": "takendown",
    "RepoDeactivated": "deactivated",
    "RepoSuspended": "suspended",
}

FatalKind = Literal["fetch", "parse", "verify", "refused", "too_large"]

_CHUNK = 256 * 1024
#: CARs announced (Content-Length) at most this large are read whole, larger ones streamed
IN_MEMORY_MAX = 1024 * 1024
_ERROR_BODY_MAX = 64 * 1024


class FetchFailure(Exception):
    """Base of the three outcomes above; ``reason`` is what the DLQ and logs show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Transient(FetchFailure):
    def __init__(self, reason: str, *, retry_after: float | None = None, rate_limited: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.rate_limited = rate_limited


class Permanent(FetchFailure):
    def __init__(self, reason: str, error: str, status: str) -> None:
        super().__init__(reason)
        self.error = error
        self.status = status


class Fatal(FetchFailure):
    def __init__(self, reason: str, kind: FatalKind) -> None:
        super().__init__(reason)
        self.kind = kind


async def _error_name(resp: aiohttp.ClientResponse) -> tuple[str | None, str]:
    try:
        body = await resp.content.read(_ERROR_BODY_MAX)
        obj = orjson.loads(body)
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
        return None, ""
    if type(obj) is not dict:
        return None, ""
    error, message = obj.get("error"), obj.get("message")
    return (error if type(error) is str else None), (message[:300] if type(message) is str else "")


async def _chunks(resp: aiohttp.ClientResponse, counter: list[int]) -> AsyncIterator[bytes]:
    async for chunk in resp.content.iter_chunked(_CHUNK):
        counter[0] += len(chunk)
        yield chunk


async def fetch_repo(
    session: aiohttp.ClientSession,
    guard: AddressGuard,
    endpoint: str,
    did: str,
    signing_key: str,
    *,
    max_car_bytes: int,
    max_redirects: int = 3,
) -> tuple[VerifiedRepo, int]:
    """Fetch and fully verify *did*'s repo from the PDS at *endpoint*; (repo, bytes read).

    Raises one of :class:`Transient`, :class:`Permanent`, :class:`Fatal`.
    """
    url = f"{endpoint.rstrip('/')}/xrpc/com.atproto.sync.getRepo?{urlencode({'did': did})}"
    counter = [0]
    for _hop in range(max_redirects + 1):
        try:
            guard.check_url(url)
        except AddressRefused as e:
            raise Fatal(str(e), "refused") from None
        try:
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.headers.get("Location")
                    if not location:
                        raise Fatal(f"redirect {resp.status} without Location from {url}", "fetch")
                    url = urljoin(url, location)
                    continue
                if resp.status != 200:
                    await _raise_for_status(resp, url)
                length = resp.content_length
                if length is not None and length > max_car_bytes:
                    raise Fatal(
                        f"repo CAR of {length} bytes exceeds the limit of {max_car_bytes}", "too_large"
                    )
                try:
                    encoded = resp.headers.get("Content-Encoding", "identity").lower() != "identity"
                    if length is not None and length <= IN_MEMORY_MAX and not encoded:
                        # small, announced and not compressed (the length is the CAR's): one
                        # read, then the in-memory verifier, cheaper per block than the
                        # incremental parser, with memory bounded the same
                        body = await resp.read()
                        counter[0] = len(body)
                        repo = verify_repo(body, did=did, signing_key=signing_key)
                    else:
                        repo = await averify_repo_stream(
                            _chunks(resp, counter),
                            did=did,
                            signing_key=signing_key,
                            max_total_size=max_car_bytes,
                        )
                except RepoError as e:
                    text = str(e)
                    if "exceed" in text or "too large" in text or "limit" in text:
                        raise Fatal(f"repo CAR too large: {text}", "too_large") from None
                    if text.startswith("not a valid CAR"):
                        raise Fatal(text, "parse") from None
                    raise Fatal(text, "verify") from None
        except FetchFailure:
            raise
        except aiohttp.ClientPayloadError as e:
            raise Transient(f"connection cut while reading the repo from {url}: {e}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise Transient(f"cannot fetch {url}: {type(e).__name__}: {e}") from None
        if not repo.ok:
            problem = (
                repo.signature_error
                or repo.mst_error
                or (f"{len(repo.missing_records)} record blocks missing" if repo.missing_records else None)
                or f"invalid record paths: {repo.invalid_paths[:3]}"
            )
            raise Fatal(f"repo verification failed: {problem}", "verify")
        return repo, counter[0]
    raise Fatal(f"more than {max_redirects} redirects fetching {did}'s repo", "fetch")


async def _raise_for_status(resp: aiohttp.ClientResponse, url: str) -> None:
    status = resp.status
    if status == 429:
        wait = parse_retry_after(resp.headers)
        raise Transient(f"rate limited (429) by {url}", retry_after=wait, rate_limited=True)
    if status >= 500 or status == 408:
        wait = parse_retry_after(resp.headers) if status == 503 else None
        raise Transient(f"HTTP {status} from {url}", retry_after=wait)
    error, message = await _error_name(resp)
    if error in PERMANENT_ERRORS:
        raise Permanent(f"{error}: {message}" if message else error, error, PERMANENT_ERRORS[error])
    detail = f" {error}" if error else ""
    raise Fatal(f"HTTP {status}{detail} from {url}{': ' + message if message else ''}", "fetch")
