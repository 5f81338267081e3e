"""Per-repo chain state (last rev and MST root) and the verification policy of the firehose.

The last seen ``rev`` and ``data`` (MST root CID) of each repo are kept in memory (bounded
LRU) and persisted in Redis under ``<firehose stream>:repo:<did>`` as ``"<rev> <data cid>"``.
The value is written by the stream writer in the same script call as the events and the
cursor it covers, so after a restart Redis holds exactly the state of the last commit that
reached the stream; a commit replayed from the cursor then finds the state before it.
Signing keys come from the shared :class:`~psky.identity.IdentityResolver` cache; the parsed
public keys are cached here too, since parsing a key costs more than a verification.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import NamedTuple

import redis.asyncio as aioredis

from psky.atproto.crypto import PublicKey, verifier_for
from psky.identity import IdentityResolver, ResolutionError
from psky.streams._redis import Backoff, command, is_transient, raw_client, text

__all__ = ["KeyCache", "RepoState", "RepoStateStore", "state_key"]

log = logging.getLogger(__name__)


class RepoState(NamedTuple):
    """A repo's last seen rev and MST root (a tuple: made once per commit on the hot path)."""

    rev: str
    data: str  # MST root CID string ("" when unknown)

    def encode(self) -> str:
        return f"{self.rev} {self.data}"

    @classmethod
    def decode(cls, value: str) -> RepoState | None:
        rev, _, data = value.partition(" ")
        return cls(rev, data) if rev else None


def state_key(firehose_stream: str, did: str) -> str:
    return f"{firehose_stream}:repo:{did}"


class RepoStateStore:
    """Last known state per repo: memory first, Redis on a miss (one GET per new repo)."""

    def __init__(self, redis: aioredis.Redis, firehose_stream: str, *, max_entries: int = 200_000) -> None:
        self._raw = raw_client(redis)
        self.stream = firehose_stream
        self.max_entries = max_entries
        self._cache: OrderedDict[str, RepoState | None] = OrderedDict()

    async def get(self, did: str) -> RepoState | None:
        if did in self._cache:
            self._cache.move_to_end(did)
            return self._cache[did]
        backoff = Backoff(0.05, 5.0)
        while True:
            try:
                value = await command(self._raw, "GET", state_key(self.stream, did))
                break
            except Exception as e:
                if not is_transient(e):
                    raise
                log.warning("repo state read failed, retrying", extra={"did": did, "error": str(e)})
                await backoff.sleep()
        state = RepoState.decode(text(value)) if value is not None else None
        self._remember(did, state)
        return state

    def cached(self, did: str) -> bool:
        """Whether :meth:`get` answers from memory (no Redis read)."""
        return did in self._cache

    def peek(self, did: str) -> tuple[bool, RepoState | None]:
        """(True, state) when :meth:`get` would answer from memory, else (False, None)."""
        cache = self._cache
        if did not in cache:
            return False, None
        cache.move_to_end(did)
        return True, cache[did]

    async def load(self, dids: list[str]) -> None:
        """Read the states of *dids* not in memory yet with one MGET (read-ahead, so that
        :meth:`get` finds them). A state remembered meanwhile is newer than Redis and kept."""
        keys = [state_key(self.stream, did) for did in dids]
        backoff = Backoff(0.05, 5.0)
        while True:
            try:
                values = await command(self._raw, "MGET", *keys)
                break
            except Exception as e:
                if not is_transient(e):
                    raise
                log.warning("repo state read failed, retrying", extra={"repos": len(dids), "error": str(e)})
                await backoff.sleep()
        for did, value in zip(dids, values, strict=True):
            if did not in self._cache:
                self._remember(did, RepoState.decode(text(value)) if value is not None else None)

    def put(self, did: str, state: RepoState | None) -> str:
        """Remember *state* (None forgets the chain); returns the value to persist."""
        self._remember(did, state)
        return state.encode() if state is not None else ""

    def _remember(self, did: str, state: RepoState | None) -> None:
        self._cache[did] = state
        self._cache.move_to_end(did)
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)


class KeyCache:
    """Signing keys: did:key strings from the resolver, parsed once into verifiers."""

    def __init__(self, resolver: IdentityResolver, *, max_entries: int = 100_000) -> None:
        self.resolver = resolver
        self.max_entries = max_entries
        self._parsed: OrderedDict[str, PublicKey] = OrderedDict()
        #: moves on every invalidation: a signature checked with a key taken before a move
        #: is checked again (see FirehoseIngester._signature_run)
        self.generation = 0

    def parse(self, did_key: str) -> PublicKey:
        key = self._parsed.get(did_key)
        if key is None:
            key = verifier_for(did_key)
            self._parsed[did_key] = key
            if len(self._parsed) > self.max_entries:
                self._parsed.popitem(last=False)
        return key

    async def signing_key(self, did: str) -> PublicKey | None:
        """The repo signing key, or None when it cannot be resolved (logged by the caller)."""
        try:
            return self.parse(await self.resolver.signing_key(did))
        except (ResolutionError, ValueError):
            return None

    def cached_key(self, did: str) -> PublicKey | None:
        """The signing key when the document is cached (no await), else None."""
        did_key = self.resolver.cached_signing_key(did)
        if did_key is None:
            return None
        try:
            return self.parse(did_key)
        except ValueError:
            return None

    async def label_key(self, did: str) -> PublicKey | None:
        try:
            doc = await self.resolver.resolve(did)
            return self.parse(doc.labeler_key) if doc.labeler_key else None
        except (ResolutionError, ValueError):
            return None

    def is_cached(self, did: str) -> bool:
        """Whether :meth:`signing_key` would answer without a fetch."""
        return self.resolver.cached(did) is not None

    def checkpoint(self) -> int:
        return self.resolver.checkpoint()

    def invalidate(self, did: str, *, fetched_before: int | None = None) -> None:
        """Drop *did*'s document (only if fetched before the *fetched_before* checkpoint)."""
        self.generation += 1
        self.resolver.invalidate(did, fetched_before=fetched_before)
