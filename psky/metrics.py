"""Prometheus metrics and the health endpoint every psky service serves.

Each service builds its metrics on its own `CollectorRegistry` (so that tests and several
services in one process never collide) and serves them with `MetricsServer`:
`GET /metrics` (Prometheus text format) and `GET /health` (200 with a JSON body while the
service's health check passes, 503 otherwise).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from psky.httpserver import start_app

HealthCheck = Callable[[], Awaitable[dict[str, Any]]]


class HotValue:
    """One labelled child of a :class:`HotCounter` or :class:`HotGauge`: a plain number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class _HotMetric:
    """A labelled metric for per-frame hot paths. prometheus_client's ``Counter.inc`` checks
    and locks on every call (about 1.5 µs; a firehose frame updates four metrics); here a
    child is a number that the registry reads when it collects (a scrape, a test). Exact at
    any moment, but for one thread only: psky updates these from its event loop, where
    ``/metrics`` is served too."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], HotValue] = {}
        registry.register(self)

    def labels(self, *values: str, **labels: str) -> HotValue:
        if labels:
            if values or set(labels) != set(self.labelnames):
                raise ValueError(f"{self.name} takes the labels {self.labelnames}")
            values = tuple(str(labels[n]) for n in self.labelnames)
        elif len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {self.labelnames}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = HotValue()
        return child

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for key, child in list(self._children.items()):
            family.add_metric(list(key), child.value)
        yield family


class HotCounter(_HotMetric):
    """A counter (samples named ``<name>_total``) for hot paths; see :class:`_HotMetric`."""

    kind = "counter"


class HotGauge(_HotMetric):
    """A gauge for hot paths; see :class:`_HotMetric`."""

    kind = "gauge"


class MetricsServer:
    """`/metrics` and `/health` on `host:port` (port 0 picks a free one; see `.port`)."""

    def __init__(self, registry: CollectorRegistry, *, health: HealthCheck | None = None) -> None:
        self.registry = registry
        self.health = health
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str = "0.0.0.0", port: int = 9090) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/_health", self._health)
        self._runner, url = await start_app(app, host, port)
        self.port = int(url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        if self.health is None:
            return web.json_response({"status": "ok"})
        try:
            detail = await self.health()
        except Exception as e:  # a failing check is an unhealthy answer, not a 500
            return web.Response(status=503, body=orjson.dumps({"status": "unhealthy", "error": str(e)}),
                                content_type="application/json")
        ok = detail.get("status", "ok") == "ok"
        return web.Response(status=200 if ok else 503, body=orjson.dumps(detail), content_type="application/json")
