"""Per-PDS politeness and the address guard.

PDS endpoints come from DID documents, i.e. from anyone on the network, so the backfiller
never connects to loopback, private, link-local, multicast or otherwise non-global addresses
unless the operator allow-listed them (``BACKFILLER_ALLOW_HOSTS``: IPs, CIDRs or host names).
The guard checks the URL itself (IP literals bypass DNS in aiohttp) and also sits in the
HTTP client's resolver, so a name that resolves to a private address (DNS rebinding) is
refused at connect time as well.

Each PDS host gets a :class:`HostLimiter`: a concurrency cap, a request rate (token bucket)
and a "blocked until" time taken from ``Retry-After`` / ``RateLimit-*`` answers. Waiting for
one host happens before a worker slot is taken, so a slow or rate-limiting host never
starves the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

__all__ = [
    "AddressGuard",
    "AddressRefused",
    "GuardedResolver",
    "HostLimiter",
    "HostLimits",
    "HostRegistry",
    "parse_retry_after",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressRefused(ValueError):
    """A URL whose host is (or resolves to) an address the guard does not allow."""


def _is_public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class AddressGuard:
    """Refuses non-public targets unless allow-listed.

    ``allow`` items are IP addresses, CIDR networks or host names (exact, or ``*.suffix``);
    an allowed host name may resolve anywhere, an allowed network admits its addresses.
    """

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.networks: list[IPNetwork] = []
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self._accepted: dict[tuple[str, str], str] = {}
        for item in allow:
            item = item.strip().lower()
            if not item:
                continue
            try:
                self.networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if item.startswith("*."):
                self.suffixes.append(item[1:])
            else:
                self.names.add(item)

    def name_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.names or any(host.endswith(s) for s in self.suffixes)

    def address_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return _is_public(ip) or any(ip in net for net in self.networks)

    def check_url(self, url: str) -> str:
        """The URL's host, or :class:`AddressRefused` (bad scheme, or a refused IP literal).
        Host names are checked again when they are resolved (:class:`GuardedResolver`).

        The answer depends on the scheme and authority only, so an accepted one is
        remembered (the backfiller asks twice per repo, for a few distinct PDS hosts)."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        host = self._accepted.get(key)
        if host is not None:
            return host
        host = self._check_url(url, parts)
        if len(self._accepted) >= 10_000:
            self._accepted.clear()
        self._accepted[key] = host
        return host

    def _check_url(self, url: str, parts: SplitResult) -> str:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AddressRefused(f"not an http(s) URL with a host: {url!r:.200}")
        host = parts.hostname
        # aiohttp connects to the host as yarl normalises it (IDNA turns "１２７.0.0.1" into
        # the IP literal 127.0.0.1, which skips the resolver): check that form too
        try:
            connect_host = URL(url).host
        except (ValueError, TypeError):
            raise AddressRefused(f"not a URL aiohttp can fetch: {url!r:.200}") from None
        self._check_host(host)
        if connect_host and connect_host != host:
            self._check_host(connect_host)
        return host

    def _check_host(self, host: str) -> None:
        if self.name_allowed(host):
            return
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            bare = host.rstrip(".")
            if bare == "localhost" or bare.endswith(".localhost"):
                raise AddressRefused(
                    f"refusing loopback host {host} (not in BACKFILLER_ALLOW_HOSTS)"
                ) from None
            return
        if not self.address_allowed(host):
            raise AddressRefused(f"refusing non-public address {host} (not in BACKFILLER_ALLOW_HOSTS)")


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that drops addresses the guard refuses (and fails if none is left)."""

    def __init__(self, guard: AddressGuard, inner: AbstractResolver | None = None) -> None:
        self.guard = guard
        self.inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        if self.guard.name_allowed(host):
            return results
        kept = [r for r in results if self.guard.address_allowed(r["host"])]
        if not kept:
            raise OSError(f"refusing {host}: resolves only to non-public addresses")
        return kept

    async def close(self) -> None:
        await self.inner.close()


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or HTTP date) or, when the rate limit is
    spent (``RateLimit-Remaining: 0``), ``RateLimit-Reset`` (epoch seconds, or seconds
    when small). None when the answer says nothing usable."""
    now = time.time() if now is None else now
    value = headers.get("Retry-After")
    if value:
        value = value.strip()
        if value.isdigit():
            return float(value)
        with contextlib.suppress(TypeError, ValueError, IndexError):
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - now)
    remaining, reset = headers.get("RateLimit-Remaining"), headers.get("RateLimit-Reset")
    if reset and remaining is not None and remaining.strip() == "0":
        with contextlib.suppress(ValueError):
            number = float(reset)
            # draft headers give seconds left; the reference PDS gives an epoch timestamp
            return max(0.0, number - now) if number > 1e9 else number
    return None


@dataclass(frozen=True, slots=True)
class HostLimits:
    concurrency: int = 8
    rate: float = 50.0  # requests per second, 0 = unlimited
    burst: int = 10


@dataclass
class HostLimiter:
    """Politeness state of one PDS host (see the module doc)."""

    host: str
    limits: HostLimits
    blocked_until: float = 0.0  # monotonic
    active: int = 0
    #: requests queued for the concurrency cap (the backfiller defers repos beyond a backlog)
    waiting: int = 0
    requests: int = 0
    rate_limited: int = 0
    #: moving average of how long a request held a slot (seconds)
    latency_s: float = 0.0
    _sem: asyncio.Semaphore = field(init=False)
    _tokens: float = field(init=False)
    _last: float = field(init=False)

    def __post_init__(self) -> None:
        self._sem = asyncio.Semaphore(max(1, self.limits.concurrency))
        self._tokens = float(max(1, self.limits.burst))
        self._last = time.monotonic()

    def block_for(self, seconds: float) -> None:
        """The host asked us to back off (429, Retry-After)."""
        self.rate_limited += 1
        self.blocked_until = max(self.blocked_until, time.monotonic() + max(0.0, seconds))

    def blocked_for(self) -> float:
        return max(0.0, self.blocked_until - time.monotonic())

    def _take_token(self) -> float:
        """0 when a token was taken, else seconds until one is available."""
        rate = self.limits.rate
        if rate <= 0:
            return 0.0
        now = time.monotonic()
        self._tokens = min(float(max(1, self.limits.burst)), self._tokens + (now - self._last) * rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / rate

    @contextlib.asynccontextmanager
    async def slot(self, *, max_wait: float) -> AsyncIterator[None]:
        """One request's turn at this host. Raises :class:`HostBlocked` instead of waiting
        longer than ``max_wait`` seconds for the host's own back-off to end."""
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        try:
            while True:
                blocked = self.blocked_for()
                if blocked > max_wait:
                    raise HostBlocked(self.host, blocked)
                if blocked > 0:
                    await asyncio.sleep(blocked)
                    continue
                wait = self._take_token()
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self.active += 1
            self.requests += 1
            started = time.monotonic()
            try:
                yield
            finally:
                self.active -= 1
                took = time.monotonic() - started
                self.latency_s = took if self.latency_s == 0 else 0.8 * self.latency_s + 0.2 * took
        finally:
            self._sem.release()

    def drain_estimate_s(self) -> float:
        """Rough time until what is queued and running here now is done."""
        return (self.waiting + self.active) * self.latency_s / max(1, self.limits.concurrency)

    def state(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "waiting": self.waiting,
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "blocked_for_s": round(self.blocked_for(), 3),
            "latency_s": round(self.latency_s, 3),
        }


class HostBlocked(Exception):
    """The host asked for a longer pause than a worker should wait for: reschedule."""

    def __init__(self, host: str, seconds: float) -> None:
        super().__init__(f"{host} rate-limited us for {seconds:.1f}s more")
        self.host = host
        self.seconds = seconds


class HostRegistry:
    """One :class:`HostLimiter` per host, created on first use (bounded by eviction of idle
    hosts)."""

    def __init__(self, limits: HostLimits, max_hosts: int = 10_000) -> None:
        self.limits = limits
        self.max_hosts = max_hosts
        self._hosts: dict[str, HostLimiter] = {}

    def get(self, host: str) -> HostLimiter:
        limiter = self._hosts.get(host)
        if limiter is None:
            if len(self._hosts) >= self.max_hosts:
                for name, old in list(self._hosts.items()):
                    if (
                        old.active == 0
                        and old.waiting == 0
                        and old.blocked_for() == 0
                        and not old._sem.locked()
                    ):
                        del self._hosts[name]
                        if len(self._hosts) < self.max_hosts // 2:
                            break
            limiter = self._hosts[host] = HostLimiter(host, self.limits)
        return limiter

    def __len__(self) -> int:
        return len(self._hosts)

    def items(self) -> list[tuple[str, HostLimiter]]:
        return list(self._hosts.items())
