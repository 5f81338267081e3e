"""Fault injection knobs shared by every devnet server.

One :class:`Faults` object is handed by reference to the PLC directory, the PDSes, the relay
and the labeler, so a test can flip a knob while the network runs and the next frame or
request obeys it. Every knob is off by default. Servers ask small questions
(:meth:`Faults.tick`, :meth:`Faults.chance`, :meth:`Faults.uses_private_address`) instead of
keeping their own counters, which keeps "every N" behaviour consistent across servers.

The CLI form is a comma-separated list, e.g.
``drop_after_frames=100,http_429_every=3,bad_signature=0.1,private_address_dids=did:plc:a|did:plc:b``;
a bare boolean knob name means ``true``.
"""

from __future__ import annotations

import asyncio
import random
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

__all__ = ["Faults", "http_fault_middleware"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Faults:
    """Mutable set of fault knobs; 0 / False / empty means "off"."""

    # --- websocket streams (PDS, relay, labeler) ---
    #: close each subscriber's websocket after it was sent this many frames
    drop_after_frames: int = 0
    #: stop sending for this many seconds, once per connection ...
    stall_seconds: float = 0.0
    #: ... after this many frames were sent on that connection (0 = before the first frame)
    stall_after_frames: int = 0
    #: every Nth frame is replaced by bytes that are not a valid frame
    malformed_every: int = 0
    #: every Nth frame is padded beyond the firehose frame size limit
    oversized_every: int = 0
    #: every Nth frame gets a seq lower than the previous frame's
    seq_out_of_order_every: int = 0
    #: every Nth frame is followed by a second copy of itself (same seq)
    seq_replay_every: int = 0

    # --- repository content (PDS) and labels (labeler) ---
    #: sign commits / labels with a wrong key: true for all, or a probability in [0, 1]
    bad_signature: bool | float = False
    #: emit commits whose proof does not hold (wrong prevData / missing proof blocks): bool or probability
    broken_proof: bool | float = False

    # --- HTTP (all servers) ---
    #: every Nth HTTP request answers 429 with RateLimit-* and Retry-After headers
    http_429_every: int = 0
    #: Retry-After / RateLimit-Reset seconds announced by the 429 responses
    retry_after_seconds: int = 1
    #: every Nth HTTP request answers 500
    http_500_every: int = 0
    #: delay every HTTP response by this many milliseconds
    slow_response_ms: int = 0

    #: listRepos pages that would include one of these DIDs answer 500 (relay; a broken account row)
    list_repos_500_dids: frozenset[str] = frozenset()

    # --- getRepo CARs (PDS) ---
    #: cut served repo CARs short in the middle of a block
    car_truncate: bool = False
    #: flip a byte inside a block of served repo CARs so its hash no longer matches
    car_corrupt: bool = False
    #: pad served repo CARs with an extra block of this many bytes (0 = off)
    car_oversized_bytes: int = 0
    #: stream repo CARs chunked (no Content-Length) followed by this many bytes of 16 KiB blocks
    car_stream_pad_bytes: int = 0

    # --- scope ---
    #: HTTP and getRepo faults hit only the PDSes with these hostnames (empty = every server)
    only_hosts: frozenset[str] = frozenset()

    # --- identity (PLC) ---
    #: DIDs whose served document points the PDS at a private address; true = every DID
    private_address_dids: bool | frozenset[str] = False
    #: the private/link-local endpoint used by private_address_dids
    private_address_endpoint: str = "http://169.254.169.254"

    #: seed of the random source behind probability knobs (reproducible runs)
    seed: int = 0

    _counters: dict[tuple[str, str], int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _rng: random.Random = field(init=False, repr=False, compare=False)

    #: shorthand names accepted by :meth:`parse`
    ALIASES: ClassVar[dict[str, str]] = {
        "drop_after": "drop_after_frames",
        "stall": "stall_seconds",
        "stall_after": "stall_after_frames",
        "malformed": "malformed_every",
        "oversized": "oversized_every",
        "http_429": "http_429_every",
        "http_500": "http_500_every",
        "slow_ms": "slow_response_ms",
        "private_address": "private_address_dids",
    }

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        if isinstance(self.private_address_dids, set | list | tuple):
            self.private_address_dids = frozenset(self.private_address_dids)
        if not isinstance(self.list_repos_500_dids, frozenset):
            self.list_repos_500_dids = frozenset(self.list_repos_500_dids)
        if not isinstance(self.only_hosts, frozenset):
            self.only_hosts = frozenset(self.only_hosts)

    # ------------------------------------------------------------------ queries

    def tick(self, knob: str, key: str = "") -> bool:
        """Count one event for an "every N" knob; True on every Nth event (False when off).

        ``key`` separates independent counters, e.g. one per websocket connection.
        """
        every = getattr(self, knob)
        if not isinstance(every, int) or isinstance(every, bool):
            raise ValueError(f"fault knob {knob!r} is not an 'every N' counter")
        if every <= 0:
            return False
        count = self._counters.get((knob, key), 0) + 1
        self._counters[(knob, key)] = count
        return count % every == 0

    def chance(self, knob: str) -> bool:
        """Decide a bool-or-probability knob (``bad_signature``, ``broken_proof``) for one event."""
        value = getattr(self, knob)
        if value is True:
            return True
        if value is False or not isinstance(value, float | int) or value <= 0:
            return False
        return value >= 1 or self._rng.random() < value

    def uses_private_address(self, did: str) -> bool:
        """Whether the PLC document served for ``did`` must point at a private endpoint."""
        knob = self.private_address_dids
        if isinstance(knob, bool):
            return knob
        return did in knob

    def applies_to(self, server: str | None) -> bool:
        """Whether HTTP/getRepo faults hit the server named *server* (a PDS hostname; None
        for the PLC, relay and labeler) under ``only_hosts``."""
        return not self.only_hosts or (server is not None and server in self.only_hosts)

    def should_drop(self, frames_sent: int) -> bool:
        """Whether a connection that already sent ``frames_sent`` frames must now be closed."""
        return 0 < self.drop_after_frames <= frames_sent

    def should_stall(self, frames_sent: int) -> bool:
        """Whether to pause ``stall_seconds`` before the next frame (true once per connection)."""
        return self.stall_seconds > 0 and frames_sent == self.stall_after_frames

    def http_status(self, key: str = "") -> int | None:
        """Count one HTTP request; the error status (500 or 429) it must get, or None.

        Both counters see every request, so each "every N" holds on its own; 500 wins a tie.
        """
        fail = self.tick("http_500_every", key)
        limit = self.tick("http_429_every", key)
        return 500 if fail else 429 if limit else None

    def reset_counters(self) -> None:
        """Start every "every N" count afresh (e.g. between test phases)."""
        self._counters.clear()

    @property
    def any_active(self) -> bool:
        """True when at least one knob differs from its default."""
        return bool(self.active())

    def active(self) -> dict[str, Any]:
        """The knobs that differ from their defaults, by name."""
        default = Faults()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.init and f.name != "seed" and getattr(self, f.name) != getattr(default, f.name)
        }

    def __str__(self) -> str:
        """The CLI form of the active knobs; ``Faults.parse(str(f))`` gives them back."""
        parts = []
        for name, value in self.active().items():
            if isinstance(value, frozenset):
                text = "|".join(sorted(value))
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            parts.append(f"{name}={text}")
        if self.seed:
            parts.append(f"seed={self.seed}")
        return ",".join(parts)

    # ------------------------------------------------------------------ parsing

    @classmethod
    def knob_names(cls) -> list[str]:
        """Every settable knob name, in declaration order."""
        return [f.name for f in fields(cls) if f.init]

    @classmethod
    def parse(cls, text: str) -> Faults:
        """Build from ``"name=value,name=value,..."``; ValueError names any unknown knob or bad value."""
        hints = typing.get_type_hints(cls)
        known = set(cls.knob_names())
        values: dict[str, Any] = {}
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            name, sep, value = item.partition("=")
            name = cls.ALIASES.get(name.strip(), name.strip())
            if name not in known:
                raise ValueError(f"unknown fault knob {name!r} (known: {', '.join(sorted(known))})")
            if name in values:
                raise ValueError(f"fault knob {name!r} given twice")
            values[name] = _parse_value(name, hints[name], value.strip() if sep else None)
        return cls(**values)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _parse_value(name: str, kind: Any, text: str | None) -> Any:
    """Convert one knob's text by its declared type."""
    if text is None:
        if kind is bool or name == "private_address_dids" or kind == (bool | float):
            return True
        raise ValueError(f"fault knob {name!r} needs a value ({name}=...)")
    lowered = text.lower()
    if kind is bool:
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"fault knob {name!r} wants true/false, got {text!r}")
    if name == "private_address_dids":
        if lowered in _TRUE or lowered == "all":
            return True
        if lowered in _FALSE or lowered == "":
            return False
        dids = frozenset(d.strip() for d in text.split("|") if d.strip())
        bad = [d for d in dids if not d.startswith("did:")]
        if bad:
            raise ValueError(f"fault knob {name!r} wants DIDs separated by '|', got {bad[0]!r}")
        return dids
    if name == "only_hosts":
        return frozenset(h.strip().lower() for h in text.split("|") if h.strip())
    if kind == frozenset[str]:
        dids = frozenset(d.strip() for d in text.split("|") if d.strip())
        if any(not d.startswith("did:") for d in dids):
            raise ValueError(f"fault knob {name!r} wants DIDs separated by '|', got {text!r}")
        return dids
    if kind == (bool | float):
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        prob = _number(name, text, float)
        if prob > 1:
            raise ValueError(f"fault knob {name!r} wants true/false or a probability in [0, 1], got {text!r}")
        return prob
    if kind is int:
        return _number(name, text, int)
    if kind is float:
        return _number(name, text, float)
    if kind is str:
        if not text:
            raise ValueError(f"fault knob {name!r} needs a non-empty value")
        return text
    raise ValueError(f"fault knob {name!r} cannot be set from text")


def _number(name: str, text: str, kind: type[int] | type[float]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ValueError(f"fault knob {name!r} wants {noun}, got {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise ValueError(f"fault knob {name!r} must be a finite number >= 0, got {text!r}")
    return value


def http_fault_middleware(faults: Faults, key: str = "", server: str | None = None) -> Middleware:
    """aiohttp middleware applying ``slow_response_ms``, ``http_500_every`` and ``http_429_every``.

    ``key`` keeps the request counters of one server apart from the others sharing ``faults``;
    ``server`` (a PDS hostname) is what ``only_hosts`` matches.
    The 429 carries the headers the reference PDS sends (``RateLimit-*``) plus ``Retry-After``.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if not faults.applies_to(server):
            return await handler(request)
        if faults.slow_response_ms > 0:
            await asyncio.sleep(faults.slow_response_ms / 1000)
        status = faults.http_status(key)
        if status == 500:
            body = {"error": "InternalServerError", "message": "Internal Server Error (injected fault)"}
            return web.Response(status=500, body=orjson.dumps(body), content_type="application/json")
        if status == 429:
            wait = max(faults.retry_after_seconds, 0)
            headers = {
                "RateLimit-Limit": str(max(faults.http_429_every - 1, 1)),
                "RateLimit-Remaining": "0",
                "RateLimit-Reset": str(int(time.time()) + wait),
                "RateLimit-Policy": f"{max(faults.http_429_every - 1, 1)};w={max(wait, 1)}",
                "Retry-After": str(wait),
            }
            body = {"error": "RateLimitExceeded", "message": "Rate Limit Exceeded (injected fault)"}
            return web.Response(
                status=429, body=orjson.dumps(body), content_type="application/json", headers=headers
            )
        return await handler(request)

    return middleware
