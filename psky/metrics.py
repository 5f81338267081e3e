"""Prometheus metrics and the health endpoint every psky service serves.

Each service builds its metrics on its own `CollectorRegistry` (so that tests and several
services in one process never collide) and serves them with `MetricsServer`:
`GET /metrics` (Prometheus text format) and `GET /health` (200 with a JSON body while the
service's health check passes, 503 otherwise).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from psky.httpserver import start_app

HealthCheck = Callable[[], Awaitable[dict[str, Any]]]


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
